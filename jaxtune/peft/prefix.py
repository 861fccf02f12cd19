"""Prefix tuning (Li & Liang 2021): P trainable key/value vectors per layer, prepended inside attention.

Leaves: `layers/self_attn/prefix_k` and `prefix_v`, each L x P x KV_heads x head_dim (grouped-query:
one vector per key/value head, shared by its query heads). The forward pass prepends them,
un-rotated and visible to every real token, and shifts real tokens' RoPE positions by P: exactly
what Hugging Face peft's PREFIX_TUNING does by feeding them as past_key_values.

Optional reparametrisation (peft's `prefix_projection`): `prefix_encoder` holds an embedding
(P x KV*hd) and a 2-layer tanh MLP producing L*2*KV*hd numbers per virtual token; the forward pass
calls `materialize_prefix` on it, and `fold_prefix` replaces it by its output for export/inference.

Initialisation: without the MLP the prefix is the keys/values a real P-token prompt (random
vocabulary tokens, or `init_tokens`) produces in the base model, so training starts from "the base
model after a short prompt" with activations of the right scale (Li & Liang, section 7.2: real-word
activations beat random init). peft's N(0, 1) would give keys/values of an arbitrary scale. With the
MLP we keep peft's init (embedding N(0, 1), torch's default Linear init): the MLP sets the scale.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxtune.models.config import ModelConfig

Params = dict[str, Any]


def prefix_from_peft(flat_PxN, cfg: ModelConfig) -> tuple[jax.Array, jax.Array]:
  """peft's prefix tensor (P x L*2*KV*hd) -> (prefix_k, prefix_v), each L x P x KV x hd.

  peft views it as (P, L*2, KV, hd); entry 2l is layer l's keys and 2l+1 its values.
  """
  flat = jnp.asarray(flat_PxN)
  P = flat.shape[0]
  want = cfg.num_layers * 2 * cfg.kv_size
  if flat.ndim != 2 or flat.shape[1] != want:
    raise ValueError(f"prefix tensor has shape {tuple(flat.shape)}, expected (P, {want}) = "
                     f"(P, layers {cfg.num_layers} * 2 * kv heads {cfg.num_kv_heads} * head_dim {cfg.head_dim})")
  kv = flat.reshape(P, cfg.num_layers, 2, cfg.num_kv_heads, cfg.head_dim).transpose(2, 1, 0, 3, 4)
  return kv[0], kv[1]


def prefix_to_peft(prefix_k, prefix_v) -> jax.Array:
  """(prefix_k, prefix_v), each L x P x KV x hd -> peft's `prompt_embeddings` (P x L*2*KV*hd).

  The inverse of prefix_from_peft. A reparametrised prefix must be folded first (fold_prefix).
  """
  if prefix_k.shape != prefix_v.shape or prefix_k.ndim != 4:
    raise ValueError(f"prefix_k {prefix_k.shape} and prefix_v {prefix_v.shape}: expected two L x P x KV x hd arrays")
  L, P, KV, hd = prefix_k.shape
  kv = jnp.stack([jnp.asarray(prefix_k), jnp.asarray(prefix_v)])  # 2 x L x P x KV x hd
  return kv.transpose(2, 1, 0, 3, 4).reshape(P, L * 2 * KV * hd)


def attach_prefix(params: Params, prefix_k, prefix_v) -> Params:
  """params with layers/self_attn/prefix_k and prefix_v set (L x P x KV x hd each)."""
  if prefix_k.shape != prefix_v.shape:
    raise ValueError(f"prefix_k {prefix_k.shape} and prefix_v {prefix_v.shape} differ in shape")
  attn = {**params["layers"]["self_attn"], "prefix_k": prefix_k, "prefix_v": prefix_v}
  return {**params, "layers": {**params["layers"], "self_attn": attn}}


def materialize_prefix(params: Params, cfg: ModelConfig) -> Params:
  """Runs the reparametrisation MLP (if any): params with prefix_k/prefix_v and no prefix_encoder.
  A soft prompt (prompt tuning) becomes the prefix of its keys/values the same way."""
  if "prompt_embeddings" in params:
    from jaxtune.peft import prompt  # it builds on this module
    return prompt.prompt_as_prefix(params, cfg)
  if "prefix_encoder" not in params:
    return params
  enc = params["prefix_encoder"]
  e = enc["embedding"].astype(jnp.float32)
  h = jnp.tanh(e @ enc["hidden"]["kernel"].astype(jnp.float32) + enc["hidden"]["bias"].astype(jnp.float32))
  flat = h @ enc["output"]["kernel"].astype(jnp.float32) + enc["output"]["bias"].astype(jnp.float32)
  k, v = prefix_from_peft(flat.astype(enc["embedding"].dtype), cfg)
  return attach_prefix({n: p for n, p in params.items() if n != "prefix_encoder"}, k, v)


def fold_prefix(params: Params, cfg: ModelConfig) -> Params:
  """For export/inference after training: the MLP is evaluated once and dropped (as peft saves it)."""
  return materialize_prefix(params, cfg)


@functools.partial(jax.jit, static_argnames=("cfg",))
def prompt_kv(params: Params, cfg: ModelConfig, tokens_P=None, embeddings_PxD=None) -> tuple[jax.Array, jax.Array]:
  """Keys/values (L x P x KV x hd each) the model computes for a prompt of P tokens, or of P input
  embeddings (a soft prompt)."""
  from jaxtune.models import llama  # llama imports this module (materialize_prefix)
  P = tokens_P.shape[0] if embeddings_PxD is None else embeddings_PxD.shape[0]
  tokens = tokens_P[None] if embeddings_PxD is None else jnp.zeros((1, P), jnp.int32)
  embeddings = None if embeddings_PxD is None else embeddings_PxD[None]
  _, cache = llama.forward(params, cfg, tokens, cache=llama.init_cache(cfg, 1, P), input_embeds_BxTxD=embeddings)
  return cache["k"][:, 0], cache["v"][:, 0]


def _torch_linear(rng: jax.Array, n_in: int, n_out: int, dtype) -> Params:
  """torch.nn.Linear's default init: kernel and bias ~ U(+-1/sqrt(n_in))."""
  bound = 1.0 / math.sqrt(n_in)
  k1, k2 = jax.random.split(rng)
  return {"kernel": jax.random.uniform(k1, (n_in, n_out), jnp.float32, -bound, bound).astype(dtype),
          "bias": jax.random.uniform(k2, (n_out,), jnp.float32, -bound, bound).astype(dtype)}


def init_prefix_encoder(rng: jax.Array, cfg: ModelConfig, length: int, hidden: int, dtype=jnp.float32) -> Params:
  """peft's prefix_projection encoder: embedding P x KV*hd, Linear(KV*hd, hidden), tanh, Linear(hidden, L*2*KV*hd)."""
  k_emb, k_hidden, k_out = jax.random.split(rng, 3)
  width = cfg.kv_size  # peft's token_dim for grouped-query models
  return {
      "embedding": jax.random.normal(k_emb, (length, width), jnp.float32).astype(dtype),
      "hidden": _torch_linear(k_hidden, width, hidden, dtype),
      "output": _torch_linear(k_out, hidden, cfg.num_layers * 2 * cfg.kv_size, dtype),
  }


def add_prefix(params: Params, cfg: ModelConfig, rng: jax.Array, length: int, reparam_hidden: int = 0,
               init_tokens: Sequence[int] | None = None, dtype=jnp.float32) -> Params:
  """Returns params with a trainable prefix of `length` virtual tokens (see the module docstring for init)."""
  if length < 1:
    raise ValueError(f"peft.prefix.length={length} must be >= 1")
  if reparam_hidden < 0:
    raise ValueError(f"peft.prefix.reparam_hidden={reparam_hidden} must be >= 0")
  if "prefix_encoder" in params or "prefix_k" in params["layers"]["self_attn"]:
    raise ValueError("the model already has a prefix")
  if reparam_hidden > 0:
    return {**params, "prefix_encoder": init_prefix_encoder(rng, cfg, length, reparam_hidden, dtype)}
  if init_tokens is None:
    tokens = jax.random.randint(rng, (length,), 0, cfg.vocab_size, jnp.int32)
  else:
    tokens = jnp.asarray(np.asarray(init_tokens, np.int32))
    if tokens.shape != (length,):
      raise ValueError(f"init_tokens has {tokens.size} ids, expected peft.prefix.length={length}")
  k, v = prompt_kv(params, cfg, tokens)
  return attach_prefix(params, k.astype(dtype), v.astype(dtype))
