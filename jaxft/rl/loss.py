"""GRPO's pure math on arrays: group-relative advantages and the clipped policy loss of TRL 1.16's
GRPOTrainer (loss types grpo, bnpo, dr_grpo, dapo), given per-token log-probs the caller computed.

Shapes: N completions (prompts x generations, a prompt's generations adjacent), T completion
positions; `mask` [N, T] is 1 on the completion tokens that are trained, 0 on padding. For one
token with ratio r = exp(logp - old_logp) and advantage A, the loss is

  -min(r A, clip(r, 1 - epsilon, 1 + epsilon_high) A) + beta * r * k3,   k3 = exp(d) - d - 1,

d = ref_logp - logp (Schulman's k3 estimator of KL(policy || reference)). TRL 1.16 multiplies the
KL by the ratio r by default (`use_bias_correction_kl=True`, after DeepSeek-V3.2; r equals 1 on
policy but its gradient does not vanish): `kl_bias_correction` here, on by default as there.

How the per-token losses become one number (S = the masked sum of the per-token losses):

  grpo     each completion's token mean, averaged over completions;
  bnpo     each micro-batch's token mean, averaged over micro-batches (TRL's "local batch": its
           value depends on the micro-batch size, as TRL documents);
  dr_grpo  S / (completions x max_completion_length), a constant per completion;
  dapo     S / (the trained tokens of the whole accumulated batch, at least 1).

TRL's dapo divides each micro-batch by `num_items_in_batch`, the masked tokens of the whole
generation batch over every process, rescaled by num_processes x accumulation steps /
steps_per_generation; with its default steps_per_generation = gradient_accumulation_steps the
summed gradients are those of the token mean over the accumulated global batch, which is what dapo
is here. On one batch (no accumulation) dapo and bnpo are the same number.

Gradient accumulation follows jaxft.objectives: `PolicyLoss.counts(mask)` gives the normaliser of
the whole accumulated batch (mask [A, N, T] with A micro-batches, or [N, T]) before any forward
pass; `sums` gives (terms, stats) of one micro-batch, sums that add up over micro-batches; `loss`
is linear in the terms. For grpo and dr_grpo this equals TRL's per-micro-batch loss divided by the
accumulation steps, since micro-batches hold the same number of completions; for bnpo the term is
the micro-batch's own token mean and the normaliser counts micro-batches. `grpo_loss` is the one
batch case, with the per-completion clip extremes TRL also logs (a min and a max, which do not
add up over micro-batches and so are not among `sums`' stats).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxft.errors import ConfigError

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
SCALES = ("group", "batch", "none")
STD_EPS = 1e-4  # added to the reward std before dividing, as TRL


def _std(x, axis=None):
  """The sample standard deviation (Bessel's correction, as TRL's nanstd); 0 for one value."""
  n = x.size if axis is None else x.shape[axis]
  if n < 2:
    return jnp.zeros_like(jnp.mean(x, axis=axis, keepdims=True))
  return jnp.std(x, axis=axis, ddof=1, keepdims=True)


def group_advantages(rewards, generations: int, scale: str | bool = "group"):
  """Group-relative advantages: each reward minus the mean of its prompt's group, divided by
  (std + 1e-4), as TRL 1.16 (`scale_rewards`; the std is the sample std).

  rewards: [N] with N = prompts x generations, a prompt's `generations` completions adjacent.
  scale: "group" (True; the std of the group), "batch" (the std of all N rewards) or "none"
  (False; no division, as Dr.GRPO recommends). Returns float32 [N]. Raises ConfigError on an
  unknown scale or an N that is not a multiple of `generations`."""
  scale = {True: "group", False: "none"}.get(scale, scale)
  if scale not in SCALES:
    raise ConfigError(f"scale={scale!r}: expected one of {', '.join(SCALES)}")
  rewards = jnp.asarray(rewards, jnp.float32)
  if generations < 1 or rewards.shape[0] % generations:
    raise ConfigError(f"{rewards.shape[0]} rewards do not make groups of {generations}")
  grouped = rewards.reshape(-1, generations)
  adv = grouped - jnp.mean(grouped, axis=1, keepdims=True)
  if scale == "group":
    adv = adv / (_std(grouped, axis=1) + STD_EPS)
  elif scale == "batch":
    adv = adv / (_std(rewards) + STD_EPS)
  return adv.reshape(-1)


def per_token_loss(logps, old_logps, advantages, ref_logps=None, epsilon: float = 0.2,
                   epsilon_high: float | None = None, beta: float = 0.0,
                   kl_bias_correction: bool = True):
  """The clipped surrogate per token (module docstring), before masking and normalisation.

  logps: [N, T] under the policy being trained (the only differentiated input); old_logps: [N, T]
  under the policy that sampled (None: stop_gradient(logps), one update per rollout);
  advantages: [N] or [N, T]; ref_logps: [N, T], read only when beta != 0 (beta is static).
  Returns (loss [N, T], ratio [N, T], kl [N, T] or None when beta == 0)."""
  old = jax.lax.stop_gradient(logps) if old_logps is None else old_logps
  eps_high = epsilon if epsilon_high is None else epsilon_high
  adv = advantages[..., None] if advantages.ndim == logps.ndim - 1 else advantages
  ratio = jnp.exp(logps - old)
  clipped = jnp.clip(ratio, 1.0 - epsilon, 1.0 + eps_high)
  loss = -jnp.minimum(ratio * adv, clipped * adv)
  kl = None
  if beta != 0.0:
    if ref_logps is None:
      raise ConfigError(f"beta={beta}: the KL term needs the reference's log-probs (ref_logps)")
    d = ref_logps - logps
    kl = jnp.exp(d) - d - 1.0
    if kl_bias_correction:
      kl = kl * ratio
    loss = loss + beta * kl
  return loss, ratio, kl


def _clipped(ratio, adv, epsilon, eps_high):
  """Where the clip removes the gradient, as TRL logs it: (low, high) boolean [N, T]."""
  adv = adv[..., None] if adv.ndim == ratio.ndim - 1 else adv
  return (ratio < 1.0 - epsilon) & (adv < 0), (ratio > 1.0 + eps_high) & (adv > 0)


@dataclasses.dataclass(frozen=True)
class PolicyLoss:
  """The GRPO-family loss as jaxft objectives split it: counts, sums, loss, metrics (module
  docstring). Frozen and hashable: a static part of a jitted step.

  max_completion_length: dr_grpo's constant (None: the mask's T, the padded completion length)."""
  loss_type: str = "dapo"
  epsilon: float = 0.2
  epsilon_high: float | None = None
  beta: float = 0.0
  max_completion_length: int | None = None
  kl_bias_correction: bool = True

  def __post_init__(self):
    if self.loss_type not in LOSS_TYPES:
      raise ConfigError(f"loss_type={self.loss_type!r}: expected one of {', '.join(LOSS_TYPES)}")

  @property
  def _eps_high(self):
    return self.epsilon if self.epsilon_high is None else self.epsilon_high

  def counts(self, mask):
    """Normalisers of the whole (accumulated) batch, from the mask alone: {"norm": the loss's
    divisor, "tokens": trained tokens}. mask: [A, N, T] (A micro-batches) or [N, T]."""
    mask = jnp.asarray(mask, jnp.float32)
    tokens = jnp.sum(mask)
    completions = mask.size // mask.shape[-1]
    length = self.max_completion_length or mask.shape[-1]
    norm = {"grpo": jnp.float32(completions),
            "bnpo": jnp.float32(mask.shape[0] if mask.ndim == 3 else 1),
            "dr_grpo": jnp.float32(completions * length),
            "dapo": jnp.maximum(tokens, 1.0)}[self.loss_type]
    return {"norm": norm, "tokens": tokens}

  def sums(self, logps, old_logps, advantages, mask, ref_logps=None):
    """(terms, stats) of one micro-batch [N, T]: terms["policy"], the numerator of the loss
    (for bnpo already the micro-batch's token mean); stats: masked sums over tokens of the KL
    (when beta != 0) and of the clipped indicators, to be divided by counts["tokens"]."""
    mask = jnp.asarray(mask, jnp.float32)
    loss, ratio, kl = per_token_loss(logps, old_logps, advantages, ref_logps, self.epsilon,
                                     self.epsilon_high, self.beta, self.kl_bias_correction)
    masked = loss * mask
    if self.loss_type == "grpo":
      policy = jnp.sum(jnp.sum(masked, -1) / jnp.maximum(jnp.sum(mask, -1), 1.0))
    elif self.loss_type == "bnpo":
      policy = jnp.sum(masked) / jnp.maximum(jnp.sum(mask), 1.0)
    else:
      policy = jnp.sum(masked)
    low, high = _clipped(ratio, advantages, self.epsilon, self._eps_high)
    stats = {"clip_ratio/low_mean": jnp.sum(low * mask),
             "clip_ratio/high_mean": jnp.sum(high * mask),
             "clip_ratio/region_mean": jnp.sum((low | high) * mask)}
    if kl is not None:
      stats["kl"] = jnp.sum(jax.lax.stop_gradient(kl) * mask)
    return {"policy": policy}, stats

  def loss(self, terms, counts):
    """The loss: linear in the terms, so micro-batch gradients add up to the batch's."""
    return terms["policy"] / counts["norm"]

  def metrics(self, terms, stats, counts):
    """Token means of the stats over the accumulated batch, as TRL's global masked means."""
    del terms
    tokens = jnp.maximum(counts["tokens"], 1.0)
    return {k: v / tokens for k, v in stats.items()}


def grpo_loss(logps, old_logps, advantages, mask, loss_type: str = "dapo", epsilon: float = 0.2,
              epsilon_high: float | None = None, beta: float = 0.0, ref_logps=None,
              max_completion_length: int | None = None, kl_bias_correction: bool = True):
  """The loss of one batch and what TRL logs of it.

  logps, old_logps (None: on policy), ref_logps: [N, T] log-probs; advantages: [N] or [N, T];
  mask: [N, T]. Returns (loss, stats) with stats "kl" (when beta != 0), "clip_ratio/low_mean",
  "clip_ratio/high_mean", "clip_ratio/region_mean" (token means), "clip_ratio/low_min" and
  "clip_ratio/high_max" (the smallest / largest per-completion mean over completions with
  tokens). Raises ConfigError on an unknown loss type, or beta != 0 without ref_logps."""
  fn = PolicyLoss(loss_type, epsilon, epsilon_high, beta, max_completion_length,
                  kl_bias_correction)
  counts = fn.counts(mask)
  terms, stats = fn.sums(logps, old_logps, advantages, mask, ref_logps)
  stats = fn.metrics(terms, stats, counts)
  stats.update(_clip_extremes(logps, old_logps, advantages, mask, epsilon, fn._eps_high))
  return fn.loss(terms, counts), stats


def _clip_extremes(logps, old_logps, advantages, mask, epsilon, eps_high):
  old = logps if old_logps is None else old_logps
  ratio = jax.lax.stop_gradient(jnp.exp(logps - old))
  low, high = _clipped(ratio, advantages, epsilon, eps_high)
  mask = jnp.asarray(mask, jnp.float32)
  n = jnp.sum(mask, -1)
  per_row = lambda x: jnp.where(n > 0, jnp.sum(x * mask, -1) / jnp.maximum(n, 1.0), jnp.nan)
  return {"clip_ratio/low_min": jnp.nanmin(per_row(low)),
          "clip_ratio/high_max": jnp.nanmax(per_row(high))}
