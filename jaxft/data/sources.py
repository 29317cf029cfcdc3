"""Where rows come from: local JSONL / Parquet files, HF datasets names, `tfds:NAME[/CONFIG]:SPLIT`.

Each row comes back with its origin ("file:line") so that every later error can name it.
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterator

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
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise DataError(f"{path}:{lineno}: malformed JSON ({e.msg}, column {e.colno})") from None
      if not isinstance(row, dict):
        raise DataError(f"{path}:{lineno}: expected a JSON object per line, got {type(row).__name__}")
      yield f"{path}:{lineno}", row


def _read_datasets(spec: str, split: str | None) -> Iterator[Row]:
  import datasets  # heavy; only when asked for
  if spec.endswith(".parquet"):
    ds = datasets.load_dataset("parquet", data_files=spec, split="train")
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
  import tensorflow_datasets as tfds
  try:
    source = tfds.data_source(name, split=split)
  except Exception as e:
    raise DataError(f"{spec}: cannot open through tensorflow-datasets ({type(e).__name__}: {e})") from None
  for i in range(len(source)):
    row = {k: (v.decode("utf-8") if isinstance(v, bytes) else v) for k, v in dict(source[i]).items()}
    yield f"{spec}:{i + 1}", row


def read_rows(spec: str) -> list[Row]:
  """Reads every row of a data spec; raises DataError naming the file/line, or when it is empty."""
  if not spec:
    raise DataError("no data given: set data.train (a JSONL/Parquet file, HF dataset or tfds:NAME:SPLIT)")
  if spec.startswith("tfds:"):
    rows = list(_read_tfds(spec))
  elif spec.endswith((".jsonl", ".json")) or (os.path.isfile(spec) and not spec.endswith(".parquet")):
    if not os.path.isfile(spec):
      raise DataError(f"{spec}: no such file")
    rows = list(_read_jsonl(spec))
  elif spec.endswith(".parquet"):
    if not os.path.isfile(spec):
      raise DataError(f"{spec}: no such file")
    rows = list(_read_datasets(spec, None))
  else:
    name, _, split = spec.partition(":")
    rows = list(_read_datasets(name, split or None))
  if not rows:
    raise DataError(f"{spec}: the dataset is empty")
  return rows
