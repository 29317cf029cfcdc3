"""What `python -m jaxft.data` prints: the first rows of data.train (or data.eval) as training sees
them, and counts over the whole file. The objective picks what it reads (Objective.preview):
`Supervised` rows go through training's own path (`pipeline.encode_rows`: the same reading,
format, chat template, tokenization and target mask; `pipeline.truncate` to data.max_len) and
their counts are `pipeline.load_examples`'; `Pairs` (the preference objectives') show each row's
chosen and rejected sequences as jaxft.data.preference encodes and cuts them, with load_pairs'
counts. What is shown is what trains.

Each sequence shows the text the tokenizer reads (the chat template applied), the token ids, and
the text again token by token with the tokens that carry loss marked: in colour on a terminal,
else between « and ». A token carries loss when it is a target that the model predicts: the first
token of a sequence never does (nothing precedes it).
"""

from __future__ import annotations

import dataclasses
import itertools
import json

import numpy as np

from jaxft.data import pipeline, preference, sources
from jaxft.data.formats import Example
from jaxft.data.tokenize import Encoder
from jaxft.errors import ConfigError

# ANSI: tokens that carry loss in bold green, the rest dimmed.
_LOSS, _CONTEXT, _RESET = "\x1b[1;32m", "\x1b[2m", "\x1b[0m"
OPEN, CLOSE = "«", "»"


@dataclasses.dataclass
class Shown:
  """One sequence as training sees it."""
  origin: str  # file:line
  kind: str  # its format
  text: str | None  # what the tokenizer reads (None: a tokens row)
  example: Example  # after truncation, its mask the tokens that carry loss
  tokens_before: int  # before truncation
  side: str = ""  # a preference pair's "chosen" or "rejected"
  fields: dict | None = None  # a prompt row's fields for the rewards


@dataclasses.dataclass
class Counts:
  """The whole file as training reads it."""
  formats: dict[str, int]  # rows by format
  tokens: int  # of the rows kept, after truncation
  target_tokens: int  # of those, the tokens that carry loss
  truncated: int  # rows cut to data.max_len
  no_target: int  # rows left with no target token (a pair: on either side; training drops it)
  note: str = ""  # a last line (what the counts mean for this kind of row)
  examples_of: dict = dataclasses.field(default_factory=dict)  # count -> the first rows' file:line


def split_spec(config, split: str) -> str:
  """data.train or data.eval; ConfigError naming the key when it is empty."""
  value = config.data[split]
  if not value:
    raise ConfigError(f"data.{split} is empty: no rows to show")
  return value


def check_rows(n: int) -> None:
  """ConfigError naming --rows when it is negative."""
  if n < 0:
    raise ConfigError(f"--rows={n}: must be >= 0")


def _shown(origin: str, kind: str, text, cut: Example, before: int, side: str = "") -> Shown:
  mask = cut.mask.copy()
  mask[:1] = False  # the first token is never predicted
  return Shown(origin, kind, text, Example(cut.ids, mask), before, side)


class Supervised:
  """Supervised rows (chat, alpaca, completion, text, tokens), as jaxft.objectives.SFT reads them:
  pipeline.encode_rows, truncated to data.max_len; the counts are pipeline.load_examples'."""

  def __init__(self, config, encoder: Encoder, vocab_size: int, split: str = "train"):
    pipeline.check_format(config.data.format)
    self.path = split_spec(config, split)
    self._config, self._enc, self._vocab = config, encoder, vocab_size

  def rows(self, n: int) -> list[Shown]:
    """The first `n` rows. Raises DataError naming the file and line of a bad row."""
    check_rows(n)
    fmt, max_len = self._config.data.format, self._config.data.max_len
    self._enc.limit_tokens(max_len + 1)
    return [_shown(origin, r.kind, self._enc.text_of(r, origin), pipeline.truncate(ex, max_len),
                   len(ex.ids))
            for origin, r, ex in itertools.islice(
                pipeline.encode_rows(self.path, self._enc, fmt, self._vocab), n)]

  def counts(self) -> Counts:
    ds = pipeline.load_examples(self.path, self._enc, self._config.data.format,
                                self._config.data.max_len, self._vocab)
    return Counts(ds.formats, ds.tokens, ds.target_tokens, ds.truncated, ds.no_target,
                  examples_of=ds.examples_of)


class Pairs:
  """Preference pairs, as the preference objectives read them (jaxft.data.preference): each row
  shown as its chosen and its rejected sequence, the pair cut to fit one row of data.max_len; the
  counts are load_pairs'."""

  def __init__(self, config, encoder: Encoder, vocab_size: int, split: str = "train"):
    preference.check_format(config.data.format)
    self.path = split_spec(config, split)
    self._config, self._enc, self._vocab = config, encoder, vocab_size

  def rows(self, n: int) -> list[Shown]:
    """Each of the first `n` rows as its chosen and its rejected sequence."""
    check_rows(n)
    out = []
    for origin, row in itertools.islice(sources.read_rows(self.path), n):
      preference.check_row(origin, row)
      sides = preference.sides(origin, row)
      full = preference.Pair(*(preference.encode_side(origin, s, self._enc) for s in sides))
      pair, _ = preference.fit(full, self._config.data.max_len)
      for name, side, ex, whole in zip(("chosen", "rejected"), sides, (pair.chosen, pair.rejected),
                                       (full.chosen, full.rejected)):
        out.append(_shown(origin, preference.kind(row), self._enc.text_of(side, origin), ex,
                          len(whole.ids), name))
    return out

  def counts(self) -> Counts:
    ds = preference.load_pairs(self.path, self._enc, self._config.data.format,
                               self._config.data.max_len, self._vocab)
    return Counts(ds.formats, ds.tokens, ds.target_tokens, ds.truncated, ds.no_target)


def _visible(text: str) -> str:
  """Newlines, tabs and backslashes escaped, so one row stays on one line."""
  return (text.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r")
          .replace("\t", "\\t"))


def _mark(text: str, loss: bool, color: bool) -> str:
  if color:
    return f"{_LOSS if loss else _CONTEXT}{text}{_RESET}"
  return f"{OPEN}{text}{CLOSE}" if loss else text


def _runs(mask: np.ndarray):
  """(start, end, carries loss) of each run of equal mask values."""
  i = 0
  while i < len(mask):
    j = i
    while j < len(mask) and mask[j] == mask[i]:
      j += 1
    yield i, j, bool(mask[i])
    i = j


def format_row(i: int, shown: Shown, encoder: Encoder, max_len: int, color: bool) -> list[str]:
  """The lines of one shown row: a head with its counts, the text read, the ids and the loss
  view (both with the tokens that carry loss marked)."""
  ex = shown.example
  side = f" {shown.side}" if shown.side else ""
  head = (f"row {i}{side} ({shown.origin}, {shown.kind}): {len(ex.ids)} tokens, "
          f"{int(ex.mask.sum())} carry loss")
  if shown.tokens_before > len(ex.ids):
    head += f"; truncated from {shown.tokens_before} tokens to fit data.max_len={max_len}"
  lines = [head]
  if shown.text is not None:
    label = "template" if shown.kind in ("chat", "alpaca", "conversational", "prompt") else "text"
    lines.append(f"  {label + ':':<10}{_visible(shown.text)}")
  ids = " ".join(_mark(" ".join(str(int(t)) for t in ex.ids[a:b]), loss, color)
                 for a, b, loss in _runs(ex.mask))
  lines.append(f"  {'ids:':<10}{ids}")
  loss_view = "".join(_mark(_visible(p), loss, color) for p, loss in encoder.segments(ex))
  lines.append(f"  {'loss:':<10}{loss_view}")
  if shown.fields:
    lines.append(f"  {'fields:':<10}{json.dumps(shown.fields, ensure_ascii=False)}")
  return lines


def format_counts(path: str, ds: Counts, max_len: int) -> list[str]:
  """The counts of the whole file: rows (by format), tokens and those that carry loss, rows
  truncated, rows with no target token."""
  kinds = ", ".join(f"{k} {n:,}" for k, n in sorted(ds.formats.items()))
  eg = {k: _for_example(path, v) for k, v in ds.examples_of.items()}
  return [f"{path}:",
          f"  rows:                      {sum(ds.formats.values()):,} ({kinds})",
          f"  tokens:                    {ds.tokens:,} ({ds.target_tokens:,} carry loss)",
          f"  rows truncated:            {ds.truncated:,} (to data.max_len={max_len}"
          f"{eg.get('truncated', '')})",
          f"  rows with no target token: {ds.no_target:,}{eg.get('no_target', '')}"] + (
              [f"  ({ds.note})"] if ds.note else [])


def format_rows(path: str, shown: list[Shown], encoder: Encoder, max_len: int,
                color: bool) -> list[str]:
  """A head line naming the file and the legend, then each shown sequence's lines (a pair's two
  sequences under one row number)."""
  if not shown:
    return []
  rows = len({s.origin for s in shown})
  what = "the first row" if rows == 1 else f"the first {rows} rows"
  out = [f"{path}: {what} as training sees {'it' if rows == 1 else 'them'} ({legend(color)})",
         ""]
  number, last = 0, None
  for s in shown:
    if s.origin != last:
      number, last = number + 1, s.origin
    out += format_row(number, s, encoder, max_len, color) + [""]
  return out


def _for_example(path: str, origins: list[str]) -> str:
  """"; e.g. line 4, 7, 8" (origins in `path`), or the origins as they are."""
  if not origins:
    return ""
  if all(o.startswith(path + ":") for o in origins):
    return "; e.g. line " + ", ".join(o[len(path) + 1:] for o in origins)
  return "; e.g. " + ", ".join(origins)


def legend(color: bool) -> str:
  return ("tokens that carry loss in " + (f"{_LOSS}green{_RESET}, the others "
                                           f"{_CONTEXT}dimmed{_RESET}" if color else
                                           f"{OPEN}guillemets{CLOSE}"))
