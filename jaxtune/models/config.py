"""Decoder configuration, read from a Hugging Face config.json (transformers 4 or 5 spelling)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "mixtral",
                         "qwen2_moe", "qwen3_moe", "phi3", "olmo2", "olmo3", "granite", "smollm3")
# transformers' causal-LM class of each model type (config.json's "architectures")
CAUSAL_LM_CLASSES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                     "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                     "gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM",
                     "gemma3_text": "Gemma3ForCausalLM", "mixtral": "MixtralForCausalLM",
                     "qwen2_moe": "Qwen2MoeForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
                     "phi3": "Phi3ForCausalLM",
                     "olmo2": "Olmo2ForCausalLM", "olmo3": "Olmo3ForCausalLM", "granite": "GraniteForCausalLM",
                     "smollm3": "SmolLM3ForCausalLM"}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn", "longrope")
SUPPORTED_ACTIVATIONS = ("silu", "gelu_pytorch_tanh", "gelu")  # the gate's activation in the gated MLP


class UnsupportedModelError(ValueError):
  """The checkpoint asks for an architecture or feature jaxtune does not implement."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Static description of a Llama-family decoder (hashable: used as a jit static argument)."""

  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  rope_type: str = "default"
  rope_factor: float = 1.0
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_max_positions: int = 8192
  # YaRN: the ramp between interpolated and original frequencies, and the cos/sin scale
  rope_beta_fast: float = 32.0
  rope_beta_slow: float = 1.0
  rope_truncate: bool = True
  rope_attention_factor: float = 1.0  # YaRN, longrope: cos and sin are scaled by it
  # longrope (Phi-3): a divisor per frequency for inputs within the original context, one for longer
  rope_short_factor: tuple[float, ...] = ()
  rope_long_factor: tuple[float, ...] = ()
  partial_rotary_factor: float = 1.0  # the share of each head that rotates (Phi-4-mini: 0.75)
  max_position_embeddings: int = 2048
  tie_word_embeddings: bool = False
  qkv_bias: bool = False
  o_bias: bool = False
  mlp_bias: bool = False
  qk_norm: bool = False  # Qwen3, Gemma 3: RMSNorm over each head of q and k before RoPE
  qk_norm_whole: bool = False  # OLMo 2/3: q_norm / k_norm span the whole projection, before the split into heads
  # Phi-3: q, k and v are one projection (qkv_proj, in that order), gate and up one too (gate_up_proj)
  fused_projections: bool = False
  # OLMo 2/3: no norm before attention or the MLP; each one's output is normed (post_attention_layernorm,
  # post_feedforward_layernorm) before the residual add
  post_norms: bool = False
  # Granite: the model's input (embeddings, or embeddings given) scales by embedding_multiplier, scores by
  # attention_multiplier (not 1/sqrt(head_dim)), the attention and MLP outputs by residual_multiplier
  # before the residual add, logits by 1 / logits_scaling
  embedding_multiplier: float = 1.0
  attention_multiplier: float | None = None
  residual_multiplier: float = 1.0
  logits_scaling: float = 1.0
  hidden_act: str = "silu"  # one of SUPPORTED_ACTIVATIONS
  # Gemma: norms scale by (1 + weight); embeddings by sqrt(hidden_size). Gemma 2 and 3: the attention
  # and MLP outputs are normed too ("sandwich"); scores scale by 1/sqrt(query_pre_attn_scalar);
  # scores (Gemma 2) and logits are soft-capped: cap * tanh(x / cap)
  norm_weight_offset: float = 0.0
  embed_scale: float = 1.0
  sandwich_norms: bool = False
  query_pre_attn_scalar: int | None = None
  attn_logit_softcap: float | None = None
  final_logit_softcap: float | None = None
  # per layer, whether it attends within sliding_window (Gemma 2, 3), with rope base local_rope_theta
  # when set (Gemma 3); () = every layer alike, windowed when sliding_window is set (Mistral)
  sliding_layers: tuple[bool, ...] = ()
  # per layer, whether it leaves q and k without rotary embeddings (SmolLM3's NoPE layers); () = none
  nope_layers: tuple[bool, ...] = ()
  local_rope_theta: float | None = None
  sliding_window: int | None = None
  # mixture of experts (Mixtral, Qwen3-MoE; moe.py): every layer's MLP is num_experts experts of
  # width expert_intermediate_size, num_experts_per_tok of them per token; 0 = a dense MLP
  num_experts: int = 0
  num_experts_per_tok: int = 0
  expert_intermediate_size: int = 0
  norm_topk_prob: bool = True
  # Qwen2-MoE: a dense MLP of this width (mlp/shared_expert) that every token takes, scaled by
  # sigmoid(h @ mlp/shared_expert_gate); 0 = none
  shared_expert_intermediate_size: int = 0
  model_type: str = "llama"
  bos_token_id: int | None = None
  eos_token_ids: tuple[int, ...] = ()
  pad_token_id: int | None = None
  # attention kernel, not read from config.json: one of attention.IMPLEMENTATIONS (model.attention)
  attention: str = "auto"
  # the layers in a pass without a cache: "auto" | "scan" | "unrolled" (model.layer_loop, llama.LAYER_LOOPS)
  layer_loop: str = "auto"
  # how MoE layers run their experts: "auto" | "dense" | "ragged" (model.moe_dispatch, moe.DISPATCHES)
  moe_dispatch: str = "auto"

  @property
  def q_size(self) -> int:
    return self.num_heads * self.head_dim

  @property
  def kv_size(self) -> int:
    return self.num_kv_heads * self.head_dim

  @property
  def query_scale(self) -> float:
    """What q is multiplied by so that attention's 1/sqrt(head_dim) gives the family's score scale."""
    if self.attention_multiplier is not None:
      return self.attention_multiplier * math.sqrt(self.head_dim)
    if self.query_pre_attn_scalar:
      return math.sqrt(self.head_dim / self.query_pre_attn_scalar)
    return 1.0

  @property
  def rotary_dim(self) -> int:
    """The leading dims of each head that RoPE rotates (as transformers: int(head_dim * factor))."""
    return int(self.head_dim * self.partial_rotary_factor)


def _as_tuple(value: Any) -> tuple[int, ...]:
  if value is None:
    return ()
  if isinstance(value, (list, tuple)):
    return tuple(int(v) for v in value)
  return (int(value),)


def _rope_fields(hf: dict[str, Any]) -> dict[str, Any]:
  """Reads `rope_parameters` (transformers 5; Gemma 3: one per layer type) or `rope_theta` +
  `rope_scaling` (+ Gemma 3's `rope_local_base_freq`, Phi-3's top-level original context, transformers 4)."""
  params = dict(hf.get("rope_scaling") or {})
  given = dict(hf.get("rope_parameters") or {})
  local_theta = hf.get("rope_local_base_freq")
  if "full_attention" in given:
    local = given.get("sliding_attention") or {}
    if local.get("rope_type", "default") != "default":
      raise UnsupportedModelError(f"sliding-attention rope type {local['rope_type']!r} is not supported")
    local_theta = local.get("rope_theta", local_theta)
    given = given["full_attention"]
  params.update(given)
  theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
  rope_type = params.get("rope_type", params.get("type", "default"))
  if hf.get("model_type") == "phi3" and rope_type in ("su", "yarn"):  # Phi-3's old names for longrope
    rope_type = "longrope"
  if rope_type not in SUPPORTED_ROPE_TYPES:
    raise UnsupportedModelError(
        f"rope type {rope_type!r} is not supported (supported: {', '.join(SUPPORTED_ROPE_TYPES)})")
  original_max = int(params.get("original_max_position_embeddings", hf.get(
      "original_max_position_embeddings" if rope_type == "longrope" else "max_position_embeddings",
      hf.get("max_position_embeddings", 8192))))
  factor = params.get("factor")
  if factor is None:  # YaRN without a factor (DeepSeek-V3 style), longrope: the context's growth
    factor = (hf.get("max_position_embeddings", original_max) / original_max if rope_type in ("yarn", "longrope")
              else 1.0)
  attention_factor = 1.0
  if rope_type == "yarn":
    attention_factor = _yarn_attention_factor(params, float(factor))
  elif rope_type == "longrope":
    attention_factor = _longrope_attention_factor(params, float(factor), original_max)
  return dict(
      rope_theta=float(theta),
      rope_type=rope_type,
      rope_factor=float(factor),
      rope_low_freq_factor=float(params.get("low_freq_factor", 1.0)),
      rope_high_freq_factor=float(params.get("high_freq_factor", 4.0)),
      rope_original_max_positions=original_max,
      rope_beta_fast=float(params.get("beta_fast") or 32.0),
      rope_beta_slow=float(params.get("beta_slow") or 1.0),
      rope_truncate=bool(params.get("truncate", True)),
      rope_attention_factor=attention_factor,
      rope_short_factor=tuple(float(f) for f in params.get("short_factor") or ()),
      rope_long_factor=tuple(float(f) for f in params.get("long_factor") or ()),
      partial_rotary_factor=float(params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))),
      local_rope_theta=None if local_theta is None else float(local_theta),
  )


def _longrope_attention_factor(params: dict[str, Any], factor: float, original_max: int) -> float:
  """longrope's cos/sin scale: `attention_factor` if given, else sqrt(1 + ln(factor) / ln(original
  context)) for a grown context, as transformers computes it."""
  if params.get("attention_factor") is not None:
    return float(params["attention_factor"])
  return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original_max))


def _yarn_attention_factor(params: dict[str, Any], factor: float) -> float:
  """YaRN's cos/sin scale: `attention_factor` if given, else 0.1 ln(factor) + 1 (with DeepSeek's
  mscale / mscale_all_dim, the ratio of two such), as transformers computes it."""
  if params.get("attention_factor") is not None:
    return float(params["attention_factor"])

  def mscale(scale: float, m: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

  if params.get("mscale") and params.get("mscale_all_dim"):
    return mscale(factor, params["mscale"]) / mscale(factor, params["mscale_all_dim"])
  return mscale(factor)


def _gemma_fields(hf: dict[str, Any], model_type: str, rope: dict[str, Any]) -> dict[str, Any]:
  """Gemma 1-3's departures from Llama (see ModelConfig). Gemma 3 applies no attention soft-capping
  whatever its config says (as transformers); bidirectional attention (Gemma 3's vision tower) is not
  implemented."""
  if hf.get("use_bidirectional_attention"):
    raise UnsupportedModelError(f"{model_type} use_bidirectional_attention=True is not supported")
  fields: dict[str, Any] = dict(norm_weight_offset=1.0, embed_scale=float(hf["hidden_size"]) ** 0.5,
                                tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)))
  if model_type == "gemma":
    return fields
  layers = int(hf["num_hidden_layers"])
  pattern = int(hf.get("sliding_window_pattern", hf.get("_sliding_window_pattern",
                                                        2 if model_type == "gemma2" else 6)))
  layer_types = hf.get("layer_types") or [
      "full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(layers)]
  cap = lambda key: float(hf[key]) if hf.get(key) else None  # noqa: E731
  fields.update(sandwich_norms=True, query_pre_attn_scalar=int(hf.get("query_pre_attn_scalar", 256)),
                sliding_layers=tuple(t == "sliding_attention" for t in layer_types),
                sliding_window=int(hf["sliding_window"]), final_logit_softcap=cap("final_logit_softcapping"))
  if model_type == "gemma2":
    fields.update(attn_logit_softcap=cap("attn_logit_softcapping"))
  else:
    fields.update(qk_norm=True, local_rope_theta=rope["local_rope_theta"] or 10000.0)
  return fields


def _olmo_fields(hf: dict[str, Any], model_type: str, rope: dict[str, Any]) -> dict[str, Any]:
  """OLMo 2/3: post-norms, q/k norms over whole projections; OLMo 3's windowed layers (`layer_types`)."""
  fields: dict[str, Any] = dict(post_norms=True, qk_norm=True, qk_norm_whole=True, sliding_window=None)
  if model_type == "olmo3":
    layers = int(hf["num_hidden_layers"])
    layer_types = hf.get("layer_types") or [
        "full_attention" if (i + 1) % 4 == 0 else "sliding_attention" for i in range(layers)]
    fields.update(sliding_layers=tuple(t == "sliding_attention" for t in layer_types),
                  sliding_window=int(hf["sliding_window"]), local_rope_theta=rope["local_rope_theta"])
  return fields


def _smollm3_fields(hf: dict[str, Any]) -> dict[str, Any]:
  """SmolLM3: NoPE layers (`no_rope_layers`: 1 = rope, 0 = none; by default every 4th layer has
  none) and, with use_sliding_window, windows on the `layer_types` marked sliding (by default the
  NoPE layers), as transformers' SmolLM3Config builds them."""
  layers = int(hf["num_hidden_layers"])
  interval = int(hf.get("no_rope_layer_interval", 4))
  uses_rope = hf.get("no_rope_layers") or [int((i + 1) % interval != 0) for i in range(layers)]
  fields: dict[str, Any] = dict(nope_layers=tuple(not r for r in uses_rope[:layers]))
  if hf.get("use_sliding_window") and hf.get("sliding_window"):
    layer_types = hf.get("layer_types") or ["sliding_attention" if nope else "full_attention"
                                            for nope in fields["nope_layers"]]
    fields.update(sliding_layers=tuple(t == "sliding_attention" for t in layer_types[:layers]),
                  sliding_window=int(hf["sliding_window"]))
  return fields


def _granite_fields(hf: dict[str, Any]) -> dict[str, Any]:
  """Granite's four multipliers (see ModelConfig)."""
  return dict(embedding_multiplier=float(hf.get("embedding_multiplier", 1.0)),
              attention_multiplier=float(hf.get("attention_multiplier", 1.0)),
              residual_multiplier=float(hf.get("residual_multiplier", 1.0)),
              logits_scaling=float(hf.get("logits_scaling", 1.0)))


def _moe_fields(hf: dict[str, Any], model_type: str) -> dict[str, Any]:
  """Mixtral / Qwen2-MoE / Qwen3-MoE: experts in every layer (dense layers are not supported); Qwen2-MoE's
  shared expert."""
  if model_type == "mixtral":
    if float(hf.get("router_jitter_noise") or 0.0):
      raise UnsupportedModelError("mixtral router_jitter_noise > 0 is not supported")
    return dict(num_experts=int(hf["num_local_experts"]), num_experts_per_tok=int(hf["num_experts_per_tok"]),
                expert_intermediate_size=int(hf["intermediate_size"]))
  if int(hf.get("decoder_sparse_step", 1)) != 1 or hf.get("mlp_only_layers"):
    raise UnsupportedModelError(f"{model_type} with dense layers (decoder_sparse_step != 1 or mlp_only_layers) "
                                "is not supported")
  experts = hf.get("num_local_experts") or hf["num_experts"]  # transformers 5 / 4 spelling
  fields = dict(num_experts=int(experts), num_experts_per_tok=int(hf["num_experts_per_tok"]),
                expert_intermediate_size=int(hf["moe_intermediate_size"]),
                norm_topk_prob=bool(hf.get("norm_topk_prob", False)))
  if model_type == "qwen2_moe":
    return dict(fields, shared_expert_intermediate_size=int(hf["shared_expert_intermediate_size"]))
  return dict(fields, qk_norm=True)


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
  """Builds a ModelConfig from a config.json dict; unsupported features raise UnsupportedModelError."""
  model_type = hf.get("model_type", "llama")
  if model_type not in SUPPORTED_MODEL_TYPES:
    raise UnsupportedModelError(
        f"model_type {model_type!r} is not supported (supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
  act = hf.get("hidden_activation") or hf.get("hidden_act", "silu")  # Gemma: hidden_activation
  if act not in SUPPORTED_ACTIVATIONS:
    raise UnsupportedModelError(
        f"hidden_act {act!r} is not supported (supported: {', '.join(SUPPORTED_ACTIVATIONS)})")
  if int(hf.get("pretraining_tp", 1)) != 1:
    raise UnsupportedModelError("pretraining_tp != 1 is not supported")
  num_heads = int(hf["num_attention_heads"])
  hidden = int(hf["hidden_size"])
  head_dim = hf.get("head_dim") or hidden // num_heads
  sliding_window = None
  if model_type in ("mistral", "mixtral", "phi3"):
    sliding_window = hf.get("sliding_window")
  elif model_type in ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe") and hf.get("use_sliding_window"):
    raise UnsupportedModelError(f"{model_type} use_sliding_window=True (per-layer windows) is not supported")
  attention_bias = bool(hf.get("attention_bias", False))
  family: dict[str, Any] = dict(qk_norm=model_type == "qwen3", fused_projections=model_type == "phi3",
                                sliding_window=int(sliding_window) if sliding_window else None)
  rope = _rope_fields(hf)
  if rope["partial_rotary_factor"] != 1.0 and model_type != "phi3":
    raise UnsupportedModelError(f"{model_type}: partial_rotary_factor != 1 is not supported")
  if model_type.startswith("gemma"):
    family = _gemma_fields(hf, model_type, rope)
  if model_type in ("mixtral", "qwen2_moe", "qwen3_moe"):
    family.update(_moe_fields(hf, model_type))
  if model_type in ("olmo2", "olmo3"):
    family.update(_olmo_fields(hf, model_type, rope))
  if model_type == "granite":
    family.update(_granite_fields(hf))
  if model_type == "smollm3":
    family.update(_smollm3_fields(hf))
  fields = dict(
      vocab_size=int(hf["vocab_size"]),
      hidden_size=hidden,
      intermediate_size=int(hf["intermediate_size"]),
      num_layers=int(hf["num_hidden_layers"]),
      num_heads=num_heads,
      num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
      head_dim=int(head_dim),
      rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
      max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
      tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
      qkv_bias=attention_bias or model_type == "qwen2" or (model_type == "qwen2_moe" and hf.get("qkv_bias", True)),
      o_bias=attention_bias,
      mlp_bias=bool(hf.get("mlp_bias", False)),
      hidden_act=act,
      model_type=model_type,
      bos_token_id=hf.get("bos_token_id"),
      eos_token_ids=_as_tuple(hf.get("eos_token_id")),
      pad_token_id=hf.get("pad_token_id"),
      **rope,
  )
  cfg = ModelConfig(**{**fields, **family})
  lengths = (len(cfg.rope_short_factor), len(cfg.rope_long_factor))
  if cfg.rope_type == "longrope" and lengths != (cfg.rotary_dim // 2,) * 2:
    raise UnsupportedModelError(f"longrope: short_factor and long_factor need {cfg.rotary_dim // 2} values each "
                                f"(half the rotary dims), not {lengths[0]} and {lengths[1]}")
  return cfg


def read_hf_config(folder: str) -> dict[str, Any]:
  with open(os.path.join(folder, "config.json")) as f:
    return json.load(f)
