"""scripts/train.py that kills itself (SIGKILL) right after the async checkpoint save of step N began.

usage: python tests/crash_in_save.py N LISTING_FILE [train.py flags ...]
Before dying it writes the checkpoint folder's entries to LISTING_FILE (JSON), so a test can see
that the save of step N was still in flight (no finished `N` folder yet).
"""

import json
import os
import runpy
import signal
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def main(crash_step: int, listing_file: str, argv: list[str]):
  from jaxtune import checkpoint
  original = checkpoint.save

  def save_then_die(manager, step, *args, **kwargs):
    saved = original(manager, step, *args, **kwargs)
    if step == crash_step:  # Orbax is writing in a background thread now
      with open(listing_file, "w") as f:
        json.dump(sorted(os.listdir(manager.directory)), f)
      os.kill(os.getpid(), signal.SIGKILL)
    return saved

  checkpoint.save = save_then_die
  sys.argv = [os.path.join(HERE, "..", "scripts", "train.py")] + argv
  runpy.run_path(sys.argv[0], run_name="__main__")


if __name__ == "__main__":
  main(int(sys.argv[1]), sys.argv[2], sys.argv[3:])
