"""The fused, chunked LM-head loss: same value and gradients as dense logits, and as transformers."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import hf_tiny
from jaxtune import train_step
from jaxtune.models import fused_loss, loading
from jaxtune.peft import partition


def dense_nll_sum(hidden, w, targets, weights):
  """The textbook formula, differentiated by autodiff."""
  logits = jnp.einsum("btd,dv->btv", hidden.astype(jnp.float32), w.astype(jnp.float32))
  target_logit = jnp.take_along_axis(logits, targets[..., None], -1)[..., 0]
  return jnp.sum((jax.nn.logsumexp(logits, -1) - target_logit) * weights)


def random_case(B=3, T=300, D=16, V=40, seed=0):
  rng = np.random.default_rng(seed)
  hidden = jnp.asarray(rng.normal(size=(B, T, D)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(D, V)), jnp.float32)
  targets = jnp.asarray(rng.integers(0, V, (B, T)), jnp.int32)
  weights = jnp.asarray(rng.uniform(size=(B, T)) * (rng.uniform(size=(B, T)) > 0.3), jnp.float32)
  return hidden, w, targets, weights


@pytest.mark.parametrize("T", [300, 64])  # 300: three chunks of 128, the last one padded
def test_value_and_gradients_equal_dense_logits(T):
  hidden, w, targets, weights = random_case(T=T)
  scale = 0.37  # an upstream cotangent != 1 must scale both gradients
  fused = jax.jit(jax.value_and_grad(lambda h, w: scale * fused_loss.weighted_nll_sum(h, w, targets, weights), (0, 1)))
  dense = jax.value_and_grad(lambda h, w: scale * dense_nll_sum(h, w, targets, weights), (0, 1))
  (v1, (dh1, dw1)), (v2, (dh2, dw2)) = fused(hidden, w), dense(hidden, w)
  np.testing.assert_allclose(v1, v2, rtol=1e-5)
  np.testing.assert_allclose(dh1, dh2, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(dw1, dw2, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(fused_loss.weighted_nll_sum(hidden, w, targets, weights), v2 / scale, rtol=1e-5)


def test_bfloat16_hidden_states_keep_float32_logits():
  hidden, w, targets, weights = random_case(T=130)
  h16, w16 = hidden.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
  value, dh = jax.value_and_grad(fused_loss.weighted_nll_sum)(h16, w16, targets, weights)
  ref_value, ref_dh = jax.value_and_grad(dense_nll_sum)(h16.astype(jnp.float32), w16, targets, weights)
  assert dh.dtype == jnp.bfloat16
  np.testing.assert_allclose(value, ref_value, rtol=1e-5)
  np.testing.assert_allclose(dh.astype(jnp.float32), ref_dh, rtol=2e-2, atol=2e-2)


def count_dots(fn, *args) -> int:
  return str(jax.make_jaxpr(fn)(*args)).count("dot_general")


def test_a_frozen_head_costs_no_head_gradient():
  """Differentiating w.r.t. the hidden states only drops the h^T @ d_logits matmul."""
  hidden, w, targets, weights = random_case()
  loss = lambda h, w: fused_loss.weighted_nll_sum(h, w, targets, weights)
  both = count_dots(jax.grad(loss, (0, 1)), hidden, w)
  hidden_only = count_dots(jax.grad(loss, 0), hidden, w)
  assert (both, hidden_only) == (3, 2)
  np.testing.assert_allclose(jax.grad(loss, 0)(hidden, w), jax.grad(loss, (0, 1))(hidden, w)[0])


@pytest.mark.parametrize("family,max_targets", [("llama_untied", 0), ("llama_untied", 6), ("llama_tied", 0),
                                                ("llama_tied", 6), ("gemma2", 0), ("gemma3", 6)])
def test_training_gradients_equal_transformers(family, max_targets, tmp_path):
  """lm_loss_sums' loss and gradient of every weight equal torch's backward of the same weighted CE.
  The Gemmas are sharpened so that Gemma 2's soft-caps (scores and logits) bite."""
  folder = str(tmp_path / family)
  model = hf_tiny.save_hf_model(family, folder, with_tokenizer=False, sharp=family.startswith("gemma"))
  cfg, params = loading.load_model(folder)
  rng = np.random.default_rng(1)
  B, T = 2, 40
  inputs = rng.integers(0, cfg.vocab_size, (B, T))
  targets = rng.integers(0, cfg.vocab_size, (B, T))
  weights = np.zeros((B, T), np.float32)
  weights[0, 5:11], weights[1, 30:35] = 1.0, 0.5  # at most 6 weighted positions per row
  batch = {"inputs": inputs, "targets": targets, "weights": weights,
           "positions": np.tile(np.arange(T), (B, 1)), "segment_ids": np.ones((B, T), np.int32)}
  spec = train_step.StepSpec(model=cfg, max_targets=max_targets)
  trainable, frozen = partition.split(params, "full")
  loss_fn = lambda tr: train_step.lm_loss_sums(partition.merge(tr, frozen), spec, batch)[0]
  loss, grads = jax.jit(jax.value_and_grad(loss_fn))(trainable)

  model.zero_grad()
  logits = model(torch.tensor(inputs)).logits
  nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), torch.tensor(targets).flatten(), reduction="none")
  torch_loss = (nll * torch.tensor(weights).flatten()).sum()
  torch_loss.backward()
  torch_grads = {name: p.grad.numpy() for name, p in model.named_parameters()}

  np.testing.assert_allclose(float(loss), float(torch_loss.detach()), rtol=1e-5)
  flat = loading.flatten(grads)
  assert sum(cfg.num_layers if p.startswith("layers/") else 1 for p in flat) == len(torch_grads)
  for path, g in flat.items():
    g = np.asarray(g)
    layers = range(cfg.num_layers) if path.startswith("layers/") else [None]
    for i in layers:
      got = g[i] if i is not None else g
      want = torch_grads[loading.hf_name_of(path, i)]
      want = want.T if loading.is_transposed(path) else want
      scale = np.abs(want).max() + 1e-12
      np.testing.assert_allclose(got / scale, want / scale, atol=2e-5, err_msg=f"{path} layer {i}")


def scan_lengths(fn, *args) -> list[int]:
  return [int(n) for n in re.findall(r"length=(\d+)", str(jax.make_jaxpr(fn)(*args)))]


def test_a_trained_head_is_summed_over_at_most_four_chunks():
  """On a mesh the head's gradient is reduced once per chunk: few chunks when it trains, 128 positions if frozen."""
  hidden, w, targets, weights = random_case(B=2, T=1024)
  loss = lambda h, w: fused_loss.weighted_nll_sum(h, w, targets, weights)
  assert scan_lengths(jax.grad(loss, (0, 1)), hidden, w) == [4]   # 256 positions per chunk
  assert scan_lengths(jax.grad(loss, 0), hidden, w) == [8]        # 128
  assert fused_loss.chunk_positions(100, head_gradient=True) == fused_loss.chunk_positions(100, False) == 100
