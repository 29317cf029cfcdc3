"""From a data spec to batches: rows -> Examples -> packed or padded rows -> batches.

The training stream is a pure function of (seed, position): examples are shuffled per epoch with
a permutation seeded by (seed, epoch), and `Position(epoch, index)` says where the next batch starts,
so a checkpoint that stores the position resumes the exact same stream.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Iterator

import numpy as np
from absl import logging

from jaxft.data import formats, sources
from jaxft.data.formats import Example
from jaxft.data.tokenize import Encoder
from jaxft.errors import ConfigError, DataError

Batch = dict[str, np.ndarray]


@dataclasses.dataclass
class Dataset:
  examples: list[Example]
  formats: dict[str, int]
  truncated: int
  target_tokens: int
  distill: int = 0  # examples marked "distill": true
  tokens: int = 0  # tokens of the examples kept (after truncation)
  no_target: int = 0  # rows with no target token left (after truncation)
  # file:line of the first few truncated rows and rows with no target token (python -m jaxft.data)
  examples_of: dict = dataclasses.field(default_factory=dict)


def encode_rows(spec: str, encoder: Encoder, fmt: str,
                vocab_size: int) -> Iterator[tuple[str, formats.Row, Example]]:
  """(origin, parsed row, example) of each row of `spec` as training tokenizes it, before
  truncation. Raises DataError naming the file and line of a bad row."""
  for origin, row in sources.read_rows(spec):
    r, ex = encode_row(origin, row, encoder, fmt, vocab_size)
    yield origin, r, ex


def encode_row(origin: str, row: dict, encoder: Encoder, fmt: str,
               vocab_size: int) -> tuple[formats.Row, Example]:
  """(parsed row, example) of one row as training tokenizes it, before truncation. Raises
  DataError naming `origin` for a bad row."""
  r = formats.parse(origin, row, fmt)
  if r.messages is not None:
    ex = encoder.chat(origin, r.messages)
  elif r.kind == "completion":
    ex = encoder.completion(r.prompt, r.completion)
  elif r.kind == "text":
    ex = encoder.text(r.text)
  else:
    ex = formats.tokens_example(origin, r.row, vocab_size)
  ex.distill = _distill_flag(origin, row)
  if len(ex.ids) and int(ex.ids.max()) >= vocab_size:
    raise DataError(f"{origin}: token id {int(ex.ids.max())} is outside the model's vocabulary "
                    f"(vocab_size {vocab_size}): the tokenizer does not match the model")
  return r, ex


def truncate(ex: Example, max_len: int) -> Example:
  """The first max_len + 1 tokens of `ex` (a row of max_len inputs and targets)."""
  if len(ex.ids) <= max_len + 1:
    return ex
  return Example(ex.ids[: max_len + 1], ex.mask[: max_len + 1], ex.distill)


def load_examples(spec: str, encoder: Encoder, fmt: str, max_len: int, vocab_size: int,
                  show: bool = False) -> Dataset:
  """Reads and tokenizes every row of `spec`; examples longer than max_len + 1 are truncated.
  show: log the first example rendered and tokenized, with its loss mask.

  Raises DataError naming the file and line of a bad row, or when no example has a target token.
  """
  check_format(fmt)
  counts: dict[str, int] = collections.Counter()
  examples, truncated, targets_before, no_target = [], 0, 0, 0
  examples_of = {"truncated": [], "no_target": []}
  encoder.limit_tokens(max_len + 1)
  for origin, r, ex in encode_rows(spec, encoder, fmt, vocab_size):
    counts[r.kind] += 1
    if show and not examples:
      logging.info("%s: first example (%s): %s", origin, r.kind, encoder.describe(ex))
    targets_before += int(ex.mask[1:].sum())
    if len(ex.ids) > max_len + 1:
      truncated += 1
      ex = truncate(ex, max_len)
      _note(examples_of["truncated"], origin)
    if not ex.mask[1:].any():
      no_target += 1
      _note(examples_of["no_target"], origin)
    if len(ex.ids) >= 2:
      examples.append(ex)
  targets = sum(int(e.mask[1:].sum()) for e in examples)
  if targets == 0 and targets_before and truncated:
    raise DataError(f"{spec}: truncation to data.max_len={max_len} tokens removed every target "
                    f"token ({truncated} examples truncated); raise data.max_len")
  if not examples or targets == 0:
    raise DataError(f"{spec}: no example has a target token to train on")
  distill = sum(e.distill for e in examples)
  logging.info("%s: %d examples, formats %s, %d truncated to %d tokens, %d target tokens%s",
               spec, len(examples), dict(counts), truncated, max_len, targets,
               f" ({distill} examples marked distill: trained toward the base)" if distill else "")
  return Dataset(examples, dict(counts), truncated, targets, distill,
                 sum(len(e.ids) for e in examples), no_target, examples_of)


def _note(origins: list, origin: str, keep: int = 3) -> None:
  if len(origins) < keep:
    origins.append(origin)


def check_format(fmt: str) -> None:
  """Raises ConfigError naming data.format unless it is auto or a supervised format."""
  if fmt != "auto" and fmt not in formats.FORMATS:
    raise ConfigError(f"data.format={fmt!r}: expected auto or one of {', '.join(formats.FORMATS)}")


def _distill_flag(origin: str, row) -> bool:
  """A row's optional "distill" field (true: train its tokens toward the base's predictions)."""
  flag = row.get("distill", False) if isinstance(row, dict) else False
  if not isinstance(flag, bool):
    raise DataError(f"{origin}: field 'distill' must be true or false, got {flag!r}")
  return flag


def _rows(examples: list[Example], max_len: int, packing: bool) -> list[list[Example]]:
  """Groups examples into rows: greedily packed, or one per row."""
  if not packing:
    return [[e] for e in examples]
  rows, cur, used = [], [], 0
  for e in examples:
    n = len(e.ids) - 1
    if cur and used + n > max_len:
      rows.append(cur)
      cur, used = [], 0
    cur.append(e)
    used += n
  if cur:
    rows.append(cur)
  return rows


def make_batch(rows: list[list[Example]], max_len: int, num_rows: int) -> Batch:
  """Stacks rows (each a list of examples) into arrays [num_rows, max_len]; padding rows are empty.
  "weights" marks the target tokens of the loss; "distill" every token of an example marked
  "distill" (whose weights are 0: it is trained toward the base's predictions, train.base_kl)."""
  b = {"inputs": np.zeros((num_rows, max_len), np.int32),
       "targets": np.zeros((num_rows, max_len), np.int32),
       "weights": np.zeros((num_rows, max_len), np.float32),
       "positions": np.zeros((num_rows, max_len), np.int32),
       "segment_ids": np.zeros((num_rows, max_len), np.int32),
       "distill": np.zeros((num_rows, max_len), np.float32)}
  for r, row in enumerate(rows):
    t = 0
    for s, e in enumerate(row, 1):
      n = len(e.ids) - 1
      b["inputs"][r, t:t + n] = e.ids[:-1]
      b["targets"][r, t:t + n] = e.ids[1:]
      if e.distill:
        b["distill"][r, t:t + n] = 1.0
      else:
        b["weights"][r, t:t + n] = e.mask[1:]
      b["positions"][r, t:t + n] = np.arange(n)
      b["segment_ids"][r, t:t + n] = s
      t += n
  return b


@dataclasses.dataclass(frozen=True)
class Position:
  epoch: int = 0
  index: int = 0  # rows of this epoch already consumed


class TrainStream:
  """Deterministic, resumable batches of `rows_per_batch` rows of `max_len` tokens."""

  def __init__(self, examples: list[Example], *, max_len: int, packing: bool, rows_per_batch: int,
               seed: int, shuffle: bool = True):
    self.examples, self.max_len, self.packing = examples, max_len, packing
    self.rows_per_batch, self.seed, self.shuffle = rows_per_batch, seed, shuffle
    self._epoch_rows: dict[int, list[list[Example]]] = {}

  def _rows_of(self, epoch: int) -> list[list[Example]]:
    if epoch not in self._epoch_rows:
      order = np.arange(len(self.examples))
      if self.shuffle:
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.examples))
      self._epoch_rows = {epoch: self._group([self.examples[i] for i in order], self.max_len,
                                             self.packing)}
    return self._epoch_rows[epoch]

  # How examples become rows and rows a batch (jaxft.data.preference overrides both for pairs).
  _group = staticmethod(lambda examples, max_len, packing: _rows(examples, max_len, packing))
  _stack = staticmethod(lambda rows, max_len, num_rows: make_batch(rows, max_len, num_rows))

  def batch_at(self, pos: Position, select: np.ndarray | None = None) -> tuple[Batch, Position]:
    """The batch that starts at `pos`, and the position after it (epochs roll over).

    select: indices of the batch rows to build (default all); on several hosts each process builds
    only the rows its devices hold (jaxft.sharding.local_rows)."""
    taken, epoch, index = [], pos.epoch, pos.index
    while len(taken) < self.rows_per_batch:
      rows = self._rows_of(epoch)
      if index >= len(rows):
        epoch, index = epoch + 1, 0
        continue
      k = min(self.rows_per_batch - len(taken), len(rows) - index)
      taken.extend(rows[index:index + k])
      index += k
    if select is not None:
      return self._stack([taken[i] for i in select], self.max_len, len(select)), Position(epoch, index)
    return self._stack(taken, self.max_len, self.rows_per_batch), Position(epoch, index)


def eval_batches(examples: list[Example], max_len: int, rows_per_batch: int,
                 packing: bool) -> Iterator[Batch]:
  """Every eval example once, in file order; the last batch is padded with empty rows."""
  rows = _rows(examples, max_len, packing)
  for i in range(0, len(rows), rows_per_batch):
    yield make_batch(rows[i:i + rows_per_batch], max_len, rows_per_batch)
