"""On every tiny family: evaluate.py's loss equals transformers' PyTorch loss (fp32, within 2e-4),
and the forward pass's logits theirs (within 1e-5)."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import hf_tiny
from jaxtune import evaluation, inference
from jaxtune.data import formats
from jaxtune.models import llama, loading

# Different lengths (and length buckets) so a batch of 2 always carries padding.
TEXTS = [
    "Hi.",
    "The quick brown fox jumps over the lazy dog.",
    "JAX transforms numerical functions: grad, jit, vmap and pmap.",
    "In the beginning God created the heaven and the earth. And the earth was without form, and void.",
    "ok then",
]
INSTRUCTIONS = [
    {"instruction": "Name a colour.", "output": "Blue."},
    {"instruction": "Add the numbers.", "context": "2 and 3", "output": "2 + 3 = 5, so the sum is five."},
    {"instruction": "Say hello politely to the reader of this long instruction.", "output": "Hello!"},
]


def save_sharp_model(family, folder):
  """hf_tiny's random model with its layer weights scaled up (`hf_tiny.sharpen`), with the byte tokenizer."""
  return hf_tiny.save_hf_model(family, folder, sharp=True)


def write_jsonl(path, records):
  with open(path, "w") as f:
    for r in records:
      f.write(json.dumps(r) + "\n")
  return str(path)


def hf_loss(model, encoded):
  """sum over records of HF's label-shifted CE over the masked tokens / number of those tokens."""
  total, count = 0.0, 0.0
  with torch.no_grad():
    for e in encoded:
      ids = torch.tensor([e.ids])
      logits = model(ids).logits[0, :-1].double()
      nll = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none")
      weights = torch.tensor(e.loss_mask[1:], dtype=torch.float64)
      total += float((nll * weights).sum())
      count += float(weights.sum())
  return total / count, count


@pytest.fixture(scope="module")
def data_files(tmp_path_factory):
  folder = tmp_path_factory.mktemp("data")
  return (write_jsonl(folder / "text.jsonl", [{"text": t} for t in TEXTS]),
          write_jsonl(folder / "instruction.jsonl", INSTRUCTIONS))


@pytest.mark.parametrize("family", sorted(hf_tiny.FAMILIES))
def test_text_loss_matches_transformers(family, tmp_path, data_files):
  folder = str(tmp_path / family)
  model = save_sharp_model(family, folder)
  tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
  text_file, _ = data_files
  result = evaluation.evaluate_path(folder, text_file, "text", batch_size=2)
  # Labels are the tokenizer's input_ids verbatim, with HF's label shift (labels=input_ids).
  encoded = [formats.Encoded(tokenizer(t)["input_ids"], [1] * len(tokenizer(t)["input_ids"]))
             for t in TEXTS]
  with torch.no_grad():  # HF's own mean loss with labels=input_ids agrees for a single record
    ids = torch.tensor([encoded[1].ids])
    mean_one = float(model(ids, labels=ids).loss)
  assert abs(hf_loss(model, encoded[1:2])[0] - mean_one) < 1e-5
  expected, tokens = hf_loss(model, encoded)
  assert result["tokens"] == tokens == sum(len(e.ids) - 1 for e in encoded)
  assert result["records"] == len(TEXTS)
  assert abs(result["loss"] - expected) < 2e-4, (result["loss"], expected)
  assert abs(result["perplexity"] - np.exp(expected)) < 2e-4 * np.exp(expected)


@pytest.mark.parametrize("family", sorted(hf_tiny.FAMILIES))
def test_logits_match_transformers(family, tmp_path):
  """Logits of 40 random tokens within 1e-5 (seen: under 1e-6): the loss alone would let a small
  mistake through (Gemma 3's windowed layers with the global rope base move it by 1e-4)."""
  model = save_sharp_model(family, str(tmp_path))
  cfg, params = loading.load_model(str(tmp_path))
  ids = np.random.RandomState(0).randint(0, cfg.vocab_size, (2, 40))
  with torch.no_grad():
    expected = model(torch.tensor(ids)).logits.numpy()
  logits, _ = llama.forward(params, cfg, jnp.asarray(ids))
  np.testing.assert_allclose(np.asarray(logits), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", ["llama_bias", "qwen2"])
def test_instruction_loss_alpaca_matches_transformers(family, tmp_path, data_files):
  folder = str(tmp_path / family)
  model = save_sharp_model(family, folder)
  _, instruction_file = data_files
  result = evaluation.evaluate_path(folder, instruction_file, "instruction", batch_size=2,
                                    instruction_template="alpaca")
  tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
  encoded = [formats.encode_record(r, "instruction", tokenizer, template="alpaca") for r in INSTRUCTIONS]
  expected, tokens = hf_loss(model, encoded)
  # Only the output tokens + eos count: far fewer than all next-token predictions.
  assert result["tokens"] == tokens < sum(len(e.ids) - 1 for e in encoded)
  assert abs(result["loss"] - expected) < 2e-4, (result["loss"], expected)


def test_same_shape_batches_trace_forward_once(tmp_path, monkeypatch):
  folder = str(tmp_path / "llama")
  hf_tiny.save_hf_model("llama_untied", folder)
  cfg, params, peft, tokenizer = inference.load_for_inference(folder)
  traces = []
  real_forward = llama.forward

  def counting_forward(*args, **kwargs):
    traces.append(1)  # runs only while jax traces nll_sum, never when it runs compiled code
    return real_forward(*args, **kwargs)

  monkeypatch.setattr(evaluation.llama, "forward", counting_forward)
  evaluation.nll_sum.clear_cache()
  # Four records of 10..13 tokens, batch 2: two batches, both 2 x bucket_length(12) = 2 x 16.
  encoded = [formats.Encoded(list(range(3, 3 + n)), [1] * n) for n in (10, 11, 12, 13)]
  result = evaluation.evaluate_encoded(params, cfg, encoded, batch_size=2, peft=peft)
  assert result["tokens"] == 9 + 10 + 11 + 12
  assert len(traces) == 1
  evaluation.evaluate_encoded(params, cfg, encoded[:2], batch_size=2, peft=peft)
  assert len(traces) == 1  # same shapes again: still cached
  longer = [formats.Encoded(list(range(3, 43)), [1] * 40)]
  evaluation.evaluate_encoded(params, cfg, longer, batch_size=2, peft=peft)
  assert len(traces) == 2  # a new length bucket (64) compiles once more


def test_bucket_length():
  assert [evaluation.bucket_length(n) for n in (1, 8, 9, 33, 64, 65, 128, 129)] == [
      8, 8, 16, 64, 64, 128, 128, 192]


CHATS = [
    [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "It is 5."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."},
     {"role": "assistant", "content": "Blue, like the sea."}],
]


def test_chat_loss_matches_the_contract_definition(tmp_path):
  """Chat: the tokens after apply_chat_template(messages[:-1], add_generation_prompt=True), up to and
  including the end-of-turn token, computed here from transformers' tokenizer and torch model alone."""
  folder = str(tmp_path / "llama_untied")
  model = save_sharp_model("llama_untied", folder)
  chat_file = write_jsonl(tmp_path / "chat.jsonl", [{"messages": m} for m in CHATS])
  result = evaluation.evaluate_path(folder, chat_file, "chat", batch_size=2)
  tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
  total, count = 0.0, 0
  with torch.no_grad():
    for messages in CHATS:
      ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
      start = len(tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True,
                                                tokenize=True, return_dict=True)["input_ids"])
      end = ids.index(tokenizer.convert_tokens_to_ids("<|im_end|>"), start) + 1
      logits = model(torch.tensor([ids])).logits[0].double()
      nll = torch.nn.functional.cross_entropy(logits[start - 1:end - 1], torch.tensor(ids[start:end]),
                                              reduction="sum")
      total, count = total + float(nll), count + (end - start)
  assert result["tokens"] == count
  assert abs(result["loss"] - total / count) < 2e-4, (result["loss"], total / count)
