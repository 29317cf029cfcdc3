"""The pure train and eval steps.

`train_step(state, batch, frozen)`: gradients over `state["trainable"]` alone; the frozen base is an
argument that is read, never differentiated, never donated, never updated. Batches carry a leading
micro-batch axis [accum, rows, T]; the loss is the objective's (jaxft/objectives/: by default the
sum of token losses divided by the target tokens of the whole accumulated batch), normalised by
counts of the whole accumulated batch, so accumulation equals one large batch.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from jaxft import objectives
from jaxft.models.config import ModelConfig
from jaxft.peft.base import Method

State = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class StepFns:
  train: Callable
  eval: Callable
  objective: Any = objectives.SFT()


def make_steps(cfg: ModelConfig, method: Method, tx: optax.GradientTransformation,
               schedule: optax.Schedule, skip_nonfinite: bool, dropout: bool,
               objective=None) -> StepFns:
  """Builds the (unjitted) train and eval step functions of `objective` (jaxft.objectives;
  default supervised fine-tuning).

  eval(trainable, frozen, batch) -> (terms, stats, counts) of one batch: sums that add up over
  batches; objective.loss / objective.metrics turn the totals into the logged values."""
  objective = objective or objectives.SFT()

  def train_step(state: State, batch, frozen):
    step_rng = jax.random.fold_in(state["rng"], state["step"])
    # The normalisers of the whole accumulated batch come from the data alone, so each
    # micro-batch's loss is already its share of the large batch's loss.
    counts = objective.counts(batch)

    def micro_loss(tr, mb, r):
      terms, stats = objective.sums(cfg, method, tr, frozen, mb, r if dropout else None)
      return objective.loss(terms, counts), (terms, stats)

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

    def micro(g_acc, xs):
      mb, i = xs
      (_, aux), g = grad_fn(state["trainable"], mb, jax.random.fold_in(step_rng, i))
      return jax.tree.map(jnp.add, g_acc, g), aux

    zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), state["trainable"])
    accum = batch["inputs"].shape[0]
    grads, (terms, stats) = jax.lax.scan(micro, zeros, (batch, jnp.arange(accum)))
    terms, stats = jax.tree.map(lambda x: jnp.sum(x, axis=0), (terms, stats))
    loss = objective.loss(terms, counts)
    n = counts["tokens"]
    grad_norm = optax.global_norm(grads)
    updates, opt_state = tx.update(grads, state["opt_state"], state["trainable"])
    new_tr = optax.apply_updates(state["trainable"], updates)
    new_tr = jax.tree.map(lambda new, old: new.astype(old.dtype), new_tr, state["trainable"])
    # Float32 gradients would promote bf16 moments (full fine-tuning with param_dtype=bfloat16):
    # keep the state's dtypes, or the second step recompiles and the moments double in size.
    opt_state = jax.tree.map(lambda new, old: new.astype(old.dtype), opt_state,
                             state["opt_state"])
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep = finite | (not skip_nonfinite)  # by default a bad step is applied and the host stops
    pick = lambda new, old: jax.tree.map(lambda a, b: jnp.where(keep, a, b), new, old)
    new_state = {
        "step": state["step"] + 1,
        "trainable": pick(new_tr, state["trainable"]),
        "opt_state": pick(opt_state, state["opt_state"]),
        "rng": state["rng"],
        "skipped": state["skipped"] + (~finite).astype(jnp.int32),
    }
    metrics = {"loss": loss, "grad_norm": grad_norm, "target_tokens": n,
               "lr": schedule(state["step"]), "finite": finite,
               "skipped": new_state["skipped"] + 0,
               "objective": objective.metrics(terms, stats, counts)}
    return new_state, metrics

  def eval_step(trainable, frozen, batch):
    terms, stats = objective.sums(cfg, method, trainable, frozen, batch, None)
    return terms, stats, objective.counts(batch)

  return StepFns(train_step, eval_step, objective)
