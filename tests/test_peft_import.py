"""Adapters made by peft (PyTorch) evaluate in jaxtune (evaluate --adapter PEFT_FOLDER) with peft's loss
and differentiate to peft's gradients."""

import json
import os
import shutil

import numpy as np
import peft
import pytest
import torch

from jaxtune import evaluation, export, peft_io
from jaxtune.models import loading
from test_export import TEXTS, TOL, data_file, folder, hf_model, logit_change, torch_loss  # noqa: F401 (fixtures)


def peft_lora(folder, out, seed=0, **config):
  """A peft LoRA adapter with random non-zero B (peft initialises B to zero) and, for DoRA, magnitudes
  off their initial norms, saved to `out`."""
  model = peft.get_peft_model(hf_model(folder), peft.LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8,
                                                                **config))
  torch.manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "lora_B" in name:
        p.normal_(0.0, 0.3)
      if "lora_magnitude_vector" in name:
        p.mul_(torch.empty_like(p).uniform_(0.5, 1.5))
  model.save_pretrained(out)
  return model.eval()


def assert_jaxtune_matches_peft(model, folder, data_file, adapter, label):
  """evaluate --adapter ADAPTER in jaxtune gives the peft model's loss; the adapter changes the model."""
  tokenizer = loading.load_tokenizer(folder)
  theirs = torch_loss(model, tokenizer)
  change = logit_change(model, hf_model(folder), tokenizer)
  ours = evaluation.evaluate_path(folder, data_file, "text", adapter=adapter)["loss"]
  print(f"peft {label} import: jaxtune {ours:.6f} peft {theirs:.6f} (max logit change {change:.3f})")
  assert change > 0.01
  assert abs(ours - theirs) < TOL


@pytest.mark.parametrize("config", [
    dict(target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    dict(target_modules=["k_proj", "o_proj", "up_proj"], use_rslora=True, lora_dropout=0.1),
    dict(target_modules="all-linear"),
    dict(target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"], use_dora=True),
])
def test_peft_lora_adapter_evaluates_with_peft_loss(folder, data_file, tmp_path, config):
  out = str(tmp_path / "adapter")
  model = peft_lora(folder, out, **config)
  assert_jaxtune_matches_peft(model, folder, data_file, out, f"lora {config}")


def test_peft_prefix_adapter_evaluates_with_peft_loss(folder, data_file, tmp_path):
  model = peft.get_peft_model(hf_model(folder), peft.PrefixTuningConfig(task_type="CAUSAL_LM",
                                                                        num_virtual_tokens=4))
  with torch.no_grad():  # peft's N(0, 1) init: scale it to keys/values of a plausible size
    model.prompt_encoder["default"].embedding.weight.mul_(0.5)
  out = str(tmp_path / "prefix")
  model.save_pretrained(out)
  model.eval()
  assert_jaxtune_matches_peft(model, folder, data_file, out, "prefix")


def peft_ia3(folder, out, seed=0, **config):
  """A peft IA3 adapter (by default its default targets: k_proj, v_proj and down_proj, the last scaled
  on its input) with vectors moved off their initial ones, saved to `out`."""
  model = peft.get_peft_model(hf_model(folder), peft.IA3Config(task_type="CAUSAL_LM", **config))
  torch.manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "ia3_l" in name:
        p.uniform_(0.5, 1.5)
  model.save_pretrained(out)
  return model.eval()


def test_peft_ia3_adapter_evaluates_with_peft_loss(folder, data_file, tmp_path):
  out = str(tmp_path / "ia3")
  assert_jaxtune_matches_peft(peft_ia3(folder, out), folder, data_file, out, "ia3")


def edited_copy(src, dst, **changes):
  shutil.copytree(src, dst)
  path = os.path.join(dst, "adapter_config.json")
  config = {**json.load(open(path)), **changes}
  json.dump(config, open(path, "w"))
  return dst


def test_unsupported_peft_adapters_fail_with_one_clear_line(folder, tmp_path):
  cfg, params = loading.load_model(folder)
  lora_dir = str(tmp_path / "lora")
  peft_lora(folder, lora_dir, target_modules=["q_proj"])
  cases = {
      edited_copy(lora_dir, str(tmp_path / "dora"), use_dora=True): "use_dora=true but .*q_proj/lora_a has no",
      edited_copy(lora_dir, str(tmp_path / "bias"), lora_bias=True): "lora_bias=True is not supported",
      edited_copy(lora_dir, str(tmp_path / "loha"), peft_type="LOHA"): "peft_type='LOHA' is not supported",
      edited_copy(lora_dir, str(tmp_path / "ia3"), peft_type="IA3"): "'.*q_proj.lora_A.weight' is not an IA3 vector",
      edited_copy(lora_dir, str(tmp_path / "save"), modules_to_save=["lm_head"]): "modules_to_save",
  }
  partial = peft_lora(folder, str(tmp_path / "partial"), target_modules=["q_proj"], layers_to_transform=[1])
  del partial
  cases[str(tmp_path / "partial")] = "layers_to_transform=\\[1\\] is not supported"
  head = str(tmp_path / "head")
  peft_lora(folder, head, target_modules=["lm_head"])
  cases[head] = "lm_head.*' is not a LoRA matrix of a decoder-layer projection"
  for adapter, message in cases.items():
    with pytest.raises(peft_io.PeftImportError, match=message) as err:
      peft_io.load_peft_adapter(params, cfg, adapter)
    assert "\n" not in str(err.value)
  # A LoRA for another base model names the mismatching leaf.
  small = {**params, "layers": {**params["layers"], "self_attn": {
      **params["layers"]["self_attn"], "q_proj": {"kernel": np.zeros((cfg.num_layers, 8, cfg.q_size))}}}}
  with pytest.raises(peft_io.PeftImportError, match="q_proj/lora_a has size 64 .* another base model"):
    peft_io.load_peft_adapter(small, cfg, lora_dir)


# the end of a saved adapter key -> of the live model's parameter name (under the adapter's name)
LIVE_NAMES = {"lora_A.weight": "lora_A.default.weight", "lora_B.weight": "lora_B.default.weight",
              "lora_magnitude_vector": "lora_magnitude_vector.default.weight", "ia3_l": "ia3_l.default"}


@pytest.mark.parametrize("kind", ["lora", "dora", "ia3"])
def test_adapter_gradients_match_peft_autograd(folder, tmp_path, kind):
  """One loss, differentiated by torch through peft and by jax through jaxtune: the same gradient for
  every A, B (DoRA magnitude, IA3 vector) of every layer. DoRA's column norm is a constant to backprop
  in both (the paper's section 4.3); differentiating through it gives other gradients."""
  out = str(tmp_path / "adapter")
  if kind == "ia3":
    model = peft_ia3(folder, out)
  else:
    model = peft_lora(folder, out, target_modules=["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"],
                      use_dora=kind == "dora")
  ours = assert_gradients_match_peft(model, folder, out, kind)
  assert sum(p.endswith("/lora_magnitude") for p in ours) == (5 if kind == "dora" else 0)


def assert_gradients_match_peft(model, folder, out, kind):
  """jax's gradient of jaxtune's loss with the peft adapter saved at `out` equals torch's through the
  peft `model`, for every adapter tensor of every layer; returns jaxtune's gradients."""
  import jax
  import jax.numpy as jnp
  from jaxtune.models import llama
  from jaxtune.peft import partition
  ids = loading.load_tokenizer(folder)(TEXTS[0])["input_ids"]
  model(input_ids=torch.tensor([ids]), labels=torch.tensor([ids])).loss.backward()
  theirs = {name: p.grad.numpy() for name, p in model.named_parameters() if p.requires_grad}

  cfg, base = loading.load_model(folder)
  params, runtime = peft_io.load_peft_adapter(base, cfg, out)
  trainable, frozen = partition.split(params, kind)

  def loss(trainable):
    logits = llama.forward(partition.merge(trainable, frozen), cfg, jnp.asarray([ids[:-1]]), peft=runtime)[0]
    return jnp.mean(llama.token_nll(logits, jnp.asarray([ids[1:]])))

  ours = jax.grad(loss)(trainable)
  assert len(theirs) == len(ours) * cfg.num_layers
  for path, grad in ours.items():
    for layer in range(cfg.num_layers):
      saved = export.peft_leaf_name(path, layer)
      suffix = next(s for s in LIVE_NAMES if saved.endswith("." + s))
      key = saved[: -len(suffix)] + LIVE_NAMES[suffix]
      want = theirs[key]
      np.testing.assert_allclose(np.asarray(grad[layer]).T.reshape(want.shape), want, rtol=1e-4,
                                 atol=1e-5 * np.abs(want).max(), err_msg=key)
  return ours
