"""Load Hugging Face weights (safetensors folders, GGUF files) into jaxtune params, without torch.

Weights are streamed leaf by leaf, so the host never holds a second full copy of the model. A leaf
with a sharding is built shard by shard: each distinct device slice is read on the host (only that
slice of each checkpoint tensor), put on the devices that hold it and released before the next, so
the host's transient copy is one slice, not the stacked leaf, and each process of a multi-host run
reads only its own devices' slices. A leaf without one is assembled whole in the target dtype.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open

from jaxtune.models import llama, moe, quantization
from jaxtune.models.config import ModelConfig, config_from_hf, read_hf_config

# get(HF tensor name, index=None): the tensor in HF layout, or only `index` (a tuple of slices) of it
TensorGetter = Callable[..., np.ndarray]
Index = tuple[slice, ...]
Bounds = tuple[tuple[int, int], ...]  # (start, stop) along each axis of a leaf


def hf_name_of(path: str, layer: int | None) -> str:
  """Hugging Face tensor name of a jaxtune base-param path ('/'-joined)."""
  if path == "embed_tokens":
    return "model.embed_tokens.weight"
  if path == "norm":
    return "model.norm.weight"
  if path == "lm_head/kernel":
    return "lm_head.weight"
  parts = path.split("/")[1:]  # drop "layers"
  leaf = parts[-1]
  suffix = {"kernel": "weight", "bias": "bias"}.get(leaf)
  if suffix is None:  # a norm weight: layers/input_layernorm
    return f"model.layers.{layer}.{'.'.join(parts)}.weight"
  return f"model.layers.{layer}.{'.'.join(parts[:-1])}.{suffix}"


def is_transposed(path: str) -> bool:
  """HF stores Linear weights out x in; jaxtune stores kernels in x out."""
  return path.endswith("kernel")


def safetensors_getter(folder: str) -> tuple[TensorGetter, dict[str, tuple[int, ...]]]:
  """A lazy tensor reader over a folder's single or sharded (`*.index.json`) safetensors, and every
  tensor's shape (read from the file headers)."""
  index_path = os.path.join(folder, "model.safetensors.index.json")
  if os.path.exists(index_path):
    with open(index_path) as f:
      files = sorted(set(json.load(f)["weight_map"].values()))
  else:
    files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
    if not files:
      raise FileNotFoundError(f"{folder}: no *.safetensors files (is this a Hugging Face model folder?)")
  weight_map, shapes = {}, {}
  for fname in files:
    with safe_open(os.path.join(folder, fname), framework="numpy") as f:
      for name in f.keys():
        weight_map[name], shapes[name] = fname, tuple(f.get_slice(name).get_shape())

  def get(name: str, index: Index | None = None) -> np.ndarray:
    if name not in weight_map:
      raise KeyError(f"{folder}: tensor {name!r} not found in the checkpoint")
    # Opened per tensor: a handle memory-maps its whole file, and the pages read through a handle
    # kept open would stay in this process's resident set until the end of the load (a second
    # copy of the model in RSS). Reopening costs a header parse, ~0.1 ms.
    with safe_open(os.path.join(folder, weight_map[name]), framework="numpy") as f:
      return f.get_tensor(name) if index is None else f.get_slice(name)[index]

  return get, shapes


def _host_block(cfg: ModelConfig, path: str, shape: tuple[int, ...], get: TensorGetter, dtype,
                bounds: Bounds | None = None, tensor_shapes: dict[str, tuple[int, ...]] | None = None) -> np.ndarray:
  """The leaf `path` in jaxtune's layout and `dtype`, or only its `bounds` (one device's shard),
  from the checkpoint's tensors (HF layout: Linear weights out x in, one tensor per layer and
  expert). With `tensor_shapes` (the checkpoint's) each tensor's shape is checked there and only
  the block's slice of it is read; without, whole tensors are read, checked and sliced."""
  bounds = bounds or tuple((0, n) for n in shape)
  per_expert = moe.is_expert_leaf(path) or moe.is_router_leaf(path)  # L [x E] x in x out
  stack_dims = len(shape) - 2 if per_expert else int(path.startswith("layers/"))
  transposed = per_expert or is_transposed(path)
  within = [slice(a, b) for a, b in bounds[stack_dims:]]
  tensor_index, tensor_shape = tuple(within), tuple(shape[stack_dims:])
  if transposed:
    tensor_index, tensor_shape = tensor_index[::-1], tensor_shape[::-1]
  out = np.empty([b - a for a, b in bounds], jnp.dtype(dtype))
  for position in np.ndindex(*out.shape[:stack_dims]):
    at = tuple(a + i for (a, _), i in zip(bounds, position))
    if per_expert:
      name = moe.hf_name(cfg.model_type, path, at[0] if len(at) == 1 else at)
    else:
      name = hf_name_of(path, at[0] if stack_dims else None)
    whole = None if tensor_shapes is not None and name in tensor_shapes else np.asarray(get(name))
    found = tensor_shapes[name] if whole is None else whole.shape
    if tuple(found) != tensor_shape:
      raise ValueError(f"tensor {name}: shape {tuple(found)} != expected {tensor_shape} (for {path})")
    t = np.asarray(get(name, tensor_index)) if whole is None else whole[tensor_index]
    out[position] = (t.T if transposed else t).astype(out.dtype)
  return out


def _sharded_leaf(shape: tuple[int, ...], sharding: jax.sharding.Sharding, block: Callable[[Bounds], np.ndarray]):
  """A global array from `block(bounds)`, read once per distinct shard of this process's devices
  and put on those devices before the next shard is read."""
  devices_of = {}
  for device, index in sharding.addressable_devices_indices_map(shape).items():
    bounds = tuple(s.indices(n)[:2] for s, n in zip(index, shape))
    devices_of.setdefault(bounds, []).append(device)
  arrays = []
  for bounds, devices in devices_of.items():
    host = block(bounds)
    arrays += [jax.device_put(host, device) for device in devices]
    del host
  return jax.make_array_from_single_device_arrays(shape, sharding, arrays)


def _host_quantized_leaves(cfg: ModelConfig, path: str, shape: tuple[int, ...], get: TensorGetter, dtype,
                           quantize: str) -> dict[str, np.ndarray]:
  """A stacked kernel's 4-bit leaves (quantization.py), quantized layer by layer from the checkpoint's
  out x in tensors, as read in `dtype` (what torch would hold after `from_pretrained(torch_dtype=)`)."""
  *_, n_in, n_out = shape

  def layer(i: int) -> np.ndarray:
    t = np.asarray(get(hf_name_of(path, i)))
    if t.shape != (n_out, n_in):
      raise ValueError(f"tensor {hf_name_of(path, i)}: shape {t.shape} != expected {(n_out, n_in)}")
    return t.astype(jnp.dtype(dtype))

  return quantization.quantized_leaves(path, (layer(i) for i in range(cfg.num_layers)), quantize)


def quantize_params(params: llama.Params, quantize: str = "nf4") -> llama.Params:
  """Base params already in memory with their decoder layers' kernels as 4-bit leaves (what
  `load_model(quantize=...)` builds while reading; for params made some other way)."""
  flat = flatten(params)
  for path in [p for p in flat if quantization.is_quantizable(p)]:
    leaves = quantization.quantized_leaves(path, (layer.T for layer in np.asarray(flat.pop(path))), quantize)
    flat.update({name: jnp.asarray(leaf) for name, leaf in leaves.items()})
  return unflatten(flat)


def params_from_tensors(
    cfg: ModelConfig,
    get: TensorGetter,
    dtype=jnp.float32,
    shardings: dict[str, jax.sharding.Sharding] | None = None,
    progress: Callable[[str], None] | None = None,
    quantize: str = "",
    tensor_shapes: dict[str, tuple[int, ...]] | None = None,
) -> llama.Params:
  """Builds the base params tree, one leaf at a time, placed with `shardings[path]` if given.

  `tensor_shapes` (the checkpoint's, from `safetensors_getter`; `get` then takes an index): a leaf
  with a sharding is read shard by shard, only the slices this process's devices hold.
  `quantize` (a model.quantize choice, e.g. "nf4"): the decoder layers' kernels are stored as 4-bit
  codes and scales instead (quantization.py), quantized whole per layer; `shardings` then names
  those leaves."""
  shapes = llama.param_shapes(cfg)
  flat = flatten(shapes, is_leaf=lambda x: isinstance(x, tuple))
  bar = None
  if progress is None:
    bar, progress = _progress_bar(flat, dtype)
  def placed(leaves: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """Host leaves on their devices (the host copies go when the caller drops the dict)."""
    sharding_of = shardings or {}
    return {name: jax.device_put(host, sharding_of[name]) if sharding_of.get(name) is not None else jnp.asarray(host)
            for name, host in leaves.items()}

  out = {}
  for path, shape in flat.items():
    sharding = shardings.get(path) if shardings else None
    if quantize and quantization.is_quantizable(path):
      out.update(placed(_host_quantized_leaves(cfg, path, shape, get, dtype, quantize)))
    elif sharding is not None and tensor_shapes is not None:
      out[path] = _sharded_leaf(tuple(shape), sharding,
                                lambda bounds: _host_block(cfg, path, shape, get, dtype, bounds, tensor_shapes))
    else:
      out.update(placed({path: _host_block(cfg, path, shape, get, dtype)}))
    if progress:
      progress(path)
  if bar is not None:
    bar.close()
  return unflatten(out)


PROGRESS_MIN_BYTES = 2 << 30  # a smaller model loads in seconds: no bar


def _progress_bar(flat_shapes: dict[str, tuple[int, ...]], dtype):
  """(a tqdm bar of the bytes loaded, its per-leaf callback) on process 0 for a model of at least
  PROGRESS_MIN_BYTES in `dtype`; else (None, None)."""
  itemsize = jnp.dtype(dtype).itemsize
  sizes = {path: int(np.prod(shape)) * itemsize for path, shape in flat_shapes.items()}
  if sum(sizes.values()) < PROGRESS_MIN_BYTES or jax.process_index() != 0:
    return None, None
  from tqdm import tqdm
  bar = tqdm(total=sum(sizes.values()), desc="loading weights", unit="B", unit_scale=True, mininterval=2.0)
  return bar, lambda path: bar.update(sizes[path])


def flatten(tree: dict, is_leaf=None) -> dict[str, Any]:
  """{'a': {'b': x}} -> {'a/b': x}."""
  pairs = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]
  return {jax.tree_util.keystr(p, simple=True, separator="/"): v for p, v in pairs}


def unflatten(flat: dict[str, Any]) -> dict:
  tree: dict = {}
  for path, value in flat.items():
    node = tree
    *parents, last = path.split("/")
    for key in parents:
      node = node.setdefault(key, {})
    node[last] = value
  return tree


def load_hf_folder(folder: str, dtype=jnp.float32, shardings=None, quantize: str = ""
                   ) -> tuple[ModelConfig, llama.Params]:
  cfg = config_from_hf(read_hf_config(folder))
  get, tensor_shapes = safetensors_getter(folder)
  return cfg, params_from_tensors(cfg, get, dtype, shardings, quantize=quantize, tensor_shapes=tensor_shapes)


def model_path_problem(path: str) -> str:
  """Why `path` is no model to load ("" when it is one: a .gguf file or a folder with config.json)."""
  if path.endswith(".gguf"):
    return "" if os.path.isfile(path) else f"GGUF file {path!r} not found"
  if not os.path.isdir(path):
    return f"model path {path!r} is neither a Hugging Face folder nor a .gguf file"
  if not os.path.isfile(os.path.join(path, "config.json")):
    return f"model folder {path!r} has no config.json"
  return ""


def load_model(path: str, dtype=jnp.float32, shardings=None, quantize: str = ""
               ) -> tuple[ModelConfig, llama.Params]:
  """A Hugging Face folder or a .gguf file -> (config, params); `quantize="nf4"` (or another
  model.quantize choice) stores the decoder layers' kernels in 4 bits (quantization.py)."""
  if problem := model_path_problem(path):
    raise FileNotFoundError(problem)
  if path.endswith(".gguf"):
    from jaxtune.models import gguf_loading  # gguf reading is only needed for .gguf files
    hf_config, get = gguf_loading.gguf_tensors(path)
    cfg = config_from_hf(hf_config)
    return cfg, params_from_tensors(cfg, get, dtype, shardings, quantize=quantize)
  return load_hf_folder(path, dtype, shardings, quantize)


def load_tokenizer(path: str):
  """transformers tokenizer from a HF folder, or converted from a .gguf file (eos checked)."""
  if path.endswith(".gguf"):
    from jaxtune.models import gguf_loading
    return gguf_loading.gguf_tokenizer(path)
  from transformers import AutoTokenizer
  return AutoTokenizer.from_pretrained(path)


def model_config_of(path: str) -> ModelConfig:
  if path.endswith(".gguf"):
    from jaxtune.models import gguf_loading
    return config_from_hf(gguf_loading.gguf_tensors(path)[0])
  return config_from_hf(read_hf_config(path))


