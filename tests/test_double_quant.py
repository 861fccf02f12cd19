"""model.quantize=nf4_double_quant: QLoRA's double quantization (bitsandbytes' compress_statistics,
transformers' bnb_4bit_use_double_quant=True), against bitsandbytes and peft on it."""

import bitsandbytes.functional as bnb_functional
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch

from jaxtune.models import llama, loading, quantization
from jaxtune.peft import lora, partition
from test_qlora import TOKENS, bnb_model, lora_on_a_quantized_base, torch_logits


def nearest_levels(normed):
  """Index of the nearest dynamic level to each value, by brute force."""
  return np.argmin(np.abs(normed[:, None].astype(np.float64) - quantization.DYNAMIC[None, :]), axis=1)


@pytest.mark.parametrize("shape", [(688, 256), (2048, 512), (24, 40)])
def test_double_quantized_scales_are_the_nearest_levels(shape):
  """The 8-bit levels are bitsandbytes' to the bit; the NF4 codes, second-level scales and offset are
  its own (the offset to float32 rounding: its mean sums in another order); every scale takes its
  nearest level. bitsandbytes' CPU kernel (0.50.2) finds levels through a 65,536-entry table, which
  misses the nearest for ~0.2% of scales (by up to 2 levels, 2% of a scale): jaxtune's scales are
  never further from the true ones than its, and its choice for the rest."""
  np.testing.assert_array_equal(quantization.DYNAMIC, bnb_functional.create_dynamic_map().numpy())
  weight = torch.randn(*shape, generator=torch.Generator().manual_seed(shape[1])) * 0.05
  packed, state = bnb_functional.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=True)
  codes, absmax = quantization.quantize_4bit(weight.numpy())
  np.testing.assert_array_equal(codes.reshape(-1), packed.numpy().reshape(-1))
  ours = quantization.quantize_scales(absmax)
  np.testing.assert_allclose(ours["absmax_offset"], state.offset.item(), rtol=1e-6)
  np.testing.assert_allclose(ours["absmax_scale"], state.state2.absmax.numpy(), rtol=1e-6)
  centred = (absmax - ours["absmax_offset"]).reshape(-1)
  blocks = np.repeat(ours["absmax_scale"], quantization.SCALE_BLOCK)[: centred.size]
  np.testing.assert_array_equal(ours["absmax_code"], nearest_levels(centred / blocks))
  theirs_codes = state.absmax.numpy().astype(int)
  differ = theirs_codes != ours["absmax_code"]
  assert differ.mean() < 0.005 and np.abs(theirs_codes - ours["absmax_code"]).max() <= 2
  scales = np.asarray(quantization.dequantize_scales(
      jnp.asarray(ours["absmax_code"]), jnp.asarray(ours["absmax_scale"]), jnp.asarray(ours["absmax_offset"])))
  theirs = (bnb_functional.dequantize_blockwise(state.absmax, state.state2) + state.offset).numpy()
  np.testing.assert_allclose(scales[~differ], theirs[~differ], rtol=1e-6)
  assert np.all(np.abs(scales - absmax) <= np.abs(theirs - absmax) + 1e-7)
  assert np.abs(scales - absmax).max() < 0.01 * absmax.max()


def bnb_scale_leaves(model, path: str, num_layers: int) -> dict[str, np.ndarray]:
  """bitsandbytes' own double-quantized scales of a stacked kernel, as jaxtune's leaves."""
  states = [model.get_submodule(loading.hf_name_of(path, i).rsplit(".", 1)[0]).weight.quant_state
            for i in range(num_layers)]
  linear = path[: -len("kernel")]
  return {linear + "kernel_absmax_code": np.stack([s.absmax.numpy() for s in states]),
          linear + "kernel_absmax_scale": np.stack([s.state2.absmax.numpy() for s in states]),
          linear + "kernel_absmax_offset": np.array([s.offset.item() for s in states], np.float32)}


def test_double_quant_logits_match_peft_on_bitsandbytes(tmp_path):
  """A jaxtune LoRA model on a double-quantized base, exported for peft: on transformers' double-quantized
  model peft gives jaxtune's logits once jaxtune holds bitsandbytes' own 8-bit scale codes (the
  dequantization is the same, to 1e-5); with jaxtune's nearest levels they move by a fraction of
  what double quantization itself moves them. The base takes 4.127 bits a weight."""
  folder, adapter, cfg, flat = lora_on_a_quantized_base(tmp_path, "nf4_double_quant")
  params = loading.unflatten(flat)
  quantized = bnb_model(folder, double_quant=True)
  theirs = torch_logits(peft.PeftModel.from_pretrained(quantized, adapter).eval())
  single = torch_logits(peft.PeftModel.from_pretrained(bnb_model(folder), adapter).eval())  # scales in float32

  kernels = [p for p in loading.flatten(loading.load_model(folder)[1]) if quantization.is_quantizable(p)]
  as_bnb = dict(flat)
  for path in kernels:
    as_bnb.update(bnb_scale_leaves(quantized, path, cfg.num_layers))
    assert as_bnb[path[: -len("kernel")] + "kernel_absmax_code"].shape == flat[path[: -len("kernel")] + "kernel_absmax_code"].shape
  runtime = llama.PeftRuntime(lora_scale=lora.lora_scale(4, 16.0))
  with_their_codes = np.asarray(llama.forward(loading.unflatten(as_bnb), cfg, jnp.asarray(TOKENS), peft=runtime)[0])
  ours = np.asarray(llama.forward(params, cfg, jnp.asarray(TOKENS), peft=runtime)[0])
  scale = max(np.abs(theirs).max(), 1)
  print(f"|jaxtune (bnb's codes) - peft+bnb| {np.abs(with_their_codes - theirs).max():.2e}, |jaxtune - peft+bnb| "
        f"{np.abs(ours - theirs).max():.2e}, double quantization moves {np.abs(theirs - single).max():.2e} (bnb), "
        f"{np.abs(ours - single).max():.2e} (jaxtune); mean {np.abs(theirs - single).mean():.2e}, {np.abs(ours - single).mean():.2e}")
  np.testing.assert_allclose(with_their_codes, theirs, atol=1e-5 * scale, rtol=0)
  # jaxtune's own nearest levels: a fraction of double quantization's own effect, and on average no
  # further from the float32-scale model than bitsandbytes' CPU table (1.9e-3 vs 9.0e-3; 6.1e-4 vs 6.3e-4)
  assert np.abs(ours - theirs).max() < 0.5 * np.abs(theirs - single).max()
  assert np.abs(ours - single).mean() <= np.abs(theirs - single).mean()

  # per layer and kernel: a byte per 2 weights, one per block of 64, 4 per 256 blocks, 4 for the offset
  expected = 0
  for path, shape in loading.flatten(llama.param_shapes(cfg), is_leaf=lambda x: isinstance(x, tuple)).items():
    if quantization.is_quantizable(path):
      n = shape[-2] * shape[-1]
      blocks = -(-n // quantization.BLOCK)
      expected += cfg.num_layers * (n // 2 + blocks + 4 * -(-blocks // quantization.SCALE_BLOCK) + 4)
  assert sum(v.nbytes for p, v in flat.items() if "/kernel_" in p) == expected
  nf4 = loading.flatten(loading.load_model(folder, quantize="nf4")[1])
  assert partition.count({p: v for p, v in flat.items() if "lora" not in p}) == partition.count(nf4)
