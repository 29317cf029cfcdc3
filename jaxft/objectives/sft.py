"""Supervised fine-tuning: cross-entropy on target tokens, with optional replay toward the base
(train.base_kl) on rows marked "distill"."""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
from absl import logging

from jaxft.data import pipeline, show
from jaxft.data import stream as streaming
from jaxft.errors import ConfigError
from jaxft.objectives.base import TOKEN_FIELDS, Objective
from jaxft.peft.loss import loss_sum, loss_sum_and_aux, loss_sum_and_base_kl


@dataclasses.dataclass(frozen=True)
class SFT(Objective):
  """Cross-entropy on target tokens, normalised by the target tokens of the whole batch.

  base_kl > 0 adds base_kl * the mean over the tokens of rows marked "distill" (batch["distill"])
  of KL(base || tuned): those rows are trained toward the base model's next-token distributions
  (replay that keeps what the base knew), not toward their own text."""
  name: str = "sft"
  metric_names: tuple = ()
  base_kl: float = 0.0

  def counts(self, batch):
    # batches: micro-batches (train: the leading accumulation axis; eval: one per batch), over
    # which the mixture-of-experts load-balancing loss is averaged.
    batches = batch["inputs"].shape[0] if batch["inputs"].ndim == 3 else 1
    out = {"tokens": jnp.sum(batch["weights"]), "batches": jnp.float32(batches)}
    if self.base_kl:
      out["distill_tokens"] = jnp.sum(batch["distill"])
    return out

  def sums(self, cfg, method, trainable, frozen, batch, rng):
    if self.base_kl:
      s, _, aux, kl = loss_sum_and_base_kl(cfg, method, trainable, frozen, batch, rng)
      terms, stats = {"nll": s, "kl": kl}, {}
    elif not cfg.num_experts:
      s, _ = loss_sum(cfg, method, trainable, frozen, batch, rng)
      return {"nll": s}, {}
    else:
      s, _, aux = loss_sum_and_aux(cfg, method, trainable, frozen, batch, rng)
      terms, stats = {"nll": s}, {}
    if cfg.num_experts:
      # Mixture of experts: + model.router_aux_coef * the load-balancing loss, as transformers
      # adds it (per micro-batch, averaged over them); router_aux logged unscaled.
      terms["aux"], stats["router_aux"] = cfg.router_aux_coef * aux, aux
    return terms, stats

  def loss(self, terms, counts):
    nll = terms["nll"] / jnp.maximum(counts["tokens"], 1.0)
    if "aux" in terms:
      nll = nll + terms["aux"] / counts["batches"]
    if "kl" in terms:
      nll = nll + self.base_kl * terms["kl"] / jnp.maximum(counts["distill_tokens"], 1.0)
    return nll

  def eval_loss(self, terms, counts):
    """The loss evaluation reports (eval_loss, and the perplexity made of it): the training loss
    without a mixture of experts' load-balancing term, which is logged beside it (router_aux),
    so that it is the cross-entropy a dense model or transformers would report."""
    return self.loss({k: v for k, v in terms.items() if k != "aux"}, counts)

  def metrics(self, terms, stats, counts):
    out = {}
    if "router_aux" in stats:
      out["router_aux"] = stats["router_aux"] / counts["batches"]
    if "kl" in terms:  # the mean KL(base || tuned) per distill token, unscaled
      out["base_kl"] = terms["kl"] / jnp.maximum(counts["distill_tokens"], 1.0)
    return out

  def perplexity(self, eval_loss):
    return math.exp(min(eval_loss, 50.0))

  def uniform_loss(self, vocab_size):
    return math.log(vocab_size)

  def load_data(self, config, encoder, vocab_size):
    """Examples of any supervised format (pipeline.load_examples), or a streamed data.train's
    source (jaxft.data.stream); rows marked "distill" are plain rows unless train.base_kl > 0,
    which then needs at least one of them in data.train (not checked ahead for a stream)."""
    fmt, max_len = config.data.format, config.data.max_len
    if streaming.wanted(config):  # rows read, and checked, as the run reaches them
      pipeline.check_format(fmt)
      train_ds = streaming.StreamData(config.data.train, streaming.encoder_of(
          encoder, fmt, max_len, vocab_size, keep_distill=bool(self.base_kl)))
    else:  # (show: the first example is logged with its loss mask)
      train_ds = pipeline.load_examples(config.data.train, encoder, fmt, max_len, vocab_size,
                                        show=True)
    eval_ds = (pipeline.load_examples(config.data.eval, encoder, fmt, max_len, vocab_size)
               if config.data.eval else None)
    for ds in (d for d in (train_ds, eval_ds) if d is not None and d.distill and
               not self.base_kl):  # without the KL term marked rows are plain rows
      logging.info("%d rows marked \"distill\" are trained on their text (train.base_kl=0)",
                   ds.distill)
      for e in ds.examples:
        e.distill = False
      ds.distill = 0
    if self.base_kl and not train_ds.distill and not streaming.wanted(config):
      raise ConfigError(f"train.base_kl={self.base_kl}: no row of {config.data.train} is "
                        "marked \"distill\": true, so the KL term would have nothing to act on")
    return train_ds, eval_ds

  def preview(self, config, encoder, vocab_size, split="train"):
    return show.Supervised(config, encoder, vocab_size, split)

  def stream(self, config, train_ds):
    if streaming.wanted(config):
      return train_ds.stream(config)
    return pipeline.TrainStream(
        train_ds.examples, max_len=config.data.max_len, packing=config.data.packing,
        rows_per_batch=config.data.batch_size, seed=config.train.seed,
        shuffle=config.data.shuffle)

  def eval_batches(self, examples, config):
    return pipeline.eval_batches(examples, config.data.max_len, config.data.batch_size,
                                 config.data.packing)

  def batch_fields(self):
    return dict(TOKEN_FIELDS)


def from_config(config, trains_base: bool) -> SFT:
  """SFT with train.base_kl. Raises ConfigError for keys SFT cannot honour."""
  t = config.train
  if t.precompute_reference:
    raise ConfigError("train.precompute_reference=True needs train.objective=dpo")
  if t.base_kl and trains_base:
    raise ConfigError(f"train.base_kl={t.base_kl} with peft.method=full: the KL term compares "
                      "with the base, and full fine-tuning keeps no frozen copy of it")
  return SFT(base_kl=float(t.base_kl))
