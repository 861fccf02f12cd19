"""One process of a tiny multi-host run on CPU (for test_multihost.py); prints one JSON line.

usage: python tests/multihost_run.py MODEL DATA WORKDIR METHOD single
       python tests/multihost_run.py MODEL DATA WORKDIR METHOD PROCESS_ID NUM_PROCESSES PORT

METHOD: full or lora (instruction tuning on DATA), or grpo (LoRA GRPO on the bundled preference
prompts, sampling at temperature 1, rewarded by the reward model trained in the workdir DATA, advantages
scaled by the std of the whole batch (every process's rewards),
evaluating 5 prompts greedily at steps 3 and 6).
`single`: one process with two fake CPU devices (the reference). Otherwise: one CPU device per
process, joined by jax.distributed over gloo. Either way mesh.data=2, and the run stops after 3
steps, saves a checkpoint, and a second trainer.run resumes from it to step 6.
Env MULTIHOST_HYBRID=1: two devices a process (four in `single`), mesh.data=2 x mesh.fsdp=2, and
with two processes mesh.dcn_data=2 (each process one data group, as a TPU slice would be).
"""

import json
import os
import sys

HYBRID = os.environ.get("MULTIHOST_HYBRID") == "1"
local_devices = (1 + HYBRID) * (2 if sys.argv[5] == "single" else 1)
if local_devices > 1:
  os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={local_devices}"
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402

from jaxtune import sharding, trainer  # noqa: E402
from train_helpers import losses, tiny_config  # noqa: E402


def main(model, data, workdir, method, mode, num_processes=None, port=None):
  if mode != "single":
    # CPU collectives across processes need gloo; the default CPU client has none.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    sharding.initialize_distributed(f"127.0.0.1:{port}", int(num_processes), int(mode))
  overrides = {"peft.method": method, "mesh.data": 2, "train.checkpoint_every": 3, "optimizer.learning_rate": 1e-3}
  groups = None
  if HYBRID:
    overrides.update({"mesh.fsdp": 2, "mesh.dcn_data": 1 if mode == "single" else 2})
    mesh = sharding.make_mesh(2, 2, 1, dcn_data=overrides["mesh.dcn_data"])  # as the trainer builds it
    groups = [[d.process_index for d in row] for row in mesh.devices.reshape(2, 2)]  # data x fsdp
  if method == "grpo":
    data, overrides = grpo_setup(f"{workdir}_{mode}_eval.jsonl", reward_model=data)
  config = tiny_config(model, data, **overrides)
  first = trainer.run(config, workdir, stop_after=3)
  second = trainer.run(config, workdir)  # resumes from the step-3 checkpoint
  rows = first + second
  print(json.dumps({"process_index": jax.process_index(), "process_count": jax.process_count(), "groups": groups,
                    "local_devices": jax.local_device_count(), "devices": jax.device_count(),
                    "losses": losses(rows), "steps": [r["step"] for r in rows if "loss" in r],
                    **{key: [r[key] for r in rows if key in r]
                       for key in ("tokens_seen", "grad_norm", "reward_mean", "kl", "eval_reward_mean")}}), flush=True)


def grpo_setup(eval_path: str, reward_model: str) -> tuple[str, dict]:
  """(train prompts, config overrides) of the GRPO run; writes its 5 eval prompts to eval_path."""
  folder = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "jaxtune", "data", "preference_demo")
  with open(os.path.join(folder, "eval.jsonl")) as f, open(eval_path, "w") as out:
    out.writelines(f.readlines()[:5])  # one eval batch of 8 prompts: the second process's is mostly filler
  return os.path.join(folder, "train.jsonl"), {
      "objective": "grpo", "data.format": "preference", "data.eval": eval_path, "data.seq_len": 48,
      "mesh.data": 2, "train.steps": 6, "train.batch_size": 8, "train.checkpoint_every": 3, "train.eval_every": 3,
      "grpo.group_size": 4, "grpo.max_new_tokens": 4, "grpo.reward_model": reward_model,
      "grpo.scale_rewards": "batch",  # the std of every process's rewards
      "optimizer.learning_rate": 1e-2}


if __name__ == "__main__":
  main(*sys.argv[1:])
