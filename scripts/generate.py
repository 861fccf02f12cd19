r"""Completions of prompts with a model (+ optional adapter), KV-cache decoding.

  python scripts/generate.py --model MODEL [--adapter DIR] --prompt TEXT [--prompt TEXT ...] \
      [--max_new_tokens 64] [--temperature 0] [--top_p 1.0] [--seed 0] [--raw] [--json] \
      [--compute_dtype float32]
  python scripts/generate.py --model MODEL [--adapter DIR] --data FILE.jsonl \
      [--data_format instruction|chat] [--instruction_template alpaca|chat] [--batch_size 8] ...

Prints each completion's new text (not the prompt); with --json one JSON object per prompt with
`prompt` and `completion`. Instruct models (the tokenizer has a chat template) get it unless --raw.
With --data, each record's prompt is the one training put before its response (instruction
records: the chat template if the tokenizer has one, else alpaca; chat records: the turns before
the last assistant turn), generated --batch_size records at a time; one JSON object per record:
`source` (FILE:LINE), `reference` (the record's output or last assistant turn, or null) and
`completion`.
"""

import json

from absl import app, flags

from jaxtune import cli, huge_pages, inference, sampling
from jaxtune.config_checks import DTYPES
from jaxtune.data import formats, sources

_MODEL = flags.DEFINE_string("model", None, "Hugging Face model folder or .gguf file.", required=True)
_PROMPT = flags.DEFINE_multi_string("prompt", None, "A prompt (repeat for a batch); or give --data.")
_DATA = flags.DEFINE_string("data", None, "Instruction or chat records (JSONL/JSON/CSV/parquet) to respond to.")
_FORMAT = flags.DEFINE_enum("data_format", "instruction", ["instruction", "chat"], "--data's record format.")
_TEMPLATE = flags.DEFINE_enum(
    "instruction_template", None, list(formats.INSTRUCTION_TEMPLATES),
    "Prompt template of instruction records (default: chat if the tokenizer has one, else alpaca).")
_BATCH = flags.DEFINE_integer("batch_size", 8, "--data records generated at once.")
_ADAPTER = flags.DEFINE_string("adapter", None, "A train.py workdir or a PEFT adapter folder.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 64, "Most new tokens per prompt.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0 = greedy; else sampling temperature.")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass (with temperature > 0).")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_RAW = flags.DEFINE_bool("raw", False, "Do not apply the chat template.")
_JSON = flags.DEFINE_bool("json", False, "One JSON object per prompt: {prompt, completion}.")
_QUANTIZE = flags.DEFINE_enum(
    "quantize", "auto", list(inference.QUANTIZE_FLAG),
    "nf4/fp4: hold the base's layer kernels in 4 bits (QLoRA; *_double_quant: their scales in 8 bits too); "
    "auto: as the --adapter workdir trained.")
_COMPUTE_DTYPE = flags.DEFINE_enum("compute_dtype", "float32", list(DTYPES),
                                   "Activations and KV cache (bfloat16: the matmul units of TPUs/GPUs); "
                                   "logits and sampling stay float32.")


@cli.exit_on_user_error
def main(argv):
  if len(argv) > 1:
    raise ValueError(f"unexpected arguments: {' '.join(argv[1:])}")
  sampling.check_options(_MAX_NEW.value, _TEMPERATURE.value, _TOP_P.value)
  if bool(_PROMPT.value) == bool(_DATA.value):
    raise ValueError("give --prompt (one or more) or --data, not both")
  if _BATCH.value < 1:
    raise ValueError(f"--batch_size must be >= 1, got {_BATCH.value}")
  cfg, params, peft, tokenizer = inference.load_for_inference(_MODEL.value, _ADAPTER.value, quantize=_QUANTIZE.value)

  def complete(prompts: list[list[int]], seed: int) -> list[str]:
    outputs = sampling.generate(
        params, cfg, prompts, max_new_tokens=_MAX_NEW.value, temperature=_TEMPERATURE.value,
        top_p=_TOP_P.value, seed=seed, eos_ids=inference.eos_ids(cfg, tokenizer),
        pad_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0, peft=peft,
        compute_dtype=_COMPUTE_DTYPE.value)
    return [tokenizer.decode(ids, skip_special_tokens=True) for ids in outputs]

  if _DATA.value:
    respond_to_records(tokenizer, complete)
    return
  chat = inference.has_chat_template(tokenizer) and not _RAW.value
  completions = complete([sampling.prompt_ids(tokenizer, p, chat) for p in _PROMPT.value], _SEED.value)
  for prompt, completion in zip(_PROMPT.value, completions):
    print(json.dumps({"prompt": prompt, "completion": completion}) if _JSON.value else completion)


def respond_to_records(tokenizer, complete) -> None:
  """--data: every record's prompt as training encodes it, --batch_size at a time (batch k samples
  with seed --seed + k); prints a JSON line per record as its batch finishes."""
  records = sources.read_records(_DATA.value)
  if not records.records:
    raise sources.DataError(f"{_DATA.value}: no records")
  template = _TEMPLATE.value or ("chat" if inference.has_chat_template(tokenizer) else "alpaca")
  prompts = []
  for record, origin in zip(records.records, records.origins):
    try:
      prompts.append(formats.generation_prompt(record, _FORMAT.value, tokenizer, template=template))
    except formats.RecordError as e:
      raise sources.DataError(f"{origin}: {e}") from None
  size = _BATCH.value
  for k, start in enumerate(range(0, len(prompts), size)):
    batch = prompts[start:start + size]
    completions = complete([ids for ids, _ in batch], _SEED.value + k)
    for origin, (_, reference), completion in zip(records.origins[start:], batch, completions):
      print(json.dumps({"source": origin, "reference": reference, "completion": completion}), flush=True)


if __name__ == "__main__":
  huge_pages.restart_with_huge_pages()  # CPU runs: once, before anything is allocated (see its docstring)
  app.run(main, flags_parser=cli.parse_flags)
