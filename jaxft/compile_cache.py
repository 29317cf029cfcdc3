"""The persistent compilation cache: a resumed or repeated run loads its compiled steps instead of
compiling them again (minutes for a large model on a TPU host).

`train.compile_cache`: empty = JAX's own JAX_COMPILATION_CACHE_DIR when the environment sets it,
else WORKDIR/compile_cache; `none` = off; else a directory (one cache may serve several workdirs of
the same model). Only directories one trusts: JAX loads executables from it."""

from __future__ import annotations

import os

import jax
from jax.experimental.compilation_cache import compilation_cache as cc

from jaxft.errors import ConfigError


def cache_dir(setting: str, workdir: str) -> str | None:
  """The cache directory `train.compile_cache` names for `workdir` (None: off)."""
  if setting.strip().lower() == "none":
    return None
  default = os.environ.get("JAX_COMPILATION_CACHE_DIR") or os.path.join(workdir, "compile_cache")
  return os.path.abspath(setting or default)


def use(setting: str, workdir: str) -> str | None:
  """Points JAX's persistent cache at cache_dir(setting, workdir), creating it; returns it.
  Raises ConfigError naming train.compile_cache when it cannot be made."""
  path = cache_dir(setting, workdir)
  if path is None:
    return None
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    raise ConfigError(f"train.compile_cache={setting!r}: cannot create {path} ({e})") from None
  if jax.config.jax_compilation_cache_dir != path:
    cc.reset_cache()  # (JAX decides once per process whether a cache is used; decide again)
    cc.set_cache_dir(path)
  # Every compile is kept: the train step's is the one that matters, and small ones cost little.
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  return path
