"""Training speed: jaxtune vs the Hugging Face peer (transformers + peft, torch) on one model and batch.

    python scripts/benchmark.py                       # the CPU comparison (docs/benchmark.md)
    python scripts/benchmark.py --preset 1b --dtype bfloat16 --sides jaxtune --peak_tflops 989  # GPU

For each precision, method (full; LoRA r=8 on the 7 projections; dora: the same LoRA with DoRA's
magnitudes; qlora: the same LoRA on a base held in 4-bit NF4, the peer's through bitsandbytes'
load_in_4bit; `--methods full,lora,dora,qlora`) and side a fresh subprocess
trains --steps AdamW steps (grad clip 1.0, as train.py) on one fixed random batch, so peak RSS
(ru_maxrss) is each side's own. Both sides start from the same random float32 weights (the peer
loads them from a HF folder written here) and report their first loss, which must agree.
float32: both sides compute in float32. bfloat16: mixed precision on both sides - jaxtune's
compute_dtype with float32 master weights, the peer under torch.autocast (its own bf16 path).
MFU = model FLOPs/s over a matmul peak this script measures per precision (jitted 2048^2 matmul,
float32 accumulation) or --peak_tflops. On a GPU the peer runs there too (CUDA autocast, torch's
SDPA attention), and jaxtune's attention is model.attention's --attention (auto: cuDNN in bf16).
On CPU, jaxtune's worker restarts with glibc's huge-page tunable as train.py does
(jaxtune/huge_pages.py); the peer runs with glibc's defaults, as its users run it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LORA_TARGETS = r".*(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
PEER_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA_METHODS = ("lora", "dora", "qlora")  # LoRA A/B on the seven projections (dora: + magnitudes; qlora: NF4 base)


@dataclasses.dataclass(frozen=True)
class Preset:
  vocab: int
  hidden: int
  inter: int
  layers: int
  heads: int
  kv_heads: int
  batch: int
  seq: int
  tied: bool = False


PRESETS = {
    "cpu": Preset(8192, 256, 688, 4, 8, 4, batch=8, seq=256),  # DESIGN.md section 4's peer baseline
    "tiny": Preset(256, 64, 128, 2, 4, 2, batch=2, seq=32),  # smoke test
    # Llama-3.2-1B shape; 4 x 1024 tokens keep the un-fused float32 attention scores well inside 80 GB.
    "1b": Preset(128256, 2048, 8192, 16, 32, 8, batch=4, seq=1024, tied=True),
    # SmolLM2-135M's shape, the model README's demo tunes (random weights, the demo's 4 x 256 batch).
    "smollm2": Preset(49152, 576, 1536, 30, 9, 3, batch=4, seq=256, tied=True),
}


def model_config(p: Preset, attention: str = "auto", layer_loop: str = "auto"):
  from jaxtune.models.config import ModelConfig
  return ModelConfig(vocab_size=p.vocab, hidden_size=p.hidden, intermediate_size=p.inter, num_layers=p.layers,
                     num_heads=p.heads, num_kv_heads=p.kv_heads, head_dim=p.hidden // p.heads,
                     rms_norm_eps=1e-5, tie_word_embeddings=p.tied, max_position_embeddings=max(2048, p.seq),
                     attention=attention, layer_loop=layer_loop)


def matmul_params(p: Preset) -> int:
  """Weights that take part in matmuls (the embedding lookup does not; a tied head does)."""
  hd = p.hidden // p.heads
  attn = p.hidden * hd * (2 * p.heads + 2 * p.kv_heads)
  return p.layers * (attn + 3 * p.hidden * p.inter) + p.hidden * p.vocab


def lora_params(p: Preset, rank: int) -> int:
  hd = p.hidden // p.heads
  outs = [p.heads * hd, p.kv_heads * hd, p.kv_heads * hd, p.hidden, p.inter, p.inter, p.hidden]
  ins = [p.hidden] * 3 + [p.heads * hd] + [p.hidden] * 2 + [p.inter]
  return p.layers * rank * sum(i + o for i, o in zip(ins, outs))


def train_flops_per_token(p: Preset, method: str, rank: int = 8) -> float:
  """Model FLOPs (PaLM-style, no recompute): matmul weights 6N (full) or 4N + 6*LoRA (no frozen
  weight gradients), attention scores and values 3 x 4*T*q_size per layer (unmasked count). DoRA
  counts as LoRA: its weight norms cost per step, not per token, and are overhead, not model FLOPs."""
  attention = 3 * p.layers * 4 * p.seq * p.hidden
  if method == "full":
    return 6 * matmul_params(p) + attention
  return 4 * matmul_params(p) + 6 * lora_params(p, rank) + attention


def fixed_batch(p: Preset, seed: int = 0) -> dict[str, np.ndarray]:
  tokens = np.random.default_rng(seed).integers(0, p.vocab, (p.batch, p.seq + 1), dtype=np.int32)
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
          "weights": np.ones((p.batch, p.seq), np.float32),
          "positions": np.broadcast_to(np.arange(p.seq, dtype=np.int32), (p.batch, p.seq)).copy(),
          "segment_ids": np.ones((p.batch, p.seq), np.int32)}


def peak_rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def peak_device_mb() -> float:
  """The accelerator's peak allocation in this process (0 where JAX does not report it: CPU)."""
  import jax
  stats = jax.devices()[0].memory_stats()
  return stats["peak_bytes_in_use"] / 2**20 if stats else 0.0


def minor_faults() -> int:
  """Page faults served without I/O so far: mostly fresh memory touched for the first time."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def base_params(p: Preset, dtype="float32", seed: int = 0):
  import jax
  import jax.numpy as jnp
  from jaxtune.models import llama
  return llama.init_params(model_config(p), jax.random.PRNGKey(seed), jnp.dtype(dtype))


def write_peer_model(p: Preset, folder: str) -> str:
  """The same random weights as jaxtune's `base_params`, as a HF folder the peer loads."""
  from jaxtune import export
  from jaxtune.models import llama
  export.write_hf(folder, model_config(p), base_params(p), llama.PeftRuntime(), None, None)
  return folder


def measure_matmul_peak(n: int = 2048, dtype: str = "float32", repeats: int = 10) -> float:
  """Best FLOP/s of a jitted n x n matmul (JAX, default device)."""
  import jax
  import jax.numpy as jnp
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32).astype(dtype)
  f = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
  f(a, a).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    f(a, a).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return 2 * n ** 3 / best


# ----------------------------------------------------------------------------- the two sides


def run_jaxtune(p: Preset, method: str, steps: int, dtype: str = "float32", rank: int = 8,
                model_dir: str = "", remat: str = "dots", attention: str = "auto", profile: str = "",
                layer_loop: str = "auto") -> dict:
  """jaxtune's jitted, donated train_step (the one train.py runs) on the fixed batch.

  `remat` is train.remat_policy with train.remat on ("" = off); "dots" is the fastest on CPU.
  `attention` and `layer_loop` are model.attention and model.layer_loop.

  Weights come from `model_dir` (the HF folder the peer loads, read as train.py reads it) or, with
  none, from `base_params` on the default device (the GPU check). With `profile`, 3 more steps after
  the timed ones are traced there, with the step's top ops in top_ops.txt (see jaxtune/profiling.py).
  """
  import functools

  import jax
  import ml_collections
  from jaxtune.models import llama
  from jaxtune.optimizer import build_optimizer
  from jaxtune.peft import lora, partition
  from jaxtune.train_step import StepSpec, train_step
  sys.path.insert(0, ROOT)
  from configs.base import get_base_config

  cfg = model_config(p, attention, layer_loop)
  from jaxtune.models import loading
  # float32 master weights; `dtype` is the compute dtype
  quantize = "nf4" if method == "qlora" else ""
  if model_dir:
    params = loading.load_model(model_dir, quantize=quantize)[1]
  else:
    params = loading.quantize_params(base_params(p)) if quantize else base_params(p)
  scale = 1.0
  if method in LORA_METHODS:
    params = lora.add_lora(params, jax.random.PRNGKey(1), rank, LORA_TARGETS, use_dora=method == "dora")
    scale = 2.0  # alpha 16 / r 8, as the peer
  trainable, frozen = partition.split(params, "lora" if method == "qlora" else method)
  opt_cfg = ml_collections.ConfigDict(get_base_config().optimizer)
  opt_cfg.learning_rate, opt_cfg.schedule = 1e-4, "constant"
  optimizer = build_optimizer(opt_cfg, steps, trainable.keys())
  opt_state = optimizer.init(trainable)
  spec = StepSpec(model=cfg, peft=llama.PeftRuntime(scale, 0.0), compute_dtype=dtype, remat=remat)
  step = jax.jit(functools.partial(train_step, spec=spec, optimizer=optimizer), donate_argnums=(0, 2))
  batch = jax.device_put(fixed_batch(p))
  rng = jax.random.PRNGKey(2)

  t = time.perf_counter()
  compiled = step.lower(trainable, frozen, opt_state, batch, rng).compile()
  compile_s = time.perf_counter() - t
  t = time.perf_counter()
  trainable, opt_state, first = compiled(trainable, frozen, opt_state, batch, rng)
  first_loss = float(first["loss"])  # blocks: the warm-up step is not timed
  first_step_s = time.perf_counter() - t
  losses = []
  faults, t = minor_faults(), time.perf_counter()
  for _ in range(steps):
    trainable, opt_state, metrics = compiled(trainable, frozen, opt_state, batch, rng)
    losses.append(metrics["loss"])  # stays on device: no host sync inside the loop
  jax.block_until_ready((trainable, opt_state, losses))
  elapsed, faults = time.perf_counter() - t, minor_faults() - faults
  if profile:
    from jaxtune import profiling
    profiler = profiling.StepProfiler(profile, start=1, count=3)
    for i in (1, 2, 3):
      profiler.before_step(i, lambda: step.lower(trainable, frozen, opt_state, batch, rng), (trainable, opt_state))
      trainable, opt_state, metrics = compiled(trainable, frozen, opt_state, batch, rng)
      profiler.after_step(i, metrics)
  from jaxtune.models import attention as attention_lib
  q = jax.ShapeDtypeStruct((p.batch, p.seq, p.heads, p.hidden // p.heads), jax.numpy.dtype(dtype))
  return {"side": "jaxtune", "method": method, "dtype": dtype, "remat": remat,
          "layer_loop": "unrolled" if llama.layers_unrolled(cfg) else "scan",
          "attention": attention_lib.resolve(attention, q, 0, segments=True), "batch": p.batch,  # no sliding window
          "tokens_per_sec": steps * p.batch * p.seq / elapsed,
          "step_s": elapsed / steps, "compile_s": compile_s, "first_step_s": first_step_s,
          "first_loss": first_loss, "last_loss": float(losses[-1]), "peak_rss_mb": peak_rss_mb(),
          "faults_per_step": faults / steps, "trainable_params": partition.count(trainable),
          "device": str(jax.devices()[0].platform), "peak_device_mb": peak_device_mb()}


def run_peer(p: Preset, method: str, steps: int, model_dir: str, threads: int = 2, rank: int = 8,
             dtype: str = "float32") -> dict:
  """transformers LlamaForCausalLM (+ peft LoRA), torch AdamW, the same batch and weights.

  float32 weights and optimizer; `dtype` bfloat16 runs the forward pass under torch.autocast.
  """
  import torch
  import transformers
  torch.set_num_threads(threads)
  device = "cuda" if torch.cuda.is_available() else "cpu"
  if method == "qlora":  # bitsandbytes' NF4 base, float32 compute (autocast's bf16 for bfloat16)
    quantization = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                   bnb_4bit_compute_dtype=torch.float32)
    model = transformers.LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32, device_map=device,
                                                          quantization_config=quantization)
  else:
    model = transformers.LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device)
  if method in LORA_METHODS:
    import peft
    model = peft.get_peft_model(model, peft.LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                                                       target_modules=PEER_TARGETS, use_dora=method == "dora"))
  model.train()
  params = [q for q in model.parameters() if q.requires_grad]
  optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
  batch = {k: torch.from_numpy(v).to(device) for k, v in fixed_batch(p).items()}

  def step():
    with torch.autocast(device, dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
      logits = model(input_ids=batch["inputs"]).logits
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, p.vocab).float(), batch["targets"].reshape(-1).long())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    return loss.detach()

  t = time.perf_counter()
  first_loss = float(step())
  first_step_s = time.perf_counter() - t
  losses = []
  faults, t = minor_faults(), time.perf_counter()
  for _ in range(steps):
    losses.append(step())
  if device == "cuda":
    torch.cuda.synchronize()
  elapsed, faults = time.perf_counter() - t, minor_faults() - faults
  return {"side": "peer", "method": method, "dtype": dtype, "tokens_per_sec": steps * p.batch * p.seq / elapsed,
          "step_s": elapsed / steps, "compile_s": 0.0, "first_step_s": first_step_s,
          "first_loss": first_loss, "last_loss": float(losses[-1]), "peak_rss_mb": peak_rss_mb(),
          "faults_per_step": faults / steps, "trainable_params": sum(q.numel() for q in params),
          "device": device, "batch": p.batch,
          "peak_device_mb": torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else 0.0,
          "attention": model.config._attn_implementation}


# ----------------------------------------------------------------------------- driver


def preset(args) -> Preset:
  p = PRESETS[args.preset]
  return dataclasses.replace(p, batch=args.batch) if args.batch else p


def run_worker(args) -> dict:
  p = preset(args)
  if args.worker == "model":  # in a subprocess: on a GPU the driver itself never holds device memory
    return {"model_dir": write_peer_model(p, args.model_dir)}
  if args.worker == "jaxtune":
    return run_jaxtune(p, args.method, args.steps, args.dtype, model_dir=args.model_dir, remat=args.remat,
                       attention=args.attention, profile=args.profile, layer_loop=args.layer_loop)
  return run_peer(p, args.method, args.steps, args.model_dir, args.threads, dtype=args.dtype)


def spawn(args, side: str, method: str, dtype: str, model_dir: str, profile: str = "") -> dict:
  cmd = [sys.executable, os.path.abspath(__file__), "--worker", side, "--method", method, "--preset", args.preset,
         "--steps", str(args.steps), "--dtype", dtype, "--model_dir", model_dir, "--threads", str(args.threads),
         "--remat", args.remat, "--attention", args.attention, "--layer_loop", args.layer_loop,
         "--batch", str(args.batch), "--profile", profile]
  out = subprocess.run(cmd, capture_output=True, text=True)
  if out.returncode:
    raise RuntimeError(f"{side} {method} failed:\n{out.stderr[-3000:]}")
  return json.loads(out.stdout.strip().splitlines()[-1])


def add_mfu(row: dict, p: Preset, peaks: dict[str, float]) -> dict:
  flops = train_flops_per_token(p, row["method"]) * row["tokens_per_sec"]
  return dict(row, model_flops=flops, mfu=flops / peaks[row["dtype"]])


def median_rows(rows: list[dict]) -> list[dict]:
  """Per (side, method, dtype), the round with the median tokens/s, first-seen order."""
  groups: dict[tuple, list[dict]] = {}
  for r in rows:
    groups.setdefault((r["side"], r["method"], r["dtype"]), []).append(r)
  return [sorted(g, key=lambda r: r["tokens_per_sec"])[len(g) // 2] for g in groups.values()]


def table(rows: list[dict], peaks: dict[str, float]) -> str:
  lines = ["matmul peak: " + ", ".join(f"{d} {v / 1e9:,.1f} GFLOP/s" for d, v in peaks.items()),
           f"{'side':8} {'method':6} {'dtype':8} {'tok/s':>9} {'MFU':>6} {'RSS MB':>8} {'compile s':>9} "
           f"{'1st step s':>10} {'1st loss':>9} {'faults/step':>11}"]
  for r in rows:
    lines.append(f"{r['side']:8} {r['method']:6} {r['dtype']:8} {r['tokens_per_sec']:9,.0f} "
                 f"{r['mfu']:6.3f} {r['peak_rss_mb']:8,.0f} {r['compile_s']:9.2f} {r['first_step_s']:10.2f} "
                 f"{r['first_loss']:9.5f} {r['faults_per_step']:11,.0f}")
  by = {(r["side"], r["method"], r["dtype"]): r for r in rows}
  pairs = [(m, d, d) for d in peaks for m in ("full", "lora", "dora", "qlora")]
  pairs += [(m, "bfloat16", "float32") for m in ("full", "lora", "dora", "qlora")]  # jaxtune mixed precision vs HF's default
  for method, ours_dtype, peer_dtype in pairs:
    j, q = by.get(("jaxtune", method, ours_dtype)), by.get(("peer", method, peer_dtype))
    if j and q:
      lines.append(f"{method} {ours_dtype} vs peer {peer_dtype}: jaxtune/peer tokens/s "
                   f"{j['tokens_per_sec'] / q['tokens_per_sec']:.2f}x, RSS {j['peak_rss_mb'] / q['peak_rss_mb']:.2f}x, "
                   f"MFU {j['mfu']:.3f} vs {q['mfu']:.3f}")
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--methods", default="full,lora")
  parser.add_argument("--sides", default="jaxtune,peer")
  parser.add_argument("--dtype", default="float32,bfloat16",
                      help="precisions to compare, comma-separated (see the module docstring)")
  parser.add_argument("--threads", type=int, default=2, help="torch threads for the peer")
  parser.add_argument("--remat", default="dots",
                      help="jaxtune's train.remat_policy ('' = train.remat off); dots is the fastest on CPU")
  parser.add_argument("--attention", default="auto", help="jaxtune's model.attention (auto: cuDNN on a GPU in bf16)")
  parser.add_argument("--layer_loop", default="auto", choices=("auto", "scan", "unrolled"), help="jaxtune's model.layer_loop (auto: unrolled on a GPU)")
  parser.add_argument("--batch", type=int, default=0, help="rows per batch instead of the preset's")
  parser.add_argument("--peak_tflops", type=float, default=0.0, help="MFU against this instead of a measured peak")
  parser.add_argument("--rounds", type=int, default=3,
                      help="runs of every row, interleaved; the table shows each row's median tokens/s")
  parser.add_argument("--json", default="", help="also write the rows (every round) here")
  parser.add_argument("--profile", default="", help="trace 3 extra jaxtune steps per row of the first round "
                      "into DIR/METHOD_DTYPE and print each one's top ops (jaxtune/profiling.py)")
  parser.add_argument("--worker", choices=("jaxtune", "peer", "model"), help=argparse.SUPPRESS)
  parser.add_argument("--method", default="full", help=argparse.SUPPRESS)
  parser.add_argument("--model_dir", default="", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.worker == "jaxtune":  # as train.py starts (the peer's worker must not import jaxtune: its RSS)
    from jaxtune import huge_pages
    huge_pages.restart_with_huge_pages()
  if args.worker:
    print(json.dumps(run_worker(args)), flush=True)
    return
  p = preset(args)
  sides, methods, dtypes = args.sides.split(","), args.methods.split(","), args.dtype.split(",")
  peaks = {d: args.peak_tflops * 1e12 or measure_matmul_peak(dtype=d) for d in dtypes}
  print(f"load average before: {os.getloadavg()}", flush=True)
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    model_dir = spawn(args, "model", "", "", os.path.join(tmp, "model"))["model_dir"] if "peer" in sides else ""
    for round_ in range(args.rounds):  # interleaved, so a noisy minute hits every row alike
      for dtype in dtypes:
        for method in methods:
          for side in sides:
            traced = os.path.join(os.path.abspath(args.profile), f"{method}_{dtype}")
            traced = traced if args.profile and side == "jaxtune" and round_ == 0 else ""
            rows.append(add_mfu(spawn(args, side, method, dtype, model_dir, traced), p, peaks))
            print(json.dumps(rows[-1]), flush=True)
            if traced:
              with open(os.path.join(traced, "top_ops.txt")) as f:
                print(f"jaxtune {method} {dtype}, profile in {traced}:\n" + "".join(f.readlines()[:22]), flush=True)
  if not args.peak_tflops:
    peaks = {d: max(v, measure_matmul_peak(dtype=d)) for d, v in peaks.items()}  # the quieter of two
    rows = [add_mfu(r, p, peaks) for r in rows]
  print(f"load average after: {os.getloadavg()}", flush=True)
  print(table(median_rows(rows), peaks))
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"peak_flops": peaks, "rows": rows, "loadavg": os.getloadavg()}, f, indent=2)


if __name__ == "__main__":
  main()
