"""Preference pairs: TRL's row formats, tokenization, and batches that keep each pair together.

Rows (JSONL, Parquet, HF datasets), as TRL reads them:
- standard: {"prompt": str, "chosen": str, "rejected": str}: prompt + completion text, the
  completion is the target (like the completion format);
- conversational: {"prompt": [messages], "chosen": [messages], "rejected": [messages]}: rendered
  with the chat template, the assistant turns of chosen / rejected are the targets;
- implicit prompt: {"chosen", "rejected"} alone: the prompt is their shared beginning (whole
  messages, or text up to a word boundary).

A batch row holds whole pairs: pair k's chosen sequence is segment 2k+1 and its rejected sequence
segment 2k+2 of the same row (one pair per row unless data.packing, which puts as many pairs in a
row as fit). `ref_logps` holds per-token reference log-probabilities when they were precomputed
(train.precompute_reference), else zeros.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Callable, Iterator

import numpy as np
from absl import logging

from jaxft.data import formats, pipeline, sources
from jaxft.data.formats import Example
from jaxft.data.tokenize import Encoder
from jaxft.errors import ConfigError, DataError

Batch = dict[str, np.ndarray]


@dataclasses.dataclass
class Pair:
  chosen: Example
  rejected: Example
  # Reference log-probabilities of each target position (len(ids) - 1 each), once precomputed.
  ref: tuple[np.ndarray, np.ndarray] | None = None

  @property
  def size(self) -> int:
    """Positions the pair takes in a row."""
    return len(self.chosen.ids) - 1 + len(self.rejected.ids) - 1


@dataclasses.dataclass
class PairDataset:
  examples: list[Pair]  # (named as pipeline.Dataset's, so the trainer reads either)
  formats: dict[str, int]
  truncated: int
  target_tokens: int
  tokens: int = 0  # of the pairs kept, both sides (after truncation)
  no_target: int = 0  # pairs dropped: a side without target tokens


def is_preference(row: dict) -> bool:
  return "chosen" in row or "rejected" in row


def _common_text_prefix(a: str, b: str) -> str:
  n = 0
  while n < min(len(a), len(b)) and a[n] == b[n]:
    n += 1
  if n < min(len(a), len(b)):  # they differ at n: the completions start at that word's space
    n = max(a.rfind(" ", 0, n + 1), 0)
  return a[:n]


def _check_messages(origin: str, key: str, msgs) -> list[dict]:
  if not isinstance(msgs, list) or not all(isinstance(m, dict) for m in msgs):
    raise DataError(f"{origin}: field {key!r} must be a string or a list of messages")
  for i, m in enumerate(msgs):
    if m.get("role") not in formats.ROLES or not isinstance(m.get("content"), str):
      raise DataError(f"{origin}: {key}[{i}] must have a role ({', '.join(formats.ROLES)}) and a "
                      "string content")
  return [{"role": m["role"], "content": m["content"]} for m in msgs]


def split_row(origin: str, row: dict):
  """(prompt, chosen, rejected, conversational) of a preference row; the prompt is made
  implicit when the row has none. Raises DataError naming the row for missing or mismatched
  fields and for pairs whose two answers are the same."""
  for key in ("chosen", "rejected"):
    if key not in row:
      raise DataError(f"{origin}: missing required field {key!r} of a preference row "
                      "(prompt, chosen, rejected)")
  chosen, rejected, prompt = row["chosen"], row["rejected"], row.get("prompt")
  if "prompt" in row and prompt is None:  # a null is a mistake, not a request for an implicit one
    raise DataError(f"{origin}: field 'prompt' is null; give the prompt, or leave the field out "
                    "to take the shared beginning of 'chosen' and 'rejected' as the prompt")
  if chosen == rejected:  # before the implicit prompt takes all of both
    raise DataError(f"{origin}: 'chosen' and 'rejected' are the same: the pair says nothing")
  conversational = isinstance(chosen, list)
  kind = list if conversational else str
  for key, v in (("chosen", chosen), ("rejected", rejected), ("prompt", prompt)):
    if v is not None and not isinstance(v, kind):
      raise DataError(f"{origin}: field {key!r} is a {type(v).__name__}; in this row every field "
                      f"must be {'a list of messages' if conversational else 'a string'}")
  if conversational:
    chosen = _check_messages(origin, "chosen", chosen)
    rejected = _check_messages(origin, "rejected", rejected)
    if prompt is None:
      n = 0
      while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
      prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
    else:
      prompt = _check_messages(origin, "prompt", prompt)
    for key, msgs in (("chosen", chosen), ("rejected", rejected)):
      if not any(m["role"] == "assistant" for m in msgs):
        raise DataError(f"{origin}: {key!r} has no assistant message after the prompt")
  elif prompt is None:
    prompt = _common_text_prefix(chosen, rejected)
    chosen, rejected = chosen[len(prompt):], rejected[len(prompt):]
  if chosen == rejected:
    raise DataError(f"{origin}: 'chosen' and 'rejected' are the same: the pair says nothing")
  return prompt, chosen, rejected, conversational


def sides(origin: str, row: dict) -> tuple[formats.Row, formats.Row]:
  """The chosen and the rejected sequence of a validated preference row, each as the supervised
  row it is encoded as: a chat row (the prompt's turns carry no loss) or a completion row."""
  prompt, chosen, rejected, conversational = split_row(origin, row)
  if conversational:
    head = [dict(m, weight=0) for m in prompt]  # earlier assistant turns of the prompt: no loss
    side = lambda msgs: formats.Row("chat", messages=head + [dict(m, weight=1) for m in msgs])
  else:
    side = lambda text: formats.Row("completion", prompt=prompt, completion=text)
  return side(chosen), side(rejected)


def encode_side(origin: str, side: formats.Row, encoder: Encoder) -> Example:
  if side.messages is not None:
    return encoder.chat(origin, side.messages)
  return encoder.completion(side.prompt, side.completion)


def encode_row(origin: str, row: dict, encoder: Encoder) -> Pair:
  """A validated preference row as a Pair of Examples (targets: the completions only)."""
  chosen, rejected = sides(origin, row)
  return Pair(encode_side(origin, chosen, encoder), encode_side(origin, rejected, encoder))


def check_row(origin: str, row) -> None:
  """DataError naming the row when it is not a preference row."""
  if not is_preference(row):
    other = formats.detect(origin, row)
    raise DataError(f"{origin}: a {other} row in a preference run: each row needs prompt, "
                    "chosen and rejected (or train.objective=sft)")


def check_format(fmt: str) -> None:
  if fmt not in ("auto", "preference"):
    raise ConfigError(f"data.format={fmt!r}: a preference objective reads preference rows "
                      "(data.format=auto or preference)")


def fit(pair: Pair, max_len: int) -> tuple[Pair, bool]:
  """The pair cut to fit one row of max_len positions, and whether it was cut."""
  if pair.size <= max_len:
    return pair, False
  return _truncate(pair, max_len), True


def _truncate(pair: Pair, max_len: int) -> Pair:
  """Shortens the longer sequence(s) so that the pair fits one row of max_len positions."""
  nc, nr = len(pair.chosen.ids) - 1, len(pair.rejected.ids) - 1
  half = max_len // 2
  if nc <= half:
    nr = max_len - nc
  elif nr <= half:
    nc = max_len - nr
  else:
    nc, nr = half, max_len - half
  cut = lambda e, n: Example(e.ids[:n + 1], e.mask[:n + 1])
  return Pair(cut(pair.chosen, nc), cut(pair.rejected, nr))


def load_pairs(spec: str, encoder: Encoder, fmt: str, max_len: int, vocab_size: int = 0) -> PairDataset:
  """Reads and tokenizes every preference row of `spec`; pairs longer than a row are truncated.

  Raises DataError naming the file and line of a row that is not a preference row, or when no
  pair has targets on both sides. (vocab_size: unused, as pipeline.load_examples's signature.)"""
  del vocab_size
  check_format(fmt)
  counts: dict[str, int] = collections.Counter()
  pairs, truncated, dropped = [], 0, 0
  for origin, row in sources.read_rows(spec):
    check_row(origin, row)
    pair, cut = fit(encode_row(origin, row, encoder), max_len)
    counts[kind(row)] += 1
    truncated += cut
    if pair.chosen.mask[1:].any() and pair.rejected.mask[1:].any():
      pairs.append(pair)
    else:
      dropped += 1
  if not pairs:
    raise DataError(f"{spec}: no preference pair has target tokens on both sides")
  targets = sum(int(p.chosen.mask[1:].sum() + p.rejected.mask[1:].sum()) for p in pairs)
  logging.info("%s: %d pairs (%s), %d truncated to %d tokens, %d dropped without targets",
               spec, len(pairs), dict(counts), truncated, max_len, dropped)
  tokens = sum(len(p.chosen.ids) + len(p.rejected.ids) for p in pairs)
  return PairDataset(pairs, dict(counts), truncated, targets, tokens, dropped)


def kind(row: dict) -> str:
  """A preference row's format: conversational (message lists) or standard (strings)."""
  return "conversational" if isinstance(row["chosen"], list) else "standard"


def rows_of(pairs: list[Pair], max_len: int, packing: bool) -> list[list[Pair]]:
  """Groups pairs into rows: greedily packed, or one pair per row."""
  if not packing:
    return [[p] for p in pairs]
  rows, cur, used = [], [], 0
  for p in pairs:
    if cur and used + p.size > max_len:
      rows.append(cur)
      cur, used = [], 0
    cur.append(p)
    used += p.size
  if cur:
    rows.append(cur)
  return rows


def make_batch(rows: list[list[Pair]], max_len: int, num_rows: int) -> Batch:
  """Arrays [num_rows, max_len] of rows of pairs (segments 2k+1 chosen, 2k+2 rejected)."""
  b = pipeline.make_batch([], max_len, num_rows)
  b["ref_logps"] = np.zeros((num_rows, max_len), np.float32)
  for r, row in enumerate(rows):
    t = 0
    for k, pair in enumerate(row):
      for j, e in enumerate((pair.chosen, pair.rejected)):
        n = len(e.ids) - 1
        b["inputs"][r, t:t + n] = e.ids[:-1]
        b["targets"][r, t:t + n] = e.ids[1:]
        b["weights"][r, t:t + n] = e.mask[1:]
        b["positions"][r, t:t + n] = np.arange(n)
        b["segment_ids"][r, t:t + n] = 2 * k + 1 + j
        if pair.ref is not None:
          b["ref_logps"][r, t:t + n] = pair.ref[j]
        t += n
  return b


class PairStream(pipeline.TrainStream):
  """TrainStream over pairs: the same deterministic, resumable order (pipeline.Position)."""
  _group = staticmethod(rows_of)
  _stack = staticmethod(make_batch)


def eval_batches(pairs: list[Pair], max_len: int, rows_per_batch: int,
                 packing: bool) -> Iterator[Batch]:
  """Every pair once, in file order; the last batch is padded with empty rows."""
  rows = rows_of(pairs, max_len, packing)
  for i in range(0, len(rows), rows_per_batch):
    yield make_batch(rows[i:i + rows_per_batch], max_len, rows_per_batch)


def attach_reference(pairs: list[Pair], logps: Callable[[Batch], np.ndarray], max_len: int,
                     rows_per_batch: int) -> None:
  """Stores in each pair the reference log-probabilities of its target positions.

  logps(batch) -> [rows, max_len] log-probabilities of batch["targets"] under the reference
  model. One pass over the pairs (packed rows: segments never see each other, so a token's
  log-probability does not depend on its row-mates)."""
  rows = rows_of(pairs, max_len, True)
  for i in range(0, len(rows), rows_per_batch):
    chunk = rows[i:i + rows_per_batch]
    lp = np.asarray(logps(make_batch(chunk, max_len, rows_per_batch)), np.float32)
    for r, row in enumerate(chunk):
      t = 0
      for pair in row:
        nc, nr = len(pair.chosen.ids) - 1, len(pair.rejected.ids) - 1
        pair.ref = (lp[r, t:t + nc].copy(), lp[r, t + nc:t + nc + nr].copy())
        t += nc + nr
