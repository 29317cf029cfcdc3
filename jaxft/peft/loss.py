"""The training loss of the decoder under a fine-tuning method, one micro-batch at a time.

The method's trainable leaves are merged into the frozen tree (kept packed: frozen kernels are
scanned as integers, see models.ops.pack_frozen), the adapted decoder runs, and the target tokens'
losses are summed with models.loss.token_losses (and, for train.base_kl, models.loss.kl_sum
against the base: the same frozen tree with the method switched off). It lives in peft/ because
it needs both the decoder and `Method`; models/ knows nothing of methods.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxft.models import llama, moe
from jaxft.models.config import ModelConfig
from jaxft.models.loss import kl_sum, token_losses
from jaxft.models.ops import pack_frozen
from jaxft.peft.base import Method, merge_trees


def loss_sum(cfg: ModelConfig, method: Method, trainable, frozen, batch, rng):
  """(sum of target-token losses, number of target tokens) of one micro-batch."""
  return loss_sum_and_aux(cfg, method, trainable, frozen, batch, rng)[:2]


def loss_sum_and_aux(cfg: ModelConfig, method: Method, trainable, frozen, batch, rng):
  """`loss_sum` plus the micro-batch's load-balancing loss (moe.load_balancing_loss, unscaled)
  of a mixture of experts; 0.0 for a dense model."""
  return _losses(cfg, method, trainable, pack_frozen(frozen), batch, rng)[:3]


def _head_trained(cfg: ModelConfig, trainable) -> bool:
  """Whether the output projection (the embedding, when tied) is among the trained leaves."""
  return ("embed" if cfg.tie_embeddings else "lm_head") in trainable


def _losses(cfg: ModelConfig, method: Method, trainable, packed, batch, rng):
  """(sum of target-token losses, target tokens, load-balancing loss, the merged params, the
  final hidden states) of one micro-batch; `packed` is the frozen tree after pack_frozen."""
  # (frozen kernels are never differentiated: they are scanned as integers, see pack_frozen)
  params = merge_trees(packed, trainable)
  h, _, router = llama.hidden_states_and_router(
      cfg, params, batch["inputs"], adapter=method, positions=batch["positions"],
      segment_ids=batch["segment_ids"], rng=rng)
  losses = token_losses(cfg, params, h, batch["targets"],
                        head_trained=_head_trained(cfg, trainable))
  w = batch["weights"]
  aux = jnp.float32(0.0) if router is None else moe.load_balancing_loss(cfg, router["stats"])
  return jnp.sum(losses * w), jnp.sum(w), aux, params, h


def loss_sum_and_base_kl(cfg: ModelConfig, method: Method, trainable, frozen, batch, rng):
  """`loss_sum_and_aux` plus the sum over the tokens marked in batch["distill"] of KL(base ||
  tuned): the base is the frozen tree run with the method switched off (no second copy of any
  weight). Returns (loss sum, target tokens, load-balancing loss, KL sum)."""
  packed = pack_frozen(frozen)
  # The base first: its temporaries are gone before the tuned model's saved activations exist.
  h_ref, _ = llama.hidden_states(cfg, packed, batch["inputs"], adapter=Method(),
                                 positions=batch["positions"], segment_ids=batch["segment_ids"])
  h_ref = jax.lax.stop_gradient(h_ref)
  s, n, aux, params, h = _losses(cfg, method, trainable, packed, batch, rng)
  return s, n, aux, kl_sum(cfg, params, h, packed, h_ref, batch["distill"],
                           head_trained=_head_trained(cfg, trainable))
