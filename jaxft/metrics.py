"""Metrics sinks: metrics.jsonl, the trackers of train.loggers (jaxft.trackers: TensorBoard, W&B,
MLflow) and a progress bar, written by process 0."""

from __future__ import annotations

import json
import math
import os
import sys
import time

import jax
from absl import logging

from jaxft.trackers import Trackers, artifacts


class MetricsWriter:
  """Appends one JSON object per logged step to WORKDIR/metrics.jsonl and hands its finite numbers
  to `trackers` (jaxft.trackers.open_all's, opened by process 0; none by default)."""

  def __init__(self, workdir: str, total_steps: int, start_step: int, progress: bool,
               trackers: list = ()):
    self.active = jax.process_index() == 0
    self._bar = None
    self._workdir = workdir
    self._trackers = Trackers(trackers if self.active else [])
    if not self.active:
      return
    os.makedirs(workdir, exist_ok=True)
    self._file = open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8")
    self._total, self._first = total_steps, None  # (time, step) of the first progress()
    self._restore = None
    if progress:
      from tqdm import tqdm
      self._bar = tqdm(total=total_steps, initial=start_step, unit="step", file=sys.stderr,
                       dynamic_ncols=True, disable=None)
      if self._bar.disable:  # stderr is not a terminal: log lines instead (progress())
        self._bar = None
      else:
        self._restore = _lines_above_bar()

  def write(self, step: int, values: dict) -> None:
    """Records `values` at `step` (floats; non-finite floats are written as strings)."""
    if not self.active:
      return
    row = {"step": int(step)}
    for k, v in values.items():
      v = float(v) if not isinstance(v, (int, str)) else v
      row[k] = v if not isinstance(v, float) or math.isfinite(v) else str(v)
    self._file.write(json.dumps(row) + "\n")
    self._file.flush()
    self._trackers.log(step, {k: v for k, v in row.items() if k != "step"})

  def progress(self, step: int, loss: float, tokens_per_sec: float, mfu: float | None = None,
               lr: float | None = None) -> None:
    """Updates the bar: loss, tokens/s and, when the device's peak is known, MFU. Without a bar
    (stderr is not a terminal: nohup, SLURM, CI; or train.progress=False) logs one line instead,
    with the learning rate and the time left, since cluster users read logs, not bars."""
    if not self.active:
      return
    if self._bar is not None:
      self._bar.n = step
      extra = {} if mfu is None else {"mfu": f"{100 * mfu:.1f}%"}
      self._bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_sec:,.0f}", **extra,
                            refresh=False)
      self._bar.refresh()
      return
    now = time.time()
    if self._first is None:  # the rate is measured from here: step 1 also paid the compile
      self._first = (now, step)
    t0, s0 = self._first
    eta = (f"ETA {_duration((now - t0) / (step - s0) * (self._total - step))}" if step > s0
           else "ETA after the next log line")
    parts = [f"step {step}/{self._total}", f"loss {loss:.4f}"]
    if lr is not None:
      parts.append(f"lr {lr:.3g}")
    parts.append(f"{tokens_per_sec:,.0f} tokens/s")
    if mfu is not None:
      parts.append(f"MFU {100 * mfu:.1f}%")
    logging.info("%s", ", ".join(parts + [eta]))

  def close(self) -> None:
    """Closes metrics.jsonl and the bar; the trackers stay open for end_trackers."""
    if not self.active:
      return
    if self._bar is not None:
      if self._restore is not None:
        self._restore()
      self._bar.close()
      self._bar = None
    self._file.close()

  def end_trackers(self, ok: bool) -> None:
    """Ends the trackers' runs: a finished one (`ok`) first logs the workdir's files as
    artifacts (the loss curve, config.json, eval reports); a failed one is marked failed."""
    self._trackers.close(ok, artifacts(self._workdir) if ok else [])


def _duration(seconds: float) -> str:
  """'45s', '12m05s', '3h02m'."""
  seconds = max(int(round(seconds)), 0)
  if seconds < 60:
    return f"{seconds}s"
  if seconds < 3600:
    return f"{seconds // 60}m{seconds % 60:02d}s"
  return f"{seconds // 3600}h{seconds // 60 % 60:02d}m"


def _lines_above_bar():
  """Sends what is written to stderr (absl's log lines, warnings) through tqdm.write while the bar
  is shown, so each line lands above the bar instead of on its line. Returns the undo."""
  from absl import logging as absl_logging
  from tqdm.contrib import DummyTqdmFile
  real = sys.stderr
  wrapped = DummyTqdmFile(real)
  handler = absl_logging.get_absl_handler().python_handler
  swap_handler = handler.stream is real
  sys.stderr = wrapped
  if swap_handler:
    handler.stream = wrapped

  def restore():
    if sys.stderr is wrapped:
      sys.stderr = real
    if swap_handler and handler.stream is wrapped:
      handler.stream = real
    wrapped.flush()

  return restore
