"""CPU runs restart once with glibc's huge-page tunable: the scripts call this from `__main__`.

XLA:CPU allocates a program's scratch afresh on every run (178 MB for the benchmark's float32
training step) from a worker thread; glibc serves it from a new mmap and unmaps it on free, so
every step faults all of it in again (46,000 faults, ~70 ms of kernel time in a ~290 ms step).
With `glibc.malloc.hugetlb=1` glibc asks for transparent huge pages on those maps: 100x fewer
faults, and the demo trains 21% faster. glibc reads tunables only when a process starts, hence
the restart (same PID, arguments and streams). It happens only on Linux with glibc >= 2.35, when
the kernel gives huge pages on request (`madvise` mode; `always` needs nothing), when JAX can only
compute on the CPU, and when GLIBC_TUNABLES says nothing about it (set
`GLIBC_TUNABLES=glibc.malloc.hugetlb=0` to opt out).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re
import sys
from typing import Mapping

TUNABLE = "glibc.malloc.hugetlb=1"
THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"


def computes_on_cpu_only(environ: Mapping[str, str]) -> bool:
  """JAX_PLATFORMS names only cpu, or no TPU/GPU plugin is installed."""
  platforms = environ.get("JAX_PLATFORMS", "")
  if platforms:
    return all(p.strip() == "cpu" for p in platforms.split(","))
  return not (environ.get("TPU_LIBRARY_PATH") or importlib.util.find_spec("libtpu")
              or importlib.util.find_spec("jax_plugins") or importlib.metadata.entry_points(group="jax_plugins"))


def glibc_version() -> tuple[int, ...]:
  """(2, 36) for glibc 2.36; () for another C library or platform."""
  try:
    name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
  except (AttributeError, ValueError, OSError):
    return ()
  return tuple(int(n) for n in re.findall(r"\d+", version)) if name == "glibc" else ()


def thp_mode(path: str = THP_MODE_FILE) -> str:
  """The kernel's transparent-huge-page mode ('always', 'madvise', 'never'), '' when unknown."""
  try:
    with open(path) as f:
      chosen = re.search(r"\[(\w+)\]", f.read())
  except OSError:
    return ""
  return chosen.group(1) if chosen else ""


def wants_restart(environ: Mapping[str, str], libc: tuple[int, ...], mode: str, platform: str) -> bool:
  return (platform.startswith("linux") and libc >= (2, 35) and mode == "madvise"
          and "glibc.malloc.hugetlb" not in environ.get("GLIBC_TUNABLES", "") and computes_on_cpu_only(environ))


def restart_with_huge_pages() -> None:
  """Re-executes this process with TUNABLE added to GLIBC_TUNABLES when `wants_restart`; else returns."""
  if not wants_restart(os.environ, glibc_version(), thp_mode(), sys.platform):
    return
  env = dict(os.environ, GLIBC_TUNABLES=":".join(filter(None, [os.environ.get("GLIBC_TUNABLES"), TUNABLE])))
  sys.stdout.flush()
  sys.stderr.flush()
  try:
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
  except OSError:  # cannot re-execute (an unusual interpreter set-up): run on without
    return
