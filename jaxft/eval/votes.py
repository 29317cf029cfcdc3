"""The votes of jaxft.serve's /compare page (blind side-by-side human evaluation), as evaluation
reads them: one JSON line per vote in WORKDIR/votes.jsonl, {"time", "prompt", "a", "b",
"answer_a", "answer_b", "winner"} with winner a model name or "tie". Writing them is the page's
(jaxft/serving/compare.py, `Ballots`); reading and scoring them is here, so that serving imports
evaluation and never the reverse.
"""

from __future__ import annotations

import json
import os

import numpy as np

from jaxft.errors import DataError

VOTES = "votes.jsonl"


def read_votes(path: str) -> list[dict]:
  """The votes of a votes file (torn last line dropped); DataError naming file:line for a row
  that is not a vote."""
  rows = []
  if not os.path.isfile(path):
    return rows
  with open(path, encoding="utf-8", errors="replace") as f:
    lines = f.read().splitlines()
  for i, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      row = json.loads(line)
    except ValueError:
      if i == len(lines):
        continue  # a vote being written when the server died
      raise DataError(f"{path}:{i}: malformed JSON") from None
    if not isinstance(row, dict) or not {"a", "b", "winner"} <= row.keys():
      raise DataError(f"{path}:{i}: expected a vote with a, b and winner")
    rows.append(row)
  return rows


def _oriented(x: str, y: str, tuned: str) -> tuple[str, str]:
  """The pair as (a, b) with `a` the model whose win rate is the headline: the tuned one (named
  `tuned`), else whichever is not the base, else in name order."""
  if y == tuned or x == "base" and y != tuned:
    return y, x
  if x == tuned or y == "base":
    return x, y
  return tuple(sorted((x, y)))


def win_rates(votes: list[dict], resamples: int = 2000, seed: int = 0,
              tuned: str = "") -> list[dict]:
  """Per model pair: votes, wins of each side, ties, and the win rate of `a` over `b` (ties count
  half) with a 95% bootstrap interval over votes. `a` is the tuned model (`tuned`, the name the
  server gave it) or, in a pair with `base`, the other one: the headline is the fine-tuned
  model's win rate, not the base's."""
  pairs: dict[tuple[str, str], list[float]] = {}
  for v in votes:
    a, b = _oriented(v["a"], v["b"], tuned)
    score = 0.5 if v["winner"] == "tie" else float(v["winner"] == a)
    pairs.setdefault((a, b), []).append(score)
  rng = np.random.default_rng(seed)
  out = []
  for (a, b), scores in sorted(pairs.items()):
    x = np.asarray(scores)
    boot = x[rng.integers(0, len(x), (resamples, len(x)))].mean(axis=1)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    out.append({"a": a, "b": b, "votes": len(x), "a_wins": int((x == 1).sum()),
                "b_wins": int((x == 0).sum()), "ties": int((x == 0.5).sum()),
                "a_win_rate": float(x.mean()), "ci95": [float(lo), float(hi)]})
  return out
