"""Adapters made by peft (PyTorch) evaluate in jaxtune (evaluate --adapter PEFT_FOLDER) with peft's loss."""

import json
import os
import shutil

import numpy as np
import peft
import pytest
import torch

from jaxtune import evaluation, peft_io
from jaxtune.models import loading
from test_export import TOL, data_file, folder, hf_model, logit_change, torch_loss  # noqa: F401 (fixtures)


def peft_lora(folder, out, seed=0, **config):
  """A peft LoRA adapter with random non-zero B (peft initialises B to zero), saved to `out`."""
  model = peft.get_peft_model(hf_model(folder), peft.LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8,
                                                                **config))
  torch.manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "lora_B" in name:
        p.normal_(0.0, 0.3)
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
      edited_copy(lora_dir, str(tmp_path / "dora"), use_dora=True): "use_dora=True is not supported",
      edited_copy(lora_dir, str(tmp_path / "ia3"), peft_type="IA3"): "peft_type='IA3' is not supported",
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
