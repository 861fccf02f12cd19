#!/usr/bin/env bash
# Runs ON each TPU worker (setup.sh calls it): a Python venv with jaxtune[tpu] installed from the
# copy of the repository this script sits in. Skips whatever is already done.
# shellcheck source-path=SCRIPTDIR
source "$(dirname "$0")/common.sh"
cd "$REPO_ROOT"
venv=$HOME/$VENV
if [[ ! -x $venv/bin/python ]]; then
  # uv fetches a standalone CPython: the TPU images' python3 (3.10) is older than jax supports.
  run python3 -m pip install --user --quiet --upgrade uv
  run python3 -m uv venv --python "$PYTHON_VERSION" "$venv"
fi
stamp=$venv/.jaxtune-pyproject.toml
if ! cmp -s pyproject.toml "$stamp"; then  # reinstall only when the dependencies changed
  run python3 -m uv pip install --python "$venv/bin/python" -e '.[tpu]'
  run cp pyproject.toml "$stamp"
fi
run "$venv/bin/python" -c 'import jax; print(jax.process_index(), jax.device_count(), jax.devices()[0].device_kind)'
