"""One jitted train step of jaxft's own step function on a tiny model (accumulation and objective
tests)."""

import jax
import jax.numpy as jnp

from conftest import make_config
from jaxft import optim
from jaxft.step import make_steps


def optim_cfg(**kw):
  """configs/base.py's optimizer as plain AdamW at a constant lr 1e-2, no clipping, no decay;
  `kw` overrides."""
  c = make_config("base").optim
  c.update(dict(lr=1e-2, schedule="constant", warmup_steps=0, clip_norm=0.0), **kw)
  return c


def one_step(cfg, method, objective, trainable, frozen, batch, accum):
  """(state, metrics) after one step on `batch` split into `accum` micro-batches."""
  tx, sched = optim.make(optim_cfg(accum_steps=accum), 10)
  steps = make_steps(cfg, method, tx, sched, skip_nonfinite=False, dropout=False,
                     objective=objective)
  state = {"step": jnp.zeros((), jnp.int32), "trainable": trainable, "opt_state": tx.init(trainable),
           "rng": jax.random.key(0), "skipped": jnp.zeros((), jnp.int32)}
  b = {k: jnp.asarray(v).reshape(accum, v.shape[0] // accum, *v.shape[1:]) for k, v in batch.items()}
  return jax.jit(steps.train)(state, b, frozen)
