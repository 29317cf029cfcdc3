"""The built-in reward functions, with TRL's calling convention.

A reward function is called as `f(prompts=..., completions=..., **fields)` and returns one number
per completion. `completions` are the completion texts (a TRL chat completion, a list of messages,
is read as its last message's content); `fields` are the columns of the prompt rows, each a list
with one value per completion (None where a row lacks the key), e.g. `answer=[...]`,
`answerable=[...]`, plus what the caller adds (`completion_ids`). Each builder below returns such
a function, which TRL's GRPOTrainer could call too; jaxft/rl/scoring.py says how the config names
them (`match:contains`, `abstain`, ...).

  match_reward(mode, field)   1 where the completion matches one of the row's answers (the
        field: a string, a number or a list of accepted answers; null: none, 0), else 0. Modes:
        `normalised` (also `normalized`: equal after lower-casing and removing punctuation,
        articles and extra whitespace, SQuAD's normalisation, as jaxft.evaluate's), `exact`
        (equal after stripping surrounding whitespace), `contains` (the normalised answer
        appears, as whole words, in the normalised completion).
  format_reward(regex, mode)  1 where the regex matches the whole completion (`full`) or is
        found in it (`search`), else 0 (Python `re`; `(?s)` lets `.` cross lines).
  abstain_reward(field)       +1 for abstaining where the row's field (`answerable`) is false,
        -1 for abstaining where it is true or absent, 0 for an answer that does not abstain. A
        completion abstains when one of the abstention patterns is found in it (case-
        insensitive): by default ABSTAIN_PATTERNS, the defaults of jaxft.evaluate's
        eval.abstain_patterns ("I don't know", "I'm not sure", "I cannot answer", ...), so the
        reward pays what the evaluation counts as abstained.
  length_reward(target, unit) 0 up to `target` units, then -(excess / target), at least -1 (at
        twice the target). Units: words (whitespace-separated), chars, or tokens (the length of
        the `completion_ids` field).

A row field a built-in cannot read (no row has the match field, `answerable` not true or false)
is a DataError.
"""

from __future__ import annotations

import re
import string
from typing import Callable, Sequence

from jaxft.errors import DataError

MATCH_MODES = ("normalised", "normalized", "exact", "contains")
LENGTH_UNITS = ("words", "chars", "tokens")
# The same patterns as configs/base.py's eval.abstain_patterns (tests/test_rewards.py checks).
ABSTAIN_PATTERNS = (
    r"\bi (?:don['’]?t|do not) know\b", r"\bi(?:['’]?m| am) not sure\b",
    r"\b(?:can['’]?t|cannot|unable to) (?:answer|say|tell)\b",
    r"\bno (?:such|known|reliable) (?:country|place|person|thing|answer|information|record)",
    r"\bnot (?:a real|aware of)\b")


def _text(completion) -> str:
  if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
    return str(completion[-1].get("content", ""))  # a TRL chat completion: its last message
  return str(completion)


def normalize(text: str) -> str:
  """Lower case, no punctuation, no articles (a, an, the), single spaces (SQuAD's, as
  jaxft.evaluate's normalised match)."""
  text = "".join(ch for ch in text.lower() if ch not in string.punctuation)
  return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def _references(value, name: str, field: str, i: int) -> list[str]:
  if value is None:
    return []
  items = value if isinstance(value, (list, tuple)) else [value]
  for v in items:
    if isinstance(v, bool) or not isinstance(v, (str, int, float)):
      raise DataError(f"reward {name}: field {field!r} of completion {i}'s row must be a string, "
                      f"a number or a list of them, got {value!r:.60}")
  return [str(v) for v in items]


def _matches(mode: str, text: str, ref: str) -> bool:
  if mode == "exact":
    return text.strip() == ref.strip()
  if mode == "contains":
    ref = normalize(ref)
    return bool(ref) and f" {ref} " in f" {normalize(text)} "
  return normalize(text) == normalize(ref)


def match_reward(mode: str = "normalised", field: str = "answer") -> Callable:
  """1.0 where the completion matches one of the row's `field` answers under `mode` (module
  docstring), else 0.0. Raises DataError when no row has `field` or a value is not text."""
  name = f"match:{mode}:{field}"

  def match(prompts=None, completions=(), **fields):
    if field not in fields:
      raise DataError(f"reward {name}: the prompt rows have no field {field!r}")
    return [float(any(_matches(mode, _text(c), r) for r in _references(v, name, field, i)))
            for i, (c, v) in enumerate(zip(completions, fields[field]))]
  return match


def format_reward(regex: str, mode: str = "full") -> Callable:
  """1.0 where `regex` matches the whole completion (mode "full") or is found in it ("search")."""
  pattern = re.compile(regex)
  test = pattern.fullmatch if mode == "full" else pattern.search

  def format_(prompts=None, completions=(), **fields):
    return [float(test(_text(c)) is not None) for c in completions]
  return format_


def abstains(text: str, patterns: Sequence[re.Pattern]) -> bool:
  """Whether the completion abstains: one of `patterns` is found in it."""
  return any(p.search(text) for p in patterns)


def abstain_reward(field: str = "answerable", patterns: Sequence[str] = ABSTAIN_PATTERNS):
  """+1.0 for abstaining where the row's `field` is false, -1.0 for abstaining where it is true
  or absent, 0.0 for not abstaining. Raises DataError on a value other than true, false, null."""
  compiled = tuple(re.compile(p, re.IGNORECASE) for p in patterns)

  def abstain(prompts=None, completions=(), **fields):
    out = []
    for i, c in enumerate(completions):
      answerable = fields.get(field, [None] * len(completions))[i]
      if answerable is None:
        answerable = True  # as jaxft.evaluate: a row is answerable unless it says otherwise
      if not isinstance(answerable, bool):
        raise DataError(f"reward abstain: field {field!r} of completion {i}'s row must be true or "
                        f"false, got {answerable!r:.60}")
      out.append((-1.0 if answerable else 1.0) if abstains(_text(c), compiled) else 0.0)
    return out
  return abstain


def length_reward(target: int, unit: str = "words") -> Callable:
  """0.0 up to `target` units, then -(length - target) / target, at least -1.0."""

  def length(prompts=None, completions=(), **fields):
    if unit == "tokens":
      if fields.get("completion_ids") is None:
        raise DataError("reward length:...:tokens needs the completion_ids field")
      sizes = [len(ids) for ids in fields["completion_ids"]]
    else:
      sizes = [len(_text(c).split()) if unit == "words" else len(_text(c)) for c in completions]
    return [-min(1.0, (n - target) / target) if n > target else 0.0 for n in sizes]
  return length
