"""Shared script behaviour: bad input ends with ONE clear line on stderr (`error: ...`) and exit code 2.

  app.run(exit_on_user_error(main), flags_parser=parse_flags)
"""

from __future__ import annotations

import functools
import sys
from typing import Callable, NoReturn

from absl import flags

USAGE_EXIT = 2  # what argparse and absl use for a usage error

# What a user can get wrong (paths, flags, configs, data, checkpoints, a diverging run: ConfigError,
# DataError, RecordError, CheckpointMismatchError, UnsupportedModelError are ValueErrors). Anything
# else is a bug and keeps its traceback.
USER_ERRORS = (OSError, ValueError, KeyError, FloatingPointError)


def fail(message: str) -> NoReturn:
  print(f"error: {message.strip().splitlines()[0] if message.strip() else 'failed'}", file=sys.stderr, flush=True)
  sys.exit(USAGE_EXIT)


def message_of(e: BaseException) -> str:
  # KeyError's str() quotes its message; its first arg is the message itself.
  return str(e.args[0] if isinstance(e, KeyError) and e.args else e) or type(e).__name__


def exit_on_user_error(main: Callable[[list[str]], None]) -> Callable[[list[str]], None]:
  """Wraps a script's main: a user error prints `error: <first line>` and exits 2."""

  @functools.wraps(main)
  def wrapped(argv):
    try:
      main(argv)
    except USER_ERRORS as e:
      fail(message_of(e))

  return wrapped


def _unknown_override(argv: list[str], e: BaseException) -> str | None:
  """config_flags raises a KeyError/AttributeError naming only the last part of an unknown key."""
  while not isinstance(e, KeyError) and (e.__context__ or e.__cause__):
    e = e.__context__ or e.__cause__
  lines = message_of(e).splitlines()
  name, hint = lines[0].strip("'\""), " ".join(lines[1:])
  for arg in argv[1:]:
    key = arg.lstrip("-").split("=", 1)[0]
    if key.startswith("config.") and name in key.split("."):
      return f"--{key}: unknown config key {name!r}" + (f" ({hint})" if hint else "")
  return None


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing (for app.run's flags_parser), every failure as one line: unknown flags or
  config keys, wrong types, missing required flags, a config file that does not load."""
  try:
    rest = flags.FLAGS(argv)
  except flags.Error as e:  # wrong type, missing value, unknown flag, a config file that raised
    fail(_flag_error(str(e)))
  except (AttributeError, KeyError) as e:  # an override of a key the (locked) config does not have
    fail(_unknown_override(argv, e) or _config_file_error(e))
  except Exception as e:  # the config file does not load, or raised (SyntaxError, ...)
    fail(_config_file_error(e))
  if "config" in flags.FLAGS:  # config_flags keeps a failure to load the file until first use
    try:
      flags.FLAGS["config"].value.keys()
    except Exception as e:
      fail(_config_file_error(e))
  return rest


def _flag_error(message: str) -> str:
  """absl's message, or for a config file that raised (a traceback in the message): its first line,
  the exception line and the innermost frame."""
  lines = message.strip().splitlines()
  frames = [i for i, line in enumerate(lines) if line.strip().startswith('File "')]
  if "Traceback (most recent call last):" not in message or not frames:
    return lines[0]
  error = next((line for line in lines[frames[-1] + 1:] if line and not line[0].isspace()), "")
  return f"{lines[0].rstrip(':')}: {error} ({lines[frames[-1]].strip()})"


def _config_file_error(e: BaseException) -> str:
  while e.__cause__ is not None:
    e = e.__cause__
  lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
  return f"--config: cannot load: {type(e).__name__}: {lines[-1]}"
