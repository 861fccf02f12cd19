#!/usr/bin/env bash
# README command two: install what the tests need (idempotent), then run the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh --test
exec "${PYTHON:-python3}" -m pytest -q -p no:cacheprovider tests "$@"
