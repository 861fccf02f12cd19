#!/usr/bin/env bash
# Shows the training logs of the workers:
#   tpu/logs.sh              last TAIL_LINES lines of worker WORKER's log (default 0, "all" for every one)
#   tpu/logs.sh -f           the same, following it (Ctrl-C stops following, not the job)
#   tpu/logs.sh --copy DIR   copies every worker's train-HOST.log into DIR
# Process 0 also writes WORKDIR/metrics.jsonl (e.g. gcloud storage cat gs://.../metrics.jsonl).
# shellcheck source-path=SCRIPTDIR
source "$(dirname "$0")/common.sh"
case ${1:-} in
  --copy) dest=${2:?usage: $0 --copy DIR}
    run mkdir -p "$dest"
    tpu_scp_from "$LOG_DIR/train-*.log" "$dest/" ;;
  -f|"") tpu_ssh "${WORKER:-0}" "tail -n ${TAIL_LINES:-100}${1:+ -f} $LOG_DIR/train-*.log" ;;
  *) die "unknown argument $1 (expected -f or --copy DIR)" ;;
esac
