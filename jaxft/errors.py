"""Project exception types; entry points turn these into one line and exit status 2."""


class JaxftError(Exception):
  """Base class of every error a user can cause and fix."""


class ConfigError(JaxftError):
  """A config key has a bad value, or config values contradict each other."""


class DataError(JaxftError):
  """A dataset file, row or field is malformed."""


class CheckpointError(JaxftError):
  """A model directory, checkpoint or workdir cannot be read as asked."""
