"""Llama-family decoder (Llama 2/3, Mistral, Qwen2, Qwen3, Gemma 1/2/3 text, Phi-3/4, SmolLM2, and
the mixtures of experts Mixtral and Qwen3-MoE) as pure functions over a param pytree.

The params are a nested dict whose keys keep Hugging Face's module names, with the layers stacked
on a leading axis (scanned), e.g. `layers/self_attn/q_proj/kernel` has shape L x D x (H*hd).
Kernels are stored input-major (x @ kernel). PEFT methods add leaves (`lora_a`, `lora_b`,
`lora_magnitude`, `ia3_out`, `attn_adapter`, `prefix_k`, `prompt_embeddings`, ...) and the forward
pass uses whatever it finds: the tree says what the model is, no flags needed.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from jaxtune.models import attention, moe, quantization
from jaxtune.models.rope import apply_rope, rope_cos_sin
from jaxtune.models.config import ModelConfig
from jaxtune.models import matmul as matmuls
from jaxtune.models.matmul import matmul
from jaxtune.peft import prefix as prefix_tuning

Params = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class PeftRuntime:
  """Static knobs the forward pass needs for PEFT leaves it finds in the params."""

  lora_scale: float = 1.0
  lora_dropout: float = 0.0


# ----------------------------------------------------------------------------- parameters


def param_shapes(cfg: ModelConfig) -> Params:
  """Shapes of the base model's params (same tree as the params)."""
  L, D, F, V = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size

  def linear(n_in, n_out, bias):
    leaf = {"kernel": (L, n_in, n_out)}
    if bias:
      leaf["bias"] = (L, n_out)
    return leaf

  tree = {
      "embed_tokens": (V, D),
      "layers": {
          "input_layernorm": (L, D),
          "post_attention_layernorm": (L, D),
          "self_attn": {
              "q_proj": linear(D, cfg.q_size, cfg.qkv_bias),
              "k_proj": linear(D, cfg.kv_size, cfg.qkv_bias),
              "v_proj": linear(D, cfg.kv_size, cfg.qkv_bias),
              "o_proj": linear(cfg.q_size, D, cfg.o_bias),
          },
          "mlp": {
              "gate_proj": linear(D, F, cfg.mlp_bias),
              "up_proj": linear(D, F, cfg.mlp_bias),
              "down_proj": linear(F, D, cfg.mlp_bias),
          },
      },
      "norm": (D,),
  }
  if cfg.fused_projections:  # Phi-3, as transformers stores it
    tree["layers"]["self_attn"] = {"qkv_proj": linear(D, cfg.q_size + 2 * cfg.kv_size, cfg.qkv_bias),
                                   "o_proj": linear(cfg.q_size, D, cfg.o_bias)}
    tree["layers"]["mlp"] = {"gate_up_proj": linear(D, 2 * F, cfg.mlp_bias), "down_proj": linear(F, D, cfg.mlp_bias)}
  if cfg.num_experts:  # Mixtral, Qwen2-MoE, Qwen3-MoE
    tree["layers"]["mlp"] = moe.param_shapes(L, D, cfg.expert_intermediate_size, cfg.num_experts)
  if cfg.shared_expert_intermediate_size:  # Qwen2-MoE
    S = cfg.shared_expert_intermediate_size
    tree["layers"]["mlp"].update(
        shared_expert={"gate_proj": linear(D, S, False), "up_proj": linear(D, S, False), "down_proj": linear(S, D, False)},
        shared_expert_gate=linear(D, 1, False))
  if cfg.qk_norm:
    q_width, k_width = (cfg.q_size, cfg.kv_size) if cfg.qk_norm_whole else (cfg.head_dim, cfg.head_dim)
    tree["layers"]["self_attn"].update(q_norm=(L, q_width), k_norm=(L, k_width))
  if cfg.sandwich_norms:  # Gemma 3: post_attention_layernorm norms the attention output instead
    tree["layers"].update(pre_feedforward_layernorm=(L, D), post_feedforward_layernorm=(L, D))
  if cfg.post_norms:  # OLMo 2: only the outputs are normed
    del tree["layers"]["input_layernorm"]
    tree["layers"]["post_feedforward_layernorm"] = (L, D)
  if not cfg.tie_word_embeddings:
    tree["lm_head"] = {"kernel": (D, V)}
  return tree


def init_params(cfg: ModelConfig, rng: jax.Array, dtype=jnp.float32, std: float = 0.02) -> Params:
  """Random base params (normal(std) weights, unit norms, zero biases), for tests and from-scratch runs."""
  unit_norm = 1.0 - cfg.norm_weight_offset  # a norm scales by offset + weight
  shapes = param_shapes(cfg)
  leaves, treedef = jax.tree.flatten(shapes, is_leaf=lambda x: isinstance(x, tuple))
  paths = [jax.tree_util.keystr(p, simple=True, separator="/")
           for p, _ in jax.tree_util.tree_flatten_with_path(
               shapes, is_leaf=lambda x: isinstance(x, tuple))[0]]
  keys = jax.random.split(rng, len(leaves))
  out = []
  for path, shape, key in zip(paths, leaves, keys):
    if path.endswith("norm"):
      out.append(jnp.full(shape, unit_norm, dtype))
    elif path.endswith("bias"):
      out.append(jnp.zeros(shape, dtype))
    else:
      out.append((std * jax.random.normal(key, shape, jnp.float32)).astype(dtype))
  return jax.tree.unflatten(treedef, out)


# Logical axis names of each base leaf, by the last meaningful path component.
_KERNEL_AXES = {
    "q_proj": ("embed", "q_heads"),
    "k_proj": ("embed", "kv_heads"),
    "v_proj": ("embed", "kv_heads"),
    "o_proj": ("q_heads", "embed"),
    "gate_proj": ("embed", "mlp"),
    "up_proj": ("embed", "mlp"),
    "down_proj": ("mlp", "embed"),
    # Phi-3's fused projections: sharded over their whole output; the split into q, k, v (gate, up)
    # then moves data between tensor shards
    "qkv_proj": ("embed", "q_heads"),
    "gate_up_proj": ("embed", "mlp"),
}


def logical_axes(path: str, ndim: int) -> tuple[str | None, ...]:
  """Logical axis names for the param at `path` ('/'-joined keys) with `ndim` dims."""
  parts = path.split("/")
  name = parts[-1]
  layered = parts[0] == "layers"
  lead = ("layers",) if layered else ()
  if path == "embed_tokens":
    axes = ("vocab", "embed")
  elif path == "lm_head/kernel":
    axes = ("embed", "vocab")
  elif name in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                "post_feedforward_layernorm", "norm"):
    axes = lead + ("norm",)
  elif name in ("q_norm", "k_norm"):
    axes = lead + ("head_dim",)
  elif moe.is_expert_leaf(path):
    axes = lead + ("experts",) + _KERNEL_AXES[name]
  elif moe.is_expert_lora_leaf(path):  # E x in x r, E x r x out: split by expert, each expert's whole
    axes = lead + ("experts", None, None)
  elif len(parts) >= 2 and parts[-2] in _KERNEL_AXES:
    n_in, n_out = _KERNEL_AXES[parts[-2]]
    axes = {"kernel": lead + (n_in, n_out), "bias": lead + (n_out,),
            **{codes: lead + (n_out, n_in) for codes in quantization.CODE_LEAVES}, "kernel_absmax": lead + (n_out,),
            "kernel_absmax_code": lead + (n_out,), "kernel_absmax_scale": lead + (None,), "kernel_absmax_offset": lead,
            "lora_a": lead + (n_in, None), "lora_b": lead + (None, n_out),
            "lora_magnitude": lead + (n_out,), "ia3_in": lead + (n_in,), "ia3_out": lead + (n_out,)}.get(name)
  else:
    axes = None
  if axes is None or len(axes) != ndim:
    # PEFT leaves (adapters, prefixes) and anything unknown: layers axis if stacked, rest replicated.
    axes = lead + (None,) * (ndim - len(lead))
  return axes


# ----------------------------------------------------------------------------- building blocks


def rms_norm(x, weight, eps, weight_offset: float = 0.0):
  """x / rms(x) * (weight_offset + weight), in float32, the result in x's dtype."""
  x32 = x.astype(jnp.float32)
  x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return ((weight.astype(jnp.float32) + weight_offset) * x32).astype(x.dtype)


def model_norm(x, weight, cfg: ModelConfig):
  """The model's RMSNorm (Gemma's scales by 1 + weight)."""
  return rms_norm(x, weight, cfg.rms_norm_eps, cfg.norm_weight_offset)


def gated_activation(gate, up, hidden_act: str = "silu"):
  """act(gate) * up (SwiGLU; GeGLU, gelu exact or tanh-approximated) in float32, the result in gate's
  dtype: in bfloat16 on a backend without bf16 arithmetic (CPU) every op would round-trip through
  float32 and back."""
  g = gate.astype(jnp.float32)
  if hidden_act == "silu":
    activated = jax.nn.silu(g)
  else:
    activated = jax.nn.gelu(g, approximate=hidden_act == "gelu_pytorch_tanh")
  return (activated * up.astype(jnp.float32)).astype(gate.dtype)


def dense(p: Params, x, peft: PeftRuntime, rng=None):
  """x @ kernel (+ bias) (+ LoRA: dropout(x) @ A @ B * scale, DoRA-rescaled when it has a magnitude)
  (IA3: x and/or the output multiplied by learned vectors)."""
  if "ia3_in" in p:
    x = x * p["ia3_in"].astype(x.dtype)
  base = matmul(x, quantization.kernel_of(p, x.dtype))
  y = base + p["bias"].astype(x.dtype) if "bias" in p else base
  if "lora_a" in p:
    xa = x
    if rng is not None and peft.lora_dropout > 0:
      keep = jax.random.bernoulli(rng, 1.0 - peft.lora_dropout, x.shape)
      xa = jnp.where(keep, x / (1.0 - peft.lora_dropout), 0).astype(x.dtype)
    # the scale goes on B (r x out), not on the N x out product: one elementwise pass fewer each way
    delta = matmul(matmul(xa, p["lora_a"]), p["lora_b"] * peft.lora_scale)
    if "lora_magnitude" in p:
      delta = dora_delta(p, base if xa is x else matmul(xa, quantization.kernel_of(p, x.dtype)), delta, peft.lora_scale)
    y = y + delta
  if "ia3_out" in p:
    y = y * p["ia3_out"].astype(y.dtype)
  # remat_policy=dots keeps this output, so a LoRA projection's base and LoRA parts are not kept apart.
  # Not in low precision on CPU, where XLA would upcast a stack of saved bfloat16 outputs whole.
  return checkpoint_name(y, "projection") if y.dtype == jnp.float32 or not matmuls.cpu_layouts() else y


def dora_norm(kernel, lora_a, lora_b, scale: float):
  """||W + scale * A @ B|| per output feature (over the input axis), float32: DoRA's column norm."""
  f32 = jnp.float32
  return jnp.linalg.norm(kernel.astype(f32) + scale * jnp.matmul(lora_a.astype(f32), lora_b.astype(f32)), axis=-2)


def dora_delta(p: Params, base, lora_delta, scale: float):
  """DoRA (peft's use_dora): each output of (W + scale * A @ B) x is rescaled to the learned magnitude m,
  added to the base output: (m / norm - 1) * x W + (m / norm) * lora_delta. The norm is a constant to
  backprop (the paper's section 4.3, as peft); with dropout `base` is the dropped x's, as peft's.
  Computed in float32, one cast out: m / norm stays near 1, and in bfloat16 (8 bits) a change under
  0.4% would round away; on CPU each bfloat16 op would also round-trip through float32 (the
  bfloat16 DoRA step took 1.29x as long)."""
  f32 = jnp.float32
  norm = jax.lax.stop_gradient(dora_norm(quantization.kernel_of(p), p["lora_a"], p["lora_b"], scale))
  factor = p["lora_magnitude"].astype(f32) / norm
  return ((factor - 1) * base.astype(f32) + factor * lora_delta.astype(f32)).astype(base.dtype)


def bottleneck_adapter(p: Params, x):
  """Houlsby adapter: x + up(gelu(down(x)))."""
  h = matmul(x, p["down"]["kernel"]) + p["down"]["bias"].astype(x.dtype)
  h = jax.nn.gelu(h, approximate=False)
  return x + matmul(h, p["up"]["kernel"]) + p["up"]["bias"].astype(x.dtype)


# ----------------------------------------------------------------------------- the decoder


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=jnp.float32) -> Params:
  """Empty KV cache: per-layer keys/values plus each slot's position and segment (0 = empty)."""
  shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim)
  return {
      "k": jnp.zeros(shape, dtype),
      "v": jnp.zeros(shape, dtype),
      "pos": jnp.zeros((batch, max_len), jnp.int32),
      "seg": jnp.zeros((batch, max_len), jnp.int32),
      "index": jnp.zeros((), jnp.int32),
  }


def _layer(cfg, peft, x, layer, cos, sin, mask, cache_kv, cache_index, rngs, segment_ids=None, valid_N=None):
  """One decoder block on x_(B*T)xD. Returns (new hidden, (new cache k, new cache v) or None, an MoE
  layer's router stats over the `valid_N` tokens or None).
  segment_ids: given when `mask` is exactly "causal within segments" (see attention.py).

  Tokens stay flattened so every projection (and its weight gradient) is a 2-d matmul: XLA CPU
  runs dots that contract over both batch and time ~1.5x slower.
  """
  B, T = cos.shape[:2]
  attn = layer["self_attn"]
  h = x if cfg.post_norms else model_norm(x, layer["input_layernorm"], cfg)
  if "qkv_proj" in attn:  # Phi-3: one projection, q then k then v
    q, k, v = jnp.split(dense(attn["qkv_proj"], h, peft, rngs[0]), [cfg.q_size, cfg.q_size + cfg.kv_size], axis=-1)
  else:
    q, k, v = (dense(attn[name], h, peft, rng) for name, rng in zip(("q_proj", "k_proj", "v_proj"), rngs))
  if cfg.qk_norm_whole:  # OLMo 2: over all heads at once
    q, k = model_norm(q, attn["q_norm"], cfg), model_norm(k, attn["k_norm"], cfg)
  q = q.reshape(B, T, cfg.num_heads, cfg.head_dim)
  k, v = k.reshape(B, T, cfg.num_kv_heads, cfg.head_dim), v.reshape(B, T, cfg.num_kv_heads, cfg.head_dim)
  if cfg.qk_norm and not cfg.qk_norm_whole:  # Qwen3, Gemma 3: per head
    q, k = model_norm(q, attn["q_norm"], cfg), model_norm(k, attn["k_norm"], cfg)
  if cfg.query_scale != 1.0:  # Gemma 2/3, Granite; attention divides by sqrt(head_dim)
    q = q * cfg.query_scale
  q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
  new_kv = None
  if cache_kv is not None:
    ck, cv = cache_kv
    k = jax.lax.dynamic_update_slice_in_dim(ck, k.astype(ck.dtype), cache_index, axis=1)
    v = jax.lax.dynamic_update_slice_in_dim(cv, v.astype(cv.dtype), cache_index, axis=1)
    new_kv = (k, v)
    k, v = k.astype(x.dtype), v.astype(x.dtype)
  if "prefix_k" in attn:
    pk = jnp.broadcast_to(attn["prefix_k"].astype(x.dtype), (B,) + attn["prefix_k"].shape)
    pv = jnp.broadcast_to(attn["prefix_v"].astype(x.dtype), (B,) + attn["prefix_v"].shape)
    k, v = jnp.concatenate([pk, k], axis=1), jnp.concatenate([pv, v], axis=1)  # `mask` covers them
  causal_prefix = None if cache_kv is not None else k.shape[1] - T  # no cache: keys in token order
  attended = attention.grouped_attention(q, k, v, mask, causal_prefix, cfg.attention, segment_ids,
                                         cfg.attn_logit_softcap)
  out = dense(attn["o_proj"], attended.reshape(B * T, -1), peft, rngs[3])
  if "attn_adapter" in layer:
    out = bottleneck_adapter(layer["attn_adapter"], out)
  normed_outputs = cfg.sandwich_norms or cfg.post_norms
  if normed_outputs:
    out = model_norm(out, layer["post_attention_layernorm"], cfg)
  x = x + _residual_scaled(out, cfg)
  mlp = layer["mlp"]
  if cfg.post_norms:
    h = x
  else:
    h = model_norm(x, layer["pre_feedforward_layernorm" if cfg.sandwich_norms else "post_attention_layernorm"], cfg)
  stats = None
  if cfg.num_experts:
    out, stats = moe.moe_mlp(mlp, h, cfg.num_experts_per_tok, cfg.norm_topk_prob,
                             lambda gate, up: gated_activation(gate, up, cfg.hidden_act), cfg.moe_dispatch, valid_N,
                             peft.lora_scale)
    if "shared_expert" in mlp:  # Qwen2-MoE: a dense MLP every token takes, scaled by a sigmoid gate
      scale = jax.nn.sigmoid(dense(mlp["shared_expert_gate"], h, peft).astype(jnp.float32)).astype(h.dtype)
      out = out + scale * _gated_mlp(mlp["shared_expert"], h, cfg, peft, rngs)
  else:
    out = _gated_mlp(mlp, h, cfg, peft, rngs)
  if "mlp_adapter" in layer:
    out = bottleneck_adapter(layer["mlp_adapter"], out)
  if normed_outputs:
    out = model_norm(out, layer["post_feedforward_layernorm"], cfg)
  return x + _residual_scaled(out, cfg), new_kv, stats


def _gated_mlp(mlp: Params, h, cfg: ModelConfig, peft: PeftRuntime, rngs):
  """down(act(gate(h)) * up(h)); Phi-3's gate and up are one projection (gate_up_proj, gate first)."""
  if "gate_up_proj" in mlp:
    gate, up = jnp.split(dense(mlp["gate_up_proj"], h, peft, rngs[4]), 2, axis=-1)
  else:
    gate, up = dense(mlp["gate_proj"], h, peft, rngs[4]), dense(mlp["up_proj"], h, peft, rngs[5])
  return dense(mlp["down_proj"], gated_activation(gate, up, cfg.hidden_act), peft, rngs[6])


def _residual_scaled(out, cfg: ModelConfig):
  """A block's output as the residual stream takes it (Granite scales it)."""
  return out if cfg.residual_multiplier == 1.0 else out * jnp.asarray(cfg.residual_multiplier, out.dtype)


# remat: what each scanned layer keeps for the backward pass; the rest is recomputed there.
REMAT_POLICIES = {
    "nothing": jax.checkpoint_policies.nothing_saveable,  # the layer input only: least memory
    # matmul outputs; blocked attention's float32 output and log-sum-exp, and cuDNN attention's
    # outputs (so neither backward reruns the attention forward); also each projection's output
    # (with LoRA: once, not its base and LoRA parts), but in bfloat16 only off CPU: XLA:CPU would
    # upcast those saved bfloat16 stacks whole before the backward loop. On CPU a bfloat16 projection's dot sits in matmul.py's custom
    # gradient, which the policy cannot see, so it is recomputed (cheaper there than kept); on TPU
    # and GPU it is a plain dot and is kept. Norms, RoPE, SiLU and residual adds are recomputed. On
    # CPU faster than no remat (docs/benchmark.md).
    "dots": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.save_from_both_policies(
            jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
            jax.checkpoint_policies.save_only_these_names("projection", "attention_out", "attention_lse")),
        attention.keeps_cudnn_attention),
}


# model.layer_loop. A scanned layer's saved activations are copied into L-stacked buffers in the
# forward pass and out of them in the backward pass (cuBLAS cannot write into a slice): on an H100,
# 44 ms of a 545 ms Llama-1B step (batch 32 x 1024); unrolled, 494 ms (docs/benchmark.md).
LAYER_LOOPS = ("auto", "scan", "unrolled")


def layers_unrolled(cfg: ModelConfig) -> bool:
  """Whether a pass without a cache runs the layers as straight-line code (see LAYER_LOOPS)."""
  if cfg.layer_loop == "auto":
    return jax.default_backend() == "gpu"
  return cfg.layer_loop == "unrolled"


def prefix_length(params: Params) -> int:
  attn = params["layers"]["self_attn"]
  return attn["prefix_k"].shape[1] if "prefix_k" in attn else 0


def forward(
    params: Params,
    cfg: ModelConfig,
    tokens_BxT,
    positions_BxT=None,
    segment_ids_BxT=None,
    *,
    cache: Params | None = None,
    peft: PeftRuntime = PeftRuntime(),
    rng: jax.Array | None = None,
    remat: str = "",
    compute_dtype=jnp.float32,
    return_hidden: bool = False,
    input_embeds_BxTxD=None,
    router_stats: bool = False,
):
  """Logits (B x T x V, float32) and the updated cache (or None); with `router_stats` (MoE models)
  also (times each expert was chosen, its summed probability, valid tokens) summed over the layers.

  positions default to 0..T-1 (or continue from the cache); segment ids default to 1 (0 = padding).
  A prefix-tuning prefix shifts real positions by its length, as peft's past_key_values do.
  `input_embeds_BxTxD` replaces what the embedding layer returns (tokens_BxT then only gives the shape).
  """
  params = prefix_tuning.materialize_prefix(params, cfg)  # a reparametrised prefix's MLP, if present
  B, T = tokens_BxT.shape
  if segment_ids_BxT is None:
    segment_ids_BxT = jnp.ones((B, T), jnp.int32)
  if positions_BxT is None:
    start = 0 if cache is None else cache["index"]
    positions_BxT = jnp.broadcast_to(start + jnp.arange(T, dtype=jnp.int32), (B, T))
  P = prefix_length(params)
  rope_positions = positions_BxT + P
  # Gemma 3: the sliding-window layers get their own mask and rope; Mistral windows every layer
  per_layer = bool(cfg.sliding_layers)
  every_layer_window = None if per_layer else cfg.sliding_window
  if cache is None:
    key_pos, key_seg = positions_BxT, segment_ids_BxT
    new_pos = new_seg = None
  else:
    idx = cache["index"]
    new_pos = jax.lax.dynamic_update_slice_in_dim(cache["pos"], positions_BxT.astype(jnp.int32), idx, 1)
    new_seg = jax.lax.dynamic_update_slice_in_dim(cache["seg"], segment_ids_BxT.astype(jnp.int32), idx, 1)
    key_pos, key_seg = new_pos, new_seg

  def mask_with(window):
    mask = attention.attention_mask(positions_BxT, segment_ids_BxT, key_pos, key_seg, window)
    mask = attention.in_token_order(mask) if cache is None else mask
    if P:  # a prefix's P slots come first, at positions 0..P-1 (peft's past key/values): a window hides them too
      seen = (rope_positions[:, :, None] - jnp.arange(P)) < window if window else jnp.ones((B, T, P), bool)
      mask = jnp.concatenate([seen, mask], axis=-1)
    return mask

  masks = (mask_with(every_layer_window),) + ((mask_with(cfg.sliding_window),) if per_layer else ())
  local_rope = per_layer and cfg.local_rope_theta is not None
  cos_sin = (rope_cos_sin(cfg, rope_positions),) + ((rope_cos_sin(cfg, rope_positions, local=True),)
                                                     if local_rope else ())

  if input_embeds_BxTxD is None:
    x = params["embed_tokens"].astype(compute_dtype)[tokens_BxT.reshape(B * T)]
    if cfg.embed_scale != 1.0:  # Gemma scales in its embedding layer
      x = x * jnp.asarray(cfg.embed_scale, compute_dtype)
  else:
    x = input_embeds_BxTxD.reshape(B * T, -1).astype(compute_dtype)
  if cfg.embedding_multiplier != 1.0:  # Granite scales the model's input, given embeddings too
    x = x * jnp.asarray(cfg.embedding_multiplier, compute_dtype)
  if rng is None:
    layer_rngs = jnp.zeros((cfg.num_layers,), jnp.uint32)  # placeholder, unused
  else:
    layer_rngs = jax.random.split(rng, cfg.num_layers)
  sliding_L = jnp.asarray(cfg.sliding_layers) if per_layer else None  # scanned with the layers
  nope_L = jnp.asarray(cfg.nope_layers) if cfg.nope_layers else None

  valid_N = (segment_ids_BxT > 0).reshape(B * T)  # the tokens an MoE router's statistics count
  # without a cache or sliding window, the mask is "causal within segments" (positions rise in a segment)
  causal_segments = segment_ids_BxT if cache is None and not cfg.sliding_window else None

  def body(x, xs):
    layer, kv, lrng, sliding, nope = xs
    rngs = [None] * 7 if rng is None else list(jax.random.split(lrng, 7))
    mask, (cos, sin) = masks[0], cos_sin[0]
    if per_layer:
      mask = jnp.where(sliding, masks[1], mask)
    if local_rope:
      cos, sin = jnp.where(sliding, cos_sin[1][0], cos), jnp.where(sliding, cos_sin[1][1], sin)
    if nope is not None:  # cos 1, sin 0: rope leaves q and k as they are
      cos, sin = jnp.where(nope, jnp.ones_like(cos), cos), jnp.where(nope, jnp.zeros_like(sin), sin)
    y, new_kv, stats = _layer(cfg, peft, x, layer, cos, sin, mask, kv,
                              None if cache is None else cache["index"], rngs, causal_segments, valid_N)
    return y, (new_kv, stats if router_stats else None)

  if remat:
    body = jax.checkpoint(body, policy=REMAT_POLICIES[remat])
  kv_in = None if cache is None else (cache["k"], cache["v"])
  unroll = cfg.num_layers if cache is None and layers_unrolled(cfg) else 1
  x, (kv_out, stats_L) = jax.lax.scan(body, x, (params["layers"], kv_in, layer_rngs, sliding_L, nope_L),
                                     unroll=unroll)
  x = model_norm(x.reshape(B, T, -1), params["norm"], cfg)
  new_cache = None
  if cache is not None:
    new_cache = {"k": kv_out[0], "v": kv_out[1], "pos": new_pos, "seg": new_seg,
                 "index": cache["index"] + T}
  out = x if return_hidden else lm_logits(params, x, cfg)
  if router_stats:
    if not cfg.num_experts:
      raise ValueError("router_stats: the model has no mixture-of-experts layers")
    chosen, probs = (jnp.sum(s, axis=0) for s in stats_L)
    return out, new_cache, (chosen, probs, cfg.num_layers * jnp.sum(valid_N.astype(jnp.float32)))
  return out, new_cache


def head_kernel(params: Params, dtype, cfg: ModelConfig) -> jax.Array:
  """The LM head as D x V in `dtype`: lm_head's kernel, or the transposed embedding when tied
  (Granite: divided by logits_scaling, which divides the logits)."""
  kernel = params["lm_head"]["kernel"].astype(dtype) if "lm_head" in params else params["embed_tokens"].astype(dtype).T
  return kernel if cfg.logits_scaling == 1.0 else kernel / jnp.asarray(cfg.logits_scaling, dtype)


def lm_logits(params: Params, hidden_BxTxD, cfg: ModelConfig):
  """float32 logits (... x V), soft-capped when the model says so (Gemma 2/3); tokens are flattened
  for a 2-d matmul (see `_layer`)."""
  h_NxD = hidden_BxTxD.reshape(-1, hidden_BxTxD.shape[-1])
  w_DxV = head_kernel(params, h_NxD.dtype, cfg)
  logits = attention.capped(jnp.einsum("nd,dv->nv", h_NxD, w_DxV, preferred_element_type=jnp.float32),
                            cfg.final_logit_softcap)
  return logits.reshape(*hidden_BxTxD.shape[:-1], logits.shape[-1])


@jax.custom_vjp
def token_nll(logits_BxTxV, targets_BxT):
  """Per-token negative log-likelihood in float32.

  Custom gradient (softmax - one_hot) in one fused pass: autodiff of logsumexp makes several
  passes over the B x T x V logits, ~1/3 of the LM head's training time on CPU.
  """
  return _token_nll_fwd(logits_BxTxV, targets_BxT)[0]


def _token_nll_fwd(logits_BxTxV, targets_BxT):
  logits = logits_BxTxV.astype(jnp.float32)
  lse_BxT = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, targets_BxT[..., None], axis=-1)[..., 0]
  return lse_BxT - target_logit, (logits_BxTxV, targets_BxT, lse_BxT)


def _token_nll_bwd(residuals, g_BxT):
  logits_BxTxV, targets_BxT, lse_BxT = residuals
  V = logits_BxTxV.shape[-1]
  probs = jnp.exp(logits_BxTxV.astype(jnp.float32) - lse_BxT[..., None])
  one_hot = targets_BxT[..., None] == jnp.arange(V, dtype=targets_BxT.dtype)
  d_logits = (probs - one_hot) * g_BxT[..., None].astype(jnp.float32)
  targets_zero_grad = np.zeros(targets_BxT.shape, jax.dtypes.float0)  # integer input: no gradient
  return d_logits.astype(logits_BxTxV.dtype), targets_zero_grad


token_nll.defvjp(_token_nll_fwd, _token_nll_bwd)
