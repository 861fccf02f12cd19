"""Mixture-of-experts feed-forward blocks (Mixtral, Qwen3-MoE), as transformers computes them.

A router (D x E) scores each token; softmax in float32, the top k experts, their weights
renormalised to sum to 1 (Mixtral always; Qwen3-MoE when `norm_topk_prob`). Each expert is a gated
MLP; the block's output is the weighted sum of the chosen experts' outputs.

Leaves, per layer (stacked L first): `mlp/router/kernel` (D x E) and `mlp/experts/gate_proj`,
`up_proj` (E x D x F), `down_proj` (E x F x D). The experts are plain arrays, not `{kernel}`
layers, so LoRA, IA3 and NF4 quantization (which look for kernels) leave them alone: PEFT methods
train attention and the router stays frozen with the experts.

Every expert runs on every token and the router's weights (zero for the unchosen) combine them:
E/k times the FLOPs of dispatching tokens to their k experts (4x for Mixtral's 2 of 8), in exchange
for plain batched matmuls that shard like the dense MLP on any mesh. Training adds no router
load-balancing loss (transformers adds it only with `output_router_logits=True`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxtune.models.matmul import matmul

EXPERTS = ("gate_proj", "up_proj", "down_proj")
_MIXTRAL_NAMES = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}


def is_expert_leaf(path: str) -> bool:
  return path.startswith("layers/mlp/experts/")


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


def routing_weights(router_logits_NxE, top_k: int, normalize: bool):
  """N x E float32: each token's weight for each expert, zero outside its top k."""
  probs = jax.nn.softmax(router_logits_NxE.astype(jnp.float32), axis=-1)
  top_weights, top_experts = jax.lax.top_k(probs, top_k)
  if normalize:
    top_weights = top_weights / jnp.sum(top_weights, axis=-1, keepdims=True)
  one_hot = jax.nn.one_hot(top_experts, probs.shape[-1], dtype=jnp.float32)  # N x k x E
  return jnp.einsum("nke,nk->ne", one_hot, top_weights)


def moe_mlp(mlp, h_NxD, top_k: int, normalize: bool, activation):
  """The block's output (N x D, h's dtype); `activation(gate, up)` is the experts' gated activation."""
  dtype = h_NxD.dtype
  weights_NxE = routing_weights(matmul(h_NxD, mlp["router"]["kernel"]), top_k, normalize)
  experts = mlp["experts"]
  gate = jnp.einsum("nd,edf->enf", h_NxD, experts["gate_proj"].astype(dtype), preferred_element_type=jnp.float32)
  up = jnp.einsum("nd,edf->enf", h_NxD, experts["up_proj"].astype(dtype), preferred_element_type=jnp.float32)
  hidden = activation(gate.astype(dtype), up.astype(dtype))
  out = jnp.einsum("enf,efd->end", hidden, experts["down_proj"].astype(dtype), preferred_element_type=jnp.float32)
  return jnp.einsum("end,ne->nd", out, weights_NxE).astype(dtype)
