"""A gs:// workdir (what tpu/ uses, so a re-created VM resumes) and gs:// data against a local Cloud
Storage emulator: train.py reads, writes, resumes, profiles and export.py reads back, as locally."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
from safetensors.numpy import load_file

from jaxtune import checkpoint
from train_helpers import HERE, finish, series, start, train, train_args

STEPS, EVERY = 8, 4
BUCKET = "bkt"


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
  """The environment that points gcsfs / google-cloud-storage and tensorstore at the emulator."""
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  server = subprocess.Popen([sys.executable, os.path.join(HERE, "gcs_emulator.py"), str(port), BUCKET],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  url = f"http://localhost:{port}"
  for _ in range(100):
    try:
      urllib.request.urlopen(f"{url}/storage/v1/b/{BUCKET}", timeout=1)
      break
    except OSError:
      time.sleep(0.1)
  cache = str(tmp_path_factory.mktemp("jax_cache"))
  yield dict(os.environ, STORAGE_EMULATOR_HOST=url, TENSORSTORE_GCS_HTTP_URL=url, PYTHONUNBUFFERED="1",
             JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  server.kill()
  server.wait()


def export(workdir, out, env):
  train(["--workdir", str(workdir), "--out", str(out), "--format", "peft"], env,
        script=os.path.join(HERE, "..", "scripts", "export.py"))
  return load_file(os.path.join(out, "adapter_model.safetensors"))


def test_checkpoint_dir_keeps_a_gs_workdir():
  assert checkpoint.checkpoint_dir("gs://b/runs/a") == "gs://b/runs/a/checkpoints"
  assert checkpoint.checkpoint_dir("runs/a") == os.path.join(os.getcwd(), "runs/a/checkpoints")


def use_emulator(gcs, monkeypatch):
  for key, value in gcs.items():  # this process reads and writes the bucket too
    monkeypatch.setenv(key, value)
  from etils import epath
  return epath


def test_gs_data_files_and_their_errors(gcs, monkeypatch):
  epath = use_emulator(gcs, monkeypatch)
  from jaxtune.data import sources
  (epath.Path(f"gs://{BUCKET}/d/a/one.jsonl")).write_text('{"text": "a"}\n{"text": "b"}\n')
  (epath.Path(f"gs://{BUCKET}/d/two.json")).write_text('[{"text": "c"}]')
  (epath.Path(f"gs://{BUCKET}/d/notes.txt")).write_text("not data")
  records = sources.read_records(f"gs://{BUCKET}/d")  # a folder, subfolders included, sorted
  assert records.records == [{"text": "a"}, {"text": "b"}, {"text": "c"}]
  assert records.origins == [f"gs://{BUCKET}/d/a/one.jsonl:1", f"gs://{BUCKET}/d/a/one.jsonl:2",
                             f"gs://{BUCKET}/d/two.json:1"]
  (epath.Path(f"gs://{BUCKET}/bad.jsonl")).write_text('{"text": "a"}\n{"text": \n')
  with pytest.raises(sources.DataError, match=f"^gs://{BUCKET}/bad.jsonl:2: invalid JSON"):
    sources.read_records(f"gs://{BUCKET}/bad.jsonl")
  with pytest.raises(sources.DataError, match=f"^gs://{BUCKET}/none.jsonl: no such file$"):
    sources.read_records(f"gs://{BUCKET}/none.jsonl")


def test_gs_workdir_trains_resumes_profiles_and_exports_as_a_local_one(tiny_setup, gcs, tmp_path, monkeypatch):
  remote, local = f"gs://{BUCKET}/runs/lora", tmp_path / "local"
  epath = use_emulator(gcs, monkeypatch)
  data = f"gs://{BUCKET}/data/instructions"  # a folder holding the local run's file
  (epath.Path(data) / "part" / "train.jsonl").write_text(open(tiny_setup[1]).read())
  lora = {"peft.method": "lora", "peft.lora.rank": 4}
  train(train_args(tiny_setup, local, steps=STEPS, every=EVERY, **lora), gcs)
  lora["data.train"] = data
  # Half the steps, then the same run to the end (as after a preemption), the second half profiled;
  # both with the compilation cache in the bucket, so the second one loads the step it compiled.
  cached = {**lora, "train.compilation_cache": f"gs://{BUCKET}/xla_cache"}
  train(train_args(tiny_setup, remote, steps=EVERY, every=EVERY, **cached), gcs)
  rc, out, err = finish(start(train_args(tiny_setup, remote, steps=STEPS, every=EVERY, **cached, **{
      "train.profile_steps": 2, "train.profile_start_step": EVERY + 2}), dict(gcs, JAX_LOG_COMPILES="1")))
  assert rc == 0, err[-3000:]
  assert f"resumed from {remote}/checkpoints/{EVERY}\n" in out
  assert "Persistent compilation cache hit for 'jit_train_step'" in err
  # metrics.jsonl keeps the first invocation's rows (an object cannot be appended to: it is rewritten).
  assert series(remote) == series(local) and sorted(series(local)) == list(range(1, STEPS + 1))
  assert json.loads((epath.Path(remote) / "config.json").read_text())["peft"]["method"] == "lora"
  # The cache hit above came from the bucket (not from the local cache this environment also names).
  assert any(p.name.startswith("jit_train_step-") for p in epath.Path(f"gs://{BUCKET}/xla_cache").iterdir())
  assert (epath.Path(remote) / "profile" / "top_ops.txt").read_text().startswith("2 step(s) traced")
  assert list((epath.Path(remote) / "profile" / "plugins" / "profile").iterdir())
  ours, reference = export(remote, tmp_path / "from_gs", gcs), export(local, tmp_path / "from_local", gcs)
  assert sorted(ours) == sorted(reference)
  for name in reference:
    np.testing.assert_array_equal(ours[name], reference[name], err_msg=name)
  generated = [train(["--model", tiny_setup[0], "--adapter", str(workdir), "--prompt", "Hello", "--max_new_tokens", "4",
                      "--json", "--raw"], gcs, script=os.path.join(HERE, "..", "scripts", "generate.py"))
               for workdir in (remote, local)]
  assert generated[0] == generated[1] and json.loads(generated[0].splitlines()[-1])["completion"]
