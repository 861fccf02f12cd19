"""4-bit NormalFloat (NF4) or FP4 storage of frozen base weights: QLoRA, bit for bit as bitsandbytes.

A quantized linear layer holds, instead of `kernel` (in x out):
  `kernel_nf4`    uint8, out x in/2: two 4-bit codes a byte, high nibble first, over the weight in
                  Hugging Face's out x in layout (the layout bitsandbytes quantizes);
  `kernel_absmax` float32, one scale per block of 64 consecutive values of that flattened weight.
A value is NF4[code] * absmax of its block (bitsandbytes' `quantize_4bit(blocksize=64,
quant_type="nf4")` without double quantization, transformers' `BitsAndBytesConfig(load_in_4bit=True,
bnb_4bit_quant_type="nf4")`): 4.5 bits a weight instead of 16 or 32. The layer dequantizes its
kernel when it runs, so only PEFT leaves (which train) and activations are kept in full precision.
`fp4` is the same with bitsandbytes' FP4 levels (`quant_type="fp4"`) in `kernel_fp4`.

`nf4_double_quant` (QLoRA's double quantization, `bnb_4bit_use_double_quant=True`) stores the block
scales themselves in 8 bits: their mean is subtracted (`kernel_absmax_offset`, one float32 per
layer), and what is left is coded blockwise as bitsandbytes' `quantize_blockwise(blocksize=256)`
does, one byte a scale (`kernel_absmax_code`: the nearest of bitsandbytes' 256 signed dynamic
levels) and one float32 per 256 scales (`kernel_absmax_scale`). A scale is then
DYNAMIC[code] x its block's scale + offset: 4.127 bits a weight.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxtune.models import moe
from jaxtune.models.matmul import transposed

BLOCK = 64
SCALE_BLOCK = 256  # double quantization: block scales per 8-bit block
# model.quantize: "" keeps the base in precision.param_dtype; nf4 / fp4 is bitsandbytes' 4-bit type
CHOICES = ("", "nf4", "fp4", "nf4_double_quant", "fp4_double_quant")
# The 16 NF4 levels (QLoRA, Dettmers et al. 2023; bitsandbytes' table), as float32.
NF4 = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0], np.float32)
# bitsandbytes' FP4 by code (sign, 2 exponent and 1 mantissa bits, scaled to max 1): quant_type="fp4",
# load_in_4bit's default. Codes 0 and 8 are both zero.
FP4 = np.array([0, 0.0625, 8, 12, 4, 6, 2, 3, -0.0, -0.0625, -8, -12, -4, -6, -2, -3], np.float32) / np.float32(12)
CODEBOOKS = {"nf4": NF4, "fp4": FP4}  # a quantized layer's codes leaf is kernel_<type>
CODE_LEAVES = tuple(f"kernel_{t}" for t in CODEBOOKS)


def _linspace_as_torch(start: float, end: float, n: int) -> np.ndarray:
  """torch.linspace(start, end, n, dtype=float32) to the bit (np.linspace rounds differently): a
  float32 step, the first half counted up from start and the rest down from end, each in one rounding."""
  start32, end32 = np.float32(start), np.float32(end)
  step = np.float64((end32 - start32) / np.float32(n - 1))
  i = np.arange(n)
  return np.where(i < n // 2, np.float64(start32) + step * i, np.float64(end32) - step * (n - 1 - i)).astype(np.float32)


def _dynamic_levels() -> np.ndarray:
  """bitsandbytes' signed 8-bit dynamic type (`create_dynamic_map()`), sorted: 0, 1, and for each
  decade 10^-6 ... 10^0, the 2^i midpoints of 2^i steps from 0.1 to 1 of it, of either sign."""
  levels = [0.0, 1.0]
  for i in range(7):
    bounds = _linspace_as_torch(0.1, 1.0, 2 ** i + 1)
    means = ((bounds[:-1] + bounds[1:]) / np.float32(2)) * np.float32(10.0 ** (i - 6))
    levels += [*means.tolist(), *(-means).tolist()]
  return np.array(sorted(levels), np.float32)


DYNAMIC = _dynamic_levels()
_DYNAMIC_MIDPOINTS = (np.float32(0.5) * (DYNAMIC[:-1] + DYNAMIC[1:])).astype(np.float32)


def quant_type(quantize: str) -> str:
  """The 4-bit type (nf4 or fp4) of a `model.quantize` choice."""
  return quantize.removesuffix("_double_quant")


def double_quantizes(quantize: str) -> bool:
  """Whether a `model.quantize` choice double-quantizes the block scales."""
  return quantize.endswith("_double_quant")


def _codes_leaf(linear: dict) -> str | None:
  return next((name for name in CODE_LEAVES if name in linear), None)


def is_quantized(linear: dict) -> bool:
  return _codes_leaf(linear) is not None


def _check_packable(n_in: int) -> None:
  if n_in % 2:
    raise ValueError(f"4-bit codes pack two inputs a byte: a layer with {n_in} inputs cannot be quantized")


def quantized_shapes(n_out: int, n_in: int, lead: tuple[int, ...] = (), quantize: str = "nf4"
                     ) -> dict[str, tuple[int, ...]]:
  """Shapes of a quantized linear layer's leaves (out x in weight, optional leading layer axes)."""
  _check_packable(n_in)
  n_blocks = math.ceil(n_out * n_in / BLOCK)
  codes = {f"kernel_{quant_type(quantize)}": (*lead, n_out, n_in // 2)}
  if not double_quantizes(quantize):
    return {**codes, "kernel_absmax": (*lead, n_blocks)}
  return {**codes, "kernel_absmax_code": (*lead, n_blocks),
          "kernel_absmax_scale": (*lead, math.ceil(n_blocks / SCALE_BLOCK)), "kernel_absmax_offset": lead}


def quantize_4bit(weight_OxI, quant_type: str = "nf4") -> tuple[np.ndarray, np.ndarray]:
  """(codes out x in/2 uint8, absmax float32 per block of 64) of an out x in weight, in NF4 or FP4.

  Each block is scaled by 1/max|w| and each value takes the nearest level (ties to the lower one),
  in float32, as bitsandbytes does (a short last block is divided by its max). Runs on the host's
  CPU device whatever the accelerator, so the codes are the same everywhere."""
  _check_packable(weight_OxI.shape[1])
  cpu = jax.devices("cpu")[0]
  with jax.set_mesh(jax.sharding.Mesh(np.array([cpu]), ("host",))):  # not the run's mesh, if one is set
    codes, absmax = _quantize_on_cpu(jax.device_put(np.asarray(weight_OxI, np.float32), cpu), quant_type)
  return np.asarray(codes), np.asarray(absmax)


@functools.partial(jax.jit, static_argnames="quant_type")
def _quantize_on_cpu(weight_OxI, quant_type: str):
  n_out, n_in = weight_OxI.shape
  n = n_out * n_in
  n_blocks = math.ceil(n / BLOCK)
  blocks = jnp.pad(weight_OxI.reshape(-1), (0, n_blocks * BLOCK - n)).reshape(n_blocks, BLOCK)
  absmax = jnp.abs(blocks).max(axis=1)
  safe = jnp.where(absmax > 0, absmax, 1)  # an all-zero block codes 0.0 (bitsandbytes: 0 / 1e-38)
  scaled = blocks * (1 / safe)[:, None]
  if n % BLOCK:
    scaled = scaled.at[-1].set(blocks[-1] / safe[-1])
  scaled = jnp.clip(scaled.reshape(-1)[:n], -1, 1)
  by_value = np.argsort(CODEBOOKS[quant_type], kind="stable")  # the codes in level order
  levels = CODEBOOKS[quant_type][by_value]
  rank = (scaled[:, None] > jnp.asarray((levels[:-1] + levels[1:]) / np.float32(2))).sum(-1)
  codes = jnp.asarray(by_value.astype(np.uint8))[rank].reshape(n_out, n_in)
  return (codes[:, 0::2] << 4) | codes[:, 1::2], absmax


def quantize_scales(absmax_B: np.ndarray) -> dict[str, np.ndarray]:
  """Double quantization of one weight's block scales: {absmax_code, absmax_scale, absmax_offset}."""
  absmax = np.asarray(absmax_B, np.float32)
  offset = np.float32(absmax.mean(dtype=np.float64))
  centred = absmax - offset
  n = centred.size
  blocks = np.pad(centred, (0, -n % SCALE_BLOCK)).reshape(-1, SCALE_BLOCK)
  scale = np.abs(blocks).max(axis=1)
  inverse = np.float32(1) / np.where(scale > 0, scale, np.float32(1))
  normed = np.clip(blocks * inverse[:, None], -1, 1).reshape(-1)[:n]
  codes = np.searchsorted(_DYNAMIC_MIDPOINTS, normed, side="left").astype(np.uint8)  # nearest, ties down
  return {"absmax_code": codes, "absmax_scale": scale, "absmax_offset": offset}


def dequantize_scales(code_B, scale_S, offset):
  """The float32 block scales of `quantize_scales`' leaves (leading axes kept)."""
  *lead, n = code_B.shape
  values = jnp.asarray(DYNAMIC)[code_B]
  values = jnp.pad(values, [(0, 0)] * len(lead) + [(0, -n % SCALE_BLOCK)])
  values = values.reshape(*lead, -1, SCALE_BLOCK) * scale_S.astype(jnp.float32)[..., None]
  return values.reshape(*lead, -1)[..., :n] + jnp.asarray(offset, jnp.float32)[..., None]


def quantized_leaves(kernel_path: str, layers_OxI, quantize: str = "nf4") -> dict[str, np.ndarray]:
  """The 4-bit leaves (stacked over layers) that replace the stacked kernel at `kernel_path`, from its
  layers' out x in weights in order, as the `model.quantize` choice `quantize` stores them."""
  per_layer = []
  for weight in layers_OxI:
    codes, absmax = quantize_4bit(weight, quant_type(quantize))
    scales = quantize_scales(absmax) if double_quantizes(quantize) else {"absmax": absmax}
    per_layer.append({quant_type(quantize): codes, **scales})
  linear = kernel_path[: -len("kernel")]
  return {f"{linear}kernel_{name}": np.stack([layer[name] for layer in per_layer]) for name in per_layer[0]}


def dequantize_4bit(codes_OxH, absmax_B, quant_type: str = "nf4"):
  """The float32 kernel (in x out) of 4-bit codes (out x in/2) and block scales; leading axes kept."""
  *lead, n_out, half = codes_OxH.shape
  n = n_out * half * 2
  codes = jnp.stack([codes_OxH >> 4, codes_OxH & 15], axis=-1).reshape(*lead, n)
  values = jnp.asarray(CODEBOOKS[quant_type])[codes]
  n_blocks = absmax_B.shape[-1]
  if n_blocks * BLOCK != n:
    values = jnp.pad(values, [(0, 0)] * len(lead) + [(0, n_blocks * BLOCK - n)])
  values = values.reshape(*lead, n_blocks, BLOCK) * absmax_B.astype(jnp.float32)[..., None]
  weight_OxI = values.reshape(*lead, n_blocks * BLOCK)[..., :n].reshape(*lead, n_out, 2 * half)
  return transposed(weight_OxI)  # row-major in x out: XLA:CPU's fast dot form (matmul.py)


def block_scales(linear: dict):
  """A quantized layer's float32 scale per block of 64 weights (double-quantized ones dequantized)."""
  if "kernel_absmax" in linear:
    return linear["kernel_absmax"]
  return dequantize_scales(linear["kernel_absmax_code"], linear["kernel_absmax_scale"], linear["kernel_absmax_offset"])


def kernel_of(linear: dict, dtype=jnp.float32):
  """A linear layer's kernel (in x out): its `kernel`, or its 4-bit leaves dequantized to `dtype`."""
  name = _codes_leaf(linear)
  if name is None:
    return linear["kernel"]
  return dequantize_4bit(linear[name], block_scales(linear), name.removeprefix("kernel_")).astype(dtype)


def kernel_shape(linear: dict) -> tuple[int, ...]:
  """(..., in, out) of a linear layer, quantized or not."""
  if is_quantized(linear):
    *lead, n_out, half = linear[_codes_leaf(linear)].shape
    return (*lead, 2 * half, n_out)
  return tuple(linear["kernel"].shape)


def is_quantizable(path: str) -> bool:
  """The base leaves `model.quantize` stores in NF4: the decoder layers' projection kernels (the
  embeddings, norms, biases, LM head, an MoE router and its experts stay, as transformers leaves them)."""
  return path.startswith("layers/") and path.endswith("/kernel") and not moe.is_router_leaf(path)


def quantize_shapes(flat_shapes: dict[str, tuple[int, ...]], quantize: str = "nf4") -> dict[str, tuple[int, ...]]:
  """Base param shapes (flat, kernels L x in x out) with every quantizable kernel as its 4-bit leaves."""
  out = {}
  for path, shape in flat_shapes.items():
    if not is_quantizable(path):
      out[path] = shape
      continue
    *lead, n_in, n_out = shape
    linear = path[: -len("kernel")]
    out.update({linear + name: s for name, s in quantized_shapes(n_out, n_in, tuple(lead), quantize).items()})
  return out


def weights_in(path: str, leaf) -> int:
  """How many model weights a param leaf holds: two a byte in 4-bit codes, none in their scales."""
  if path.rsplit("/", 1)[-1] in CODE_LEAVES:
    return 2 * leaf.size
  return 0 if "/kernel_absmax" in path else leaf.size
