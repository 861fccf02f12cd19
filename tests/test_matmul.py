"""Low-precision matmuls: float32-accurate gradients, and on CPU every training dot stays bfloat16."""

import dataclasses
import re

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtune import train_step
from jaxtune.models import llama, matmul, rope
from jaxtune.models.config import ModelConfig
from jaxtune.peft import lora, partition
from train_helpers import lora_and_full_kept_bytes, random_lm_batch


@pytest.fixture(params=["cpu", "accelerator"])
def dot_form(request, monkeypatch):
  """Trace matmuls in XLA:CPU's form (custom gradient, row-major copies) or in the plain form that
  TPU and GPU take, whatever this machine is."""
  monkeypatch.setattr(matmul, "cpu_layouts", lambda: request.param == "cpu")
  jax.clear_caches()  # traces of the same function and shapes are cached across the two forms
  yield request.param
  jax.clear_caches()


@pytest.mark.parametrize("K,M", [(64, 8), (8, 64), (48, 48)])  # x or g the narrower: both gradient forms
def test_bfloat16_matmul_gradients_equal_float32_of_the_same_inputs(K, M, dot_form):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(96, K)), jnp.bfloat16)
  w = jnp.asarray(rng.normal(size=(K, M)), jnp.float32)
  g = jnp.asarray(rng.normal(size=(96, M)), jnp.float32)
  loss = lambda x, w: jnp.sum(matmul.matmul(x, w).astype(jnp.float32) * g)
  value, (dx, dw) = jax.jit(jax.value_and_grad(loss, (0, 1)))(x, w)
  # The reference sees the same rounded operands, in float32.
  x32, w16 = x.astype(jnp.float32), w.astype(jnp.bfloat16).astype(jnp.float32)
  ref_dx, ref_dw = g @ w16.T, x32.T @ g.astype(jnp.bfloat16).astype(jnp.float32)
  assert matmul.matmul(x, w).dtype == dx.dtype == jnp.bfloat16 and dw.dtype == jnp.float32
  np.testing.assert_allclose(value, jnp.sum((x32 @ w16) * g), rtol=1e-2)
  np.testing.assert_allclose(dx.astype(jnp.float32), ref_dx, rtol=1e-2, atol=1e-2 * float(jnp.abs(ref_dx).max()))
  np.testing.assert_allclose(dw, ref_dw, rtol=1e-2, atol=1e-2 * float(jnp.abs(ref_dw).max()))


def test_plain_matmul_for_float32_and_off_cpu(dot_form):
  x, w = jnp.ones((4, 3)), jnp.ones((3, 2))
  assert str(jax.make_jaxpr(matmul.matmul)(x, w)).count("custom_vjp") == 0
  custom = "custom_vjp" in str(jax.make_jaxpr(matmul.matmul)(x.astype(jnp.bfloat16), w))
  assert custom == (dot_form == "cpu")  # bfloat16 too, off CPU


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the layout this guards is XLA:CPU's fast form")
def test_float32_weight_gradient_contracts_the_last_dimension_of_a_row_major_copy():
  """The LM head's weight gradient x^T @ g, as XLA:CPU's fast (YNNPACK) form: x^T copied, not folded
  into a dot over x's first dimension (325 vs 410 GFLOP/s for the benchmark head's 256 x 1024 x 8192)."""
  rng = np.random.default_rng(0)
  x, g = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in ((64, 16), (64, 48)))
  compiled = jax.jit(matmul.weight_gradient).lower(x, g).compile().as_text()
  contractions = re.findall(r" dot\(.*?lhs_contracting_dims=\{(\d+)\}", compiled)
  assert contractions == ["1"], contractions
  np.testing.assert_allclose(matmul.weight_gradient(x, g), np.asarray(x).T @ np.asarray(g), rtol=1e-5, atol=1e-5)


# Big enough for every dot kind of the step (attention blocks, GQA, untied head), small to compile.
SMALL_CONFIG = ModelConfig(vocab_size=512, hidden_size=64, intermediate_size=160, num_layers=2, num_heads=4,
                           num_kv_heads=2, head_dim=16, rms_norm_eps=1e-5, tie_word_embeddings=False,
                           max_position_embeddings=256)


def operand_dtypes_of_dots(hlo: str) -> list[tuple[str, str]]:
  """(lhs dtype, rhs dtype) of every dot in an optimized HLO module."""
  dtype_of = dict(re.findall(r"%([\w.\-]+) = (\w+)\[", hlo))
  dots = re.findall(r"= \w+\[[\d,]*\]\S* dot\(%([\w.\-]+), %([\w.\-]+)\)", hlo)
  return [(dtype_of[a], dtype_of[b]) for a, b in dots]


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the upcast this guards against is XLA:CPU's")
@pytest.mark.parametrize("method", ["full", "lora"])
def test_bfloat16_training_step_keeps_every_dot_in_bfloat16(method):
  """XLA:CPU silently runs a bf16 dot in float32 unless it is in the one native form (see matmul.py)."""
  cfg = SMALL_CONFIG
  params = llama.init_params(cfg, jax.random.PRNGKey(0))
  if method == "lora":
    params = lora.add_lora(params, jax.random.PRNGKey(1), 4)
    params = jax.tree_util.tree_map_with_path(  # B = 0 at init would leave A without gradient
        lambda path, x: x + 0.05 if "lora_b" in jax.tree_util.keystr(path) else x, params)
  trainable, frozen = partition.split(params, method)
  batch = random_lm_batch(2, 128, vocab=SMALL_CONFIG.vocab_size)

  def loss_and_grads(dtype):
    spec = train_step.StepSpec(model=cfg, compute_dtype=dtype)
    f = lambda tr: train_step.lm_loss_sums(partition.merge(tr, frozen), spec, batch)[0]
    return jax.jit(jax.value_and_grad(f))

  hlo = loss_and_grads("bfloat16").lower(trainable).compile().as_text()
  dtypes = operand_dtypes_of_dots(hlo)
  assert len(dtypes) >= 10 and set(dtypes) == {("bf16", "bf16")}, sorted(set(dtypes))
  (loss16, grads16), (loss32, grads32) = loss_and_grads("bfloat16")(trainable), loss_and_grads("float32")(trainable)
  np.testing.assert_allclose(loss16, loss32, rtol=1e-2)
  for path in grads32:
    a, b = grads16[path].ravel(), grads32[path].ravel()
    cos = jnp.vdot(a, b) / (jnp.linalg.norm(a) * jnp.linalg.norm(b) + 1e-30)
    assert float(cos) > 0.99, (path, float(cos))


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the upcast this guards against is XLA:CPU's")
def test_bfloat16_attention_keeps_every_dot_in_bfloat16():
  """Attention alone, its inputs straight from the caller (no projection before it to fix a layout)."""
  from jaxtune.models import attention
  B, T, N, K, H = 2, 256, 4, 2, 16
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.normal(size=(B, T, n, H)), jnp.bfloat16) for n in (N, K, K))
  pos, seg = jnp.tile(jnp.arange(T), (B, 1)), jnp.ones((B, T), jnp.int32)
  mask = attention.in_token_order(attention.attention_mask(pos, seg, pos, seg, 0))
  loss = lambda q, k, v: jnp.sum(attention.grouped_attention(q, k, v, mask, 0).astype(jnp.float32) ** 2)
  hlo = jax.jit(jax.grad(loss, (0, 1, 2))).lower(q, k, v).compile().as_text()
  dtypes = operand_dtypes_of_dots(hlo)
  assert len(dtypes) >= 8 and set(dtypes) == {("bf16", "bf16")}, sorted(set(dtypes))


def _bfloat16_arithmetic(fn, *args) -> set[str]:
  """Primitives other than casts that produce bfloat16 values in fn's forward and backward."""
  def loss(*a):
    return jnp.sum(fn(*a).astype(jnp.float32) ** 2)
  jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=tuple(range(len(args)))))(*args)
  found = set()

  def walk(jx):
    for eqn in jx.eqns:
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        walk(sub)
      if eqn.primitive.name != "convert_element_type" and any(
          getattr(v.aval, "dtype", None) == jnp.bfloat16 for v in eqn.outvars):
        found.add(eqn.primitive.name)
  walk(jaxpr.jaxpr)
  return found


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the bulk conversion this guards against is XLA:CPU's")
@pytest.mark.parametrize("method", ["full", "lora"])
def test_bfloat16_dots_remat_converts_no_stack_of_saved_outputs(method):
  """With remat_policy=dots in bfloat16, the layers' saved outputs are not converted to float32 as
  whole L x N x width stacks between the forward and backward loops. Saving the bfloat16 projection
  and attention outputs by name did that (XLA hoists their float32 upcast out of the backward
  loop): seven stacks per step, a SmolLM2-shaped LoRA step 1.5 -> 2.3 s. Only the layer inputs' stack
  (the scan's carry, upcast for the norm) may be."""
  cfg = dataclasses.replace(SMALL_CONFIG, num_layers=3)
  params = llama.init_params(cfg, jax.random.PRNGKey(0))
  if method == "lora":
    params = lora.add_lora(params, jax.random.PRNGKey(1), 4)
  trainable, frozen = partition.split(params, method)
  batch = random_lm_batch(2, 128, vocab=SMALL_CONFIG.vocab_size)
  spec = train_step.StepSpec(model=cfg, compute_dtype="bfloat16", remat="dots")
  f = lambda tr: train_step.lm_loss_sums(partition.merge(tr, frozen), spec, batch)[0]
  hlo = jax.jit(jax.grad(f)).lower(trainable).compile().as_text()
  stacks = re.findall(r"= (f32\[3,[\d,]+\])\S* (?:convert|fusion)\(.*calls=%wrapped_convert", hlo)
  assert len(stacks) <= 1, stacks


@pytest.mark.parametrize("method", ["full", "lora"])
def test_off_cpu_dots_remat_keeps_bfloat16_projections(dot_form, method):
  """remat_policy=dots keeps every matmul output for the backward pass. It cannot see a dot inside
  a custom gradient: on XLA:CPU, where bfloat16 matmuls need one (see matmul.py), the projections
  are recomputed instead (cheaper there than keeping them, docs/benchmark.md). TPU and GPU take the
  plain dot, so a bfloat16 step with the policy runs no more dots than one without remat."""
  cfg = SMALL_CONFIG
  params = llama.init_params(cfg, jax.random.PRNGKey(0))
  if method == "lora":
    params = lora.add_lora(params, jax.random.PRNGKey(1), 4)
  trainable, frozen = partition.split(params, method)
  batch = random_lm_batch(2, 128, vocab=cfg.vocab_size)

  def dots(remat):
    spec = train_step.StepSpec(model=cfg, compute_dtype="bfloat16", remat=remat)
    f = lambda tr: train_step.lm_loss_sums(partition.merge(tr, frozen), spec, batch)[0]
    return len(re.findall(r"\bdot_general\b", str(jax.make_jaxpr(jax.grad(f))(trainable))))

  if dot_form == "accelerator":
    assert dots("dots") == dots("")
  else:  # what the check catches
    assert dots("dots") > dots("")


def test_off_cpu_bfloat16_lora_keeps_each_projection_output_once(monkeypatch):
  """Off CPU, remat_policy=dots keeps a bfloat16 LoRA projection's output (the name "projection"),
  not its base matmul and LoRA product apart: a LoRA step keeps no more than full fine-tuning,
  plus the LoRA weights (29% less than keeping both parts, on this model)."""
  monkeypatch.setattr(matmul, "cpu_layouts", lambda: False)
  jax.clear_caches()
  cfg = SMALL_CONFIG
  lora_kept, full_kept_and_lora = lora_and_full_kept_bytes(
      llama.init_params(cfg, jax.random.PRNGKey(0)), train_step.StepSpec(model=cfg, compute_dtype="bfloat16", remat="dots"),
      random_lm_batch(2, 128, vocab=cfg.vocab_size))
  assert lora_kept <= full_kept_and_lora
  jax.clear_caches()


def test_rope_and_swiglu_compute_in_float32_in_both_passes():
  """bfloat16 in, bfloat16 out, one cast each way: on CPU each bfloat16 op would round-trip through
  float32 (they were ~20% of a bfloat16 full fine-tuning step), and float32 is also more exact."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 8, 4, 16)), jnp.bfloat16)
  cos, sin = (jnp.asarray(f(rng.normal(size=(2, 8, 16))), jnp.float32) for f in (np.cos, np.sin))
  assert _bfloat16_arithmetic(rope.apply_rope, x, cos, sin) == set()
  gate, up = (jnp.asarray(rng.normal(size=(16, 24)), jnp.bfloat16) for _ in range(2))
  assert _bfloat16_arithmetic(llama.gated_activation, gate, up) == set()
  assert rope.apply_rope(x, cos, sin).dtype == llama.gated_activation(gate, up).dtype == jnp.bfloat16
  # What the check catches: the same ops written in bfloat16.
  assert "mul" in _bfloat16_arithmetic(lambda g, u: jax.nn.silu(g) * u, gate, up)


def test_dora_rescale_survives_bfloat16():
  """DoRA's m / ||W + s*A@B|| sits near 1. Formed in bfloat16 (spacing 2^-7 there) a 0.3% rescale rounds
  to exactly 1 on every output; formed in float32 (m / n - 1 first) it survives, on average, in the
  bfloat16 outputs. Mixed precision: float32 params, bfloat16 activations."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2048, 64)), jnp.bfloat16)
  kernel = jnp.asarray(rng.normal(size=(64, 32)), jnp.float32)
  layer = {"kernel": kernel, "lora_a": jnp.asarray(rng.normal(size=(64, 4)), jnp.float32),
           "lora_b": jnp.zeros((4, 32)), "lora_magnitude": 1.003 * jnp.linalg.norm(kernel, axis=0)}
  rescaled = llama.dense(layer, x, llama.PeftRuntime())
  assert rescaled.dtype == jnp.bfloat16
  base = matmul.matmul(x, kernel).astype(jnp.float32)
  big = jnp.abs(base) > 1.0  # away from zero, where a relative change is well defined
  ratio = float(jnp.mean((rescaled.astype(jnp.float32) / base - 1)[big]))
  assert abs(ratio - 0.003) < 0.001, ratio


def test_dora_rescale_computes_in_float32_in_both_passes():
  """bfloat16 in, one cast out, as RoPE and SwiGLU: the bfloat16 DoRA step took 1.29x as long with
  these ops in bfloat16 (this CPU converts each bfloat16 op's elements to float32 and back)."""
  rng = np.random.default_rng(0)
  base, delta = (jnp.asarray(rng.normal(size=(16, 8)), jnp.bfloat16) for _ in range(2))
  layer = {"kernel": jnp.asarray(rng.normal(size=(12, 8)), jnp.float32),
           "lora_a": jnp.asarray(rng.normal(size=(12, 4)), jnp.float32),
           "lora_b": jnp.asarray(rng.normal(size=(4, 8)), jnp.float32)}
  rescale = lambda base, delta, m: llama.dora_delta({**layer, "lora_magnitude": m}, base, delta, 2.0)
  magnitude = jnp.asarray(rng.uniform(1, 2, size=8), jnp.float32)
  assert _bfloat16_arithmetic(rescale, base, delta, magnitude) == set()
  assert rescale(base, delta, magnitude).dtype == jnp.bfloat16
