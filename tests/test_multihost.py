"""Two local CPU processes (jax.distributed over gloo, one device each) train like one process with two devices.

Each process loads only its rows of every global batch, builds global arrays from them, and they
save and resume shared Orbax checkpoints; only process 0 writes metrics.jsonl. GRPO: each process
samples completions for its share of the prompts, all processes generating one global batch.
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from jaxtune.metrics_log import read_metrics
from train_helpers import without_torch

RUNNER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "multihost_run.py")


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def start(*args, hybrid=False) -> subprocess.Popen:
  env = without_torch(dict(os.environ, MULTIHOST_HYBRID=str(int(hybrid))))
  return subprocess.Popen([sys.executable, RUNNER, *map(str, args)], env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def result(proc: subprocess.Popen) -> dict:
  out, err = proc.communicate(timeout=900)
  assert proc.returncode == 0, err[-3000:]
  return json.loads([line for line in out.splitlines() if line.startswith("{")][-1])


@pytest.mark.parametrize("method,hybrid", [("full", False), ("lora", True)])
def test_two_processes_match_two_devices(tiny_setup, tmp_path, method, hybrid):
  """hybrid: two devices a process on a data=2 x fsdp=2 mesh with mesh.dcn_data=2 (multi-slice), so
  FSDP stays inside each process and only the data axis crosses between them; against one process
  with four devices."""
  model, data = tiny_setup
  port = free_port()
  # All three processes at once: the two workers must run concurrently anyway.
  workers = [start(model, data, tmp_path / "multi", method, i, 2, port, hybrid=hybrid) for i in range(2)]
  single = result(start(model, data, tmp_path / "single", method, "single", hybrid=hybrid))
  p0, p1 = (result(w) for w in workers)

  per_process = 2 if hybrid else 1
  assert (single["process_count"], single["devices"]) == (1, 2 * per_process)
  assert [(p["process_index"], p["process_count"], p["local_devices"]) for p in (p0, p1)] == [
      (0, 2, per_process), (1, 2, per_process)]
  if hybrid:  # each data group (a row of the data x fsdp grid) is one process's devices
    assert p0["groups"] == p1["groups"] == [[0, 0], [1, 1]]
  assert p0["steps"] == list(range(1, 7))
  np.testing.assert_allclose(p0["losses"], single["losses"], atol=1e-5, rtol=0)
  np.testing.assert_allclose(p1["losses"], p0["losses"], atol=0, rtol=0)  # one global loss
  # Throughput and tokens_seen count both processes' rows, not process 0's alone.
  assert p0["tokens_seen"] == p1["tokens_seen"] == single["tokens_seen"]
  assert all(b > a for a, b in zip(single["tokens_seen"], single["tokens_seen"][1:]))
  assert single["losses"][-1] < single["losses"][0]

  # Only process 0 logs: both processes share the workdir, so a second writer would double the rows.
  rows = read_metrics(str(tmp_path / "multi"))
  assert [r["step"] for r in rows] == list(range(1, 7))
  np.testing.assert_allclose([r["loss"] for r in rows], p0["losses"], atol=0, rtol=0)
  # Steps 4-6 ran after a resume from the step-3 checkpoint both processes saved together.
  ckpts = tmp_path / "multi" / "checkpoints"
  assert sorted(os.listdir(ckpts)) == ["3", "6"]
  assert all((ckpts / s / "commit_success.txt").exists() for s in ("3", "6"))


def test_grpo_two_processes_match_two_devices(tiny_setup, tmp_path):
  """GRPO rewarded by a trained reward model, which each process loads from its workdir."""
  from jaxtune import trainer
  from train_helpers import tiny_config
  model, _ = tiny_setup
  preference = os.path.join(os.path.dirname(RUNNER), "..", "jaxtune", "data", "preference_demo", "train.jsonl")
  reward_model = str(tmp_path / "reward_model")
  trainer.run(tiny_config(model, preference, **{"objective": "reward", "data.format": "preference",
                                                "data.seq_len": 96, "train.steps": 3}), reward_model)
  port = free_port()
  workers = [start(model, reward_model, tmp_path / "multi", "grpo", i, 2, port) for i in range(2)]
  single = result(start(model, reward_model, tmp_path / "single", "grpo", "single"))
  p0, p1 = (result(w) for w in workers)

  assert p0["steps"] == single["steps"] == list(range(1, 7))
  # Sampling at temperature 1 draws the same tokens for the same global rows however they are split,
  # so rewards, KL, losses and gradients follow the one-process run; a process that sampled its
  # prompts on its own would draw different completions from step 1 on.
  for key in ("reward_mean", "kl", "losses", "grad_norm"):
    np.testing.assert_allclose(p0[key], single[key], atol=1e-5, rtol=1e-5, err_msg=key)
    assert p1[key] == p0[key], key
  assert p0["tokens_seen"] == p1["tokens_seen"] == single["tokens_seen"]
  # Greedy eval of 5 prompts at steps 3 and 6: process 1 completes prompt 4 and 3 fillers.
  assert len(single["eval_reward_mean"]) == 2
  np.testing.assert_allclose(p0["eval_reward_mean"], single["eval_reward_mean"], atol=1e-6)
  assert len(set(single["reward_mean"])) > 1 and max(single["kl"]) > 0  # the policy did move
  rows = read_metrics(str(tmp_path / "multi"))
  assert [r["step"] for r in rows] == list(range(1, 7))
  np.testing.assert_allclose([r["loss"] for r in rows], p0["losses"], atol=0, rtol=0)
