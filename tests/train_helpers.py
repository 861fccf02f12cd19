"""Shared set-up for training tests: a tiny HF model folder, tiny instruction data, a config."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # configs/

from configs.base import get_base_config  # noqa: E402
from jaxtune.metrics_log import read_metrics  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
TRAIN = os.path.join(HERE, "..", "scripts", "train.py")


def without_torch(env=None) -> dict:
  """`env` (default: this process's) for a jaxtune script's subprocess, torch hidden (tests/without_torch)."""
  env = dict(os.environ if env is None else env)
  env["PYTHONPATH"] = os.pathsep.join(p for p in (os.path.join(HERE, "without_torch"), env.get("PYTHONPATH")) if p)
  return env


def write_instruction_data(path: str, n: int = 64, seed: int = 0) -> str:
  rng = random.Random(seed)
  with open(path, "w") as f:
    for _ in range(n):
      a, b = rng.randint(0, 99), rng.randint(0, 99)
      f.write(json.dumps({"instruction": f"add {a} and {b}", "output": str(a + b)}) + "\n")
  return path


def random_lm_batch(rows: int, length: int, vocab: int = 256) -> dict:
  """One unpacked batch of random tokens: every position weighted, one segment per row."""
  rng = np.random.default_rng(0)
  return {"inputs": rng.integers(0, vocab, (rows, length)), "targets": rng.integers(0, vocab, (rows, length)),
          "weights": np.ones((rows, length), np.float32), "positions": np.tile(np.arange(length), (rows, 1)),
          "segment_ids": np.ones((rows, length), np.int32)}


def lora_and_full_kept_bytes(params, spec, batch) -> tuple[int, int]:
  """(what a rank-4 LoRA step's backward pass keeps, what full fine-tuning's keeps plus the LoRA
  weights), in bytes: the arrays of jax.vjp's closure of the LM loss, residuals and weights."""
  import jax
  from jaxtune import train_step
  from jaxtune.peft import lora, partition

  def nbytes(tree):
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))

  def kept_bytes(params, method):
    trainable, frozen = partition.split(params, method)
    f = lambda tr: train_step.lm_loss_sums(partition.merge(tr, frozen), spec, batch)[0]
    return nbytes(jax.vjp(f, trainable)[1])

  with_lora = lora.add_lora(params, jax.random.PRNGKey(1), 4)
  lora_bytes = nbytes(partition.split(with_lora, "lora")[0])
  return kept_bytes(with_lora, "lora"), kept_bytes(params, "full") + lora_bytes


def make_tiny_setup(folder: str, family: str = "llama_untied") -> tuple[str, str]:
  """(model folder, train jsonl) under `folder`, built once per folder."""
  model = os.path.join(folder, "model")
  data = os.path.join(folder, "train.jsonl")
  if not os.path.exists(os.path.join(model, "config.json")):
    from hf_tiny import save_hf_model
    save_hf_model(family, model)
  if not os.path.exists(data):
    write_instruction_data(data)
  return model, data


def tiny_config(model: str, data: str, **overrides):
  """A locked base config for a tiny run; overrides use dotted keys: {'peft.method': 'full'}."""
  c = get_base_config()
  c.model.path = model
  c.data.train = data
  c.data.format = "instruction"
  c.data.template = "chat"
  c.data.seq_len = 64
  c.train.steps = 6
  c.train.batch_size = 8
  c.train.log_every = 1
  c.train.checkpoint_every = 0
  c.optimizer.learning_rate = 3e-3
  c.optimizer.schedule = "constant"
  c.peft.lora.rank = 4
  for key, value in overrides.items():
    node = c
    *parents, last = key.split(".")
    for p in parents:
      node = node[p]
    node[last] = value
  c.lock()
  return c


def losses(rows) -> list[float]:
  return [r["loss"] for r in rows if "loss" in r]


def assert_same_gradients(got, expected):
  """Every leaf of two gradient pytrees equal up to float32 summation order (relative to the leaf's
  largest entry)."""
  import jax
  flat_got = dict(jax.tree_util.tree_flatten_with_path(got)[0])
  leaves = jax.tree_util.tree_flatten_with_path(expected)[0]
  assert len(leaves) == len(flat_got) > 1
  for path, g in leaves:
    scale = float(np.abs(g).max())
    np.testing.assert_allclose(flat_got[path], g, rtol=1e-5, atol=2e-6 * scale, err_msg=jax.tree_util.keystr(path))


def text_reward(prompts, completions) -> list[float]:
  """A GRPO reward that varies with both the prompt and the completion's text (tests only)."""
  return [(sum(map(ord, c)) % 97) / 97 + 0.01 * len(str(p)) for p, c in zip(prompts, completions)]


def train_args(tiny_setup, workdir, steps=40, every=10, **overrides) -> list[str]:
  """scripts/train.py's arguments for full fine-tuning of the tiny model (configs/tiny.py + flags)."""
  model, data = tiny_setup
  keys = {"model.path": model, "data.train": data, "data.eval": "", "data.seq_len": 64, "data.template": "chat",
          "peft.method": "full", "train.steps": steps, "train.batch_size": 8, "train.log_every": 1,
          "train.checkpoint_every": every, "optimizer.learning_rate": 1e-3, "optimizer.schedule": "constant",
          "optimizer.warmup_steps": 0, **overrides}
  return ["--config", os.path.join(HERE, "..", "configs", "tiny.py"), "--workdir", str(workdir)] + [
      f"--config.{k}={v}" for k, v in keys.items()]


def start(args, env, devices=None, script=TRAIN):
  if devices:
    env = dict(env, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  return subprocess.Popen([sys.executable, script, *args], env=without_torch(env), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def finish(proc, timeout=300) -> tuple[int, str, str]:
  out, err = proc.communicate(timeout=timeout)
  return proc.returncode, out, err


def train(args, env, devices=None, script=TRAIN) -> str:
  rc, out, err = finish(start(args, env, devices, script))
  assert rc == 0, err[-3000:]
  return out


def series(workdir) -> dict[int, tuple[float, float]]:
  """step -> (loss, grad_norm) from metrics.jsonl (local or gs://); a step logged twice is an error."""
  rows = [r for r in read_metrics(str(workdir)) if "loss" in r]
  steps = [r["step"] for r in rows]
  assert len(steps) == len(set(steps)), f"duplicated metrics rows: {steps}"
  return {r["step"]: (r["loss"], r["grad_norm"]) for r in rows}
