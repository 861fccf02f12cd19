"""Training objectives beyond next-token LM: DPO, reward model, GRPO; selected by config.objective.

The shared step (train_step.py) stays the same; an objective is a `loss_sums` function plus, where
it needs them, extra params (the reward head) or extra data (DPO's reference log-probs).
"""

from __future__ import annotations

import functools

import ml_collections

from jaxtune.config_checks import DPO_REFERENCE_FREE
from jaxtune.train_step import LossSums, StepSpec, lm_loss_sums


def objective_loss_sums(config: ml_collections.ConfigDict) -> LossSums:
  """The loss_sums callable of config.objective (the one place objectives are selected)."""
  if config.objective == "lm":
    return lm_loss_sums
  if config.objective == "dpo":
    from jaxtune.objectives import dpo
    return functools.partial(dpo.dpo_loss_sums, beta=config.dpo.beta, loss_type=config.dpo.loss_type,
                             label_smoothing=config.dpo.label_smoothing, simpo_gamma=config.dpo.simpo_gamma,
                             rpo_alpha=config.dpo.rpo_alpha)
  if config.objective == "reward":
    from jaxtune.objectives import reward
    return reward.reward_loss_sums
  if config.objective == "grpo":
    from jaxtune.objectives import grpo
    g = config.grpo
    return functools.partial(grpo.grpo_loss_sums, clip_eps=g.clip_eps, clip_eps_high=g.clip_eps_high,
                             kl_coef=g.kl_coef, loss_type=g.loss_type, max_new_tokens=g.max_new_tokens,
                             importance_sampling_level=g.importance_sampling_level)
  raise ValueError(f"objective={config.objective!r} is not one of lm | dpo | reward | grpo")


def add_params(config: ml_collections.ConfigDict, params, model_cfg, dtype):
  """Params the objective adds to the model (the reward model's scalar head)."""
  if config.objective == "reward":
    from jaxtune.objectives import reward
    return reward.add_head(params, model_cfg, dtype)
  return params


def prepare_data(config: ml_collections.ConfigDict, datasets, trainable, frozen, spec: StepSpec, mesh):
  """The datasets with what the objective precomputes: DPO's reference log-probs for full fine-tuning
  (or with dpo.precompute_reference; none for a reference-free loss). Runs on the initial params,
  so resuming gives the same values."""
  if config.objective != "dpo" or not (config.peft.method == "full" or config.dpo.precompute_reference):
    return datasets
  from jaxtune.objectives import dpo
  if config.dpo.loss_type in DPO_REFERENCE_FREE:
    return datasets
  from jaxtune.peft import partition
  params = partition.merge(trainable, frozen)
  if config.peft.method != "full":
    params = dpo.base_params(params)
  return tuple(None if d is None else dpo.add_reference_logps(d, params, spec, mesh, config.train.batch_size)
               for d in datasets)


