"""Orbax checkpoints of the training state: trainable params, optimizer state, step, RNG, data position.

For PEFT the frozen base is not saved: config.json names it (model.path) and it is reloaded.
Orbax writes each step to a temporary folder and renames it when complete, so a crash mid-save
never leaves a checkpoint that `latest_step` would pick.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


class CheckpointMismatchError(ValueError):
  """The checkpoint in the workdir does not fit the model/config being run."""


def checkpoint_dir(workdir: str) -> str:
  """WORKDIR/checkpoints: a local workdir made absolute (as Orbax wants), a gs:// one as it is."""
  return os.path.join(workdir if "://" in workdir else os.path.abspath(workdir), "checkpoints")


def make_manager(workdir: str, keep: int = 3, async_save: bool = True) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                         enable_async_checkpointing=async_save)
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options)


def save(manager: ocp.CheckpointManager, step: int, state: dict[str, Any], meta: dict[str, Any],
         force: bool = False) -> bool:
  """Saves {trainable, opt_state, rng} arrays plus JSON meta (step, data position, shapes)."""
  shapes = {p: list(v.shape) for p, v in state["trainable"].items()}
  meta = dict(meta, step=int(step), trainable_shapes=shapes)
  return manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                    meta=ocp.args.JsonSave(meta)), force=force)


def restore_meta(manager: ocp.CheckpointManager, step: int) -> dict[str, Any]:
  return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]


def check_fits(meta: dict[str, Any], trainable: dict[str, Any], where: str) -> None:
  """One clear error naming the first param whose saved shape differs from the model's."""
  saved = meta.get("trainable_shapes", {})
  for path in sorted(set(saved) | set(trainable)):
    want = list(trainable[path].shape) if path in trainable else None
    if saved.get(path) != want:
      raise CheckpointMismatchError(
          f"{where}: checkpoint param {path!r} has shape {saved.get(path)} but the model needs "
          f"{want} (a different model or PEFT config?); nothing was overwritten")


def restore(manager: ocp.CheckpointManager, step: int, target: dict[str, Any]) -> tuple[dict, dict]:
  """Restores onto `target`'s shapes/dtypes/shardings (any mesh); returns (state, meta).

  A target leaf without a sharding (e.g. from jax.eval_shape) lands on this process's first device,
  not where the saving run had it (another process's device, in a multi-host run)."""
  meta = restore_meta(manager, step)
  check_fits(meta, target["trainable"], f"{manager.directory}/{step}")
  local = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None) or local), target)
  out = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
  return out["state"], meta
