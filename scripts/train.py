"""Fine-tune a model: python scripts/train.py --config configs/NAME.py --workdir DIR [--config.KEY=VALUE ...]

Rerunning the same command resumes from the newest complete checkpoint in DIR. SIGTERM (a TPU
preemption) or Ctrl-C saves a checkpoint at the current step and exits with 128 + the signal
number (143, 130): not 0, since the run has not finished. Bad flags, config values, data or a
checkpoint that does not fit: one `error: ...` line and exit code 2.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # configs/ imports

from absl import app, flags, logging
from ml_collections import config_flags

from jaxtune import cli, huge_pages

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a configs/*.py file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder (resumes from its newest checkpoint).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0 (multi-host).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (multi-host).")
flags.mark_flags_as_required(["config", "workdir"])


@cli.exit_on_user_error
def main(argv):
  if len(argv) > 1:
    raise ValueError(f"unexpected arguments: {' '.join(argv[1:])}")
  logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  from jaxtune import sharding, trainer
  from jaxtune.config_checks import check_config
  config = _CONFIG.value
  check_config(config)  # before anything starts: no devices, no files
  sharding.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  try:
    trainer.run(trainer.with_absolute_paths(config), _WORKDIR.value)
  except trainer.TrainingInterrupted as e:
    print(e, file=sys.stderr, flush=True)
    sys.exit(e.exit_code)


if __name__ == "__main__":
  huge_pages.restart_with_huge_pages()  # CPU runs: once, before anything is allocated (see its docstring)
  app.run(main, flags_parser=cli.parse_flags)
