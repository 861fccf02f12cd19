#!/usr/bin/env bash
# Creates the TPU VM, or with QUEUED=1 a queued resource, for ACCELERATOR (see common.sh).
#   ACCELERATOR=v5p-64 CAPACITY=spot QUEUED=1 tpu/create.sh
# shellcheck source-path=SCRIPTDIR
source "$(dirname "$0")/common.sh"
tpu_create
