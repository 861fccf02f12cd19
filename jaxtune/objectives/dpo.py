"""Direct Preference Optimization (Rafailov et al. 2023) and TRL's DPOTrainer loss types (sigmoid with
label smoothing, robust, hinge, IPO, NCA, hard SPPO, APO-zero/down; dpo.rpo_alpha adds the chosen
responses' NLL, RPO); and two losses that need no reference: SimPO (Meng et al. 2024; TRL's CPO
loss_type="simpo" with cpo_alpha=0) and ORPO (Hong et al. 2024; TRL's ORPOTrainer).

The reference policy: with PEFT it is the same params with the PEFT leaves removed (the adapter
switched off, no second copy of the weights); for full fine-tuning (or on request) its log-probs
are computed once before training by `add_reference_logps` and ride along in the batches as
"chosen_ref_logp" / "rejected_ref_logp".
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from jaxtune import sharding
from jaxtune.config_checks import DPO_LOSS_TYPES, DPO_REFERENCE_FREE
from jaxtune.data import pipeline
from jaxtune.models import llama, loading
from jaxtune.peft import partition
from jaxtune.train_step import Batch, StepSpec, target_logps

SIDES = ("chosen", "rejected")


def base_params(params: llama.Params) -> llama.Params:
  """The params with every PEFT leaf dropped (LoRA/adapter/prefix off), gradients stopped."""
  flat = loading.flatten(params)
  return loading.unflatten({p: jax.lax.stop_gradient(v) for p, v in flat.items()
                            if not partition.is_peft_leaf(p)})


def has_peft_leaves(params: llama.Params) -> bool:
  return any(partition.is_peft_leaf(p) for p in loading.flatten(params))


def both_sides(batch: Batch, key: str):
  """chosen_KEY and rejected_KEY stacked into one 2B-row array (one forward pass for both)."""
  return jnp.concatenate([batch[f"chosen_{key}"], batch[f"rejected_{key}"]], axis=0)


def pair_logps(params: llama.Params, spec: StepSpec, batch: Batch, rng=None):
  """(sum of response-token log-probs, number of response tokens), each 2B: chosen rows then rejected."""
  hidden, _ = llama.forward(params, spec.model, both_sides(batch, "inputs"), both_sides(batch, "positions"),
                            both_sides(batch, "segment_ids"), peft=spec.peft, rng=rng, remat=spec.remat,
                            compute_dtype=jnp.dtype(spec.compute_dtype), return_hidden=True)
  # The LM head runs only at response positions (spec.max_targets, set from the data), not on prompts.
  logp_2BxT, weights_2BxT = target_logps(params, spec, hidden, both_sides(batch, "targets"),
                                         both_sides(batch, "weights").astype(jnp.float32))
  return jnp.sum(logp_2BxT * weights_2BxT, axis=-1), jnp.sum(weights_2BxT, axis=-1)


def dpo_losses(logratio_chosen_B, logratio_rejected_B, beta: float, loss_type: str = "sigmoid",
               label_smoothing: float = 0.0, simpo_gamma: float = 0.0):
  """Per-pair loss from policy-minus-reference log-prob ratios (TRL's formulas); for SimPO and ORPO the
  policy's average log-probs per response token (and SimPO's margin gamma)."""
  h = logratio_chosen_B - logratio_rejected_B
  chosen, rejected = beta * logratio_chosen_B, beta * logratio_rejected_B  # the implicit rewards
  log_sigmoid = jax.nn.log_sigmoid
  if loss_type == "simpo":
    h = h - simpo_gamma / beta
  if loss_type in ("sigmoid", "simpo"):
    return -(1 - label_smoothing) * log_sigmoid(beta * h) - label_smoothing * log_sigmoid(-beta * h)
  if loss_type == "robust":  # an unbiased loss under preference labels flipped with probability label_smoothing
    return ((-(1 - label_smoothing) * log_sigmoid(beta * h) + label_smoothing * log_sigmoid(-beta * h))
            / (1 - 2 * label_smoothing))
  if loss_type == "hinge":
    return jax.nn.relu(1 - beta * h)
  if loss_type == "ipo":
    return (h - 1 / (2 * beta)) ** 2
  if loss_type == "nca_pair":
    return -log_sigmoid(chosen) - 0.5 * log_sigmoid(-chosen) - 0.5 * log_sigmoid(-rejected)
  if loss_type == "sppo_hard":
    return (logratio_chosen_B - 0.5 / beta) ** 2 + (logratio_rejected_B + 0.5 / beta) ** 2
  if loss_type == "apo_zero":  # raise the chosen likelihood, lower the rejected one
    return 1 - jax.nn.sigmoid(chosen) + jax.nn.sigmoid(rejected)
  if loss_type == "apo_down":  # lower both, the rejected one more
    return jax.nn.sigmoid(chosen) + 1 - jax.nn.sigmoid(beta * h)
  if loss_type == "orpo":  # log odds of p = exp(average log-prob): log p - log(1 - p), 1 - p as -expm1
    log_odds = h - (jnp.log(-jnp.expm1(logratio_chosen_B)) - jnp.log(-jnp.expm1(logratio_rejected_B)))
    return -beta * log_sigmoid(log_odds)
  raise ValueError(f"dpo.loss_type={loss_type!r} is not one of {' | '.join(DPO_LOSS_TYPES)}")


def reference_logps(params: llama.Params, spec: StepSpec, batch: Batch):
  """Reference (chosen, rejected) log-prob sums: precomputed in the batch, or the adapter switched off."""
  if "chosen_ref_logp" in batch:
    return batch["chosen_ref_logp"], batch["rejected_ref_logp"]
  if not has_peft_leaves(params):
    raise ValueError("DPO with full fine-tuning needs precomputed reference log-probs "
                     "(chosen_ref_logp/rejected_ref_logp in the batch; see add_reference_logps)")
  logp_2B, _ = pair_logps(base_params(params), spec, batch)
  B = logp_2B.shape[0] // 2
  return logp_2B[:B], logp_2B[B:]


def dpo_loss_sums(params, spec: StepSpec, batch: Batch, rng=None, *, beta: float = 0.1,
                  loss_type: str = "sigmoid", label_smoothing: float = 0.0, simpo_gamma: float = 0.0,
                  rpo_alpha: float = 0.0):
  """(sum of per-pair DPO losses, number of pairs, metrics); all-padding pairs count for nothing.
  The rewards in the metrics are beta x the log-ratios the loss compares (SimPO: the average log-probs).
  rpo_alpha > 0 adds rpo_alpha x the chosen responses' NLL, a token mean over the batch (TRL's
  rpo_alpha); ORPO always adds it, with weight 1."""
  logp_2B, ntok_2B = pair_logps(params, spec, batch, rng)
  B = logp_2B.shape[0] // 2
  chosen_B, rejected_B = logp_2B[:B], logp_2B[B:]
  if loss_type not in DPO_REFERENCE_FREE:
    ref_chosen_B, ref_rejected_B = reference_logps(params, spec, batch)
    chosen_B, rejected_B = chosen_B - ref_chosen_B, rejected_B - ref_rejected_B
  if loss_type in ("ipo", "simpo", "orpo"):  # per-token average log-probs (as TRL does)
    chosen_B, rejected_B = chosen_B / jnp.maximum(ntok_2B[:B], 1), rejected_B / jnp.maximum(ntok_2B[B:], 1)
  valid_B = (ntok_2B[:B] > 0).astype(jnp.float32)
  losses_B = dpo_losses(chosen_B, rejected_B, beta, loss_type, label_smoothing, simpo_gamma)
  pairs = jnp.sum(valid_B)

  def mean(x_B):
    return jnp.sum(x_B * valid_B) / jnp.maximum(pairs, 1.0)

  rewards_chosen, rewards_rejected = beta * jax.lax.stop_gradient(chosen_B), beta * jax.lax.stop_gradient(rejected_B)
  metrics = {"rewards_chosen": mean(rewards_chosen), "rewards_rejected": mean(rewards_rejected),
             "reward_accuracy": mean((rewards_chosen > rewards_rejected).astype(jnp.float32)),
             "reward_margin": mean(rewards_chosen - rewards_rejected)}
  total = jnp.sum(losses_B * valid_B)
  nll_weight = 1.0 if loss_type == "orpo" else rpo_alpha
  if nll_weight:  # + the chosen responses' NLL, a token mean over the batch (TRL's cross-entropy)
    nll = -jnp.sum(logp_2B[:B]) / jnp.maximum(jnp.sum(ntok_2B[:B]), 1.0)
    total = total + pairs * nll_weight * nll
    metrics["nll_chosen"] = nll
  return total, pairs, metrics


@functools.partial(jax.jit, static_argnames=("spec",))
def _logps_jit(params, batch, *, spec):
  logp_2B, _ = pair_logps(params, spec, batch)
  return logp_2B


def add_reference_logps(dataset: pipeline.PackedDataset, params: llama.Params, spec: StepSpec, mesh,
                        batch_size: int) -> pipeline.PackedDataset:
  """The dataset plus chosen_ref_logp / rejected_ref_logp (N,) float32: one pass with `params`."""
  n, P, p = len(dataset), jax.process_count(), jax.process_index()
  per_host = batch_size // P
  out = np.zeros((2, n), np.float32)
  pieces = {k: v for k, v in dataset.arrays.items() if not k.endswith("_ref_logp")}
  view = pipeline.PackedDataset(pieces, dataset.seq_len, dataset.stats)
  for start, local in zip(range(0, n, batch_size), pipeline.eval_batches(view, batch_size, p, P)):
    logp_2B = _logps_jit(params, sharding.global_batch(local, mesh), spec=spec)
    logp_2B = np.asarray(jax.device_get(multihost_utils.process_allgather(logp_2B, tiled=True)))
    # Global row h*per_host + i is dataset row start + h*per_host + i (each host's slice is padded at its end).
    index = np.concatenate([np.arange(start + h * per_host, start + (h + 1) * per_host) for h in range(P)])
    keep = index < n
    half = len(logp_2B) // 2
    out[0, index[keep]] = logp_2B[:half][keep]
    out[1, index[keep]] = logp_2B[half:][keep]
  arrays = dict(pieces, chosen_ref_logp=out[0], rejected_ref_logp=out[1])
  return pipeline.PackedDataset(arrays, dataset.seq_len, dataset.stats)
