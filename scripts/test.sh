#!/usr/bin/env bash
# README command two: install what the tests need (idempotent), then run the whole suite, on up to
# 4 worker processes (pytest-xdist; most of a test is single-threaded XLA compilation; worksteal: an
# idle worker takes queued tests from a busy one, so no core idles behind a few long tests). Extra
# arguments go to pytest: `-n 0` runs in one process.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh --test
exec "${PYTHON:-python3}" -m pytest -q -p no:cacheprovider -n auto --maxprocesses 4 --dist worksteal tests "$@"
