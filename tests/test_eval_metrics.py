"""Hallucination, style and calibration metrics with bootstrap intervals (jaxft/eval/metrics.py,
jaxft/eval/quality.py): exact rates on hand-built answers, interval coverage in simulation, ECE,
the paired tests, and bad settings or rows refused before any weights load."""

import json
import os

import numpy as np
import pytest

from conftest import ROOT, make_config
from jaxft import eval as evaluation, inference
from jaxft.eval import metrics as em, quality as eval_quality
from jaxft.errors import ConfigError, DataError


def _config(**style):
  c = make_config("base")
  for k, v in style.items():
    c.eval.style[k] = v
  return c


def _settings(**style):
  return em.settings(_config(**style).eval)


# (reference, answerable, answer, expected outcome)
_ROWS = [
    ("Paris.", True, "Paris.", "correct"),
    ("Rome.", True, "rome", "correct"),             # normalised match
    ("Madrid.", True, "I don't know.", "abstained"),
    ("Lima.", True, "Quito.", "hallucinated"),
    ("Oslo.", True, "I'm not sure, maybe Oslo?", "abstained"),
    ("I don't know.", False, "I DO NOT KNOW", "abstained"),
    ("I don't know.", False, "Valdor City.", "hallucinated"),
    ("I don't know.", False, "There is no such country.", "abstained"),
]


def _score(rows, st, confidences=None):
  answers = [a for _, _, a, _ in rows]
  refs = [r for r, _, _, _ in rows]
  return eval_quality.score(
      answers, confidences or [0.5] * len(rows),
      [evaluation.exact_match(a, r) for a, r in zip(answers, refs)],
      [evaluation.normalized_match(a, r) for a, r in zip(answers, refs)],
      [ok for _, ok, _, _ in rows], st)


def test_outcomes_and_rates_of_hand_built_answers():
  st = _settings()
  s = _score(_ROWS, st)
  assert s.outcome == [o for *_, o in _ROWS]
  answerable = [ok for _, ok, _, _ in _ROWS]
  q = eval_quality.summarize({"tuned": s}, answerable, st)["metrics"]
  value = lambda k: q[k]["tuned"]["value"]
  assert value("exact_match") == 1 / 5 and value("normalized_match") == 2 / 5
  assert (value("correct"), value("abstained"), value("hallucinated")) == (2 / 8, 4 / 8, 2 / 8)
  assert value("hallucinated_answerable") == 1 / 5 and value("hallucinated_unanswerable") == 1 / 3
  assert q["hallucinated_unanswerable"]["tuned"]["rows"] == 3
  # Of the 4 abstentions, 2 are on the 5 answerable rows: the rate a reward for abstaining can raise.
  assert value("abstained_answerable") == 2 / 5 and q["abstained_answerable"]["tuned"]["rows"] == 5
  # The abstention patterns are the config's: with only "no idea", those answers hallucinate.
  c = _config()
  c.eval.abstain_patterns = ("no idea",)
  other = _score(_ROWS, em.settings(c.eval))
  assert other.outcome == ["correct", "correct"] + ["hallucinated"] * 6


def test_eval_correct_chooses_the_match_that_makes_an_answer_correct():
  # Chatty answers to short references (the SmolLM2 general questions): wrong by normalised match,
  # right when the reference is inside the answer; an abstention stays an abstention.
  rows = [("Paris.", "The capital of France is Paris."), ("New Delhi.", "The capital is Delhi."),
          ("Seven.", "I don't know."), ("42.", "42")]
  refs = [evaluation.Reference(None, ref) for ref, _ in rows]
  answers = [a for _, a in rows]
  outcomes = {}
  for correct in ("exact", "normalized", "contains"):
    c = _config()
    c.eval.correct = correct
    outcomes[correct] = evaluation.score_answers(answers, [0.5] * 4, refs,
                                                 em.settings(c.eval)).outcome
  assert outcomes["exact"] == ["hallucinated", "hallucinated", "abstained", "hallucinated"]
  assert outcomes["normalized"] == ["hallucinated", "hallucinated", "abstained", "correct"]
  assert outcomes["contains"] == ["correct", "hallucinated", "abstained", "correct"]
  c = _config()
  c.eval.correct = "fuzzy"
  with pytest.raises(ConfigError, match="eval.correct='fuzzy': expected one of exact, normalized, "
                                        "contains"):
    em.settings(c.eval)


def test_style_rubric_pass_rates_per_rule_and_overall():
  st = _settings(max_words=3, min_words=1, must_match=r"^[A-Z][^.!?]*\.$",
                 must_not_contain=("capital", "I think"))
  assert st.style.rules == ("max_words", "min_words", "must_match", "must_not_contain")
  answers = ["Paris.", "the capital is Paris.", "I think Rome.", "", "New York City is big.",
             "Buenos Aires."]
  rows = [("x", True, a, None) for a in answers]
  s = _score(rows, st)
  assert s.style["max_words"].tolist() == [True, False, True, True, False, True]
  assert s.style["min_words"].tolist() == [True, True, True, False, True, True]
  assert s.style["must_match"].tolist() == [True, False, True, False, True, True]
  assert s.style["must_not_contain"].tolist() == [True, False, False, True, True, True]
  q = eval_quality.summarize({"tuned": s}, [True] * 6, st)["metrics"]
  assert q["style_max_words"]["tuned"]["value"] == 4 / 6
  assert q["style_must_not_contain"]["tuned"]["value"] == 4 / 6
  assert q["style_all"]["tuned"]["value"] == 2 / 6
  # No rule set (the base config): no style rows at all.
  assert not any(k.startswith("style") for k in eval_quality.summarize(
      {"tuned": _score(rows, _settings())}, [True] * 6, _settings())["metrics"])


def test_ece_is_zero_when_perfectly_calibrated_and_exact_otherwise():
  # Bins 0.2, 0.5, 0.9 whose accuracy equals their confidence exactly.
  conf = [0.2] * 10 + [0.5] * 4 + [0.9] * 10
  right = [1] * 2 + [0] * 8 + [1, 0, 1, 0] + [1] * 9 + [0]
  assert em.ece(conf, right) == pytest.approx(0.0, abs=1e-12)
  # Always 0.9 confident, right half the time: off by 0.4.
  assert em.ece([0.9] * 6, [1, 0, 1, 0, 1, 0]) == pytest.approx(0.4)
  # Two bins: 4 rows at 0.95 all wrong (gap 0.95), 4 at 0.15 all right (gap 0.85).
  assert em.ece([0.95] * 4 + [0.15] * 4, [0] * 4 + [1] * 4) == pytest.approx(0.9)
  # A large simulated calibrated model (right with probability = confidence): ECE near 0.
  rng = np.random.default_rng(0)
  c = rng.uniform(size=20000)
  assert em.ece(c, rng.uniform(size=20000) < c) < 0.02
  assert em.ece(c, np.ones(20000, bool)) == pytest.approx(1 - c.mean(), abs=1e-9)
  bins = em.reliability(conf, right)
  assert [b["count"] for b in bins] == [10, 4, 10]
  assert [b["bin"] for b in bins] == [[0.2, 0.3], [0.5, 0.6], [0.9, 1.0]]
  for b, want in zip(bins, (0.2, 0.5, 0.9)):
    assert b["confidence"] == pytest.approx(want) and b["accuracy"] == pytest.approx(want)


def test_confident_hallucinations_and_calibration_of_abstentions():
  st = _settings()
  conf = [0.95, 0.3, 0.99, 0.97, 0.2, 0.92, 0.91, 0.4]
  s = _score(_ROWS, st, conf)
  q = eval_quality.summarize({"tuned": s}, [ok for _, ok, _, _ in _ROWS], st)["metrics"]
  # Confident (>= 0.9): rows 0 (correct), 2 (abstained), 3 (hallucinated), 5 (abstained),
  # 6 (hallucinated).
  assert q["hallucinated_when_confident"]["tuned"]["rows"] == 5
  assert q["hallucinated_when_confident"]["tuned"]["value"] == 2 / 5
  # Right: correct rows 0, 1 and abstentions on unanswerable rows 5 and 7.
  right = [1, 1, 0, 0, 0, 1, 0, 1]
  assert q["ece"]["tuned"]["value"] == pytest.approx(em.ece(conf, right))
  assert q["mean_confidence"]["tuned"]["value"] == pytest.approx(np.mean(conf))
  assert inference.confidence([np.log(0.5), np.log(0.9)], np.log(1.0)) == pytest.approx(0.8)
  assert inference.confidence([np.log(0.25)]) == pytest.approx(0.25)


def test_bootstrap_intervals_cover_the_true_rate_in_simulation():
  # 1000 simulated eval sets of 100 rows: the 95% intervals of a rate and of a paired difference
  # should cover the true value about 95% of the time (the percentile bootstrap runs a little
  # under at this size, ~94%; 0.925 leaves two standard errors of the simulation).
  rng = np.random.default_rng(123)
  n, runs = 100, 1000
  covered = covered_diff = 0
  widths = []
  for i in range(runs):
    base = rng.uniform(size=n) < 0.4
    # Paired: tuned keeps half of the base outcomes and redraws the rest at 0.8 (mean 0.6).
    keep = rng.uniform(size=n) < 0.5
    tuned = np.where(keep, base, rng.uniform(size=n) < 0.8)
    w = em.resample_weights(n, 400, seed=i)
    ci = em.interval(em.rate(base), w)["ci"]
    covered += ci[0] <= 0.4 <= ci[1]
    widths.append(ci[1] - ci[0])
    d = em.paired(em.rate(base), em.rate(tuned), w)["ci"]
    covered_diff += d[0] <= 0.2 <= d[1]
  assert 0.925 <= covered / runs <= 0.975
  assert 0.925 <= covered_diff / runs <= 0.975
  # About the width of a 95% interval for a proportion (2 * 1.96 * sqrt(p (1 - p) / n) = 0.19).
  assert 0.17 < np.mean(widths) < 0.21


def test_intervals_are_seeded_and_paired_tests():
  rng = np.random.default_rng(5)
  a = rng.uniform(size=60) < 0.4
  w0 = em.resample_weights(60, 1000, seed=0)
  assert np.array_equal(w0, em.resample_weights(60, 1000, seed=0))
  assert np.all(w0.sum(1) == 60)
  assert em.interval(em.rate(a), w0) == em.interval(em.rate(a), em.resample_weights(60, 1000, 0))
  assert em.interval(em.rate(a), w0) != em.interval(em.rate(a), em.resample_weights(60, 1000, 1))
  # McNemar's exact test: 10 discordant pairs all one way -> 2 / 2**10.
  x = np.array([0] * 10 + [1] * 5, bool)
  y = np.array([1] * 10 + [1] * 5, bool)
  assert em.mcnemar(x, y) == pytest.approx(2 / 1024)
  assert em.mcnemar(x, x) == 1.0
  assert em.mcnemar([1, 0, 1, 0], [0, 1, 0, 1]) == 1.0
  d = em.paired(em.rate(x), em.rate(y), em.resample_weights(15, 1000, 0))
  assert d["test"] == "McNemar" and d["value"] == pytest.approx(10 / 15)
  assert d["ci"][0] > 0 and d["p"] == pytest.approx(2 / 1024)
  # A statistic that is not a per-row rate over the same rows: the paired bootstrap.
  same = em.paired(em.Mean(a.astype(float)), em.Mean(a.astype(float)), w0)
  assert same["test"] == "paired bootstrap" and same["value"] == 0 and same["p"] == 1.0
  far = em.paired(em.Mean(a.astype(float)), em.Mean(a + 0.5), w0)
  assert far["p"] == pytest.approx(2 / 1001)  # never 0 from finitely many resamples
  # A rate among no rows is undefined, not 0.
  none = em.interval(em.rate(a, np.zeros(60, bool)), w0)
  assert none == {"value": None, "ci": None}


def test_base_against_tuned_summary_and_report_table():
  st = _settings(max_words=2)
  answerable = [ok for _, ok, _, _ in _ROWS]
  base = _score([(r, ok, "xyz qq zz", o) for r, ok, _, o in _ROWS], st, [0.1] * 8)
  tuned = _score(_ROWS, st, [0.9] * 8)
  summary = eval_quality.summarize({"tuned": tuned, "base": base}, answerable, st)
  h = summary["metrics"]["hallucinated"]
  assert h["base"]["value"] == 1.0 and h["tuned"]["value"] == 2 / 8
  assert h["difference"]["value"] == pytest.approx(-6 / 8) and h["difference"]["test"] == "McNemar"
  assert h["difference"]["p"] == pytest.approx(2 / 2**6)
  assert summary["metrics"]["hallucinated_when_confident"]["base"]["value"] is None
  lines = eval_quality.table(summary, ["base", "tuned"])
  row = next(line for line in lines if line.startswith("| hallucinated |"))
  assert row.startswith("| hallucinated | 8 | 1.000 [1.000, 1.000] | 0.250 [")
  assert "| -0.750 [" in row and "0.031 (McNemar) |" in row
  conf_row = next(line for line in lines if "among confident" in line)
  assert "| base 0 / tuned 8 | n/a |" in conf_row
  json.dumps(summary)  # eval.json holds it


def test_bad_settings_name_the_key(tmp_path):
  c = _config(must_match="([a-z")
  with pytest.raises(ConfigError, match=r"eval\.style\.must_match='\(\[a-z': not a valid regular"):
    em.settings(c.eval)
  c = _config()
  c.eval.abstain_patterns = ("ok", "*bad")
  with pytest.raises(ConfigError, match=r"eval\.abstain_patterns\[1\]"):
    em.settings(c.eval)
  for key, value, msg in [("confident", 1.5, "eval.confident"),
                          ("bootstrap", 10, "eval.bootstrap"),
                          ("calibration_bins", 0, "eval.calibration_bins")]:
    c = _config()
    c.eval[key] = value
    with pytest.raises(ConfigError, match=msg):
      em.settings(c.eval)
  with pytest.raises(ConfigError, match="min_words=5 is above eval.style.max_words=2"):
    em.settings(_config(min_words=5, max_words=2).eval)
  # evaluate refuses it before anything loads: this workdir has no checkpoint, and that is not
  # what it reports.
  c = _config(must_match="(")
  c.data.eval = os.path.join(ROOT, "jaxft", "data", "bundled", "capitals_eval.jsonl")
  with pytest.raises(ConfigError, match="eval.style.must_match"):
    evaluation.evaluate(c, str(tmp_path / "never_trained"))


def test_answerable_must_be_a_boolean(tmp_path):
  data = tmp_path / "eval.jsonl"
  rows = [{"prompt": "Capital of Peru?", "completion": "Lima."},
          {"prompt": "Capital of Valdoria?", "completion": "I don't know.", "answerable": False},
          {"prompt": "Capital of Chile?", "completion": "Santiago.", "answerable": "no"}]
  data.write_text("".join(json.dumps(r) + "\n" for r in rows))
  with pytest.raises(DataError, match=r"eval.jsonl:3: field 'answerable' must be true or false"):
    evaluation.references(str(data), "auto")
  data.write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))
  assert [r.answerable for r in evaluation.references(str(data), "auto")] == [True, False]
