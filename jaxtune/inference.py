"""Loading a model (+ optional adapter) for evaluation and generation."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from etils import epath

from jaxtune.models import llama, loading, quantization
from jaxtune.models.config import ModelConfig
from jaxtune.peft import prefix


QUANTIZE_FLAG = ("auto", "none", *quantization.CHOICES[1:])  # evaluate.py / generate.py --quantize


def load_for_inference(model_path: str, adapter: str | None = None, dtype=jnp.float32, quantize: str = "auto"
                       ) -> tuple[ModelConfig, llama.Params, llama.PeftRuntime, Any]:
  """(config, params, PEFT knobs, tokenizer) of a HF folder or .gguf, with an adapter applied.

  `adapter` is a PEFT adapter folder (it has adapter_config.json) or a train.py workdir (local or
  gs://). `quantize`: none | a model.quantize choice (the base's layer kernels in 4 bits, quantization.py) | auto (as the
  adapter workdir's run had it, model.quantize, so its numbers are those of training; else none).
  """
  if adapter and not epath.Path(adapter).is_dir():
    raise FileNotFoundError(f"--adapter {adapter!r}: no such folder")
  is_workdir = bool(adapter) and not (epath.Path(adapter) / "adapter_config.json").exists()
  if quantize == "auto":
    from jaxtune import workdir  # only needed with a train.py workdir
    quantize = workdir.read_config(adapter).model.get("quantize", "") if is_workdir else ""
  cfg, params = loading.load_model(model_path, dtype, quantize="" if quantize == "none" else quantize)
  tokenizer = loading.load_tokenizer(model_path)
  peft = llama.PeftRuntime()
  if adapter and not is_workdir:
    from jaxtune import peft_io  # only needed with a PEFT adapter
    params, peft = peft_io.load_peft_adapter(params, cfg, adapter)
  elif adapter:
    from jaxtune import workdir
    params, peft = workdir.load_adapter_from_workdir(params, cfg, adapter)
  # a soft prompt (or a prefix's MLP) -> its keys/values, once, not at every decode step
  return cfg, prefix.fold_prefix(params, cfg), peft, tokenizer


def has_chat_template(tokenizer) -> bool:
  return bool(getattr(tokenizer, "chat_template", None))


def eos_ids(cfg: ModelConfig, tokenizer) -> tuple[int, ...]:
  """Every id that ends a sequence: the tokenizer's eos and the config's eos_token_id(s)."""
  ids = set(cfg.eos_token_ids)
  if tokenizer.eos_token_id is not None:
    ids.add(int(tokenizer.eos_token_id))
  return tuple(sorted(ids))
