"""GRPO (Shao et al. 2024, DeepSeekMath): RL from a reward with on-policy generation, on the shared step.

Each round takes train.batch_size / G prompts, samples G completions per prompt with the KV-cache
generator, scores them (a Python function named by grpo.reward_fn, or a trained reward model),
turns the rewards into advantages (r - group mean, divided by the group's, the batch's or no std:
grpo.scale_rewards) and takes grpo.updates_per_batch optimizer steps on the clipped policy-ratio
objective (grpo.clip_eps, and clip_eps_high above 1 for DAPO's clip-higher) plus kl_coef times the
k3 estimate of KL(policy || reference); the reference is the adapter switched off with PEFT, a
frozen copy of the initial weights for full fine-tuning, and is not used at all when kl_coef is 0.
grpo.loss_type says how the per-token losses are averaged and grpo.importance_sampling_level whether a
token's ratio is its own or its completion's (GSPO; see grpo_loss_sums). Steps count optimizer
updates. Advantages and losses are TRL GRPOTrainer's formulas (its loss_type, scale_rewards,
epsilon/epsilon_high, importance_sampling_level and beta).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import signal
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxtune import checkpoint, inference, sampling, sharding, trainer
from jaxtune.config_checks import GRPO_LOSS_TYPES, ConfigError, field_map
from jaxtune.data import formats, pipeline
from jaxtune.data.sources import DataError
from jaxtune.metrics_log import MetricsLog
from jaxtune.models import llama, loading
from jaxtune.models.config import read_hf_config
from jaxtune.objectives import dpo
from jaxtune.peft import partition
from jaxtune.train_step import Batch, StepSpec, forward_logits, input_tokens, target_logps

RewardFn = Callable[[Sequence[Any], Sequence[str]], Sequence[float]]


# ----------------------------------------------------------------------------- the loss


def token_logps(params, spec: StepSpec, batch: Batch, rng=None):
  """(log p(target token), weight) per position, float32: B x spec.max_targets at each row's first
  weighted (completion) positions, so the LM head skips the prompt; B x T when max_targets is 0."""
  hidden = forward_logits(params, spec, batch, rng, hidden=True)
  return target_logps(params, spec, hidden, batch["targets"], batch["weights"].astype(jnp.float32))


token_logps_jit = jax.jit(token_logps, static_argnames=("spec",))


def grpo_loss_sums(params, spec: StepSpec, batch: Batch, rng=None, *, clip_eps: float = 0.2,
                   clip_eps_high: float = 0.0, kl_coef: float = 0.04, loss_type: str = "grpo",
                   max_new_tokens: int = 0, importance_sampling_level: str = "token"):
  """(the batch's summed loss, what it is divided by, metrics); micro-batches add up to the whole
  batch's loss. loss_type (config_checks.GRPO_LOSS_TYPES, TRL's names):
    grpo: each completion's mean over its tokens, then the mean over completions (DeepSeekMath);
    dapo: the mean over all completion tokens of the batch (DAPO; TRL's bnpo without accumulation);
    dr_grpo: the sum over completion tokens / (completions x max_new_tokens) (Dr. GRPO).

  batch: the completion rows (weights mark completion tokens), "advantages" (B,), "ref_logp" (not
  needed when kl_coef is 0) and, when the batch is reused for several updates, "old_logp" of the
  sampling policy, both laid out as `token_logps` returns them (T below: spec.max_targets when set).
  The ratio is clipped to [1 - clip_eps, 1 + (clip_eps_high or clip_eps)]; with
  importance_sampling_level "sequence" (GSPO, Zheng et al. 2025) every token of a completion takes
  the completion's ratio, exp of the mean of its tokens' log-ratios.
  """
  logp_BxT, weights_BxT = token_logps(params, spec, batch, rng)
  old_BxT = batch["old_logp"] if "old_logp" in batch else jax.lax.stop_gradient(logp_BxT)
  log_ratio_BxT = logp_BxT - old_BxT
  ntok_B = jnp.sum(weights_BxT, axis=-1)
  if importance_sampling_level == "sequence":
    log_ratio_BxT = (jnp.sum(log_ratio_BxT * weights_BxT, axis=-1) / jnp.maximum(ntok_B, 1.0))[:, None]
  ratio_BxT = jnp.exp(log_ratio_BxT)
  adv_Bx1 = batch["advantages"][:, None]
  low, high = 1 - clip_eps, 1 + (clip_eps_high or clip_eps)
  per_token_BxT = -jnp.minimum(ratio_BxT * adv_Bx1, jnp.clip(ratio_BxT, low, high) * adv_Bx1)
  kl_BxT = jnp.zeros_like(logp_BxT)
  if kl_coef:
    log_ref_ratio_BxT = batch["ref_logp"] - logp_BxT
    kl_BxT = jnp.exp(log_ref_ratio_BxT) - log_ref_ratio_BxT - 1  # k3: unbiased, always >= 0
    per_token_BxT = per_token_BxT + kl_coef * kl_BxT
  tokens = jnp.sum(weights_BxT)
  if loss_type == "grpo":
    valid_B = (ntok_B > 0).astype(jnp.float32)
    per_seq_B = jnp.sum(per_token_BxT * weights_BxT, axis=-1) / jnp.maximum(ntok_B, 1.0)
    total, count = jnp.sum(per_seq_B * valid_B), jnp.sum(valid_B)
  elif loss_type == "dapo":
    total, count = jnp.sum(per_token_BxT * weights_BxT), tokens
  elif loss_type == "dr_grpo":
    total, count = jnp.sum(per_token_BxT * weights_BxT), jnp.float32(weights_BxT.shape[0] * max_new_tokens)
  else:
    raise ConfigError("grpo.loss_type", f"{loss_type!r} is not one of {' | '.join(GRPO_LOSS_TYPES)}")
  # the tokens whose policy gradient the clip removes (TRL's clip_ratio/region_mean)
  clipped = ((ratio_BxT < low) & (adv_Bx1 < 0)) | ((ratio_BxT > high) & (adv_Bx1 > 0))
  tokens = jnp.maximum(tokens, 1.0)
  metrics = {"kl": jnp.sum(jax.lax.stop_gradient(kl_BxT) * weights_BxT) / tokens,
             "clip_fraction": jnp.sum(clipped.astype(jnp.float32) * weights_BxT) / tokens}
  return total, count, metrics


def advantages(rewards_B: np.ndarray, group_size: int, scale_rewards: str = "group",
               batch_std: float | None = None) -> np.ndarray:
  """r - its group's mean, divided by (std + 1e-4): the group's std ("group"), `batch_std`, the std
  of the whole global batch's rewards ("batch"), or not divided ("none"). Stds are unbiased (n - 1),
  as torch's and TRL's. Rows are grouped consecutively, G per prompt."""
  r = np.asarray(rewards_B, np.float32).reshape(-1, group_size)
  centred = r - r.mean(1, keepdims=True)
  if scale_rewards == "none":
    return centred.reshape(-1)
  std = r.std(1, ddof=1, keepdims=True) if scale_rewards == "group" else np.float32(batch_std)
  return (centred / (std + 1e-4)).reshape(-1)


# ----------------------------------------------------------------------------- prompts and completions


@dataclasses.dataclass
class Prompts:
  """The prompts of a GRPO run; as a dataset its rows are prompt indices (BatchIterator gives a
  seeded, resumable order of them)."""

  given: list[Any]  # each prompt as the data gives it (text or messages): what the reward function sees
  ids: list[list[int]]
  # most target (completion) positions a row will have: grpo.max_new_tokens (trainer.max_targets_per_row)
  targets_per_row: int = 0

  @property
  def arrays(self) -> dict[str, np.ndarray]:
    return {"index": np.arange(len(self.ids))}

  def __len__(self) -> int:
    return len(self.ids)

  @property
  def stats(self) -> pipeline.DataStats:
    n, tokens = len(self.ids), sum(map(len, self.ids))
    return pipeline.DataStats(records=n, kept=n, rows=n, tokens=tokens, rows_tokens=tokens)


def prompt_of(record: dict, template: str):
  """The record's prompt: "prompt" (text or messages), else "instruction" (+ optional "context")."""
  if not isinstance(record, dict):
    raise formats.RecordError(f"record is a {type(record).__name__}, expected a JSON object")
  if "prompt" in record and record["prompt"]:
    return record["prompt"]
  if record.get("instruction"):
    if template == "chat":
      return formats.instruction_messages(record["instruction"], record.get("context"))
    return formats.alpaca_prompt(record["instruction"], record.get("context"))
  raise formats.RecordError("needs a non-empty field 'prompt' (or 'instruction')")


def encode_prompt(prompt, tokenizer, template: str) -> list[int]:
  if isinstance(prompt, list) or template == "chat":
    messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])
  return list(tokenizer(prompt)["input_ids"])


def encode_prompts(records, tokenizer, template: str, max_len: int) -> Prompts:
  given, ids = [], []
  for record, origin in zip(records.records, records.origins):
    try:
      prompt = prompt_of(record, template)
      encoded = encode_prompt(prompt, tokenizer, template)
    except formats.RecordError as e:
      raise DataError(f"{origin}: {e}") from None
    if len(encoded) > max_len:
      raise DataError(f"{origin}: the prompt has {len(encoded)} tokens, more than data.seq_len - "
                      f"grpo.max_new_tokens = {max_len}")
    given.append(prompt)
    ids.append(encoded)
  if not ids:
    raise DataError("no prompts in the data")
  return Prompts(given, ids)


def load_prompts(config: ml_collections.ConfigDict, tokenizer) -> tuple[Prompts, Prompts | None]:
  """(train prompts, eval prompts or None): trainer.setup's `load` for GRPO."""
  train, evald = pipeline.load_splits(config.data.train, config.data.eval or None,
                                      eval_fraction=config.data.eval_fraction, seed=config.train.seed,
                                      field_map=field_map(config.data.field_map), lenient=config.data.lenient)
  template = trainer.instruction_template(config, tokenizer)
  max_len = config.data.seq_len - config.grpo.max_new_tokens

  def encode(records):
    prompts = encode_prompts(records, tokenizer, template, max_len)
    return dataclasses.replace(prompts, targets_per_row=config.grpo.max_new_tokens)

  return encode(train), encode(evald) if evald is not None and len(evald) else None


def completion_batch(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]],
                     seq_len: int) -> dict[str, np.ndarray]:
  """Rows prompt + completion in the batch contract; only completion tokens are targets."""
  B = len(prompts)
  out = {k: np.zeros((B, seq_len), np.int32) for k in ("inputs", "targets", "positions", "segment_ids")}
  out["weights"] = np.zeros((B, seq_len), np.float32)
  for row, (p, c) in enumerate(zip(prompts, completions)):
    ids = list(p) + list(c)
    n = len(ids) - 1
    out["inputs"][row, :n], out["targets"][row, :n] = ids[:-1], ids[1:]
    out["positions"][row, :n], out["segment_ids"][row, :n] = np.arange(n), 1
    out["weights"][row, len(p) - 1:n] = 1.0
  return out


# ----------------------------------------------------------------------------- rewards


def load_reward_fn(path: str) -> RewardFn:
  """"package.module:function" -> the function."""
  module, _, name = path.partition(":")
  try:
    return getattr(importlib.import_module(module), name)
  except (ImportError, AttributeError) as e:
    raise ConfigError("grpo.reward_fn", f"{path!r} cannot be loaded: {e}") from None


def reward_model_fn(path: str) -> RewardFn:
  """A reward model as a reward function over texts: an objective=reward workdir (its newest
  checkpoint), or a transformers *ForSequenceClassification folder with one label (e.g. TRL's)."""
  from jaxtune import workdir
  from jaxtune.data.packing import pack
  from jaxtune.evaluation import bucket_length
  from jaxtune.objectives import reward
  if os.path.exists(os.path.join(path, "config.json")) and "model_type" in read_hf_config(path):  # HF folder
    try:
      cfg, params = reward.load_hf_scorer(path)
    except (KeyError, ValueError) as e:
      raise ConfigError("grpo.reward_model", str(e.args[0] if isinstance(e, KeyError) else e)) from None
    peft, tokenizer = llama.PeftRuntime(), loading.load_tokenizer(path)
    template = "chat" if getattr(tokenizer, "chat_template", None) else "raw"
  else:
    config, cfg, params, peft, tokenizer = workdir.load_trained(path)
    if config["objective"] != "reward":
      raise ConfigError("grpo.reward_model", f"{path} is an objective={config['objective']} run, not a reward model")
    template = trainer.instruction_template(ml_collections.ConfigDict(config), tokenizer)
  style = "chat" if template == "chat" else "raw"  # as formats.encode_preference renders pairs
  score = jax.jit(lambda p, tokens, positions, segments: reward.rewards(p, cfg, tokens, positions, segments,
                                                                       peft=peft))

  def fn(prompts, completions):
    encoded = [formats.encode_prompt_response(p, c, tokenizer, template=style)
               for p, c in zip(prompts, completions)]
    rows = pack(encoded, bucket_length(max(len(e.ids) for e in encoded)), False)
    return np.asarray(score(params, rows["inputs"], rows["positions"], rows["segment_ids"])).tolist()

  return fn


def reward_fn_of(g: ml_collections.ConfigDict) -> RewardFn:
  return load_reward_fn(g.reward_fn) if g.reward_fn else reward_model_fn(g.reward_model)


def score(fn: RewardFn, prompts: Sequence[Any], texts: Sequence[str]) -> np.ndarray:
  values = np.asarray(fn(list(prompts), list(texts)), np.float32).reshape(-1)
  if values.shape[0] != len(texts) or not np.all(np.isfinite(values)):
    raise ValueError(f"the GRPO reward function returned {values.shape[0]} values (finite: "
                     f"{bool(np.all(np.isfinite(values)))}) for {len(texts)} completions")
  return values


# ----------------------------------------------------------------------------- the loop


def sample_round(params, spec: StepSpec, tokenizer, prompts: Prompts, index: Sequence[int], group: int,
                 g: ml_collections.ConfigDict, seed: int, fn: RewardFn, temperature: float, mesh):
  """(prompt ids per completion, completion ids, rewards) for `group` samples of each indexed prompt.

  `index`: this process's prompts; all processes sample together, one global batch on the mesh."""
  prompt_ids = [prompts.ids[i] for i in index for _ in range(group)]
  eos = inference.eos_ids(spec.model, tokenizer)
  pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
  completions = sampling.generate(params, spec.model, prompt_ids, max_new_tokens=g.max_new_tokens,
                                  temperature=temperature, top_p=g.top_p, seed=seed, eos_ids=eos, pad_id=pad,
                                  peft=spec.peft, mesh=mesh, compute_dtype=spec.compute_dtype)
  texts = [tokenizer.decode(c, skip_special_tokens=True) for c in completions]
  rewards = score(fn, [prompts.given[i] for i in index for _ in range(group)], texts)
  return prompt_ids, completions, rewards


def reference_params(config: ml_collections.ConfigDict, trainable: dict, frozen: dict) -> llama.Params:
  """The adapter switched off (PEFT: no copy), or a copy of the initial weights (full fine-tuning)."""
  if config.peft.method == "full":
    return partition.merge(jax.tree.map(jnp.copy, trainable), frozen)
  return dpo.base_params(partition.merge({}, frozen))


def evaluate_rewards(params, spec, tokenizer, prompts: Prompts, config, fn: RewardFn, mesh) -> dict[str, float]:
  """Mean reward of greedy completions of the eval prompts (train.eval_batches caps the batches).

  Batches of train.batch_size prompts; each process completes its consecutive share of a batch, and
  a short last batch is filled with prompt 0, left out of the mean."""
  size, n = config.train.batch_size, len(prompts.ids)
  per_host = size // jax.process_count()
  rewards, real = [], []
  for b, start in enumerate(range(0, n, size)):
    if config.train.eval_batches and b >= config.train.eval_batches:
      break
    index = start + jax.process_index() * per_host + np.arange(per_host)
    values = sample_round(params, spec, tokenizer, prompts, np.where(index < n, index, 0), 1, config.grpo, 0, fn,
                          0.0, mesh)[2]
    rewards.append(sharding.all_processes(values))
    real.append(sharding.all_processes(index < n))
  return {"eval_reward_mean": float(np.mean(np.concatenate(rewards)[np.concatenate(real)]))}


def run(config: ml_collections.ConfigDict, workdir: str, *, stop_after: int | None = None) -> list[dict]:
  """Trains (or resumes) to config.train.steps optimizer updates; returns the logged rows.

  SIGTERM/SIGINT save the current step at the next round boundary, then raise
  trainer.TrainingInterrupted (as the other objectives do).
  """
  g, P = config.grpo, jax.process_count()
  prompts_per_round = config.train.batch_size // g.group_size
  if prompts_per_round % P:
    raise ConfigError("train.batch_size", f"{prompts_per_round} prompts per round "
                      f"(train.batch_size / grpo.group_size) do not split evenly over {P} processes")
  is_main = jax.process_index() == 0
  r = trainer.setup(config, workdir, load=load_prompts)
  spec, mesh, tokenizer = r.spec, r.mesh, r.tokenizer
  fn = reward_fn_of(g)
  trainable, frozen, opt_state, rng = r.trainable, r.frozen, r.opt_state, r.rng
  # before a step donates the initial weights; none without a KL term
  reference = reference_params(config, trainable, frozen) if g.kl_coef else None
  # Each process samples its share of a round's prompts, all G completions of each (groups stay local).
  batches = pipeline.BatchIterator(r.train_data, prompts_per_round, config.train.seed, jax.process_index(), P)
  manager = checkpoint.make_manager(workdir, config.train.keep_checkpoints)
  step = manager.latest_step() or 0
  trainer.check_start(step, config.train.steps, workdir)
  tokens_seen = 0  # non-padding input tokens over the whole run
  if step:
    state, meta = checkpoint.restore(manager, step, {"trainable": trainable, "opt_state": opt_state, "rng": rng})
    trainable, opt_state, rng = state["trainable"], state["opt_state"], state["rng"]
    batches.restore(meta["data"])
    tokens_seen = meta.get("tokens_seen", 0)
    if is_main:
      print(f"resumed from {checkpoint.checkpoint_dir(workdir)}/{step}", flush=True)
  if is_main:
    trainer.write_json(os.path.join(workdir, "params.json"), r.counts)
    trainer.write_json(os.path.join(workdir, "config.json"), json.loads(config.to_json()))
    trainer.trim_metrics(workdir, step)  # rows a killed run logged after its checkpoint come again
  log, rows = MetricsLog(workdir, enabled=is_main), []
  last = min(config.train.steps, stop_after) if stop_after else config.train.steps
  window_start, window_tokens = time.perf_counter(), 0
  saved = step

  def save(at):
    nonlocal saved
    saved = at
    log.flush()  # the rows up to this checkpoint are stored before it (a gs:// log uploads now)
    checkpoint.save(manager, at, {"trainable": trainable, "opt_state": opt_state, "rng": rng},
                    {"data": batches.state(), "tokens_seen": tokens_seen})

  profiler = trainer.step_profiler(config, workdir)
  with trainer.StopSignals() as stop:
    try:
      while step < last:
        if stop.requested():  # a round boundary: the checkpoint's data position is exact
          if saved < step:
            save(step)
          raise trainer.TrainingInterrupted(stop.signum or signal.SIGTERM, step, trainer.newest_checkpoint(manager))
        params = partition.merge(trainable, frozen)
        round_seed = config.train.seed * 1_000_003 + step
        prompt_ids, completions, rewards = sample_round(params, spec, tokenizer, r.train_data, batches.next()["index"],
                                                        g.group_size, g, round_seed, fn, g.temperature, mesh)
        local = completion_batch(prompt_ids, completions, config.data.seq_len)
        all_rewards = sharding.all_processes(rewards)
        local["advantages"] = advantages(rewards, g.group_size, g.scale_rewards, np.std(all_rewards, ddof=1))
        batch = sharding.global_batch(local, mesh)
        if reference is not None:
          batch["ref_logp"] = token_logps_jit(reference, spec, batch)[0]
        if g.updates_per_batch > 1:  # the sampling policy's log-probs, for the ratio after the first update
          batch["old_logp"] = token_logps_jit(params, spec, batch)[0]
        sampled = {"reward_mean": float(all_rewards.mean()), "reward_std": float(all_rewards.std()),
                   "completion_length": float(np.mean(sharding.all_processes([len(c) for c in completions])))}
        round_tokens = int(input_tokens(batch))  # the global batch's, as the step counts; every update trains on them
        for _ in range(min(g.updates_per_batch, last - step)):
          step += 1
          window_tokens += round_tokens
          tokens_seen += round_tokens
          args = (trainable, frozen, opt_state, batch, jax.random.fold_in(rng, step))
          profiler.before_step(step, lambda: r.step_fn.lower(*args), (trainable, opt_state))
          trainable, opt_state, metrics = r.step_fn(*args)
          profiler.after_step(step, metrics)
          is_eval = r.eval_data is not None and trainer.is_eval_step(step, config.train.steps, config.train.eval_every)
          if step % config.train.log_every and step != last and not is_eval:
            continue
          m = jax.device_get(metrics)
          if not m["finite"]:
            raise FloatingPointError(f"non-finite GRPO loss or gradients at step {step}")
          elapsed = time.perf_counter() - window_start
          row = {"step": step, "loss": float(m["loss"]), "learning_rate": float(r.schedule(step - 1)),
                 "tokens_per_sec": window_tokens / max(elapsed, 1e-9),
                 "tokens_seen": tokens_seen, "grad_norm": float(m["grad_norm"]), "kl": float(m["kl"]),
                 "clip_fraction": float(m["clip_fraction"]), **sampled}
          if is_eval:
            row.update(evaluate_rewards(partition.merge(trainable, frozen), spec, tokenizer, r.eval_data, config, fn,
                                        mesh))
          log.write(row)
          rows.append(row)
          if is_main:
            print(" ".join(f"{k}={v:.4g}" for k, v in row.items()), flush=True)
          window_start, window_tokens = time.perf_counter(), 0
        every = config.train.checkpoint_every
        if step == last or (every and step % every < g.updates_per_batch):
          save(step)
    finally:  # also on errors and signals: the newest checkpoint is complete before we leave
      profiler.finish()
      manager.wait_until_finished()
      log.close()
  return rows
