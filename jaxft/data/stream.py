"""Streaming training data: rows read, tokenized and packed as they are needed, never all held.

Used when data.train names many files (a glob or a directory of shards, jaxft.data.shards) or
data.stream="on". Built on Grain's MapDataset:

- disjoint parts: process p of P takes rows p, p + P, p + 2P, ... of the whole set (in shard-name
  order), so the parts are disjoint and together are the epoch;
- index shuffling (data.shuffle, seeded by train.seed): each process's part is permuted lazily
  (Grain's index shuffle, no permutation array and no shuffle buffer), and again, differently,
  in each epoch; the order depends only on the seed, the data and the process count;
- reading and tokenizing run ahead in data.workers background threads (0: in the loop's thread);
  a bad row raises DataError naming file:line when the stream reaches it (the step that would
  train on it does not run; the checkpoints before it stay);
- packing as the in-memory path packs (greedy, in order): a batch ends where the next example
  would not fit the last row, and that example begins the next batch.

The position is `pipeline.Position(epoch, index)`: the examples of this process's part consumed
in that epoch. It is exact (no buffer state): a stream opened at a saved position yields the same
batches as the stream that saved it. On several processes each has its own position; the
checkpoint records every process's (`position_record`) and each resumes its own (`position_from`).
"""

from __future__ import annotations

from typing import Callable

import jax
import numpy as np

from jaxft.data import pipeline, shards
from jaxft.data.formats import Example
from jaxft.data.pipeline import Position
from jaxft.errors import CheckpointError, ConfigError, DataError

_PREFETCH = 256  # examples read ahead of the packer


def wanted(config) -> bool:
  """Whether data.train is streamed: data.stream="on", or "auto" and data.train a glob or a
  directory. ("off": every row read and checked before the first step, shards included.)"""
  mode = config.data.stream
  if mode not in ("auto", "on", "off"):
    raise ConfigError(f"data.stream={mode!r}: expected auto, on or off")
  if not (isinstance(config.data.workers, int) and config.data.workers >= 0):
    raise ConfigError(f"data.workers={config.data.workers!r}: expected an integer >= 0")
  return mode == "on" or (mode == "auto" and shards.is_sharded(config.data.train))


class StreamData:
  """What a streamed data.train stands for before training: the source of its rows (indexed,
  nothing parsed or tokenized yet) and `encode` (encoder_of's). `examples` is empty: a stream
  has no example list."""

  def __init__(self, spec: str, encode: Callable):
    self.spec, self.encode = spec, encode
    self.source = shards.ShardSource(spec)  # (a single file is a set of one shard)
    self.examples: list[Example] = []
    self.distill = 0

  def stream(self, config) -> "ShardStream":
    """The train stream of `config`'s data keys over this source (this process's part)."""
    d = config.data
    return ShardStream(self.source, self.encode, max_len=d.max_len, packing=d.packing,
                       rows_per_batch=d.batch_size, seed=config.train.seed, shuffle=d.shuffle,
                       workers=d.workers)


def encoder_of(encoder, fmt: str, max_len: int, vocab_size: int,
               keep_distill: bool = False) -> Callable:
  """(origin, row or None) -> the row's Example truncated to max_len + 1 tokens, or None for a
  blank line or an example of fewer than 2 tokens (skipped, as the in-memory path skips them).
  keep_distill: rows marked "distill" stay marked (train.base_kl > 0), else are plain rows."""
  encoder.limit_tokens(max_len + 1)

  def encode(item):
    origin, row = item
    if row is None:
      return None
    ex = pipeline.truncate(pipeline.encode_row(origin, row, encoder, fmt, vocab_size)[1], max_len)
    ex.distill = ex.distill and keep_distill
    return ex if len(ex.ids) >= 2 else None

  return encode


class ShardStream:
  """Batches of `rows_per_batch` rows of `max_len` tokens from `source` (a ShardSource), read
  lazily; `batch_at(pos, select)` as pipeline.TrainStream's. `process_index`/`process_count`
  default to jax's."""

  def __init__(self, source, encode: Callable, *, max_len: int, packing: bool,
               rows_per_batch: int, seed: int, shuffle: bool = True, workers: int = 1,
               process_index: int | None = None, process_count: int | None = None):
    import grain  # (only a streamed run needs it)
    p = jax.process_index() if process_index is None else process_index
    n = jax.process_count() if process_count is None else process_count
    ds = grain.MapDataset.source(source).slice(slice(p, None, n))
    self.part = len(ds)
    if not self.part:
      raise DataError(f"{source.spec}: {len(source)} rows cannot be split over {n} processes "
                      f"(process {p} would read none)")
    if shuffle:
      ds = ds.shuffle(seed=seed)
    self._ds = ds.repeat().map(encode)  # (epochs reshuffled: Grain seeds each one)
    self._options = grain.ReadOptions(num_threads=workers, prefetch_buffer_size=_PREFETCH)
    self.workers, self.max_len, self.packing = workers, max_len, packing
    self.rows_per_batch = rows_per_batch
    self._it, self._next, self._peeked = None, -1, None

  def _seek(self, index: int) -> None:
    if self.workers:
      self._it = iter(self._ds.to_iter_dataset(self._options))
      self._it.set_state({"next_index": index})
    else:
      self._it = (self._ds[i] for i in range(index, 2 ** 62))
    self._next, self._peeked = index, None

  def _peek(self):
    if self._peeked is None:
      self._peeked = (next(self._it),)
    return self._peeked[0]

  def _take(self) -> None:
    self._peeked = None
    self._next += 1

  def rows_at(self, pos: Position, count: int) -> tuple[list[list[Example]], Position]:
    """`count` rows starting at `pos` (each a list of examples), and the position after them."""
    index = pos.epoch * self.part + pos.index
    if index != self._next:
      self._seek(index)
    rows, cur, used = [], [], 0
    while len(rows) < count:
      ex = self._peek()
      if ex is None:
        self._take()
        continue
      n = len(ex.ids) - 1
      if cur and (not self.packing or used + n > self.max_len):
        rows.append(cur)
        cur, used = [], 0
        continue
      cur.append(ex)
      used += n
      self._take()
    return rows, Position(*divmod(self._next, self.part))

  def batch_at(self, pos: Position, select: np.ndarray | None = None):
    """The batch that starts at `pos` and the position after it. Each process reads its own
    part, so `select` (the global rows its devices hold) only says how many rows it builds."""
    count = self.rows_per_batch if select is None else len(select)
    rows, nxt = self.rows_at(pos, count)
    return pipeline.make_batch(rows, self.max_len, count), nxt


def position_record(pos: Position) -> dict:
  """The data position as a checkpoint stores it: {"epoch", "index"}, and on several processes
  whose positions differ (each streams its own part) "processes": [[epoch, index], ...] of all
  of them. On several processes it is a collective: every process calls it at the same step."""
  record = {"epoch": int(pos.epoch), "index": int(pos.index)}
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    every = np.asarray(multihost_utils.process_allgather(
        np.array([pos.epoch, pos.index], np.int32))).reshape(-1, 2)
    if (every != every[0]).any():
      record["processes"] = every.tolist()
  return record


def position_from(record: dict) -> Position:
  """This process's position from a checkpoint's record (position_record's). Raises
  CheckpointError when the streams of another number of processes saved it."""
  every = record.get("processes")
  if every is None:
    return Position(record["epoch"], record["index"])
  if len(every) != jax.process_count():
    raise CheckpointError(f"the data position was saved by {len(every)} processes, each "
                          f"streaming its own part; resume with {len(every)} processes, not "
                          f"{jax.process_count()}")
  epoch, index = every[jax.process_index()]
  return Position(int(epoch), int(index))
