"""Optimizer over the trainable partition: schedule, clipping, AdamW / Adafactor / SGD / Muon, LoRA+."""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections
import optax


def learning_rate_schedule(opt: ml_collections.ConfigDict, steps: int) -> optax.Schedule:
  """Linear warmup from 0, then constant / linear-to-0 / cosine-to-0 over the remaining steps, or
  (wsd) constant, then to 0 over the last decay_steps; transformers' schedules of the same names."""
  lr, warmup = opt.learning_rate, opt.warmup_steps
  decay_steps = max(steps - warmup, 1)
  if opt.schedule == "constant":
    main = optax.constant_schedule(lr)
  elif opt.schedule == "linear":
    main = optax.linear_schedule(lr, 0.0, decay_steps)
  elif opt.schedule == "wsd":
    decay = opt.decay_steps or max(1, round(0.1 * steps))
    main = stable_then_decay(lr, max(steps - warmup - decay, 0), decay, opt.decay_shape)
  else:
    main = optax.cosine_decay_schedule(lr, decay_steps)
  if not warmup:
    return main
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), main], [warmup])


def stable_then_decay(lr: float, stable: int, decay: int, shape: str) -> optax.Schedule:
  """lr for `stable` steps, then to 0 over `decay` steps: linear, cosine or 1-sqrt (Hagele et al. 2024)."""
  def schedule(count):
    progress = jnp.clip((count - stable) / decay, 0.0, 1.0)
    if shape == "linear":
      factor = 1.0 - progress
    elif shape == "cosine":
      factor = 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
    else:
      factor = 1.0 - jnp.sqrt(progress)
    return lr * factor
  return schedule


def decays(path: str) -> bool:
  """Weight decay applies to matrices, not to biases, norms or prefix/adapter biases."""
  return not (path.endswith("bias") or path.endswith("norm") or path.endswith("layernorm"))


MUON_RMS = 0.2  # Muon's updates x 0.2 sqrt(max(fan_in, fan_out)): the RMS of AdamW's (Moonlight, Liu et al. 2025)


def takes_muon(path: str) -> bool:
  """The decoder's weight matrices (L [x E] x in x out): attention and MLP kernels and the experts."""
  return path.startswith("layers/") and (path.endswith("kernel") or "/experts/" in path)


def newton_schulz(x, steps: int = 5, coefficients=(3.4445, -4.775, 2.0315), eps: float = 1e-7):
  """Each in x out matrix of x (leading axes: layers, experts) replaced by its approximate orthogonal
  factor: torch.optim.Muon's quintic Newton-Schulz iteration (Jordan et al. 2024), in float32."""
  a, b, c = coefficients
  wide = x.shape[-2] <= x.shape[-1]
  y = x if wide else jnp.swapaxes(x, -1, -2)
  y = y / jnp.maximum(jnp.linalg.norm(y, axis=(-2, -1), keepdims=True), eps)
  for _ in range(steps):
    gram = y @ jnp.swapaxes(y, -1, -2)
    y = a * y + (b * gram + c * gram @ gram) @ y
  return y if wide else jnp.swapaxes(y, -1, -2)


def muon(opt: ml_collections.ConfigDict, schedule: optax.Schedule, paths, decay_mask) -> optax.GradientTransformation:
  """Muon on `takes_muon` leaves: Nesterov momentum, Newton-Schulz orthogonalization of each layer's
  (and expert's) matrix, scaled to AdamW's RMS, so optimizer.learning_rate and weight_decay serve
  both parts; torch.optim.Muon(adjust_lr_fn="match_rms_adamw") step for step. AdamW on the rest
  (embedding, LM head, norms, biases)."""
  orthogonalized = optax.stateless_with_tree_map(
      lambda g, _: newton_schulz(g) * (MUON_RMS * max(g.shape[-2], g.shape[-1]) ** 0.5))
  return optax.partition({
      # trace's Nesterov step g + m t is torch's (1 - m) g + m buf up to a factor the normalization drops
      "muon": optax.chain(optax.trace(decay=opt.muon_momentum, nesterov=True), orthogonalized,
                          optax.add_decayed_weights(opt.weight_decay), optax.scale_by_learning_rate(schedule)),
      "adam": optax.adamw(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=opt.weight_decay,
                          mask=lambda params: {p: decay_mask[p] for p in params}),
  }, {p: "muon" if takes_muon(p) else "adam" for p in paths})


def build_optimizer(opt: ml_collections.ConfigDict, steps: int, trainable_paths) -> optax.GradientTransformation:
  """The optax chain for the trainable partition (a flat {path: array} dict)."""
  schedule = learning_rate_schedule(opt, steps)
  decay_mask = {p: decays(p) for p in trainable_paths}
  parts = []
  if opt.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(opt.grad_clip))
  if opt.name == "adamw":
    parts.append(optax.adamw(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps,
                             weight_decay=opt.weight_decay, mask=decay_mask))
  elif opt.name == "muon":
    parts.append(muon(opt, schedule, list(trainable_paths), decay_mask))
  elif opt.name == "adafactor":
    parts.append(optax.adafactor(schedule, weight_decay_rate=opt.weight_decay or None,
                                 weight_decay_mask=decay_mask))
  else:
    if opt.weight_decay:
      parts.append(optax.masked(optax.add_decayed_weights(opt.weight_decay), decay_mask))
    parts.append(optax.sgd(schedule))
  if opt.lora_plus_ratio != 1.0:  # LoRA+: B's updates (hence its learning rate and decay) x ratio
    parts.append(optax.masked(optax.scale(opt.lora_plus_ratio), {p: p.endswith("lora_b") for p in trainable_paths}))
  return optax.chain(*parts)
