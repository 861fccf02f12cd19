"""README command one cannot rot: the demo runs end to end on the real SmolLM2 GGUF for a few steps."""

import json
import os
import subprocess
import sys

import pytest

from train_helpers import without_torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path):
  from configs.demo import smollm2_gguf
  if not os.path.exists(smollm2_gguf()):
    pytest.fail(f"the demo model is not installed: {smollm2_gguf()} (scripts/install.sh installs it)")
  eval_path = tmp_path / "eval.jsonl"
  with open(os.path.join(ROOT, "jaxtune", "data", "demo", "eval.jsonl")) as f:
    eval_path.write_text("".join(f.readlines()[:6]))
  workdir = tmp_path / "demo"
  cmd = [sys.executable, os.path.join(ROOT, "scripts", "demo.py"), f"--workdir={workdir}",
         "--config.train.steps=3", "--config.train.log_every=1", "--config.train.batch_size=4",
         "--config.optimizer.warmup_steps=1", f"--config.data.eval={eval_path}"]
  out = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=without_torch())
  assert out.returncode == 0, out.stderr[-3000:]
  assert "exact match" in out.stdout and "before" in out.stdout
  summary = json.load(open(workdir / "demo_summary.json"))
  for side in ("before", "after"):
    assert summary[side]["eval_loss"] > 0 and 0 <= summary[side]["exact_match"] <= 1
    assert len(summary[side]["samples"]) == 3
  # Even 3 steps of lr 2e-3 move the answer-token loss a long way from the rambling base model.
  assert summary["after"]["eval_loss"] < summary["before"]["eval_loss"]
  rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
  assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]
  assert (workdir / "loss_curve.png").stat().st_size > 1000
  assert json.load(open(workdir / "peft_adapter" / "adapter_config.json"))["peft_type"] == "LORA"
  assert (workdir / "checkpoints" / "3").is_dir()
