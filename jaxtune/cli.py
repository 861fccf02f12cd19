"""Shared script behaviour: bad input ends with ONE clear line on stderr and a non-zero exit."""

from __future__ import annotations

import contextlib
import sys

from jaxtune.checkpoint import CheckpointMismatchError
from jaxtune.config_checks import ConfigError
from jaxtune.data.formats import RecordError
from jaxtune.models.config import UnsupportedModelError

USER_ERRORS = (ConfigError, CheckpointMismatchError, RecordError, UnsupportedModelError,
               FileNotFoundError, FloatingPointError)


def user_errors() -> tuple[type[BaseException], ...]:
  from jaxtune.data.sources import DataError
  return USER_ERRORS + (DataError,)


@contextlib.contextmanager
def fail_cleanly():
  """Turns the errors a user can fix into `error: <message>` and exit code 2."""
  try:
    yield
  except user_errors() as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(2)
