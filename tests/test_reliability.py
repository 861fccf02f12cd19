"""Reliability of scripts/train.py: kill -9 (also mid-checkpoint), SIGTERM/SIGINT, non-finite steps,
resuming on another device count. Every resumed run must reproduce an uninterrupted run's losses
bitwise (fp32, CPU, same device count) or to 1e-5 (another mesh: other reduction orders)."""

import json
import os
import random
import re
import shutil
import signal
import time

import jax
import numpy as np
import pytest

from jaxtune import checkpoint, trainer
from jaxtune.data import pipeline
from train_helpers import finish, losses, series, start, tiny_config, train, train_args

HERE = os.path.dirname(os.path.abspath(__file__))
STEPS, EVERY = 40, 10


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  """Subprocess environment: a shared persistent compilation cache (same executables, faster)."""
  cache = str(tmp_path_factory.mktemp("jax_cache"))
  return dict(os.environ, JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
              JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0", PYTHONUNBUFFERED="1")


def wait_for_step(proc, workdir, step, timeout=240):
  """Blocks until metrics.jsonl has a row with `step` or more (the process must still be running)."""
  path = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + timeout
  while time.time() < deadline:
    assert proc.poll() is None, f"the run ended before step {step}: {proc.communicate()[1][-2000:]}"
    if os.path.exists(path):
      with open(path) as f:
        done = [json.loads(line)["step"] for line in f if line.endswith("\n")]
      if done and max(done) >= step:
        return
    time.sleep(0.005)
  raise TimeoutError(f"no step {step} in {timeout}s")


@pytest.fixture(scope="module")
def straight(tiny_setup, env, tmp_path_factory):
  """The uninterrupted run every interrupted one must reproduce."""
  workdir = tmp_path_factory.mktemp("straight")
  train(train_args(tiny_setup, workdir), env)
  reference = series(workdir)
  assert sorted(reference) == list(range(1, STEPS + 1))
  return reference


def test_kill9_at_random_moments_then_rerun_is_exact(tiny_setup, env, straight, tmp_path):
  args = train_args(tiny_setup, tmp_path)
  for kill_at in sorted(random.Random(6).sample(range(1, STEPS - 4), 2)):  # each kill, then the same command
    proc = start(args, env)
    wait_for_step(proc, str(tmp_path), kill_at)
    proc.send_signal(signal.SIGKILL)
    assert finish(proc)[0] == -signal.SIGKILL
  out = train(args, env)
  resumed = int(re.search(r"resumed from .*/checkpoints/(\d+)", out).group(1))
  assert resumed % EVERY == 0 and resumed >= EVERY
  assert series(tmp_path) == straight  # bitwise: every step's loss and gradient norm


def test_kill9_during_async_checkpoint_write_never_picks_the_partial_one(tiny_setup, env, straight, tmp_path):
  listing = tmp_path / "listing.json"
  workdir = tmp_path / "run"
  args = train_args(tiny_setup, workdir)
  rc, _, _ = finish(start([str(2 * EVERY), str(listing), *args], env, script=os.path.join(HERE, "crash_in_save.py")))
  assert rc == -signal.SIGKILL
  # Killed while Orbax was writing step 20: only its temporary folder existed.
  in_flight = json.loads(listing.read_text())
  assert str(2 * EVERY) not in in_flight and any(n.startswith(f"{2 * EVERY}.orbax-checkpoint-tmp") for n in in_flight)
  # A fabricated half-written newer step (as a kill on another file system could leave) is ignored too.
  fake = workdir / "checkpoints" / f"{3 * EVERY}.orbax-checkpoint-tmp"
  fake.mkdir()
  (fake / "_CHECKPOINT_METADATA").write_text("{trunc")
  out = train(args, env)
  assert f"resumed from {workdir}/checkpoints/{EVERY}\n" in out
  assert series(workdir) == straight
  assert sorted(os.listdir(workdir / "checkpoints")) == ["20", "30", "40"]  # the partial ones are gone


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_sigterm_and_ctrl_c_save_the_current_step_and_resume_exactly(tiny_setup, env, straight, tmp_path, sig):
  args = train_args(tiny_setup, tmp_path)
  proc = start(args, env)
  wait_for_step(proc, str(tmp_path), 13)
  sent = time.time()
  proc.send_signal(sig)
  rc, _, err = finish(proc, timeout=60)
  assert time.time() - sent < 60
  assert rc == 128 + sig, err[-2000:]
  last = err.strip().splitlines()[-1]
  match = re.fullmatch(rf"{sig.name}: stopped after step (\d+) \(checkpoint {tmp_path}/checkpoints/(\d+)\); "
                       r"run the same command again to resume", last)
  assert match and match.group(1) == match.group(2), last
  stopped = int(match.group(1))
  assert stopped >= 13 and os.path.isdir(tmp_path / "checkpoints" / str(stopped))
  out = train(args, env)
  assert f"resumed from {tmp_path}/checkpoints/{stopped}\n" in out
  assert series(tmp_path) == straight


def test_resume_on_another_device_count(tiny_setup, env, straight, tmp_path):
  """Saved on 8 fake devices (fsdp 4 x tensor 2), resumed on 4 (fsdp 2 x tensor 2) and on 1."""
  saved = tmp_path / "eight"
  train(train_args(tiny_setup, saved, steps=2 * EVERY, **{"mesh.data": 1, "mesh.fsdp": 4, "mesh.tensor": 2}),
        env, devices=8)
  four, one = tmp_path / "four", tmp_path / "one"
  shutil.copytree(saved, four)
  shutil.copytree(saved, one)
  out4 = train(train_args(tiny_setup, four, **{"mesh.data": 1, "mesh.fsdp": 2, "mesh.tensor": 2}), env, devices=4)
  out1 = train(train_args(tiny_setup, one), env)
  for out, workdir in ((out4, four), (out1, one)):
    assert f"resumed from {workdir}/checkpoints/{2 * EVERY}\n" in out
    got = series(workdir)
    assert sorted(got) == list(range(1, STEPS + 1))
    np.testing.assert_allclose([got[s] for s in sorted(got)], [straight[s] for s in sorted(got)],
                               atol=1e-5, rtol=0, err_msg=str(workdir))


def poison(monkeypatch, bad_steps):
  """Batch k (counting from 1 in each run) gets an inf weight: a non-finite loss and gradient."""
  original = pipeline.BatchIterator.next
  calls = []

  def next_batch(self):
    batch = original(self)
    calls.append(1)
    if len(calls) in bad_steps:
      batch = dict(batch, weights=batch["weights"] + np.float32(np.inf))
    return batch

  monkeypatch.setattr(pipeline.BatchIterator, "next", next_batch)


def test_nonfinite_step_stops_naming_it_and_keeps_the_last_good_checkpoint(tiny_setup, tmp_path, monkeypatch):
  model, data = tiny_setup
  kw = {"peft.method": "full", "train.steps": 8, "train.checkpoint_every": 2, "train.log_every": 4}
  straight = losses(trainer.run(tiny_config(model, data, **kw), str(tmp_path / "straight")))
  poison(monkeypatch, {5})
  with pytest.raises(FloatingPointError, match=rf"^step 5: non-finite loss or gradients, training stopped; "
                     rf"the newest good checkpoint is {tmp_path}/run/checkpoints/4 "):
    trainer.run(tiny_config(model, data, **kw), str(tmp_path / "run"))
  monkeypatch.undo()
  resumed = trainer.run(tiny_config(model, data, **kw), str(tmp_path / "run"))
  assert losses(resumed) == straight[1:]  # log rows at steps 4 and 8: the one at 8 equals


def test_diverging_run_exits_with_one_line(tiny_setup, env, tmp_path):
  """A real divergence (Adam, learning rate 1e30: step 2 overflows) through the script: one line, exit 2."""
  rc, _, err = finish(start(train_args(tiny_setup, tmp_path, steps=10, **{
      "optimizer.learning_rate": 1e30, "optimizer.grad_clip": 0.0, "train.checkpoint_every": 1}), env))
  last = err.strip().splitlines()[-1]
  assert rc == 2 and "Traceback" not in err, err[-2000:]
  match = re.fullmatch(r"error: step (\d+): non-finite loss or gradients, training stopped; the newest good "
                       rf"checkpoint is {tmp_path}/checkpoints/(\d+) .*", last)
  assert match and int(match.group(2)) == int(match.group(1)) - 1, last
  good = checkpoint.make_manager(str(tmp_path))
  assert good.latest_step() == int(match.group(2))
  meta = checkpoint.restore_meta(good, good.latest_step())
  assert meta["step"] == good.latest_step()


def test_skip_nonfinite_leaves_state_unchanged_and_counts(tiny_setup, tmp_path, monkeypatch):
  model, data = tiny_setup
  kw = {"peft.method": "full", "train.steps": 6, "train.checkpoint_every": 1, "train.keep_checkpoints": 10,
        "train.skip_nonfinite": True}
  poison(monkeypatch, {3, 5})
  rows = trainer.run(tiny_config(model, data, **kw), str(tmp_path))
  assert [r["skipped_steps"] for r in rows] == [0, 0, 1, 1, 2, 2]
  assert np.isnan(rows[2]["loss"]) and np.isfinite([rows[i]["loss"] for i in (0, 1, 3, 5)]).all()
  manager = checkpoint.make_manager(str(tmp_path))
  r = trainer.setup(tiny_config(model, data, **kw), str(tmp_path))
  target = {"trainable": r.trainable, "opt_state": r.opt_state, "rng": r.rng}
  before, _ = checkpoint.restore(manager, 2, target)
  after, meta = checkpoint.restore(manager, 3, target)
  changed, _ = checkpoint.restore(manager, 4, target)
  assert meta["skipped_steps"] == 1
  same = jax.tree.map(lambda a, b: bool((np.asarray(a) == np.asarray(b)).all()), before, after)
  assert all(jax.tree.leaves(same))  # params, Adam moments and its step count: untouched by step 3
  assert not np.array_equal(np.asarray(after["trainable"]["embed_tokens"]),
                            np.asarray(changed["trainable"]["embed_tokens"]))


def test_grpo_kill9_then_sigterm_then_rerun_is_exact(tiny_setup, env, tmp_path):
  """GRPO's own loop: kill -9 (rows logged after the checkpoint are logged again, once), then SIGTERM
  (the current step is saved at the next round boundary and the exit says so), then completion."""
  steps, every = 16, 4
  data = os.path.join(HERE, "..", "jaxtune", "data", "preference_demo", "train.jsonl")
  grpo = {"objective": "grpo", "data.format": "preference", "data.train": data, "data.seq_len": 48,
          "grpo.group_size": 4, "grpo.max_new_tokens": 4, "train.checkpoint_every": every,
          "grpo.reward_fn": "jaxtune.objectives.toy_rewards:digit_fraction", "optimizer.learning_rate": 1e-2}
  straight = tmp_path / "straight"
  train(train_args(tiny_setup, straight, steps=steps, **grpo), env)
  reference = series(straight)
  assert sorted(reference) == list(range(1, steps + 1))

  args = train_args(tiny_setup, tmp_path / "run", steps=steps, **grpo)
  proc = start(args, env)
  wait_for_step(proc, str(tmp_path / "run"), every + 1)
  proc.send_signal(signal.SIGKILL)
  assert finish(proc)[0] == -signal.SIGKILL
  proc = start(args, env)
  wait_for_step(proc, str(tmp_path / "run"), 2 * every + 1)
  proc.send_signal(signal.SIGTERM)
  rc, _, err = finish(proc, timeout=60)
  assert rc == 128 + signal.SIGTERM, err[-2000:]
  match = re.fullmatch(rf"SIGTERM: stopped after step (\d+) \(checkpoint {tmp_path}/run/checkpoints/(\d+)\); "
                       r"run the same command again to resume", err.strip().splitlines()[-1])
  assert match and match.group(1) == match.group(2), err[-2000:]
  stopped = int(match.group(1))
  assert 2 * every < stopped < steps
  out = train(args, env)
  assert f"resumed from {tmp_path}/run/checkpoints/{stopped}\n" in out
  assert series(tmp_path / "run") == reference  # bitwise, and no step logged twice
