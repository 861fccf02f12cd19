"""LoRA: low-rank A/B leaves added inside the linear layers whose path matches a regex.

Leaves: `lora_a` (L x in x r, Kaiming-uniform like peft) and `lora_b` (L x r x out, zeros), so the
model starts exactly as the base. The forward pass adds x @ A @ B * scale where it finds them.
DoRA (peft's `use_dora`) adds `lora_magnitude` (L x out), starting at the kernel's per-output norm:
the layer's outputs are rescaled to it (llama.dora_delta).
"""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp

from jaxtune.models import llama, moe, quantization
from jaxtune.models.loading import flatten, unflatten

DEFAULT_TARGETS = r".*(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
# jaxtune's LoRA leaf -> the end of peft's saved key (base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight)
PEFT_KEYS = {"lora_a": "lora_A.weight", "lora_b": "lora_B.weight", "lora_magnitude": "lora_magnitude_vector"}


def lora_scale(rank: int, alpha: float, use_rslora: bool = False) -> float:
  """alpha / r, or alpha / sqrt(r) for rank-stabilised LoRA (as peft)."""
  return alpha / math.sqrt(rank) if use_rslora else alpha / rank


def _matches(pattern: re.Pattern, layer_path: str) -> bool:
  return bool(pattern.fullmatch(layer_path) or pattern.fullmatch(layer_path + "/kernel"))


def target_paths(params: llama.Params, targets: str) -> list[str]:
  """Paths of the linear layers (dicts holding a 'kernel', or its 4-bit form) whose path matches
  `targets` (re.fullmatch)."""
  pattern = re.compile(targets)
  kernels = [p.rsplit("/", 1)[0] for p in flatten(params) if p.rsplit("/", 1)[-1] in ("kernel", *quantization.CODE_LEAVES)]
  return [p for p in kernels if _matches(pattern, p)]


def linear_at(flat: dict, path: str) -> dict:
  """The leaves of the linear layer at `path` in a flat params dict, as the layer's own dict."""
  return {p[len(path) + 1:]: v for p, v in flat.items() if p.startswith(path + "/") and "/" not in p[len(path) + 1:]}


def targets_lm_head(targets: str) -> bool:
  """Whether `targets` selects lm_head, where LoRA is refused (the forward pass has no LoRA head)."""
  return _matches(re.compile(targets), "lm_head")


def add_lora(params: llama.Params, rng: jax.Array, rank: int, targets: str = DEFAULT_TARGETS,
             dtype=jnp.float32, use_dora: bool = False) -> llama.Params:
  """Returns params with LoRA (or DoRA) leaves in every targeted linear layer; an empty match is an error."""
  paths = target_paths(params, targets)
  if not paths:
    raise ValueError(f"peft.lora.targets={targets!r} matches no linear layer "
                     f"(paths look like 'layers/self_attn/q_proj')")
  if "lm_head" in paths:
    raise ValueError(f"peft.lora.targets={targets!r} matches lm_head: LoRA goes in the decoder layers only")
  flat = flatten(params)
  for path, key in zip(paths, jax.random.split(rng, len(paths))):
    linear = linear_at(flat, path)
    *lead, n_in, n_out = quantization.kernel_shape(linear)
    flat[path + "/lora_a"], flat[path + "/lora_b"] = init_lora(key, lead, n_in, n_out, rank, dtype)
    if use_dora:  # B = 0: the magnitude starts at ||W|| per output, so the model starts as the base
      kernel = quantization.kernel_of(linear).astype(jnp.float32)  # a quantized base: as it computes
      flat[path + "/lora_magnitude"] = jnp.linalg.norm(kernel, axis=-2).astype(dtype)
  return unflatten(flat)


def init_lora(key: jax.Array, lead: tuple[int, ...] | list[int], n_in: int, n_out: int, rank: int, dtype):
  """A fresh (A: lead x in x r, B: lead x r x out): A kaiming_uniform(a=sqrt(5)) as peft's r x in
  lora_A, B zeros, so the adapted layer starts as the base."""
  bound = 1.0 / math.sqrt(n_in)
  return (jax.random.uniform(key, (*lead, n_in, rank), jnp.float32, -bound, bound).astype(dtype),
          jnp.zeros((*lead, rank, n_out), dtype))


def is_lora_leaf(path: str) -> bool:
  return path.rsplit("/", 1)[-1] in ("lora_a", "lora_b", "lora_magnitude")


def merge_lora(params: llama.Params, scale: float) -> llama.Params:
  """Folds every A @ B * scale into its kernel (DoRA: then rescales each output column to its
  magnitude; experts: moe.merged_expert) and drops the LoRA leaves."""
  flat = flatten(params)
  out = {p: v for p, v in flat.items() if not is_lora_leaf(p)}
  if any(moe.is_expert_lora_leaf(p) for p in flat):
    mlp = unflatten(flat)["layers"]["mlp"]
    out.update({f"layers/mlp/experts/{part}": moe.merged_expert(mlp["experts"], mlp["expert_lora"], scale, part)
                for part in moe.EXPERTS})
  for path in [p[: -len("/lora_a")] for p in flat if p.endswith("/lora_a") and not moe.is_expert_lora_leaf(p)]:
    a, b = flat[path + "/lora_a"].astype(jnp.float32), flat[path + "/lora_b"].astype(jnp.float32)
    kernel = out[path + "/kernel"]
    merged = kernel.astype(jnp.float32) + jnp.matmul(a, b) * scale
    if path + "/lora_magnitude" in flat:
      magnitude = flat[path + "/lora_magnitude"].astype(jnp.float32)
      merged = merged * (magnitude / llama.dora_norm(kernel, a, b, scale))[..., None, :]
    out[path + "/kernel"] = merged.astype(kernel.dtype)
  return unflatten(out)
