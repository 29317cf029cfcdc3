"""Writing files so that a reader never sees half of one: write to a temporary name beside the
target, then rename (atomic on POSIX file systems). Every writer of jaxft goes through here: text,
JSON, lines, a file another library writes (`write_with`) and whole directories (`temp_dir`,
`publish_dir`). A crash leaves the old file or none, plus at
worst a `NAME.tmp-PID` that `remove_stale` clears."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import shutil
import socket

from jaxft.errors import ConfigError


def _tmp(path: str) -> str:
  return f"{path}.tmp-{os.getpid()}"


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "w"):
  """open() for writing `path` whole: the file appears under its name only if the block ends
  without an exception."""
  tmp = _tmp(path)
  kw = {} if "b" in mode else {"encoding": "utf-8"}
  try:
    with open(tmp, mode, **kw) as f:
      yield f
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    raise


def write_with(path: str, write, suffix: str = "") -> None:
  """Writes `path` whole through `write(tmp)`, a function that writes a file at the name it is
  given (matplotlib's savefig, shutil.copyfile, a library's save): the file appears under its
  name only if `write` returns. `suffix` ends the temporary name (savefig reads the format from
  it)."""
  tmp = _tmp(path) + suffix
  try:
    write(tmp)
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    raise


def temp_dir(path: str) -> str:
  """A fresh empty `PATH.tmp-PID` directory beside `path`, to be filled and then handed to
  `publish_dir`."""
  tmp = _tmp(os.path.abspath(path))
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  return tmp


def publish_dir(tmp: str, path: str) -> None:
  """Renames the finished temporary directory `tmp` to `path`; an old `path` is set aside as
  `PATH.old-PID` and removed only once the new one is in place."""
  path = os.path.abspath(path)
  old = None
  if os.path.exists(path):
    old = f"{path}.old-{os.getpid()}"
    os.replace(path, old)
  os.replace(tmp, path)
  if old:
    shutil.rmtree(old, ignore_errors=True)


def write_text(path: str, text: str) -> None:
  with atomic_open(path) as f:
    f.write(text)


def write_json(path: str, obj, indent: int | None = 2) -> None:
  with atomic_open(path) as f:
    json.dump(obj, f, indent=indent, sort_keys=True, default=str)


def write_lines(path: str, lines) -> None:
  with atomic_open(path) as f:
    f.writelines(lines)


def pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def remove_stale(path: str) -> list[str]:
  """Removes `PATH.tmp-PID` and `PATH.old-PID` files or directories left by a killed process of
  this host (its PID no longer runs); returns what was removed."""
  removed = []
  for p in glob.glob(glob.escape(path) + ".tmp-*") + glob.glob(glob.escape(path) + ".old-*"):
    m = re.fullmatch(r"\.(?:tmp|old)-(\d+)", p[len(path):])
    if not m or pid_alive(int(m.group(1))) and int(m.group(1)) != os.getpid():
      continue
    if os.path.isdir(p) and not os.path.islink(p):
      shutil.rmtree(p, ignore_errors=True)
    else:
      with contextlib.suppress(OSError):
        os.remove(p)
    removed.append(p)
  return removed


def check_writable_dir(path: str, what: str) -> None:
  """ConfigError unless `path` is (or can be made as) a directory this process may write."""
  if os.path.exists(path) and not os.path.isdir(path):
    raise ConfigError(f"{what}={path}: exists and is not a directory")
  probe = path
  while not os.path.exists(probe):
    probe = os.path.dirname(os.path.abspath(probe))
  if not os.access(probe, os.W_OK):
    raise ConfigError(f"{what}={path}: not writable ({probe} is read-only for this user)")


def host() -> str:
  return socket.gethostname()
