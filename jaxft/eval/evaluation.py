"""Evaluation of a trained workdir on held-out data, beside the base model alone.

`evaluate(config, workdir)` writes, atomically:
  WORKDIR/eval.json      loss and perplexity on the target tokens of data.eval, token counts, and for
                         rows with a reference answer the exact-match, normalised-match and
                         contains-match accuracy of the greedy answer; for the tuned model and for
                         the base model alone; under "quality": hallucination, abstention, style
                         and calibration rates with 95% bootstrap intervals and base-vs-tuned
                         tests (quality.py);
  WORKDIR/samples.jsonl  one row per example with a reference: prompt, reference, base and tuned
                         answers, whether each matched, its outcome, style checks and confidence;
  WORKDIR/eval_report.md the same side by side, for a person to read;
  WORKDIR/reliability.png accuracy against confidence.
With a `label` (a second eval set, say) the files are eval_LABEL.json, samples_LABEL.jsonl,
eval_report_LABEL.md and reliability_LABEL.png, beside the default ones. When they go into the
workdir and its training logged to W&B or MLflow (train.loggers), the figures and these files are
added to that run too (trackers.report_eval).

Reference answers and their matches are answers.py's; text and tokens rows count towards the
loss only. The loss is `evaluate_loss`, the function behind the eval_loss logged in training (same
batches, same target mask). The report is report.py's, the human votes' win rates votes.py's.
"""

from __future__ import annotations

import json
import os
import re

import jax
import numpy as np
import optax
from absl import logging

from jaxft import files, inference, objectives, peft, session, sharding, trackers
from jaxft.data import pipeline
from jaxft.errors import ConfigError
from jaxft.eval import metrics as eval_metrics, quality as eval_quality, votes as human_votes
from jaxft.eval.answers import (Reference, accuracy, contains_match, exact_match, normalized_match,
                                references)
from jaxft.eval.report import report
from jaxft.step import make_steps

REPORT = "eval_report.md"


def evaluate_loss(steps, trainable, frozen, examples, config, mesh, max_batches: int = 0,
                  objective=objectives.SFT()) -> dict:
  """The objective's loss over the eval examples (one pass, file order, in the objective's eval
  batches): eval_loss, eval_tokens, eval_ppl where the objective's loss has a perplexity
  (supervised), and the objective's metrics as eval_NAME (pairs: the preference metrics). `steps`
  is the jitted StepFns.eval of `objective`. For a mixture of experts eval_loss and eval_ppl are the
  cross-entropy alone; the router's load-balancing loss is eval_router_aux."""
  total = None
  for i, b in enumerate(objective.eval_batches(examples, config)):
    if max_batches and i >= max_batches:
      break
    b = {k: v[0] for k, v in sharding.put_batch(b, mesh, 1).items()}
    out = jax.tree.map(lambda x: np.asarray(x, np.float64), jax.device_get(steps(trainable, frozen, b)))
    total = out if total is None else jax.tree.map(np.add, total, out)
  terms, stats, counts = total
  loss = float(objective.eval_loss(terms, counts))
  m = {"eval_loss": loss, "eval_tokens": float(counts["tokens"])}
  ppl = objective.perplexity(loss)
  if ppl is not None:
    m["eval_ppl"] = float(ppl)
  m.update({f"eval_{k}": float(v) for k, v in objective.metrics(terms, stats, counts).items()})
  return m


def _loss(cfg, method, trainable, frozen, examples, config, mesh) -> dict:
  # Only the eval step is used: the optimizer and schedule are placeholders.
  steps = make_steps(cfg, method, optax.identity(), lambda step: 0.0, False, dropout=False)
  m = evaluate_loss(jax.jit(steps.eval), trainable, frozen, examples, config, mesh)
  out = {"loss": m["eval_loss"], "perplexity": m["eval_ppl"], "target_tokens": int(m["eval_tokens"])}
  if "eval_router_aux" in m:  # a mixture of experts: beside the cross-entropy, not in it
    out["router_aux"] = m["eval_router_aux"]
  return out


def evaluate(config, workdir: str, *, max_new_tokens: int = 0, batch_size: int = 32,
             max_examples: int = 0, compare_base: bool = True, output_dir: str = "",
             label: str = "") -> dict:
  """Evaluates WORKDIR's newest intact checkpoint (and the base model) on config.data.eval;
  writes eval.json, samples.jsonl and eval_report.md (with a `label`: eval_LABEL.json,
  samples_LABEL.jsonl, eval_report_LABEL.md) into output_dir (default WORKDIR) and returns the
  eval.json object.

  Raises ConfigError when data.eval is unset, a setting is out of range or output_dir cannot be
  written (all before any weights load), CheckpointError when WORKDIR has no intact checkpoint,
  DataError for bad rows or a prompt that does not fit the model's context."""
  output_names(label)  # a bad label fails before any work
  if not config.data.eval:
    raise ConfigError("data.eval is empty: set it to held-out data (e.g. --config.data.eval=FILE)")
  if batch_size < 1:
    raise ConfigError(f"--batch_size={batch_size}: must be >= 1")
  if max_new_tokens < 0 or max_examples < 0:
    raise ConfigError("--max_new_tokens and --max_examples must be >= 0 (0 = automatic / all)")
  quality = eval_metrics.settings(config.eval)
  output_dir = output_dir or workdir
  files.check_writable_dir(output_dir, "--output_dir")
  inference.require_checkpoint(workdir)
  enc = session.encoder(config, workdir)
  cfg = session.model_config(config)
  ds = pipeline.load_examples(config.data.eval, enc, config.data.format, config.data.max_len,
                              cfg.vocab_size)
  refs = references(config.data.eval, config.data.format)
  if max_examples:
    refs = refs[:max_examples]
  if refs:
    inference.check_lengths(config, enc, [r.prompt for r in refs])
  if not max_new_tokens:
    longest = max((len(enc.tok(r.answer, add_special_tokens=False)["input_ids"]) for r in refs),
                  default=0)
    max_new_tokens = longest + 16

  trained = session.restore_trained(workdir, config)
  model = trained.model
  tuned_dec = inference.Decoder(model.cfg, model.method, trained.params, trained.step)
  prompts = [r.prompt for r in refs]
  result = {"workdir": os.path.abspath(workdir), "step": trained.step, "data": config.data.eval,
            "examples": len(ds.examples),
            "examples_with_reference": sum(r.answerable for r in refs),
            "unanswerable_examples": sum(not r.answerable for r in refs),
            "truncated_examples": ds.truncated,
            "generation": {"decoding": "greedy", "max_new_tokens": max_new_tokens}}
  answers, confidences = {}, {}
  runs = [("tuned", tuned_dec, trained.trainable, trained.frozen)]
  if compare_base:
    # The base alone: the frozen base as the config builds it (for full fine-tuning, the initial
    # weights, which load_model rebuilt before the checkpoint replaced them), with no method.
    runs.append(("base", inference.Decoder(model.cfg, peft.Method(), model.base, None), {},
                 model.base))
  for name, dec, trainable, frozen in runs:
    metrics = _loss(model.cfg, dec.adapter, trainable, frozen, ds.examples, config, model.mesh)
    # Rows without a reference (text, tokens) count towards the loss only; with none at all the
    # accuracies are null rather than a misleading 0.
    out = (inference.answer(dec, enc, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
           if refs else [])
    answers[name] = [o["answer"] for o in out]
    confidences[name] = [o["confidence"] for o in out]
    metrics.update(accuracy(answers[name], refs))
    result[name] = metrics
    logging.info("%s: loss %.4f, exact match %s", name, metrics["loss"], metrics["exact_match"])
  scored = {}
  if refs:
    scored = {name: score_answers(answers[name], confidences[name], refs, quality) for name in answers}
    result["quality"] = eval_quality.summarize(scored, [r.answerable for r in refs], quality)
    for name in answers:
      result[name].update({k: result["quality"]["metrics"][k][name]["value"] for k in
                           ("correct", "abstained", "hallucinated", "ece")})
  votes = human_votes.read_votes(os.path.join(workdir, human_votes.VOTES))
  if votes:  # blind side-by-side votes from jaxft.serve's /compare page
    # (the server names the tuned model after its workdir's directory)
    result["human_eval"] = human_votes.win_rates(
        votes, tuned=os.path.basename(os.path.normpath(workdir)))
  if jax.process_index() == 0:
    _write(output_dir, result, refs, answers, scored, label)
    _report(config, workdir, output_dir, result, label)
  return result


def _report(config, workdir: str, output_dir: str, result: dict, label: str) -> None:
  """Adds the evaluation to the W&B / MLflow runs of the workdir's training (jaxft/trackers.py),
  when it was written into the workdir: a reading command given another output_dir writes
  nothing into the workdir (it may be read-only)."""
  if os.path.realpath(output_dir) != os.path.realpath(workdir):
    return
  written = [os.path.join(output_dir, n) for n in output_names(label)]
  trackers.report_eval(config, workdir, result, written + [plot_path(output_dir, label)], label)


def output_names(label: str = "") -> tuple[str, str, str]:
  """(eval json, samples, report) file names of an evaluation labelled `label` ('' = default)."""
  if label and not re.fullmatch(r"[A-Za-z0-9_-]+", label):
    raise ConfigError(f"evaluation label {label!r}: expected letters, digits, '-' or '_'")
  suffix = f"_{label}" if label else ""
  return f"eval{suffix}.json", f"samples{suffix}.jsonl", f"eval_report{suffix}.md"


def plot_path(out_dir: str, label: str = "") -> str:
  """Where the reliability plot of an evaluation labelled `label` goes (written when the data
  has reference answers)."""
  path = eval_quality.plot_path(out_dir)
  return path[:-len(".png")] + f"_{label}.png" if label else path


def score_answers(answers: list[str], confidences: list[float], refs: list[Reference],
                  quality: eval_metrics.Settings) -> eval_quality.Scored:
  """One model's answers scored against the references; `quality.correct` (eval.correct) names
  the match that makes an answer correct."""
  match = {"exact": exact_match, "normalized": normalized_match,
           "contains": contains_match}[quality.correct]
  return eval_quality.score(answers, confidences,
                            [exact_match(a, r.answer) for a, r in zip(answers, refs)],
                            [normalized_match(a, r.answer) for a, r in zip(answers, refs)],
                            [r.answerable for r in refs], quality,
                            [match(a, r.answer) for a, r in zip(answers, refs)])


def _write(out_dir: str, result: dict, refs: list[Reference], answers: dict,
           scored: dict, label: str = "") -> None:
  os.makedirs(out_dir, exist_ok=True)
  rows = []
  for i, r in enumerate(refs):
    row = {"index": i, "origin": r.prompt.origin, "prompt": r.prompt.display, "reference": r.answer,
           "answerable": r.answerable}
    for name, ans in answers.items():
      s = scored[name]
      row[name] = ans[i]
      row[f"{name}_exact_match"] = exact_match(ans[i], r.answer)
      row[f"{name}_normalized_match"] = normalized_match(ans[i], r.answer)
      row[f"{name}_contains_match"] = contains_match(ans[i], r.answer)
      row[f"{name}_outcome"] = s.outcome[i]
      row[f"{name}_confidence"] = float(s.confidence[i])
      row[f"{name}_style"] = {rule: bool(passed[i]) for rule, passed in s.style.items()}
    rows.append(row)
  out_json, samples, report_md = output_names(label)
  plot = None
  if "quality" in result:
    plot = eval_quality.write_reliability_plot(plot_path(out_dir, label), result["quality"])
  files.write_text(os.path.join(out_dir, samples),
                   "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
  files.write_text(os.path.join(out_dir, report_md),
                   report(result, rows, list(answers), plot and os.path.basename(plot)))
  files.write_json(os.path.join(out_dir, out_json), result)


