"""Export: a merged Hugging Face folder (transformers loads it), a PEFT adapter folder (peft loads it),
or a llama.cpp GGUF file (the merged folder converted by gguf_export).

A reward model (objective=reward) exports as the family's *ForSequenceClassification with one label:
its scalar head becomes `score.weight`, read at the last token that is not pad_token_id.

Both writers stream: tensors are produced one param leaf at a time (LoRA folded into its kernel on
device, then fetched to the host, gathered across hosts when sharded) and written straight into
safetensors files whose headers are planned from the shapes up front, so the host never holds more
than one leaf. Every process takes part in the gathers; only process 0 writes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import struct
from typing import Any, Callable, Iterable, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxtune import gguf_export
from jaxtune.models import llama, moe
from jaxtune.models.config import CAUSAL_LM_CLASSES, ModelConfig
from jaxtune.models.loading import flatten, hf_name_of
from jaxtune.peft import expert_lora, ia3, lora, partition

DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3  # transformers' default max_shard_size
_SAFETENSORS_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}


class ExportError(ValueError):
  """The trained model cannot be written in the requested format."""


# ----------------------------------------------------------------------------- safetensors streaming


@dataclasses.dataclass(frozen=True)
class TensorSpec:
  """One tensor of the output: its name and shape, and where it comes from (leaf path, layer)."""

  name: str
  shape: tuple[int, ...]
  path: str
  layer: int | tuple[int, int] | None  # (layer, expert) for an MoE expert's tensor
  transpose: bool


def _is_main() -> bool:
  return jax.process_index() == 0


def to_host(x) -> np.ndarray:
  """A (possibly sharded, possibly multi-host) array as one numpy array; all processes must call it."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils  # only multi-host runs need it
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def _header(specs: list[TensorSpec], dtype: str, metadata: dict[str, str]) -> bytes:
  """The safetensors header: 8-byte length + JSON (names, dtypes, shapes, offsets) padded to 8 bytes."""
  itemsize = jnp.dtype(dtype).itemsize
  entries: dict[str, Any] = {"__metadata__": metadata}
  offset = 0
  for s in specs:
    n = int(np.prod(s.shape)) * itemsize
    entries[s.name] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": list(s.shape),
                       "data_offsets": [offset, offset + n]}
    offset += n
  text = json.dumps(entries, separators=(",", ":")).encode()
  text += b" " * (-len(text) % 8)
  return struct.pack("<Q", len(text)) + text


def _plan_shards(specs: list[TensorSpec], dtype: str, max_shard_bytes: int) -> list[list[TensorSpec]]:
  """Consecutive groups of tensors, each at most max_shard_bytes (unless one tensor is larger)."""
  itemsize = jnp.dtype(dtype).itemsize
  shards: list[list[TensorSpec]] = [[]]
  size = 0
  for s in specs:
    n = int(np.prod(s.shape)) * itemsize
    if shards[-1] and size + n > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(s)
    size += n
  return shards


def write_safetensors(out_dir: str, stem: str, specs: list[TensorSpec],
                      tensors: Iterable[np.ndarray], dtype: str,
                      max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> list[str]:
  """Writes `tensors` (in `specs` order) as STEM.safetensors, or shards + STEM.safetensors.index.json.

  Non-main processes consume the iterator (it may run collectives) and write nothing.
  Returns the file names written.
  """
  if dtype not in _SAFETENSORS_DTYPES:
    raise ExportError(f"dtype {dtype!r} is not one of {', '.join(_SAFETENSORS_DTYPES)}")
  shards = _plan_shards(specs, dtype, max_shard_bytes)
  n = len(shards)
  names = [f"{stem}.safetensors"] if n == 1 else [
      f"{stem}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
  it = iter(tensors)
  for fname, shard in zip(names, shards):
    f = open(os.path.join(out_dir, fname), "wb") if _is_main() else None
    header = _header(shard, dtype, {"format": "pt"})
    if f:
      f.write(header)
    for spec in shard:
      t = next(it)
      if tuple(t.shape) != spec.shape:
        raise ExportError(f"{spec.name}: produced shape {t.shape} != planned {spec.shape}")
      if f:
        f.write(np.ascontiguousarray(t.astype(jnp.dtype(dtype))).tobytes())
    if f:
      f.close()
  if n > 1 and _is_main():
    itemsize = jnp.dtype(dtype).itemsize
    index = {"metadata": {"total_size": sum(int(np.prod(s.shape)) * itemsize for s in specs)},
             "weight_map": {s.name: fname for fname, shard in zip(names, shards) for s in shard}}
    with open(os.path.join(out_dir, f"{stem}.safetensors.index.json"), "w") as f:
      json.dump(index, f, indent=2)
  return names


def tensor_specs(flat: Mapping[str, Any], name_of: Callable[[str, int | None], str]) -> list[TensorSpec]:
  """One spec per HF tensor: stacked `layers/...` leaves give one tensor per layer.

  Kernels and LoRA matrices are stored in x out in jaxtune and out x in (Linear.weight) in HF.
  """
  specs = []
  for path, leaf in flat.items():
    experts = moe.is_expert_leaf(path)  # L x E x in x out: one tensor per layer and expert
    transpose = experts or path.split("/")[-1] in ("kernel", "lora_a", "lora_b")  # not lora_magnitude (1-d)
    lead = 2 if experts else 1 if path.startswith("layers/") else 0
    shape = tuple(leaf.shape[lead:])
    shape = shape[::-1] if transpose else shape
    for index in (np.ndindex(*leaf.shape[:lead]) if lead else [None]):
      layer = index if index is None or len(index) > 1 else index[0]
      specs.append(TensorSpec(name_of(path, layer), shape, path, layer, transpose))
  return specs


def stream_tensors(specs: list[TensorSpec], fetch: Callable[[str], np.ndarray]) -> Iterator[np.ndarray]:
  """Host tensors in `specs` order; each leaf is fetched once (specs are grouped by leaf)."""
  path, host = None, None
  for s in specs:
    if s.path != path:
      path, host = s.path, None  # release the previous leaf before fetching the next
      host = fetch(path)
    t = host if s.layer is None else host[s.layer]
    yield t.T if s.transpose else t


# ----------------------------------------------------------------------------- merged HF folder


def hf_config_of(cfg: ModelConfig, dtype: str) -> dict[str, Any]:
  """config.json (transformers 5 spelling) for a ModelConfig, for sources that are not HF folders."""
  rope: dict[str, Any] = {"rope_type": cfg.rope_type, "rope_theta": cfg.rope_theta}
  if cfg.rope_type in ("linear", "llama3"):
    rope["factor"] = cfg.rope_factor
  if cfg.rope_type == "llama3":
    rope.update(low_freq_factor=cfg.rope_low_freq_factor, high_freq_factor=cfg.rope_high_freq_factor,
                original_max_position_embeddings=cfg.rope_original_max_positions)
  if cfg.rope_type == "yarn":
    rope.update(factor=cfg.rope_factor, original_max_position_embeddings=cfg.rope_original_max_positions,
                beta_fast=cfg.rope_beta_fast, beta_slow=cfg.rope_beta_slow, truncate=cfg.rope_truncate,
                attention_factor=cfg.rope_attention_factor)
  if cfg.rope_type == "longrope":
    rope.update(short_factor=list(cfg.rope_short_factor), long_factor=list(cfg.rope_long_factor),
                factor=cfg.rope_factor, original_max_position_embeddings=cfg.rope_original_max_positions,
                attention_factor=cfg.rope_attention_factor)
  if cfg.partial_rotary_factor != 1.0:
    rope["partial_rotary_factor"] = cfg.partial_rotary_factor
  eos = list(cfg.eos_token_ids)
  hf = {
      "architectures": [CAUSAL_LM_CLASSES[cfg.model_type]],
      "model_type": cfg.model_type,
      "vocab_size": cfg.vocab_size,
      "hidden_size": cfg.hidden_size,
      "intermediate_size": cfg.intermediate_size,
      "num_hidden_layers": cfg.num_layers,
      "num_attention_heads": cfg.num_heads,
      "num_key_value_heads": cfg.num_kv_heads,
      "head_dim": cfg.head_dim,
      "hidden_act": cfg.hidden_act,
      "rms_norm_eps": cfg.rms_norm_eps,
      "max_position_embeddings": cfg.max_position_embeddings,
      "rope_parameters": rope,
      "tie_word_embeddings": cfg.tie_word_embeddings,
      "bos_token_id": cfg.bos_token_id,
      "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
      "pad_token_id": cfg.pad_token_id,
      "dtype": dtype,
  }
  if cfg.model_type == "qwen2":  # q/k/v always carry a bias; o_proj never does
    hf["use_sliding_window"] = False
  elif cfg.model_type == "qwen2_moe":  # q/k/v's bias is a setting; o_proj never has one
    hf.update(use_sliding_window=False, qkv_bias=cfg.qkv_bias)
  else:
    if cfg.qkv_bias != cfg.o_bias:
      raise ExportError(f"{cfg.model_type}: attention_bias must cover q/k/v and o alike")
    hf["attention_bias"] = cfg.qkv_bias
    hf["mlp_bias"] = cfg.mlp_bias
  if cfg.model_type in ("mistral", "mixtral", "phi3"):
    hf["sliding_window"] = cfg.sliding_window
  if cfg.model_type == "phi3":
    hf.update(original_max_position_embeddings=cfg.rope_original_max_positions,
              partial_rotary_factor=cfg.partial_rotary_factor)
  if cfg.model_type in ("qwen3", "qwen3_moe"):
    hf["use_sliding_window"] = False
  if cfg.model_type == "mixtral":
    hf.update(num_local_experts=cfg.num_experts, num_experts_per_tok=cfg.num_experts_per_tok,
              intermediate_size=cfg.expert_intermediate_size)
  if cfg.model_type in ("qwen2_moe", "qwen3_moe"):
    hf.update(num_experts=cfg.num_experts, num_experts_per_tok=cfg.num_experts_per_tok,
              moe_intermediate_size=cfg.expert_intermediate_size, norm_topk_prob=cfg.norm_topk_prob,
              decoder_sparse_step=1, mlp_only_layers=[])
  if cfg.model_type == "qwen2_moe":
    hf["shared_expert_intermediate_size"] = cfg.shared_expert_intermediate_size
  if cfg.model_type in ("gemma2", "gemma3_text"):
    hf.update(_gemma_config(cfg, rope))
  if cfg.model_type == "olmo3":
    hf.update(sliding_window=cfg.sliding_window, layer_types=_layer_types(cfg), **_local_rope(cfg, rope))
  if cfg.model_type == "smollm3":
    hf.update(no_rope_layers=[int(not nope) for nope in cfg.nope_layers] or [1] * cfg.num_layers,
              use_sliding_window=bool(cfg.sliding_layers), sliding_window=cfg.sliding_window,
              layer_types=_layer_types(cfg) or ["full_attention"] * cfg.num_layers)
  if cfg.model_type == "granite":
    hf.update(embedding_multiplier=cfg.embedding_multiplier, attention_multiplier=cfg.attention_multiplier,
              residual_multiplier=cfg.residual_multiplier, logits_scaling=cfg.logits_scaling)
  return hf


def _gemma_config(cfg: ModelConfig, rope: dict[str, Any]) -> dict[str, Any]:
  """Gemma 2's and 3's own config.json keys (see config._gemma_fields)."""
  out = {
      "hidden_activation": cfg.hidden_act,
      "query_pre_attn_scalar": cfg.query_pre_attn_scalar,
      "sliding_window": cfg.sliding_window,
      "layer_types": _layer_types(cfg),
      "attn_logit_softcapping": cfg.attn_logit_softcap,
      "final_logit_softcapping": cfg.final_logit_softcap,
  }
  out.update(_local_rope(cfg, rope))  # Gemma 3
  return out


def _layer_types(cfg: ModelConfig) -> list[str]:
  return ["sliding_attention" if s else "full_attention" for s in cfg.sliding_layers]


def _local_rope(cfg: ModelConfig, rope: dict[str, Any]) -> dict[str, Any]:
  """rope_parameters per layer type, when the windowed layers have their own rope base (Gemma 3, OLMo 3)."""
  if cfg.local_rope_theta is None:
    return {}
  return {"rope_parameters": {"full_attention": rope,
                              "sliding_attention": {"rope_type": "default", "rope_theta": cfg.local_rope_theta}}}


def _eos_ids(cfg: ModelConfig, tokenizer, source: dict[str, Any]) -> list[int]:
  """The source's generation eos ids, the model config's and the tokenizer's (end of turn), deduplicated."""
  ids: list[int] = []
  for v in (source.get("eos_token_id"), list(cfg.eos_token_ids),
            getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None):
    for i in (v if isinstance(v, list) else [v]):
      if i is not None and int(i) not in ids:
        ids.append(int(i))
  return ids


def _generation_config(cfg: ModelConfig, tokenizer, source_dir: str | None) -> dict[str, Any]:
  source: dict[str, Any] = {}
  path = os.path.join(source_dir, "generation_config.json") if source_dir else None
  if path and os.path.exists(path):
    with open(path) as f:
      source = json.load(f)
  gen = dict(source)
  eos = _eos_ids(cfg, tokenizer, source)
  gen["eos_token_id"] = eos[0] if len(eos) == 1 else (eos or None)
  bos = gen.get("bos_token_id", cfg.bos_token_id)
  gen["bos_token_id"] = bos if bos is not None else getattr(tokenizer, "bos_token_id", None)
  pad = gen.get("pad_token_id", cfg.pad_token_id)
  gen["pad_token_id"] = pad if pad is not None else getattr(tokenizer, "pad_token_id", None)
  return gen


def check_exportable(method: str, fmt: str, reward_model: bool = False) -> None:
  """Raises ExportError when a run of peft.method `method` cannot be written as `fmt` (hf | peft |
  gguf, a merged model like hf)."""
  if fmt == "gguf" and reward_model:
    raise ExportError("a reward model has a score head that llama.cpp's decoder files cannot hold: use --format hf")
  fmt = "hf" if fmt == "gguf" else fmt
  if fmt == "peft" and reward_model:
    raise ExportError("a reward model exports as a merged Hugging Face sequence-classification folder "
                      "(its score head is not part of a PEFT adapter): use --format hf")
  if method == "adapter":
    raise ExportError("bottleneck adapters cannot be merged into the weights, and peft has no "
                      "equivalent adapter type, so neither --format hf nor --format peft can hold "
                      "them; evaluate/generate with --adapter WORKDIR instead")
  if fmt == "hf" and method in ("prefix", "prompt"):
    raise ExportError(f"{method} tuning cannot be merged into the weights of a Hugging Face model "
                      "(it adds virtual tokens, not a weight change): use --format peft")
  if fmt == "peft" and method == "full":
    raise ExportError("a full fine-tune has no adapter to save in PEFT format: use --format hf")
  if fmt == "peft" and method not in (*partition.LORA_METHODS, "ia3", "prefix", "prompt"):
    raise ExportError(f"peft.method={method!r}: no PEFT export (methods: lora, dora, ia3, prefix, prompt)")


def _method_of_leaves(flat: Mapping[str, Any]) -> str:
  if any("_adapter/" in p for p in flat):
    return "adapter"
  if any("prefix_" in p for p in flat):
    return "prefix"
  if "prompt_embeddings" in flat:
    return "prompt"
  if any(ia3.is_ia3_leaf(p) for p in flat):
    return "ia3"
  return "lora" if any(lora.is_lora_leaf(p) for p in flat) else "full"


def _merged_leaf(params: llama.Params, path: str, lora_scale: float):
  """The base leaf at `path`, with its LoRA or IA3 (if any) folded in, still on device."""
  node = params
  *parents, last = path.split("/")
  for key in parents:
    node = node[key]
  if last == "kernel" and "lora_a" in node:
    return lora.merge_lora({"linear": node}, lora_scale)["linear"]["kernel"]
  if moe.is_expert_leaf(path) and "expert_lora" in params["layers"]["mlp"]:
    return moe.merged_expert(node, params["layers"]["mlp"]["expert_lora"], lora_scale, last)
  if last in ("kernel", "bias") and ("ia3_in" in node or "ia3_out" in node):
    return ia3.merge_ia3({"linear": node})["linear"][last]
  return node[last]


def _reward_head(params: llama.Params) -> str | None:
  from jaxtune.objectives.reward import HEAD  # only reward models have one
  return HEAD if HEAD in params else None


def sequence_classification_config(hf: dict[str, Any], tokenizer) -> dict[str, Any]:
  """A causal LM's config.json turned into its family's one-label *ForSequenceClassification.

  HF scores the last token that is not pad_token_id, so one must be set: the model's, else the
  tokenizer's pad or eos token.
  """
  causal_lm = CAUSAL_LM_CLASSES[hf["model_type"]].replace("Gemma3For", "Gemma3TextFor")  # text-only head
  out = dict(hf, architectures=[causal_lm.replace("CausalLM", "SequenceClassification")],
             id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
  if out.get("pad_token_id") is None and tokenizer is not None:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out["pad_token_id"] = pad
  return out


def write_hf(out_dir: str, cfg: ModelConfig, params: llama.Params, peft_runtime: llama.PeftRuntime,
             tokenizer, source_model_path: str | None, dtype: str | None = None,
             max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> list[str]:
  """Writes a merged Hugging Face folder (LoRA folded into the kernels); returns the weight files.

  config.json is the source folder's (dtype adjusted) when the source is a HF folder, else built
  from `cfg`. `dtype` defaults to the embedding's dtype. A reward model is written as the family's
  *ForSequenceClassification: no lm_head, its head as score.weight.
  """
  flat = flatten(params)
  check_exportable(_method_of_leaves(flat), "hf")
  head = _reward_head(params)
  base = {p: v for p, v in flat.items() if not partition.is_peft_leaf(p)}
  if head:  # the scorer has no LM head
    base = {p: v for p, v in base.items() if p != "lm_head/kernel"}
  dtype = dtype or jnp.dtype(base["embed_tokens"].dtype).name
  source_dir = source_model_path if source_model_path and os.path.isdir(source_model_path) else None
  if _is_main():
    os.makedirs(out_dir, exist_ok=True)
  def name_of(path: str, layer) -> str:
    if path == f"{head}/kernel":
      return "score.weight"
    moe_leaf = moe.is_expert_leaf(path) or moe.is_router_leaf(path)
    return moe.hf_name(cfg.model_type, path, layer) if moe_leaf else hf_name_of(path, layer)

  specs = tensor_specs(base, name_of)
  fetch = lambda path: to_host(_merged_leaf(params, path, peft_runtime.lora_scale))
  names = write_safetensors(out_dir, "model", specs, stream_tensors(specs, fetch), dtype, max_shard_bytes)
  if not _is_main():
    return names
  if source_dir:
    with open(os.path.join(source_dir, "config.json")) as f:
      hf = json.load(f)
    hf["dtype"] = dtype
    hf.pop("torch_dtype", None)  # transformers 4 spelling of the same field
  else:
    hf = hf_config_of(cfg, dtype)
  if head:
    hf = sequence_classification_config(hf, tokenizer)
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(hf, f, indent=2)
  if not head:  # a scorer does not generate
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
      json.dump(_generation_config(cfg, tokenizer, source_dir), f, indent=2)
  if tokenizer is not None:
    tokenizer.save_pretrained(out_dir)
  return names


# ----------------------------------------------------------------------------- PEFT adapter folder


# a LoRA / DoRA / IA3 leaf -> the end of peft's saved key for it
PEFT_LEAF_KEYS = {**lora.PEFT_KEYS, "ia3_in": ia3.PEFT_KEY, "ia3_out": ia3.PEFT_KEY}


def write_gguf(out_dir: str, cfg: ModelConfig, params: llama.Params, peft_runtime: llama.PeftRuntime,
               tokenizer, source_model_path: str | None, gguf_type: str = "f16") -> str:
  """Writes the merged model as out_dir/model.gguf (gguf_export): a merged HF folder is staged in
  out_dir/.merged_hf (float32, or bfloat16 for gguf_type bf16, so no precision is lost on the way),
  converted one tensor at a time, then removed. Returns the file's path."""
  if tokenizer is None or not getattr(tokenizer, "is_fast", False):
    raise ExportError("--format gguf needs the run's fast tokenizer (tokenizer.json) to write the vocabulary")
  gguf_export.check_convertible(cfg.model_type, json.loads(tokenizer.backend_tokenizer.to_str()))
  staging, path = os.path.join(out_dir, ".merged_hf"), os.path.join(out_dir, "model.gguf")
  write_hf(staging, cfg, params, peft_runtime, tokenizer, source_model_path,
           "bfloat16" if gguf_type == "bf16" else "float32")
  if _is_main():
    try:
      gguf_export.write_gguf(staging, path, gguf_type, progress=True)
    finally:
      shutil.rmtree(staging, ignore_errors=True)
  return path


def peft_leaf_name(path: str, layer: int | None) -> str:
  """peft's saved key of a LoRA/DoRA/IA3 leaf: base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight."""
  linear, leaf = path.rsplit("/", 1)
  weight = hf_name_of(linear + "/kernel", layer)
  return "base_model.model." + weight[: -len("weight")] + PEFT_LEAF_KEYS[leaf]


def _lora_config(flat: Mapping[str, Any], settings: Mapping[str, Any], base_model: str | None) -> dict:
  a_paths = [p for p in flat if p.endswith("/lora_a")]
  experts = expert_lora.names_in(a_paths)
  return {
      "peft_type": "LORA",
      "task_type": "CAUSAL_LM",
      "base_model_name_or_path": base_model,
      "r": int(flat[a_paths[0]].shape[-1]),
      "lora_alpha": settings["alpha"],
      "lora_dropout": float(settings.get("dropout", 0.0)),
      "use_rslora": bool(settings.get("use_rslora", False)),
      "target_modules": sorted({p.split("/")[-2] for p in a_paths if not moe.is_expert_lora_leaf(p)}),
      # in peft's own order: it nests the wrappers in this order (see expert_lora.py)
      "target_parameters": [expert_lora.PEFT_PARAMETERS[name] for name in experts] or None,
      "bias": "none",
      "fan_in_fan_out": False,
      "use_dora": any(p.endswith("/lora_magnitude") for p in flat),
      "modules_to_save": None,
      "init_lora_weights": True,
      "inference_mode": True,
  }


def _expert_lora_specs(experts: Mapping[str, Any]) -> list[TensorSpec]:
  """peft's per-layer tensors of LoRA on the experts (expert_lora.to_peft gives their layout)."""
  names = expert_lora.names_in(experts)
  specs = []
  for path, leaf in experts.items():
    name, kind = path.split("/")[-2:]
    L, E, n, m = leaf.shape
    shape = (E * m, n) if kind == "lora_a" else (m, n * E)
    specs += [TensorSpec(expert_lora.peft_module(names, name, layer) + lora.PEFT_KEYS[kind], shape, path, layer,
                         False) for layer in range(L)]
  return specs


def _ia3_config(flat: Mapping[str, Any], base_model: str | None) -> dict:
  modules = lambda leaf: sorted({p.split("/")[-2] for p in flat if p.endswith("/" + leaf)})
  return {
      "peft_type": "IA3",
      "task_type": "CAUSAL_LM",
      "base_model_name_or_path": base_model,
      "target_modules": modules("ia3_in") + modules("ia3_out"),
      "feedforward_modules": modules("ia3_in"),
      "fan_in_fan_out": False,
      "modules_to_save": None,
      "init_ia3_weights": True,
      "inference_mode": True,
  }


def _prompt_config(cfg: ModelConfig, length: int, base_model: str | None) -> dict:
  return {
      "peft_type": "PROMPT_TUNING",
      "task_type": "CAUSAL_LM",
      "base_model_name_or_path": base_model,
      "num_virtual_tokens": length,
      "token_dim": cfg.hidden_size,
      "num_transformer_submodules": 1,
      "num_attention_heads": cfg.num_heads,
      "num_layers": cfg.num_layers,
      "prompt_tuning_init": "RANDOM",
      "inference_mode": True,
  }


def _prefix_config(cfg: ModelConfig, length: int, base_model: str | None) -> dict:
  return {
      "peft_type": "PREFIX_TUNING",
      "task_type": "CAUSAL_LM",
      "base_model_name_or_path": base_model,
      "num_virtual_tokens": length,
      "num_layers": cfg.num_layers,
      "token_dim": cfg.kv_size,  # peft feeds key/values: kv heads x head_dim (GQA-aware)
      "num_attention_heads": cfg.num_kv_heads,
      "num_transformer_submodules": 1,
      "prefix_projection": False,
      "inference_mode": True,
  }


def write_peft(out_dir: str, cfg: ModelConfig, params: llama.Params, method: str,
               peft_settings: Mapping[str, Any], base_model_name_or_path: str | None) -> None:
  """Writes adapter_config.json + adapter_model.safetensors that peft.PeftModel.from_pretrained loads.

  `peft_settings` is the config's `peft` section (uses lora.alpha/dropout/use_rslora).
  """
  flat = flatten(params)
  check_exportable(method, "peft", reward_model=_reward_head(params) is not None)
  if _is_main():
    os.makedirs(out_dir, exist_ok=True)
  if method in (*partition.LORA_METHODS, "ia3"):
    is_leaf = ia3.is_ia3_leaf if method == "ia3" else lora.is_lora_leaf
    leaves = {p: v for p, v in flat.items() if is_leaf(p)}
    if not leaves:
      raise ExportError(f"peft.method={method} but the params hold no {method} leaves")
    experts = {p: v for p, v in leaves.items() if moe.is_expert_lora_leaf(p)}
    specs = (tensor_specs({p: v for p, v in leaves.items() if p not in experts}, peft_leaf_name)
             + _expert_lora_specs(experts))
    if method == "ia3":  # peft keeps an output scale as (out, 1) and an input scale as (1, in)
      config = _ia3_config(leaves, base_model_name_or_path)
      specs = [dataclasses.replace(s, shape=(1, *s.shape) if s.path.endswith("/ia3_in") else (*s.shape, 1))
               for s in specs]
    else:
      config = _lora_config(leaves, peft_settings["lora"], base_model_name_or_path)
    def fetch(path):
      host = to_host(leaves[path])
      return expert_lora.to_peft(path.rsplit("/", 1)[-1], host) if path in experts else host

    tensors = (t.reshape(s.shape) for s, t in zip(specs, stream_tensors(specs, fetch)))
    write_safetensors(out_dir, "adapter_model", specs, tensors, jnp.dtype(next(iter(leaves.values())).dtype).name)
  elif method == "prompt":
    if "prompt_embeddings" not in flat:
      raise ExportError("peft.method=prompt but the params hold no prompt_embeddings")
    embeddings = to_host(flat["prompt_embeddings"])
    config = _prompt_config(cfg, int(embeddings.shape[0]), base_model_name_or_path)
  elif method == "prefix":
    from jaxtune.peft import prefix  # written alongside; only prefix exports need it
    attn = prefix.fold_prefix(params, cfg)["layers"]["self_attn"]  # a reparametrised prefix -> its output
    if "prefix_k" not in attn:
      raise ExportError("peft.method=prefix but the params hold no prefix (prefix_k/prefix_v or prefix_encoder)")
    embeddings = to_host(prefix.prefix_to_peft(attn["prefix_k"], attn["prefix_v"]))
    config = _prefix_config(cfg, int(embeddings.shape[0]), base_model_name_or_path)
  if method in ("prefix", "prompt"):  # both save one tensor under peft's name for it
    dtype = embeddings.dtype.name
    spec = TensorSpec("prompt_embeddings", tuple(embeddings.shape), "prompt_embeddings", None, False)
    write_safetensors(out_dir, "adapter_model", [spec], [embeddings], dtype)
  if _is_main():
    with open(os.path.join(out_dir, "adapter_config.json"), "w") as f:
      json.dump(config, f, indent=2)
