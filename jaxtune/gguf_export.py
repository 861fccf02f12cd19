"""A Hugging Face folder as one llama.cpp GGUF file (llama.cpp, Ollama, LM Studio run it).

Written as llama.cpp's own converter (convert_hf_to_gguf.py) writes these models, with the `gguf`
package: llama.cpp's tensor names, Q and K rows permuted where it permutes them (`llama`,
`granite`), 1-d tensors (norms, biases) in float32, the rest in the chosen type, experts stacked per
layer, and the byte-level BPE tokenizer (tokens, their types, merges, special ids, chat template).
Covers the families llama.cpp maps onto its `llama`, `qwen2`, `qwen3`, `olmo2`, `granite`,
`qwen2moe` and `qwen3moe` architectures; anything else is refused by name. `gguf_loading` reads the
result back, and so does transformers' GGUF reader for the families it knows whole (Llama,
Mistral, Qwen2: `from_pretrained(folder, gguf_file=...)`).
"""

from __future__ import annotations

import functools
import json
import os
import re
import sys
from typing import Any, Callable

import numpy as np

from jaxtune.models import gguf_loading, loading
from jaxtune.models.config import ModelConfig, UnsupportedModelError, config_from_hf

GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")  # export.py --gguf_type
# transformers model_type -> llama.cpp architecture (llama.cpp writes Mistral and SmolLM as llama)
ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "olmo2": "olmo2",
                 "granite": "granite", "qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe"}
_TOPK_RENORMALIZED = {"qwen2moe": False, "qwen3moe": True}  # as llama.cpp runs each MoE architecture
_STACKED_EXPERTS = re.compile(r"(.*\.experts)\.(gate_up_proj|down_proj)")  # transformers 5: E x out x in
# A byte-level pre-tokenizer -> llama.cpp's name for it (tokenizer.ggml.pre), by its tokenizer.json form.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
SPLIT_NAMES = {LLAMA3_SPLIT: "llama-bpe", QWEN2_SPLIT: "qwen2"}
_TOKEN_NORMAL, _TOKEN_CONTROL, _TOKEN_USER_DEFINED, _TOKEN_UNUSED = 1, 3, 4, 5  # gguf.TokenType


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
  """llama.cpp's `permute(w, n_head, n_head_kv)` of Q/K rows (half-split -> interleaved RoPE);
  gguf_loading.unpermute_qk undoes it."""
  dim = w.shape[0] // n_head // 2
  return w.reshape(n_head, 2, dim, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _steps(tokenizer_json: dict[str, Any], component: str, listed_as: str) -> list[dict[str, Any]]:
  """A tokenizer.json component (pre_tokenizer, post_processor, decoder) as its list of steps: a
  Sequence's members, or the component alone."""
  part = tokenizer_json.get(component) or {}
  return part.get(listed_as, [part]) if part.get("type") == "Sequence" else [part]


def pre_tokenizer_name(tokenizer_json: dict[str, Any]) -> str:
  """llama.cpp's tokenizer.ggml.pre for a byte-level BPE tokenizer.json, from its pre-tokenizer."""
  steps = _steps(tokenizer_json, "pre_tokenizer", "pretokenizers")
  kinds = [s.get("type") for s in steps]
  if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
    return "gpt-2"
  if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
    return "smollm"
  if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
    name = SPLIT_NAMES.get(steps[0].get("pattern", {}).get("Regex"))
    if name:
      return name
  raise UnsupportedModelError(f"--format gguf: the tokenizer's pre-tokenizer ({' + '.join(map(str, kinds))}) "
                              f"is not one llama.cpp names (GPT-2, SmolLM, Llama 3 or Qwen2 splitting)")


def check_convertible(model_type: str | None, tokenizer_json: dict[str, Any]) -> str:
  """The llama.cpp architecture of a model of `model_type` with this tokenizer.json; raises
  UnsupportedModelError naming what GGUF export cannot write (before anything is written)."""
  if model_type not in ARCHITECTURES:
    raise UnsupportedModelError(f"--format gguf: model_type {model_type!r} is not written (supported: "
                                f"{', '.join(ARCHITECTURES)})")
  model = tokenizer_json.get("model", {})
  decoders = _steps(tokenizer_json, "decoder", "decoders")
  if model.get("type") != "BPE" or not any(s.get("type") == "ByteLevel" for s in decoders):
    raise UnsupportedModelError(f"--format gguf: only byte-level BPE tokenizers are written (this one: "
                                f"{model.get('type')}); SentencePiece vocabularies are not")
  if not model.get("merges"):  # GGUF has no empty arrays, and llama.cpp refuses a BPE vocabulary without merges
    raise UnsupportedModelError("--format gguf: the tokenizer has no BPE merges, which llama.cpp needs")
  pre_tokenizer_name(tokenizer_json)
  return ARCHITECTURES[model_type]


def _vocabulary(tokenizer_json: dict[str, Any], vocab_size: int) -> tuple[list[str], list[int]]:
  """(tokens by id, padded to the model's vocabulary as llama.cpp pads it, their gguf token types)."""
  by_id = {i: t for t, i in tokenizer_json["model"]["vocab"].items()}
  kinds = {}
  for added in tokenizer_json.get("added_tokens", []):
    by_id[added["id"]] = added["content"]
    kinds[added["id"]] = _TOKEN_CONTROL if added.get("special") else _TOKEN_USER_DEFINED
  if max(by_id) >= vocab_size:
    raise UnsupportedModelError(f"--format gguf: token id {max(by_id)} is past the model's vocab_size {vocab_size}")
  tokens = [by_id.get(i, f"[PAD{i}]") for i in range(vocab_size)]
  types = [kinds.get(i, _TOKEN_NORMAL if i in by_id else _TOKEN_UNUSED) for i in range(vocab_size)]
  return tokens, types


def adds_special_tokens(tokenizer_json: dict[str, Any]) -> tuple[bool, bool]:
  """(BOS first, EOS last): what the tokenizer's post-processor puts around a single text."""
  steps = _steps(tokenizer_json, "post_processor", "processors")
  single = next((p.get("single", []) for p in steps if p.get("type") == "TemplateProcessing"), [])
  return bool(single) and "SpecialToken" in single[0], bool(single) and "SpecialToken" in single[-1]


def _write_hparams(writer, cfg: ModelConfig, arch: str) -> None:
  """The architecture's metadata, as llama.cpp's converter states it."""
  writer.add_context_length(cfg.max_position_embeddings)
  writer.add_embedding_length(cfg.hidden_size)
  writer.add_block_count(cfg.num_layers)
  writer.add_feed_forward_length(cfg.intermediate_size)
  writer.add_head_count(cfg.num_heads)
  writer.add_head_count_kv(cfg.num_kv_heads)
  writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
  writer.add_vocab_size(cfg.vocab_size)
  writer.add_rope_dimension_count(cfg.head_dim)
  if cfg.head_dim != cfg.hidden_size // cfg.num_heads:
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
  window = cfg.sliding_window
  if window and window < cfg.max_position_embeddings:
    # as llama.cpp's converter: the llama architecture has no window (Mistral 7B v0.1's 4096)
    print(f"warning: --format gguf: sliding_window={window} is not written; llama.cpp attends to the whole "
          f"context, which differs past {window} tokens", file=sys.stderr)
  writer.add_rope_freq_base(cfg.rope_theta)
  if cfg.rope_type == "linear":
    import gguf
    writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
    writer.add_rope_scaling_factor(cfg.rope_factor)
  elif cfg.rope_type not in ("default", "llama3"):
    raise UnsupportedModelError(f"--format gguf: rope scaling {cfg.rope_type!r} is not written (default, linear, llama3)")
  if arch == "granite":  # its four multipliers, under llama.cpp's names
    writer.add_embedding_scale(cfg.embedding_multiplier)
    writer.add_attention_scale(1.0 if cfg.attention_multiplier is None else cfg.attention_multiplier)
    writer.add_residual_scale(cfg.residual_multiplier)
    writer.add_logit_scale(cfg.logits_scaling)
  if arch in _TOPK_RENORMALIZED:
    _write_moe(writer, cfg, arch)


def _write_moe(writer, cfg: ModelConfig, arch: str) -> None:
  """A Qwen2-/Qwen3-MoE's experts (config_from_hf has refused dense layers among them), refused
  where llama.cpp renormalises the top-k weights differently from the model."""
  if cfg.norm_topk_prob != _TOPK_RENORMALIZED[arch]:
    raise UnsupportedModelError(f"--format gguf: norm_topk_prob={cfg.norm_topk_prob} differs from "
                                f"llama.cpp's {arch}, which renormalises: {_TOPK_RENORMALIZED[arch]}")
  writer.add_expert_count(cfg.num_experts)
  writer.add_expert_used_count(cfg.num_experts_per_tok)
  writer.add_expert_feed_forward_length(cfg.expert_intermediate_size)
  if cfg.shared_expert_intermediate_size:
    writer.add_expert_shared_feed_forward_length(cfg.shared_expert_intermediate_size)


def llama3_rope_factors(cfg: ModelConfig) -> np.ndarray | None:
  """Llama 3.1+ rope scaling as llama.cpp stores it: each frequency's divisor (`rope_freqs`), or None."""
  if cfg.rope_type != "llama3":
    return None
  import dataclasses
  from jaxtune.models import rope as rope_lib
  base = np.asarray(rope_lib.rope_inv_freq(dataclasses.replace(cfg, rope_type="default")), np.float64)
  return (base / np.asarray(rope_lib.rope_inv_freq(cfg), np.float64)).astype(np.float32)


def _storage_type(name: str, shape: tuple[int, ...], gguf_type: str):
  """The GGML type a tensor is stored in: 1-d tensors (norms, biases, rope factors) stay float32, as
  llama.cpp keeps them."""
  import gguf
  if len(shape) == 1 or gguf_type == "f32":
    return gguf.GGMLQuantizationType.F32
  if gguf_type == "q8_0" and shape[-1] % 32:
    raise UnsupportedModelError(f"--gguf_type q8_0: {name} rows of {shape[-1]} do not split into blocks of 32")
  return {"f16": gguf.GGMLQuantizationType.F16, "bf16": gguf.GGMLQuantizationType.BF16,
          "q8_0": gguf.GGMLQuantizationType.Q8_0}[gguf_type]


def _stored(w: np.ndarray, qtype) -> np.ndarray:
  """w in GGML type qtype: float32 / float16 arrays, or the bytes of a quantized type."""
  import gguf
  if qtype == gguf.GGMLQuantizationType.F32:
    return w.astype(np.float32)
  if qtype == gguf.GGMLQuantizationType.F16:
    return w.astype(np.float16)
  return gguf.quants.quantize(w.astype(np.float32), qtype)


def _add_info(writer, gguf_name: str, shape: tuple[int, ...], qtype) -> None:
  """Declares a tensor before any is written (the file's header lists them all first)."""
  import gguf
  if qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
    dtype = np.float32 if qtype == gguf.GGMLQuantizationType.F32 else np.float16
    writer.add_tensor_info(gguf_name, shape, np.dtype(dtype), int(np.prod(shape)) * np.dtype(dtype).itemsize)
  else:
    byte_shape = gguf.quant_shape_to_byte_shape(shape, qtype)
    writer.add_tensor_info(gguf_name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), raw_dtype=qtype)


def _gguf_name(name_map, name: str, arch: str, suffix: str = "") -> str:
  gguf_name = name_map.get_name(name, try_suffixes=(".weight", ".bias"))
  if gguf_name is None:
    raise UnsupportedModelError(f"--format gguf: tensor {name!r} has no llama.cpp name for {arch}")
  return gguf_name + suffix


def _half(get: Callable[[str], np.ndarray], name: str, index: int) -> np.ndarray:
  """Gate (0) or up (1) of transformers' stacked gate_up_proj (E x 2F x D)."""
  w = get(name)
  return np.split(w, 2, axis=1)[index]


def _permuted(get: Callable[[str], np.ndarray], name: str, n_head: int) -> np.ndarray:
  return permute_qk(get(name), n_head)


def _stacked(get: Callable[[str], np.ndarray], names: list[str]) -> np.ndarray:
  return np.stack([get(n) for n in names])


def _as_vector(get: Callable[[str], np.ndarray], name: str) -> np.ndarray:
  return get(name).reshape(-1)


def _float32(get: Callable[[str], np.ndarray], name: str) -> np.ndarray:
  return get(name).astype(np.float32)


def tensor_plan(shapes: dict[str, tuple[int, ...]], get: Callable[[str], np.ndarray], cfg: ModelConfig,
                arch: str, name_map) -> list[tuple[str, tuple[int, ...], Callable[[], np.ndarray]]]:
  """(GGUF name, shape, produce() -> the float32 array) of every tensor, as llama.cpp's converter
  stores them: Q/K rows permuted (llama, granite); a layer's experts stacked E x out x in, gate and
  up apart; Qwen2-MoE's shared-expert gate as a vector."""
  heads = {"attn_q": cfg.num_heads, "attn_k": cfg.num_kv_heads}
  plan, experts = [], {}
  for name, shape in shapes.items():
    one, stacked = gguf_loading.EXPERT_TENSOR.fullmatch(name), _STACKED_EXPERTS.fullmatch(name)
    if one:
      experts.setdefault((one.group(1), one.group(3)), {})[int(one.group(2))] = name
    elif stacked and stacked.group(2) == "gate_up_proj":
      E, two_f, d = shape
      for index, projection in enumerate(("gate_proj", "up_proj")):
        plan.append((_gguf_name(name_map, f"{stacked.group(1)}.{projection}", arch, ".weight"), (E, two_f // 2, d),
                     functools.partial(_half, get, name, index)))
    elif stacked:
      plan.append((_gguf_name(name_map, f"{stacked.group(1)}.down_proj", arch, ".weight"), shape,
                   functools.partial(get, name)))
    elif name.endswith("shared_expert_gate.weight"):
      plan.append((_gguf_name(name_map, name, arch), (shape[-1],), functools.partial(_as_vector, get, name)))
    else:
      gguf_name = _gguf_name(name_map, name, arch)
      kind = gguf_name.split(".")[-2]
      produce = (functools.partial(_permuted, get, name, heads[kind]) if arch in gguf_loading.PERMUTED_QK and kind in heads
                 else functools.partial(get, name))
      plan.append((gguf_name, shape, produce))
  for (prefix, projection), by_expert in experts.items():
    names = [by_expert[e] for e in sorted(by_expert)]
    plan.append((_gguf_name(name_map, f"{prefix}.{projection}", arch, ".weight"), (len(names), *shapes[names[0]]),
                 functools.partial(_stacked, get, names)))
  return plan


def write_gguf(folder: str, out_path: str, gguf_type: str = "f16", progress: bool = False) -> None:
  """Converts the HF folder (config.json, safetensors, tokenizer.json) into the GGUF file `out_path`,
  one tensor in memory at a time."""
  import gguf
  if gguf_type not in GGUF_TYPES:
    raise ValueError(f"--gguf_type={gguf_type!r} is not one of {' | '.join(GGUF_TYPES)}")
  with open(os.path.join(folder, "config.json")) as f:
    config = json.load(f)
  tokenizer_path = os.path.join(folder, "tokenizer.json")
  if not os.path.isfile(tokenizer_path):
    raise UnsupportedModelError(f"--format gguf: {folder} has no tokenizer.json (a fast tokenizer is needed)")
  with open(tokenizer_path) as f:
    tokenizer_json = json.load(f)
  arch = check_convertible(config.get("model_type"), tokenizer_json)
  cfg = config_from_hf(config)
  tokens, token_types = _vocabulary(tokenizer_json, cfg.vocab_size)
  special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=len(tokens))  # merges, special ids, chat template
  adds_bos, adds_eos = adds_special_tokens(tokenizer_json)
  special.add_special_token.setdefault("bos", adds_bos)  # stated, not left to llama.cpp's default
  special.add_special_token.setdefault("eos", adds_eos)
  raw_get, shapes = loading.safetensors_getter(folder)
  get = functools.partial(_float32, raw_get)
  shapes = dict(sorted(shapes.items()))
  name_map = gguf.get_tensor_name_map(next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch), cfg.num_layers)
  if cfg.tie_word_embeddings:
    shapes.pop("lm_head.weight", None)  # llama.cpp writes output.weight only when it differs from the embedding
  plan = [(gguf_name, shape, _storage_type(gguf_name, shape, gguf_type), produce)
          for gguf_name, shape, produce in tensor_plan(shapes, get, cfg, arch, name_map)]

  tmp_path = out_path + ".tmp"
  writer = gguf.GGUFWriter(tmp_path, arch)
  writer.add_name(os.path.basename(os.path.normpath(folder)))
  _write_hparams(writer, cfg, arch)
  writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                        "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[gguf_type])
  writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
  writer.add_tokenizer_model("gpt2")
  writer.add_tokenizer_pre(pre_tokenizer_name(tokenizer_json))
  writer.add_token_list(tokens)
  writer.add_token_types(token_types)
  special.add_to_gguf(writer, quiet=True)
  factors = llama3_rope_factors(cfg)
  if factors is not None:
    writer.add_tensor_info("rope_freqs.weight", factors.shape, factors.dtype, factors.nbytes)
  for gguf_name, shape, qtype, _ in plan:
    _add_info(writer, gguf_name, shape, qtype)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_ti_data_to_file()
  if factors is not None:
    writer.write_tensor_data(factors)
  bar = None
  if progress:
    import tqdm
    bar = tqdm.tqdm(total=len(plan), desc="gguf", unit="tensor")
  for _, _, qtype, produce in plan:
    writer.write_tensor_data(_stored(produce(), qtype))
    if bar is not None:
      bar.update(1)
  if bar is not None:
    bar.close()
  writer.close()
  os.replace(tmp_path, out_path)  # a failed write leaves no half file under the final name
