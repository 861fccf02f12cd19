"""configs/tiny.py's docstring commands work: make a tiny random Llama, train it a few steps."""

import json
import os
import subprocess
import sys

import pytest

from train_helpers import without_torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


@pytest.mark.slow
def test_make_tiny_model_then_train_tiny_config(tmp_path):
  model, workdir = tmp_path / "tiny_llama", tmp_path / "run"
  made = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "make_tiny_model.py"),
                         f"--out={model}"], capture_output=True, text=True, timeout=600)
  assert made.returncode == 0, made.stderr[-2000:]
  config = json.load(open(model / "config.json"))
  assert config["num_hidden_layers"] == 2 and config["vocab_size"] == 49152
  run = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "train.py"),
                        f"--config={os.path.join(ROOT, 'configs', 'tiny.py')}", f"--workdir={workdir}",
                        f"--config.model.path={model}", "--config.train.steps=3",
                        "--config.train.log_every=1", "--config.optimizer.warmup_steps=1",
                        "--config.data.num_proc=2"],  # spawned tokenizing processes re-import train.py
                       capture_output=True, text=True, timeout=600, env=without_torch())
  assert run.returncode == 0, run.stderr[-2000:]
  assert "(tokenized in 2 processes)" in run.stdout
  rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
  assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]
  assert any("eval_loss" in r for r in rows)
