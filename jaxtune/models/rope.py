"""Rotary position embeddings as transformers computes them: rope types default, linear, llama3, yarn
and longrope (Phi-3), over all of a head or its first `rotary_dim` dims (partial rotary, Phi-4-mini)."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from jaxtune.models.config import ModelConfig


def rope_inv_freq(cfg: ModelConfig, long: bool = False) -> jax.Array:
  """Inverse frequencies (rotary_dim / 2); `long`: longrope's set for inputs past the original context."""
  d = cfg.rotary_dim
  pos_freqs = cfg.rope_theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d)
  if cfg.rope_type == "yarn":
    return _yarn_inv_freq(cfg, pos_freqs)
  if cfg.rope_type == "longrope":  # a stated divisor per frequency, one set for short inputs, one for long
    return 1.0 / (jnp.asarray(cfg.rope_long_factor if long else cfg.rope_short_factor, jnp.float32) * pos_freqs)
  inv = 1.0 / pos_freqs
  if cfg.rope_type == "linear":
    inv = inv / cfg.rope_factor
  elif cfg.rope_type == "llama3":
    low_wavelen = cfg.rope_original_max_positions / cfg.rope_low_freq_factor
    high_wavelen = cfg.rope_original_max_positions / cfg.rope_high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = jnp.where(wavelen > low_wavelen, inv / cfg.rope_factor, inv)
    smooth = ((cfg.rope_original_max_positions / wavelen - cfg.rope_low_freq_factor)
              / (cfg.rope_high_freq_factor - cfg.rope_low_freq_factor))
    smoothed = (1 - smooth) * scaled / cfg.rope_factor + smooth * scaled
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    inv = jnp.where(is_medium, smoothed, scaled)
  return inv


def _yarn_inv_freq(cfg: ModelConfig, pos_freqs) -> jax.Array:
  """YaRN: original frequencies (1 / pos_freqs) for the dims that rotate more than beta_fast times
  over the original context, frequencies / factor for those rotating under beta_slow times, a linear
  ramp between."""
  d = cfg.rotary_dim

  def correction_dim(rotations: float) -> float:
    return d * math.log(cfg.rope_original_max_positions / (rotations * 2 * math.pi)) / (2 * math.log(cfg.rope_theta))

  low, high = correction_dim(cfg.rope_beta_fast), correction_dim(cfg.rope_beta_slow)
  if cfg.rope_truncate:
    low, high = math.floor(low), math.ceil(high)
  low, high = max(low, 0), min(high, d - 1)
  ramp = jnp.clip((jnp.arange(d // 2, dtype=jnp.float32) - low) / ((high + 0.001 if low == high else high) - low), 0, 1)
  extrapolation = 1 - ramp  # weight of the original frequency
  return (1.0 / (cfg.rope_factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation


def rope_cos_sin(cfg: ModelConfig, positions_BxT, local: bool = False):
  """cos, sin (B x T x rotary_dim); `local`: those of the sliding-window layers (Gemma 3's own base).

  longrope (as transformers) takes its long set when the call's furthest position is past the
  original context, for every position of the call, its short set otherwise."""
  if local:
    cfg = dataclasses.replace(cfg, rope_theta=cfg.local_rope_theta, rope_type="default")
  inv_freq = rope_inv_freq(cfg)
  if cfg.rope_type == "longrope":
    is_long = jnp.max(positions_BxT) + 1 > cfg.rope_original_max_positions
    inv_freq = jnp.where(is_long, rope_inv_freq(cfg, long=True), inv_freq)
  freqs = positions_BxT.astype(jnp.float32)[..., None] * inv_freq
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  if cfg.rope_attention_factor != 1.0:  # YaRN and longrope scale cos and sin (so q.k by its square)
    return jnp.cos(emb) * cfg.rope_attention_factor, jnp.sin(emb) * cfg.rope_attention_factor
  return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x_BxTxNxH, cos_BxTxR, sin_BxTxR):
  """Rotates the first R dims of each head (all of it unless partial), in float32 (one cast in, one
  out; also in the backward), the result in x's dtype."""
  x = x_BxTxNxH.astype(jnp.float32)
  R = cos_BxTxR.shape[-1]
  x_rot, x_pass = x[..., :R], x[..., R:]
  half = R // 2
  rotated = jnp.concatenate([-x_rot[..., half:], x_rot[..., :half]], axis=-1)
  cos, sin = cos_BxTxR[:, :, None, :], sin_BxTxR[:, :, None, :]
  out = x_rot * cos + rotated * sin
  if x_pass.shape[-1]:
    out = jnp.concatenate([out, x_pass], axis=-1)
  return out.astype(x_BxTxNxH.dtype)
