"""scripts/benchmark.py runs both sides at a tiny size; both start from the same weights and loss.

Also checks the speed paths the benchmark relies on against plain autodiff: token_nll's custom
gradient.
"""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "scripts"))

import benchmark  # noqa: E402
from jaxtune.models import llama  # noqa: E402

TINY = benchmark.PRESETS["tiny"]


def test_both_sides_run_and_agree_on_the_first_loss(tmp_path):
  model_dir = benchmark.write_peer_model(TINY, str(tmp_path / "model"))
  for method, trainable in (("full", None), ("lora", benchmark.lora_params(TINY, 8))):
    # full reads the peer's HF folder (as train.py would); LoRA builds the weights in place (GPU path).
    ours = benchmark.run_jaxtune(TINY, method, steps=2, model_dir=model_dir if method == "full" else "")
    peer = benchmark.run_peer(TINY, method, steps=2, model_dir=model_dir)
    # Same weights, same batch: the losses before the first update agree (LoRA starts at the base).
    np.testing.assert_allclose(ours["first_loss"], peer["first_loss"], atol=2e-4, err_msg=method)
    assert abs(ours["first_loss"] - np.log(TINY.vocab)) < 0.1  # random init: near-uniform predictions
    if trainable:
      assert ours["trainable_params"] == peer["trainable_params"] == trainable
    for row in (ours, peer):
      assert row["tokens_per_sec"] > 0 and row["peak_rss_mb"] > 0 and np.isfinite(row["last_loss"])
      assert row["last_loss"] != row["first_loss"]  # the steps updated something


def test_flops_and_table():
  # Full: 6 x matmul params per token (+ attention); LoRA: 4 x + the LoRA leaves' 6 x.
  n, attention = benchmark.matmul_params(TINY), 3 * TINY.layers * 4 * TINY.seq * TINY.hidden
  assert benchmark.train_flops_per_token(TINY, "full") == 6 * n + attention
  assert benchmark.train_flops_per_token(TINY, "lora") == 4 * n + 6 * benchmark.lora_params(TINY, 8) + attention
  peak = benchmark.measure_matmul_peak(n=256, repeats=2)
  assert peak > 1e8
  rows = [benchmark.add_mfu({"side": s, "method": "full", "tokens_per_sec": t, "peak_rss_mb": 100.0,
                             "compile_s": 1.0, "first_step_s": 1.0, "first_loss": 5.0}, TINY, peak)
          for s, t in (("jaxtune", 300.0), ("peer", 100.0))]
  assert "full: jaxtune/peer tokens/s 3.00x" in benchmark.table(rows, peak)


def test_token_nll_gradient_equals_autodiff():
  logits = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 11)) * 3
  targets = jax.random.randint(jax.random.PRNGKey(1), (2, 5), 0, 11)
  weights = jax.random.uniform(jax.random.PRNGKey(2), (2, 5))

  def reference(x):
    nll = jax.nn.logsumexp(x, -1) - jnp.take_along_axis(x, targets[..., None], -1)[..., 0]
    return jnp.sum(nll * weights)

  ours = lambda x: jnp.sum(llama.token_nll(x, targets) * weights)
  np.testing.assert_allclose(ours(logits), reference(logits), rtol=1e-6)
  np.testing.assert_allclose(jax.grad(ours)(logits), jax.grad(reference)(logits), atol=1e-6)
