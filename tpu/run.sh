#!/usr/bin/env bash
# Runs one training config on all workers at once (the JAX processes of one multi-host job) and
# streams their output; returns when the job ends. The job resumes from WORKDIR by itself.
#   tpu/run.sh configs/NAME.py gs://BUCKET/runs/NAME [--config.KEY=VALUE ...]
# shellcheck source-path=SCRIPTDIR
source "$(dirname "$0")/common.sh"
(( $# >= 2 )) || die "usage: $0 CONFIG WORKDIR [--config.KEY=VALUE ...]"
tpu_ssh all "bash $REMOTE_DIR/tpu/worker_train.sh $(show "$@")"
