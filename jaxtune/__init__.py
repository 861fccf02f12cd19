"""jaxtune: fine-tuning of Llama-family models in JAX (see README.md)."""

import os


def _cpu_collectives_in_program_order() -> None:
  """A fake multi-device CPU mesh (JAX_NUM_CPU_DEVICES=N, or the older
  XLA_FLAGS=--xla_force_host_platform_device_count=N) compiles with XLA:CPU's default scheduler
  instead of its concurrency-optimised one, which let the devices of a 2x2x2 mesh reach their
  collectives in different orders and hang: prompt tuning's step deadlocked in 10 of 14 runs, in 0
  of 18 with this flag. Must run before JAX creates its CPU client; an explicit setting of the flag
  wins."""
  flags = os.environ.get("XLA_FLAGS", "")
  fake_devices = ("xla_force_host_platform_device_count" in flags
                  or os.environ.get("JAX_NUM_CPU_DEVICES", "").strip() not in ("", "-1", "0", "1"))
  if fake_devices and "concurrency_optimized_scheduler" not in flags:
    os.environ["XLA_FLAGS"] = flags + " --xla_cpu_enable_concurrency_optimized_scheduler=false"


_cpu_collectives_in_program_order()
