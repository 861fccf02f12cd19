#!/usr/bin/env bash
# GPU check: jaxtune's jitted train step on a ~1B Llama (Llama-3.2-1B shape: 16 layers, hidden 2048,
# 32/8 heads, vocab 128256) in bfloat16 compute (float32 master weights), a few AdamW steps, full
# and LoRA, side by side with the Hugging Face peer (transformers + peft, CUDA autocast) on the same
# GPU; prints tokens/s and MFU against the H100's 989 TFLOP/s bf16 dense peak (target >= 0.50).
#
#   bash scripts/gpu_check.sh          # on a GPU machine (installs jax[cuda12] if JAX sees no GPU)
#   bash scripts/gpu_check.sh --tiny   # dry run of the same path on CPU with a tiny model
#
# Env: PEAK_TFLOPS (default 989, H100 SXM bf16 dense), STEPS (default 10), METHODS (default full,lora),
# SIDES (default jaxtune,peer), BATCH (rows of 1024 tokens, default 8), ATTENTION (jaxtune's
# model.attention, default auto = cuDNN flash attention), REMAT (train.remat_policy, "" = off;
# default dots), JSON (where the rows go, default a temporary file), PROFILE (a folder: also trace
# 3 jaxtune steps per method there and print the step's top ops).
set -euo pipefail
cd "$(dirname "$0")/.."

PEAK_TFLOPS="${PEAK_TFLOPS:-989}"
STEPS="${STEPS:-10}"
METHODS="${METHODS:-full,lora}"
SIDES="${SIDES:-jaxtune,peer}"
BATCH="${BATCH:-8}"
ATTENTION="${ATTENTION:-auto}"
REMAT="${REMAT-dots}"
JSON="${JSON:-$(mktemp -d)/gpu_check.json}"

if [[ "${1:-}" == "--tiny" ]]; then
  preset=tiny
  STEPS=2
  BATCH=2
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

python scripts/benchmark.py --preset "$preset" --sides "$SIDES" --methods "$METHODS" --steps "$STEPS" \
  --rounds 1 --dtype bfloat16 --peak_tflops "$PEAK_TFLOPS" --batch "$BATCH" --attention "$ATTENTION" \
  --remat "$REMAT" --json "$JSON" --profile "${PROFILE:-}"

python - "$JSON" <<'PY'
import json, sys
rows = json.load(open(sys.argv[1]))["rows"]
for r in rows:
  verdict = "PASS" if r["mfu"] >= 0.5 else "below target"
  print(f"{r['side']} {r['method']}: {r['tokens_per_sec']:,.0f} tok/s on {r['device']} (batch {r['batch']}, "
        f"attention {r['attention']}), MFU {r['mfu']:.1%}" + (f" (target >= 50%: {verdict})" if r["side"] == "jaxtune" else ""))
PY
