"""Masked grouped-query attention, lean in memory and time for training and for decoding.

Training (no KV cache) is causal in token order, so query block [a, b) never sees a key after b:
the scores are computed block row by block row and the masked upper triangle is skipped. As in
flash attention, only each row's log-sum-exp is kept for the backward pass, which recomputes the
scores; no B x heads x T x S buffer outlives a layer (a scanned layer would stack one per layer).
Scores and softmax are float32 whatever the compute dtype.

On a GPU in bf16/fp16 the training pass goes to cuDNN's fused flash attention instead
(`jax.nn.dot_product_attention`); on a TPU, model.attention=splash runs the Pallas splash kernel
(`splash.py`). `ModelConfig.attention` (config key model.attention) picks.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from jaxtune.models import splash
from jaxtune.models.matmul import swapped, transposed

_MASKED = -1e30
_MIN_BLOCK = 64  # query rows per block: smaller blocks skip more of the triangle but add ops
_MAX_BLOCKS = 8
IMPLEMENTATIONS = ("auto", "blocked", "xla", "cudnn", "splash")  # model.attention


def attention_mask(q_pos_BxT, q_seg_BxT, k_pos_BxS, k_seg_BxS, sliding_window):
  """Causal (by position) + same-segment (+ sliding window) mask; segment id 0 marks padding."""
  allowed = k_pos_BxS[:, None, :] <= q_pos_BxT[:, :, None]
  allowed &= q_seg_BxT[:, :, None] == k_seg_BxS[:, None, :]
  allowed &= k_seg_BxS[:, None, :] != 0
  if sliding_window:
    allowed &= (q_pos_BxT[:, :, None] - k_pos_BxS[:, None, :]) < sliding_window
  return allowed


def in_token_order(mask_BxTxT):
  """The mask restricted to keys at or before the query's index (what `causal_prefix` assumes).

  A no-cache forward pass holds whole packed records in order, so this only removes keys the
  position mask already hides; it makes block skipping exact for any positions a caller passes.
  """
  T = mask_BxTxT.shape[-1]
  return mask_BxTxT & (jnp.arange(T)[None, :] <= jnp.arange(T)[:, None])


def query_blocks(T: int) -> tuple[tuple[int, int], ...]:
  """(start, end) of each query block: up to 8 near-equal blocks of at least 64 rows."""
  n = max(1, min(_MAX_BLOCKS, T // _MIN_BLOCK))
  bounds = [round(T * i / n) for i in range(n + 1)]
  return tuple(zip(bounds[:-1], bounds[1:]))


def resolve(implementation: str, q_BxTxNxH, causal_prefix: int | None, segments: bool = False,
            softcap: float | None = None) -> str:
  """The implementation "auto" stands for: cuDNN for a bf16/fp16 pass without a cache on a GPU
  where cuDNN takes the shapes (head size a multiple of 8, at most 128; with a mask, even query and
  key lengths), else jaxtune's blocked attention. Decoding with a cache (causal_prefix None: a few
  queries against the cache) always takes the blocked path; so does "splash" wherever the kernel
  does not apply (a prefix, no `segments` given, a row length it does not tile). Soft-capped scores
  (Gemma 2) are only implemented in the blocked path."""
  if causal_prefix is None or softcap:
    return "blocked"
  if implementation == "splash":
    usable = segments and causal_prefix == 0 and splash.supports(q_BxTxNxH.shape[1])
    return "splash" if usable else "blocked"
  if implementation != "auto":
    return implementation
  T, H = q_BxTxNxH.shape[1], q_BxTxNxH.shape[-1]
  fused = q_BxTxNxH.dtype in (jnp.bfloat16, jnp.float16) and H % 8 == 0 and H <= 128
  fused &= T % 2 == 0 and causal_prefix % 2 == 0  # keys: T + causal_prefix
  return "cudnn" if fused and jax.default_backend() == "gpu" else "blocked"


def grouped_attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask_BxTxS, causal_prefix: int | None = None,
                      implementation: str = "auto", segment_ids_BxT=None, softcap: float | None = None):
  """Softmax attention with grouped-query heads; returns B x T x (N*H).

  causal_prefix None: every query may see any of the S keys the mask allows (decoding with a cache).
  causal_prefix P: the keys are P always-visible prefix slots followed by the T queries' own tokens,
  and the mask hides every key after its query (see `in_token_order`); key blocks past each query
  block are skipped.
  implementation: one of IMPLEMENTATIONS (see `resolve`); "xla" and "cudnn" are
  `jax.nn.dot_product_attention`'s. segment_ids_BxT: given when the mask is exactly "causal within
  segments" (no sliding window), for "splash", which takes segment ids instead of the mask.
  softcap: scores become softcap * tanh(scores / softcap) before the mask (Gemma 2).
  """
  implementation = resolve(implementation, q_BxTxNxH, causal_prefix, segment_ids_BxT is not None, softcap)
  if implementation == "splash":
    return splash.splash_attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, segment_ids_BxT)
  if implementation != "blocked":
    return dot_product_attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask_BxTxS, causal_prefix == 0,
                                 implementation)
  B, T, N, H = q_BxTxNxH.shape
  S, K = k_BxSxKxH.shape[1:3]
  G = N // K
  # B x K x T x G x H: a query block's rows (t, g) are contiguous, one batched matmul per (b, kv head).
  q = (q_BxTxNxH * (1.0 / math.sqrt(H))).reshape(B, T, K, G, H).transpose(0, 2, 1, 3, 4)
  k, v = swapped(k_BxSxKxH, 1, 2), swapped(v_BxSxKxH, 1, 2)  # B x K x S x H, row-major on CPU
  if causal_prefix is None:
    blocks = ((0, T, S),)
  else:
    blocks = tuple((a, b, causal_prefix + b) for a, b in query_blocks(T))
  out = _blocked_attention(q, k, v, mask_BxTxS, blocks, softcap)
  return out.transpose(0, 2, 1, 3, 4).reshape(B, T, N * H)


def dot_product_attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask_BxTxS, causal: bool, implementation: str):
  """`jax.nn.dot_product_attention` (cuDNN's flash attention for "cudnn"); B x T x (N*H).

  The mask becomes an additive bias (segments, padding, prefix slots, sliding window); `causal`
  (keys in token order, no prefix) also lets the kernel skip the blocks above the diagonal.
  """
  B, T, N, H = q_BxTxNxH.shape
  out = jax.nn.dot_product_attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask=mask_BxTxS[:, None],
                                     is_causal=causal, implementation=implementation)
  return out.reshape(B, T, N * H)


def keeps_cudnn_attention(prim, *_, **__) -> bool:
  """A remat policy: keep cuDNN flash attention's forward outputs (its output and softmax
  statistics, the residuals of its backward kernel), so the backward pass does not rerun the
  forward kernel. Costs a layer's attention output (T x N*H) and a float32 statistic per head and
  token; on an H200, a 1B Llama's bf16 step ran 4% faster (docs/benchmark.md)."""
  return prim.name.startswith("dot_product_attention_fwd")


def capped(scores, softcap: float | None):
  """softcap * tanh(scores / softcap), or the scores themselves without a cap."""
  return scores if not softcap else softcap * jnp.tanh(scores / softcap)


def _masked_scores(q_blk, k_slab, mask_blk, softcap):
  scores = jnp.einsum("bktgh,bksh->bktgs", q_blk, k_slab, preferred_element_type=jnp.float32)
  return jnp.where(mask_blk[:, None, :, None, :], capped(scores, softcap), _MASKED)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _blocked_attention(q, k, v, mask, blocks, softcap):
  """q: B x K x T x G x H (pre-scaled), k/v: B x K x S x H, mask: B x T x S;
  blocks: (query start, query end, key end) per block row; softcap: see `grouped_attention`."""
  return _blocked_attention_fwd(q, k, v, mask, blocks, softcap)[0]


def _blocked_attention_fwd(q, k, v, mask, blocks, softcap):
  outs, lses = [], []
  for a, b, e in blocks:
    scores = _masked_scores(q[:, :, a:b], k[:, :, :e], mask[:, a:b, :e], softcap)
    row_max = jnp.max(scores, axis=-1, keepdims=True)
    unnormalized = jnp.exp(scores - row_max)
    row_sum = jnp.sum(unnormalized, axis=-1, keepdims=True)
    out = jnp.einsum("bktgs,bksh->bktgh", unnormalized.astype(v.dtype), v[:, :, :e],
                     preferred_element_type=jnp.float32) / row_sum
    outs.append(out)
    lses.append((row_max + jnp.log(row_sum))[..., 0])
  out = jnp.concatenate(outs, axis=2) if len(outs) > 1 else outs[0]
  lse = jnp.concatenate(lses, axis=2) if len(lses) > 1 else lses[0]
  # float32 residuals, which remat_policy=dots keeps (llama.REMAT_POLICIES): a saved bfloat16 output
  # would be upcast for the backward's delta, and XLA does that to the whole stack of layers at once
  out, lse = checkpoint_name(out, "attention_out"), checkpoint_name(lse, "attention_lse")
  return out.astype(q.dtype), (q, k, v, mask, out, lse)


def _blocked_attention_bwd(blocks, softcap, residuals, d_out):
  q, k, v, mask, out, lse = residuals
  B, K, _, G, H = q.shape
  # sum_s p * dp = d_out . out per query row (flash attention's "delta"): no reduction over keys.
  delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
  # Scores are recomputed transposed, keys x query rows: the key and value gradients then contract
  # the last dimension of every big operand (on CPU, any other form copies the block's probabilities
  # into a transposed layout first), and only k and each query gradient block, H wide, are transposed.
  k_t = transposed(k)
  d_q_blocks = []
  d_k = jnp.zeros(k.shape, jnp.float32)
  d_v = jnp.zeros(v.shape, jnp.float32)
  for a, b, e in blocks:
    rows = (b - a) * G
    q_blk, d_out_blk = q[:, :, a:b].reshape(B, K, rows, H), d_out[:, :, a:b].reshape(B, K, rows, H)
    mask_t = jnp.swapaxes(mask[:, a:b, :e], 1, 2)[:, None, :, :, None]
    mask_t = jnp.broadcast_to(mask_t, (B, K, e, b - a, G)).reshape(B, K, e, rows)
    scores_t = capped(jnp.einsum("bksh,bkqh->bksq", k[:, :, :e], q_blk, preferred_element_type=jnp.float32),
                      softcap)
    # fully masked (padding) rows: uniform probabilities in the forward pass, no gradient (their
    # outputs feed no weighted loss in a model)
    probs_t = jnp.where(mask_t, jnp.exp(scores_t - lse[:, :, a:b].reshape(B, K, 1, rows)), 0.0)
    d_probs_t = jnp.einsum("bksh,bkqh->bksq", v[:, :, :e], d_out_blk, preferred_element_type=jnp.float32)
    d_scores_t = probs_t * (d_probs_t - delta[:, :, a:b].reshape(B, K, 1, rows))
    if softcap:  # through the cap: d tanh = 1 - tanh^2
      d_scores_t = d_scores_t * (1.0 - jnp.square(scores_t / softcap))
    d_scores_t = d_scores_t.astype(q.dtype)
    d_k = d_k.at[:, :, :e].add(jnp.einsum("bksq,bkqh->bksh", d_scores_t, q_blk,
                                          preferred_element_type=jnp.float32))
    d_v = d_v.at[:, :, :e].add(jnp.einsum("bksq,bkqh->bksh", probs_t.astype(d_out.dtype), d_out_blk,
                                          preferred_element_type=jnp.float32))
    d_q_t = jnp.einsum("bkhs,bksq->bkhq", k_t[..., :e], d_scores_t, preferred_element_type=jnp.float32)
    d_q_blocks.append(transposed(d_q_t).reshape(B, K, b - a, G, H))
  d_q = jnp.concatenate(d_q_blocks, axis=2) if len(d_q_blocks) > 1 else d_q_blocks[0]
  no_grad_mask = np.zeros(mask.shape, jax.dtypes.float0)
  return d_q.astype(q.dtype), d_k.astype(k.dtype), d_v.astype(v.dtype), no_grad_mask


_blocked_attention.defvjp(_blocked_attention_fwd, _blocked_attention_bwd)
