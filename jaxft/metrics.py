"""Metrics sinks: metrics.jsonl, TensorBoard events and a progress bar, written by process 0."""

from __future__ import annotations

import json
import math
import os
import sys

import jax


class MetricsWriter:
  """Appends one JSON object per logged step to WORKDIR/metrics.jsonl and mirrors it to TensorBoard."""

  def __init__(self, workdir: str, total_steps: int, start_step: int, progress: bool):
    self.active = jax.process_index() == 0
    self._bar = None
    if not self.active:
      return
    os.makedirs(workdir, exist_ok=True)
    self._file = open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8")
    from tensorboardX import SummaryWriter
    self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
    if progress:
      from tqdm import tqdm
      self._bar = tqdm(total=total_steps, initial=start_step, unit="step", file=sys.stderr,
                       dynamic_ncols=True, disable=None)

  def write(self, step: int, values: dict) -> None:
    """Records `values` at `step` (floats; non-finite floats are written as strings)."""
    if not self.active:
      return
    row = {"step": int(step)}
    for k, v in values.items():
      v = float(v) if not isinstance(v, (int, str)) else v
      row[k] = v if not isinstance(v, float) or math.isfinite(v) else str(v)
      if isinstance(v, (int, float)) and math.isfinite(v):
        self._tb.add_scalar(k, v, step)
    self._file.write(json.dumps(row) + "\n")
    self._file.flush()

  def progress(self, step: int, loss: float, tokens_per_sec: float, mfu: float | None = None) -> None:
    """Updates the bar: loss, tokens/s and, when the device's peak is known, MFU."""
    if self._bar is not None:
      self._bar.n = step
      extra = {} if mfu is None else {"mfu": f"{100 * mfu:.1f}%"}
      self._bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_sec:,.0f}", **extra,
                            refresh=False)
      self._bar.refresh()

  def close(self) -> None:
    if not self.active:
      return
    if self._bar is not None:
      self._bar.close()
    self._tb.flush()
    self._tb.close()
    self._file.close()
