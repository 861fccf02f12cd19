"""Adds the leaves of the configured PEFT method to base params (full fine-tuning adds none)."""

from __future__ import annotations

import jax
import ml_collections

from jaxtune.models import llama
from jaxtune.models.config import ModelConfig
from jaxtune.peft import lora, partition


def peft_runtime(peft: ml_collections.ConfigDict) -> llama.PeftRuntime:
  if peft.method not in partition.LORA_METHODS:
    return llama.PeftRuntime()
  return llama.PeftRuntime(lora_scale=lora.lora_scale(peft.lora.rank, peft.lora.alpha, peft.lora.use_rslora),
                           lora_dropout=peft.lora.dropout)


def add_peft(params: llama.Params, cfg: ModelConfig, peft: ml_collections.ConfigDict, rng: jax.Array,
             dtype) -> llama.Params:
  """Base params + the method's (freshly initialised) leaves."""
  if peft.method in partition.LORA_METHODS:
    params = lora.add_lora(params, rng, peft.lora.rank, peft.lora.targets, dtype,
                           use_dora=peft.method == "dora" or peft.lora.use_dora)
    if peft.lora.expert_targets:
      from jaxtune.peft import expert_lora
      params = expert_lora.add_expert_lora(params, jax.random.fold_in(rng, 1), peft.lora.rank,
                                           peft.lora.expert_targets, dtype)
    return params
  if peft.method == "ia3":
    from jaxtune.peft import ia3
    return ia3.add_ia3(params, peft.ia3.targets, peft.ia3.feedforward, dtype)
  if peft.method == "adapter":
    from jaxtune.peft import adapter
    placement = tuple(p for p in peft.adapter.placement.split(",") if p)
    return adapter.add_adapters(params, cfg, rng, peft.adapter.size, placement=placement)
  if peft.method == "prefix":
    from jaxtune.peft import prefix
    return prefix.add_prefix(params, cfg, rng, peft.prefix.length,
                             reparam_hidden=peft.prefix.reparam_hidden)
  if peft.method == "prompt":
    from jaxtune.peft import prompt
    return prompt.add_prompt(params, cfg, rng, peft.prompt.length, dtype)
  return params
