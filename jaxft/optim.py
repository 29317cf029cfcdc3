"""AdamW with linear warmup and cosine decay, and global-norm clipping."""

from __future__ import annotations

import optax

from jaxft.errors import ConfigError


def schedule(optim_cfg, total_steps: int) -> optax.Schedule:
  """Warmup from 0 to optim.lr over optim.warmup_steps, then cosine to lr * optim.min_lr_ratio."""
  lr, warmup = float(optim_cfg.lr), int(optim_cfg.warmup_steps)
  if lr <= 0:
    raise ConfigError(f"optim.lr={lr}: must be > 0")
  warmup = min(warmup, max(total_steps - 1, 0))
  if optim_cfg.schedule == "constant":
    return optax.join_schedules([optax.linear_schedule(0.0, lr, max(warmup, 1)),
                                 optax.constant_schedule(lr)], [warmup]) if warmup else \
        optax.constant_schedule(lr)
  if optim_cfg.schedule != "cosine":
    raise ConfigError(f"optim.schedule={optim_cfg.schedule!r}: expected cosine or constant")
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0 if warmup else lr, peak_value=lr, warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1), end_value=lr * float(optim_cfg.min_lr_ratio))


def make(optim_cfg, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """The optimizer over the trainable tree, and its learning-rate schedule."""
  sched = schedule(optim_cfg, total_steps)
  parts = []
  if optim_cfg.clip_norm > 0:
    parts.append(optax.clip_by_global_norm(float(optim_cfg.clip_norm)))
  parts.append(optax.adamw(sched, b1=float(optim_cfg.b1), b2=float(optim_cfg.b2),
                           eps=float(optim_cfg.eps), weight_decay=float(optim_cfg.weight_decay)))
  return optax.chain(*parts), sched
