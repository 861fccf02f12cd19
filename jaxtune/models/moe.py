"""Mixture-of-experts feed-forward blocks (Mixtral, Qwen2-MoE, Qwen3-MoE), as transformers computes them.

A router (D x E) scores each token; softmax in float32, the top k experts, their weights
renormalised to sum to 1 (Mixtral always; Qwen2/3-MoE when `norm_topk_prob`). Each expert is a gated
MLP; the block's output is the weighted sum of the chosen experts' outputs.

Leaves, per layer (stacked L first): `mlp/router/kernel` (D x E) and `mlp/experts/gate_proj`,
`up_proj` (E x D x F), `down_proj` (E x F x D). The experts are plain arrays, not `{kernel}`
layers, so LoRA, IA3 and NF4 quantization (which look for kernels) leave them alone: PEFT methods
train attention and the router stays frozen with the experts. LoRA on the experts themselves is
peft/expert_lora.py (leaves under `mlp/expert_lora`), run and merged here. Qwen2-MoE's shared expert
(`mlp/shared_expert/*_proj`, `mlp/shared_expert_gate`) is ordinary linear layers, run in llama._layer.

Two ways to run the experts (`model.moe_dispatch`, DISPATCHES; auto: dense on CPU, ragged elsewhere):
- dense: every expert on every token, combined by the routing weights (zero for the unchosen):
  E/k times the FLOPs (4x for Mixtral's 2 of 8) as plain batched matmuls. XLA:CPU runs
  `ragged_dot` as masked dense dots, so this is the faster one there (2.4 vs 5.9 s for a
  forward and backward pass with 32 experts, 4 a token).
- ragged: the N*k (token, expert) pairs sorted by expert, each expert's rows one group of
  `jax.lax.ragged_dot` (a grouped matmul), the outputs weighted and added back to their tokens:
  the FLOPs of the chosen experts only. On an fsdp x tensor mesh it gives one device's gradients.
  On TPU and GPU it lowers to XLA's ragged dot; its speed there is not measured here.
Training adds the router load-balancing loss when `train.router_aux_loss_coef` > 0 (transformers
adds `router_aux_loss_coef` x it with `output_router_logits=True`): `router_stats` per layer, summed
over layers, then `load_balancing_loss`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxtune.models.matmul import matmul

EXPERTS = ("gate_proj", "up_proj", "down_proj")
# LoRA on the experts (peft.lora.expert_targets) adapts transformers' two expert matrices, as peft's
# target_parameters do: gate_up_proj (gate and up in one, one A and one B per expert) and down_proj
EXPERT_LORA_TARGETS = ("gate_up_proj", "down_proj")
DISPATCHES = ("auto", "dense", "ragged")
_MIXTRAL_NAMES = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}


def is_expert_leaf(path: str) -> bool:
  return path.startswith("layers/mlp/experts/")


def is_expert_lora_leaf(path: str) -> bool:
  return path.startswith("layers/mlp/expert_lora/")


def is_router_leaf(path: str) -> bool:
  return path == "layers/mlp/router/kernel"


def param_shapes(num_layers: int, hidden: int, expert_intermediate: int, num_experts: int) -> dict:
  L, D, F, E = num_layers, hidden, expert_intermediate, num_experts
  return {"router": {"kernel": (L, D, E)},
          "experts": {"gate_proj": (L, E, D, F), "up_proj": (L, E, D, F), "down_proj": (L, E, F, D)}}


def _block(model_type: str, layer: int) -> str:
  return f"model.layers.{layer}.{'block_sparse_moe' if model_type == 'mixtral' else 'mlp'}"


def hf_name(model_type: str, path: str, index) -> str:
  """The HF tensor of an MoE leaf: `index` is the layer (router) or (layer, expert) (experts)."""
  if is_router_leaf(path):
    return f"{_block(model_type, index)}.gate.weight"
  layer, expert = index
  projection = path.rsplit("/", 1)[-1]
  name = _MIXTRAL_NAMES[projection] if model_type == "mixtral" else projection
  return f"{_block(model_type, layer)}.experts.{expert}.{name}.weight"


def top_experts(router_logits_NxE, top_k: int, normalize: bool):
  """(probs N x E, weights N x k, expert ids N x k), float32: softmax, top k, optionally renormalised."""
  probs = jax.nn.softmax(router_logits_NxE.astype(jnp.float32), axis=-1)
  weights, experts = jax.lax.top_k(probs, top_k)
  if normalize:
    weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
  return probs, weights, experts


def router_stats(probs_NxE, experts_NxK, valid_N):
  """(E,) each: how often each expert is among the top k, and its summed probability, over the
  valid (non-padding) tokens. Summed over layers, they give `load_balancing_loss`."""
  valid = valid_N.astype(jnp.float32)
  chosen = jnp.einsum("nke,n->e", jax.nn.one_hot(experts_NxK, probs_NxE.shape[-1], dtype=jnp.float32), valid)
  return chosen, jnp.einsum("ne,n->e", probs_NxE, valid)


def load_balancing_loss(chosen_E, probs_E, tokens):
  """Switch Transformer's auxiliary loss as transformers computes it over all layers' tokens:
  E x sum_e (fraction of the top-k choices that are e) x (mean router probability of e)
  (`tokens`: valid tokens times layers)."""
  tokens = jnp.maximum(tokens, 1.0)
  return chosen_E.shape[-1] * jnp.sum((chosen_E / tokens) * (probs_E / tokens))


def merged_expert(experts: dict, lora: dict, scale: float, part: str) -> jax.Array:
  """The experts' array `part` (one of EXPERTS) with its LoRA's scale * A @ B folded in: gate_proj
  and up_proj take their half of gate_up_proj's B (only that half is multiplied)."""
  name = "down_proj" if part == "down_proj" else "gate_up_proj"
  if name not in lora:
    return experts[part]
  b = lora[name]["lora_b"]
  if name == "gate_up_proj":
    half = b.shape[-1] // 2
    b = b[..., :half] if part == "gate_proj" else b[..., half:]
  delta = scale * jnp.matmul(lora[name]["lora_a"].astype(jnp.float32), b.astype(jnp.float32))
  return (experts[part].astype(jnp.float32) + delta).astype(experts[part].dtype)


def uses_ragged(dispatch: str) -> bool:
  return dispatch == "ragged" or (dispatch == "auto" and jax.default_backend() != "cpu")


def moe_mlp(mlp, h_NxD, top_k: int, normalize: bool, activation, dispatch: str = "auto", valid_N=None,
            lora_scale: float = 1.0):
  """(the block's output N x D in h's dtype, `router_stats` over `valid_N` (default: every token));
  `activation(gate, up)` is the experts' gated activation; LoRA on the experts (`expert_lora`) adds
  lora_scale * x A_e B_e to each expert's matrices."""
  probs_NxE, weights_NxK, experts_NxK = top_experts(matmul(h_NxD, mlp["router"]["kernel"]), top_k, normalize)
  run = _ragged_experts if uses_ragged(dispatch) else _dense_experts
  lora = {name: (ab["lora_a"], ab["lora_b"] * lora_scale) for name, ab in mlp.get("expert_lora", {}).items()}
  out = run(mlp["experts"], lora, h_NxD, weights_NxK, experts_NxK, activation).astype(h_NxD.dtype)
  valid_N = jnp.ones(h_NxD.shape[:1], bool) if valid_N is None else valid_N
  return out, router_stats(probs_NxE, experts_NxK, valid_N)


def _expert_mlp(x, experts, lora, apply, activation, dtype):
  """The experts' gated MLP on `x`, their LoRA included (float32 out); `apply(x, w)` runs each expert's
  matrix (E x in x out) on that expert's rows of x."""
  gate, up = apply(x, experts["gate_proj"]), apply(x, experts["up_proj"])
  if "gate_up_proj" in lora:
    a, b = lora["gate_up_proj"]
    delta_gate, delta_up = jnp.split(apply(apply(x, a).astype(dtype), b), 2, axis=-1)
    gate, up = gate + delta_gate, up + delta_up
  hidden = activation(gate.astype(dtype), up.astype(dtype))
  out = apply(hidden, experts["down_proj"])
  if "down_proj" in lora:
    a, b = lora["down_proj"]
    out = out + apply(apply(hidden, a).astype(dtype), b)
  return out


def split_by_expert(x_ExNxF):
  """Under a mesh with an `expert` axis (sharding.MESH_AXES): x's expert dim split over it, the rest
  left to XLA. Each device then runs its own experts on every token of its expert group (the tokens
  are gathered, the outputs summed back) instead of gathering the experts' weights."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.shape.get("expert", 1) == 1 or x_ExNxF.shape[0] % mesh.shape["expert"]:
    return x_ExNxF
  free = jax.sharding.PartitionSpec.UNCONSTRAINED
  return jax.lax.with_sharding_constraint(x_ExNxF, jax.sharding.PartitionSpec("expert", free, free))


def _dense_experts(experts, lora, h_NxD, weights_NxK, experts_NxK, activation):
  dtype = h_NxD.dtype
  one_hot = jax.nn.one_hot(experts_NxK, experts["gate_proj"].shape[0], dtype=jnp.float32)  # N x k x E
  weights_NxE = jnp.einsum("nke,nk->ne", one_hot, weights_NxK)

  def each_expert(x, w):  # x: N x in (every expert sees every token) or E x N x in
    spec = "nd,edf->enf" if x.ndim == 2 else "end,edf->enf"
    return split_by_expert(jnp.einsum(spec, x, w.astype(dtype), preferred_element_type=jnp.float32))

  out = _expert_mlp(h_NxD, experts, lora, each_expert, activation, dtype)
  return jnp.einsum("end,ne->nd", out, weights_NxE)


def _ragged_experts(experts, lora, h_NxD, weights_NxK, experts_NxK, activation):
  dtype = h_NxD.dtype
  N, k = experts_NxK.shape
  flat = experts_NxK.reshape(-1)
  order = jnp.argsort(flat, stable=True)  # the N*k (token, expert) pairs grouped by expert
  tokens = order // k
  sizes = jnp.bincount(flat, length=experts["gate_proj"].shape[0]).astype(jnp.int32)

  def grouped(x, w):
    return jax.lax.ragged_dot(x, w.astype(dtype), sizes, preferred_element_type=jnp.float32)

  out = _expert_mlp(h_NxD[tokens], experts, lora, grouped, activation, dtype) * weights_NxK.reshape(-1)[order][:, None]
  return jnp.zeros(h_NxD.shape, jnp.float32).at[tokens].add(out)
