"""Loading a HF folder streams it: the host never holds a second copy of the model."""

import os

import jax
import numpy as np
import pytest
import transformers

from configs.demo import smollm2_gguf
from jaxtune import export
from jaxtune.models import gguf_loading, llama, loading
from jaxtune.models.config import ModelConfig, UnsupportedModelError, config_from_hf

# ~80 MB of float32 weights: large next to what a leaf's transient host copy costs
CONFIG = ModelConfig(vocab_size=8192, hidden_size=512, intermediate_size=1376, num_layers=4, num_heads=8,
                     num_kv_heads=4, head_dim=64, rms_norm_eps=1e-5)


def mapped_file_mb() -> float:
  """This process's resident file-backed pages (memory-mapped files), MB."""
  with open("/proc/self/status") as f:
    return next(int(line.split()[1]) for line in f if line.startswith("RssFile")) / 1024


def test_safetensors_pages_are_not_kept_mapped(tmp_path):
  """A safetensors handle maps its whole file; one kept open for the whole load put every page
  read into this process's RSS, a second copy of the model next to the loaded one (5 GB more host
  RSS for a 1B model on a GPU). The loader's resident mapped pages now stay far under the file size."""
  params = llama.init_params(CONFIG, jax.random.PRNGKey(0))
  folder = str(tmp_path / "model")
  export.write_hf(folder, CONFIG, params, llama.PeftRuntime(), None, None)
  file_mb = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder)) / 2**20
  assert file_mb > 70
  before = mapped_file_mb()
  seen = []
  get, _ = loading.safetensors_getter(folder)
  loaded = loading.params_from_tensors(CONFIG, get, progress=lambda path: seen.append(mapped_file_mb()))
  assert len(seen) == len(jax.tree.leaves(params))
  assert max(seen) - before < file_mb / 4, (max(seen) - before, file_mb)
  for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)


def resident_mb_of(path: str) -> float:
  """How much of `path` this process's memory maps hold resident, MB (/proc/self/smaps)."""
  total, inside = 0, False
  with open("/proc/self/smaps") as f:
    for line in f:
      if "-" in line.split()[0]:  # a mapping's header line: address range ... path
        inside = line.rstrip().endswith(path)
      elif inside and line.startswith("Rss:"):
        total += int(line.split()[1])
  return total / 1024


def test_gguf_pages_are_released_as_tensors_are_read():
  """The GGUF reader maps the whole file for the whole load (the metadata and vocabulary live there
  too); each tensor's pages are dropped once it is dequantized, so the file's pages never pile up
  next to the loaded model. Without that, all 94 MB of the real SmolLM2 GGUF stay resident."""
  path = os.path.realpath(smollm2_gguf())
  file_mb = os.path.getsize(path) / 2**20
  hf_config, get = gguf_loading.gguf_tensors(path)
  seen = []
  cfg = loading.config_from_hf(hf_config)
  params = loading.params_from_tensors(cfg, get, progress=lambda leaf: seen.append(resident_mb_of(path)))
  assert len(seen) == len(jax.tree.leaves(params))
  assert max(seen) < file_mb / 4, (seen, file_mb)


def test_unimplemented_architecture_features_are_refused_by_name():
  gemma3 = transformers.Gemma3TextConfig(num_hidden_layers=2).to_dict()
  cases = {
      "use_bidirectional_attention=True": dict(gemma3, use_bidirectional_attention=True),
      "model_type 'gemma3' is not supported": dict(gemma3, model_type="gemma3"),  # the vision-language one
      "hidden_act 'relu' is not supported": dict(transformers.LlamaConfig().to_dict(), hidden_act="relu"),
      "qwen3 use_sliding_window=True": dict(transformers.Qwen3Config().to_dict(), use_sliding_window=True),
  }
  for message, hf in cases.items():
    with pytest.raises(UnsupportedModelError, match=message):
      config_from_hf(hf)
  assert config_from_hf(gemma3).sliding_layers == (True, True)
  # as transformers: Gemma 3 soft-caps its logits when asked, never its attention scores
  capped = config_from_hf(dict(gemma3, final_logit_softcapping=30.0, attn_logit_softcapping=50.0))
  assert (capped.final_logit_softcap, capped.attn_logit_softcap) == (30.0, None)


SMALL = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                    num_kv_heads=2, head_dim=8)


def small_model_folder(tmp_path) -> tuple[ModelConfig, str]:
  """(SMALL, a HF folder of random SMALL weights)."""
  folder = str(tmp_path / "model")
  export.write_hf(folder, SMALL, llama.init_params(SMALL, jax.random.PRNGKey(0)), llama.PeftRuntime(), None, None)
  return SMALL, folder


@pytest.mark.parametrize("sharded", [False, True])
def test_a_tensor_that_does_not_fit_is_named(tmp_path, sharded):
  """A checkpoint whose tensors are larger than its config says is refused naming the tensor, also
  when the load reads slices (a slice of a too-large tensor would fit)."""
  import json
  from jaxtune import sharding
  cfg, folder = small_model_folder(tmp_path)
  with open(os.path.join(folder, "config.json")) as f:
    hf = json.load(f)
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(dict(hf, intermediate_size=40), f)
  shardings = None
  if sharded:
    shapes = loading.flatten(llama.param_shapes(loading.model_config_of(folder)), is_leaf=lambda x: isinstance(x, tuple))
    shardings = sharding.param_shardings(shapes, sharding.make_mesh(1, 1, 1))
  with pytest.raises(ValueError, match=r"tensor model.layers.0.mlp.down_proj.weight: shape \(32, 48\) != expected \(32, 40\)"):
    loading.load_model(folder, shardings=shardings)


def test_a_large_model_load_shows_progress(tmp_path, monkeypatch, capsys):
  """Loading shows a bar of the bytes read (models of PROGRESS_MIN_BYTES and up; lowered here)."""
  cfg, folder = small_model_folder(tmp_path)
  loading.load_model(folder)
  assert "loading weights" not in capsys.readouterr().err
  monkeypatch.setattr(loading, "PROGRESS_MIN_BYTES", 0)
  loading.load_model(folder)
  total = sum(int(np.prod(s)) * 4 for s in jax.tree.leaves(llama.param_shapes(cfg), is_leaf=lambda x: isinstance(x, tuple)))
  err = capsys.readouterr().err
  assert "loading weights" in err and "100%" in err and f"{total / 1000:.1f}k" in err, (err, total)
