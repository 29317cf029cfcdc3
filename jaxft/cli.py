"""What every entry point shares: flag parsing and project errors as one line with exit status 2."""

from __future__ import annotations

import logging
import re
import sys

from absl import app, flags

from jaxft.errors import JaxftError


def _parse_flags(argv):
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:  # a value of the wrong type, a missing flag, an unknown flag
    _fail(str(e))
  except JaxftError as e:  # raised by a config file itself (a bad variant argument)
    _fail(str(e))
  except (AttributeError, KeyError) as e:  # ml_collections: an unknown --config.KEY (locked config)
    text = str(e)
    key = re.search(r"'(\w+)", text)
    key = key.group(1) if key else "?"
    hint = re.search(r'Did you mean "(\w+)"', text)
    bad = [a.split("=")[0] for a in argv[1:] if a.startswith("--config.") and key in a]
    _fail(f"unknown config key {bad[0] if bad else key!r}"
          + (f" (did you mean {hint.group(1)!r}?)" if hint else ""))


def _fail(message: str):
  print(f"jaxft: error: {message}", file=sys.stderr, flush=True)
  sys.exit(2)


class _QuietLibraries(logging.Filter):
  """Drops the INFO chatter of Orbax and friends; their warnings and errors still show."""

  def filter(self, record):
    return record.levelno >= logging.WARNING or "orbax" not in record.pathname


def run(main_fn):
  """app.run(main_fn) where a JaxftError becomes 'jaxft: error: ...' on stderr and exit status 2."""

  def wrapped(argv):
    for h in logging.getLogger().handlers + logging.getLogger("absl").handlers:
      h.addFilter(_QuietLibraries())
    try:
      main_fn(argv)
    except JaxftError as e:
      _fail(str(e))

  app.run(wrapped, flags_parser=_parse_flags)
