"""What every entry point shares: flag parsing and project errors as one line with exit status 2."""

from __future__ import annotations

import logging
import sys

from absl import app, flags

from jaxft.errors import JaxftError


def _parse_flags(argv):
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:  # an unknown --config.KEY, a value of the wrong type, a missing flag
    print(f"jaxft: error: {e}", file=sys.stderr, flush=True)
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
      print(f"jaxft: error: {e}", file=sys.stderr, flush=True)
      sys.exit(2)

  app.run(wrapped, flags_parser=_parse_flags)
