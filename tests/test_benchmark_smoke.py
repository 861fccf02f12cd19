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
  hd = TINY.hidden // TINY.heads  # DoRA adds one magnitude per output feature of the 7 projections
  magnitudes = TINY.layers * (hd * (TINY.heads + 2 * TINY.kv_heads) + 2 * TINY.hidden + 2 * TINY.inter)
  for method, trainable in (("full", None), ("lora", benchmark.lora_params(TINY, 8)),
                            ("dora", benchmark.lora_params(TINY, 8) + magnitudes)):
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
      assert row["faults_per_step"] >= 0
      assert row["last_loss"] != row["first_loss"]  # the steps updated something
  # Mixed precision on both sides (jaxtune compute_dtype, the peer's autocast) starts from the same loss too.
  ours = benchmark.run_jaxtune(TINY, "full", steps=2, dtype="bfloat16", model_dir=model_dir)
  peer = benchmark.run_peer(TINY, "full", steps=2, model_dir=model_dir, dtype="bfloat16")
  assert ours["dtype"] == peer["dtype"] == "bfloat16"
  np.testing.assert_allclose(ours["first_loss"], peer["first_loss"], rtol=1e-2)


def test_flops_and_table():
  # Full: 6 x matmul params per token (+ attention); LoRA: 4 x + the LoRA leaves' 6 x.
  n, attention = benchmark.matmul_params(TINY), 3 * TINY.layers * 4 * TINY.seq * TINY.hidden
  assert benchmark.train_flops_per_token(TINY, "full") == 6 * n + attention
  assert benchmark.train_flops_per_token(TINY, "lora") == 4 * n + 6 * benchmark.lora_params(TINY, 8) + attention
  peaks = {d: benchmark.measure_matmul_peak(n=256, dtype=d, repeats=2) for d in ("float32", "bfloat16")}
  assert min(peaks.values()) > 1e8
  rows = [benchmark.add_mfu({"side": s, "method": "full", "dtype": d, "tokens_per_sec": t, "peak_rss_mb": 100.0,
                             "compile_s": 1.0, "first_step_s": 1.0, "first_loss": 5.0, "faults_per_step": 10.0},
                            TINY, peaks)
          for s, d, t in (("jaxtune", "float32", 300.0), ("peer", "float32", 100.0), ("jaxtune", "bfloat16", 500.0))]
  text = benchmark.table(rows, peaks)
  assert "full float32 vs peer float32: jaxtune/peer tokens/s 3.00x" in text
  assert "full bfloat16 vs peer float32: jaxtune/peer tokens/s 5.00x" in text
  assert "full bfloat16 vs peer bfloat16" not in text  # no such peer row
  rounds = [dict(rows[0], tokens_per_sec=t) for t in (900.0, 100.0, 300.0)] + rows[1:]
  assert [r["tokens_per_sec"] for r in benchmark.median_rows(rounds)] == [300.0, 100.0, 500.0]


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


def test_smollm2_preset_is_the_demo_model_shape():
  """--preset smollm2 times the shape README's demo tunes: the shipped GGUF's, 134.5M parameters."""
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
  from configs.demo import smollm2_gguf
  from jaxtune.models import loading
  p, demo = benchmark.PRESETS["smollm2"], loading.model_config_of(smollm2_gguf())
  assert benchmark.model_config(p) == benchmark.model_config(benchmark.Preset(
      demo.vocab_size, demo.hidden_size, demo.intermediate_size, demo.num_layers, demo.num_heads,
      demo.num_kv_heads, p.batch, p.seq, demo.tie_word_embeddings))
  assert demo.head_dim == p.hidden // p.heads
  shapes = jax.eval_shape(lambda: benchmark.base_params(p))
  assert sum(x.size for x in jax.tree.leaves(shapes)) == 134_515_008  # HF's count for SmolLM2-135M
  norms = (2 * p.layers + 1) * p.hidden
  assert benchmark.matmul_params(p) == 134_515_008 - norms  # tied: the head is the embedding, counted once


def test_profile_traces_the_first_rounds_jaxtune_rows(tmp_path, capsys):
  """--profile (gpu_check.sh's PROFILE): 3 extra jaxtune steps traced per row of the first round."""
  benchmark.main(["--preset", "tiny", "--sides", "jaxtune", "--methods", "lora", "--dtype", "float32",
                  "--steps", "2", "--rounds", "2", "--peak_tflops", "1", "--profile", str(tmp_path)])
  report = (tmp_path / "lora_float32" / "top_ops.txt").read_text()
  assert report.startswith("3 step(s) traced") and "dot_general" in report
  assert f"jaxtune lora float32, profile in {tmp_path / 'lora_float32'}:\n{report.splitlines()[0]}" in capsys.readouterr().out


def test_gpu_check_dry_run_measures_alone_then_side_by_side(tmp_path):
  """gpu_check.sh --tiny: the GPU script's path on CPU. jaxtune alone at BATCH (the MFU rows, with a
  verdict), then both sides at PEER_BATCH, with the tokens/s ratio per method."""
  import json
  import subprocess
  root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
  out = subprocess.run(["bash", "scripts/gpu_check.sh", "--tiny"], cwd=root, capture_output=True, text=True,
                       env=dict(os.environ, JSON=str(tmp_path / "rows.json"), METHODS="full"), timeout=600)
  assert out.returncode == 0, out.stderr[-2000:]
  alone = json.loads((tmp_path / "rows.json").read_text())["rows"]
  both = json.loads((tmp_path / "rows.json.peer.json").read_text())["rows"]
  assert [(r["side"], r["method"]) for r in alone] == [("jaxtune", "full")]
  assert sorted(r["side"] for r in both) == ["jaxtune", "peer"]
  assert alone[0]["layer_loop"] == "scan"  # auto off a GPU
  lines = out.stdout.splitlines()
  assert any(l.startswith("jaxtune full:") and "layers scan" in l and "(target >= 50%:" in l for l in lines), lines
  assert sum("target >= 50%" in l for l in lines) == 1  # the side-by-side rows get no verdict
  assert any(l.startswith("full: jaxtune / peer tokens/s ") for l in lines), lines
