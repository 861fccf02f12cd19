#!/usr/bin/env bash
# Deletes the TPU VM (or the queued resource and its VM): stops the billing.
# shellcheck source-path=SCRIPTDIR
source "$(dirname "$0")/common.sh"
tpu_delete
