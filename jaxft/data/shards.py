"""Many-file training data, read lazily: a glob (`data/shards/*.jsonl`) or a directory of shards
(JSONL, Parquet, ArrayRecord) as one random-access source of rows, each with its origin.

Random access is what index shuffling needs (jaxft.data.stream): row i of the whole set is read
when it is due, and nothing else is held. A JSONL shard is opened with an index of its line starts
(one pass over its bytes, ~8 bytes a row, no parsing); a Parquet shard by its row groups (a row
read decodes its row group, and the last one decoded is kept: a shuffled read of a large Parquet
file decodes a row group per row, so JSONL or ArrayRecord shards suit large shuffled sets); an
ArrayRecord shard holds one JSON object (UTF-8) per record. A row is parsed, and its errors
raised (DataError naming file:line, or file:record N), only when it is read.
"""

from __future__ import annotations

import bisect
import concurrent.futures
import glob
import json
import os
import threading
from typing import Any

import numpy as np

from jaxft.errors import DataError

SUFFIXES = (".jsonl", ".parquet", ".array_record", ".arrayrecord")
_CHUNK = 1 << 24  # bytes read at a time while indexing line starts


def parse_json(text: str, origin: str):
  """The JSON value of `text`; raises DataError naming `origin` when it is not JSON."""
  try:
    return json.loads(text)
  except json.JSONDecodeError as e:
    raise DataError(f"{origin}: malformed JSON ({e.msg}, column {e.colno})") from None
  except RecursionError:
    raise DataError(f"{origin}: JSON nested too deeply to read") from None


def is_sharded(spec: str) -> bool:
  """Whether `spec` names many files: a glob pattern or a directory."""
  return bool(spec) and (os.path.isdir(spec) or glob.has_magic(spec))


def shard_paths(spec: str) -> list[str]:
  """The shard files of a glob or directory, sorted by name (a directory: its files ending in
  .jsonl, .parquet or .array_record). Raises DataError when there are none or one is unreadable."""
  if os.path.isdir(spec):
    paths = [os.path.join(spec, n) for n in os.listdir(spec) if n.endswith(SUFFIXES)]
    what = f"{spec}: is a directory with no .jsonl, .parquet or .array_record shards in it"
  else:
    paths = [p for p in glob.glob(spec) if os.path.isfile(p)]
    what = f"{spec}: no file matches the pattern"
  if not paths:
    raise DataError(what)
  for p in paths:
    if not p.endswith(SUFFIXES):
      raise DataError(f"{p}: a shard must be .jsonl, .parquet or .array_record")
    if not os.access(p, os.R_OK):
      raise DataError(f"{p}: not readable (permission denied)")
  return sorted(paths)


class _Jsonl:
  """A JSONL shard: row i is line i + 1 (a blank line reads as None)."""

  def __init__(self, path: str):
    self.path = path
    starts = [np.zeros(1, np.int64)]
    size = 0
    with open(path, "rb") as f:
      while chunk := f.read(_CHUNK):
        nl = np.flatnonzero(np.frombuffer(chunk, np.uint8) == 10) + (size + 1)
        starts.append(nl.astype(np.int64))
        size += len(chunk)
    starts = np.concatenate(starts)
    # Line i spans starts[i]:starts[i+1]; a last line without a newline still counts.
    self._bounds = starts if starts[-1] == size else np.append(starts, size)
    self._local = threading.local()  # one file handle per reading thread

  def __len__(self) -> int:
    return len(self._bounds) - 1

  def __getitem__(self, i: int):
    f = getattr(self._local, "f", None)
    if f is None:
      f = self._local.f = open(self.path, "rb")
    lo, hi = int(self._bounds[i]), int(self._bounds[i + 1])
    f.seek(lo)
    raw, origin = f.read(hi - lo), f"{self.path}:{i + 1}"
    try:
      line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
      raise DataError(f"{origin}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not line.strip():
      return origin, None
    row = parse_json(line, origin)
    if not isinstance(row, dict):
      raise DataError(f"{origin}: expected a JSON object per line, got {type(row).__name__}")
    return origin, row


class _Parquet:
  """A Parquet shard: rows by row group, the last group decoded kept (per thread)."""

  def __init__(self, path: str):
    import pyarrow.parquet as pq
    try:
      self._file = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises many types for a file that is not Parquet
      raise DataError(f"{path}: cannot read as Parquet ({type(e).__name__}: {e})") from None
    self.path = path
    meta = self._file.metadata
    self._starts = np.cumsum([0] + [meta.row_group(g).num_rows for g in range(meta.num_row_groups)])
    self._lock = threading.Lock()  # one ParquetFile is not safe to read from two threads
    self._cached: tuple[int, Any] = (-1, None)

  def __len__(self) -> int:
    return int(self._starts[-1])

  def __getitem__(self, i: int):
    g = int(np.searchsorted(self._starts, i, side="right")) - 1
    with self._lock:
      if self._cached[0] != g:
        self._cached = (g, self._file.read_row_group(g))
      table = self._cached[1]
    return f"{self.path}:{i + 1}", table.slice(i - int(self._starts[g]), 1).to_pylist()[0]


class _ArrayRecord:
  """An ArrayRecord shard of JSON objects, one per record."""

  def __init__(self, path: str):
    try:
      from array_record.python import array_record_data_source as ards
    except ImportError:
      raise DataError(f"{path}: reading ArrayRecord shards needs the array-record package "
                      "(pip install array-record)") from None
    self.path = path
    self._source = ards.ArrayRecordDataSource([path])

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, i: int):
    origin = f"{self.path}:record {i + 1}"
    try:
      text = self._source[i].decode("utf-8")
    except UnicodeDecodeError as e:
      raise DataError(f"{origin}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    row = parse_json(text, origin)
    if not isinstance(row, dict):
      raise DataError(f"{origin}: expected a JSON object, got {type(row).__name__}")
    return origin, row


def _open(path: str):
  if path.endswith(".jsonl"):
    return _Jsonl(path)
  if path.endswith(".parquet"):
    return _Parquet(path)
  return _ArrayRecord(path)


class ShardSource:
  """The rows of every shard of `spec`, in shard-name order, as one sequence:
  `source[i] -> (origin, row dict or None for a blank line)`; `len(source)` counts all rows.
  Opening indexes the shards (`threads` at a time). Raises DataError as shard_paths does, and
  when the shards hold no row."""

  def __init__(self, spec: str, threads: int = 2):
    self.spec, self.paths = spec, shard_paths(spec)
    with concurrent.futures.ThreadPoolExecutor(max(1, threads)) as pool:
      self.shards = list(pool.map(_open, self.paths))
    self._starts = list(np.cumsum([0] + [len(s) for s in self.shards]))
    if not len(self):
      raise DataError(f"{spec}: the dataset is empty")

  def __len__(self) -> int:
    return int(self._starts[-1])

  def __getitem__(self, i: int):
    k = bisect.bisect_right(self._starts, i) - 1
    return self.shards[k][i - int(self._starts[k])]
