"""Records -> token ids + loss masks, for the formats of the contract (text, instruction, chat, preference).

Every encoder returns `Encoded(ids, loss_mask)`: `loss_mask[j] == 1` means token j is a prediction
target (Hugging Face's label shift: the model reads ids[:-1] and predicts ids[1:]).
A problem with a record raises RecordError naming the field; the caller adds FILE:LINE.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

FORMATS = ("text", "instruction", "chat", "preference")
INSTRUCTION_TEMPLATES = ("alpaca", "chat")

# The instruction template (Stanford Alpaca's wording, the de-facto standard for instruction data).
ALPACA_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
ALPACA_PROMPT_WITH_CONTEXT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n### Instruction:\n"
    "{instruction}\n\n### Input:\n{context}\n\n### Response:\n")


class RecordError(ValueError):
  """A record is malformed; the message names the field."""


@dataclasses.dataclass(frozen=True)
class Encoded:
  ids: list[int]
  loss_mask: list[int]


def _field(record: dict[str, Any], name: str, *, optional: bool = False, allow_empty: bool = False):
  if not isinstance(record, dict):
    raise RecordError(f"record is a {type(record).__name__}, expected a JSON object")
  if name not in record or record[name] is None:
    if optional:
      return None
    raise RecordError(f"missing field {name!r}")
  value = record[name]
  if not isinstance(value, str):
    raise RecordError(f"field {name!r} must be a string, got {type(value).__name__}")
  if not allow_empty and not value.strip():
    if optional:
      return None
    raise RecordError(f"field {name!r} is empty")
  return value


def eos_id(tokenizer) -> int:
  if tokenizer.eos_token_id is None:
    raise RecordError("the tokenizer has no eos token")
  return int(tokenizer.eos_token_id)


def encode_text(record: dict[str, Any], tokenizer, *, add_eos: bool = False) -> Encoded:
  """`tokenizer(text)["input_ids"]` exactly; every token is a target."""
  ids = list(tokenizer(_field(record, "text"))["input_ids"])
  if add_eos:
    ids.append(eos_id(tokenizer))
  return Encoded(ids, [1] * len(ids))


def _messages(record: dict[str, Any], name: str = "messages") -> list[dict[str, str]]:
  messages = record.get(name) if isinstance(record, dict) else None
  if messages is None:
    raise RecordError(f"missing field {name!r}")
  if not isinstance(messages, list) or not messages:
    raise RecordError(f"field {name!r} must be a non-empty list of messages")
  for i, m in enumerate(messages):
    if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
      raise RecordError(f"field {name!r}[{i}] must be an object with string 'role' and 'content'")
  return messages


def _chat_ids(tokenizer, messages, add_generation_prompt: bool) -> list[int]:
  out = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                      tokenize=True)
  if isinstance(out, dict) or hasattr(out, "keys"):
    out = out["input_ids"]
  return list(out)


def encode_chat_messages(messages: list[dict[str, str]], tokenizer, *, train_on_prompt: bool = False) -> Encoded:
  """Chat template render; every assistant turn is a target up to and including its end-of-turn token."""
  if getattr(tokenizer, "chat_template", None) is None:
    raise RecordError("the tokenizer has no chat template (use data.format=instruction or text)")
  if not any(m["role"] == "assistant" for m in messages):
    raise RecordError("field 'messages' has no assistant turn")
  ids = _chat_ids(tokenizer, messages, add_generation_prompt=False)
  mask = [1 if train_on_prompt else 0] * len(ids)
  end_of_turn = eos_id(tokenizer)
  for i, m in enumerate(messages):
    if m["role"] != "assistant":
      continue
    if not m["content"].strip():
      raise RecordError(f"field 'messages'[{i}] (assistant) is empty")
    start = len(_chat_ids(tokenizer, messages[:i], add_generation_prompt=True))
    upto = ids if i + 1 == len(messages) else _chat_ids(tokenizer, messages[:i + 1], add_generation_prompt=False)
    if ids[:len(upto)] != upto or start > len(upto):
      raise RecordError("the chat template does not render turns as prefixes of the conversation")
    end = len(upto)
    if end_of_turn in upto[start:]:
      end = start + upto[start:].index(end_of_turn) + 1
    for j in range(start, end):
      mask[j] = 1
  return Encoded(ids, mask)


def encode_chat(record: dict[str, Any], tokenizer, *, train_on_prompt: bool = False) -> Encoded:
  return encode_chat_messages(_messages(record), tokenizer, train_on_prompt=train_on_prompt)


def instruction_messages(instruction: str, context: str | None) -> list[dict[str, str]]:
  content = instruction if not context else f"{instruction}\n\n{context}"
  return [{"role": "user", "content": content}]


def alpaca_prompt(instruction: str, context: str | None) -> str:
  if context:
    return ALPACA_PROMPT_WITH_CONTEXT.format(instruction=instruction, context=context)
  return ALPACA_PROMPT.format(instruction=instruction)


def encode_prompt_response(prompt: str | list, response: str, tokenizer, *, template: str,
                           train_on_prompt: bool = False) -> Encoded:
  """A prompt (text, or messages for the chat template) and its desired response (+ end of turn)."""
  if template == "chat":
    messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
    return encode_chat_messages(messages + [{"role": "assistant", "content": response}], tokenizer,
                                train_on_prompt=train_on_prompt)
  prompt_ids = list(tokenizer(prompt)["input_ids"])
  response_ids = list(tokenizer(response, add_special_tokens=False)["input_ids"]) + [eos_id(tokenizer)]
  mask = [1 if train_on_prompt else 0] * len(prompt_ids) + [1] * len(response_ids)
  return Encoded(prompt_ids + response_ids, mask)


def instruction_prompt(record: dict[str, Any], template: str) -> str | list[dict[str, str]]:
  """An instruction record's prompt: one user turn for the chat template, else alpaca's text."""
  instruction = _field(record, "instruction")
  context = _field(record, "context", optional=True, allow_empty=True)
  return instruction_messages(instruction, context) if template == "chat" else alpaca_prompt(instruction, context)


def encode_instruction(record: dict[str, Any], tokenizer, *, template: str = "alpaca",
                       train_on_prompt: bool = False) -> Encoded:
  """instruction (+ optional context) -> prompt; loss on output tokens + end of turn only."""
  prompt = instruction_prompt(record, template)
  return encode_prompt_response(prompt, _field(record, "output"), tokenizer, template=template,
                                train_on_prompt=train_on_prompt)


def encode_preference(record: dict[str, Any], tokenizer, *, template: str = "alpaca") -> tuple[Encoded, Encoded]:
  """(chosen, rejected) encodings that share the prompt; prompt tokens never count."""
  if not isinstance(record, dict):
    raise RecordError(f"record is a {type(record).__name__}, expected a JSON object")
  prompt = record.get("prompt")
  if isinstance(prompt, list):
    prompt, template = _messages(record, "prompt"), "chat"
  else:
    prompt = _field(record, "prompt")
  chosen, rejected = _field(record, "chosen"), _field(record, "rejected")
  style = "chat" if template == "chat" else "raw"
  return (encode_prompt_response(prompt, chosen, tokenizer, template=style),
          encode_prompt_response(prompt, rejected, tokenizer, template=style))


def generation_prompt(record: dict[str, Any], fmt: str, tokenizer, *, template: str = "alpaca"
                      ) -> tuple[list[int], str | None]:
  """(prompt ids, reference or None) to generate a record's response from: exactly the tokens its
  training encoding puts before the response. instruction: the prompt (chat template or alpaca);
  the output, when given, is the reference. chat: the turns before the last assistant turn (the
  reference), or all of them when the last turn is not the assistant's."""
  if fmt == "instruction":
    prompt = instruction_prompt(record, template)
    reference = _field(record, "output", optional=True)
    if template == "chat":
      return _chat_ids(tokenizer, prompt, add_generation_prompt=True), reference
    return list(tokenizer(prompt)["input_ids"]), reference
  if fmt == "chat":
    messages = _messages(record)
    if getattr(tokenizer, "chat_template", None) is None:
      raise RecordError("the tokenizer has no chat template (use data format instruction)")
    reference = None
    if messages[-1]["role"] == "assistant":
      messages, reference = messages[:-1], messages[-1]["content"]
    if not messages:
      raise RecordError("field 'messages' has no turn before the assistant's")
    return _chat_ids(tokenizer, messages, add_generation_prompt=True), reference
  raise ValueError(f"data format {fmt!r}: prompts come from instruction or chat records")


def encode_record(record: dict[str, Any], fmt: str, tokenizer, *, template: str = "alpaca",
                  train_on_prompt: bool = False, add_eos: bool = False) -> Encoded:
  """Dispatch for the single-sequence formats (text, instruction, chat)."""
  if fmt == "text":
    return encode_text(record, tokenizer, add_eos=add_eos)
  if fmt == "instruction":
    return encode_instruction(record, tokenizer, template=template, train_on_prompt=train_on_prompt)
  if fmt == "chat":
    return encode_chat(record, tokenizer, train_on_prompt=train_on_prompt)
  raise ValueError(f"data format {fmt!r} is not a single-sequence format (one of text|instruction|chat)")


def predicted_tokens(encoded: Sequence[Encoded]) -> int:
  return sum(sum(e.loss_mask[1:]) for e in encoded)
