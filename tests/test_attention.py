"""The blocked, recomputing attention equals plain autodiff through masked softmax attention."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtune.models import attention


def reference(q, k, v, mask):
  B, T, N, H = q.shape
  K = k.shape[2]
  scores = jnp.einsum("btkgh,bskh->bkgts", q.reshape(B, T, K, N // K, H), k) / np.sqrt(H)
  probs = jax.nn.softmax(jnp.where(mask[:, None, None], scores, -1e30), axis=-1)
  return jnp.einsum("bkgts,bskh->btkgh", probs, v).reshape(B, T, N * H)


def check_against_reference(q, k, v, mask, causal_prefix, key):
  # fully masked (padding) query rows feed no loss in a model, and get no gradient here
  w = jax.random.normal(key, q.shape[:2] + (q.shape[2] * q.shape[3],)) * jnp.any(mask, -1)[..., None]
  ours = lambda q, k, v: jnp.sum(attention.grouped_attention(q, k, v, mask, causal_prefix) * w)
  ref = lambda q, k, v: jnp.sum(reference(q, k, v, mask) * w)
  np.testing.assert_allclose(attention.grouped_attention(q, k, v, mask, causal_prefix), reference(q, k, v, mask),
                             atol=2e-6)
  for a, b in zip(jax.grad(ours, (0, 1, 2))(q, k, v), jax.grad(ref, (0, 1, 2))(q, k, v)):
    np.testing.assert_allclose(a, b, atol=5e-5)


def qkv(key, B, T, S, N, K, H):
  ks = jax.random.split(key, 3)
  return (jax.random.normal(ks[0], (B, T, N, H)), jax.random.normal(ks[1], (B, S, K, H)),
          jax.random.normal(ks[2], (B, S, K, H)))


def test_arbitrary_mask_with_padding_row():
  ks = jax.random.split(jax.random.PRNGKey(3), 3)
  q, k, v = qkv(ks[0], 2, 7, 9, 4, 2, 8)
  mask = jax.random.bernoulli(ks[1], 0.6, (2, 7, 9)).at[:, :, 0].set(True).at[0, 3].set(False)
  check_against_reference(q, k, v, mask, None, ks[2])


@pytest.mark.parametrize("prefix", [0, 3])
def test_causal_blocks_on_packed_rows(prefix):
  """T = 200 gives 3 query blocks; rows hold two packed records, a padded tail and a sliding window."""
  B, T = 2, 200
  assert len(attention.query_blocks(T)) == 3
  ks = jax.random.split(jax.random.PRNGKey(prefix), 3)
  q, k, v = qkv(ks[0], B, T, T + prefix, 6, 2, 8)
  seg = np.ones((B, T), np.int32)
  seg[0, 90:] = 2
  seg[1, 150:] = 0  # padding
  pos = np.concatenate([np.arange(90), np.arange(T - 90)])[None].repeat(B, 0).astype(np.int32)
  pos[1] = np.arange(T)
  mask = attention.in_token_order(attention.attention_mask(pos, seg, pos, seg, sliding_window=70))
  mask = jnp.concatenate([jnp.ones((B, T, prefix), bool), mask], axis=-1)
  check_against_reference(q, k, v, mask, prefix, ks[2])


def test_query_blocks_cover_every_row():
  for T in (1, 63, 64, 130, 256, 2048, 4097):
    blocks = attention.query_blocks(T)
    assert blocks[0][0] == 0 and blocks[-1][1] == T and len(blocks) <= 8
    assert all(a < b for a, b in blocks) and all(b == c for (_, b), (c, _) in zip(blocks, blocks[1:]))
