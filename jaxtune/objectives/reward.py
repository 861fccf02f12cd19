"""Reward model: the decoder plus a scalar head on the last non-pad token, Bradley-Terry loss.

params["reward_head"] = {"kernel": (D, 1)}, no bias: the loss sees only reward differences, so a bias
would get no gradient but rounding noise, which Adam turns into a drift; transformers' score layer
has none either. partition.is_trainable keeps the head trainable for every PEFT method. Pairwise
accuracy is logged (and, on eval data, "eval_reward_accuracy").
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxtune.models import llama, loading
from jaxtune.models.config import ModelConfig, config_from_hf, read_hf_config
from jaxtune.objectives.dpo import both_sides
from jaxtune.train_step import Batch, StepSpec

HEAD = "reward_head"


def add_head(params: llama.Params, cfg: ModelConfig, dtype=jnp.float32) -> llama.Params:
  """A zero head: every reward starts at 0, so the first loss is ln 2."""
  return dict(params, **{HEAD: {"kernel": jnp.zeros((cfg.hidden_size, 1), dtype)}})


def load_hf_scorer(folder: str, dtype=jnp.float32) -> tuple[ModelConfig, llama.Params]:
  """A transformers *ForSequenceClassification folder with one label (what jaxtune's export writes,
  and TRL's reward models) as (config, params): its decoder, and score.weight as the head.

  The config is marked tied so that no LM head is looked for: a scorer has none, and rewards never
  use one.
  """
  hf = read_hf_config(folder)
  arch = (hf.get("architectures") or ["no architecture"])[0]
  if not arch.endswith("ForSequenceClassification"):
    raise ValueError(f"{folder}: {arch} is not a *ForSequenceClassification reward model")
  get, _ = loading.safetensors_getter(folder)
  score = np.asarray(get("score.weight"))
  if score.shape[0] != 1:
    raise ValueError(f"{folder}: score.weight has {score.shape[0]} labels; a reward model has one")
  cfg = dataclasses.replace(config_from_hf(hf), tie_word_embeddings=True)
  params = loading.params_from_tensors(cfg, get, dtype)
  return cfg, dict(params, **{HEAD: {"kernel": jnp.asarray(score.T.astype(jnp.dtype(dtype)))}})


def last_token_index(segment_ids_BxT):
  """Index of each row's last non-pad token (0 for an all-padding row)."""
  T = segment_ids_BxT.shape[-1]
  return jnp.max(jnp.where(segment_ids_BxT != 0, jnp.arange(T), 0), axis=-1)


def rewards(params: llama.Params, cfg: ModelConfig, tokens_BxT, positions_BxT, segment_ids_BxT, *,
            peft: llama.PeftRuntime = llama.PeftRuntime(), rng=None, remat: str = "",
            compute_dtype=jnp.float32):
  """Scalar reward per row (float32, B), read at the last non-pad token."""
  hidden_BxTxD, _ = llama.forward(params, cfg, tokens_BxT, positions_BxT, segment_ids_BxT, peft=peft, rng=rng,
                                  remat=remat, compute_dtype=compute_dtype, return_hidden=True)
  last_BxD = jnp.take_along_axis(hidden_BxTxD, last_token_index(segment_ids_BxT)[:, None, None], axis=1)[:, 0]
  return (last_BxD.astype(jnp.float32) @ params[HEAD]["kernel"].astype(jnp.float32))[:, 0]


def reward_loss_sums(params, spec: StepSpec, batch: Batch, rng=None):
  """(sum of -log sigmoid(r_chosen - r_rejected) over real pairs, number of pairs, metrics)."""
  r_2B = rewards(params, spec.model, both_sides(batch, "inputs"), both_sides(batch, "positions"),
                 both_sides(batch, "segment_ids"), peft=spec.peft, rng=rng, remat=spec.remat,
                 compute_dtype=jnp.dtype(spec.compute_dtype))
  B = r_2B.shape[0] // 2
  margin_B = r_2B[:B] - r_2B[B:]
  valid_B = (jnp.sum(batch["chosen_weights"], axis=-1) > 0).astype(jnp.float32)
  pairs = jnp.sum(valid_B)

  def mean(x_B):
    return jnp.sum(jax.lax.stop_gradient(x_B) * valid_B) / jnp.maximum(pairs, 1.0)

  metrics = {"reward_accuracy": mean((margin_B > 0).astype(jnp.float32)), "reward_margin": mean(margin_B),
             "rewards_chosen": mean(r_2B[:B]), "rewards_rejected": mean(r_2B[B:])}
  return jnp.sum(-jax.nn.log_sigmoid(margin_B) * valid_B), pairs, metrics
