"""The Markdown report of an evaluation (eval_report.md): a summary table, the quality table,
the human votes, then prompt, reference and answers side by side; and the console summary that
`python -m jaxft.evaluate` prints."""

from __future__ import annotations

from jaxft.eval import quality as eval_quality


def _cell(text: str) -> str:
  """Text safe inside a Markdown table cell."""
  text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
  return text.replace("|", "\\|").replace("\r", "").replace("\n", "<br>") or " "


def report(result: dict, rows: list[dict], models: list[str], plot: str | None = None) -> str:
  """The Markdown report: a summary table, the quality table (eval_quality.section), then prompt,
  reference and answers side by side."""
  fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else "n/a" if v is None else str(v)
  lines = [f"# Evaluation of {result['workdir']} (step {result['step']})", "",
           f"Data: `{result['data']}`: {result['examples']} examples, "
           f"{result['examples_with_reference']} with a reference answer"
           + (f" and {result['unanswerable_examples']} unanswerable"
              if result.get("unanswerable_examples") else "")
           + "; greedy answers of at most "
           f"{result['generation']['max_new_tokens']} tokens.", "",
           "| metric | " + " | ".join(models) + " |", "|---" * (len(models) + 1) + "|"]
  for key in ("loss", "perplexity", "target_tokens", "exact_match", "normalized_match",
              "contains_match"):
    lines.append(f"| {key} | " + " | ".join(fmt(result[m][key]) for m in models) + " |")
  if "quality" in result:
    lines += [""] + eval_quality.section(result["quality"], models, plot)
  if result.get("human_eval"):
    lines += ["", "Human evaluation (blind side-by-side votes of jaxft.serve's /compare; ties "
              "count half):", "", "| A | B | votes | A wins | B wins | ties | A's win rate "
              "[95% CI] |", "|---|---|---|---|---|---|---|"]
    for h in result["human_eval"]:
      lines.append(f"| {h['a']} | {h['b']} | {h['votes']} | {h['a_wins']} | {h['b_wins']} | "
                   f"{h['ties']} | {h['a_win_rate']:.3f} [{h['ci95'][0]:.3f}, "
                   f"{h['ci95'][1]:.3f}] |")
  lines += ["", "Marks: = exact match, ~ normalised match only, + reference contained only, "
            "x none; then the outcome (C correct, A abstained, H hallucinated) and the "
            "confidence.", "",
            "| # | prompt | reference | " + " | ".join(models) + " |",
            "|---" * (len(models) + 3) + "|"]
  for r in rows:
    cells = []
    for m in models:
      mark = ("=" if r[f"{m}_exact_match"] else "~" if r[f"{m}_normalized_match"]
              else "+" if r[f"{m}_contains_match"] else "x")
      outcome = f" ({r[f'{m}_outcome'][0].upper()} {r[f'{m}_confidence']:.2f})"
      cells.append(f"{mark} {_cell(r[m])}{outcome}")
    reference = _cell(r["reference"]) + ("" if r["answerable"] else " (unanswerable)")
    lines.append(f"| {r['index']} | {_cell(r['prompt'])} | {reference} | "
                 + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


_SHOWN = (("hallucinated", "hallucinated"), ("abstained", "abstained"),
          ("style_all", "style pass"), ("ece", "ECE"))


def _with_ci(d: dict) -> str:
  if d["value"] is None:
    return "n/a"
  return f"{d['value']:.3f}" + (f" [{d['ci'][0]:.3f}, {d['ci'][1]:.3f}]" if d["ci"] else "")


def console(result: dict, written: list[str]) -> list[str]:
  """The lines `python -m jaxft.evaluate` prints: per model the loss, perplexity, matches and
  quality rates (with their 95% intervals); each human-evaluation pair with the tuned model's win
  rate (votes.win_rates puts it first); then every file `written` (the JSON, the samples, the
  report and, when there were reference answers, the reliability plot)."""
  lines = []
  acc = lambda v: "n/a (no reference answers)" if v is None else f"{v:.3f}"
  for name in ("tuned", "base"):
    if name not in result:
      continue
    m = result[name]
    line = (f"{name}: loss {m['loss']:.4f}, perplexity {m['perplexity']:.3f}, exact match "
            f"{acc(m['exact_match'])}, normalised match {acc(m['normalized_match'])}, "
            f"contains match {acc(m['contains_match'])}")
    if "quality" in result:
      q = result["quality"]["metrics"]
      line += "".join(f", {label} {_with_ci(q[key][name])}" for key, label in _SHOWN if key in q)
    lines.append(line)
  for h in result.get("human_eval", []):
    lines.append(f"human evaluation, {h['a']} against {h['b']}: {h['a']}'s win rate "
                 f"{h['a_win_rate']:.3f} [{h['ci95'][0]:.3f}, {h['ci95'][1]:.3f}] over "
                 f"{h['votes']} votes ({h['a_wins']} won, {h['b_wins']} lost, {h['ties']} ties, "
                 "counted half)")
  lines.append("wrote " + ", ".join(written[:-1]) + (" and " if len(written) > 1 else "")
               + written[-1])
  return lines
