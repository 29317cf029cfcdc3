"""The loss-curve picture of a run: train loss and eval loss against step, from metrics.jsonl."""

from __future__ import annotations

import json
import math
import os

from jaxft import files

LOSS_CURVE = "loss_curve.png"


def read_metrics(workdir: str) -> list[dict]:
  """The rows of WORKDIR/metrics.jsonl (an empty list when there is none)."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.isfile(path):
    return []
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
  pts = {}
  for r in rows:  # a resumed run may log a step twice: the last value wins
    v = r.get(key)
    if isinstance(v, (int, float)) and math.isfinite(v):
      pts[int(r["step"])] = float(v)
  steps = sorted(pts)
  return steps, [pts[s] for s in steps]


def write_loss_curve(workdir: str) -> str | None:
  """Plots train `loss` and `eval_loss` of WORKDIR/metrics.jsonl into WORKDIR/loss_curve.png
  (written to a temporary name, then renamed). Returns the path, or None when nothing was logged."""
  rows = read_metrics(workdir)
  train = _series(rows, "loss")
  evals = _series(rows, "eval_loss")
  if not train[0] and not evals[0]:
    return None
  import matplotlib
  matplotlib.use("Agg")  # no display on training machines
  from matplotlib.figure import Figure
  fig = Figure(figsize=(7, 4.2), dpi=100)
  ax = fig.add_subplot()
  if train[0]:
    ax.plot(*train, label="train loss", color="tab:blue")
  if evals[0]:
    ax.plot(*evals, "o-", label="eval loss", color="tab:orange")
  ax.set_xlabel("step")
  ax.set_ylabel("loss (cross-entropy, target tokens)")
  ax.set_title(os.path.basename(os.path.abspath(workdir)))
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  path = os.path.join(workdir, LOSS_CURVE)
  files.write_with(path, fig.savefig, suffix=".png")
  return path
