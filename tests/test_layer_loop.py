"""model.layer_loop: the decoder layers scanned or unrolled make the same step; auto unrolls on a GPU."""

import dataclasses
import re

import jax
import numpy as np
import optax
import pytest

from jaxtune import train_step
from jaxtune.models import llama
from jaxtune.models.config import ModelConfig
from jaxtune.peft import lora, partition
from train_helpers import random_lm_batch

CFG = ModelConfig(vocab_size=512, hidden_size=64, intermediate_size=160, num_layers=3, num_heads=4,
                  num_kv_heads=2, head_dim=16)


def step_parts(layer_loop: str, method: str, remat: str = "", compute_dtype: str = "float32"):
  """(jitted one-step function, its inputs) for CFG with `layer_loop`."""
  params = llama.init_params(CFG, jax.random.PRNGKey(0))
  if method == "lora":
    params = lora.add_lora(params, jax.random.PRNGKey(1), 4)
  trainable, frozen = partition.split(params, method)
  optimizer = optax.sgd(1.0)  # the update is the gradient itself (Adam would magnify rounding)
  spec = train_step.StepSpec(model=dataclasses.replace(CFG, layer_loop=layer_loop), compute_dtype=compute_dtype,
                             remat=remat)
  step = jax.jit(lambda *a: train_step.train_step(*a, spec=spec, optimizer=optimizer))
  batch = jax.tree.map(np.asarray, random_lm_batch(2, 64, vocab=CFG.vocab_size))
  return step, (trainable, frozen, optimizer.init(trainable), batch, jax.random.PRNGKey(2))


@pytest.mark.parametrize("method,remat", [("full", ""), ("full", "dots"), ("lora", "dots")])
def test_unrolled_layers_make_the_same_step_as_the_scan(method, remat):
  results = {}
  for layer_loop in ("scan", "unrolled"):
    step, inputs = step_parts(layer_loop, method, remat)
    trainable, _, metrics = step(*inputs)
    results[layer_loop] = (metrics["loss"], metrics["grad_norm"], trainable)
  (loss, norm, scanned), (loss_u, norm_u, unrolled) = results["scan"], results["unrolled"]
  np.testing.assert_allclose(loss_u, loss, rtol=1e-6)
  np.testing.assert_allclose(norm_u, norm, rtol=1e-5)
  assert scanned.keys() == unrolled.keys()
  for path in scanned:
    np.testing.assert_allclose(unrolled[path], scanned[path], rtol=1e-5, atol=1e-6, err_msg=path)


def test_unrolled_step_has_no_layer_loops():
  """Scanned, the compiled step runs a forward and a backward loop over the layers (whose saved
  activations are copied into and out of L-stacked buffers); unrolled, neither loop is left."""
  whiles = {}
  for layer_loop in ("scan", "unrolled"):
    step, inputs = step_parts(layer_loop, "full", "dots", "bfloat16")
    hlo = step.lower(*inputs).compile().as_text()
    whiles[layer_loop] = len(re.findall(r"= .* while\(", hlo))
  assert whiles["unrolled"] == whiles["scan"] - 2, whiles


def test_auto_unrolls_on_a_gpu_only(monkeypatch):
  for backend, unrolled in (("gpu", True), ("cpu", False), ("tpu", False)):
    monkeypatch.setattr(jax, "default_backend", lambda b=backend: b)
    assert llama.layers_unrolled(dataclasses.replace(CFG, layer_loop="auto")) == unrolled, backend
    assert llama.layers_unrolled(dataclasses.replace(CFG, layer_loop="unrolled"))
    assert not llama.layers_unrolled(dataclasses.replace(CFG, layer_loop="scan"))


def test_decoding_with_a_cache_keeps_the_scan():
  """Only a pass without a cache unrolls: a decode step's layers stay one compiled loop."""
  cfg = dataclasses.replace(CFG, layer_loop="unrolled")
  params = llama.init_params(cfg, jax.random.PRNGKey(0))
  tokens = np.zeros((1, 4), np.int32)

  def unrolls(cache):
    jaxpr = jax.make_jaxpr(lambda p, c: llama.forward(p, cfg, tokens, cache=c))(params, cache)
    return [e.params["unroll"] for e in jaxpr.jaxpr.eqns if e.primitive.name == "scan"]

  assert unrolls(None) == [cfg.num_layers]
  assert unrolls(llama.init_cache(cfg, 1, 8)) == [1]


@pytest.mark.parametrize("remat,forward_kernels", [("dots", 1), ("nothing", 2)])
def test_dots_remat_keeps_cudnn_attention_outputs(monkeypatch, remat, forward_kernels):
  """remat_policy=dots keeps cuDNN attention's forward outputs: the backward pass runs its kernel
  and does not rerun the forward one (remat nothing does). Traced, not run: off a GPU cuDNN's
  version checks are stubbed, and the step's jaxpr (one scanned layer) is counted."""
  from jax._src.cudnn import fused_attention_stablehlo as cudnn_attention
  monkeypatch.setattr(cudnn_attention, "check_cudnn_version", lambda: 91000)
  monkeypatch.setattr(cudnn_attention, "check_compute_capability", lambda capability: True)
  cfg = dataclasses.replace(CFG, layer_loop="scan", attention="cudnn")
  params = llama.init_params(cfg, jax.random.PRNGKey(0))
  trainable, frozen = partition.split(params, "full")
  optimizer = optax.sgd(1.0)
  spec = train_step.StepSpec(model=cfg, compute_dtype="bfloat16", remat=remat)
  batch = jax.tree.map(np.asarray, random_lm_batch(2, 64, vocab=cfg.vocab_size))
  jaxpr = str(jax.make_jaxpr(lambda *a: train_step.train_step(*a, spec=spec, optimizer=optimizer))(
      trainable, frozen, optimizer.init(trainable), batch, jax.random.PRNGKey(2)))
  assert jaxpr.count("dot_product_attention_bwd") == 1
  assert jaxpr.count("dot_product_attention_fwd") == forward_kernels
