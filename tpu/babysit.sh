#!/usr/bin/env bash
# Keeps a job running on a preemptible slice: polls the VM (or queued resource) state; when it is
# gone (preempted, suspended, failed, deleted) deletes and re-creates it; when it is up, sets it up
# and (re)launches the job, which resumes from WORKDIR. Exits when the job finishes, or after
# MAX_FAILURES job failures on a healthy VM (a bug, not a preemption).
#   CAPACITY=spot QUEUED=1 tpu/babysit.sh configs/NAME.py gs://BUCKET/runs/NAME [--config.KEY=VALUE ...]
# shellcheck source-path=SCRIPTDIR
source "$(dirname "$0")/common.sh"
(( $# >= 2 )) || die "usage: $0 CONFIG WORKDIR [--config.KEY=VALUE ...]"
POLL_SECONDS=${POLL_SECONDS:-60} MAX_FAILURES=${MAX_FAILURES:-3} MAX_POLLS=${MAX_POLLS:-100000}
failures=0
for ((poll = 1; poll <= MAX_POLLS; poll++)); do
  state=$(tpu_state)
  echo "babysit: $(date -u +%FT%TZ) $TPU_NAME: $state" >&2
  case $state in
    READY|ACTIVE)
      "$TPU_DIR/setup.sh" && "$TPU_DIR/run.sh" "$@" && { echo "babysit: job finished" >&2; exit 0; }
      # A preempted worker also kills the job: only count failures while the slice stays up.
      sleep "$POLL_SECONDS"
      if [[ $(tpu_state) =~ ^(READY|ACTIVE)$ ]] && ((++failures >= MAX_FAILURES)); then
        die "the job failed $failures times on a healthy $TPU_NAME; see tpu/logs.sh"
      fi
      continue ;;
    PREEMPTED|TERMINATED|STOPPED|SUSPENDED|FAILED|NOT_FOUND)
      tpu_delete || true  # already gone is fine
      tpu_create || echo "babysit: create failed, retrying" >&2 ;;
  esac  # anything else (CREATING, WAITING_FOR_RESOURCES, PROVISIONING, UNKNOWN...): wait
  sleep "$POLL_SECONDS"
done
die "still not finished after $MAX_POLLS polls"
