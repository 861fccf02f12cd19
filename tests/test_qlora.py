"""QLoRA: NF4 base weights are bitsandbytes' codes, and a jaxtune QLoRA model is transformers +
bitsandbytes (load_in_4bit, nf4) + peft, logit for logit; training, evaluation and sharding with them."""

import json

import bitsandbytes
import bitsandbytes.functional as bnb_functional
import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers

import hf_tiny
from jaxtune import evaluation, export, inference, sampling, trainer
from jaxtune.models import llama, loading, quantization
from jaxtune.peft import lora, partition
from train_helpers import losses, tiny_config

TOKENS = np.random.RandomState(0).randint(0, 256, (2, 24))


@pytest.mark.parametrize("shape,quant_type", [((64, 128), "nf4"), ((688, 256), "nf4"), ((256, 688), "nf4"),
                                              ((24, 40), "nf4"), ((7, 6), "nf4"), ((688, 256), "fp4"), ((24, 40), "fp4")])
def test_4bit_codes_and_scales_are_bitsandbytes(shape, quant_type):
  """Bit for bit: codes (packed two a byte), block scales and dequantized weights, including blocks
  that straddle rows (256 x 688), a short last block (24 x 40, 7 x 6) and an all-zero block (codes
  0.0, scale 0; bitsandbytes stores a short all-zero last block's scale as 1e-38, the same zeros).

  Dequantized weights are checked against bitsandbytes' `dequantize_4bit` where rows hold whole
  blocks: its AVX-512 CPU kernel (0.50.2) misplaces blocks that straddle rows (256 x 688, std 0.05:
  up to 0.13 from the weight, where its own PyTorch path and jaxtune are within 0.03); and everywhere
  against the format's definition, NF4[code] x the block's scale, in torch."""
  weight = torch.randn(*shape, generator=torch.Generator().manual_seed(shape[0])) * 0.05
  if weight.numel() > 64:
    weight.view(-1)[:64] = 0.0
  packed, state = bnb_functional.quantize_4bit(weight, blocksize=64, quant_type=quant_type)
  codes, absmax = quantization.quantize_4bit(weight.numpy(), quant_type)
  assert codes.shape == (shape[0], shape[1] // 2) and codes.dtype == np.uint8
  np.testing.assert_array_equal(codes.reshape(-1), packed.numpy().reshape(-1))
  np.testing.assert_array_equal(absmax, state.absmax.numpy())
  kernel = np.asarray(quantization.dequantize_4bit(jnp.asarray(codes), jnp.asarray(absmax), quant_type))
  if shape[1] % 64 == 0:
    np.testing.assert_array_equal(kernel.T, bnb_functional.dequantize_4bit(packed, state).numpy())
  n = weight.numel()
  nibbles = torch.stack([packed.view(-1) >> 4, packed.view(-1) & 15], -1).view(-1).long()
  values = torch.nn.functional.pad(state.code[nibbles], (0, 64 * len(state.absmax) - 2 * packed.numel()))
  by_definition = (values.view(-1, 64) * state.absmax[:, None]).view(-1)[:n].view(shape)
  np.testing.assert_array_equal(kernel.T, by_definition.numpy())
  levels = np.sort(quantization.CODEBOOKS[quant_type])
  assert np.abs(kernel.T - weight.numpy()).max() <= 0.5 * np.diff(levels).max() * state.absmax.max().item()
  np.testing.assert_array_equal(quantization.CODEBOOKS[quant_type],
                                bnb_functional.get_4bit_type(quant_type, device="cpu").numpy())


def bnb_model(folder, double_quant: bool = False, quant_type: str = "nf4"):
  """transformers' 4-bit model (NF4 or FP4, float32 compute) on CPU, dequantizing in float32 for every
  matmul; `double_quant`: bnb_4bit_use_double_quant.

  bitsandbytes' CPU inference path otherwise repacks the weights for a low-precision kernel (off by
  ~1e-2 on these logits); its dequantize-then-matmul path is the one GPUs and training take."""
  config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                                           bnb_4bit_compute_dtype=torch.float32,
                                           bnb_4bit_use_double_quant=double_quant)
  model = transformers.AutoModelForCausalLM.from_pretrained(folder, quantization_config=config,
                                                            device_map="cpu", dtype=torch.float32)
  layers = [m for m in model.modules() if isinstance(m, bitsandbytes.nn.Linear4bit)]
  per_layer = 4 if model.config.model_type == "phi3" else 7  # every projection (Phi-3's fused), not the LM head
  assert len(layers) == per_layer * model.config.num_hidden_layers
  for m in layers:
    m.support_avx512bf16_for_cpu = False
  return model.eval()


def torch_logits(model):
  with torch.no_grad():
    return model(torch.tensor(TOKENS)).logits.numpy()


@pytest.mark.parametrize("family,use_dora,quant_type", [(f, d, "nf4") for f in ("llama_untied", "qwen2", "gemma2")
                                                       for d in (False, True)]
                         + [("phi3_longrope", False, "nf4"),  # Phi-3's fused kernels as bitsandbytes layers
                            ("llama_untied", False, "fp4")])  # load_in_4bit's default type
def test_qlora_logits_match_peft_on_bitsandbytes(tmp_path, family, use_dora, quant_type):
  """A trained (random B, DoRA magnitudes moved) jaxtune QLoRA model, exported in PEFT format and
  loaded by peft onto transformers' NF4 model, gives jaxtune's logits; the quantization itself moves
  them ~100x more than the tolerance."""
  folder = str(tmp_path / "model")
  hf_tiny.save_hf_model(family, folder, sharp=True)
  cfg, base = loading.load_model(folder, quantize=quant_type)
  assert not any(p.endswith("/kernel") and p.startswith("layers/") for p in loading.flatten(base))
  params = lora.add_lora(base, jax.random.PRNGKey(1), rank=4, use_dora=use_dora)
  flat = loading.flatten(params)
  if use_dora:  # a fresh DoRA magnitude is the norm of the dequantized weight, as peft's on bitsandbytes
    fresh = peft.get_peft_model(bnb_model(folder), peft.LoraConfig(r=4, use_dora=True, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    theirs = fresh.base_model.model.model.layers[1].mlp.down_proj.lora_magnitude_vector["default"].weight
    np.testing.assert_allclose(flat["layers/mlp/down_proj/lora_magnitude"][1], theirs.detach().numpy(), rtol=1e-6)
  for i, path in enumerate(sorted(p for p in flat if p.endswith(("lora_b", "lora_magnitude")))):
    noise = jax.random.normal(jax.random.PRNGKey(i), flat[path].shape)
    flat[path] = flat[path] * (1 + 0.2 * noise) if path.endswith("magnitude") else 0.5 * noise
  params = loading.unflatten(flat)
  runtime = llama.PeftRuntime(lora_scale=lora.lora_scale(4, 16.0))
  ours = np.asarray(llama.forward(params, cfg, jnp.asarray(TOKENS), peft=runtime)[0])

  adapter = str(tmp_path / "adapter")
  export.write_peft(adapter, cfg, params, "lora", {"lora": {"alpha": 16.0, "dropout": 0.0, "use_rslora": False}},
                    folder)
  quantized = bnb_model(folder, quant_type=quant_type)
  base_logits = torch_logits(quantized)
  theirs = torch_logits(peft.PeftModel.from_pretrained(quantized, adapter).eval())
  full_precision = torch_logits(transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32))
  scale = np.abs(theirs).max()
  print(f"{family} dora={use_dora}: |jaxtune - peft+bnb| {np.abs(ours - theirs).max():.2e}, adapter moves "
        f"{np.abs(theirs - base_logits).max():.3f}, {quant_type} moves {np.abs(base_logits - full_precision).max():.3f}, "
        f"max |logit| {scale:.2f}")
  np.testing.assert_allclose(ours, theirs, atol=1e-5 * max(scale, 1), rtol=0)
  assert np.abs(theirs - base_logits).max() > 0.05
  assert np.abs(base_logits - full_precision).max() > 100 * 1e-5 * max(scale, 1)


def test_nf4_base_takes_an_eighth_of_float32(tmp_path):
  """4.5 bits a weight: the layers' kernels as codes + scales, the rest as it was; and params.json's
  counts are the model's weights, not its bytes."""
  folder = str(tmp_path / "model")
  hf_tiny.save_hf_model("llama_untied", folder)
  _, full = loading.load_model(folder)
  _, nf4 = loading.load_model(folder, quantize="nf4")
  full, nf4 = loading.flatten(full), loading.flatten(nf4)
  layer_bytes = sum(v.nbytes for p, v in full.items() if quantization.is_quantizable(p))
  quantized_bytes = sum(v.nbytes for p, v in nf4.items() if p.endswith(("kernel_nf4", "kernel_absmax")))
  assert quantized_bytes * 64 == layer_bytes * 9  # (0.5 + 4/64) / 4 bytes a weight
  assert partition.count(nf4) == partition.count(full)
  rest = {p for p in full if not quantization.is_quantizable(p)}
  assert rest == {p for p in nf4 if not p.endswith(("kernel_nf4", "kernel_absmax"))}


@pytest.mark.parametrize("quantize", ["nf4", "fp4_double_quant"])
def test_qlora_trains_and_evaluates_as_it_trained(tiny_setup, tmp_path, quantize):
  """train.py's loop on an NF4 base: LoRA learns, the base stays frozen; evaluate.py on the workdir
  quantizes the base as the run did (quantize=auto) and gives the run's last eval loss."""
  model, data = tiny_setup
  config = tiny_config(model, data, **{"model.quantize": quantize, "data.eval": data, "train.eval_every": 6,
                                       "train.checkpoint_every": 6})
  rows = trainer.run(config, str(tmp_path / "qlora"))
  series = losses(rows)
  plain = losses(trainer.run(tiny_config(model, data), str(tmp_path / "lora")))
  assert series[-1] < series[0] - 0.1, series
  assert abs(series[0] - plain[0]) > 1e-4  # the quantized base is another model
  counts = json.load(open(tmp_path / "qlora" / "params.json"))
  assert counts == json.load(open(tmp_path / "lora" / "params.json"))
  evaluated = {q: evaluation.evaluate_path(model, data, "instruction", adapter=str(tmp_path / "qlora"),
                                           instruction_template="chat", quantize=q, max_len=64)["loss"]
               for q in ("auto", "none")}
  eval_loss = rows[-1]["eval_loss"]
  # the tiny model's std-0.02 weights make NF4's own effect small (6.6e-5), the match far smaller (3e-8)
  assert abs(evaluated["auto"] - eval_loss) < 1e-6, (evaluated, eval_loss)
  assert abs(evaluated["none"] - eval_loss) > 2e-5, (evaluated, eval_loss)


def test_every_frozen_base_method_runs_on_nf4(tiny_setup, tmp_path):
  """IA3 and bottleneck adapters start as the NF4 base, as LoRA does (same first loss); prefix and
  prompt tuning train on it too."""
  model, data = tiny_setup
  first = {}
  for method, lr in (("lora", 3e-3), ("ia3", 0.1), ("adapter", 3e-3), ("prefix", 3e-2), ("prompt", 3e-2)):
    config = tiny_config(model, data, **{"model.quantize": "nf4", "peft.method": method,
                                         "optimizer.learning_rate": lr, "train.steps": 4})
    series = losses(trainer.run(config, str(tmp_path / method)))
    assert series[-1] < series[0], (method, series)
    first[method] = series[0]
  assert abs(first["ia3"] - first["lora"]) < 1e-6 and abs(first["adapter"] - first["lora"]) < 1e-6, first


def test_quantizing_params_in_memory_equals_quantizing_while_loading(tmp_path):
  folder = str(tmp_path / "model")
  hf_tiny.save_hf_model("qwen2", folder)
  loaded = loading.flatten(loading.load_model(folder, quantize="nf4")[1])
  in_memory = loading.flatten(loading.quantize_params(loading.load_model(folder)[1]))
  assert sorted(loaded) == sorted(in_memory)
  for path, leaf in loaded.items():
    np.testing.assert_array_equal(in_memory[path], leaf, err_msg=path)


def lora_on_a_quantized_base(tmp_path, quantize: str):
  """A sharpened tiny Llama quantized by jaxtune with LoRA (random B, r=4, alpha 16) exported for
  peft: (model folder, adapter folder, config, flat params)."""
  folder, adapter = str(tmp_path / "model"), str(tmp_path / "adapter")
  hf_tiny.save_hf_model("llama_untied", folder, sharp=True)
  cfg, base = loading.load_model(folder, quantize=quantize)
  flat = loading.flatten(lora.add_lora(base, jax.random.PRNGKey(1), rank=4))
  for i, path in enumerate(sorted(p for p in flat if p.endswith("lora_b"))):
    flat[path] = 0.5 * jax.random.normal(jax.random.PRNGKey(i), flat[path].shape)
  export.write_peft(adapter, cfg, loading.unflatten(flat), "lora",
                    {"lora": {"alpha": 16.0, "dropout": 0.0, "use_rslora": False}}, folder)
  return folder, adapter, cfg, flat


def test_greedy_generation_with_a_peft_adapter_on_nf4_matches_transformers(tmp_path):
  """generate.py's path with --quantize nf4 and a PEFT adapter folder: the KV-cache decode on the NF4
  base + LoRA gives peft-on-bitsandbytes' greedy tokens (with a float32 base they differ)."""
  from test_generate import hf_greedy
  folder, adapter, _, _ = lora_on_a_quantized_base(tmp_path, "nf4")
  cfg, params, runtime, tokenizer = inference.load_for_inference(folder, adapter, quantize="nf4")
  assert "kernel_nf4" in params["layers"]["mlp"]["down_proj"]
  model = peft.PeftModel.from_pretrained(bnb_model(folder), adapter).eval()
  model.generation_config.eos_token_id = None
  prompts = ["Once upon a time", "Hi"]
  ids = [tokenizer(p)["input_ids"] for p in prompts]
  ours = sampling.generate(params, cfg, ids, max_new_tokens=12, peft=runtime)
  assert ours == hf_greedy(model, tokenizer, prompts, n=12)


def test_a_bfloat16_base_quantizes_as_transformers_loads_it(tmp_path):
  """precision.param_dtype=bfloat16: the checkpoint is read in bfloat16, then quantized, as
  `from_pretrained(dtype=torch.bfloat16, quantization_config=...)` does; same codes and scales."""
  folder = str(tmp_path / "model")
  hf_tiny.save_hf_model("qwen2", folder)
  config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                           bnb_4bit_compute_dtype=torch.bfloat16)
  model = transformers.AutoModelForCausalLM.from_pretrained(folder, quantization_config=config,
                                                            device_map="cpu", dtype=torch.bfloat16)
  _, params = loading.load_model(folder, jnp.bfloat16, quantize="nf4")
  ours = params["layers"]["mlp"]["up_proj"]
  theirs = model.model.layers[1].mlp.up_proj.weight
  np.testing.assert_array_equal(np.asarray(ours["kernel_nf4"][1]).reshape(-1), theirs.data.numpy().reshape(-1))
  np.testing.assert_array_equal(np.asarray(ours["kernel_absmax"][1]), theirs.quant_state.absmax.numpy())
  _, float32 = loading.load_model(folder, quantize="nf4")  # reading in float32 gives other scales
  assert not np.array_equal(np.asarray(float32["layers"]["mlp"]["up_proj"]["kernel_absmax"][1]),
                            theirs.quant_state.absmax.numpy())
