"""CPU runs restart once with glibc's huge-page tunable (jaxtune/huge_pages.py): when, how, and that it pays."""

import os
import subprocess
import sys

import pytest

from jaxtune import huge_pages

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU = {"JAX_PLATFORMS": "cpu"}


@pytest.mark.parametrize("environ,libc,mode,platform,expected", [
    (CPU, (2, 36), "madvise", "linux", True),
    ({**CPU, "GLIBC_TUNABLES": "glibc.malloc.check=0"}, (2, 36), "madvise", "linux", True),
    ({**CPU, "GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, (2, 36), "madvise", "linux", False),  # the opt-out
    (CPU, (2, 34), "madvise", "linux", False),  # no such tunable before glibc 2.35
    (CPU, (), "madvise", "linux", False),  # musl and others
    (CPU, (2, 36), "always", "linux", False),  # every large map gets huge pages already
    (CPU, (2, 36), "never", "linux", False),
    (CPU, (2, 36), "", "linux", False),
    (CPU, (2, 36), "madvise", "darwin", False),
    ({"JAX_PLATFORMS": "tpu"}, (2, 36), "madvise", "linux", False),  # an accelerator's memory is not glibc's
    ({"JAX_PLATFORMS": "cpu,cuda"}, (2, 36), "madvise", "linux", False),
])
def test_restarts_only_where_it_helps(environ, libc, mode, platform, expected):
  assert huge_pages.wants_restart(environ, libc, mode, platform) is expected


def test_reads_the_kernel_mode_and_the_glibc_version(tmp_path):
  (tmp_path / "enabled").write_text("always [madvise] never\n")
  assert huge_pages.thp_mode(str(tmp_path / "enabled")) == "madvise"
  assert huge_pages.thp_mode(str(tmp_path / "missing")) == ""
  version = huge_pages.glibc_version()
  assert version == () or (len(version) >= 2 and version[0] == 2)


RESTART = f"""
import os, sys
sys.path.insert(0, {ROOT!r})
print("before", os.getpid(), flush=True)
from jaxtune import huge_pages
huge_pages.restart_with_huge_pages()
print("after", os.getpid(), os.environ.get("GLIBC_TUNABLES"), *sys.argv[1:])
"""


def run_restart(tmp_path, tunables: str | None) -> list[list[str]]:
  (tmp_path / "restart.py").write_text(RESTART)
  env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
  env.update(CPU, **({"GLIBC_TUNABLES": tunables} if tunables is not None else {}))
  out = subprocess.run([sys.executable, str(tmp_path / "restart.py"), "--workdir", "a b"], capture_output=True,
                       text=True, timeout=120, env=env, check=True)
  return [line.split(" ", 3) for line in out.stdout.splitlines()]


def this_machine_restarts() -> bool:
  return huge_pages.wants_restart(CPU, huge_pages.glibc_version(), huge_pages.thp_mode(), sys.platform)


def test_the_restart_is_the_same_process_with_the_same_arguments(tmp_path):
  lines = run_restart(tmp_path, "glibc.malloc.check=0")
  pid = lines[0][1]
  if this_machine_restarts():  # exec: the script starts over in the same process, tunable added
    assert lines == [["before", pid], ["before", pid],
                     ["after", pid, "glibc.malloc.check=0:glibc.malloc.hugetlb=1", "--workdir a b"]]
  else:
    assert lines == [["before", pid], ["after", pid, "glibc.malloc.check=0", "--workdir a b"]]
  # The user's own setting wins, and nothing restarts.
  lines = run_restart(tmp_path, "glibc.malloc.hugetlb=0")
  assert lines == [["before", lines[0][1]], ["after", lines[0][1], "glibc.malloc.hugetlb=0", "--workdir a b"]]


FAULTS = f"""
import resource, sys
sys.path.insert(0, {ROOT!r})
from jaxtune import huge_pages
huge_pages.restart_with_huge_pages()
import jax, jax.numpy as jnp
x = jnp.ones((4096, 4096), jnp.float32)
double = jax.jit(lambda x: x * 2)  # every call's output is a fresh 64 MB buffer, freed right after
double(x).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
  double(x).block_until_ready()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not this_machine_restarts(), reason="no restart here: the kernel's huge pages are not "
                    "'madvise' (or glibc < 2.35), so there is nothing to measure")
def test_huge_pages_cut_the_page_faults_of_fresh_buffers():
  env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}

  def faults(**extra):
    out = subprocess.run([sys.executable, "-c", FAULTS], capture_output=True, text=True, timeout=300,
                         env={**env, **CPU, **extra}, check=True)
    return int(out.stdout.split()[-1])

  restarted, opted_out = faults(), faults(GLIBC_TUNABLES="glibc.malloc.hugetlb=0")
  # 64 MB in 4 KiB pages is 16,384 faults per call; measured here 5,442 vs 163,852 for the 10 calls.
  assert opted_out > 10 * 16_000 * 0.9 and restarted * 5 < opted_out, (restarted, opted_out)
