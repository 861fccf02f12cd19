"""Prompt tuning (Lester et al. 2021; peft's PROMPT_TUNING): P trainable input embeddings, a "soft
prompt" before every sequence.

Leaf: `prompt_embeddings` (P x D, peft's saved tensor). peft prepends them to each example's input
embeddings, so the real tokens sit at positions P.. and attend to them. In every layer, the prompt's
keys and values depend on the prompt alone (it comes first and attends only to itself). So the
forward pass computes them once from the embeddings (`prompt_as_prefix`, run by
prefix.materialize_prefix) and uses them as a prefix, prefix tuning's path: the same numbers as
peft's, shared by every packed sequence of a row.

One difference from peft: its loss also scores the first real token, from the prompt's last
position. jaxtune scores the same target tokens as every other method.

Init: the embeddings of P random vocabulary tokens (peft's SAMPLE_VOCAB), so the prompt starts at the
scale of real inputs. peft's default, N(0, 1), is about 50x a typical embedding's scale.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxtune.models.config import ModelConfig
from jaxtune.peft import prefix

Params = dict[str, Any]


def add_prompt(params: Params, cfg: ModelConfig, rng: jax.Array, length: int, dtype=jnp.float32) -> Params:
  """Returns params with a trainable soft prompt of `length` virtual tokens (random vocabulary embeddings)."""
  if length < 1:
    raise ValueError(f"peft.prompt.length={length} must be >= 1")
  if "prompt_embeddings" in params:
    raise ValueError("the model already has a soft prompt")
  tokens = jax.random.randint(rng, (length,), 0, cfg.vocab_size, jnp.int32)
  embeddings = params["embed_tokens"][tokens] * cfg.embed_scale  # as the model scales them (Gemma)
  return {**params, "prompt_embeddings": embeddings.astype(dtype)}


def prompt_as_prefix(params: Params, cfg: ModelConfig) -> Params:
  """params with the soft prompt replaced by the keys/values the model computes for it in every layer."""
  base = {n: p for n, p in params.items() if n != "prompt_embeddings"}
  k, v = prefix.prompt_kv(base, cfg, embeddings_PxD=params["prompt_embeddings"])
  return prefix.attach_prefix(base, k, v)
