"""Mesh from the config, logical-axis rules -> NamedSharding, and multi-host initialisation."""

from __future__ import annotations

import glob
import math
import os
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from jaxtune.config_checks import ConfigError
from jaxtune.models import llama

# tensor last: the innermost (fastest) links. expert: the experts of MoE layers are split over it; for
# everything else it is one more data-parallel axis (the batch is split over it too).
MESH_AXES = ("data", "fsdp", "expert", "tensor")
BATCH_AXES = ("data", "fsdp", "expert")

# Logical axis -> mesh axis (MaxText-style single rules table). Unlisted logical axes replicate.
LOGICAL_RULES = {
    "vocab": "tensor",
    "embed": "fsdp",
    "q_heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "experts": "expert",
}


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> None:
  """jax.distributed.initialize: with explicit flags, or by itself on a TPU VM (multi-host)."""
  if coordinator_address:
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id)
  elif on_tpu_vm():
    jax.distributed.initialize()  # reads the slice's topology from the TPU VM metadata


def on_tpu_vm() -> bool:
  """A Cloud TPU VM: TPU device files (v4+: /dev/vfio/N, v2/v3: /dev/accelN) or its env variables."""
  return bool(os.environ.get("TPU_WORKER_HOSTNAMES") or os.environ.get("CLOUD_TPU_TASK_ID")
              or glob.glob("/dev/accel[0-9]*") or glob.glob("/dev/vfio/[0-9]*"))


def mesh_shape(data: int, fsdp: int, tensor: int, n_devices: int, expert: int = 1) -> dict[str, int]:
  """{axis: size} in MESH_AXES order: one -1 resolved to the remaining devices; the product must
  equal the device count."""
  sizes = {"data": data, "fsdp": fsdp, "expert": expert, "tensor": tensor}
  fixed = math.prod(v for v in sizes.values() if v != -1)
  for name, value in sizes.items():
    if value == -1:
      if n_devices % fixed:
        raise ConfigError(f"mesh.{name}", f"cannot fill: {n_devices} devices are not divisible by "
                          f"the other mesh axes' product {fixed}")
      sizes[name] = n_devices // fixed
  if math.prod(sizes.values()) != n_devices:
    raise ConfigError("mesh", f"{'*'.join(MESH_AXES)} = {'*'.join(str(v) for v in sizes.values())}"
                      f" = {math.prod(sizes.values())} != {n_devices} devices")
  return sizes


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices=None, expert: int = 1,
              dcn_data: int = 1) -> Mesh:
  """The run's mesh. `dcn_data` > 1 (multi-slice): the data axis is that many groups, one per TPU
  slice (or per process where devices have no slices, e.g. GPU hosts), and every other axis stays
  inside a group, on its fast links: only the data-parallel gradient reduction crosses the slow
  data-center network (jax's create_hybrid_device_mesh)."""
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(data, fsdp, tensor, len(devices), expert)
  axis_types = (AxisType.Auto,) * len(MESH_AXES)
  if dcn_data == 1:
    return jax.make_mesh(tuple(shape.values()), MESH_AXES, axis_types=axis_types, devices=devices)
  return Mesh(hybrid_device_grid(shape, dcn_data, devices), MESH_AXES, axis_types=axis_types)


def hybrid_device_grid(shape: dict[str, int], dcn_data: int, devices) -> np.ndarray:
  """`devices` as a MESH_AXES-shaped grid whose data axis is `dcn_data` groups of whole slices (by
  `slice_index`), or of whole processes when the devices do not span several slices."""
  if shape["data"] % dcn_data:
    raise ConfigError("mesh.dcn_data", f"{dcn_data} groups do not divide mesh.data={shape['data']}")
  inner = (shape["data"] // dcn_data, *list(shape.values())[1:])
  outer = (dcn_data,) + (1,) * (len(MESH_AXES) - 1)
  by_slice = len({getattr(d, "slice_index", 0) for d in devices}) > 1
  from jax.experimental import mesh_utils
  try:
    return mesh_utils.create_hybrid_device_mesh(inner, outer, devices, process_is_granule=not by_slice)
  except ValueError as e:  # the slices (processes) are not dcn_data equal groups
    raise ConfigError("mesh.dcn_data", f"{dcn_data} groups: {e}") from None


def spec_for(logical: tuple[str | None, ...], shape: tuple[int, ...], mesh: Mesh) -> P:
  """PartitionSpec from logical names; a dim the mesh axis does not divide stays replicated."""
  used, out = set(), []
  for name, dim in zip(logical, shape):
    axis = LOGICAL_RULES.get(name) if name else None
    if axis is None or axis in used or dim % mesh.shape[axis] or mesh.shape[axis] == 1:
      out.append(None)
    else:
      out.append(axis)
      used.add(axis)
  return P(*out)


def param_shardings(flat_shapes: dict[str, Any], mesh: Mesh) -> dict[str, NamedSharding]:
  """{path: NamedSharding} for a flat dict of arrays or ShapeDtypeStructs (or shape tuples)."""
  out = {}
  for path, leaf in flat_shapes.items():
    shape = tuple(leaf) if isinstance(leaf, tuple) else tuple(leaf.shape)
    out[path] = NamedSharding(mesh, spec_for(llama.logical_axes(path, len(shape)), shape, mesh))
  return out


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def batch_divisor(mesh: Mesh) -> int:
  return math.prod(mesh.shape[axis] for axis in BATCH_AXES)


def put_global(tree, shardings):
  """device_put onto (possibly multi-process) shardings.

  A process-local array (e.g. LoRA init or an RNG key computed identically on every host) goes
  through host memory: jax 0.10's device_put of a committed single-device array onto a sharding
  spanning other processes' devices builds an array whose shards cannot be read (Orbax fails).
  """
  def put(x, s):
    if jax.process_count() > 1 and isinstance(x, jax.Array) and x.is_fully_addressable:
      x = np.asarray(x)
    return jax.device_put(x, s)
  if isinstance(shardings, NamedSharding):
    return jax.tree.map(lambda x: put(x, shardings), tree)
  return jax.tree.map(put, tree, shardings)


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Builds global arrays from each process's rows of the global batch."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local_batch.items()}


def local_rows(x: jax.Array, mesh: Mesh) -> np.ndarray:
  """This process's rows of a global batch array (`global_batch`'s inverse), as numpy."""
  from jax.experimental import multihost_utils  # only multi-host runs need it
  return np.asarray(multihost_utils.global_array_to_host_local_array(x, mesh, P(BATCH_AXES)))


def all_processes(x) -> np.ndarray:
  """Every process's `x` concatenated along axis 0 in process order (x itself on one process)."""
  if jax.process_count() == 1:
    return np.asarray(x)
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(np.asarray(x), tiled=True))
