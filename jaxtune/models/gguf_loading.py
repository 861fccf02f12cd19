"""Read llama.cpp GGUF files: a config.json-style dict, lazily dequantized tensors, the tokenizer.

Tensors come back under Hugging Face names and in HF layout (out x in, float32), so the safetensors
path (`loading.params_from_tensors`) loads them unchanged. Only the `gguf` package is needed: the
reader memory-maps the file and each tensor is dequantized when it is asked for.
"""

from __future__ import annotations

import functools
import mmap
import os
import re
from typing import Any, Callable

import numpy as np

from jaxtune.models.config import CAUSAL_LM_CLASSES, UnsupportedModelError

# llama.cpp architectures whose tensors map onto jaxtune's decoder. "llama" covers Llama 1-3,
# Mistral and SmolLM2 (llama.cpp writes them all as llama).
SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi3", "qwen2moe", "qwen3moe",
                           "olmo2", "granite")
_GEMMA = ("gemma", "gemma2", "gemma3")  # norms stored as 1 + weight (llama.cpp adds the 1 when converting)
# llama.cpp architecture -> transformers model_type, where they differ ("llama" with experts: Mixtral)
_MODEL_TYPES = {"gemma3": "gemma3_text", "qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe"}
EXPERT_TENSOR = re.compile(r"(.*\.experts)\.(\d+)\.(\w+)\.weight")  # one expert's matrix, as loading asks for it
# llama.cpp's converter permutes the rows of Q and K (and their biases) for these architectures only.
PERMUTED_QK = ("llama", "granite")


def _reader(path: str):
  if not os.path.isfile(path):
    raise FileNotFoundError(f"GGUF file {path!r} not found")
  stat = os.stat(path)
  return _cached_reader(os.path.abspath(path), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=2)
def _cached_reader(path: str, mtime_ns: int, size: int):
  """Parsing the metadata takes seconds (a 49k-token vocabulary); config, weights and tokenizer share it."""
  import gguf
  del mtime_ns, size  # cache key only: a rewritten file is read again
  return gguf.GGUFReader(path)


def _metadata(reader, key: str, default: Any = None) -> Any:
  field = reader.fields.get(key)
  return default if field is None else field.contents()


def _architecture(reader, path: str) -> str:
  arch = _metadata(reader, "general.architecture")
  if arch not in SUPPORTED_ARCHITECTURES:
    raise UnsupportedModelError(
        f"{path}: GGUF architecture {arch!r} is not supported (supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
  return arch


def _rope_parameters(reader, arch: str, path: str) -> dict[str, Any]:
  theta = float(_metadata(reader, f"{arch}.rope.freq_base", 10000.0))
  scaling = _metadata(reader, f"{arch}.rope.scaling.type", "none")
  if scaling == "none":
    return {"rope_type": "default", "rope_theta": theta}
  if scaling == "linear":
    return {"rope_type": "linear", "rope_theta": theta,
            "factor": float(_metadata(reader, f"{arch}.rope.scaling.factor"))}
  if scaling == "yarn":  # as convert_hf_to_gguf.py writes Qwen2.5's: factor and original context
    for key in ("yarn_log_multiplier", "yarn_attn_factor", "yarn_ext_factor"):
      if _metadata(reader, f"{arch}.rope.scaling.{key}", None) not in (None, 1.0):
        raise UnsupportedModelError(f"{path}: GGUF YaRN with rope.scaling.{key} is not supported")
    return {"rope_type": "yarn", "rope_theta": theta,
            "factor": float(_metadata(reader, f"{arch}.rope.scaling.factor")),
            "original_max_position_embeddings": int(_metadata(reader, f"{arch}.rope.scaling.original_context_length")),
            "beta_fast": float(_metadata(reader, f"{arch}.rope.scaling.yarn_beta_fast", 32.0)),
            "beta_slow": float(_metadata(reader, f"{arch}.rope.scaling.yarn_beta_slow", 1.0))}
  raise UnsupportedModelError(f"{path}: GGUF rope scaling type {scaling!r} is not supported")


def _llama3_rope(hf_config: dict[str, Any], rope_factors: np.ndarray, path: str) -> dict[str, Any]:
  """Llama 3.1+ files store rope scaling as per-frequency divisors (`rope_freqs`), not its parameters.

  llama.cpp's converter computes them with low/high_freq_factor 1/4 and an original context of 8192
  (it does not read Llama 3's nested value), so those plus factor = the largest divisor should
  reproduce the divisors exactly; anything else is refused rather than guessed.
  """
  import dataclasses
  from jaxtune.models import rope as rope_lib
  from jaxtune.models.config import config_from_hf
  rope = {"rope_type": "llama3", "rope_theta": hf_config["rope_parameters"]["rope_theta"],
          "factor": float(rope_factors.max()), "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}
  cfg = config_from_hf(dict(hf_config, rope_parameters=rope))
  stated = np.asarray(rope_lib.rope_inv_freq(dataclasses.replace(cfg, rope_type="default"))) / rope_factors
  if stated.shape != (cfg.head_dim // 2,) or not np.allclose(np.asarray(rope_lib.rope_inv_freq(cfg)), stated,
                                                              rtol=1e-5, atol=0):
    raise UnsupportedModelError(f"{path}: rope_freqs do not match Llama 3 rope scaling (factor {rope['factor']})")
  return rope


def _stop_ids(reader) -> int | list[int] | None:
  """eos, plus end-of-turn/-message ids when the file names other ones (Llama 3 instruct's <|eot_id|>)."""
  ids = [_metadata(reader, f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
  ids = list(dict.fromkeys(int(i) for i in ids if i is not None))
  return ids[0] if len(ids) == 1 else (ids or None)


def hf_config_of(reader, path: str) -> dict[str, Any]:
  """The transformers config.json dict this GGUF's metadata describes."""
  arch = _architecture(reader, path)
  key = lambda name, default=None: _metadata(reader, f"{arch}.{name}", default)  # noqa: E731
  tensor_names = {t.name for t in reader.tensors}
  hidden, heads = int(key("embedding_length")), int(key("attention.head_count"))
  # key_length is written only when head_dim is explicit; otherwise the rotary width is the head size
  # (Phi-3's converter always writes its rotary width, which may be a part of the head).
  head_dim = int(key("attention.key_length", hidden // heads if arch == "phi3" else
                     key("rope.dimension_count", hidden // heads)))
  if arch != "phi3" and int(key("rope.dimension_count", head_dim)) != head_dim:
    raise UnsupportedModelError(f"{path}: partial rotary embeddings (rope.dimension_count != head_dim)")
  vocab = key("vocab_size")
  if vocab is None:  # older files only state it through the vocabulary's length
    vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
  experts = int(key("expert_count", 0) or 0)
  model_type = "mixtral" if arch == "llama" and experts else _MODEL_TYPES.get(arch, arch)
  hf_config = {
      "model_type": model_type,
      "architectures": [CAUSAL_LM_CLASSES[model_type]],
      "vocab_size": int(vocab),
      "hidden_size": hidden,
      "intermediate_size": int(key("feed_forward_length")),
      "num_hidden_layers": int(key("block_count")),
      "num_attention_heads": heads,
      "num_key_value_heads": int(key("attention.head_count_kv", heads)),
      "head_dim": head_dim,
      # The float32 value the file holds (e.g. 9.9999997e-06), as transformers' GGUF loader reads it.
      "rms_norm_eps": float(key("attention.layer_norm_rms_epsilon", 1e-6)),
      "rope_parameters": _rope_parameters(reader, arch, path),
      "max_position_embeddings": int(key("context_length", 2048)),
      # llama.cpp writes output.weight only when it differs from the embedding.
      "tie_word_embeddings": "output.weight" not in tensor_names,
      # qwen2 always has q/k/v biases; a llama-arch file with biases has them on o_proj too.
      "attention_bias": arch != "qwen2" and "blk.0.attn_output.bias" in tensor_names,
      "mlp_bias": "blk.0.ffn_up.bias" in tensor_names,
      "hidden_act": "silu",
      "bos_token_id": _metadata(reader, "tokenizer.ggml.bos_token_id"),
      "eos_token_id": _stop_ids(reader),
      "pad_token_id": _metadata(reader, "tokenizer.ggml.padding_token_id"),
  }
  rope_freqs = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
  if rope_freqs is not None:
    if hf_config["rope_parameters"]["rope_type"] != "default":
      raise UnsupportedModelError(f"{path}: both rope_freqs and a rope scaling type")
    factors = np.asarray(_dequantize(rope_freqs), np.float32)
    hf_config["rope_parameters"] = _llama3_rope(hf_config, factors, path)
  if arch in _GEMMA:
    hf_config.update(_gemma_config(arch, key, hf_config))
  if arch == "phi3":
    hf_config.update(_phi3_config(reader, key, hf_config))
  if experts:
    hf_config.update(_moe_config(arch, key, experts, tensor_names))
  if arch == "granite":  # its four multipliers, as llama.cpp's converter names them
    hf_config.update(embedding_multiplier=float(key("embedding_scale", 1.0)),
                     attention_multiplier=float(key("attention.scale", 1.0)),
                     residual_multiplier=float(key("residual_scale", 1.0)),
                     logits_scaling=float(key("logit_scale", 1.0)))
  return hf_config


def _moe_config(arch: str, key: Callable[..., Any], experts: int, tensor_names: set[str]) -> dict[str, Any]:
  """Mixtral (llama.cpp's `llama` with experts), Qwen2-MoE and Qwen3-MoE as llama.cpp runs them:
  Mixtral's and Qwen3-MoE's expert weights renormalised, Qwen2-MoE's not; Qwen2-MoE's shared expert."""
  used = int(key("expert_used_count"))
  if arch == "llama":
    return {"num_local_experts": experts, "num_experts_per_tok": used}
  out = {"num_experts": experts, "num_experts_per_tok": used, "decoder_sparse_step": 1, "mlp_only_layers": [],
         "moe_intermediate_size": int(key("expert_feed_forward_length")), "norm_topk_prob": arch == "qwen3moe"}
  if arch == "qwen2moe":
    out.update(shared_expert_intermediate_size=int(key("expert_shared_feed_forward_length")),
               qkv_bias="blk.0.attn_q.bias" in tensor_names)
  return out


def _phi3_config(reader, key: Callable[..., Any], hf_config: dict[str, Any]) -> dict[str, Any]:
  """Phi-3's settings as llama.cpp's converter writes them: the rotary width, a sliding window (0 =
  none: Phi-4), and for longrope its two sets of divisors as tensors with the original context and
  the cos/sin scale as metadata."""
  window = int(key("attention.sliding_window", 0) or 0)
  original = key("rope.scaling.original_context_length")
  out: dict[str, Any] = {"sliding_window": window or None,
                         "partial_rotary_factor": int(key("rope.dimension_count", hf_config["head_dim"]))
                         / hf_config["head_dim"]}
  factors = {t.name: t for t in reader.tensors if t.name.startswith("rope_factors_")}
  if factors:
    rope = {"rope_type": "longrope", "rope_theta": hf_config["rope_parameters"]["rope_theta"],
            "short_factor": _dequantize(factors["rope_factors_short.weight"]).ravel().tolist(),
            "long_factor": _dequantize(factors["rope_factors_long.weight"]).ravel().tolist(),
            "original_max_position_embeddings": int(original)}
    if key("rope.scaling.attn_factor") is not None:
      rope["attention_factor"] = float(key("rope.scaling.attn_factor"))
    out["rope_parameters"] = rope
  if original is not None:
    out["original_max_position_embeddings"] = int(original)
  return out


def _gemma_config(arch: str, key: Callable[..., Any], hf_config: dict[str, Any]) -> dict[str, Any]:
  """What llama.cpp states, or implies, about a Gemma: tanh-gelu GeGLU; for Gemma 2/3 the windowed
  layers (every 2nd / 6 of 6 layers attend within `attention.sliding_window`, the last of each group
  globally), the soft-caps, Gemma 3's rope base 10000 for windowed layers, and the score scale,
  which llama.cpp derives from the model size: 1/sqrt(hidden / heads) for the 27B models (46 and 62
  layers), 1/sqrt(head size) otherwise."""
  out: dict[str, Any] = {"hidden_act": "gelu_pytorch_tanh"}
  if arch == "gemma":
    return out
  layers = hf_config["num_hidden_layers"]
  is_27b = layers == {"gemma2": 46, "gemma3": 62}[arch]
  pattern = key("attention.sliding_window_pattern", 2 if arch == "gemma2" else 6)
  sliding = list(pattern) if isinstance(pattern, (list, tuple, np.ndarray)) else [
      (i + 1) % int(pattern) != 0 for i in range(layers)]
  out.update(
      query_pre_attn_scalar=(hf_config["hidden_size"] // hf_config["num_attention_heads"] if is_27b
                             else hf_config["head_dim"]),
      sliding_window=int(key("attention.sliding_window")),
      layer_types=["sliding_attention" if s else "full_attention" for s in sliding],
      final_logit_softcapping=key("final_logit_softcapping"),
      attn_logit_softcapping=key("attn_logit_softcapping"))  # config_from_hf ignores it for Gemma 3
  if arch == "gemma3":
    out["rope_parameters"] = {"full_attention": hf_config["rope_parameters"],
                              "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}
  return out


def _dequantize(t) -> np.ndarray:
  """A reader tensor as float32; GGUF shapes list the fastest axis first, so this is (out, in), HF's layout."""
  import gguf
  w = gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(reversed(t.shape.tolist())))
  return w.astype(np.float32, copy=False)


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
  """Undoes llama.cpp's `permute(w, n_head, n_head_kv)` of Q/K rows (interleaved -> half-split RoPE).

  Same as transformers' LlamaTensorProcessor._reverse_permute_weights; works for weights and biases.
  """
  dim = w.shape[0] // n_head // 2
  return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


def release_pages(mapped: np.memmap, offset: int, n_bytes: int) -> None:
  """Drops a read tensor's pages from this process's RSS (the reader maps the whole file, and every
  page read stays resident: a second copy of the model). The map stays valid; a page is read from the
  file again if it is touched again."""
  start = offset // mmap.PAGESIZE * mmap.PAGESIZE
  mapped._mmap.madvise(mmap.MADV_DONTNEED, start, offset + n_bytes - start)


def gguf_tensors(path: str) -> tuple[dict[str, Any], Callable[[str], np.ndarray]]:
  """(config.json-style dict, get(hf_name) -> float32 array in HF layout), dequantizing lazily."""
  import gguf
  reader = _reader(path)
  hf_config = hf_config_of(reader, path)
  arch = _architecture(reader, path)
  name_map = gguf.get_tensor_name_map(
      next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch), hf_config["num_hidden_layers"])
  tensors = {t.name: t for t in reader.tensors}
  heads_of = {"attn_q": hf_config["num_attention_heads"], "attn_k": hf_config["num_key_value_heads"]}

  @functools.lru_cache(maxsize=1)  # loading asks for a layer's experts one after another
  def experts_of(gguf_name: str) -> np.ndarray:
    tensor = tensors[gguf_name]
    w = _dequantize(tensor).copy()
    release_pages(reader.data, tensor.data_offset, tensor.n_bytes)
    return w

  def get(hf_name: str) -> np.ndarray:
    expert = EXPERT_TENSOR.fullmatch(hf_name)  # llama.cpp stacks a layer's experts: E x out x in
    gguf_name = (f"{name_map.get_name(f'{expert.group(1)}.{expert.group(3)}')}.weight" if expert
                 else name_map.get_name(hf_name, try_suffixes=(".weight", ".bias")))
    if gguf_name not in tensors:
      raise KeyError(f"{path}: tensor {hf_name!r} (GGUF {gguf_name!r}) not found in the file")
    if expert:
      return experts_of(gguf_name)[int(expert.group(2))]
    tensor = tensors[gguf_name]
    w = _dequantize(tensor)
    if hf_name.endswith("shared_expert_gate.weight") and w.ndim == 1:  # llama.cpp keeps it as a vector
      w = w[None]
    kind = gguf_name.split(".")[-2]
    if arch in PERMUTED_QK and kind in heads_of:
      w = unpermute_qk(w, heads_of[kind])
    if arch in _GEMMA and gguf_name.endswith("norm.weight"):
      w = w - 1.0
    if np.may_share_memory(w, reader.data):  # a float32 tensor is a view of the file's pages
      w = w.copy()
    release_pages(reader.data, tensor.data_offset, tensor.n_bytes)
    return w

  return hf_config, get


# ----------------------------------------------------------------------------- tokenizer


def _tokenizer_fields(reader) -> dict[str, Any]:
  """GGUF tokenizer metadata under the names transformers' GGUF tokenizer converter expects."""
  from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_TOKENIZER_MAPPING
  out = {}
  for group in GGUF_TOKENIZER_MAPPING.values():
    for key, name in group.items():
      value = _metadata(reader, f"tokenizer.{key}")
      if value is not None:
        out[name] = value
  return out


def gguf_tokenizer(path: str):
  """The GGUF's tokenizer as a transformers fast tokenizer, with its chat template, built without torch.

  bos/eos/pad come from the file's `tokenizer.ggml.*_token_id` (eos must be the end-of-turn token,
  e.g. `<|im_end|>` for SmolLM2). Without a padding id, pad = eos: padded slots carry weight 0 and
  segment id 0, so the id is never scored, and eos needs no new embedding row.
  """
  from transformers import PreTrainedTokenizerFast
  try:  # torch-free, unlike AutoTokenizer.from_pretrained(gguf_file=...) in transformers 5.x
    from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer
  except ImportError as e:
    raise ImportError(f"{path}: GGUF tokenizers need a transformers with transformers.integrations.gguf "
                      f"(5.24 has it): {e}") from e
  reader = _reader(path)
  arch = _metadata(reader, "general.architecture")
  fields = _tokenizer_fields(reader)
  if "tokens" not in fields:
    raise ValueError(f"{path}: the GGUF file carries no tokenizer (tokenizer.ggml.tokens)")
  backend, extra = convert_gguf_tokenizer(arch, fields)
  tokens = fields["tokens"]
  special = {name: tokens[fields[f"{name}_id"]] for name in ("bos_token", "eos_token", "unk_token", "pad_token")
             if fields.get(f"{name}_id") is not None}
  if "eos_token" not in special:
    raise ValueError(f"{path}: the GGUF file states no tokenizer.ggml.eos_token_id")
  special.setdefault("pad_token", special["eos_token"])
  kwargs = {k: fields[k] for k in ("chat_template", "add_bos_token", "add_eos_token") if k in fields}
  tok = PreTrainedTokenizerFast(tokenizer_object=backend, **special, **kwargs, **extra)
  tok.model_max_length = int(_metadata(reader, f"{arch}.context_length", tok.model_max_length))
  if tok.eos_token_id != fields["eos_token_id"]:
    raise ValueError(f"{path}: eos {special['eos_token']!r} converted to id {tok.eos_token_id}, "
                     f"file says {fields['eos_token_id']}")
  return tok
