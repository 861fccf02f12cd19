# Shared settings for the tpu/ scripts (sourced). Override any of them from the environment:
#   TPU_NAME=my-run ACCELERATOR=v5p-64 CAPACITY=spot QUEUED=1 DRY_RUN=1 tpu/create.sh
# shellcheck shell=bash disable=SC2034  # the settings are used by the scripts that source this
set -euo pipefail

TPU_NAME=${TPU_NAME:-jaxtune}
ACCELERATOR=${ACCELERATOR:-v5litepod-8}   # v4-8, v4-32, v5litepod-16, v5p-64, v6e-8, ...
CAPACITY=${CAPACITY:-on-demand}           # on-demand | spot | preemptible (VM only) | reserved
QUEUED=${QUEUED:-0}                       # 1: request through a queued resource
SLICES=${SLICES:-1}                       # > 1: multislice (QUEUED=1), VMs $TPU_NAME-0 ... $TPU_NAME-(SLICES-1)
QR_ID=${QR_ID:-$TPU_NAME-qr}
PROJECT=${PROJECT:-}                      # empty: gcloud's configured project
CREATE_FLAGS=${CREATE_FLAGS:-}            # extra create flags, e.g. "--service-account=SA --network=N"
DRY_RUN=${DRY_RUN:-0}                     # 1: print the commands instead of running them
# On the workers, relative to the home directory:
REMOTE_DIR=${REMOTE_DIR:-jaxtune}         # the repository copy
VENV=${VENV:-jaxtune-venv}
LOG_DIR=${LOG_DIR:-jaxtune-logs}
PYTHON_VERSION=${PYTHON_VERSION:-3.11}    # the TPU images ship 3.10; jax needs newer
REPO_URL=${REPO_URL:-}                    # set: workers git-clone it; empty: copy this checkout

TPU_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(dirname "$TPU_DIR")

die() { echo "$(basename "$0"): $*" >&2; exit 1; }

# Runtime image and a zone that has the chips, per generation (docs: TPU software versions, regions).
case $ACCELERATOR in
  v4-*) RUNTIME=${RUNTIME:-tpu-ubuntu2204-base}; ZONE=${ZONE:-us-central2-b} ;;
  v5litepod-*) RUNTIME=${RUNTIME:-v2-alpha-tpuv5-lite}; ZONE=${ZONE:-us-west4-a} ;;
  v5p-*) RUNTIME=${RUNTIME:-v2-alpha-tpuv5}; ZONE=${ZONE:-us-east5-a} ;;
  v6e-*) RUNTIME=${RUNTIME:-v2-alpha-tpuv6e}; ZONE=${ZONE:-us-east5-b} ;;
  *) die "ACCELERATOR=$ACCELERATOR is not a v4-N, v5litepod-N, v5p-N or v6e-N slice" ;;
esac

# Prints a command, shell-quoted only where needed, so it can be pasted back.
show() {
  local arg out=()
  for arg in "$@"; do
    if [[ $arg =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then out+=("$arg"); else out+=("${arg@Q}"); fi
  done
  echo "${out[*]}"
}

run() { if [[ $DRY_RUN == 1 ]]; then show "$@"; else "$@"; fi; }

tpu() { run gcloud compute tpus "$@" --zone="$ZONE" ${PROJECT:+"--project=$PROJECT"}; }

tpu_nodes() {  # the TPU VMs: TPU_NAME, or one per slice as a multislice queued resource names them
  if ((SLICES > 1)); then seq -f "$TPU_NAME-%g" 0 $((SLICES - 1)); else echo "$TPU_NAME"; fi
}

each_slice() {  # each_slice FUNCTION ARGS...: FUNCTION NODE ARGS... for every VM, all at once (dry runs: in order)
  local node pids=() pid status=0
  for node in $(tpu_nodes); do
    if [[ $DRY_RUN == 1 ]] || ((SLICES == 1)); then "$1" "$node" "${@:2}" || status=$?
    else "$1" "$node" "${@:2}" & pids+=($!); fi
  done
  for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
  return "$status"
}

_ssh() {
  tpu tpu-vm ssh "$1" --worker="$2" --command="$3" \
    --ssh-flag=-oServerAliveInterval=60 --ssh-flag=-oServerAliveCountMax=5
}

tpu_ssh() {  # tpu_ssh WORKER COMMAND: WORKER is a worker index or "all" (of every slice)
  each_slice _ssh "$@"
}

_scp_to() { tpu tpu-vm scp "$2" "$1:$3" --worker=all; }
_scp_from() { tpu tpu-vm scp "$1:$2" "$3" --worker=all; }

tpu_scp_to() {  # tpu_scp_to LOCAL REMOTE: to every worker of every slice
  each_slice _scp_to "$@"
}

tpu_scp_from() {  # tpu_scp_from REMOTE LOCAL_DIR: from every worker of every slice
  each_slice _scp_from "$@"
}

tpu_create() {
  local flags=(--accelerator-type="$ACCELERATOR") extra
  read -ra extra <<< "$CREATE_FLAGS"
  case $CAPACITY in
    on-demand) ;;
    spot|reserved) flags+=("--$CAPACITY") ;;
    preemptible) [[ $QUEUED == 1 ]] && die "queued resources take CAPACITY=spot, not preemptible"
      flags+=(--preemptible) ;;
    *) die "CAPACITY=$CAPACITY is not on-demand, spot, preemptible or reserved" ;;
  esac
  if ((SLICES > 1)); then
    [[ $QUEUED == 1 ]] || die "SLICES=$SLICES needs QUEUED=1: multislice comes as a queued resource"
    tpu queued-resources create "$QR_ID" --node-count="$SLICES" --node-prefix="$TPU_NAME" \
      --runtime-version="$RUNTIME" "${flags[@]}" "${extra[@]}"
  elif [[ $QUEUED == 1 ]]; then
    tpu queued-resources create "$QR_ID" --node-id="$TPU_NAME" --runtime-version="$RUNTIME" \
      "${flags[@]}" "${extra[@]}"
  else
    tpu tpu-vm create "$TPU_NAME" --version="$RUNTIME" "${flags[@]}" "${extra[@]}"
  fi
}

tpu_delete() {
  if [[ $QUEUED == 1 ]]; then
    tpu queued-resources delete "$QR_ID" --force --quiet  # --force also deletes its TPU VM
  else
    tpu tpu-vm delete "$TPU_NAME" --quiet
  fi
}

# Prints READY/ACTIVE, CREATING, PREEMPTED, SUSPENDED, ..., NOT_FOUND, or UNKNOWN when gcloud
# itself failed (a network error must not look like a lost VM). Dry runs print DRY_RUN_STATE.
tpu_state() {
  local args=(tpu-vm describe "$TPU_NAME" '--format=value(state)') out
  [[ $QUEUED == 1 ]] && args=(queued-resources describe "$QR_ID" '--format=value(state.state)')
  if [[ $DRY_RUN == 1 ]]; then tpu "${args[@]}" >&2; echo "${DRY_RUN_STATE:-READY}"; return; fi
  if out=$(tpu "${args[@]}" 2>&1); then echo "$out"
  elif [[ $out == *NOT_FOUND* ]]; then echo NOT_FOUND
  else echo UNKNOWN; fi
}
