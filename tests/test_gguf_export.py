"""GGUF export (jaxtune/gguf_export.py, scripts/export.py --format gguf): the file gives the source
model's logits when jaxtune reads it and when transformers reads it, its tokenizer encodes as the
source's, the quantized types stay close, a trained LoRA run exports through the script with the loss
evaluate --adapter gives, and what llama.cpp could not run is refused by name.

transformers' GGUF reader ignores some metadata llama.cpp uses (key_length: Qwen3's wide heads; rope
scaling; rope_freqs; Llama biases), does not load these tiny MoE files, and has no OLMo 2 or Granite,
so those are checked through jaxtune's reader, which test_gguf.py checks against transformers on
llama.cpp's own files (and on SmolLM2's real one).
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from jaxtune import gguf_export
from jaxtune.models import gguf_loading, llama, loading
from jaxtune.models.config import UnsupportedModelError
from train_helpers import without_torch

TEXTS = ["The quick brown fox jumps over the lazy dog, 12345 times!\n",
         "def add(x, y):\n    return x + y  # it's 2 lines",
         "Rivers have long memories, she said; people have short ones.",
         "<|im_start|>user\nWhat is 7 * 6?<|im_end|>\n<|im_start|>assistant\n42<|im_end|>\n"]
VOCAB = 320
TRANSFORMERS_READS = ("llama_untied", "llama_tied", "qwen2", "mistral")  # families transformers' GGUF reader takes whole


def bpe_model_folder(folder: str, family: str, llama3_split: bool = False, **overrides):
  """A random tiny `family` model (layers sharpened so attention and positions matter) with a trained
  byte-level BPE tokenizer, saved to `folder`; returns the transformers model."""
  from hf_tiny import build_hf_model, save_bpe_tokenizer, sharpen
  model = sharpen(build_hf_model(family, vocab_size=VOCAB, **overrides))
  model.save_pretrained(folder)
  save_bpe_tokenizer(folder, TEXTS * 8, VOCAB, llama3_split=llama3_split)
  return model


def hf_logits(model, ids):
  import torch
  with torch.no_grad():
    return model(torch.tensor(ids)).logits.numpy()


IDS = np.random.default_rng(0).integers(3, VOCAB, (2, 16))


@pytest.mark.parametrize("family", ["llama_untied", "llama_tied", "llama_bias", "llama_linear_rope", "qwen2",
                                    "qwen3", "mistral", "olmo2", "granite", "qwen2_moe", "qwen3_moe"])
def test_gguf_gives_the_source_logits(tmp_path, family):
  model = bpe_model_folder(str(tmp_path), family)
  out = str(tmp_path / "model.gguf")
  gguf_export.write_gguf(str(tmp_path), out, "f32")
  ref = hf_logits(model, IDS)
  cfg, params = loading.load_model(out)
  np.testing.assert_allclose(np.asarray(llama.forward(params, cfg, IDS)[0]), ref, atol=2e-5, rtol=1e-5)
  if family in TRANSFORMERS_READS:
    import torch
    import transformers
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="model.gguf",
                                                               dtype=torch.float32).eval()
    np.testing.assert_allclose(hf_logits(theirs, IDS), ref, atol=1e-5, rtol=1e-5)


def test_jaxtunes_own_hf_export_of_an_moe_converts(tmp_path):
  """jaxtune's merged HF folder stores each expert's matrices apart (experts.E.gate_proj.weight);
  the converter stacks them as it splits transformers' own stacked gate_up_proj."""
  from jaxtune import export
  model = bpe_model_folder(str(tmp_path / "source"), "qwen3_moe")
  cfg, params = loading.load_model(str(tmp_path / "source"))
  export.write_gguf(str(tmp_path / "out"), cfg, params, llama.PeftRuntime(), loading.load_tokenizer(str(tmp_path / "source")),
                    str(tmp_path / "source"), "f32")
  cfg, params = loading.load_model(str(tmp_path / "out" / "model.gguf"))
  np.testing.assert_allclose(np.asarray(llama.forward(params, cfg, IDS)[0]), hf_logits(model, IDS), atol=2e-5, rtol=1e-5)


def test_llama3_rope_is_written_as_llama_cpp_frequency_factors(tmp_path):
  rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192, "rope_theta": 500000.0}
  model = bpe_model_folder(str(tmp_path), "llama3_rope", rope_parameters=rope, max_position_embeddings=131072)
  out = str(tmp_path / "model.gguf")
  gguf_export.write_gguf(str(tmp_path), out, "f32")
  positions = np.broadcast_to(np.arange(16) * 997, (2, 16))  # long distances, where the scaling bites
  import torch
  with torch.no_grad():
    ref = model(torch.tensor(IDS), position_ids=torch.tensor(positions)).logits.numpy()
  cfg, params = loading.load_model(out)
  assert cfg.rope_type == "llama3"
  np.testing.assert_allclose(np.asarray(llama.forward(params, cfg, IDS, positions)[0]), ref, atol=2e-5, rtol=1e-5)


def test_quantized_types_stay_close_and_small(tmp_path):
  bpe_model_folder(str(tmp_path), "llama_untied")
  logits, sizes = {}, {}
  for gguf_type in gguf_export.GGUF_TYPES:
    out = str(tmp_path / f"{gguf_type}.gguf")
    gguf_export.write_gguf(str(tmp_path), out, gguf_type)
    cfg, params = loading.load_model(out)
    logits[gguf_type], sizes[gguf_type] = np.asarray(llama.forward(params, cfg, IDS)[0]), os.path.getsize(out)
  scale = np.abs(logits["f32"]).max()
  # measured: 0.0017, 0.016, 0.038 of the largest logit (the layers' weights are sharpened x8)
  for gguf_type, bound in (("f16", 5e-3), ("bf16", 4e-2), ("q8_0", 8e-2)):
    error = np.abs(logits[gguf_type] - logits["f32"]).max() / scale
    assert 0 < error < bound, (gguf_type, error)
  assert sizes["q8_0"] < sizes["f16"] == sizes["bf16"] < sizes["f32"], sizes


@pytest.mark.parametrize("llama3_split,pre", [(False, "gpt-2"), (True, "llama-bpe")])
def test_tokenizer_round_trips(tmp_path, llama3_split, pre):
  bpe_model_folder(str(tmp_path), "llama_tied", llama3_split=llama3_split)
  out = str(tmp_path / "model.gguf")
  gguf_export.write_gguf(str(tmp_path), out, "f16")
  import gguf
  assert gguf.GGUFReader(out).fields["tokenizer.ggml.pre"].contents() == pre
  source, back = loading.load_tokenizer(str(tmp_path)), gguf_loading.gguf_tokenizer(out)
  for text in TEXTS:
    assert back(text)["input_ids"] == source(text)["input_ids"], text
  assert (back.eos_token_id, back.bos_token_id) == (source.eos_token_id, source.bos_token_id)
  messages = [{"role": "user", "content": "hi"}]
  assert back.apply_chat_template(messages, add_generation_prompt=True) == source.apply_chat_template(
      messages, add_generation_prompt=True)


def test_pre_tokenizer_names_split_as_transformers_rebuilds_them():
  """The splits named here are the ones transformers' GGUF reader rebuilds for those names."""
  from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS
  for split, name in gguf_export.SPLIT_NAMES.items():
    assert GGUF_PRE_TOKENIZER_SPLITS[name] == split, name


def test_what_llama_cpp_cannot_run_is_refused_by_name(tmp_path):
  from hf_tiny import save_hf_model
  save_hf_model("llama_tied", str(tmp_path / "bytes"))  # 256 single-byte tokens: no merges
  with pytest.raises(UnsupportedModelError, match="no BPE merges"):
    gguf_export.write_gguf(str(tmp_path / "bytes"), str(tmp_path / "bytes.gguf"))
  assert not os.path.exists(tmp_path / "bytes.gguf") and not os.path.exists(tmp_path / "bytes.gguf.tmp")
  tokenizer_json = json.load(open(tmp_path / "bytes" / "tokenizer.json"))
  with pytest.raises(UnsupportedModelError, match="model_type 'gemma'"):
    gguf_export.check_convertible("gemma", tokenizer_json)
  bpe_model_folder(str(tmp_path / "moe"), "qwen3_moe", norm_topk_prob=False)  # llama.cpp's qwen3moe renormalises
  with pytest.raises(UnsupportedModelError, match="norm_topk_prob"):
    gguf_export.write_gguf(str(tmp_path / "moe"), str(tmp_path / "moe.gguf"))
  digits = {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True},
                                                  {"type": "ByteLevel", "use_regex": True}]}
  assert gguf_export.pre_tokenizer_name({"pre_tokenizer": digits}) == "smollm"
  with pytest.raises(UnsupportedModelError, match="pre-tokenizer"):
    gguf_export.pre_tokenizer_name({"pre_tokenizer": {"type": "Metaspace"}})
  from jaxtune import export
  with pytest.raises(export.ExportError, match="score head"):
    export.check_exportable("lora", "gguf", reward_model=True)
  with pytest.raises(export.ExportError, match="prefix tuning cannot be merged"):
    export.check_exportable("prefix", "gguf")


def test_export_script_writes_a_trained_lora_run_as_gguf(tmp_path):
  """train.py LoRA run -> scripts/export.py --format gguf -> jaxtune (tokenizer from the file) and
  transformers give the loss evaluate --adapter WORKDIR gives."""
  import torch
  import transformers
  from jaxtune import evaluation, trainer
  from train_helpers import tiny_config
  model_dir, data = str(tmp_path / "model"), str(tmp_path / "texts.jsonl")
  bpe_model_folder(model_dir, "llama_tied")
  with open(data, "w") as f:
    f.writelines(json.dumps({"text": t}) + "\n" for t in TEXTS * 4)
  workdir = str(tmp_path / "run")
  trainer.run(tiny_config(model_dir, data, **{"data.format": "text", "train.steps": 6,
                                              "optimizer.learning_rate": 1e-2}), workdir)
  ours = evaluation.evaluate_path(model_dir, data, "text", adapter=workdir)["loss"]
  base = evaluation.evaluate_path(model_dir, data, "text")["loss"]
  out = str(tmp_path / "gguf")
  script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "export.py")
  result = subprocess.run([sys.executable, script, "--workdir", workdir, "--out", out, "--format", "gguf",
                           "--gguf_type", "f32"], capture_output=True, text=True, timeout=600, env=without_torch())
  assert result.returncode == 0, result.stderr
  assert sorted(os.listdir(out)) == ["model.gguf"]  # the staged HF folder is gone
  path = os.path.join(out, "model.gguf")
  assert abs(evaluation.evaluate_path(path, data, "text")["loss"] - ours) < 2e-4
  assert abs(ours - base) > 1e-3  # training moved the model
  exported = transformers.AutoModelForCausalLM.from_pretrained(out, gguf_file="model.gguf", dtype=torch.float32)
  tokenizer = loading.load_tokenizer(model_dir)
  total, count = 0.0, 0
  for text in TEXTS * 4:
    ids = torch.tensor([tokenizer(text)["input_ids"]])
    with torch.no_grad():
      total += float(exported(input_ids=ids, labels=ids).loss) * (ids.shape[1] - 1)
    count += ids.shape[1] - 1
  assert abs(total / count - ours) < 2e-4
