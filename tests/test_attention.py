"""The blocked, recomputing attention, and the jax.nn.dot_product_attention path (XLA here; cuDNN on a
GPU), equal plain autodiff through masked softmax attention."""

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


def check_against_reference(q, k, v, mask, causal_prefix, key, implementation="blocked", atol=(2e-6, 5e-5),
                            segment_ids=None):
  """Outputs and q/k/v gradients against `reference` (computed in float32)."""
  # fully masked (padding) query rows feed no loss in a model, and get no gradient here
  w = jax.random.normal(key, q.shape[:2] + (q.shape[2] * q.shape[3],)) * jnp.any(mask, -1)[..., None]
  attend = lambda q, k, v: attention.grouped_attention(q, k, v, mask, causal_prefix, implementation, segment_ids)
  f32 = lambda *xs: [x.astype(jnp.float32) for x in xs]
  ours = lambda q, k, v: jnp.sum(attend(q, k, v).astype(jnp.float32) * w)
  ref = lambda q, k, v: jnp.sum(reference(*f32(q, k, v), mask) * w)
  valid = np.asarray(jnp.any(mask, -1))  # a fully masked row's output is arbitrary
  np.testing.assert_allclose(*f32(attend(q, k, v)[valid], reference(*f32(q, k, v), mask)[valid]), atol=atol[0])
  for a, b in zip(jax.grad(ours, (0, 1, 2))(q, k, v), jax.grad(ref, (0, 1, 2))(*f32(q, k, v))):
    np.testing.assert_allclose(a.astype(jnp.float32), b, atol=atol[1])


def qkv(key, B, T, S, N, K, H):
  ks = jax.random.split(key, 3)
  return (jax.random.normal(ks[0], (B, T, N, H)), jax.random.normal(ks[1], (B, S, K, H)),
          jax.random.normal(ks[2], (B, S, K, H)))


def test_arbitrary_mask_with_padding_row():
  ks = jax.random.split(jax.random.PRNGKey(3), 3)
  q, k, v = qkv(ks[0], 2, 7, 9, 4, 2, 8)
  mask = jax.random.bernoulli(ks[1], 0.6, (2, 7, 9)).at[:, :, 0].set(True).at[0, 3].set(False)
  check_against_reference(q, k, v, mask, None, ks[2])


def packed_rows_case(prefix, B=2, T=200, sliding_window=70):
  """(q, k, v, mask, key, segment ids): rows with two packed records, a padded tail, a sliding
  window, a prefix."""
  ks = jax.random.split(jax.random.PRNGKey(prefix), 3)
  q, k, v = qkv(ks[0], B, T, T + prefix, 6, 2, 8)
  seg = np.ones((B, T), np.int32)
  seg[0, 90:] = 2
  seg[1, 150:] = 0  # padding
  pos = np.concatenate([np.arange(90), np.arange(T - 90)])[None].repeat(B, 0).astype(np.int32)
  pos[1] = np.arange(T)
  mask = attention.in_token_order(attention.attention_mask(pos, seg, pos, seg, sliding_window))
  mask = jnp.concatenate([jnp.ones((B, T, prefix), bool), mask], axis=-1)
  return q, k, v, mask, ks[2], jnp.asarray(seg)


@pytest.mark.parametrize("prefix", [0, 3])
def test_causal_blocks_on_packed_rows(prefix):
  """T = 200 gives 3 query blocks."""
  assert len(attention.query_blocks(200)) == 3
  q, k, v, mask, key, _ = packed_rows_case(prefix)
  check_against_reference(q, k, v, mask, prefix, key)


@pytest.mark.parametrize("prefix", [0, 3])
def test_dot_product_attention_path_on_packed_rows(prefix):
  """The jax.nn.dot_product_attention path (what cuDNN gets on a GPU: the mask as a bias, causal
  when there is no prefix), run with its XLA implementation: same layout, mask and grouped heads."""
  q, k, v, mask, key, _ = packed_rows_case(prefix)
  check_against_reference(q, k, v, mask, prefix, key, implementation="xla")


def test_auto_picks_blocked_off_gpu_and_for_decoding():
  q = jnp.zeros((1, 4, 2, 64), jnp.bfloat16)
  assert attention.resolve("auto", q, 0) == ("cudnn" if jax.default_backend() == "gpu" else "blocked")
  assert attention.resolve("auto", q.astype(jnp.float32), 0) == "blocked"  # cuDNN takes bf16/fp16 only
  assert attention.resolve("auto", jnp.zeros((1, 4, 2, 256), jnp.bfloat16), 0) == "blocked"  # head > 128
  assert attention.resolve("cudnn", q, None) == "blocked"  # decoding with a cache
  assert attention.resolve("auto", q, 3) == "blocked"  # cuDNN with a mask needs even key lengths
  assert attention.resolve("auto", q[:, :3], 0) == "blocked"  # ... and even query lengths
  assert attention.resolve("xla", q, 3) == "xla"


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN attention needs a GPU (scripts/gpu_check.sh runs it)")
@pytest.mark.parametrize("prefix", [0, 4])  # cuDNN takes a masked pass of even lengths only
def test_cudnn_attention_on_packed_rows(prefix):
  """cuDNN's flash attention in bf16 against the float32 reference, within bf16 rounding."""
  q, k, v, mask, key, _ = packed_rows_case(prefix)
  q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))
  check_against_reference(q, k, v, mask, prefix, key, implementation="cudnn", atol=(3e-2, 1e-1))


def test_query_blocks_cover_every_row():
  for T in (1, 63, 64, 130, 256, 2048, 4097):
    blocks = attention.query_blocks(T)
    assert blocks[0][0] == 0 and blocks[-1][1] == T and len(blocks) <= 8
    assert all(a < b for a, b in blocks) and all(b == c for (_, b), (c, _) in zip(blocks, blocks[1:]))


@pytest.mark.parametrize("implementation", ["xla", "splash"])
def test_model_attention_setting_reaches_every_layer(implementation):
  """ModelConfig.attention (model.attention) picks the kernel inside the model: a packed batch's
  logits and gradients are the same through jax.nn.dot_product_attention (XLA) or the splash kernel
  (interpreted) as through the blocked kernel, and the traced model holds the kernel asked for."""
  import dataclasses

  from jaxtune.models import llama
  from test_matmul import SMALL_CONFIG
  params = llama.init_params(SMALL_CONFIG, jax.random.PRNGKey(0), std=0.2)
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 128), 0, SMALL_CONFIG.vocab_size)
  segments = jnp.asarray(np.repeat([[1] * 50 + [2] * 50 + [0] * 28], 2, 0))
  positions = jnp.asarray(np.repeat([list(range(50)) * 2 + list(range(28))], 2, 0))

  def loss(params, implementation):
    cfg = dataclasses.replace(SMALL_CONFIG, attention=implementation)
    logits = llama.forward(params, cfg, tokens, positions, segments)[0]
    return jnp.sum(jax.nn.log_softmax(logits)[..., 0] * (segments > 0)), logits

  (_, blocked), g_blocked = jax.value_and_grad(loss, has_aux=True)(params, "blocked")
  (_, other), g_other = jax.value_and_grad(loss, has_aux=True)(params, implementation)
  np.testing.assert_allclose(other[segments > 0], blocked[segments > 0], atol=2e-5)
  for a, b in zip(jax.tree.leaves(g_other), jax.tree.leaves(g_blocked)):
    np.testing.assert_allclose(a, b, atol=2e-4, rtol=1e-4)
  traced = {i: str(jax.make_jaxpr(loss, static_argnums=1)(params, i)) for i in ("blocked", implementation)}
  assert "pallas_call" not in traced["blocked"]
  if implementation == "splash":
    assert "pallas_call" in traced["splash"]
  else:  # the blocked kernel is a custom_vjp; XLA's path has none
    assert "custom_vjp_call" in traced["blocked"] and "custom_vjp_call" not in traced["xla"]


def test_splash_kernel_on_packed_rows():
  """model.attention=splash: the Pallas TPU kernel (in Pallas' interpreter here) against the float32
  reference, outputs and q/k/v gradients, on rows of two packed records and a padded tail (the
  kernel takes no sliding window; 256 tokens tile into its blocks)."""
  q, k, v, mask, key, segments = packed_rows_case(0, T=256, sliding_window=None)
  check_against_reference(q, k, v, mask, 0, key, implementation="splash", segment_ids=segments)


def test_splash_applies_only_where_its_mask_is_exact():
  q = jnp.zeros((1, 256, 2, 64), jnp.bfloat16)
  assert attention.resolve("splash", q, 0, segments=True) == "splash"
  assert attention.resolve("splash", q, 0, segments=False) == "blocked"  # sliding window: no segments given
  assert attention.resolve("splash", q, 4, segments=True) == "blocked"  # prefix tuning's always-visible keys
  assert attention.resolve("splash", q[:, :200], 0, segments=True) == "blocked"  # not a multiple of 128
  assert attention.resolve("splash", q, None, segments=True) == "blocked"  # decoding
  assert attention.resolve("auto", q, 0, segments=True) != "splash"  # opt-in until measured on a TPU
