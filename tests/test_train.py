"""Training core: loss goes down, LoRA/DoRA/IA3 start as the base, exact resume, grad accumulation."""

import numpy as np
import pytest

from jaxtune import trainer, workdir
from jaxtune.config_checks import ConfigError
from jaxtune.data import pipeline
from jaxtune.metrics_log import read_metrics
from jaxtune.models import loading
from train_helpers import lora_and_full_kept_bytes, losses, random_lm_batch, tiny_config


def test_full_and_lora_reduce_loss_and_lora_starts_at_base(tiny_setup, tmp_path):
  import json
  model, data = tiny_setup
  full = losses(trainer.run(tiny_config(model, data, **{"peft.method": "full", "optimizer.learning_rate": 1e-3}),
                            str(tmp_path / "full")))
  lora = losses(trainer.run(tiny_config(model, data, **{"peft.method": "lora"}), str(tmp_path / "lora")))
  dora = losses(trainer.run(tiny_config(model, data, **{"peft.method": "lora", "peft.lora.use_dora": True}),
                            str(tmp_path / "dora")))
  ia3 = losses(trainer.run(tiny_config(model, data, **{"peft.method": "ia3", "optimizer.learning_rate": 0.1}),
                           str(tmp_path / "ia3")))
  print(f"first and last losses: full {full[0]:.4f} {full[-1]:.4f}, lora {lora[-1]:.4f}, dora {dora[-1]:.4f}, "
        f"ia3 {ia3[-1]:.4f}")
  assert full[-1] < full[0] - 0.3, full
  assert lora[-1] < lora[0] - 0.1, lora
  assert dora[-1] < dora[0] - 0.1, dora
  assert ia3[-1] < ia3[0] - 0.05, ia3  # 544 scales, at a learning rate for scales: 5.57 -> 5.46
  # B = 0 at init (DoRA's magnitudes = the kernels' norms, IA3's vectors = 1): the first forward is
  # the base model's, so the first-step loss equals full's.
  for method, series in (("lora", lora), ("dora", dora), ("ia3", ia3)):
    assert abs(series[0] - full[0]) < 1e-6, (method, series[0], full[0])
  # DoRA trains one magnitude per output of the 7 projections of the 2 layers on top of LoRA's A/B;
  # IA3 one scale per output of k_proj and v_proj and per input of down_proj.
  trainable = {run: json.load(open(tmp_path / run / "params.json"))["trainable_params"]
               for run in ("lora", "dora", "ia3")}
  d, f, q, kv = 64, 128, 64, 32
  assert trainable["dora"] - trainable["lora"] == 2 * (q + kv + kv + d + f + f + d)
  assert trainable["ia3"] == 2 * (kv + kv + f)
  # The checkpoints hold trained magnitudes and scales (no longer the kernels' norms / ones).
  cfg, base = loading.load_model(model)
  dora_params, _ = workdir.load_adapter_from_workdir(base, cfg, str(tmp_path / "dora"))
  q_proj = dora_params["layers"]["self_attn"]["q_proj"]
  assert np.abs(q_proj["lora_magnitude"] - np.linalg.norm(q_proj["kernel"], axis=-2)).max() > 1e-3
  ia3_params, _ = workdir.load_adapter_from_workdir(base, cfg, str(tmp_path / "ia3"))
  assert np.abs(ia3_params["layers"]["mlp"]["down_proj"]["ia3_in"] - 1).max() > 1e-3


def test_outputs_follow_the_contract(tiny_setup, tmp_path):
  import json
  model, data = tiny_setup
  trainer.run(tiny_config(model, data), str(tmp_path))
  rows = read_metrics(str(tmp_path))
  assert [r["step"] for r in rows] == list(range(1, 7))
  for r in rows:
    assert {"step", "loss", "learning_rate", "tokens_per_sec"} <= set(r)
  assert all(r["tokens_per_sec"] > 0 for r in rows[1:])
  counts = json.load(open(tmp_path / "params.json"))
  # LoRA r=4 on 7 projections of 2 layers: (in + out) * r summed.
  d, f, q, kv = 64, 128, 64, 32
  per_layer = 4 * ((d + q) + (d + kv) * 2 + (q + d) + (d + f) * 2 + (f + d))
  assert counts["trainable_params"] == 2 * per_layer
  assert counts["total_params"] > counts["trainable_params"]
  assert json.load(open(tmp_path / "config.json"))["peft"]["method"] == "lora"


def test_eval_rows_follow_eval_every_and_a_rerun_logs_nothing(tiny_setup, tmp_path):
  """An eval after every eval_every-th step (log step or not) and after the last, in that step's row;
  rerunning the finished run logs nothing, and asking for fewer steps than its checkpoint is refused."""
  model, data = tiny_setup
  kw = {"data.eval": data, "train.steps": 5, "train.log_every": 3, "train.eval_every": 2, "train.eval_batches": 1}
  trainer.run(tiny_config(model, data, **kw), str(tmp_path))
  rows = read_metrics(str(tmp_path))
  assert [r["step"] for r in rows] == [2, 3, 4, 5]
  assert [r["step"] for r in rows if "eval_loss" in r] == [2, 4, 5]
  assert all({"loss", "learning_rate", "tokens_per_sec"} <= set(r) for r in rows)
  assert trainer.run(tiny_config(model, data, **kw), str(tmp_path)) == []
  with pytest.raises(ConfigError, match=r"config.train.steps: 4 < 5"):
    trainer.run(tiny_config(model, data, **{**kw, "train.steps": 4}), str(tmp_path))
  assert read_metrics(str(tmp_path)) == rows


@pytest.mark.parametrize("method", ["lora", "full", "qlora", "muon"])
def test_resume_is_exact(tiny_setup, tmp_path, method):
  """qlora: the NF4 base is not in the checkpoint; the resumed run quantizes it again, identically.
  muon: full fine-tuning whose optimizer state is partitioned (Muon's momentum, AdamW's moments)."""
  model, data = tiny_setup
  extra = {"qlora": {"model.quantize": "nf4"}, "muon": {"optimizer.name": "muon"}}.get(method, {})
  kw = {"peft.method": {"qlora": "lora", "muon": "full"}.get(method, method), **extra, "train.steps": 20,
        "train.checkpoint_every": 10,
        "optimizer.learning_rate": 1e-3, "optimizer.schedule": "cosine", "optimizer.warmup_steps": 3}
  straight_rows = trainer.run(tiny_config(model, data, **kw), str(tmp_path / "straight"))
  straight = losses(straight_rows)
  first = trainer.run(tiny_config(model, data, **kw), str(tmp_path / "resumed"), stop_after=10)
  second = trainer.run(tiny_config(model, data, **kw), str(tmp_path / "resumed"))
  assert [r["step"] for r in first][-1] == 10 and [r["step"] for r in second][0] == 11
  assert losses(second) == straight[10:], (losses(second), straight[10:])
  # tokens_seen: the non-padding inputs of the batches so far, counted here from the data itself,
  # and carried through the checkpoint.
  config = tiny_config(model, data, **kw)
  batches = pipeline.BatchIterator(trainer.setup(config, str(tmp_path / "count")).train_data, 8, config.train.seed)
  expected = np.cumsum([np.count_nonzero(batches.next()["segment_ids"]) for _ in range(20)])
  assert [row["tokens_seen"] for row in straight_rows if "loss" in row] == expected.tolist()
  assert [row["tokens_seen"] for row in first + second if "loss" in row] == expected.tolist()


def test_grad_accumulation_equals_big_batch(tiny_setup, tmp_path):
  model, data = tiny_setup
  kw = {"peft.method": "full", "optimizer.learning_rate": 1e-3, "train.steps": 4}
  big = losses(trainer.run(tiny_config(model, data, **kw), str(tmp_path / "big")))
  acc = losses(trainer.run(tiny_config(model, data, **kw, **{"train.grad_accum": 4}), str(tmp_path / "acc")))
  np.testing.assert_allclose(acc, big, atol=1e-5, rtol=0)


def test_logits_only_at_target_positions_is_exact(tiny_setup):
  """StepSpec.max_targets (set from the data) gives the same loss and gradients as full logits."""
  import jax
  from jaxtune import train_step
  from jaxtune.models import loading
  from jaxtune.peft import partition
  model, _ = tiny_setup
  cfg, params = loading.load_model(model)
  weights = np.zeros((4, 32), np.float32)
  for row, start in enumerate((3, 10, 20, 28)):
    weights[row, start:start + 4] = 1.0
  batch = dict(random_lm_batch(4, 32), weights=weights)
  trainable, frozen = partition.split(params, "full")

  def loss_and_grads(k):
    spec = train_step.StepSpec(model=cfg, max_targets=k)
    f = lambda tr: train_step.lm_loss_sums(partition.merge(tr, frozen), spec, batch)[0]
    return jax.value_and_grad(f)(trainable)

  (full, g_full), (sel, g_sel) = loss_and_grads(0), loss_and_grads(8)
  np.testing.assert_allclose(sel, full, rtol=1e-6)
  for path in g_full:
    np.testing.assert_allclose(g_sel[path], g_full[path], atol=1e-6, err_msg=path)


def test_remat_policies_give_the_same_loss_and_gradients(tiny_setup):
  """train.remat with either policy only trades memory for recomputation: same numbers as no remat."""
  import jax
  from jaxtune import config_checks, train_step
  from jaxtune.models import llama, loading
  from jaxtune.peft import partition
  assert tuple(llama.REMAT_POLICIES) == config_checks.REMAT_POLICIES
  model, _ = tiny_setup
  cfg, params = loading.load_model(model)
  batch = random_lm_batch(2, 48)
  trainable, frozen = partition.split(params, "full")

  def loss_and_grads(remat):
    spec = train_step.StepSpec(model=cfg, remat=remat)
    f = lambda tr: train_step.lm_loss_sums(partition.merge(tr, frozen), spec, batch)[0]
    return jax.jit(jax.value_and_grad(f))(trainable)

  base_loss, base_grads = loss_and_grads("")
  for policy in config_checks.REMAT_POLICIES:
    loss, grads = loss_and_grads(policy)
    np.testing.assert_allclose(loss, base_loss, rtol=1e-6, err_msg=policy)
    for path in base_grads:
      scale = float(np.abs(base_grads[path]).max())
      np.testing.assert_allclose(grads[path], base_grads[path], rtol=0, atol=1e-5 * scale, err_msg=f"{policy} {path}")


@pytest.mark.parametrize("compute_dtype", ["float32", "bfloat16"])
def test_dots_remat_keeps_attention_outputs_so_backward_recomputes_no_scores(tiny_setup, compute_dtype):
  """remat_policy=dots saves blocked attention's output and log-sum-exp (named in attention.py, in
  float32 for either compute dtype), so the backward pass does not rerun the attention forward: as
  many score exps as no remat (and in float32 as many dots)."""
  import re

  import jax
  from jaxtune import train_step
  from jaxtune.models import loading
  from jaxtune.peft import partition
  model, _ = tiny_setup
  cfg, params = loading.load_model(model)
  batch = random_lm_batch(2, 128)
  trainable, frozen = partition.split(params, "full")

  def counts(remat):
    spec = train_step.StepSpec(model=cfg, remat=remat, compute_dtype=compute_dtype)
    f = lambda tr: train_step.lm_loss_sums(partition.merge(tr, frozen), spec, batch)[0]
    text = str(jax.make_jaxpr(jax.value_and_grad(f))(trainable))
    return len(re.findall(r"\bexp\b", text)), len(re.findall(r"\bdot_general\b", text))

  (exps, dots), (no_remat_exps, no_remat_dots) = counts("dots"), counts("")
  assert exps == no_remat_exps
  if compute_dtype == "float32":  # bfloat16 recomputes its projections: cheaper on CPU than keeping them
    assert dots == no_remat_dots
  nothing_exps, nothing_dots = counts("nothing")
  assert nothing_exps > no_remat_exps and nothing_dots > no_remat_dots  # what recomputing the attention looks like


def test_dots_remat_keeps_a_lora_projection_output_once(tiny_setup):
  """remat_policy=dots saves each projection's output (the name "projection" in llama.dense), not its
  base matmul and LoRA product apart: a LoRA step keeps no more than full fine-tuning of the same
  model, plus the LoRA weights themselves (the backward closure's arrays, residuals and weights)."""
  from jaxtune import train_step
  from jaxtune.models import loading
  model, _ = tiny_setup
  cfg, params = loading.load_model(model)
  lora_kept, full_kept_and_lora = lora_and_full_kept_bytes(params, train_step.StepSpec(model=cfg, remat="dots"),
                                                           random_lm_batch(2, 128))
  assert lora_kept <= full_kept_and_lora
