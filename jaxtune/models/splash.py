"""TPU flash attention: the Pallas splash-attention kernel for a causal pass over packed rows.

`model.attention=splash`. The kernel sees segment ids and a causal mask, not jaxtune's boolean
mask, so it serves passes whose keys are the queries' own tokens (no cache, no prefix, no sliding
window) and whose positions rise within each segment (every batch jaxtune builds). Off a TPU it
runs in Pallas' interpreter (tests only: slow). Under a mesh (`jax.set_mesh`, as the trainer's
step runs) each device runs the kernel on its own rows and heads: batch over `sharding.BATCH_AXES`,
kv heads by `sharding.LOGICAL_RULES` (jaxtune's meshes, `sharding.make_mesh`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

BLOCK = 512  # query/key rows per kernel block (MaxText's default); a row length must divide into them
MIN_BLOCK = 128  # the TPU's lane width: the smallest block for shorter rows


def supports(T: int) -> bool:
  """Row lengths the kernel tiles: a multiple of 128 and of the block."""
  return T % MIN_BLOCK == 0 and T % min(BLOCK, T) == 0


def _kernel(T: int, num_heads: int, interpret: bool):
  """Built per trace: the kernel holds its mask's arrays, which would leak from one trace into the next."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
  block = min(BLOCK, T)
  sizes = sk.BlockSizes(block_q=block, block_kv=block, block_q_dkv=block, block_kv_dkv=block,
                        use_fused_bwd_kernel=True)
  mask = sm.MultiHeadMask([sm.CausalMask((T, T))] * num_heads)
  return sk.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)


def _attend(q_BxNxTxH, k_BxKxTxH, v_BxKxTxH, segment_ids_BxT):
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  B, N, T, _ = q_BxNxTxH.shape
  kernel = _kernel(T, N, jax.default_backend() != "tpu")
  segments = sk.SegmentIds(q=segment_ids_BxT, kv=segment_ids_BxT)
  return jax.vmap(kernel)(q_BxNxTxH, k_BxKxTxH, v_BxKxTxH, segment_ids=segments)


def splash_attention(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segment_ids_BxT):
  """Causal attention within segments, grouped-query heads; returns B x T x (N*H).

  Padding (segment 0) attends to padding, whose outputs nothing reads."""
  B, T, N, H = q_BxTxNxH.shape
  q = jnp.swapaxes(q_BxTxNxH * (1.0 / math.sqrt(H)), 1, 2)  # B x N x T x H; the kernel does not scale
  k, v = jnp.swapaxes(k_BxTxKxH, 1, 2), jnp.swapaxes(v_BxTxKxH, 1, 2)
  segment_ids = segment_ids_BxT.astype(jnp.int32)
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    out = _attend(q, k, v, segment_ids)
  else:
    from jaxtune import sharding  # here: sharding imports the model
    # the kv heads' rule, as the k/v projections shard: tensor where it divides them, else whole heads
    heads = sharding.spec_for(("kv_heads",), k.shape[1:2], mesh)[0]
    rows, qkv = P(sharding.BATCH_AXES), P(sharding.BATCH_AXES, heads)
    out = jax.shard_map(_attend, mesh=mesh, in_specs=(qkv, qkv, qkv, rows), out_specs=qkv,
                        check_vma=False)(q, k, v, segment_ids)
  return jnp.swapaxes(out, 1, 2).reshape(B, T, N * H)
