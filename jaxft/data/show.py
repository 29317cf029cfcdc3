"""What `python -m jaxft.data` prints: the first rows of data.train (or data.eval) as training sees
them, and counts over the whole file. The rows go through training's own path
(`pipeline.encode_rows`: the same reading, format, chat template, tokenization and target mask;
`pipeline.truncate` to data.max_len) and the counts are `pipeline.load_examples`', so what is shown
is what trains.

Each row shows the text the tokenizer reads (the chat template applied), the token ids, and the
text again token by token with the tokens that carry loss marked: in colour on a terminal, else
between « and ». A token carries loss when it is a target that the model predicts: the first token
of an example never does (nothing precedes it).
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np

from jaxft.data import pipeline
from jaxft.data.formats import Example
from jaxft.data.tokenize import Encoder
from jaxft.errors import ConfigError

# ANSI: tokens that carry loss in bold green, the rest dimmed.
_LOSS, _CONTEXT, _RESET = "\x1b[1;32m", "\x1b[2m", "\x1b[0m"
OPEN, CLOSE = "«", "»"


@dataclasses.dataclass
class Shown:
  """One row as training sees it."""
  origin: str  # file:line
  kind: str  # its format
  text: str | None  # what the tokenizer reads (None: a tokens row)
  example: Example  # after truncation, its mask the tokens that carry loss
  tokens_before: int  # before truncation


def spec(config, split: str) -> str:
  """data.train or data.eval; ConfigError naming the key when it is empty, or when the objective
  does not read supervised rows."""
  if config.train.objective != "sft":
    raise ConfigError(f"train.objective={config.train.objective!r}: python -m jaxft.data shows "
                      "supervised rows (train.objective=sft); preference pairs and prompt rows "
                      "are not shown yet")
  pipeline.check_format(config.data.format)
  value = config.data[split]
  if not value:
    raise ConfigError(f"data.{split} is empty: no rows to show")
  return value


def first_rows(config, encoder: Encoder, vocab_size: int, rows: int,
               split: str = "train") -> list[Shown]:
  """The first `rows` rows of data.<split> as training tokenizes, masks and truncates them.
  Raises ConfigError (keys) and DataError (the file and line of a bad row)."""
  if rows < 0:
    raise ConfigError(f"--rows={rows}: must be >= 0")
  path, max_len = spec(config, split), config.data.max_len
  encoder.limit_tokens(max_len + 1)
  out = []
  for origin, r, ex in itertools.islice(
      pipeline.encode_rows(path, encoder, config.data.format, vocab_size), rows):
    cut = pipeline.truncate(ex, max_len)
    mask = cut.mask.copy()
    mask[:1] = False  # the first token is never predicted
    out.append(Shown(origin, r.kind, encoder.text_of(r, origin), Example(cut.ids, mask),
                     len(ex.ids)))
  return out


def counts(config, encoder: Encoder, vocab_size: int, split: str = "train") -> pipeline.Dataset:
  """The whole of data.<split> read as training reads it (pipeline.load_examples)."""
  return pipeline.load_examples(spec(config, split), encoder, config.data.format,
                                config.data.max_len, vocab_size)


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
  head = (f"row {i} ({shown.origin}, {shown.kind}): {len(ex.ids)} tokens, "
          f"{int(ex.mask.sum())} carry loss")
  if shown.tokens_before > len(ex.ids):
    head += (f"; truncated from {shown.tokens_before} tokens to data.max_len={max_len} "
             "(+1: the last token is only a target)")
  lines = [head]
  if shown.text is not None:
    label = "template" if shown.kind in ("chat", "alpaca") else "text"
    lines.append(f"  {label + ':':<10}{_visible(shown.text)}")
  ids = " ".join(_mark(" ".join(str(int(t)) for t in ex.ids[a:b]), loss, color)
                 for a, b, loss in _runs(ex.mask))
  lines.append(f"  {'ids:':<10}{ids}")
  loss_view = "".join(_mark(_visible(p), loss, color) for p, loss in encoder.segments(ex))
  lines.append(f"  {'loss:':<10}{loss_view}")
  return lines


def format_counts(path: str, ds: pipeline.Dataset, max_len: int) -> list[str]:
  """The counts of the whole file: rows (by format), tokens and those that carry loss, rows
  truncated, rows with no target token."""
  kinds = ", ".join(f"{k} {n:,}" for k, n in sorted(ds.formats.items()))
  return [f"{path}:",
          f"  rows:                      {sum(ds.formats.values()):,} ({kinds})",
          f"  tokens:                    {ds.tokens:,} ({ds.target_tokens:,} carry loss)",
          f"  rows truncated:            {ds.truncated:,} (to data.max_len={max_len})",
          f"  rows with no target token: {ds.no_target:,}"]


def legend(color: bool) -> str:
  return ("tokens that carry loss in " + (f"{_LOSS}green{_RESET}, the others "
                                           f"{_CONTEXT}dimmed{_RESET}" if color else
                                           f"{OPEN}guillemets{CLOSE}"))
