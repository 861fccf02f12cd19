"""Bottleneck adapters (Houlsby et al. 2019): x + up(gelu(down(x))) after the attention and/or MLP block.

Leaves: `layers/attn_adapter` and `layers/mlp_adapter`, each {"down": {"kernel": L x D x n, "bias": L x n},
"up": {"kernel": L x n x D, "bias": L x D}}. The forward pass (llama.bottleneck_adapter) applies them
to the block's output before the residual add. `up` starts at zero, so the model starts exactly as
the base; `down` starts like LoRA's A (Kaiming-uniform), so `up` gets a useful gradient at step one.

Every layer gets adapters: the layers are stacked and scanned, so a per-layer selection would need
a non-trainable gate in the forward pass, which jaxtune does not have.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp

from jaxtune.models import llama
from jaxtune.models.config import ModelConfig

PLACEMENTS = ("attn", "mlp")


def init_adapter(rng: jax.Array, num_layers: int, dim: int, size: int, dtype=jnp.float32) -> llama.Params:
  """One stacked adapter: down ~ U(+-1/sqrt(dim)) (as LoRA's A), zero biases, zero up-projection."""
  bound = 1.0 / math.sqrt(dim)
  down = jax.random.uniform(rng, (num_layers, dim, size), jnp.float32, -bound, bound).astype(dtype)
  return {
      "down": {"kernel": down, "bias": jnp.zeros((num_layers, size), dtype)},
      "up": {"kernel": jnp.zeros((num_layers, size, dim), dtype), "bias": jnp.zeros((num_layers, dim), dtype)},
  }


def add_adapters(params: llama.Params, cfg: ModelConfig, rng: jax.Array, size: int,
                 placement: Sequence[str] = PLACEMENTS, dtype=jnp.float32) -> llama.Params:
  """Returns params with a bottleneck adapter of width `size` in every layer at each `placement`."""
  if size < 1:
    raise ValueError(f"peft.adapter.size={size} must be >= 1")
  placement = tuple(placement)
  bad = [p for p in placement if p not in PLACEMENTS]
  if bad or not placement:
    raise ValueError(f"peft.adapter.placement={','.join(placement)!r}: use attn, mlp or attn,mlp")
  layers = dict(params["layers"])
  for where, key in zip(placement, jax.random.split(rng, len(placement))):
    name = f"{where}_adapter"
    if name in layers:
      raise ValueError(f"the model already has {name} leaves")
    layers[name] = init_adapter(key, cfg.num_layers, cfg.hidden_size, size, dtype)
  return {**params, "layers": layers}
