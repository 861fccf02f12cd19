#!/usr/bin/env bash
# Puts the repository on every worker (a copy of this checkout, or a clone of REPO_URL) and runs
# worker_setup.sh there. Idempotent: re-run it after every code change or VM re-creation.
# shellcheck source-path=SCRIPTDIR
source "$(dirname "$0")/common.sh"
if [[ -n $REPO_URL ]]; then
  fetch="if [ -d $REMOTE_DIR/.git ]; then git -C $REMOTE_DIR pull --ff-only; else git clone $REPO_URL $REMOTE_DIR; fi"
else
  # Tracked and untracked-but-not-ignored files: what `git status` would commit, no build junk.
  tarball=${TMPDIR:-/tmp}/jaxtune-$TPU_NAME.tgz files=${TMPDIR:-/tmp}/jaxtune-$TPU_NAME.files
  if ! git -C "$REPO_ROOT" ls-files -z -co --exclude-standard > "$files" 2>/dev/null; then
    (cd "$REPO_ROOT" && find . -name __pycache__ -prune -o -type f -print0) > "$files"  # not a git checkout
  fi
  run tar -czf "$tarball" -C "$REPO_ROOT" --null -T "$files"
  tpu_scp_to "$tarball" jaxtune.tgz
  fetch="mkdir -p $REMOTE_DIR && tar -xzf jaxtune.tgz -C $REMOTE_DIR"
fi
tpu_ssh all "$fetch && bash $REMOTE_DIR/tpu/worker_setup.sh"
