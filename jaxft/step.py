"""The pure train and eval steps.

`train_step(state, batch, frozen)`: gradients over `state["trainable"]` alone; the frozen base is an
argument that is read, never differentiated, never donated, never updated. Batches carry a leading
micro-batch axis [accum, rows, T]; the loss is the sum of token losses divided by the target tokens
of the whole accumulated batch, so accumulation equals one large batch.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from jaxft.models import llama
from jaxft.models.config import ModelConfig
from jaxft.peft.base import Method, merge_trees

State = dict[str, Any]


def token_losses(cfg: ModelConfig, params, h, targets, chunk: int = 2048):
  """Per-token cross-entropy [B, T] in float32, computed in chunks of tokens so that the full
  [B*T, vocab] float32 logits never exist at once (each chunk is rematerialised in the backward)."""
  B, T, D = h.shape
  hf = h.reshape(B * T, D)
  tf = targets.reshape(B * T)
  n = B * T
  chunk = min(chunk, n)
  pad = (-n) % chunk
  if pad:
    hf = jnp.pad(hf, ((0, pad), (0, 0)))
    tf = jnp.pad(tf, (0, pad))
  kernel = llama.output_kernel(cfg, params)

  @jax.checkpoint
  def one(args):
    hc, tc = args
    lg = jax.lax.dot_general(hc.astype(cfg.dtype), kernel.astype(cfg.dtype), (((1,), (0,)), ((), ())),
                             preferred_element_type=jnp.float32)
    lse = jax.nn.logsumexp(lg, axis=-1)
    return lse - jnp.take_along_axis(lg, tc[:, None], axis=-1)[:, 0]

  losses = jax.lax.map(one, (hf.reshape(-1, chunk, D), tf.reshape(-1, chunk)))
  return losses.reshape(-1)[:n].reshape(B, T)


def loss_sum(cfg: ModelConfig, method: Method, trainable, frozen, batch, rng):
  """(sum of target-token losses, number of target tokens) of one micro-batch."""
  params = merge_trees(frozen, trainable)
  h, _ = llama.hidden_states(cfg, params, batch["inputs"], adapter=method,
                             positions=batch["positions"], segment_ids=batch["segment_ids"], rng=rng)
  losses = token_losses(cfg, params, h, batch["targets"])
  w = batch["weights"]
  return jnp.sum(losses * w), jnp.sum(w)


@dataclasses.dataclass(frozen=True)
class StepFns:
  train: Callable
  eval: Callable


def make_steps(cfg: ModelConfig, method: Method, tx: optax.GradientTransformation,
               schedule: optax.Schedule, skip_nonfinite: bool, dropout: bool) -> StepFns:
  """Builds the (unjitted) train and eval step functions."""

  def train_step(state: State, batch, frozen):
    step_rng = jax.random.fold_in(state["rng"], state["step"])
    grad_fn = jax.value_and_grad(
        lambda tr, mb, r: loss_sum(cfg, method, tr, frozen, mb, r if dropout else None),
        has_aux=True)

    def micro(carry, xs):
      g_acc, l_acc, n_acc = carry
      mb, i = xs
      (l, n), g = grad_fn(state["trainable"], mb, jax.random.fold_in(step_rng, i))
      return (jax.tree.map(jnp.add, g_acc, g), l_acc + l, n_acc + n), None

    zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), state["trainable"])
    accum = batch["inputs"].shape[0]
    (g, l, n), _ = jax.lax.scan(micro, (zeros, 0.0, 0.0), (batch, jnp.arange(accum)))
    denom = jnp.maximum(n, 1.0)
    grads = jax.tree.map(lambda x: x / denom, g)
    loss = l / denom
    grad_norm = optax.global_norm(grads)
    updates, opt_state = tx.update(grads, state["opt_state"], state["trainable"])
    new_tr = optax.apply_updates(state["trainable"], updates)
    new_tr = jax.tree.map(lambda new, old: new.astype(old.dtype), new_tr, state["trainable"])
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
               "skipped": new_state["skipped"] + 0}
    return new_state, metrics

  def eval_step(trainable, frozen, batch):
    return loss_sum(cfg, method, trainable, frozen, batch, None)

  return StepFns(train_step, eval_step)
