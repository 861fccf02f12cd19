"""DPO: ln 2 at step 0 (policy = reference), learns the bundled preference rule, equals TRL's formula
on transformers' log-probs."""

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtune import sharding, trainer
from jaxtune.data import pipeline
from jaxtune.models import loading
from jaxtune.objectives import dpo
from jaxtune.train_step import StepSpec
from train_helpers import assert_same_gradients, losses, tiny_config

DATA = os.path.join(os.path.dirname(__file__), "..", "jaxtune", "data", "preference_demo")


def dpo_config(model, **overrides):
  kw = {"objective": "dpo", "data.format": "preference", "data.eval": os.path.join(DATA, "eval.jsonl"),
        "data.seq_len": 96, "train.steps": 12, "optimizer.learning_rate": 3e-3, "dpo.beta": 0.5,
        "train.eval_batches": 2}
  kw.update(overrides)
  return tiny_config(model, os.path.join(DATA, "train.jsonl"), **kw)


@pytest.mark.parametrize("method,lr,rpo_alpha", [("lora", 5e-3, 0.5), ("full", 5e-4, 0.0)])
def test_dpo_starts_at_ln2_and_learns_the_preference(tiny_setup, tmp_path, method, lr, rpo_alpha):
  """(LoRA with RPO: the loss adds rpo_alpha x the logged NLL of the chosen responses.)"""
  model, _ = tiny_setup
  rows = trainer.run(dpo_config(model, **{"peft.method": method, "optimizer.learning_rate": lr,
                                          "dpo.rpo_alpha": rpo_alpha}), str(tmp_path))
  train = [r for r in rows if "rewards_chosen" in r]
  assert ("nll_chosen" in train[0]) == bool(rpo_alpha)
  dpo_part = [r["loss"] - rpo_alpha * r.get("nll_chosen", 0.0) for r in train]
  assert abs(dpo_part[0] - math.log(2)) < 1e-5, train[0]
  assert abs(train[0]["reward_margin"]) < 1e-5
  late = np.mean(dpo_part[-3:])
  assert late < math.log(2) - 0.1, losses(rows)
  assert np.mean([r["reward_margin"] for r in train[-3:]]) > 0.2, [r["reward_margin"] for r in train]
  assert train[-1]["rewards_chosen"] > train[-1]["rewards_rejected"]
  final = rows[-1]
  final_dpo_part = final["eval_loss"] - rpo_alpha * final.get("eval_nll_chosen", 0.0)
  assert final["eval_reward_accuracy"] > 0.7 and final_dpo_part < math.log(2), final


def _torch_logps(model, batch, side):
  """Sum of response-token log-probs from a transformers model (HF label-shift convention)."""
  import torch
  inputs = torch.tensor(np.asarray(batch[f"{side}_inputs"]), dtype=torch.long)
  mask = torch.tensor(np.asarray(batch[f"{side}_segment_ids"]) != 0, dtype=torch.long)
  with torch.no_grad():
    logits = model(input_ids=inputs, attention_mask=mask).logits.double()
  logp = torch.log_softmax(logits, -1).gather(-1, torch.tensor(np.asarray(batch[f"{side}_targets"]),
                                                               dtype=torch.long)[..., None])[..., 0]
  return (logp * torch.tensor(np.asarray(batch[f"{side}_weights"]), dtype=torch.float64)).sum(-1)


def tiny_policy_and_pairs(folder: str, seed: int = 0):
  """(a tiny transformers Llama saved to `folder`, jaxtune's (config, params) of it, the eval set's
  pairs as a dataset, its first 8 pairs as batch arrays)."""
  from hf_tiny import save_hf_model
  policy_hf = save_hf_model("llama_untied", folder, seed=seed)
  ds = pipeline.build_dataset(os.path.join(DATA, "eval.jsonl"), "preference", loading.load_tokenizer(folder), 96,
                              template="chat")
  return policy_hf, loading.load_model(folder), ds, {k: v[:8] for k, v in ds.arrays.items()}


def test_dpo_loss_equals_trl_formula_on_transformers_logprobs(tmp_path):
  import torch
  policy_hf, (cfg, policy), ds, batch = tiny_policy_and_pairs(str(tmp_path / "policy"))
  reference_hf, (_, reference), _, _ = tiny_policy_and_pairs(str(tmp_path / "reference"), seed=1)
  spec = StepSpec(model=cfg)
  mesh = sharding.make_mesh()
  with_ref = dpo.add_reference_logps(pipeline.PackedDataset(batch, 96, ds.stats), reference, spec, mesh, 4)
  beta = 0.3
  total, pairs, metrics = dpo.dpo_loss_sums(policy, spec, with_ref.arrays, beta=beta)
  ours = float(total) / float(pairs)

  pc, pr = _torch_logps(policy_hf, batch, "chosen"), _torch_logps(policy_hf, batch, "rejected")
  rc, rr = _torch_logps(reference_hf, batch, "chosen"), _torch_logps(reference_hf, batch, "rejected")
  trl = -torch.nn.functional.logsigmoid(beta * ((pc - rc) - (pr - rr))).mean().item()
  assert abs(ours - trl) < 1e-4, (ours, trl)
  assert abs(float(metrics["reward_margin"]) - (beta * ((pc - rc) - (pr - rr))).mean().item()) < 1e-3
  np.testing.assert_allclose(with_ref.arrays["chosen_ref_logp"], rc.numpy(), rtol=1e-5, atol=1e-3)

  # TRL DPOTrainer's other loss types (dpo_loss), and rpo_alpha's NLL of the chosen tokens
  F, eps = torch.nn.functional, 0.1
  c, r = pc - rc, pr - rr  # the log-ratios, summed over response tokens
  h, bc, br = c - r, beta * c, beta * r
  trl_losses = {
      "robust": ((-F.logsigmoid(beta * h) * (1 - eps) + F.logsigmoid(-beta * h) * eps) / (1 - 2 * eps)),
      "hinge": torch.relu(1 - beta * h),
      "nca_pair": -F.logsigmoid(bc) - 0.5 * F.logsigmoid(-bc) - 0.5 * F.logsigmoid(-br),
      "sppo_hard": (c - 0.5 / beta) ** 2 + (r + 0.5 / beta) ** 2,
      "apo_zero": 1 - torch.sigmoid(bc) + torch.sigmoid(br),
      "apo_down": torch.sigmoid(bc) + 1 - torch.sigmoid(beta * h),
  }
  for loss_type, per_pair in trl_losses.items():
    total, pairs, _ = dpo.dpo_loss_sums(policy, spec, with_ref.arrays, beta=beta, loss_type=loss_type,
                                        label_smoothing=eps)
    assert abs(float(total) / float(pairs) - per_pair.mean().item()) < 1e-4, (loss_type, float(total) / float(pairs))
  alpha, tokens = 0.7, float(batch["chosen_weights"].sum())
  total, pairs, metrics = dpo.dpo_loss_sums(policy, spec, with_ref.arrays, beta=beta, rpo_alpha=alpha)
  assert abs(float(metrics["nll_chosen"]) - (-pc.sum().item() / tokens)) < 1e-4
  assert abs(float(total) / float(pairs) - (trl + alpha * -pc.sum().item() / tokens)) < 1e-4

  # The LM head only at response positions (the trainer sets max_targets from the data): same
  # loss and gradients.
  k = trainer.max_targets_per_row(ds)
  assert 0 < k < 96

  def loss_and_grads(spec):
    return jax.value_and_grad(lambda p: dpo.dpo_loss_sums(p, spec, with_ref.arrays, beta=beta)[0])(policy)

  (full, g_full), (sel, g_sel) = loss_and_grads(spec), loss_and_grads(StepSpec(model=cfg, max_targets=k))
  np.testing.assert_allclose(sel, full, rtol=1e-6)
  assert_same_gradients(g_sel, g_full)


def test_label_smoothing_and_ipo_match_their_formulas():
  h = jnp.array([-1.0, 0.0, 2.0])
  beta, eps = 0.2, 0.1
  smoothed = dpo.dpo_losses(h, jnp.zeros(3), beta, "sigmoid", eps)
  expected = [-(1 - eps) * math.log(1 / (1 + math.exp(-beta * x))) - eps * math.log(1 / (1 + math.exp(beta * x)))
              for x in (-1.0, 0.0, 2.0)]
  np.testing.assert_allclose(smoothed, expected, rtol=1e-6)
  np.testing.assert_allclose(dpo.dpo_losses(h, jnp.zeros(3), beta, "ipo"), [(x - 1 / (2 * beta)) ** 2 for x in (-1.0, 0.0, 2.0)], rtol=1e-6)
  assert float(dpo.dpo_losses(jnp.zeros(1), jnp.zeros(1), beta)[0]) == pytest.approx(math.log(2))


def test_simpo_equals_trl_formula_on_transformers_logprobs(tmp_path):
  """SimPO (TRL's CPO loss_type="simpo", cpo_alpha=0): -log sigmoid(beta x the difference of the
  average response log-probs - gamma), with label smoothing; the policy's own log-probs only."""
  import torch
  policy_hf, (cfg, policy), _, batch = tiny_policy_and_pairs(str(tmp_path / "policy"))
  beta, gamma, eps = 2.0, 0.7, 0.1
  total, pairs, metrics = dpo.dpo_loss_sums(policy, StepSpec(model=cfg), batch, beta=beta, loss_type="simpo",
                                            label_smoothing=eps, simpo_gamma=gamma)
  average = {side: _torch_logps(policy_hf, batch, side) / torch.tensor(batch[f"{side}_weights"].sum(-1), dtype=torch.float64)
             for side in dpo.SIDES}
  logits = (average["chosen"] - average["rejected"]) - gamma / beta
  logsigmoid = torch.nn.functional.logsigmoid
  trl = (-logsigmoid(beta * logits) * (1 - eps) - logsigmoid(-beta * logits) * eps).mean().item()
  assert abs(float(total) / float(pairs) - trl) < 1e-4, (float(total) / float(pairs), trl)
  assert abs(float(metrics["rewards_chosen"]) - beta * average["chosen"].mean().item()) < 1e-3


def test_orpo_equals_trl_formula_on_transformers_logprobs(tmp_path):
  """ORPO (TRL's ORPOTrainer): the chosen responses' NLL (a token mean over the batch) minus beta x
  the mean log sigmoid of the log odds ratio of the average response log-probs."""
  import torch
  policy_hf, (cfg, policy), _, batch = tiny_policy_and_pairs(str(tmp_path / "policy"))
  beta = 0.25
  total, pairs, metrics = dpo.dpo_loss_sums(policy, StepSpec(model=cfg), batch, beta=beta, loss_type="orpo")
  summed = {side: _torch_logps(policy_hf, batch, side) for side in dpo.SIDES}
  tokens = {side: torch.tensor(batch[f"{side}_weights"].sum(-1), dtype=torch.float64) for side in dpo.SIDES}
  chosen, rejected = (summed[side] / tokens[side] for side in dpo.SIDES)
  nll = -summed["chosen"].sum() / tokens["chosen"].sum()
  log_odds = (chosen - rejected) - (torch.log1p(-torch.exp(chosen)) - torch.log1p(-torch.exp(rejected)))
  trl = (nll - beta * torch.nn.functional.logsigmoid(log_odds).mean()).item()
  assert abs(float(total) / float(pairs) - trl) < 1e-4, (float(total) / float(pairs), trl)
  assert abs(float(metrics["nll_chosen"]) - nll.item()) < 1e-4


@pytest.mark.parametrize("loss_type,beta", [("simpo", 2.0), ("orpo", 0.5)])
def test_reference_free_full_fine_tuning_learns_the_preference(tiny_setup, tmp_path, loss_type, beta):
  """SimPO and ORPO fine-tune all weights without a reference (nothing precomputed)."""
  model, _ = tiny_setup
  rows = trainer.run(dpo_config(model, **{"peft.method": "full", "optimizer.learning_rate": 5e-4,
                                          "dpo.loss_type": loss_type, "dpo.beta": beta}), str(tmp_path))
  train = [r for r in rows if "rewards_chosen" in r]
  assert np.mean([r["loss"] for r in train[-3:]]) < train[0]["loss"] - 0.1, losses(rows)
  # the margin is beta x the difference of the average log-probs: that difference grows
  gain = (np.mean([r["reward_margin"] for r in train[-3:]]) - train[0]["reward_margin"]) / beta
  assert gain > 0.15, [r["reward_margin"] for r in train]


def test_bad_dpo_configs_fail_naming_the_key(tiny_setup):
  from jaxtune.config_checks import ConfigError, check_config
  model, _ = tiny_setup
  for overrides, key in (({"dpo.loss_type": "kto"}, "dpo.loss_type"), ({"dpo.label_smoothing": 0.5}, "dpo.label_smoothing"),
                         ({"dpo.rpo_alpha": -1.0}, "dpo.rpo_alpha"),
                         ({"dpo.rpo_alpha": 1.0, "dpo.loss_type": "orpo"}, "dpo.rpo_alpha")):
    with pytest.raises(ConfigError, match=f"config.{key}"):
      check_config(dpo_config(model, **overrides))
  check_config(dpo_config(model, **{"dpo.rpo_alpha": 1.0, "dpo.loss_type": "apo_zero"}))  # a valid pair
