"""The quickstart end to end: train (configs/quickstart.py as shipped), then `python -m
jaxft.evaluate`, then `python -m jaxft.generate` on the same workdir. One trained workdir is shared
by the tests of this file (training is most of their time)."""

import json
import math
import os

import pytest

from conftest import make_config, run_cli
from jaxft import curves, eval as evaluation, flops, inference, session
from jaxft.errors import ConfigError
from jaxft.eval import metrics as eval_metrics, quality as eval_quality
from jaxft.models.config import preset


_PEAK_TFLOPS = 0.01  # a made-up device peak, so that the CPU run logs an MFU too


def _quickstart_config():
  c = make_config("quickstart")
  c.train.progress = False
  c.train.peak_tflops = _PEAK_TFLOPS
  # The shipped 150 steps learn more; 40 keep the suite short and still learn (measured: exact
  # match 0.75, eval loss 10.98 -> 1.61)
  c.train.steps = 40
  c.train.eval_every = 20
  return c


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
  from jaxft.trainer import train
  wd = str(tmp_path_factory.mktemp("quickstart"))
  train(_quickstart_config(), wd)
  r = run_cli("jaxft.evaluate", "--config=configs/quickstart.py", f"--workdir={wd}")
  assert r.returncode == 0, r.stderr[-3000:]
  return wd, r.stdout


def _read_json(path):
  with open(path, encoding="utf-8") as f:
    return json.load(f)


@pytest.mark.slow
def test_quickstart_tuned_beats_base(quickstart):
  wd, stdout = quickstart
  res = _read_json(os.path.join(wd, "eval.json"))
  tuned, base = res["tuned"], res["base"]
  print("quickstart eval:", json.dumps({k: res[k] for k in ("tuned", "base")}))
  assert res["step"] == 40 and res["examples_with_reference"] == 80
  assert res["unanswerable_examples"] == 10  # counted for hallucination, not for exact match
  assert tuned["exact_match"] > base["exact_match"]
  assert tuned["exact_match"] >= 0.5  # the capitals are learnable (0.75 seen after 40 steps)
  assert tuned["normalized_match"] >= tuned["exact_match"]
  assert tuned["loss"] < base["loss"]
  for m in (tuned, base):
    assert m["perplexity"] == pytest.approx(math.exp(m["loss"]), rel=1e-6)
    assert m["target_tokens"] == tuned["target_tokens"] > 0
  # The tuned loss is the eval_loss the trainer logged at the last step (same function, same data).
  rows = curves.read_metrics(wd)
  evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
  assert tuned["loss"] == pytest.approx(evals[-1], rel=1e-4)
  assert evals[-1] <= 0.5 * evals[0]  # the quickstart's promise: eval loss at least halves
  assert f"exact match {tuned['exact_match']:.3f}" in stdout


@pytest.mark.slow
def test_quickstart_writes_samples_report_and_curve(quickstart):
  wd, stdout = quickstart
  wrote = stdout.strip().splitlines()[-1]
  assert wrote.startswith(f"wrote {os.path.join(wd, 'eval.json')}, samples.jsonl, "
                          "eval_report.md and reliability.png"), wrote
  with open(os.path.join(wd, "samples.jsonl"), encoding="utf-8") as f:
    samples = [json.loads(line) for line in f]
  assert len(samples) == 90 and sum(s["answerable"] for s in samples) == 80
  first = samples[0]
  assert first["prompt"] == "user: Give the capital of Spain." and first["reference"] == "Madrid."
  assert {"base", "tuned", "tuned_exact_match", "base_exact_match"} <= set(first)
  eval_json = _read_json(os.path.join(wd, "eval.json"))
  assert sum(s["tuned_exact_match"] for s in samples if s["answerable"]) / 80 == pytest.approx(
      eval_json["tuned"]["exact_match"])
  with open(os.path.join(wd, evaluation.REPORT), encoding="utf-8") as f:
    report = f.read()
  assert "| exact_match |" in report
  assert "| 0 | user: Give the capital of Spain. | Madrid. | " in report
  with open(os.path.join(wd, curves.LOSS_CURVE), "rb") as f:
    png = f.read()
  assert png.startswith(b"\x89PNG") and len(png) > 5000
  train_rows = [r for r in curves.read_metrics(wd) if "loss" in r]
  assert len(train_rows) == 4  # 40 steps, logged every 10
  for r in train_rows:
    assert r["tflops_per_sec"] > 0
    assert r["mfu"] == pytest.approx(r["tflops_per_sec"] / _PEAK_TFLOPS, rel=1e-6)


@pytest.mark.slow
def test_quickstart_hallucination_style_calibration(quickstart):
  wd, stdout = quickstart
  res = _read_json(os.path.join(wd, "eval.json"))
  q = res["quality"]
  assert (q["rows"], q["answerable_rows"]) == (90, 80)
  with open(os.path.join(wd, "samples.jsonl"), encoding="utf-8") as f:
    samples = [json.loads(line) for line in f]
  for m in ("base", "tuned"):
    # Every rate, for both models, with an interval around it, and what samples.jsonl says.
    for name, row in q["metrics"].items():
      v = row[m]
      if v["value"] is not None:
        assert v["ci"][0] <= v["value"] + 1e-9 and v["value"] <= v["ci"][1] + 1e-9, (name, m)
    for kind in eval_metrics.OUTCOMES:
      assert q["metrics"][kind][m]["value"] == pytest.approx(
          sum(s[f"{m}_outcome"] == kind for s in samples) / 90)
      assert res[m][kind] == q["metrics"][kind][m]["value"]
    conf = [s[f"{m}_confidence"] for s in samples]
    assert all(0 < c <= 1 for c in conf)
    right = [s[f"{m}_outcome"] == "correct" or (s[f"{m}_outcome"] == "abstained"
                                                and not s["answerable"]) for s in samples]
    assert q["metrics"]["ece"][m]["value"] == pytest.approx(eval_metrics.ece(conf, right, 10))
    assert sum(b["count"] for b in q["reliability"][m]) == 90
  metric = lambda name, m: q["metrics"][name][m]["value"]
  # The random base hallucinates everything and follows no style; the tuned model answers the
  # capitals, in style, and is surer of them; it was never taught to abstain, so it invents
  # capitals for the made-up countries.
  assert metric("hallucinated", "base") == 1.0 and metric("style_all", "base") == 0.0
  assert metric("hallucinated_answerable", "tuned") <= 0.5
  assert metric("hallucinated_unanswerable", "tuned") == 1.0
  assert metric("style_all", "tuned") >= 0.5
  assert metric("mean_confidence", "tuned") > metric("mean_confidence", "base")
  diff = q["metrics"]["hallucinated"]["difference"]
  assert diff["value"] < 0 and diff["ci"][1] < 0 and diff["test"] == "McNemar" and diff["p"] < 0.001
  assert q["metrics"]["hallucinated_when_confident"]["tuned"]["rows"] > 0  # eval.confident=0.5
  with open(os.path.join(wd, evaluation.REPORT), encoding="utf-8") as f:
    report = f.read()
  assert "| metric | rows | tuned [95% CI] | base [95% CI] | tuned - base [95% CI] | p (test) |" \
      in report
  assert "| hallucinated | 90 | " in report and "| style: every rule | 90 | " in report
  assert "(unanswerable) | x " in report and "![reliability](reliability.png)" in report
  with open(eval_quality.plot_path(wd), "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  assert "hallucinated " in stdout and "ECE " in stdout


@pytest.mark.slow
def test_generate_cli_on_the_trained_workdir(quickstart, tmp_path):
  wd, _ = quickstart
  prompts = tmp_path / "prompts.jsonl"
  prompts.write_text("\n".join([
      json.dumps("What is the capital of France?"),
      json.dumps({"prompt": "Give the capital of Japan."}),
      "",
      json.dumps({"messages": [{"role": "user", "content": "Capital of Italy?"}]}),
  ]) + "\n")
  out = tmp_path / "answers.jsonl"
  r = run_cli("jaxft.generate", "--config=configs/quickstart.py", f"--workdir={wd}",
              f"--prompts_file={prompts}", "--prompt=Capital of Spain?", f"--output={out}")
  assert r.returncode == 0, r.stderr[-3000:]
  with open(out, encoding="utf-8") as f:
    rows = [json.loads(line) for line in f]
  assert [row["answer"] for row in rows] == ["Madrid.", "Paris.", "Tokyo.", "Rome."]
  assert all(row["finish"] == "eos" for row in rows)
  assert "=> Paris." in r.stdout


@pytest.mark.slow
def test_base_switch_decodes_the_base_alone(quickstart):
  wd, _ = quickstart
  config = _quickstart_config()
  enc = session.encoder(config, wd)
  prompts = [inference.Prompt("p", [{"role": "user", "content": "Give the capital of Spain."}])]
  n = _read_json(os.path.join(wd, "eval.json"))["generation"]["max_new_tokens"]
  base_dec = inference.load_decoder(config, wd, base=True)
  base = inference.answer(base_dec, enc, prompts, max_new_tokens=n)
  with open(os.path.join(wd, "samples.jsonl"), encoding="utf-8") as f:
    first = json.loads(f.readline())
  # The same base answer evaluate got for this prompt (decoded there in a batch of 32); the tuned
  # model answers it right (samples.jsonl, and the generate CLI test).
  assert base_dec.step is None and base[0]["answer"] == first["base"] != "Madrid."


@pytest.mark.slow
def test_evaluate_rows_without_reference_count_for_loss_only(quickstart, tmp_path):
  import shutil
  wd = str(tmp_path / "copy")
  shutil.copytree(quickstart[0], wd)
  data = tmp_path / "text.jsonl"
  data.write_text("".join(json.dumps({"text": f"The capital of {c} is {k}."}) + "\n"
                          for c, k in [("Spain", "Madrid"), ("Peru", "Lima")]))
  config = _quickstart_config()
  config.data.eval = str(data)
  res = evaluation.evaluate(config, wd, compare_base=False)
  assert res["examples"] == 2 and res["examples_with_reference"] == 0 and "base" not in res
  assert res["tuned"]["exact_match"] is None and res["tuned"]["target_tokens"] > 10
  assert math.isfinite(res["tuned"]["loss"])
  assert _read_json(os.path.join(wd, "eval.json")) == json.loads(json.dumps(res))
  with open(os.path.join(wd, evaluation.REPORT), encoding="utf-8") as f:
    assert "| exact_match | n/a |" in f.read()


def test_flop_count_full_versus_frozen_base():
  cfg = preset("quickstart")
  n = flops.matmul_params(cfg)
  # 4 layers x (q 128x128, k/v 128x64, o 128x128, gate/up/down 128x352) + lm_head 128x32000.
  assert n == 4 * (128 * 128 * 2 + 2 * 128 * 64 + 3 * 128 * 352) + 128 * 32000
  seg = [[1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 1, 1]]
  assert flops.attended_keys(seg) == (1 + 2 + 3) + (1 + 2) + 21
  assert flops.attended_keys(seg, window=2) == (1 + 2 + 2) + (1 + 2) + (1 + 2 * 5)
  attn = 3 * 4 * cfg.num_layers * cfg.q_size * 10.0
  assert flops.train_flops_per_token(cfg, True, 0, 10.0) == 6 * n + attn
  assert flops.train_flops_per_token(cfg, False, 1000, 10.0) == 4 * n + 6 * 1000 + attn
  counter = flops.FlopCounter(cfg, False, 1000, peak_tflops=2.0, devices=[object()] * 4)
  counter.observe(seg)
  per_token = flops.train_flops_per_token(cfg, False, 1000, 30 / 11)
  m = counter.metrics(1e6)
  assert m["tflops_per_sec"] == pytest.approx(per_token * 1e6 / 1e12)
  assert m["mfu"] == pytest.approx(per_token * 1e6 / (4 * 2e12))
  assert flops.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
  assert flops.peak_flops("cpu") is None


def test_contains_match_and_labelled_outputs():
  """A chatty but right answer counts as contains_match (whole words of the normalised
  reference), not as exact or normalised match; a label names a second set's files."""
  assert evaluation.contains_match("The capital of France is Paris.", "Paris.")
  assert not evaluation.normalized_match("The capital of France is Paris.", "Paris.")
  assert evaluation.contains_match("So 6 * 7 = 42.", "42.")
  assert not evaluation.contains_match("It is 420.", "42.")  # whole words only
  assert not evaluation.contains_match("anything", "...")  # an empty reference matches nothing
  assert evaluation.output_names() == ("eval.json", "samples.jsonl", "eval_report.md")
  assert evaluation.output_names("general") == ("eval_general.json", "samples_general.jsonl",
                                                "eval_report_general.md")
  with pytest.raises(ConfigError, match="evaluation label '../x'"):
    evaluation.output_names("../x")
  rows = [{"index": 0, "prompt": "q", "reference": "Paris.", "answerable": True,
           "tuned": "It is Paris.", "tuned_exact_match": False, "tuned_normalized_match": False,
           "tuned_contains_match": True, "tuned_outcome": "correct", "tuned_confidence": 0.9}]
  result = {"workdir": "w", "step": 1, "data": "d", "examples": 1, "examples_with_reference": 1,
            "generation": {"max_new_tokens": 4},
            "tuned": {"loss": 1.0, "perplexity": 2.7, "target_tokens": 3, "exact_match": 0.0,
                      "normalized_match": 0.0, "contains_match": 1.0}}
  report = evaluation.report(result, rows, ["tuned"])
  assert "| contains_match | 1.0000 |" in report and "| + It is Paris. (C 0.90) |" in report


def test_console_summary_names_the_plot_and_the_tuned_models_win_rate():
  """jaxft.evaluate's console left out reliability.png and the human votes, and the win-rate table
  led with the base model's win rate (pairs in name order: base < tuned)."""
  from jaxft.eval.report import console
  votes = [{"a": "base", "b": "run1", "winner": w} for w in ("run1", "run1", "base", "tie")]
  (h,) = evaluation.win_rates(votes, tuned="run1")
  assert (h["a"], h["b"], h["a_wins"], h["b_wins"], h["ties"]) == ("run1", "base", 2, 1, 1)
  assert h["a_win_rate"] == pytest.approx(0.625)
  (h2,) = evaluation.win_rates(votes)  # a copied workdir's other name: still not the base first
  assert h2["a"] == "run1"
  m = {"loss": 1.0, "perplexity": 2.718, "exact_match": 0.5, "normalized_match": 0.5,
       "contains_match": 0.5}
  lines = console({"tuned": m, "base": m, "human_eval": [h]},
                              ["w/eval.json", "samples.jsonl", "eval_report.md",
                               "reliability.png (accuracy against confidence)"])
  assert lines[2].startswith("human evaluation, run1 against base: run1's win rate 0.625 [")
  assert "over 4 votes (2 won, 1 lost, 1 ties, counted half)" in lines[2]
  assert lines[-1] == ("wrote w/eval.json, samples.jsonl, eval_report.md and reliability.png "
                       "(accuracy against confidence)")
