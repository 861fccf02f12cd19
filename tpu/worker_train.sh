#!/usr/bin/env bash
# Runs ON each TPU worker (run.sh calls it): scripts/train.py, its output appended to
# ~/$LOG_DIR/train-HOST.log. On a TPU VM train.py initializes jax.distributed by itself.
# shellcheck source-path=SCRIPTDIR
source "$(dirname "$0")/common.sh"
(( $# >= 2 )) || die "usage: $0 CONFIG WORKDIR [--config.KEY=VALUE ...]"
config=$1 workdir=$2
shift 2
cd "$REPO_ROOT"
mkdir -p "$HOME/$LOG_DIR"
pid_file=$HOME/$LOG_DIR/train.pid
# A job left over from a dropped ssh session still holds the TPU: stop it first (checking the
# command line, since a pid from an old file may have been reused by something else).
old=$(cat "$pid_file" 2>/dev/null || true)
if [[ -n $old && $(ps -o args= -p "$old" || true) == *scripts/train.py* ]]; then
  run kill "$old"
  # A minute to exit cleanly (it may be saving a checkpoint), then force it.
  for ((i = 0; i < 60 && DRY_RUN != 1; i++)); do kill -0 "$old" 2>/dev/null || break; sleep 1; done
  run kill -9 "$old" 2>/dev/null || true
fi
train=("$HOME/$VENV/bin/python" scripts/train.py --config "$config" --workdir "$workdir" "$@")
if [[ $DRY_RUN == 1 ]]; then show "${train[@]}"; exit 0; fi
export PYTHONUNBUFFERED=1
"${train[@]}" > >(tee -a "$HOME/$LOG_DIR/train-$(hostname).log") 2>&1 &
echo $! > "$pid_file"  # python's own pid (a plain command started with & is exec'd)
wait $!
