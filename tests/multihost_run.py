"""One process of a tiny multi-host run on CPU (for test_multihost.py); prints one JSON line.

usage: python tests/multihost_run.py MODEL DATA WORKDIR METHOD single
       python tests/multihost_run.py MODEL DATA WORKDIR METHOD PROCESS_ID NUM_PROCESSES PORT

`single`: one process with two fake CPU devices (the reference). Otherwise: one CPU device per
process, joined by jax.distributed over gloo. Either way mesh.data=2, and the run stops after 3
steps, saves a checkpoint, and a second trainer.run resumes from it to step 6.
"""

import json
import os
import sys

if sys.argv[5] == "single":
  os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402

from jaxtune import sharding, trainer  # noqa: E402
from train_helpers import losses, tiny_config  # noqa: E402


def main(model, data, workdir, method, mode, num_processes=None, port=None):
  if mode != "single":
    # CPU collectives across processes need gloo; the default CPU client has none.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    sharding.initialize_distributed(f"127.0.0.1:{port}", int(num_processes), int(mode))
  config = tiny_config(model, data, **{"peft.method": method, "mesh.data": 2,
                                       "train.checkpoint_every": 3, "optimizer.learning_rate": 1e-3})
  first = trainer.run(config, workdir, stop_after=3)
  second = trainer.run(config, workdir)  # resumes from the step-3 checkpoint
  print(json.dumps({"process_index": jax.process_index(), "process_count": jax.process_count(),
                    "local_devices": jax.local_device_count(), "devices": jax.device_count(),
                    "losses": losses(first) + losses(second),
                    "tokens_seen": [r["tokens_seen"] for r in first + second if "loss" in r],
                    "steps": [r["step"] for r in first + second]}), flush=True)


if __name__ == "__main__":
  main(*sys.argv[1:])
