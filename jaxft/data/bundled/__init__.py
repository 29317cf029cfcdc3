"""Small datasets shipped with jaxft (written by jaxft's authors, for the quickstart and tests)."""

import os


def path(name: str) -> str:
  """Absolute path of a bundled data file."""
  return os.path.join(os.path.dirname(os.path.abspath(__file__)), name)
