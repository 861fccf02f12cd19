"""Load Hugging Face weights (safetensors folders, GGUF files) into jaxtune params, without torch.

Weights are streamed leaf by leaf: each stacked leaf is assembled on the host in the target dtype,
placed on its devices (with its sharding, when given) and released before the next one, so the
host never holds a second full copy of the model.
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

TensorGetter = Callable[[str], np.ndarray]


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


def safetensors_getter(folder: str) -> tuple[TensorGetter, list[str]]:
  """A lazy tensor reader over a folder's single or sharded (`*.index.json`) safetensors."""
  index_path = os.path.join(folder, "model.safetensors.index.json")
  if os.path.exists(index_path):
    with open(index_path) as f:
      weight_map = json.load(f)["weight_map"]
  else:
    files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
    if not files:
      raise FileNotFoundError(f"{folder}: no *.safetensors files (is this a Hugging Face model folder?)")
    weight_map = {}
    for fname in files:
      with safe_open(os.path.join(folder, fname), framework="numpy") as f:
        weight_map.update({k: fname for k in f.keys()})

  def get(name: str) -> np.ndarray:
    if name not in weight_map:
      raise KeyError(f"{folder}: tensor {name!r} not found in the checkpoint")
    # Opened per tensor: a handle memory-maps its whole file, and the pages read through a handle
    # kept open would stay in this process's resident set until the end of the load (a second
    # copy of the model in RSS). Reopening costs a header parse, ~0.1 ms.
    with safe_open(os.path.join(folder, weight_map[name]), framework="numpy") as f:
      return f.get_tensor(name)

  return get, list(weight_map)


def _host_leaf(cfg: ModelConfig, path: str, shape: tuple[int, ...], get: TensorGetter, dtype) -> np.ndarray:
  np_dtype = jnp.dtype(dtype)
  if moe.is_expert_leaf(path) or moe.is_router_leaf(path):  # out x in tensors per (layer[, expert])
    out = np.empty(shape, np_dtype)
    for index in np.ndindex(*shape[:-2]):
      out[index] = np.asarray(get(moe.hf_name(cfg.model_type, path, index[0] if len(index) == 1 else index))).T
    return out
  if path.startswith("layers/"):
    out = np.empty(shape, np_dtype)
    for i in range(cfg.num_layers):
      t = np.asarray(get(hf_name_of(path, i)))
      out[i] = (t.T if is_transposed(path) else t).astype(np_dtype)
    return out
  t = np.asarray(get(hf_name_of(path, None)))
  t = t.T if is_transposed(path) else t
  if t.shape != tuple(shape):
    raise ValueError(f"tensor {hf_name_of(path, None)}: shape {t.shape} != expected {tuple(shape)}")
  return t.astype(np_dtype)


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
) -> llama.Params:
  """Builds the base params tree, one leaf at a time, placed with `shardings[path]` if given.

  `quantize` (a model.quantize choice, e.g. "nf4"): the decoder layers' kernels are stored as 4-bit
  codes and scales instead (quantization.py); `shardings` then names those leaves."""
  shapes = llama.param_shapes(cfg)
  flat = flatten(shapes, is_leaf=lambda x: isinstance(x, tuple))
  out = {}
  for path, shape in flat.items():
    if quantize and quantization.is_quantizable(path):
      leaves = _host_quantized_leaves(cfg, path, shape, get, dtype, quantize)
    else:
      leaves = {path: _host_leaf(cfg, path, shape, get, dtype)}
      if leaves[path].shape != tuple(shape):
        raise ValueError(f"{path}: checkpoint shape {leaves[path].shape} != model shape {tuple(shape)}")
    for name, host in leaves.items():
      sharding = shardings.get(name) if shardings else None
      out[name] = jax.device_put(host, sharding) if sharding is not None else jnp.asarray(host)
    del leaves
    if progress:
      progress(path)
  return unflatten(out)


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
  get, _ = safetensors_getter(folder)
  return cfg, params_from_tensors(cfg, get, dtype, shardings, quantize=quantize)


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


