"""Phi-3 / Phi-4: fused projections, longrope and partial rotary embeddings against transformers and
peft. (Logits, loss and both exports of both tiny Phi-3 families also run in test_parity and
test_export; KV-cache generation across the longrope switch in test_generate; a sharded run in
test_sharding.)"""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from test_export import data_file  # noqa: F401 (fixture)
from test_parity import save_sharp_model
from test_peft_import import assert_gradients_match_peft, assert_jaxtune_matches_peft, peft_ia3, peft_lora
from jaxtune.models import llama, loading
from jaxtune.peft import lora


def test_longrope_switches_to_its_long_set_past_the_original_context(tmp_path):
  """transformers picks longrope's divisors per call: the short set while the furthest position is
  within the original context (32 here), the long set for the whole call past it."""
  model = save_sharp_model("phi3_longrope", str(tmp_path))
  cfg, params = loading.load_model(str(tmp_path))
  assert (cfg.rope_type, cfg.rotary_dim, cfg.head_dim, cfg.rope_original_max_positions) == ("longrope", 12, 16, 32)
  assert cfg.rope_attention_factor == np.sqrt(1 + np.log(256 / 32) / np.log(32))
  long_only = dataclasses.replace(cfg, rope_short_factor=cfg.rope_long_factor)
  ids = np.random.RandomState(1).randint(0, cfg.vocab_size, (2, 33))
  for T, expect_long in ((32, False), (33, True)):
    with torch.no_grad():
      expected = model(torch.tensor(ids[:, :T])).logits.numpy()
    logits, _ = llama.forward(params, cfg, jnp.asarray(ids[:, :T]))
    np.testing.assert_allclose(np.asarray(logits), expected, rtol=0, atol=1e-5)
    with_long, _ = llama.forward(params, long_only, jnp.asarray(ids[:, :T]))
    gap = np.abs(np.asarray(with_long) - expected).max()
    assert (gap < 1e-5) if expect_long else (gap > 1e-2), (T, gap)


def test_lora_on_the_fused_projections_matches_peft(tmp_path, data_file):  # noqa: F811
  """A peft LoRA on qkv_proj and gate_up_proj (q/k/v and gate/up in one matrix each): jaxtune imports
  it with peft's loss and gradients; jaxtune's default targets select those same layers."""
  folder = str(tmp_path / "phi3")
  save_sharp_model("phi3_longrope", folder)
  out = str(tmp_path / "adapter")
  model = peft_lora(folder, out, target_modules=["qkv_proj", "o_proj", "gate_up_proj", "down_proj"])
  assert_jaxtune_matches_peft(model, folder, data_file, out, "lora on phi3's fused projections")
  grads = assert_gradients_match_peft(model, folder, out, "lora")
  assert sorted(grads) == sorted(f"layers/{m}/{leaf}" for m in ("self_attn/qkv_proj", "self_attn/o_proj",
                                                                "mlp/gate_up_proj", "mlp/down_proj")
                                 for leaf in ("lora_a", "lora_b"))
  _, params = loading.load_model(folder)
  assert sorted(lora.target_paths(params, lora.DEFAULT_TARGETS)) == [
      "layers/mlp/down_proj", "layers/mlp/gate_up_proj", "layers/self_attn/o_proj", "layers/self_attn/qkv_proj"]


@pytest.mark.parametrize("kind", ["dora", "ia3"])
def test_dora_and_ia3_on_the_fused_projections_match_peft(tmp_path, data_file, kind):  # noqa: F811
  """DoRA's magnitude and column norms over the fused matrix; IA3 scaling qkv_proj's whole output and
  down_proj's input."""
  folder = str(tmp_path / "phi3")
  save_sharp_model("phi3", folder)
  out = str(tmp_path / "adapter")
  if kind == "dora":
    model = peft_lora(folder, out, target_modules=["qkv_proj", "gate_up_proj"], use_dora=True)
  else:
    model = peft_ia3(folder, out, target_modules=["qkv_proj", "down_proj"], feedforward_modules=["down_proj"])
  assert_jaxtune_matches_peft(model, folder, data_file, out, f"{kind} on phi3's fused projections")


def test_longrope_factor_lists_must_cover_the_rotary_dims():
  import hf_tiny
  from jaxtune.models.config import UnsupportedModelError, config_from_hf
  hf = hf_tiny.build_hf_model("phi3_longrope").config.to_dict()
  hf["rope_parameters"]["short_factor"] = hf["rope_parameters"]["short_factor"][:5]
  with pytest.raises(UnsupportedModelError, match="need 6 values each .* not 5 and 6"):
    config_from_hf(hf)
