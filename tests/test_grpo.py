"""GRPO: the loss equals the GRPO formula on transformers' log-probs, rows mark only completion tokens,
advantages are group-normalised, a trained reward model scores as the reward head does, and a LoRA
run raises the mean reward of a programmatic reward while its KL to the reference stays bounded."""

import os

import numpy as np
import pytest

from jaxtune import trainer
from jaxtune.data import pipeline
from jaxtune.metrics_log import read_metrics
from jaxtune.models import loading
from jaxtune.objectives import grpo, reward
from jaxtune.train_step import StepSpec
from train_helpers import assert_same_gradients, tiny_config

DATA = os.path.join(os.path.dirname(__file__), "..", "jaxtune", "data", "preference_demo")
DIGITS = "jaxtune.objectives.toy_rewards:digit_fraction"


@pytest.fixture(scope="module")
def peaked_model(tmp_path_factory):
  """A tiny model whose output distribution is not flat (lm_head x 20), so LoRA can move it."""
  import torch
  from hf_tiny import build_hf_model, save_byte_tokenizer
  folder = str(tmp_path_factory.mktemp("grpo_model"))
  model = build_hf_model("llama_untied")
  with torch.no_grad():
    model.lm_head.weight.mul_(20.0)
  model.save_pretrained(folder)
  save_byte_tokenizer(folder)
  return folder, model


def test_advantages_are_trls_and_completion_rows():
  import torch
  rewards = np.array([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0, 0.3, 4.0, -1.0, 0.5], np.float32)
  r = torch.tensor(rewards)
  centred = r - r.view(-1, 4).mean(1).repeat_interleave(4)  # TRL GRPOTrainer's formulas, torch's unbiased std
  expected = {"group": centred / (r.view(-1, 4).std(1).repeat_interleave(4) + 1e-4),
              "batch": centred / (r.std() + 1e-4), "none": centred}
  for scale, want in expected.items():
    got = grpo.advantages(rewards, 4, scale, batch_std=np.std(rewards, ddof=1))
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-6, err_msg=scale)
  assert np.all(grpo.advantages(rewards, 4)[4:8] == 0.0)  # a group of equal rewards teaches nothing
  rows = grpo.completion_batch([[5, 6, 7], [8]], [[9, 10], [11, 12, 13]], 8)
  np.testing.assert_array_equal(rows["inputs"][0, :4], [5, 6, 7, 9])
  np.testing.assert_array_equal(rows["targets"][0, :4], [6, 7, 9, 10])
  np.testing.assert_array_equal(rows["weights"][0], [0, 0, 1, 1, 0, 0, 0, 0])  # targets 9, 10 only
  np.testing.assert_array_equal(rows["weights"][1], [1, 1, 1, 0, 0, 0, 0, 0])
  np.testing.assert_array_equal(rows["segment_ids"][1], [1, 1, 1, 0, 0, 0, 0, 0])


def test_grpo_loss_equals_the_formula_on_transformers_logprobs(peaked_model):
  import torch
  folder, hf = peaked_model
  cfg, params = loading.load_model(folder)
  rng = np.random.default_rng(0)
  batch = grpo.completion_batch([list(rng.integers(3, 256, 5)) for _ in range(4)],
                                [list(rng.integers(3, 256, n)) for n in (2, 6, 4, 1)], 16)
  batch["advantages"] = np.array([1.5, -0.5, 0.7, -1.7], np.float32)
  logp = np.asarray(grpo.token_logps(params, StepSpec(model=cfg), batch)[0])
  batch["old_logp"] = (logp + rng.normal(0, 0.3, logp.shape)).astype(np.float32)  # ratios both sides of the clip
  batch["ref_logp"] = (logp + rng.normal(0, 0.5, logp.shape)).astype(np.float32)
  eps, beta = 0.2, 0.3

  with torch.no_grad():
    logits = hf(input_ids=torch.tensor(batch["inputs"], dtype=torch.long),
                attention_mask=torch.tensor(batch["segment_ids"] != 0, dtype=torch.long)).logits.double()
  logp = torch.log_softmax(logits, -1).gather(-1, torch.tensor(batch["targets"], dtype=torch.long)[..., None])[..., 0]
  w, adv = torch.tensor(batch["weights"], dtype=torch.float64), torch.tensor(batch["advantages"], dtype=torch.float64)[:, None]
  ratio = torch.exp(logp - torch.tensor(batch["old_logp"], dtype=torch.float64))
  d = torch.tensor(batch["ref_logp"], dtype=torch.float64) - logp

  def ratio_at(level):  # TRL's importance_sampling_level: each token's, or its completion's (GSPO)
    return ratio if level == "token" else torch.exp((torch.log(ratio) * w).sum(-1, keepdim=True) / w.sum(-1, keepdim=True))

  def trl_loss(loss_type, eps, eps_high, beta, level):  # TRL GRPOTrainer._compute_loss, max_completion_length 8
    r = ratio_at(level)
    per_token = -torch.minimum(r * adv, torch.clamp(r, 1 - eps, 1 + eps_high) * adv)
    per_token = per_token + beta * (torch.exp(d) - d - 1)
    if loss_type == "grpo":
      return ((per_token * w).sum(-1) / w.sum(-1)).mean().item()
    return (per_token * w).sum().item() / (w.sum().item() if loss_type == "dapo" else 4 * 8)

  # GSPO's clip is narrow: a completion's ratio averages its tokens' log-ratios
  cases = (("grpo", eps, 0.0, beta, "token"), ("dapo", eps, 0.28, beta, "token"),
           ("grpo", 0.03, 0.04, beta, "sequence"), ("dr_grpo", eps, 0.0, 0.0, "token"))
  for loss_type, eps, eps_high, kl, level in cases:
    batch_used = batch if kl else {k: v for k, v in batch.items() if k != "ref_logp"}  # kl_coef 0: no reference
    total, count, metrics = grpo.grpo_loss_sums(params, StepSpec(model=cfg), batch_used, clip_eps=eps,
                                                clip_eps_high=eps_high, kl_coef=kl, loss_type=loss_type,
                                                max_new_tokens=8, importance_sampling_level=level)
    expected = trl_loss(loss_type, eps, eps_high or eps, kl, level)
    assert abs(float(total) / float(count) - expected) < 1e-4, (loss_type, level, float(total) / float(count), expected)
    r = ratio_at(level)
    region = (((r < 1 - eps) & (adv < 0)) | ((r > 1 + (eps_high or eps)) & (adv > 0))).double()
    assert level == "token" or 0 < region.sum() < 4  # the sequence-level clip acts on some completions
    assert abs(float(metrics["clip_fraction"]) - ((region * w).sum() / w.sum()).item()) < 1e-6, loss_type
  assert float(count) == 4 * 8  # dr_grpo: completions x max_new_tokens
  assert 0 < float(metrics["clip_fraction"]) < 1 and float(metrics["kl"]) == 0.0

  # The LM head only at the completion positions (max_targets = grpo.max_new_tokens rounded up,
  # here 8 of 16 positions; completions have at most 6 tokens): same loss and gradients, with the
  # log-prob arrays in the gathered layout token_logps gives.
  import jax
  from jaxtune.train_step import select_targets
  spec = StepSpec(model=cfg, max_targets=8)
  idx = select_targets(batch["weights"], 8)
  gathered = dict(batch, **{k: np.take_along_axis(batch[k], np.asarray(idx), 1) for k in ("old_logp", "ref_logp")})
  assert grpo.token_logps(params, spec, batch)[0].shape == (4, 8)

  def loss_and_grads(spec, batch):
    f = lambda p: grpo.grpo_loss_sums(p, spec, batch, clip_eps=eps, kl_coef=beta)[0]
    return jax.value_and_grad(f)(params)

  (full, g_full), (sel, g_sel) = loss_and_grads(StepSpec(model=cfg), batch), loss_and_grads(spec, gathered)
  np.testing.assert_allclose(sel, full, rtol=1e-6)
  assert_same_gradients(g_sel, g_full)


def test_reward_model_scores_completions_like_the_head(tiny_setup, tmp_path):
  model, _ = tiny_setup
  config = tiny_config(model, os.path.join(DATA, "train.jsonl"), **{
      "objective": "reward", "data.format": "preference", "data.seq_len": 96, "train.steps": 3})
  trainer.run(config, str(tmp_path))
  fn = grpo.reward_model_fn(str(tmp_path))
  prompts, texts = ["What is 2 plus 3?", "Add 1 and 1."], ["Happy to help! It is 5.", "Ugh. 7."]
  from jaxtune import workdir
  _, cfg, params, peft, tok = workdir.load_trained(str(tmp_path))
  records = pipeline.Records([{"prompt": p, "chosen": t, "rejected": t} for p, t in zip(prompts, texts)], ["a:1", "a:2"], [])
  rows = pipeline.build_dataset(records, "preference", tok, 96, template="chat").arrays
  expected = reward.rewards(params, cfg, rows["chosen_inputs"], rows["chosen_positions"], rows["chosen_segment_ids"],
                            peft=peft)
  np.testing.assert_allclose(fn(prompts, texts), expected, atol=1e-5)
  assert abs(float(expected[0] - expected[1])) > 1e-6  # the trained head does tell them apart


def test_grpo_lora_raises_reward_and_kl_stays_bounded(peaked_model, tmp_path):
  folder, _ = peaked_model
  config = tiny_config(folder, os.path.join(DATA, "train.jsonl"), **{
      "objective": "grpo", "data.format": "preference", "data.seq_len": 64, "train.steps": 16,
      "train.batch_size": 16, "grpo.group_size": 4, "grpo.max_new_tokens": 8, "grpo.reward_fn": DIGITS,
      "grpo.kl_coef": 0.2, "grpo.loss_type": "dapo", "optimizer.learning_rate": 5e-3, "train.checkpoint_every": 8})
  rows = trainer.run(config, str(tmp_path))
  rewards, kls = [r["reward_mean"] for r in rows], [r["kl"] for r in rows]
  assert [r["step"] for r in rows] == list(range(1, 17))
  assert kls[0] == 0.0  # the first completions come from the reference itself (LoRA B = 0)
  # Sixteen steps on a random model are noisy: with train.seed 0, 1 and 2 the reward went from
  # 0.17 / 0.09 / 0.10 (first 3 steps) to 0.80 / 0.31 / 0.24 (last 4), max KL 9.4 / 3.3 / 2.2.
  early, late = np.mean(rewards[:3]), np.mean(rewards[-4:])
  assert late > early + 0.1 and late > 2 * early, rewards
  assert max(kls) < 15.0, kls


def test_every_grpo_setting_reaches_the_loss(tiny_setup):
  """The objective's loss function gets each grpo.* setting the loss reads (dr_grpo divides by max_new_tokens)."""
  from jaxtune import objectives
  model, data = tiny_setup
  settings = {"clip_eps": 0.1, "clip_eps_high": 0.3, "kl_coef": 0.0, "loss_type": "dr_grpo", "max_new_tokens": 5,
              "importance_sampling_level": "sequence"}
  config = tiny_config(model, data, **{"objective": "grpo", "grpo.reward_fn": DIGITS, "data.seq_len": 64,
                                       **{f"grpo.{k}": v for k, v in settings.items()}})
  assert objectives.objective_loss_sums(config).keywords == settings


def test_bad_grpo_configs_fail_naming_the_key(tiny_setup):
  from jaxtune.config_checks import ConfigError, check_config
  model, data = tiny_setup
  base = {"objective": "grpo", "grpo.reward_fn": DIGITS, "data.seq_len": 64}
  for overrides, key in (({"grpo.group_size": 1}, "grpo.group_size"), ({"grpo.group_size": 3}, "grpo.group_size"),
                         ({"grpo.max_new_tokens": 64}, "grpo.max_new_tokens"),
                         ({"grpo.reward_fn": ""}, "grpo.reward_fn"), ({"grpo.reward_fn": "nocolon"}, "grpo.reward_fn"),
                         ({"grpo.loss_type": "bnpo"}, "grpo.loss_type"), ({"grpo.scale_rewards": "std"}, "grpo.scale_rewards"),
                         ({"grpo.clip_eps": 1.0}, "grpo.clip_eps"), ({"grpo.clip_eps_high": -0.1}, "grpo.clip_eps_high"),
                         ({"grpo.importance_sampling_level": "sequence_token"}, "grpo.importance_sampling_level")):
    with pytest.raises(ConfigError, match=f"config.{key}"):
      check_config(tiny_config(model, data, **{**base, **overrides}))
  with pytest.raises(ConfigError, match="grpo.reward_fn.*no_such_module"):
    grpo.load_reward_fn("no_such_module:f")


def test_grpo_resume_is_exact(tiny_setup, tmp_path):
  model, _ = tiny_setup
  # DAPO's settings (token-level loss, clip-higher, no KL term, so no reference pass), with GSPO's
  # sequence-level ratio over two updates per batch of completions
  kw = {"objective": "grpo", "data.format": "preference", "data.seq_len": 48, "train.steps": 4,
        "train.batch_size": 8, "grpo.group_size": 4, "grpo.max_new_tokens": 4,
        "grpo.reward_fn": "train_helpers:text_reward",  # varies within groups: the losses are not 0
        "train.checkpoint_every": 2, "optimizer.learning_rate": 1e-2, "grpo.loss_type": "dapo",
        "grpo.clip_eps_high": 0.28, "grpo.kl_coef": 0.0, "grpo.importance_sampling_level": "sequence",
        "grpo.updates_per_batch": 2}
  data = os.path.join(DATA, "train.jsonl")
  straight = trainer.run(tiny_config(model, data, **kw), str(tmp_path / "straight"))
  trainer.run(tiny_config(model, data, **kw), str(tmp_path / "resumed"), stop_after=2)
  profiled = {"train.profile_steps": 2, "train.profile_start_step": 3}  # the resumed steps, traced
  second = trainer.run(tiny_config(model, data, **kw, **profiled), str(tmp_path / "resumed"))
  assert [r["step"] for r in second] == [3, 4]
  report = (tmp_path / "resumed" / "profile" / "top_ops.txt").read_text()
  assert report.startswith("2 step(s) traced") and "models/llama.py" in report, report
  prompts, _ = grpo.load_prompts(tiny_config(model, data, **kw), loading.load_tokenizer(model))
  assert trainer.max_targets_per_row(prompts) == 8  # the LM head runs at grpo.max_new_tokens=4, rounded up
  for key in ("loss", "reward_mean", "kl", "tokens_seen"):
    assert [r[key] for r in second] == [r[key] for r in straight[2:]], key
  assert all(r["kl"] == 0.0 for r in straight) and len({r["loss"] for r in straight}) > 1
  assert straight[1]["reward_mean"] == straight[0]["reward_mean"] != straight[2]["reward_mean"]  # 2 updates a round


def test_grpo_final_eval_is_in_the_last_row_once(tiny_setup, tmp_path):
  model, _ = tiny_setup
  data = os.path.join(DATA, "train.jsonl")
  kw = {"objective": "grpo", "data.format": "preference", "data.seq_len": 48, "data.eval": data, "train.steps": 3,
        "train.log_every": 2, "train.eval_batches": 1, "train.batch_size": 8, "grpo.group_size": 4,
        "grpo.max_new_tokens": 4, "grpo.reward_fn": DIGITS}
  rows = trainer.run(tiny_config(model, data, **kw), str(tmp_path))
  assert [r["step"] for r in rows] == [2, 3] and "loss" in rows[-1] and "eval_reward_mean" in rows[-1]
  assert trainer.run(tiny_config(model, data, **kw), str(tmp_path)) == []
  assert read_metrics(str(tmp_path)) == rows


def test_eval_reward_is_the_mean_over_real_prompts_only(peaked_model):
  """A short last eval batch is filled with prompt 0 (every process must complete as many rows);
  the fillers' rewards stay out of the mean."""
  from jaxtune import inference, sampling, sharding
  from train_helpers import text_reward
  folder, _ = peaked_model
  config = tiny_config(folder, os.path.join(DATA, "train.jsonl"), **{
      "objective": "grpo", "data.format": "preference", "data.seq_len": 48, "train.batch_size": 8,
      "grpo.max_new_tokens": 4, "grpo.reward_fn": "train_helpers:text_reward"})
  cfg, params = loading.load_model(folder)
  tokenizer = loading.load_tokenizer(folder)
  prompts, _ = grpo.load_prompts(config, tokenizer)
  prompts = grpo.Prompts(prompts.given[:5], prompts.ids[:5])
  got = grpo.evaluate_rewards(params, StepSpec(model=cfg), tokenizer, prompts, config, text_reward,
                              sharding.make_mesh(1, 1, 1))["eval_reward_mean"]
  eos = inference.eos_ids(cfg, tokenizer)
  pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
  completions = sampling.generate(params, cfg, prompts.ids, max_new_tokens=4, eos_ids=eos, pad_id=pad)
  rewards = text_reward(prompts.given, [tokenizer.decode(c, skip_special_tokens=True) for c in completions])
  assert got == pytest.approx(np.mean(rewards), abs=1e-6)
  assert got != pytest.approx(np.mean(rewards + [rewards[0]] * 3), abs=1e-4)  # fillers would change it


def test_grpo_prompts_must_split_over_processes(tiny_setup, tmp_path, monkeypatch):
  import jax
  from jaxtune.config_checks import ConfigError
  model, _ = tiny_setup
  config = tiny_config(model, os.path.join(DATA, "train.jsonl"), **{
      "objective": "grpo", "data.format": "preference", "data.seq_len": 48, "train.batch_size": 12,
      "grpo.group_size": 4, "grpo.max_new_tokens": 4, "grpo.reward_fn": DIGITS})
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  with pytest.raises(ConfigError, match=r"config.train.batch_size.*3 prompts per round.*2 processes"):
    trainer.run(config, str(tmp_path / "w"))
  assert not (tmp_path / "w").exists() or not os.listdir(tmp_path / "w")


def test_a_transformers_sequence_classifier_scores_completions_as_transformers_does(tmp_path):
  """grpo.reward_model may be a Hugging Face *ForSequenceClassification folder (e.g. a TRL reward model)."""
  import torch
  import transformers
  from hf_tiny import TINY, save_byte_tokenizer
  from jaxtune.config_checks import ConfigError
  from jaxtune.data import formats
  folder = str(tmp_path / "scorer")
  tokenizer = save_byte_tokenizer(folder)
  torch.manual_seed(0)
  hf = transformers.LlamaForSequenceClassification(transformers.LlamaConfig(
      **TINY, num_labels=1, pad_token_id=tokenizer.pad_token_id)).eval()
  hf.save_pretrained(folder)
  prompts, texts = ["What is 2 plus 3?", "Add 1 and 1.", "Name a colour."], ["It is 5.", "Ugh. 7.", "Blue, I think"]
  got = grpo.reward_model_fn(folder)(prompts, texts)

  ids = [formats.encode_prompt_response(p, t, tokenizer, template="chat").ids for p, t in zip(prompts, texts)]
  with torch.no_grad():  # one text at a time: no padding on the transformers side
    expected = [hf(input_ids=torch.tensor([row], dtype=torch.long)).logits[0, 0].item() for row in ids]
  np.testing.assert_allclose(got, expected, atol=1e-4)
  assert np.ptp(expected) > 1e-3

  causal = str(tmp_path / "causal")
  transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY)).save_pretrained(causal)
  with pytest.raises(ConfigError, match="config.grpo.reward_model.*LlamaForCausalLM is not a .*ForSequenceClassification"):
    grpo.reward_model_fn(causal)


def test_grpo_samples_in_the_run_compute_dtype(monkeypatch):
  import dataclasses
  from jaxtune import sampling
  from test_matmul import SMALL_CONFIG
  seen = {}

  def fake_generate(params, cfg, prompts, **kw):
    seen.update(kw)
    return [[1] for _ in prompts]

  monkeypatch.setattr(sampling, "generate", fake_generate)
  tokenizer = type("Tok", (), {"pad_token_id": 0, "eos_token_id": 2, "decode": lambda self, ids, **kw: "x"})()
  cfg = dataclasses.replace(SMALL_CONFIG, eos_token_ids=(2,))
  prompts = grpo.Prompts(["a", "b"], [[5, 6], [7, 8]])
  g = type("G", (), {"max_new_tokens": 4, "top_p": 1.0})()
  grpo.sample_round({}, StepSpec(model=cfg, compute_dtype="bfloat16"), tokenizer, prompts, [0, 1], 2, g, 0,
                    lambda p, c: [0.0] * len(c), 1.0, None)
  assert seen["compute_dtype"] == "bfloat16"
