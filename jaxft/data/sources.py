"""Where rows come from: local JSONL / Parquet files, HF datasets names, `tfds:NAME[/CONFIG]:SPLIT`.

Each row comes back with its origin ("file:line") so that every later error can name it.
"""

from __future__ import annotations

import os
from typing import Any, Iterator

from jaxft.data import shards
from jaxft.errors import DataError

Row = tuple[str, dict[str, Any]]  # (origin, row)


def _read_jsonl(path: str) -> Iterator[Row]:
  # Parsed line by line (not through `datasets`) so a malformed line is reported with its number
  # and rows may differ in optional fields (a loss_mask on some rows only).
  with open(path, "rb") as f:
    for lineno, raw in enumerate(f, 1):
      try:
        line = raw.decode("utf-8")
      except UnicodeDecodeError as e:
        raise DataError(f"{path}:{lineno}: not UTF-8 text ({e.reason} at byte {e.start})") from None
      if not line.strip():
        continue
      row = _parse(line, f"{path}:{lineno}")
      if isinstance(row, list) and lineno == 1 and line.lstrip().startswith("["):
        raise DataError(f"{path}:1: a JSON array; expected JSON Lines (one JSON object per line). "
                        "A .json file may hold one array of row objects")
      if not isinstance(row, dict):
        raise DataError(f"{path}:{lineno}: expected a JSON object per line, got {type(row).__name__}")
      yield f"{path}:{lineno}", row


_parse = shards.parse_json


def _read_json_array(path: str) -> Iterator[Row]:
  """A .json file holding one array of row objects (as `datasets` writes them)."""
  try:
    with open(path, encoding="utf-8") as f:
      rows = _parse(f.read(), path)
  except UnicodeDecodeError as e:
    raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
  for i, row in enumerate(rows, 1):
    if not isinstance(row, dict):
      raise DataError(f"{path}: item {i} of the array: expected a JSON object, got "
                      f"{type(row).__name__}")
    yield f"{path}:item {i}", row


def _starts_with_bracket(path: str) -> bool:
  with open(path, "rb") as f:
    head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
  return head.startswith(b"[")


def _read_datasets(spec: str, split: str | None) -> Iterator[Row]:
  import datasets  # heavy; only when asked for
  if spec.endswith(".parquet"):
    try:
      ds = datasets.load_dataset("parquet", data_files=spec, split="train")
    except Exception as e:  # pyarrow raises many types for a file that is not Parquet
      msg = " ".join(str(e).split())[:200]
      raise DataError(f"{spec}: cannot read as Parquet ({type(e).__name__}: {msg})") from None
  else:
    try:
      ds = datasets.load_dataset(spec, split=split or "train")
    except Exception as e:  # the library raises many types; the user needs one line
      raise DataError(f"{spec}: cannot load as a HF dataset ({type(e).__name__}: {e})") from None
  for i, row in enumerate(ds):
    yield f"{spec}:{i + 1}", dict(row)


def _read_tfds(spec: str) -> Iterator[Row]:
  body = spec[len("tfds:"):]
  if body.count(":") != 1:
    raise DataError(f"{spec}: expected tfds:NAME[/CONFIG]:SPLIT")
  name, split = body.split(":")
  try:
    import tensorflow_datasets as tfds
  except ImportError:
    raise DataError(f"{spec}: reading tfds: data needs tensorflow-datasets; install it with "
                    "pip install 'jaxft[tfds]'") from None
  try:
    source = tfds.data_source(name, split=split)
  except Exception as e:
    raise DataError(f"{spec}: cannot open through tensorflow-datasets ({type(e).__name__}: {e})") from None
  for i in range(len(source)):
    row = {k: (v.decode("utf-8") if isinstance(v, bytes) else v) for k, v in dict(source[i]).items()}
    yield f"{spec}:{i + 1}", row


def _rows(spec: str) -> Iterator[Row]:
  """The rows of a data spec, lazily; the checks that need no reading come first."""
  if not spec:
    raise DataError("no data given: set data.train (a JSONL/Parquet file, HF dataset or tfds:NAME:SPLIT)")
  if spec.startswith("tfds:"):
    return _read_tfds(spec)
  if shards.is_sharded(spec):
    return _read_shards(shards.shard_paths(spec))
  if os.path.isdir(spec):
    raise DataError(f"{spec}: is a directory; expected a JSONL or Parquet file")
  if spec.endswith((".jsonl", ".json")) or (os.path.isfile(spec) and not spec.endswith(".parquet")):
    if not os.path.isfile(spec):
      raise DataError(f"{spec}: no such file")
    if spec.endswith(".json") and _starts_with_bracket(spec):
      return _read_json_array(spec)
    return _read_jsonl(spec)
  if spec.endswith(".parquet"):
    if not os.path.isfile(spec):
      raise DataError(f"{spec}: no such file")
    return _read_datasets(spec, None)
  name, _, split = spec.partition(":")
  return _read_datasets(name, split or None)


def _read_shards(paths: list[str]) -> Iterator[Row]:
  """Every row of each shard in turn (data.stream="off" on a glob or directory)."""
  for path in paths:
    if path.endswith(".jsonl"):
      yield from _read_jsonl(path)
      continue
    shard = shards.ShardSource(path)
    for i in range(len(shard)):
      yield shard[i]


def read_rows(spec: str) -> list[Row]:
  """Reads every row of a data spec; raises DataError naming the file/line, or when it is empty."""
  rows = list(_rows(spec))
  if not rows:
    raise DataError(f"{spec}: the dataset is empty")
  return rows


def check(spec: str) -> None:
  """What can be told of a data spec cheaply, before a run creates its workdir: a local file
  exists, is readable, and (JSONL) its first row is a JSON object; a glob or directory matches
  readable shards; other specs (HF datasets, tfds) are read only when loaded. Raises DataError as read_rows would."""
  if shards.is_sharded(spec):
    shards.shard_paths(spec)  # (some shard file, each readable)
    return
  local = spec.endswith((".jsonl", ".json", ".parquet")) or os.path.exists(spec)
  if spec and not local and not spec.startswith("tfds:"):
    return
  if spec.startswith("tfds:") or spec.endswith(".parquet"):
    _rows(spec)  # (the library opens them: only the name checks)
    return
  rows = _rows(spec)  # raises for an empty spec, a directory, a missing file
  if not os.access(spec, os.R_OK):
    raise DataError(f"{spec}: not readable (permission denied)")
  try:
    if next(rows, None) is None:
      raise DataError(f"{spec}: the dataset is empty")
  finally:
    rows.close()  # (the file)
