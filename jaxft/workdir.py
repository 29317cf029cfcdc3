"""A training workdir's bookkeeping: the exclusive lock a run holds on it, and its metrics file
kept consistent with its checkpoints."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time

from absl import logging

from jaxft import files
from jaxft.errors import ConfigError

LOCK = "jaxft.lock"
METRICS = "metrics.jsonl"


class Lock:
  """An exclusive lock on WORKDIR/jaxft.lock for the life of a training run (`with Lock(wd):`).

  The holder's pid, host and start time are written into the file. A second run on the same
  workdir fails at once with ConfigError naming the holder. The lock is the kernel's (flock): it
  goes away with the process, however it ends (kill -9 included), so it never needs clearing."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, LOCK)
    self._fd = None

  def __enter__(self):
    try:
      os.makedirs(os.path.dirname(self.path), exist_ok=True)
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:  # read-only, full, no permission: training could write nothing there
      raise ConfigError(f"--workdir={os.path.dirname(self.path)}: cannot write the run's lock "
                        f"file ({e.strerror}); a run writes checkpoints and metrics there: "
                        "use a writable --workdir") from None
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      holder = os.read(fd, 4096).decode("utf-8", "replace").strip()
      os.close(fd)
      try:
        h = json.loads(holder)
        who = f"pid {h['pid']} on host {h['host']}, started {h['started']}"
      except (ValueError, KeyError, TypeError):
        who = "another process"
      raise ConfigError(f"{os.path.dirname(self.path)}: the workdir is in use by another jaxft "
                        f"run ({who}; lock {self.path}). Wait for it to end or use another "
                        "--workdir.") from None
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps({"pid": os.getpid(), "host": files.host(),
                             "started": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())
    self._fd = fd
    return self

  def __exit__(self, *exc):
    if self._fd is not None:
      with contextlib.suppress(OSError):
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
      self._fd = None


def read_metrics(workdir: str) -> list[dict]:
  """The rows of WORKDIR/metrics.jsonl; lines that do not parse (a crash mid-write tears the
  last one) are dropped with a warning."""
  path = os.path.join(workdir, METRICS)
  if not os.path.isfile(path):
    return []
  rows = []
  with open(path, encoding="utf-8", errors="replace") as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except ValueError:
        logging.warning("%s:%d: dropping a torn or malformed metrics row", path, lineno)
        continue
      if isinstance(row, dict) and isinstance(row.get("step"), int):
        rows.append(row)
  return rows


def trim_metrics(workdir: str, upto: int | None) -> None:
  """Keeps the metrics rows a checkpoint covers: steps <= `upto`, or none for a fresh start
  (`upto` None: rows of a run killed before its first checkpoint). Torn rows are dropped."""
  path = os.path.join(workdir, METRICS)
  if not os.path.isfile(path):
    return
  rows = [] if upto is None else [r for r in read_metrics(workdir) if r["step"] <= upto]
  files.write_lines(path, [json.dumps(r) + "\n" for r in rows])
