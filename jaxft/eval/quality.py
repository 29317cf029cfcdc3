"""The quality part of jaxft.evaluate: scores each greedy answer (outcome, style, confidence), turns
the per-row scores of the base and the tuned model into rates with 95% bootstrap intervals and
paired tests (metrics.py), and renders them as a Markdown table and a reliability plot.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Sequence

import numpy as np

from jaxft import files
from jaxft.eval import metrics as em

RELIABILITY_PLOT = "reliability.png"


@dataclasses.dataclass
class Scored:
  """Per-row scores of one model's answers (rows with a reference)."""
  exact: np.ndarray        # bool: equal to the reference after stripping whitespace
  normalized: np.ndarray   # bool: equal after normalisation
  outcome: list[str]       # correct | abstained | hallucinated
  confidence: np.ndarray   # mean token probability
  style: dict[str, np.ndarray]  # rule -> bool passed

  def of(self, kind: str) -> np.ndarray:
    return np.asarray([o == kind for o in self.outcome], bool)

  @property
  def style_all(self) -> np.ndarray:
    out = np.ones(len(self.outcome), bool)
    for passed in self.style.values():
      out &= passed
    return out


def score(answers: Sequence[str], confidences: Sequence[float], exact: Sequence[bool],
          normalized: Sequence[bool], answerable: Sequence[bool], st: em.Settings,
          right: Sequence[bool] | None = None) -> Scored:
  """Scores the answers of one model; `right` (by default `normalized`: the answer matches the
  reference after normalisation; `eval.correct` chooses) decides `correct`."""
  right = normalized if right is None else right
  outcome = [em.outcome(m, em.abstains(a, st.abstain), ok)
             for a, m, ok in zip(answers, right, answerable)]
  checks = [st.style.check(a) for a in answers]
  style = {rule: np.asarray([c[rule] for c in checks], bool) for rule in st.style.rules}
  return Scored(np.asarray(exact, bool), np.asarray(normalized, bool), outcome,
                np.asarray(confidences, np.float64), style)


def _right(s: Scored, answerable: np.ndarray) -> np.ndarray:
  # What calibration scores confidence against: correct, or an abstention where none is known.
  return s.of(em.CORRECT) | (s.of(em.ABSTAINED) & ~answerable)


def _statistics(s: Scored, answerable: np.ndarray, st: em.Settings) -> dict[str, tuple]:
  """name -> (label, statistic); the order is the report's."""
  n_ans, n_unans = int(answerable.sum()), int((~answerable).sum())
  stats = {}
  if n_ans:
    stats["exact_match"] = ("exact match (answerable rows)", em.rate(s.exact, answerable))
    stats["normalized_match"] = ("normalised match (answerable rows)",
                                 em.rate(s.normalized, answerable))
  stats["correct"] = ("correct", em.rate(s.of(em.CORRECT)))
  stats["abstained"] = ("abstained", em.rate(s.of(em.ABSTAINED)))
  stats["hallucinated"] = ("hallucinated", em.rate(s.of(em.HALLUCINATED)))
  if n_ans and n_unans:
    stats["hallucinated_answerable"] = ("hallucinated (answerable rows)",
                                        em.rate(s.of(em.HALLUCINATED), answerable))
    stats["hallucinated_unanswerable"] = ("hallucinated (unanswerable rows)",
                                          em.rate(s.of(em.HALLUCINATED), ~answerable))
    # Abstaining where an answer is known: what a reward for "I don't know." can overdo.
    stats["abstained_answerable"] = ("abstained (answerable rows)",
                                     em.rate(s.of(em.ABSTAINED), answerable))
  for rule, passed in s.style.items():
    stats[f"style_{rule}"] = (f"style: {rule}", em.rate(passed))
  if s.style:
    stats["style_all"] = ("style: every rule", em.rate(s.style_all))
  stats["mean_confidence"] = ("mean confidence", em.Mean(s.confidence))
  stats["ece"] = (f"calibration error (ECE, {st.bins} bins)",
                  em.ECE(s.confidence, _right(s, answerable), st.bins))
  stats["hallucinated_when_confident"] = (
      f"hallucinated among confident answers (>= {st.confident:g})",
      em.rate(s.of(em.HALLUCINATED), s.confidence >= st.confident, paired_binary=False))
  return stats


def summarize(models: dict[str, Scored], answerable: Sequence[bool], st: em.Settings) -> dict:
  """{"settings", "rows", "metrics": {name: {"label", "rows", MODEL: {value, ci}, "difference"?}},
  "reliability": {MODEL: bins}}; "difference" (tuned - base, interval, p, test) when both are
  given. Every interval comes from the same seeded resamples of the rows."""
  answerable = np.asarray(answerable, bool)
  n = len(answerable)
  weights = em.resample_weights(n, st.bootstrap, st.seed)
  stats = {m: _statistics(s, answerable, st) for m, s in models.items()}
  first = next(iter(stats.values()))
  metrics = {}
  for name, (label, stat) in first.items():
    row = {"label": label}
    for m in models:
      st_m = stats[m][name][1]
      row[m] = em.interval(st_m, weights)
      row[m]["rows"] = st_m.count if isinstance(st_m, em.Rate) else n
    if "base" in models and "tuned" in models:
      row["difference"] = em.paired(stats["base"][name][1], stats["tuned"][name][1], weights)
    metrics[name] = row
  return {
      "settings": {"abstain_patterns": [p.pattern for p in st.abstain],
                   "style_rules": list(st.style.rules), "confident": st.confident,
                   "calibration_bins": st.bins, "bootstrap_resamples": st.bootstrap,
                   "seed": st.seed, "level": em.LEVEL, "correct": st.correct,
                   "interval": "percentile bootstrap over rows",
                   "test": "McNemar exact (per-row yes/no rates over the same rows), paired "
                           "bootstrap (otherwise)"},
      "rows": n, "answerable_rows": int(answerable.sum()),
      "metrics": metrics,
      "reliability": {m: em.reliability(s.confidence, _right(s, answerable), st.bins)
                      for m, s in models.items()}}


def _num(v, signed=False) -> str:
  return "n/a" if v is None else (f"{v:+.3f}" if signed else f"{v:.3f}")


def _with_ci(d: dict, signed=False) -> str:
  if d["value"] is None:
    return "n/a"
  ci = d["ci"]
  return _num(d["value"], signed) + (f" [{_num(ci[0], signed)}, {_num(ci[1], signed)}]"
                                     if ci else "")


def _p(d: dict) -> str:
  if d["p"] is None:
    return "n/a"
  p = f"{d['p']:.3f}" if d["p"] >= 0.001 else "<0.001"
  return f"{p} ({d['test']})"


def table(summary: dict, models: list[str]) -> list[str]:
  """The Markdown lines of the quality table: one row per metric, each model's value with its
  95% interval, and (base and tuned) the difference with its interval and p-value."""
  both = "base" in models and "tuned" in models
  head = "| metric | rows | " + " | ".join(f"{m} [95% CI]" for m in models)
  head += " | tuned - base [95% CI] | p (test) |" if both else " |"
  lines = [head, "|---" * (len(models) + 2 + 2 * both) + "|"]
  for row in summary["metrics"].values():
    counts = sorted({row[m]["rows"] for m in models})
    rows = (str(counts[0]) if len(counts) == 1
            else " / ".join(f"{m} {row[m]['rows']}" for m in models))
    cells = [row["label"], rows] + [_with_ci(row[m]) for m in models]
    if both:
      cells += [_with_ci(row["difference"], signed=True), _p(row["difference"])]
    lines.append("| " + " | ".join(cells) + " |")
  return lines


_MATCH_WORDS = {"exact": "exact match", "normalized": "normalised match",
                "contains": "the reference inside the answer"}


def section(summary: dict, models: list[str], plot: str | None) -> list[str]:
  """The report's section on hallucination, style and calibration."""
  s = summary["settings"]
  n, k = summary["rows"], summary["answerable_rows"]
  lines = ["## Hallucination, style and calibration", "",
           f"{n} rows with a reference, {k} answerable, {n - k} unanswerable. Outcome of an answer: "
           f"correct ({_MATCH_WORDS[s.get('correct', 'normalized')]} on an answerable row), "
           "abstained (matches an abstention "
           "pattern) or hallucinated (neither). Confidence: the mean probability of the answer's "
           "tokens; calibration scores it against being right (correct, or an abstention on an "
           "unanswerable row). Intervals: 95% percentile bootstrap over rows "
           f"({s['bootstrap_resamples']} resamples, seed {s['seed']}); the difference uses the same "
           "resamples for both models (paired); p: McNemar's exact test for per-row rates, the "
           "paired bootstrap for the others. An interval that collapses to a point (a rate of 0 "
           "or 1) means no counterexample in these rows, not certainty.", ""]
  lines += table(summary, models)
  if s["style_rules"]:
    lines += ["", "Style rules: " + ", ".join(s["style_rules"]) + " (eval.style)."]
  if plot:
    lines += ["", f"Reliability (accuracy against confidence per bin): ![reliability]({plot})"]
  return lines + [""]


def write_reliability_plot(path: str, summary: dict) -> str:
  """Accuracy against mean confidence per bin, one series per model, over the diagonal of perfect
  calibration; written atomically as a PNG. Returns the path."""
  import matplotlib
  matplotlib.use("Agg")
  from matplotlib.figure import Figure
  fig = Figure(figsize=(5.5, 5), dpi=100)
  ax = fig.add_subplot()
  ax.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
  colors = {"base": "tab:gray", "tuned": "tab:blue"}
  for m, bins in summary["reliability"].items():
    if not bins:
      continue
    x = [b["confidence"] for b in bins]
    y = [b["accuracy"] for b in bins]
    size = [20 + 200 * b["count"] / summary["rows"] for b in bins]
    ece = summary["metrics"]["ece"][m]["value"]
    ax.plot(x, y, "-", color=colors.get(m), alpha=0.6)
    ax.scatter(x, y, s=size, color=colors.get(m), label=f"{m} (ECE {ece:.3f})", zorder=3)
  ax.set_xlim(-0.02, 1.02)
  ax.set_ylim(-0.02, 1.02)
  ax.set_xlabel("confidence (mean token probability), bin mean")
  ax.set_ylabel("accuracy (right answers) in the bin")
  ax.set_title("Reliability (marker area: rows in the bin)")
  ax.grid(alpha=0.3)
  ax.legend(loc="upper left")
  fig.tight_layout()
  with files.atomic_open(path, "wb") as f:
    fig.savefig(f, format="png")
  return path


def plot_path(out_dir: str) -> str:
  return os.path.join(out_dir, RELIABILITY_PLOT)
