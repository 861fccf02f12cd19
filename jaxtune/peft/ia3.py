"""IA3 (Liu et al. 2022, peft's IA3Config): learned vectors that rescale chosen linear layers.

Leaves, both starting at ones (so the model starts exactly as the base):
- `ia3_out` (L x out) on most targets: the layer's output, bias included, is multiplied by it
  (peft's default targets k_proj and v_proj);
- `ia3_in` (L x in) on the feed-forward targets: the layer's input is multiplied by it (down_proj).
The forward pass (llama.dense) applies whichever it finds; merging folds them into kernel and bias.
"""

from __future__ import annotations

import re

import jax.numpy as jnp

from jaxtune.models import llama, quantization
from jaxtune.models.loading import flatten, unflatten
from jaxtune.peft import lora

DEFAULT_TARGETS = r".*(k_proj|v_proj|down_proj)"  # peft's IA3 targets for Llama-family models
DEFAULT_FEEDFORWARD = r".*down_proj"
PEFT_KEY = "ia3_l"  # peft's saved key: base_model.model.model.layers.0.self_attn.k_proj.ia3_l


def add_ia3(params: llama.Params, targets: str = DEFAULT_TARGETS, feedforward: str = DEFAULT_FEEDFORWARD,
            dtype=jnp.float32) -> llama.Params:
  """Returns params with an IA3 vector of ones in every targeted linear layer: `ia3_in` where the
  path also matches `feedforward`, else `ia3_out`. An empty match is an error."""
  paths = lora.target_paths(params, targets)
  if not paths:
    raise ValueError(f"peft.ia3.targets={targets!r} matches no linear layer "
                     f"(paths look like 'layers/self_attn/k_proj')")
  if "lm_head" in paths:
    raise ValueError(f"peft.ia3.targets={targets!r} matches lm_head: IA3 goes in the decoder layers only")
  feedforward_pattern = re.compile(feedforward)
  flat = flatten(params)
  for path in paths:
    *lead, n_in, n_out = quantization.kernel_shape(lora.linear_at(flat, path))
    if feedforward_pattern.fullmatch(path):
      flat[path + "/ia3_in"] = jnp.ones((*lead, n_in), dtype)
    else:
      flat[path + "/ia3_out"] = jnp.ones((*lead, n_out), dtype)
  return unflatten(flat)


def is_ia3_leaf(path: str) -> bool:
  return path.rsplit("/", 1)[-1] in ("ia3_in", "ia3_out")


def merge_ia3(params: llama.Params) -> llama.Params:
  """Folds every IA3 vector into its layer (input scale: the kernel's rows; output scale: its
  columns and the bias) and drops the IA3 leaves."""
  flat = flatten(params)
  out = {p: v for p, v in flat.items() if not is_ia3_leaf(p)}
  for path, scale in flat.items():
    if not is_ia3_leaf(path):
      continue
    linear, leaf = path.rsplit("/", 1)
    kernel = out[linear + "/kernel"]
    scale = scale.astype(jnp.float32)
    if leaf == "ia3_in":
      out[linear + "/kernel"] = (kernel.astype(jnp.float32) * scale[..., :, None]).astype(kernel.dtype)
      continue
    out[linear + "/kernel"] = (kernel.astype(jnp.float32) * scale[..., None, :]).astype(kernel.dtype)
    if linear + "/bias" in out:
      bias = out[linear + "/bias"]
      out[linear + "/bias"] = (bias.astype(jnp.float32) * scale).astype(bias.dtype)
  return unflatten(out)
