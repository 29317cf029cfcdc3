"""Preference objectives: DPO (sigmoid or IPO loss), ORPO and SimPO over pairs.

Preference batches hold pairs: a pair's chosen and rejected sequences are adjacent segments of one
row (segment 2k+1 chosen, 2k+2 rejected; several pairs per row when packed; jaxft/data/
preference.py). A sequence's log-probability is the sum of its target tokens' log-probabilities.
The DPO reference is either the frozen base run with the method switched off (`peft.Method()`: its
hooks are the identity, and the frozen tree is the whole base; no second copy of any weight), or
per-token reference log-probabilities stored with the data (`batch["ref_logps"]`, computed by
`before_training` under train.precompute_reference).
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
from absl import logging

from jaxft import sharding
from jaxft.data import preference as pair_data, show
from jaxft.errors import ConfigError
from jaxft.objectives.base import TOKEN_FIELDS, Objective, finite, token_logps
from jaxft.peft.base import Method

NAMES = ("dpo", "orpo", "simpo")
DPO_LOSSES = ("sigmoid", "ipo")
PREFERENCE_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins",
                      "rewards/accuracies", "logps/chosen", "logps/rejected")


def per_sequence(x, segment_ids):
  """Sums x [..., R, T] over the tokens of each sequence: [..., R, K, 2] with [..., k, 0] the
  chosen and [..., k, 1] the rejected sequence of the row's k-th pair (K = ceil(T / 2) slots;
  padding, segment 0, is dropped)."""
  *lead, R, T = x.shape
  K = (T + 1) // 2
  x = x.reshape(-1, T)
  seg = segment_ids.reshape(-1, T)
  rows = x.shape[0]
  idx = jnp.arange(rows)[:, None] * (2 * K) + jnp.maximum(seg - 1, 0)
  vals = jnp.where(seg > 0, x, 0.0)
  out = jax.ops.segment_sum(vals.reshape(-1), idx.reshape(-1), num_segments=rows * 2 * K)
  return out.reshape(*lead, R, K, 2)


def _log1mexp(x):
  """log(1 - exp(x)) for x < 0, accurate near 0 and far below it."""
  return jnp.where(x > -0.6931472, jnp.log(-jnp.expm1(x)), jnp.log1p(-jnp.exp(x)))


def pair_losses(name: str, loss_type: str, beta: float, label_smoothing: float, gamma: float,
                lam: float, pc, pr, rc, rr, nc, nr):
  """Per-pair losses and what TRL logs, from per-sequence summed log-probabilities.

  pc, pr: the policy's chosen / rejected log-probs (sums over target tokens); rc, rr: the
  reference's; nc, nr: target-token counts (>= 1 where the pair is valid). Returns (loss [...],
  the "or" part of ORPO's loss [...] (zero otherwise), chosen reward, rejected reward, chosen
  logp, rejected logp): the rewards and log-probs as TRL logs them for that objective.
  """
  zero = jnp.zeros_like(pc)
  if name == "dpo":
    chosen_ratio, rejected_ratio = pc - rc, pr - rr
    if loss_type == "ipo":  # IPO compares length-averaged log-ratios (as TRL, after the authors)
      loss = (chosen_ratio / nc - rejected_ratio / nr - 1.0 / (2.0 * beta)) ** 2
    else:  # label_smoothing > 0: conservative DPO (the preference label is flipped with that chance)
      logits = chosen_ratio - rejected_ratio
      loss = (-jax.nn.log_sigmoid(beta * logits) * (1.0 - label_smoothing)
              - jax.nn.log_sigmoid(-beta * logits) * label_smoothing)
    return loss, zero, beta * chosen_ratio, beta * rejected_ratio, pc, pr
  ac, ar = pc / nc, pr / nr  # ORPO and SimPO use length-averaged log-probs
  if name == "simpo":
    logits = ac - ar - gamma / beta
    loss = (-jax.nn.log_sigmoid(beta * logits) * (1.0 - label_smoothing)
            - jax.nn.log_sigmoid(-beta * logits) * label_smoothing)
    return loss, zero, beta * ac, beta * ar, ac, ar
  if name == "orpo":
    log_odds = (ac - ar) - (_log1mexp(ac) - _log1mexp(ar))
    ratio = jax.nn.log_sigmoid(log_odds)
    return -lam * ratio, ratio, lam * ac, lam * ar, ac, ar
  raise ValueError(name)


@dataclasses.dataclass(frozen=True)
class Preference(Objective):
  """DPO (sigmoid or IPO loss), ORPO or SimPO over pair batches.

  reference: "base" (the frozen tree run with the method switched off), "data" (per-token
  reference log-probs in batch["ref_logps"]) or "none" (ORPO, SimPO)."""
  name: str = "dpo"
  loss_type: str = "sigmoid"
  beta: float = 0.1
  label_smoothing: float = 0.0
  gamma: float = 0.5
  lam: float = 0.1
  reference: str = "base"
  metric_names: tuple = PREFERENCE_METRICS

  def _sequences(self, batch):
    seq_w = per_sequence(batch["weights"], batch["segment_ids"])
    valid = (seq_w[..., 0] > 0) & (seq_w[..., 1] > 0)
    return seq_w, valid

  def counts(self, batch):
    seq_w, valid = self._sequences(batch)
    return {"tokens": jnp.sum(batch["weights"]), "pairs": jnp.sum(valid.astype(jnp.float32)),
            "chosen_tokens": jnp.sum(jnp.where(valid, seq_w[..., 0], 0.0))}

  def sums(self, cfg, method, trainable, frozen, batch, rng):
    w = batch["weights"]
    # The reference first: its temporaries are gone before the policy's saved activations exist.
    if self.reference == "base":
      ref_tok = jax.lax.stop_gradient(token_logps(cfg, Method(), {}, frozen, batch, None))
    elif self.reference == "data":
      ref_tok = batch["ref_logps"]
    else:
      ref_tok = jnp.zeros_like(w)
    ref = per_sequence(ref_tok * w, batch["segment_ids"])
    lp = per_sequence(token_logps(cfg, method, trainable, frozen, batch, rng) * w,
                      batch["segment_ids"])
    seq_w, valid = self._sequences(batch)
    n = jnp.maximum(seq_w, 1.0)
    loss, ratio, r_c, r_r, l_c, l_r = pair_losses(
        self.name, self.loss_type, self.beta, self.label_smoothing, self.gamma, self.lam,
        lp[..., 0], lp[..., 1], ref[..., 0], ref[..., 1], n[..., 0], n[..., 1])
    keep = lambda x: jnp.sum(jnp.where(valid, x, 0.0))
    terms = {"pairs": keep(loss)}
    if self.name == "orpo":  # plus the NLL of the chosen tokens
      terms["chosen_nll"] = -keep(lp[..., 0])
    stats = {"rewards/chosen": keep(r_c), "rewards/rejected": keep(r_r),
             "rewards/margins": keep(r_c - r_r),
             "rewards/accuracies": keep((r_c > r_r).astype(jnp.float32)),
             "logps/chosen": keep(l_c), "logps/rejected": keep(l_r)}
    if self.name == "orpo":
      stats["log_odds_ratio"] = keep(ratio)
    return terms, stats

  def loss(self, terms, counts):
    out = terms["pairs"] / jnp.maximum(counts["pairs"], 1.0)
    if self.name == "orpo":
      out = out + terms["chosen_nll"] / jnp.maximum(counts["chosen_tokens"], 1.0)
    return out

  def eval_loss(self, terms, counts):
    """The loss evaluation reports: the training loss (a preference loss has no auxiliary term)."""
    return self.loss(terms, counts)

  def metrics(self, terms, stats, counts):
    pairs = jnp.maximum(counts["pairs"], 1.0)
    out = {k: v / pairs for k, v in stats.items()}
    if self.name == "orpo":
      out["nll_loss"] = terms["chosen_nll"] / jnp.maximum(counts["chosen_tokens"], 1.0)
    return out

  def load_data(self, config, encoder, vocab_size):
    """Pairs of data.train / data.eval (jaxft/data/preference.py's load_pairs)."""
    fmt, max_len = config.data.format, config.data.max_len
    train_ds = pair_data.load_pairs(config.data.train, encoder, fmt, max_len, vocab_size)
    eval_ds = (pair_data.load_pairs(config.data.eval, encoder, fmt, max_len, vocab_size)
               if config.data.eval else None)
    return train_ds, eval_ds

  def preview(self, config, encoder, vocab_size, split="train"):
    return show.Pairs(config, encoder, vocab_size, split)

  def stream(self, config, train_ds):
    return pair_data.PairStream(
        train_ds.examples, max_len=config.data.max_len, packing=config.data.packing,
        rows_per_batch=config.data.batch_size, seed=config.train.seed,
        shuffle=config.data.shuffle)

  def eval_batches(self, examples, config):
    return pair_data.eval_batches(examples, config.data.max_len, config.data.batch_size,
                              config.data.packing)

  def batch_fields(self):
    return dict(TOKEN_FIELDS, ref_logps=jnp.float32)

  def before_training(self, run, model, datasets, config):
    """With reference="data" (train.precompute_reference), the reference log-probs of every
    pair, from the weights as the run starts: before any resume replaces them."""
    if self.reference == "data":
      precompute_reference(run, model, datasets, config)


def precompute_reference(run, model, datasets, config) -> None:
  """Stores in every pair of `datasets` the per-token log-probabilities of the model as `run`
  (the trainer's Prepared) starts: DPO's reference in one forward pass over the data, so that no
  frozen copy of the starting weights is kept (full fine-tuning)."""
  # (replicated out: every process reads the whole [rows, T] block, as it holds every pair)
  fn = jax.jit(lambda tr, fz, b: token_logps(model.cfg, model.method, tr, fz, b, None),
               out_shardings=sharding.replicated(model.mesh))
  logps = lambda b: fn(run.state["trainable"], run.frozen,
                       {k: v[0] for k, v in sharding.put_batch(b, model.mesh, 1).items()})
  for ds in datasets:
    t0 = time.time()
    pair_data.attach_reference(ds.examples, logps, config.data.max_len, config.data.batch_size)
    logging.info("reference log-probs of %d pairs in %.1fs", len(ds.examples), time.time() - t0)


def from_config(config, trains_base: bool) -> Preference:
  """The preference objective named by train.objective with its pref.* settings. Raises
  ConfigError on bad values or combinations (DPO with full fine-tuning needs
  train.precompute_reference)."""
  t, p = config.train, config.pref
  name = t.objective
  if t.eval_accuracy:
    raise ConfigError(f"train.eval_accuracy=True: answer accuracy reads single answers, not the "
                      f"pairs of train.objective={name}")
  if t.base_kl:
    raise ConfigError(f"train.base_kl={t.base_kl}: the KL-to-base term is part of "
                      f"train.objective=sft, not {name}")
  # Every pref.* number is checked whichever objective reads it: a NaN that reaches the step
  # surfaces only as "loss or gradients are not finite", blaming training.
  for key, ok, want in (
      ("beta", finite(p.beta) and p.beta > 0, "must be a finite number > 0"),
      ("label_smoothing", finite(p.label_smoothing) and 0.0 <= p.label_smoothing < 0.5,
       "must be in [0, 0.5)"),
      ("simpo_gamma", finite(p.simpo_gamma) and p.simpo_gamma >= 0,
       "must be a finite number >= 0 (the target reward margin)"),
      ("orpo_lambda", finite(p.orpo_lambda) and p.orpo_lambda > 0, "must be a finite number > 0")):
    if not ok:
      raise ConfigError(f"pref.{key}={p[key]}: {want}")
  if p.loss_type not in DPO_LOSSES:
    raise ConfigError(f"pref.loss_type={p.loss_type!r}: expected one of {', '.join(DPO_LOSSES)}")
  if name == "dpo":
    if trains_base and not t.precompute_reference:
      raise ConfigError("train.objective=dpo with peft.method=full needs "
                        "train.precompute_reference=True: the reference is the starting model, "
                        "and full fine-tuning keeps no frozen copy of it")
    reference = "data" if t.precompute_reference else "base"
  else:
    if t.precompute_reference:
      raise ConfigError(f"train.precompute_reference=True: {name} uses no reference model")
    reference = "none"
  return Preference(name=name, loss_type=p.loss_type, beta=float(p.beta),
                    label_smoothing=float(p.label_smoothing), gamma=float(p.simpo_gamma),
                    lam=float(p.orpo_lambda), reference=reference)
