"""LoRA on the experts of Mixtral and Qwen3-MoE (peft.lora.expert_targets) against peft's
target_parameters on transformers' models: import, export, merge, gradients, training."""

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
from jaxtune import export, peft_io, trainer
from jaxtune.models import llama, loading
from jaxtune.peft import expert_lora, partition
from train_helpers import losses, make_tiny_setup, tiny_config

TOKENS = np.random.RandomState(0).randint(0, 256, (2, 24))
BOTH = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def logits(model):
  with torch.no_grad():
    return model(torch.tensor(TOKENS)).logits.numpy()


def peft_model(folder, target_parameters, seed=0):
  """peft LoRA (r=4, alpha 8) on q_proj and the given expert matrices, B drawn at random."""
  base = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
  model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"],
                                                    target_parameters=target_parameters))
  torch.manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "lora_B" in name:
        p.normal_(0.0, 0.3)
  return model.eval()


@pytest.mark.parametrize("family,targets", [("mixtral", BOTH), ("qwen3_moe", BOTH),
                                            ("qwen3_moe", ["mlp.experts.down_proj"])])
def test_peft_expert_lora_imports_with_peft_logits_and_gradients(tmp_path, family, targets):
  """A peft adapter on the experts: jaxtune reads it (both dispatches give peft's logits), differentiates
  to peft's gradients for every expert's A and B, and writes it back tensor for tensor."""
  folder, adapter = str(tmp_path / "model"), str(tmp_path / "adapter")
  hf_tiny.save_hf_model(family, folder, sharp=True)
  model = peft_model(folder, targets)
  model.save_pretrained(adapter)
  theirs = logits(model)
  cfg, base = loading.load_model(folder)
  params, runtime = peft_io.load_peft_adapter(base, cfg, adapter)
  names = expert_lora.names_in(loading.flatten(params))
  assert names == [t.rsplit(".", 1)[-1] for t in BOTH if t in targets]
  for dispatch in ("dense", "ragged"):
    ours = np.asarray(llama.forward(params, dataclasses.replace(cfg, moe_dispatch=dispatch), jnp.asarray(TOKENS),
                                    peft=runtime)[0])
    np.testing.assert_allclose(ours, theirs, atol=1e-5 * max(1, np.abs(theirs).max()), rtol=0)
  assert np.abs(theirs - np.asarray(llama.forward(base, cfg, jnp.asarray(TOKENS))[0])).max() > 0.05

  ids = torch.tensor(TOKENS[:1])
  model(input_ids=ids, labels=ids).loss.backward()
  grads = {n: p.grad.numpy() for n, p in model.named_parameters() if p.requires_grad and "experts" in n}
  trainable, frozen = partition.split(params, "lora")

  def loss(trainable):
    out = llama.forward(partition.merge(trainable, frozen), cfg, jnp.asarray(TOKENS[:1, :-1]), peft=runtime)[0]
    return jnp.mean(llama.token_nll(out, jnp.asarray(TOKENS[:1, 1:])))

  ours = jax.grad(loss)(trainable)
  assert len(grads) == 2 * len(names) * cfg.num_layers
  for name in names:
    for kind, key in (("lora_a", "lora_A"), ("lora_b", "lora_B")):
      per_layer = expert_lora.to_peft(kind, np.asarray(ours[f"layers/mlp/expert_lora/{name}/{kind}"]))
      for layer in range(cfg.num_layers):
        live = expert_lora.peft_module(names, name, layer)[len("base_model.model."):] + f"{key}.default.weight"
        want = grads["base_model.model." + live]
        np.testing.assert_allclose(per_layer[layer], want, rtol=1e-4, atol=1e-5 * np.abs(want).max(), err_msg=live)

  out = str(tmp_path / "again")
  export.write_peft(out, cfg, params, "lora", {"lora": {"alpha": 8.0, "dropout": 0.0, "use_rslora": False}}, folder)
  from safetensors import safe_open
  with safe_open(f"{adapter}/adapter_model.safetensors", "np") as a, safe_open(f"{out}/adapter_model.safetensors",
                                                                               "np") as b:
    assert sorted(a.keys()) == sorted(b.keys())
    for key in a.keys():
      np.testing.assert_array_equal(a.get_tensor(key), b.get_tensor(key))


def test_mixtral_lora_with_experts_trains_exports_and_merges(tmp_path):
  """train.py with peft.lora.expert_targets: every expert's LoRA trains (the base experts stay frozen);
  the PEFT export gives jaxtune's logits in peft on transformers' Mixtral, the merged folder in
  transformers."""
  model, data = make_tiny_setup(str(tmp_path), "mixtral")
  config = tiny_config(model, data, **{"peft.lora.expert_targets": "gate_up_proj|down_proj"})
  run = losses(trainer.run(config, str(tmp_path / "run")))
  assert run[-1] < run[0] - 0.1, run
  counts = json.load(open(tmp_path / "run" / "params.json"))
  d, q, kv, r, E, F, L = 64, 64, 32, 4, 4, 128, 2
  attention = 2 * r * ((d + q) + 2 * (d + kv) + (q + d))
  experts = L * E * r * ((d + 2 * F) + (F + d))
  assert counts["trainable_params"] == attention + experts

  from jaxtune import workdir
  _, cfg, params, runtime, _ = workdir.load_trained(str(tmp_path / "run"))
  flat = loading.flatten(params)
  assert np.abs(np.asarray(flat["layers/mlp/expert_lora/down_proj/lora_b"])).max() > 0  # trained
  _, base = loading.load_model(model)
  np.testing.assert_array_equal(np.asarray(flat["layers/mlp/experts/up_proj"]),
                                np.asarray(loading.flatten(base)["layers/mlp/experts/up_proj"]))
  ours = np.asarray(llama.forward(params, cfg, jnp.asarray(TOKENS), peft=runtime)[0])
  without = loading.unflatten({p: v for p, v in flat.items() if "expert_lora" not in p})
  # the experts' LoRA moves these logits by 0.1: an export that dropped it would show
  assert np.abs(ours - np.asarray(llama.forward(without, cfg, jnp.asarray(TOKENS), peft=runtime)[0])).max() > 1e-3
  adapter, merged = str(tmp_path / "adapter"), str(tmp_path / "merged")
  export.write_peft(adapter, cfg, params, "lora", workdir.read_config(str(tmp_path / "run")).peft.to_dict(), model)
  assert json.load(open(f"{adapter}/adapter_config.json"))["target_parameters"] == BOTH
  hf = transformers.AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
  before = logits(hf)
  np.testing.assert_allclose(ours, logits(peft.PeftModel.from_pretrained(hf, adapter).eval()), atol=1e-5, rtol=0)
  export.write_hf(merged, cfg, params, runtime, None, model)
  after = logits(transformers.AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval())
  np.testing.assert_allclose(ours, after, atol=1e-5, rtol=0)
  assert np.abs(after - before).max() > 1e-3
