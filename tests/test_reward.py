"""Reward model: the head reads transformers' final hidden state at the last non-pad token; it trains
under every PEFT method; held-out pairwise accuracy rises well above chance on the bundled set."""

import math
import os

import jax
import numpy as np
import pytest

from jaxtune import trainer
from jaxtune.data import pipeline
from jaxtune.models import loading
from jaxtune.objectives import reward
from jaxtune.peft import partition
from train_helpers import tiny_config

DATA = os.path.join(os.path.dirname(__file__), "..", "jaxtune", "data", "preference_demo")


def test_reward_reads_the_last_real_token_of_transformers_hidden_states(tmp_path):
  import torch
  from hf_tiny import save_hf_model
  hf = save_hf_model("llama_untied", str(tmp_path / "m"))
  tok = loading.load_tokenizer(str(tmp_path / "m"))
  batch = {k: v[:4] for k, v in pipeline.build_dataset(os.path.join(DATA, "eval.jsonl"), "preference", tok, 96,
                                                       template="chat").arrays.items()}
  cfg, params = loading.load_model(str(tmp_path / "m"))
  params = reward.add_head(params, cfg)
  head = {"kernel": np.asarray(jax.random.normal(jax.random.key(0), (cfg.hidden_size, 1)))}
  params["reward_head"] = head
  ours = reward.rewards(params, cfg, batch["chosen_inputs"], batch["chosen_positions"], batch["chosen_segment_ids"])
  mask = batch["chosen_segment_ids"] != 0
  with torch.no_grad():
    hidden = hf.model(input_ids=torch.tensor(batch["chosen_inputs"], dtype=torch.long),
                      attention_mask=torch.tensor(mask, dtype=torch.long)).last_hidden_state.numpy()
  last = mask.sum(-1) - 1  # rows are right-padded
  expected = hidden[np.arange(4), last] @ head["kernel"][:, 0]
  np.testing.assert_allclose(ours, expected, atol=1e-4)


def test_reward_head_is_trainable_for_every_method():
  for method in partition.METHODS:
    assert partition.is_trainable("reward_head/kernel", method)


def test_reward_model_heldout_accuracy_well_above_chance(tiny_setup, tmp_path):
  model, _ = tiny_setup
  config = tiny_config(model, os.path.join(DATA, "train.jsonl"), **{
      "objective": "reward", "data.format": "preference", "data.eval": os.path.join(DATA, "eval.jsonl"),
      "data.seq_len": 96, "train.steps": 24, "optimizer.learning_rate": 3e-3, "train.eval_every": 12})
  rows = trainer.run(config, str(tmp_path))
  train = [r for r in rows if "reward_accuracy" in r]
  assert abs(train[0]["loss"] - math.log(2)) < 1e-6  # zero head: every reward starts at 0
  evals = [r for r in rows if "eval_reward_accuracy" in r]
  assert evals[-1]["eval_reward_accuracy"] >= 0.9, evals
  assert evals[-1]["eval_loss"] < 0.4, evals
  assert train[-1]["reward_margin"] > 0


@pytest.mark.parametrize("family,classifier", [("llama_untied", "LlamaForSequenceClassification"),
                                               ("gemma3", "Gemma3TextForSequenceClassification")])
def test_reward_model_exports_as_a_transformers_sequence_classifier(tiny_setup, tmp_path, family, classifier):
  """scripts/export.py --format hf of a LoRA reward model: transformers' *ForSequenceClassification
  scores as jaxtune; --format peft is refused in one line before anything is written."""
  import torch
  import transformers
  from jaxtune import workdir
  from test_export import run_export
  from train_helpers import make_tiny_setup
  model, _ = tiny_setup if family == "llama_untied" else make_tiny_setup(str(tmp_path / "setup"), family)
  config = tiny_config(model, os.path.join(DATA, "train.jsonl"), **{
      "objective": "reward", "data.format": "preference", "data.seq_len": 96, "train.steps": 4})
  trainer.run(config, str(tmp_path / "run"))
  export = lambda fmt: run_export(str(tmp_path / "run"), str(tmp_path / fmt), fmt)
  assert export("hf").returncode == 0
  hf = transformers.AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "hf"))
  assert type(hf).__name__ == classifier and hf.config.num_labels == 1
  assert not os.path.exists(tmp_path / "hf" / "generation_config.json")

  _, cfg, params, peft, tokenizer = workdir.load_trained(str(tmp_path / "run"))
  rows = pipeline.build_dataset(os.path.join(DATA, "eval.jsonl"), "preference", tokenizer, 96, template="chat").arrays
  inputs, positions, segments = (np.concatenate([rows[f"{side}_{k}"][:3] for side in ("chosen", "rejected")])
                                 for k in ("inputs", "positions", "segment_ids"))
  ours = np.asarray(reward.rewards(params, cfg, inputs, positions, segments, peft=peft))
  real = segments != 0
  with torch.no_grad():  # right-padded with the exported pad id, as a transformers user would batch them
    theirs = hf(input_ids=torch.tensor(np.where(real, inputs, hf.config.pad_token_id), dtype=torch.long),
                attention_mask=torch.tensor(real, dtype=torch.long)).logits[:, 0].numpy()
  np.testing.assert_allclose(theirs, ours, atol=1e-4)
  assert np.ptp(ours) > 1e-3  # the trained head (and the folded LoRA) tell the rows apart

  refused = export("peft")
  assert refused.returncode != 0 and not os.path.exists(tmp_path / "peft")
  last = refused.stderr.strip().splitlines()[-1]
  assert last.startswith("error: ") and "use --format hf" in last, refused.stderr
