"""LoRA on the experts of a mixture of experts (`peft.lora.expert_targets`), as peft's
`target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]` on transformers 5's models.

Each expert e of a targeted matrix gets its own A_e (in x r) and B_e (r x out); the expert's matrix
becomes W_e + scale * A_e B_e. transformers keeps gate and up as one matrix (gate_up_proj, gate first),
so they share one A_e. Leaves: `layers/mlp/expert_lora/{gate_up_proj,down_proj}/lora_a` (L x E x in x r)
and `lora_b` (L x E x r x out); moe.py runs and merges them, the LoRA method trains them.

peft's saved layout, per layer: lora_A.weight is (E*r) x in, expert-major; lora_B.weight is
out x (r*E), rank-major (peft's ParamWrapper reshapes it to out x r x E). Both matrices of one
layer's experts sit on one module: with both targeted, gate_up_proj's wrapper is nested inside
down_proj's (`experts.base_layer.lora_A`) and down_proj's is outermost (`experts.lora_A`).
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np

from jaxtune.models import moe
from jaxtune.peft.lora import init_lora

PEFT_PARAMETERS = {name: f"mlp.experts.{name}" for name in moe.EXPERT_LORA_TARGETS}  # peft's target_parameters
_PREFIX = "layers/mlp/expert_lora/"


def targeted(targets: str) -> list[str]:
  """The expert matrices (moe.EXPERT_LORA_TARGETS) whose name fullmatches `targets`."""
  return [name for name in moe.EXPERT_LORA_TARGETS if re.fullmatch(targets, name)]


def add_expert_lora(params: dict, rng: jax.Array, rank: int, targets: str, dtype=jnp.float32) -> dict:
  """params with LoRA on the targeted expert matrices: A with peft's kaiming-uniform init, B zeros."""
  if "experts" not in params["layers"]["mlp"]:
    raise ValueError("peft.lora.expert_targets: the model has no mixture-of-experts layers")
  names = targeted(targets)
  if not names:
    raise ValueError(f"peft.lora.expert_targets={targets!r} matches neither of {', '.join(moe.EXPERT_LORA_TARGETS)}")
  L, E, D, F = params["layers"]["mlp"]["experts"]["gate_proj"].shape
  sizes = {"gate_up_proj": (D, 2 * F), "down_proj": (F, D)}
  lora = {}
  for name, key in zip(names, jax.random.split(rng, len(names))):
    lora[name] = dict(zip(("lora_a", "lora_b"), init_lora(key, (L, E), *sizes[name], rank, dtype)))
  mlp = {**params["layers"]["mlp"], "expert_lora": lora}
  return {**params, "layers": {**params["layers"], "mlp": mlp}}


def names_in(paths) -> list[str]:
  """The targeted expert matrices among LoRA leaf paths, in moe.EXPERT_LORA_TARGETS order."""
  present = {p[len(_PREFIX):].split("/")[0] for p in paths if p.startswith(_PREFIX)}
  return [name for name in moe.EXPERT_LORA_TARGETS if name in present]


def peft_module(names: list[str], name: str, layer: int) -> str:
  """peft's key prefix of `name`'s LoRA in `layer` when `names` are targeted (see the module doc)."""
  nested = "base_layer." if name == "gate_up_proj" and "down_proj" in names else ""
  return f"base_model.model.model.layers.{layer}.mlp.experts.{nested}"


def to_peft(leaf: str, array_LxExIxO: np.ndarray) -> np.ndarray:
  """A stacked lora_a (L x E x in x r) or lora_b (L x E x r x out) -> peft's per-layer matrices,
  L x (E*r) x in or L x out x (r*E)."""
  L, E, n, m = array_LxExIxO.shape
  if leaf == "lora_a":
    return array_LxExIxO.transpose(0, 1, 3, 2).reshape(L, E * m, n)
  return array_LxExIxO.transpose(0, 3, 2, 1).reshape(L, m, n * E)


def from_peft(leaf: str, matrix: np.ndarray, num_experts: int) -> np.ndarray:
  """One layer's peft matrix -> jaxtune's E x in x r (lora_a) or E x r x out (lora_b)."""
  E = num_experts
  if leaf == "lora_a":
    Er, n_in = matrix.shape
    return matrix.reshape(E, Er // E, n_in).transpose(0, 2, 1)
  n_out, rE = matrix.shape
  return matrix.reshape(n_out, rE // E, E).transpose(2, 1, 0)
