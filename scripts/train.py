"""Fine-tune a model: python scripts/train.py --config configs/NAME.py --workdir DIR [--config.KEY=VALUE ...]"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # configs/ imports

from absl import app, flags, logging
from ml_collections import config_flags

from jaxtune.cli import fail_cleanly

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a configs/*.py file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder (resumes from its newest checkpoint).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0 (multi-host).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (multi-host).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  from jaxtune import sharding, trainer
  from jaxtune.config_checks import check_config
  sharding.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  config = _CONFIG.value
  with fail_cleanly():
    check_config(config)
    trainer.run(config, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
