"""What an answer is worth beyond exact match: abstentions and hallucinations, a style rubric,
calibration, and bootstrap intervals. Pure functions of per-row arrays (numpy); jaxft.evaluate
feeds them the greedy answers of the base and the tuned model (quality.py).

- Outcome of an answer to a row with a reference: `correct` (an answerable row, and the answer
  matches the reference after normalisation), `abstained` (it matches one of eval.abstain_patterns)
  or `hallucinated` (neither). On a row marked `"answerable": false` every answer but an
  abstention is a hallucination.
- Style: each active rule of eval.style passes or fails per answer.
- Calibration: an answer's confidence is the mean probability of its tokens and of the end token
  (jaxft.inference.confidence, computed as it decodes); it is `right` when correct, or an
  abstention on an unanswerable row. The expected calibration error (ECE) over equal-width bins
  is sum_b n_b/n |accuracy_b - confidence_b|.
- Intervals: percentile bootstrap over rows (95%, seeded). Base against tuned: both are
  evaluated on the same resamples (paired bootstrap) for the interval of the difference; the
  p-value is McNemar's exact test for per-row yes/no rates, the paired bootstrap otherwise.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Sequence

import numpy as np

from jaxft.errors import ConfigError

CORRECT, ABSTAINED, HALLUCINATED = "correct", "abstained", "hallucinated"
OUTCOMES = (CORRECT, ABSTAINED, HALLUCINATED)
LEVEL = 0.95  # the coverage of every interval


# -- the settings (config.eval), checked before any weights load ---------------------------------

@dataclasses.dataclass(frozen=True)
class Style:
  """The style rubric: a rule is active when it is set (non-zero, non-empty)."""
  max_words: int = 0
  min_words: int = 0
  must_match: re.Pattern | None = None
  must_not_contain: tuple[str, ...] = ()

  @property
  def rules(self) -> tuple[str, ...]:
    """Names of the active rules, in a fixed order."""
    active = {"max_words": self.max_words > 0, "min_words": self.min_words > 0,
              "must_match": self.must_match is not None,
              "must_not_contain": bool(self.must_not_contain)}
    return tuple(k for k, on in active.items() if on)

  def check(self, answer: str) -> dict[str, bool]:
    """{rule: passed} for each active rule."""
    words = len(answer.split())
    low = answer.lower()
    passed = {"max_words": lambda: words <= self.max_words,
              "min_words": lambda: words >= self.min_words,
              "must_match": lambda: self.must_match.search(answer) is not None,
              "must_not_contain": lambda: not any(p.lower() in low for p in self.must_not_contain)}
    return {rule: passed[rule]() for rule in self.rules}


MATCHES = ("exact", "normalized", "contains")


@dataclasses.dataclass(frozen=True)
class Settings:
  abstain: tuple[re.Pattern, ...]
  style: Style
  confident: float = 0.9
  bins: int = 10
  bootstrap: int = 2000
  seed: int = 0
  correct: str = "normalized"  # which match makes an answer correct: exact | normalized | contains


def _regex(pattern, key: str, flags: int = 0) -> re.Pattern:
  if not isinstance(pattern, str) or not pattern:
    raise ConfigError(f"{key}={pattern!r}: expected a non-empty regular expression string")
  try:
    return re.compile(pattern, flags)
  except re.error as e:
    raise ConfigError(f"{key}={pattern!r}: not a valid regular expression ({e})") from None


def _strings(value, key: str) -> tuple[str, ...]:
  if isinstance(value, str) or not isinstance(value, (tuple, list)) or not all(
      isinstance(v, str) and v for v in value):
    raise ConfigError(f"{key}={value!r}: expected a tuple of non-empty strings, e.g. "
                      f"--config.{key}=\"('a', 'b')\"")
  return tuple(value)


def settings(ev) -> Settings:
  """Settings from config.eval; ConfigError names the key of a bad value (a regex that does not
  compile, a threshold outside [0, 1], ...)."""
  pats = _strings(ev.abstain_patterns, "eval.abstain_patterns") if ev.abstain_patterns else ()
  abstain = tuple(_regex(p, f"eval.abstain_patterns[{i}]", re.IGNORECASE)
                  for i, p in enumerate(pats))
  st = ev.style
  for key in ("max_words", "min_words"):
    if not isinstance(st[key], int) or st[key] < 0:
      raise ConfigError(f"eval.style.{key}={st[key]!r}: must be an integer >= 0 (0 = off)")
  if st.max_words and st.min_words > st.max_words:
    raise ConfigError(f"eval.style.min_words={st.min_words} is above eval.style.max_words="
                      f"{st.max_words}: no answer could pass")
  style = Style(st.max_words, st.min_words,
                _regex(st.must_match, "eval.style.must_match") if st.must_match else None,
                _strings(st.must_not_contain, "eval.style.must_not_contain")
                if st.must_not_contain else ())
  if not (isinstance(ev.confident, (int, float)) and 0 <= ev.confident <= 1):
    raise ConfigError(f"eval.confident={ev.confident!r}: must be a probability in [0, 1]")
  if not 1 <= ev.calibration_bins <= 1000:
    raise ConfigError(f"eval.calibration_bins={ev.calibration_bins}: must be in [1, 1000]")
  if not 100 <= ev.bootstrap <= 1_000_000:
    raise ConfigError(f"eval.bootstrap={ev.bootstrap}: must be in [100, 1000000] (resamples "
                      "for the 95% intervals)")
  if not 0 <= ev.seed < 2**63:
    raise ConfigError(f"eval.seed={ev.seed}: must be in [0, 2**63)")
  if ev.correct not in MATCHES:
    raise ConfigError(f"eval.correct={ev.correct!r}: expected one of {', '.join(MATCHES)}")
  return Settings(abstain, style, float(ev.confident), int(ev.calibration_bins),
                  int(ev.bootstrap), int(ev.seed), ev.correct)


# -- per answer ----------------------------------------------------------------------------------

def abstains(answer: str, patterns: Sequence[re.Pattern]) -> bool:
  """Whether the answer matches any abstention pattern (searched anywhere in it)."""
  return any(p.search(answer) for p in patterns)


def outcome(matches_reference: bool, abstained: bool, answerable: bool) -> str:
  """correct, abstained or hallucinated (see the module docstring). A right answer counts as
  correct even if it also matches an abstention pattern."""
  if answerable and matches_reference:
    return CORRECT
  return ABSTAINED if abstained else HALLUCINATED


# -- statistics over rows, for one weighting of the rows -----------------------------------------
# A statistic maps row weights w [..., n] (ones: the data as it is; multinomial counts: a
# bootstrap resample) to values [...], so thousands of resamples are one matrix product.

@dataclasses.dataclass(frozen=True)
class Rate:
  """sum(w * hit) / sum(w * among): the rate of `hit` among the rows in `among` (NaN if none).
  `paired_binary` says the rows in `among` are fixed (not model-dependent), so McNemar applies."""
  hit: np.ndarray
  among: np.ndarray
  paired_binary: bool = True

  def __call__(self, w: np.ndarray) -> np.ndarray:
    den = w @ self.among.astype(np.float64)
    num = w @ (self.hit & self.among).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
      return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)

  @property
  def count(self) -> int:
    return int(self.among.sum())


def rate(hit, among=None, paired_binary: bool = True) -> Rate:
  hit = np.asarray(hit, bool)
  return Rate(hit, np.ones_like(hit) if among is None else np.asarray(among, bool), paired_binary)


@dataclasses.dataclass(frozen=True)
class Mean:
  """The weighted mean of a per-row value."""
  values: np.ndarray

  def __call__(self, w: np.ndarray) -> np.ndarray:
    return (w @ self.values) / w.sum(-1)


def _bin_of(conf: np.ndarray, bins: int) -> np.ndarray:
  # Equal-width bins over [0, 1]; a confidence of exactly 1 goes in the last bin.
  return np.minimum((np.clip(conf, 0.0, 1.0) * bins).astype(np.int64), bins - 1)


@dataclasses.dataclass(frozen=True)
class ECE:
  """Expected calibration error: sum over bins of |sum(w * (right - confidence))| / sum(w), which
  is sum_b n_b/n |accuracy_b - confidence_b|."""
  conf: np.ndarray
  right: np.ndarray
  bins: int = 10

  def __call__(self, w: np.ndarray) -> np.ndarray:
    onehot = (_bin_of(self.conf, self.bins)[:, None] == np.arange(self.bins)).astype(np.float64)
    gap = w @ (onehot * (self.right.astype(np.float64) - self.conf)[:, None])  # [..., bins]
    return np.abs(gap).sum(-1) / w.sum(-1)


def ece(conf, right, bins: int = 10) -> float:
  """The expected calibration error of confidences in [0, 1] against 0/1 outcomes."""
  conf = np.asarray(conf, np.float64)
  return float(ECE(conf, np.asarray(right, bool), bins)(np.ones(len(conf))))


def reliability(conf, right, bins: int = 10) -> list[dict]:
  """Per non-empty bin: its range, the count, the mean confidence and the accuracy."""
  conf, right = np.asarray(conf, np.float64), np.asarray(right, bool)
  b = _bin_of(conf, bins)
  out = []
  for i in range(bins):
    m = b == i
    if m.any():
      out.append({"bin": [i / bins, (i + 1) / bins], "count": int(m.sum()),
                  "confidence": float(conf[m].mean()), "accuracy": float(right[m].mean())})
  return out


# -- intervals and tests -------------------------------------------------------------------------

def resample_weights(n: int, resamples: int, seed: int) -> np.ndarray:
  """[resamples, n] multinomial counts: row i drawn w[b, i] times in bootstrap resample b."""
  rng = np.random.default_rng(seed)
  rows = rng.integers(0, n, size=(resamples, n))
  flat = (np.arange(resamples)[:, None] * n + rows).ravel()
  return np.bincount(flat, minlength=resamples * n).reshape(resamples, n).astype(np.float64)


def _percentiles(values: np.ndarray) -> list[float] | None:
  values = values[np.isfinite(values)]
  if not len(values):
    return None
  tail = 100 * (1 - LEVEL) / 2
  lo, hi = np.percentile(values, [tail, 100 - tail])
  return [float(lo), float(hi)]


def interval(stat, weights: np.ndarray) -> dict:
  """{"value": the statistic on the data, "ci": its 95% percentile-bootstrap interval} (None
  where undefined, e.g. a rate among no rows)."""
  value = float(stat(np.ones(weights.shape[1])))
  return {"value": None if math.isnan(value) else value,
          "ci": None if math.isnan(value) else _percentiles(stat(weights))}


def mcnemar(a: np.ndarray, b: np.ndarray) -> float:
  """Two-sided exact McNemar p-value for paired yes/no outcomes: under no difference the
  discordant pairs split as a fair coin."""
  a, b = np.asarray(a, bool), np.asarray(b, bool)
  n01, n10 = int((~a & b).sum()), int((a & ~b).sum())
  n, k = n01 + n10, min(n01, n10)
  if n == 0:
    return 1.0
  tail = sum(math.comb(n, i) for i in range(k + 1))
  return min(1.0, 2 * tail / 2**n)  # exact integer arithmetic, one rounding


def paired(base, tuned, weights: np.ndarray) -> dict:
  """tuned - base on the data, its 95% paired-bootstrap interval (both statistics on the same
  resamples), and a two-sided p-value for no difference: McNemar's exact test when both are
  Rates over the same rows, else the paired bootstrap's."""
  ones = np.ones(weights.shape[1])
  value = float(tuned(ones) - base(ones))
  if math.isnan(value):
    return {"value": None, "ci": None, "p": None, "test": None}
  diffs = tuned(weights) - base(weights)
  if (isinstance(base, Rate) and isinstance(tuned, Rate) and base.paired_binary
      and tuned.paired_binary and np.array_equal(base.among, tuned.among)):
    m = base.among
    p, test = mcnemar(base.hit[m], tuned.hit[m]), "McNemar"
  else:
    d = diffs[np.isfinite(diffs)]
    # Two-sided: twice the smaller share of resamples on either side of 0 (+1 smoothing, so a
    # p-value is never 0 from finitely many resamples).
    side = min(int((d <= 0).sum()), int((d >= 0).sum()))
    p, test = min(1.0, 2 * (side + 1) / (len(d) + 1)), "paired bootstrap"
  return {"value": value, "ci": _percentiles(diffs), "p": p, "test": test}
