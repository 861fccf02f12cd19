"""Import of adapters saved by peft (PyTorch): LoRA (DoRA too), IA3, prefix and prompt tuning -> jaxtune
PEFT leaves."""

from __future__ import annotations

import json
import os
import re
from typing import Any

import jax.numpy as jnp
import numpy as np
from safetensors import safe_open

from jaxtune.models import llama, moe, quantization
from jaxtune.models.config import ModelConfig
from jaxtune.models.loading import flatten, unflatten
from jaxtune.peft import expert_lora, ia3, lora

_LINEARS = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
            "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp",
            "qkv_proj": "self_attn", "gate_up_proj": "mlp"}  # Phi-3's fused ones
_LEAF_OF_KEY = {key: leaf for leaf, key in lora.PEFT_KEYS.items()}
_LORA_KEY = re.compile(r"base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.("
                       + "|".join(re.escape(k) for k in _LEAF_OF_KEY) + ")")
# LoRA on the experts (peft's target_parameters; expert_lora.py): the module is the experts block
_EXPERT_LORA_KEY = re.compile(r"base_model\.model\.model\.layers\.(\d+)\.mlp\.experts\.(base_layer\.)?"
                              r"(lora_A\.weight|lora_B\.weight)")
# LoRA options whose default is the only value jaxtune's LoRA reproduces exactly.
_LORA_DEFAULTS = {"fan_in_fan_out": False, "bias": "none", "lora_bias": False,
                  "modules_to_save": None, "layers_to_transform": None, "layer_replication": None,
                  "rank_pattern": {}, "alpha_pattern": {}, "trainable_token_indices": None,
                  "use_qalora": False, "alora_invocation_tokens": None,
                  "kasa_config": None, "monteclora_config": None, "use_bdlora": None, "arrow_config": None}


class PeftImportError(ValueError):
  """The folder is not a peft adapter jaxtune can load."""


def is_peft_folder(path: str) -> bool:
  return os.path.isfile(os.path.join(path, "adapter_config.json"))


def _read(folder: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  with open(os.path.join(folder, "adapter_config.json")) as f:
    config = json.load(f)
  weights = os.path.join(folder, "adapter_model.safetensors")
  if not os.path.exists(weights):
    raise PeftImportError(f"{folder}: no adapter_model.safetensors (only peft's safetensors format is "
                          f"supported; re-save the adapter with safe_serialization=True)")
  with safe_open(weights, framework="numpy") as f:
    tensors = {k: f.get_tensor(k) for k in f.keys()}
  return config, tensors


def _check_lora_options(folder: str, config: dict[str, Any]):
  for key, default in _LORA_DEFAULTS.items():
    value = config.get(key, default)
    if value != default and not (default in ({}, None) and not value):
      raise PeftImportError(f"{folder}/adapter_config.json: {key}={value!r} is not supported "
                            f"(jaxtune's LoRA needs {key}={default!r})")


def _lora_leaves(folder: str, cfg: ModelConfig, tensors: dict[str, np.ndarray], config: dict[str, Any]
                 ) -> dict[str, np.ndarray]:
  """{'layers/self_attn/q_proj/lora_a': (L, in, r), ...} from peft's per-layer (r, in) / (out, r)
  (and DoRA's magnitudes, (out,) per layer)."""
  per_layer: dict[str, dict[int, np.ndarray]] = {}
  experts = _expert_names(folder, cfg, config)
  for key, t in sorted(tensors.items()):
    e = _EXPERT_LORA_KEY.fullmatch(key)
    if e and experts:
      layer, nested, leaf = int(e.group(1)), bool(e.group(2)), _LEAF_OF_KEY[e.group(3)]
      name = next(n for n in experts if expert_lora.peft_module(experts, n, layer).endswith(
          "base_layer." if nested else "experts."))
      per_layer.setdefault(f"layers/mlp/expert_lora/{name}/{leaf}", {})[layer] = expert_lora.from_peft(
          leaf, t, cfg.num_experts)
      continue
    m = _LORA_KEY.fullmatch(key)
    if not m or _LINEARS.get(m.group(3)) != m.group(2):
      raise PeftImportError(f"{folder}: adapter tensor {key!r} is not a LoRA matrix of a decoder-layer "
                            f"projection ({', '.join(_LINEARS)}), which is all jaxtune's LoRA covers")
    layer, parent, module, leaf = int(m.group(1)), m.group(2), m.group(3), _LEAF_OF_KEY[m.group(4)]
    path = f"layers/{parent}/{module}/{leaf}"
    per_layer.setdefault(path, {})[layer] = t.T  # peft stores (r, in) and (out, r); .T keeps 1-d as is
  return _stack_layers(folder, cfg, per_layer)


def _expert_names(folder: str, cfg: ModelConfig, config: dict[str, Any]) -> list[str]:
  """The expert matrices an adapter's target_parameters name (expert_lora.PEFT_PARAMETERS)."""
  wanted = config.get("target_parameters") or []
  known = {p: name for name, p in expert_lora.PEFT_PARAMETERS.items()}
  unknown = [p for p in wanted if p not in known]
  if unknown:
    raise PeftImportError(f"{folder}/adapter_config.json: target_parameters {unknown} are not supported "
                          f"(jaxtune's LoRA on experts covers {', '.join(known)})")
  if wanted and not cfg.num_experts:
    raise PeftImportError(f"{folder}/adapter_config.json: target_parameters {wanted} but the model has no experts")
  return [name for name in expert_lora.PEFT_PARAMETERS if expert_lora.PEFT_PARAMETERS[name] in wanted]


def _stack_layers(folder: str, cfg: ModelConfig, per_layer: dict[str, dict[int, np.ndarray]]) -> dict[str, np.ndarray]:
  """{path: {layer: array}} -> {path: L x ...} float32; every layer must be there (the layers are scanned)."""
  leaves = {}
  for path, layers in per_layer.items():
    if sorted(layers) != list(range(cfg.num_layers)):
      raise PeftImportError(f"{folder}: {path} covers layers {sorted(layers)}, jaxtune needs the adapter on "
                            f"all {cfg.num_layers} layers of a targeted projection")
    leaves[path] = np.stack([layers[i] for i in range(cfg.num_layers)]).astype(np.float32)
  return leaves


def _check_shapes(folder: str, base: dict[str, Any], leaves: dict[str, np.ndarray]):
  for path, leaf in leaves.items():
    if moe.is_expert_lora_leaf(path):
      _check_expert_shape(folder, base, path, leaf)
      continue
    kernel = quantization.kernel_shape(lora.linear_at(base, path.rsplit("/", 1)[0]))
    expected = kernel[1] if path.endswith(("lora_a", "ia3_in")) else kernel[2]  # the input or output size
    got = leaf.shape[2] if path.endswith("lora_b") else leaf.shape[1]
    if got != expected:
      raise PeftImportError(f"{folder}: {path} has size {got} where the model's kernel {kernel} "
                            f"needs {expected} (adapter made for another base model?)")


def _check_expert_shape(folder: str, base: dict[str, Any], path: str, leaf: np.ndarray):
  """An expert LoRA leaf (L x E x in x r or L x E x r x out) against the experts' L x E x D x F."""
  L, E, D, F = base["layers/mlp/experts/gate_proj"].shape
  name, kind = path.split("/")[-2:]
  n_in, n_out = (D, 2 * F) if name == "gate_up_proj" else (F, D)
  got = (leaf.shape[:2], leaf.shape[2] if kind == "lora_a" else leaf.shape[3])
  if got != ((L, E), n_in if kind == "lora_a" else n_out):
    raise PeftImportError(f"{folder}: {path} has shape {leaf.shape}, which does not fit {E} experts of "
                          f"{n_in} x {n_out} (adapter made for another base model?)")


def _load_lora(params, cfg, folder, config, tensors):
  _check_lora_options(folder, config)
  leaves = _lora_leaves(folder, cfg, tensors, config)
  if not leaves:
    raise PeftImportError(f"{folder}: adapter_model.safetensors holds no LoRA tensors")
  missing = sorted(p for p in leaves if p.endswith("/lora_a") and config.get("use_dora")
                   and p.replace("/lora_a", "/lora_magnitude") not in leaves)
  if missing:
    raise PeftImportError(f"{folder}: use_dora=true but {missing[0]} has no lora_magnitude_vector")
  flat = flatten(params)
  _check_shapes(folder, flat, leaves)
  flat.update({p: jnp.asarray(v) for p, v in leaves.items()})
  scale = lora.lora_scale(int(config["r"]), float(config["lora_alpha"]), bool(config.get("use_rslora")))
  return unflatten(flat), llama.PeftRuntime(lora_scale=scale, lora_dropout=float(config.get("lora_dropout", 0.0)))


_IA3_KEY = re.compile(r"base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\." + ia3.PEFT_KEY)


def _load_ia3(params, cfg, folder, config, tensors):
  """peft's per-layer ia3_l: (out, 1) scales a layer's output, (1, in) its input (a feed-forward module)."""
  for key in ("fan_in_fan_out", "modules_to_save"):
    if config.get(key):
      raise PeftImportError(f"{folder}/adapter_config.json: {key}={config[key]!r} is not supported")
  per_layer: dict[str, dict[int, np.ndarray]] = {}
  for key, t in sorted(tensors.items()):
    m = _IA3_KEY.fullmatch(key)
    if not m or _LINEARS.get(m.group(3)) != m.group(2) or t.ndim != 2 or 1 not in t.shape:
      raise PeftImportError(f"{folder}: adapter tensor {key!r} is not an IA3 vector of a decoder-layer "
                            f"projection ({', '.join(_LINEARS)}), which is all jaxtune's IA3 covers")
    leaf = "ia3_in" if t.shape[0] == 1 else "ia3_out"
    per_layer.setdefault(f"layers/{m.group(2)}/{m.group(3)}/{leaf}", {})[int(m.group(1))] = t.reshape(-1)
  leaves = _stack_layers(folder, cfg, per_layer)
  if not leaves:
    raise PeftImportError(f"{folder}: adapter_model.safetensors holds no IA3 tensors")
  flat = flatten(params)
  _check_shapes(folder, flat, leaves)
  flat.update({p: jnp.asarray(v) for p, v in leaves.items()})
  return unflatten(flat), llama.PeftRuntime()


def _check_virtual_tokens(folder, config, tensors, expected: dict[str, int]):
  """A prompt-learning adapter (prefix or prompt tuning): its config fits the model, its tensor is there."""
  for key, value in expected.items():
    if config.get(key) != value:
      raise PeftImportError(f"{folder}/adapter_config.json: {key}={config.get(key)!r} but the model "
                            f"needs {value}")
  if "prompt_embeddings" not in tensors:
    raise PeftImportError(f"{folder}: adapter_model.safetensors has no 'prompt_embeddings' tensor")


def _load_prompt(params, cfg, folder, config, tensors):
  _check_virtual_tokens(folder, config, tensors, {"token_dim": cfg.hidden_size, "num_transformer_submodules": 1})
  return {**params, "prompt_embeddings": jnp.asarray(tensors["prompt_embeddings"], jnp.float32)}, llama.PeftRuntime()


def _load_prefix(params, cfg, folder, config, tensors):
  from jaxtune.peft import prefix  # only prefix adapters need it
  # peft saves the prefix itself (the projection MLP's output when prefix_projection=true).
  _check_virtual_tokens(folder, config, tensors, {"num_layers": cfg.num_layers, "token_dim": cfg.kv_size,
                                                  "num_attention_heads": cfg.num_kv_heads,
                                                  "num_transformer_submodules": 1})
  prefix_k, prefix_v = prefix.prefix_from_peft(jnp.asarray(tensors["prompt_embeddings"], jnp.float32), cfg)
  flat = flatten(params)
  flat.update({"layers/self_attn/prefix_k": prefix_k, "layers/self_attn/prefix_v": prefix_v})
  return unflatten(flat), llama.PeftRuntime()


def load_peft_adapter(params: llama.Params, cfg: ModelConfig, folder: str) -> tuple[llama.Params, llama.PeftRuntime]:
  """Base params + the peft adapter in `folder` (LoRA, IA3, prefix or prompt tuning) -> (params, PeftRuntime)."""
  if not is_peft_folder(folder):
    raise PeftImportError(f"{folder}: no adapter_config.json (not a peft adapter folder)")
  config, tensors = _read(folder)
  peft_type = config.get("peft_type")
  if peft_type == "LORA":
    return _load_lora(params, cfg, folder, config, tensors)
  if peft_type == "IA3":
    return _load_ia3(params, cfg, folder, config, tensors)
  if peft_type == "PREFIX_TUNING":
    return _load_prefix(params, cfg, folder, config, tensors)
  if peft_type == "PROMPT_TUNING":
    return _load_prompt(params, cfg, folder, config, tensors)
  raise PeftImportError(f"{folder}/adapter_config.json: peft_type={peft_type!r} is not supported "
                        f"(supported: LORA, IA3, PREFIX_TUNING, PROMPT_TUNING)")
