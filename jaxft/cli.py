"""What every entry point shares: flag parsing and project errors as one line with exit status 2."""

from __future__ import annotations

import errno
import logging
import os
import re
import sys

from absl import app, flags

from jaxft import configlib
from jaxft.errors import JaxftError


def _config_paths(argv):
  """argv with each --config value resolved (configlib.resolve): `--config=quickstart[:ARG]`
  and, from a checkout, `--config=configs/NAME.py[:ARG]` load the shipped config."""
  out = list(argv[:1])
  rest = iter(argv[1:])
  for a in rest:
    if a.startswith("--config="):
      a = "--config=" + configlib.resolve(a[len("--config="):])
    elif a == "--config":
      out.append(a)
      a = configlib.resolve(next(rest, ""))
    out.append(a)
  return out


def _parse_flags(argv):
  try:
    return flags.FLAGS(_config_paths(argv))
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
    if "orbax" not in record.pathname:
      return True
    # A failed save or restore is reported by jaxft in one line; Orbax's own tracebacks of it
    # (one per array) would bury that line.
    record.exc_info, record.exc_text = None, None
    if "read only" in record.getMessage() or "read_only" in record.getMessage():
      return False  # jaxft's reading commands open checkpoints read-only on purpose
    return record.levelno >= logging.WARNING


HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb=1"


def huge_pages_env(environ) -> dict | None:
  """The environment a jaxft command re-executes itself with so that glibc's malloc backs large
  blocks with transparent huge pages, or None where that does not apply: not Linux with glibc
  >= 2.35, the kernel's THP switched off, GLIBC_TUNABLES already choosing `glibc.malloc.hugetlb`,
  or JAXFT_HUGE_PAGES=0.

  Why: XLA's CPU runtime allocates its temporary buffers afresh every step, and with 4 KiB pages
  their first touches cost tens of thousands of page faults a step (42,000, 90 ms of kernel time,
  in a 0.37 s bf16 LoRA step of bench/peft_compare.py; with huge pages 380 faults and 0.32 s).
  glibc reads the tunable only at process start, hence the re-execution."""
  if environ.get("JAXFT_HUGE_PAGES", "1") == "0" or not sys.platform.startswith("linux"):
    return None
  tunables = environ.get("GLIBC_TUNABLES", "")
  if "glibc.malloc.hugetlb" in tunables:
    return None
  try:
    lib, version = os.confstr("CS_GNU_LIBC_VERSION").split()
    if lib != "glibc" or tuple(int(x) for x in version.split(".")[:2]) < (2, 35):
      return None
    with open("/sys/kernel/mm/transparent_hugepage/enabled", encoding="ascii") as f:
      if "[never]" in f.read():
        return None
  except (OSError, ValueError, AttributeError):
    return None
  return dict(environ, GLIBC_TUNABLES=f"{tunables}:{HUGE_PAGES_TUNABLE}".lstrip(":"))


def _is_command() -> bool:
  """True when this process is a jaxft command (python -m jaxft.NAME or a jaxft-NAME script), not
  a program that imported one (a test, a notebook): only a command may re-execute itself."""
  spec = getattr(sys.modules.get("__main__"), "__spec__", None)
  if spec is not None:
    return spec.name.startswith("jaxft.")
  return os.path.basename(sys.argv[0]).startswith("jaxft-")


def _reexec_with_huge_pages() -> None:
  env = huge_pages_env(os.environ) if _is_command() else None
  if env is not None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable] + sys.orig_argv[1:], env)


def quiet_tpu_env(environ, has_libtpu: bool, tpu_chips: int, other_accelerator: bool) -> dict:
  """The variables a jaxft command sets so that a host without a TPU stays quiet although libtpu
  is installed (`pip install ".[tpu]"`, for plans): {} where that does not apply (no libtpu, a
  TPU present) or the user chose. Why: JAX initializes every installed plugin, and libtpu, not
  finding a TPU, prints errors ("unexpected worker hostname") and takes a second per process.
  JAX_PLATFORMS=cpu (only without a GPU or another accelerator's JAX plugin, which it would
  hide) keeps JAX from opening libtpu; the
  TPU_* values answer what libtpu asks a TPU VM's metadata server for, when the planner loads it
  to compile for a TPU topology (one host, no metadata query)."""
  if not has_libtpu or tpu_chips:
    return {}
  out = {"TPU_SKIP_MDS_QUERY": "1", "TPU_WORKER_HOSTNAMES": "localhost", "TPU_HOST_BOUNDS": "1,1,1"}
  if not other_accelerator:
    out["JAX_PLATFORMS"] = "cpu"
  return {k: v for k, v in out.items() if k not in environ}


def quiet_without_tpu() -> None:
  """Applies `quiet_tpu_env` to this process (before JAX opens a backend)."""
  import importlib.metadata
  import importlib.util
  try:
    from jax._src import hardware_utils  # what JAX itself asks (PCI ids), no backend opened
    chips = hardware_utils.num_available_tpu_chips_and_device_id()[0]
    other = (hardware_utils.has_visible_nvidia_gpu()  # (CUDA, ROCm, ... come as jax_plugins)
             or importlib.util.find_spec("jax_plugins") is not None
             or bool(importlib.metadata.entry_points(group="jax_plugins")))
  except Exception:  # another JAX: leave everything as it is
    return
  env = quiet_tpu_env(os.environ, importlib.util.find_spec("libtpu") is not None, chips, other)
  os.environ.update(env)
  if "JAX_PLATFORMS" in env:  # JAX read the variable when it was imported
    import jax
    jax.config.update("jax_platforms", env["JAX_PLATFORMS"])


# A full disk, a read-only file system, no permission: the machine's answer, not a jaxft bug.
_WRITE_ERRNOS = (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT)


def run(main_fn):
  """app.run(main_fn) where a JaxftError becomes 'jaxft: error: ...' on stderr and exit status 2.
  A command first re-executes itself once with huge-page malloc where that applies (see
  `huge_pages_env`), and keeps a host without a TPU quiet though libtpu is installed
  (`quiet_tpu_env`)."""
  _reexec_with_huge_pages()

  def wrapped(argv):
    for h in logging.getLogger().handlers + logging.getLogger("absl").handlers:
      h.addFilter(_QuietLibraries())
    quiet_without_tpu()
    try:
      main_fn(argv)
    except JaxftError as e:
      _fail(str(e))
    except OSError as e:
      if "Failed loading config file" in str(e):  # ml_collections loads --config lazily
        lines = [x.strip() for x in str(e).splitlines() if x.strip()]
        _fail(f"--config: cannot load the config file ({lines[-1]})")
      if e.errno not in _WRITE_ERRNOS:
        raise
      # The writers clear what they had begun (temporary names); what is left to say is where
      # and why, not a traceback.
      where = f"{e.filename}: " if e.filename else ""
      _fail(f"{where}cannot write ({e.strerror}); nothing was left half-written. Free space or "
            "choose a writable location")

  app.run(wrapped, flags_parser=_parse_flags)
