"""Token-weighted loss and perplexity of a model on a data file (records are never packed).

loss = total negative log-likelihood of the predicted tokens / their number, over the whole file,
with Hugging Face's label shift (the model reads ids[:-1] and predicts ids[1:]).
"""

from __future__ import annotations

import functools
import math
import sys
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from jaxtune import inference
from jaxtune.data import formats, pipeline, sources
from jaxtune.models import llama
from jaxtune.models.config import ModelConfig


def bucket_length(n: int) -> int:
  """n rounded up to a power of two up to 64, then to a multiple of 64: few shapes, few compiles."""
  if n <= 64:
    return max(8, 1 << (n - 1).bit_length())
  return -(-n // 64) * 64


def batch_of(encoded: Sequence[formats.Encoded], batch_size: int, length: int) -> dict[str, np.ndarray]:
  """Records right-padded into a batch_size x length batch (rows past the records are padding)."""
  batch = {name: np.zeros((batch_size, length), np.int32)
           for name in ("inputs", "targets", "positions", "segment_ids")}
  batch["weights"] = np.zeros((batch_size, length), np.float32)
  for row, e in enumerate(encoded):
    n = len(e.ids) - 1
    batch["inputs"][row, :n] = e.ids[:-1]
    batch["targets"][row, :n] = e.ids[1:]
    batch["weights"][row, :n] = e.loss_mask[1:]
    batch["positions"][row, :n] = np.arange(n)
    batch["segment_ids"][row, :n] = 1
  return batch


@functools.partial(jax.jit, static_argnames=("cfg", "peft"))
def nll_sum(params: llama.Params, batch: dict[str, jax.Array], cfg: ModelConfig,
            peft: llama.PeftRuntime = llama.PeftRuntime()) -> tuple[jax.Array, jax.Array]:
  """(sum of the weighted token NLLs, sum of the weights) of one batch."""
  logits, _ = llama.forward(params, cfg, batch["inputs"], batch["positions"], batch["segment_ids"],
                            peft=peft)
  nll = llama.token_nll(logits, batch["targets"])
  weights = batch["weights"]
  return jnp.sum(jnp.where(weights > 0, nll * weights, 0.0)), jnp.sum(weights)


def evaluate_encoded(params: llama.Params, cfg: ModelConfig, encoded: Sequence[formats.Encoded], *,
                     batch_size: int = 8, peft: llama.PeftRuntime = llama.PeftRuntime(),
                     progress: bool = False) -> dict[str, Any]:
  """{"loss", "perplexity", "tokens", "records"} over all encoded records."""
  if batch_size < 1:
    raise ValueError(f"--batch_size={batch_size} must be >= 1")
  usable = [e for e in encoded if len(e.ids) >= 2]  # a 1-token record predicts nothing
  # Similar lengths share a batch: less padding, and each length bucket compiles once.
  usable.sort(key=lambda e: len(e.ids))
  chunks = [usable[i:i + batch_size] for i in range(0, len(usable), batch_size)]
  total_nll, total_tokens = 0.0, 0.0
  for chunk in tqdm.tqdm(chunks, desc="evaluate", unit="batch", file=sys.stderr, disable=not progress):
    batch = batch_of(chunk, batch_size, bucket_length(max(len(e.ids) for e in chunk) - 1))
    nll, count = nll_sum(params, batch, cfg, peft)
    total_nll += float(nll)
    total_tokens += float(count)
  if total_tokens == 0:
    raise ValueError("the data has no predicted tokens")
  loss = total_nll / total_tokens
  return {"loss": loss, "perplexity": math.exp(loss) if loss < 700 else math.inf,
          "tokens": int(round(total_tokens)), "records": len(encoded)}


def encode_file(data: str, data_format: str, tokenizer, *, template: str = "alpaca",
                max_len: int = 0, num_proc: int = 0) -> tuple[list[formats.Encoded], int]:
  """(encoded records, how many were cut to max_len tokens); a bad record raises FILE:LINE: ...
  num_proc: tokenizing processes, as data.num_proc (0 = auto: one per 5,000 records)."""
  records = sources.read_records(data)
  encoded, truncated = pipeline.encode_unpacked(records, data_format, tokenizer, template=template,
                                                max_len=max_len, num_proc=num_proc)
  if not encoded:
    raise sources.DataError(f"{data}: no records")
  return encoded, truncated


def default_template(tokenizer) -> str:
  return "chat" if inference.has_chat_template(tokenizer) else "alpaca"


def evaluate_path(model: str, data: str, data_format: str = "text", *, adapter: str | None = None,
                  batch_size: int = 8, max_len: int = 0, instruction_template: str | None = None,
                  progress: bool = False, log: Callable[[str], None] = lambda s: None,
                  quantize: str = "auto", num_proc: int = 0) -> dict[str, Any]:
  """evaluate.py in-process: load the model (+ adapter), encode the file, evaluate."""
  if max_len < 0:
    raise ValueError(f"--max_len={max_len} must be >= 0 (0 = no limit)")
  cfg, params, peft, tokenizer = inference.load_for_inference(model, adapter, quantize=quantize)
  template = instruction_template or default_template(tokenizer)
  if data_format == "instruction":
    log(f"instruction template: {template}")
  if num_proc < 0:
    raise ValueError(f"--num_proc={num_proc} must be >= 0 (0 = auto)")
  encoded, truncated = encode_file(data, data_format, tokenizer, template=template, max_len=max_len,
                                   num_proc=num_proc)
  if truncated:
    log(f"{truncated} record(s) cut to --max_len={max_len} tokens")
  return evaluate_encoded(params, cfg, encoded, batch_size=batch_size, peft=peft, progress=progress)
