"""AdamW with linear warmup and cosine decay, and global-norm clipping."""

from __future__ import annotations

import contextlib

import jax.numpy as jnp
import numpy as np
import optax

from jaxft.errors import ConfigError


class Schedule:
  """The learning rate at a step: linear from `init` to `peak` over `warmup` steps, then cosine
  from `peak` to `end` over the steps up to `decay` (optax's warmup_cosine_decay_schedule; a
  constant schedule is the cosine with end == peak).

  Its five numbers are data, not constants of a compiled program: the jitted train step takes
  them as an argument (`given` binds them while it traces), so runs that differ only in the
  learning rate, the warmup or the number of steps share one compiled step (an lr sweep compiles
  once, a resumed run with more steps finds its step in the compilation cache). Called outside
  such a trace it uses its own numbers."""

  def __init__(self, init: float, peak: float, warmup: int, decay: int, end: float):
    self.numbers = np.asarray([init, peak, warmup, decay, end], np.float32)
    self._given = None

  @contextlib.contextmanager
  def given(self, numbers):
    """Within the block, calls read `numbers` (a traced float32[5]) instead of their own."""
    self._given = numbers
    try:
      yield
    finally:
      self._given = None

  def __call__(self, count):
    v = jnp.asarray(self.numbers) if self._given is None else self._given
    init, peak, warmup, decay, end = (v[i] for i in range(5))
    count = jnp.asarray(count, jnp.float32)
    linear = init + (peak - init) * jnp.clip(count, 0.0, warmup) / jnp.maximum(warmup, 1.0)
    span = jnp.maximum(decay - warmup, 1.0)
    t = jnp.minimum(count - warmup, span)
    alpha = jnp.where(peak == 0, 0.0, end / jnp.where(peak == 0, 1.0, peak))
    cosine = peak * ((1 - alpha) * 0.5 * (1 + jnp.cos(jnp.pi * t / span)) + alpha)
    return jnp.where(count < warmup, linear, cosine)


def schedule(optim_cfg, total_steps: int) -> Schedule:
  """Warmup from 0 to optim.lr over optim.warmup_steps, then cosine to lr * optim.min_lr_ratio
  (or constant)."""
  lr, warmup = float(optim_cfg.lr), int(optim_cfg.warmup_steps)
  if lr <= 0:
    raise ConfigError(f"optim.lr={lr}: must be > 0")
  warmup = min(warmup, max(total_steps - 1, 0))
  init = 0.0 if warmup else lr
  if optim_cfg.schedule == "constant":
    return Schedule(init, lr, warmup, warmup + 1, lr)
  if optim_cfg.schedule != "cosine":
    raise ConfigError(f"optim.schedule={optim_cfg.schedule!r}: expected cosine or constant")
  return Schedule(init, lr, warmup, max(total_steps, warmup + 1), lr * float(optim_cfg.min_lr_ratio))


def make(optim_cfg, total_steps: int) -> tuple[optax.GradientTransformation, Schedule]:
  """The optimizer over the trainable tree, and its learning-rate schedule."""
  sched = schedule(optim_cfg, total_steps)
  parts = []
  if optim_cfg.clip_norm > 0:
    parts.append(optax.clip_by_global_norm(float(optim_cfg.clip_norm)))
  parts.append(optax.adamw(sched, b1=float(optim_cfg.b1), b2=float(optim_cfg.b2),
                           eps=float(optim_cfg.eps), weight_decay=float(optim_cfg.weight_decay)))
  return optax.chain(*parts), sched
