"""Mixtures of experts (Mixtral, Qwen3-MoE): training, HF and PEFT exports that transformers and
peft load with jaxtune's logits. (Logit parity of the base models: test_parity.py's families.)"""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers

import hf_tiny
from jaxtune import export, train_step, trainer, workdir
from jaxtune.models import llama, loading
from train_helpers import assert_same_gradients, losses, make_tiny_setup, tiny_config

TOKENS = np.random.RandomState(0).randint(0, 256, (2, 24))


def torch_logits(model):
  with torch.no_grad():
    return model(torch.tensor(TOKENS)).logits.numpy()


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "qwen2_moe"])
def test_changed_experts_export_to_transformers(tmp_path, family):
  """Every expert and router changed (as full fine-tuning changes them; Qwen2-MoE's shared expert and
  its gate too): the merged HF folder names each (layer, expert) tensor as the family's checkpoints
  do, and transformers' logits are ours."""
  folder, out = str(tmp_path / "model"), str(tmp_path / "out")
  original = torch_logits(hf_tiny.save_hf_model(family, folder, sharp=True))
  cfg, params = loading.load_model(folder)
  flat = loading.flatten(params)
  for i, path in enumerate(p for p in flat if "/mlp/" in p):
    flat[path] = flat[path] * (1 + 0.3 * jax.random.normal(jax.random.PRNGKey(i), flat[path].shape))
  params = loading.unflatten(flat)
  export.write_hf(out, cfg, params, llama.PeftRuntime(), None, folder)
  theirs = torch_logits(transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval())
  ours = np.asarray(llama.forward(params, cfg, jnp.asarray(TOKENS))[0])
  np.testing.assert_allclose(ours, theirs, atol=1e-5 * max(1, np.abs(theirs).max()), rtol=0)
  assert np.abs(theirs - original).max() > 0.01


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "qwen2_moe"])
def test_ragged_dispatch_gives_transformers_logits_and_the_dense_gradients(tmp_path, family):
  """model.moe_dispatch=ragged (tokens grouped by expert, jax.lax.ragged_dot), what TPUs and GPUs
  run by default, on this CPU: transformers' logits, and the dense dispatch's gradients."""
  folder = str(tmp_path / "model")
  theirs = torch_logits(hf_tiny.save_hf_model(family, folder, sharp=True))
  cfg, params = loading.load_model(folder)
  ragged, dense = (dataclasses.replace(cfg, moe_dispatch=d) for d in ("ragged", "dense"))
  ours = np.asarray(llama.forward(params, ragged, jnp.asarray(TOKENS))[0])
  np.testing.assert_allclose(ours, theirs, atol=1e-5 * max(1, np.abs(theirs).max()), rtol=0)

  def loss(p, c):
    return jnp.mean(jax.nn.log_softmax(llama.forward(p, c, jnp.asarray(TOKENS))[0])[..., 0])

  assert_same_gradients(jax.grad(loss)(params, ragged), jax.grad(loss)(params, dense))


def test_mixtral_full_and_lora_train_and_lora_exports_to_peft(tmp_path):
  """Full fine-tuning trains experts and router; LoRA (default targets) finds only the attention
  projections in MoE layers, and its PEFT adapter on transformers' Mixtral gives jaxtune's logits."""
  model, data = make_tiny_setup(str(tmp_path), "mixtral")
  full = losses(trainer.run(tiny_config(model, data, **{"peft.method": "full", "optimizer.learning_rate": 1e-3}),
                            str(tmp_path / "full")))
  lora = losses(trainer.run(tiny_config(model, data), str(tmp_path / "lora")))
  assert full[-1] < full[0] - 0.3 and lora[-1] < lora[0] - 0.1, (full, lora)
  assert abs(full[0] - lora[0]) < 1e-6  # LoRA starts as the base
  counts = json.load(open(tmp_path / "lora" / "params.json"))
  d, q, kv, r = 64, 64, 32, 4
  assert counts["trainable_params"] == 2 * r * ((d + q) + 2 * (d + kv) + (q + d))  # q, k, v, o; 2 layers
  _, cfg, params, runtime, _ = workdir.load_trained(str(tmp_path / "lora"))
  adapter = str(tmp_path / "adapter")
  config = workdir.read_config(str(tmp_path / "lora"))
  export.write_peft(adapter, cfg, params, "lora", config.peft.to_dict(), model)
  base = transformers.AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
  before = torch_logits(base)
  theirs = torch_logits(peft.PeftModel.from_pretrained(base, adapter).eval())
  ours = np.asarray(llama.forward(params, cfg, jnp.asarray(TOKENS), peft=runtime)[0])
  np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=0)
  assert np.abs(theirs - before).max() > 1e-3  # the adapter is applied


def test_router_aux_loss_matches_transformers(tmp_path):
  """train.router_aux_loss_coef: NLL + coef x the load-balancing loss equals transformers' Mixtral
  loss with output_router_logits=True, padding excluded from both terms."""
  folder = str(tmp_path / "model")
  hf_tiny.save_hf_model("mixtral", folder, sharp=True)
  mask = np.ones_like(TOKENS)
  mask[1, 17:] = 0  # right padding in the second row
  labels = np.where(mask == 1, TOKENS, -100)
  model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, output_router_logits=True,
                                                            router_aux_loss_coef=0.1).eval()
  with torch.no_grad():
    theirs = model(input_ids=torch.tensor(TOKENS), attention_mask=torch.tensor(mask), labels=torch.tensor(labels))
  cfg, params = loading.load_model(folder)
  targets = np.roll(TOKENS, -1, axis=1)
  weights = (mask == 1) & (np.roll(mask, -1, axis=1) == 1)
  weights[:, -1] = False
  batch = {"inputs": jnp.asarray(TOKENS), "positions": jnp.broadcast_to(jnp.arange(24), TOKENS.shape),
           "segment_ids": jnp.asarray(mask), "targets": jnp.asarray(targets), "weights": jnp.asarray(weights)}
  total, count, metrics = train_step.lm_loss_sums(params, train_step.StepSpec(model=cfg, router_aux_loss_coef=0.1), batch)
  assert abs(float(metrics["router_aux_loss"]) - float(theirs.aux_loss)) < 1e-6
  assert abs(float(total / count) - float(theirs.loss)) < 1e-5
  plain, _, _ = train_step.lm_loss_sums(params, train_step.StepSpec(model=cfg), batch)
  assert float(total - plain) > 0.01 * float(count)  # the auxiliary term counts
  rows = trainer.run(tiny_config(*make_tiny_setup(str(tmp_path), "mixtral"), **{
      "peft.method": "full", "optimizer.learning_rate": 1e-3, "train.router_aux_loss_coef": 0.02}),
      str(tmp_path / "run"))
  assert losses(rows)[-1] < losses(rows)[0] - 0.3
