"""Weighted next-token NLL straight from the final hidden states, without a B x T x V logits buffer.

The LM head dominates a small model's step (vocab 8192 against hidden 256: two fifths of the
matmul FLOPs of the benchmark model). Here the positions are cut into chunks along T and a scan computes each
chunk's logits, log-sum-exp and - when differentiating - the gradient (softmax - one-hot) times the
head, in the same pass, as Liger's fused linear cross-entropy does. The backward pass only scales
what the forward pass kept, so the logits are touched once instead of three times, and at most one
chunk of them is ever alive. A frozen head (LoRA, adapters, prefix) skips the head's gradient.

Chunks run along T, so rows stay where the data/fsdp mesh axes put them. The head's gradient is
summed over those rows inside the loop, which on a mesh is one all-reduce (or reduce-scatter) of
a D x V array per chunk: when the head trains, the rows are cut into at most
`MAX_CHUNKS_WITH_HEAD_GRADIENT` chunks instead.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from jaxtune.models import matmul
from jaxtune.models.attention import capped

# Positions (per row) per chunk. Along T, so a device's chunk is its own rows x 128 tokens whatever
# the mesh: 8 rows x 128 x vocab 8192 is 32 MB of float32 logits; 64 to 1024 measured alike on CPU.
CHUNK_POSITIONS = 128
MAX_CHUNKS_WITH_HEAD_GRADIENT = 4


def chunk_positions(T: int, head_gradient: bool) -> int:
  """Positions per row in one chunk."""
  if head_gradient:
    return min(T, max(CHUNK_POSITIONS, math.ceil(T / MAX_CHUNKS_WITH_HEAD_GRADIENT)))
  return min(T, CHUNK_POSITIONS)


def weighted_nll_sum(hidden_BxTxD, w_DxV, targets_BxT, weights_BxT, softcap: float | None = None):
  """sum over positions of weight * (logsumexp(z) - z[target]) for the logits z = h @ W, in float32.

  `w_DxV` is the head in the hidden states' dtype (the transposed embedding when tied); the matmuls
  accumulate in float32. `weights_BxT` gets no gradient. With `softcap` the logits are
  softcap * tanh(h @ W / softcap) (Gemma 2's final soft-capping).
  """
  return _fused_nll(hidden_BxTxD, w_DxV, targets_BxT, weights_BxT.astype(jnp.float32), softcap)


def _chunked(x_BxT_, tc: int):
  """B x T x ... -> n x B x tc x ... (T zero-padded to a multiple of tc; padded weights are 0)."""
  B, T = x_BxT_.shape[:2]
  n = math.ceil(T / tc)
  pad = [(0, 0), (0, n * tc - T)] + [(0, 0)] * (x_BxT_.ndim - 2)
  x = jnp.pad(x_BxT_, pad).reshape((B, n, tc) + x_BxT_.shape[2:])
  return jnp.moveaxis(x, 1, 0)


def _unchunked(x_nxBxtc_, T: int):
  x = jnp.moveaxis(x_nxBxtc_, 0, 1)
  x = x.reshape((x.shape[0], -1) + x.shape[3:])
  return x[:, :T]


def _chunk_logits(h_BxtxD, w_DxV, targets_Bxt, softcap):
  h_NxD = h_BxtxD.reshape(-1, h_BxtxD.shape[-1])
  logits_NxV = capped(jnp.einsum("nd,dv->nv", h_NxD, w_DxV, preferred_element_type=jnp.float32), softcap)
  lse_N = jax.nn.logsumexp(logits_NxV, axis=-1)
  target_logit_N = jnp.take_along_axis(logits_NxV, targets_Bxt.reshape(-1, 1), axis=-1)[:, 0]
  return h_NxD, logits_NxV, lse_N, target_logit_N


def _loss_and_grads(hidden, w, targets, weights, softcap, tc: int, grad_h: bool, grad_w: bool):
  """The weighted NLL sum and, as asked, its gradients w.r.t. hidden (B x T x D) and W (f32)."""
  B, T, D = hidden.shape
  V = w.shape[1]

  def body(dw_DxV, chunk):
    h, t, wt = chunk
    h_NxD, logits, lse, target_logit = _chunk_logits(h, w, t, softcap)
    wt_N = wt.reshape(-1)
    loss = jnp.sum((lse - target_logit) * wt_N)
    if not (grad_h or grad_w):
      return dw_DxV, (loss, None)
    one_hot = t.reshape(-1, 1) == jnp.arange(V, dtype=t.dtype)
    d_logits = (jnp.exp(logits - lse[:, None]) - one_hot) * wt_N[:, None]
    if softcap:  # through the cap: d tanh = 1 - tanh^2
      d_logits = d_logits * (1.0 - jnp.square(logits / softcap))
    d_logits = d_logits.astype(hidden.dtype)
    dh = None
    if grad_h:
      dh = jnp.einsum("nv,dv->nd", d_logits, w, preferred_element_type=jnp.float32)
      dh = dh.astype(hidden.dtype).reshape(h.shape)
    if grad_w:
      dw_DxV = dw_DxV + matmul.weight_gradient(h_NxD, d_logits)
    return dw_DxV, (loss, dh)

  chunks = (_chunked(hidden, tc), _chunked(targets, tc), _chunked(weights, tc))
  dw0 = jnp.zeros((D, V), jnp.float32) if grad_w else None
  dw, (losses, dh) = jax.lax.scan(body, dw0, chunks)
  if grad_h:
    dh = _unchunked(dh, T)
  return jnp.sum(losses), dh, dw


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _fused_nll(hidden, w, targets, weights, softcap):
  tc = chunk_positions(hidden.shape[1], head_gradient=False)
  return _loss_and_grads(hidden, w, targets, weights, softcap, tc, grad_h=False, grad_w=False)[0]


def _fused_nll_fwd(hidden, w, targets, weights, softcap):
  tc = chunk_positions(hidden.value.shape[1], head_gradient=w.perturbed)
  loss, dh, dw = _loss_and_grads(hidden.value, w.value, targets.value, weights.value, softcap, tc,
                                 grad_h=hidden.perturbed, grad_w=w.perturbed)
  return loss, (dh, None if dw is None else dw.astype(w.value.dtype))


def _fused_nll_bwd(softcap, residuals, g):
  """Scale the gradients the forward pass computed; None marks an input nothing differentiates."""
  dh, dw = residuals
  g = jnp.asarray(g, jnp.float32)
  d_hidden = None if dh is None else (dh * g).astype(dh.dtype)
  d_w = None if dw is None else (dw * g).astype(dw.dtype)
  return d_hidden, d_w, None, None


_fused_nll.defvjp(_fused_nll_fwd, _fused_nll_bwd, symbolic_zeros=True)
