#!/usr/bin/env bash
# GPU check: jaxtune's jitted train step on a ~1B Llama (Llama-3.2-1B shape: 16 layers, hidden 2048,
# 32/8 heads, vocab 128256) in bfloat16 compute (float32 master weights), a few AdamW steps, full
# and LoRA: first jaxtune alone at BATCH rows (MFU against the H100's 989 TFLOP/s bf16 dense peak,
# target >= 0.50), then side by side with the Hugging Face peer (transformers + peft, CUDA autocast)
# at PEER_BATCH rows, a batch the peer fits in 80 GB; prints tokens/s and MFU of every row.
#
#   bash scripts/gpu_check.sh          # on a GPU machine (installs jax[cuda12] if JAX sees no GPU)
#   bash scripts/gpu_check.sh --tiny   # dry run of the same path on CPU with a tiny model
#
# Env: PEAK_TFLOPS (default 989, H100 SXM bf16 dense), STEPS (default 10), METHODS (default full,lora),
# SIDES (default jaxtune,peer; jaxtune alone skips the side-by-side run), BATCH (rows of 1024
# tokens, default 32), PEER_BATCH (default 8; 0 skips the side-by-side run), ATTENTION (jaxtune's
# model.attention, default auto = cuDNN flash attention), LAYER_LOOP (model.layer_loop, default
# auto = unrolled on a GPU), REMAT (train.remat_policy, "" = off; default dots), JSON (where the rows
# go: JSON and JSON.peer.json; default a temporary file), PROFILE (a folder: also trace 3 jaxtune
# steps per method of the first run there and print the step's top ops).
set -euo pipefail
cd "$(dirname "$0")/.."

PEAK_TFLOPS="${PEAK_TFLOPS:-989}"
STEPS="${STEPS:-10}"
METHODS="${METHODS:-full,lora}"
SIDES="${SIDES:-jaxtune,peer}"
BATCH="${BATCH:-32}"
PEER_BATCH="${PEER_BATCH:-8}"
ATTENTION="${ATTENTION:-auto}"
LAYER_LOOP="${LAYER_LOOP:-auto}"
REMAT="${REMAT-dots}"
JSON="${JSON:-$(mktemp -d)/gpu_check.json}"

if [[ "${1:-}" == "--tiny" ]]; then
  preset=tiny
  STEPS=2
  BATCH=2
  [[ "$PEER_BATCH" == 0 ]] || PEER_BATCH=2
else
  preset=1b
  if ! python -c "import jax, sys; sys.exit(jax.default_backend() != 'gpu')" 2>/dev/null; then
    # Same JAX version as installed, with the CUDA 12 plugin (keeps jaxtune's pinned jax).
    version="$(python -c 'import jax; print(jax.__version__)')"
    python -m pip install "jax[cuda12]==${version}"
  fi
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
  export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}"
fi

run() {  # sides batch json [benchmark flags]
  python scripts/benchmark.py --preset "$preset" --sides "$1" --methods "$METHODS" --steps "$STEPS" --rounds 1 \
    --dtype bfloat16 --peak_tflops "$PEAK_TFLOPS" --batch "$2" --attention "$ATTENTION" --layer_loop "$LAYER_LOOP" \
    --remat "$REMAT" --json "$3" "${@:4}"
}

if [[ "$SIDES" == *jaxtune* ]]; then
  run jaxtune "$BATCH" "$JSON" --profile "${PROFILE:-}"
fi
if [[ "$SIDES" == *peer* && "$PEER_BATCH" != 0 ]]; then
  run "$SIDES" "$PEER_BATCH" "$JSON.peer.json"
fi

python - "$JSON" "$JSON.peer.json" <<'PY'
import json, os, sys
for i, path in enumerate(sys.argv[1:]):
  rows = json.load(open(path))["rows"] if os.path.exists(path) else []
  by = {(r["side"], r["method"]): r for r in rows}
  for r in rows:
    layers = f", layers {r['layer_loop']}" if r["side"] == "jaxtune" else ""
    verdict = f" (target >= 50%: {'PASS' if r['mfu'] >= 0.5 else 'below target'})" if i == 0 else ""
    print(f"{r['side']} {r['method']}: {r['tokens_per_sec']:,.0f} tok/s on {r['device']} (batch {r['batch']}, "
          f"attention {r['attention']}{layers}), peak GPU memory {r.get('peak_device_mb', 0) / 1024:.1f} GiB, "
          f"MFU {r['mfu']:.1%}{verdict}")
  for method in ("full", "lora"):
    if ("jaxtune", method) in by and ("peer", method) in by:
      ratio = by["jaxtune", method]["tokens_per_sec"] / by["peer", method]["tokens_per_sec"]
      print(f"{method}: jaxtune / peer tokens/s {ratio:.2f}x at batch {by['peer', method]['batch']}")
PY
