"""On-paper memory plan: what one chip holds for a fine-tuning run on a given mesh.

  python -m jaxtune.planner --preset llama3-70b --method lora --rank 16 \
      --slice v5p-64 --mesh fsdp=-1 --batch 32 --seq 4096 --remat

Model of the run (jaxtune's own sharding: `sharding.LOGICAL_RULES` applied leaf by leaf):
- the method's leaves (--method: full, lora, dora, ia3, adapter, prefix, prompt) are the ones the
  trainer's `methods.add_peft` adds, traced abstractly, and trainable is `partition.is_trainable`;
- weights, PEFT leaves, gradients and optimizer moments are sharded as the trainer shards them
  (embed -> fsdp; heads, mlp, vocab -> tensor; norms replicated) and replicated over data; with
  fsdp > 1 a layer's weights are all-gathered over fsdp just before use, and XLA keeps two
  layers gathered (the current one and the prefetched next);
- the global batch is split over data x fsdp x expert; head/MLP activations are also split over tensor,
  the residual stream (hidden_size wide) is not (no sequence parallelism);
- AdamW keeps two moments per trainable parameter in float32; gradients have the trainable
  parameters' dtype; only trainable parameters get gradients and moments;
- saved activations per layer and token, in compute dtype: the residual input and the normed
  input of both blocks (4 x hidden), q, k (rotated), v, the attention output (2 q_size +
  2 kv_size), gate, up, silu(gate) and their product (4 x intermediate), and the softmax
  probabilities (heads x seq_len, + the length of a prefix or soft prompt; absent with a
  fused/flash attention kernel). With remat
  (jax.checkpoint per scanned layer) only each layer's input (hidden) is kept and one layer's
  full set is live again during its backward pass;
- the float32 logits and their gradient (2 x 4 bytes x vocab per token) exist for one chunk of
  `fused_loss.chunk_positions` per row (128; a quarter of the row when the head trains);
- DoRA forms W + scale*A@B in float32 for its weight norms: counted as one layer's targeted
  kernels at a time (fsdp-gathered, split over tensor). An upper bound: XLA:CPU's compiled step
  (hidden 512, all seven projections, 13 MB per layer) needed 4.2 MB more than LoRA's with remat
  and 6.8 MB without, as it forms the kernels one or two at a time.
- `--quantize nf4` (QLoRA, `model.quantize`): the decoder layers' kernels take 0.5 + 4/64 bytes a
  weight (codes and float32 block scales; `nf4_double_quant`: 0.5 + (1 + 4/256)/64, 8-bit block
  scales and a float32 per 256 of them), sharded and gathered like the kernels; a layer's
  kernels are dequantized as it runs, counted as one layer's seven kernels in compute dtype
  (fsdp-gathered, split over tensor).
- mixtures of experts (the `mixtral-8x7b` preset) as TPU runs them (`model.moe_dispatch` ragged):
  per token and layer, k copies of its input and the router's E probabilities, and the chosen
  experts' gate, up, activation and product (4 x k x expert width, split over tensor); experts
  shard like dense MLP kernels and, with `--mesh expert=N`, split E over the expert axis (kept
  there when fsdp gathers a layer); everything else is replicated over it, as over data.
Left out as small: adapters' bottleneck activations, prompt tuning's P-token pass for its keys
and values, IA3's scaled activations. It also ignores XLA's scratch space and fragmentation: `fits` keeps a `reserve` fraction of HBM free.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import sys
import types

import jax
import jax.numpy as jnp
import ml_collections

from jaxtune import sharding
from jaxtune.models import fused_loss, quantization
from jaxtune.models.config import ModelConfig, config_from_hf, read_hf_config
from jaxtune.models.llama import logical_axes, param_shapes
from jaxtune.peft import ia3, lora, methods, partition

GIB = 1024**3


def quantized_weight_bytes(quantize: str) -> float:
  """Bytes a quantized weight takes: its 4-bit code and its share of its block's scale (float32, or
  double-quantized: one byte plus a share of a float32 per 256 scales)."""
  if quantization.double_quantizes(quantize):
    return 0.5 + (1 + 4 / quantization.SCALE_BLOCK) / quantization.BLOCK
  return 0.5 + 4 / quantization.BLOCK


@dataclasses.dataclass(frozen=True)
class Chip:
  hbm_gib: float
  cores_per_chip: int  # v4/v5p slice names count TensorCores (2 per chip); v5e/v6e names count chips
  slice_prefix: str


CHIPS = {
    "v4": Chip(hbm_gib=32, cores_per_chip=2, slice_prefix="v4"),
    "v5e": Chip(hbm_gib=16, cores_per_chip=1, slice_prefix="v5litepod"),
    "v5p": Chip(hbm_gib=95, cores_per_chip=2, slice_prefix="v5p"),
    "v6e": Chip(hbm_gib=32, cores_per_chip=1, slice_prefix="v6e"),
}


def _preset(vocab, hidden, inter, layers, heads, kv_heads, tied):
  return ModelConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                     num_layers=layers, num_heads=heads, num_kv_heads=kv_heads,
                     head_dim=hidden // heads, tie_word_embeddings=tied)


PRESETS = {
    "mixtral-8x7b": dataclasses.replace(_preset(32000, 4096, 14336, 32, 32, 8, False), model_type="mixtral",
                                        num_experts=8, num_experts_per_tok=2, expert_intermediate_size=14336),
    "smollm2-135m": _preset(49152, 576, 1536, 30, 9, 3, True),
    "llama2-7b": _preset(32000, 4096, 11008, 32, 32, 32, False),
    "llama3-8b": _preset(128256, 4096, 14336, 32, 32, 8, False),
    "llama3-70b": _preset(128256, 8192, 28672, 80, 64, 8, False),
}


@dataclasses.dataclass(frozen=True)
class Mesh:
  data: int = 1
  fsdp: int = 1
  tensor: int = 1
  expert: int = 1

  @property
  def size(self) -> int:
    return math.prod(getattr(self, axis) for axis in sharding.MESH_AXES)

  @property
  def rows(self) -> int:
    """The batch's split: data x fsdp x expert (sharding.BATCH_AXES)."""
    return math.prod(getattr(self, axis) for axis in sharding.BATCH_AXES)


@dataclasses.dataclass(frozen=True)
class Plan:
  """Bytes per chip (except the counts)."""
  total_params: int
  trainable_params: int
  params: float           # frozen/base weights
  peft_params: float      # the method's added leaves (LoRA/DoRA, IA3, adapters, prefix, prompt)
  gathered_weights: float  # FSDP all-gathered layers in flight
  gradients: float
  optimizer: float
  dora_norms: float        # DoRA: one layer's W + scale*A@B in float32 for the weight norms
  dequantized: float       # NF4 base: one layer's kernels dequantized, in compute dtype
  activations_no_remat: float  # saved layer activations + logits, without remat
  activations_remat: float     # same with per-layer remat
  activations: float           # the one the run uses
  total: float
  hbm: float
  fits: bool


def slice_chips(name: str) -> tuple[str, int]:
  """'v5p-64' -> ('v5p', 32): the chip generation and the number of chips (JAX devices)."""
  for gen, chip in CHIPS.items():
    match = re.fullmatch(re.escape(chip.slice_prefix) + r"-(\d+)", name)
    if match:
      return gen, max(1, int(match.group(1)) // chip.cores_per_chip)
  prefixes = ", ".join(c.slice_prefix + "-N" for c in CHIPS.values())
  raise ValueError(f"slice {name!r} is not a known TPU accelerator type ({prefixes})")


def resolve_mesh(devices: int, data: int = 1, fsdp: int = -1, tensor: int = 1, expert: int = 1) -> Mesh:
  """Fills the -1 axis with the remaining devices, as the trainer does for mesh.* = -1."""
  return Mesh(**sharding.mesh_shape(data, fsdp, tensor, devices, expert))


def _leaves(tree, prefix=""):
  for key, value in tree.items():
    path = f"{prefix}{key}"
    if isinstance(value, dict):
      yield from _leaves(value, path + "/")
    else:
      yield path, value


def peft_settings(method: str = "lora", rank: int = 8, targets: str = lora.DEFAULT_TARGETS,
                  length: int = 16, adapter_size: int = 64, expert_targets: str = "") -> ml_collections.ConfigDict:
  """The `peft` config section the planner assumes: `targets` and `expert_targets` are LoRA's/DoRA's,
  `length` prefix's and prompt's; the rest as configs/base.py (IA3's peft defaults, adapters in both
  places, no reparam)."""
  if method not in partition.METHODS:
    raise ValueError(f"method {method!r} is not one of {', '.join(partition.METHODS)}")
  return ml_collections.ConfigDict({
      "method": method,
      "lora": {"rank": rank, "alpha": 2.0 * rank, "dropout": 0.0, "targets": targets,
               "use_rslora": False, "use_dora": method == "dora", "expert_targets": expert_targets},
      "ia3": {"targets": ia3.DEFAULT_TARGETS, "feedforward": ia3.DEFAULT_FEEDFORWARD},
      "adapter": {"size": adapter_size, "placement": "attn,mlp"},
      "prefix": {"length": length, "reparam_hidden": 0},
      "prompt": {"length": length}})


def method_leaves(cfg: ModelConfig, peft: ml_collections.ConfigDict) -> list[tuple[str, tuple[int, ...]]]:
  """(path, shape) of every leaf the method adds, traced abstractly through the trainer's own
  `methods.add_peft` (nothing is allocated, whatever the model's size)."""
  base = jax.tree.map(lambda shape: jax.ShapeDtypeStruct(shape, jnp.float32), param_shapes(cfg),
                      is_leaf=lambda x: isinstance(x, tuple))
  added = jax.eval_shape(lambda p: methods.add_peft(p, cfg, peft, jax.random.PRNGKey(0), jnp.float32), base)
  return [(path, leaf.shape) for path, leaf in _leaves(added) if partition.is_peft_leaf(path)]


def count_params(cfg: ModelConfig) -> int:
  return sum(math.prod(shape) for _, shape in _leaves(param_shapes(cfg)))


def count_lora_params(cfg: ModelConfig, rank: int, targets: str) -> int:
  return sum(math.prod(shape) for _, shape in method_leaves(cfg, peft_settings("lora", rank, targets)))


def _shard_elements(leaves, mesh: Mesh, gathered: bool = False) -> float:
  """Elements per chip under the trainer's sharding; `gathered`: one layer after the fsdp gather."""
  sizes = dataclasses.asdict(mesh)
  mesh_like = types.SimpleNamespace(shape=sizes)  # spec_for only reads mesh.shape
  total = 0.0
  for path, shape in leaves:
    if gathered:
      if not path.startswith("layers/"):
        continue
      shape = (1,) + tuple(shape[1:])
    spec = sharding.spec_for(logical_axes(path, len(shape)), shape, mesh_like)
    split = math.prod(sizes[a] for a in spec if a and not (gathered and a == "fsdp"))
    total += math.prod(shape) / split
  return total


def _layer_activation_elements(cfg: ModelConfig, seq_len: int, tensor: int, fused_attention: bool):
  """Saved elements per token for one layer (see the module docstring)."""
  mlp, replicated = 4 * cfg.intermediate_size, 0
  if cfg.num_experts:  # the ragged dispatch (TPU's): k copies of the token, each expert's 4 MLP arrays
    k = cfg.num_experts_per_tok
    mlp, replicated = 4 * k * cfg.expert_intermediate_size, k * cfg.hidden_size + cfg.num_experts
  split = 2 * cfg.q_size + 2 * cfg.kv_size + mlp
  probs = 0 if fused_attention else cfg.num_heads * seq_len
  return 4 * cfg.hidden_size + replicated + (split + probs) / tensor


def _dora_norm_scratch(base_leaves, peft_leaves, tensor: int) -> float:
  """DoRA's float32 W + scale*A@B of one layer's targeted kernels (fsdp-gathered, split over tensor)."""
  kernels = dict(base_leaves)
  elements = sum(math.prod(kernels[path.rsplit("/", 1)[0] + "/kernel"][1:])
                 for path, _ in peft_leaves if path.endswith("/lora_magnitude"))
  return elements / tensor * 4


def plan(cfg: ModelConfig, mesh: Mesh, chip: str, batch_size: int, seq_len: int, *,
         method: str = "lora", lora_rank: int = 8, lora_targets: str = lora.DEFAULT_TARGETS,
         peft_length: int = 16, adapter_size: int = 64,
         param_dtype: str = "bfloat16", compute_dtype: str = "bfloat16", remat: bool = True,
         fused_attention: bool = False, reserve: float = 0.1, quantize: str = "", expert_targets: str = "") -> Plan:
  """Per-chip memory of a fine-tuning step (AdamW) of `cfg` on `mesh` of `chip`s with any PEFT method."""
  if chip not in CHIPS:
    raise ValueError(f"chip {chip!r} is not one of {', '.join(CHIPS)}")
  peft = peft_settings(method, lora_rank, lora_targets, peft_length, adapter_size, expert_targets)
  rows = mesh.rows
  if batch_size % rows:
    raise ValueError(f"batch_size {batch_size} is not divisible by data x fsdp x expert = {rows}")
  p_bytes, c_bytes = jnp.dtype(param_dtype).itemsize, jnp.dtype(compute_dtype).itemsize
  base = list(_leaves(param_shapes(cfg)))
  added = method_leaves(cfg, peft)
  trainable = [(path, shape) for path, shape in base + added if partition.is_trainable(path, method)]
  n_base, n_added, n_train = (sum(math.prod(shape) for _, shape in leaves) for leaves in (base, added, trainable))

  if quantize not in quantization.CHOICES:
    raise ValueError(f"quantize {quantize!r} is not one of {quantization.CHOICES}")
  if quantize and method == "full":
    raise ValueError("a quantized base is frozen: full fine-tuning cannot use quantize")
  kernels = [leaf for leaf in base if quantize and quantization.is_quantizable(leaf[0])]
  rest = [leaf for leaf in base if leaf not in kernels]

  def base_bytes(gathered_layers: bool) -> float:
    return (_shard_elements(rest, mesh, gathered_layers) * p_bytes
            + _shard_elements(kernels, mesh, gathered_layers) * quantized_weight_bytes(quantize))

  params = base_bytes(False)
  peft_bytes = _shard_elements(added, mesh) * p_bytes
  gathered = 2 * base_bytes(True) if mesh.fsdp > 1 else 0.0
  dequantized = _shard_elements(kernels, mesh, gathered=True) * c_bytes  # split over tensor only
  train_elements = _shard_elements(trainable, mesh)
  grads = train_elements * p_bytes
  optimizer = train_elements * 2 * 4
  scratch = _dora_norm_scratch(base, added, mesh.tensor)

  tokens = batch_size // rows * seq_len
  prefix = peft_length if method in ("prefix", "prompt") else 0  # extra key positions every token attends to
  layer_bytes = _layer_activation_elements(cfg, seq_len + prefix, mesh.tensor, fused_attention) * c_bytes
  logit_tokens = batch_size // rows * fused_loss.chunk_positions(seq_len, head_gradient=method == "full")
  logits = logit_tokens * cfg.vocab_size / mesh.tensor * 4 * 2
  act_no_remat = tokens * cfg.num_layers * layer_bytes + logits
  act_remat = tokens * (cfg.num_layers * cfg.hidden_size * c_bytes + layer_bytes) + logits
  activations = act_remat if remat else act_no_remat

  total = params + peft_bytes + gathered + grads + optimizer + scratch + dequantized + activations
  hbm = CHIPS[chip].hbm_gib * GIB
  return Plan(total_params=n_base + n_added, trainable_params=n_train, params=params,
              peft_params=peft_bytes, gathered_weights=gathered, gradients=grads, optimizer=optimizer,
              dora_norms=scratch, dequantized=dequantized, activations_no_remat=act_no_remat, activations_remat=act_remat,
              activations=activations, total=total, hbm=hbm, fits=total <= hbm * (1 - reserve))


def format_plan(p: Plan) -> str:
  rows = [("params (frozen/base)", p.params), ("PEFT params", p.peft_params),
          ("FSDP-gathered layers", p.gathered_weights), ("gradients", p.gradients),
          ("optimizer (AdamW fp32 m, v)", p.optimizer),
          *([("DoRA weight norms", p.dora_norms)] if p.dora_norms else []),  # DoRA only
          *([("dequantized layer (NF4)", p.dequantized)] if p.dequantized else []),
          ("activations, no remat", p.activations_no_remat),
          ("activations, remat", p.activations_remat), ("total (as configured)", p.total),
          ("HBM per chip", p.hbm)]
  lines = [f"total params {p.total_params:,}   trainable {p.trainable_params:,}",
           "per chip:"] + [f"  {name:<28} {value / GIB:9.3f} GiB" for name, value in rows]
  lines.append(f"fits: {'yes' if p.fits else 'NO'} ({p.total / p.hbm:.0%} of HBM)")
  return "\n".join(lines)


def _parse_mesh(text: str) -> dict[str, int]:
  sizes = {}
  for item in text.split(","):
    key, _, value = item.partition("=")
    if key not in sharding.MESH_AXES or not re.fullmatch(r"-?\d+", value):
      raise ValueError(f"--mesh item {item!r} is not data=N, fsdp=N, expert=N or tensor=N")
    sizes[key] = int(value)
  return sizes


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(prog="python -m jaxtune.planner", description=__doc__.split("\n")[0])
  model = ap.add_mutually_exclusive_group(required=True)
  model.add_argument("--preset", choices=sorted(PRESETS))
  model.add_argument("--model", help="Hugging Face folder with a config.json")
  hw = ap.add_mutually_exclusive_group(required=True)
  hw.add_argument("--slice", help="TPU accelerator type, e.g. v5p-64 (sets the chip and device count)")
  hw.add_argument("--chip", choices=sorted(CHIPS), help="chip generation; the mesh gives the device count")
  ap.add_argument("--mesh", default="fsdp=-1", help="data=N,fsdp=N,expert=N,tensor=N (-1 fills; default fsdp=-1)")
  ap.add_argument("--method", choices=partition.METHODS, default="lora")
  ap.add_argument("--rank", type=int, default=8, help="lora/dora rank")
  ap.add_argument("--targets", default=lora.DEFAULT_TARGETS,
                  help="lora/dora: peft.lora.targets, a regex fully matching module paths (default: all 7 "
                       "projections); ia3 uses peft.ia3's defaults")
  ap.add_argument("--length", type=int, default=16, help="prefix/prompt: virtual tokens")
  ap.add_argument("--adapter_size", type=int, default=64, help="adapter: bottleneck width")
  ap.add_argument("--batch", type=int, default=None, help="global batch in sequences (default: 1 per row)")
  ap.add_argument("--seq", type=int, default=2048)
  ap.add_argument("--param_dtype", default="bfloat16")
  ap.add_argument("--compute_dtype", default="bfloat16")
  ap.add_argument("--remat", action=argparse.BooleanOptionalAction, default=True)
  ap.add_argument("--fused_attention", action="store_true")
  ap.add_argument("--quantize", choices=quantization.CHOICES, default="",
                  help="nf4: the frozen base's layer kernels in 4-bit NF4 (QLoRA, model.quantize)")
  ap.add_argument("--expert_targets", default="",
                  help="lora: LoRA on every expert too (peft.lora.expert_targets, e.g. 'gate_up_proj|down_proj')")
  args = ap.parse_args(argv)
  try:
    cfg = PRESETS[args.preset] if args.preset else config_from_hf(read_hf_config(args.model))
    sizes = _parse_mesh(args.mesh)
    if args.slice:
      chip, devices = slice_chips(args.slice)
    else:
      chip, devices = args.chip, math.prod(v for v in sizes.values() if v > 0)
    mesh = resolve_mesh(devices, **sizes)
    batch = args.batch or mesh.rows
    result = plan(cfg, mesh, chip, batch, args.seq, method=args.method, lora_rank=args.rank,
                  lora_targets=args.targets, peft_length=args.length, adapter_size=args.adapter_size,
                  param_dtype=args.param_dtype,
                  compute_dtype=args.compute_dtype, remat=args.remat,
                  fused_attention=args.fused_attention, quantize=args.quantize, expert_targets=args.expert_targets)
  except (ValueError, TypeError, OSError, KeyError) as e:
    print(f"planner: {e}", file=sys.stderr)
    return 2
  print(f"{chip} x {devices} chips, mesh {dataclasses.asdict(mesh)}, batch {batch} x {args.seq}")
  print(format_plan(result))
  return 0


if __name__ == "__main__":
  sys.exit(main())
