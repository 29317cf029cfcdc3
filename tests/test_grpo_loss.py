"""GRPO's loss against TRL 1.16's own code: `GRPOTrainer._compute_loss` run on a stub trainer whose
policy forward returns the chosen log-probs (loss, gradient with respect to those log-probs and the
logged KL and clip ratios), for each loss type, without and with the KL term; and the advantages
against the advantage block of `GRPOTrainer._generate_and_score_completions`, cut from TRL's
source and run on the same rewards."""

import collections
import inspect
import textwrap
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxft.errors import ConfigError
from jaxft.rl import loss as rl_loss

N, T = 6, 7  # 3 prompts x 2 generations, 7 completion positions
LENGTHS = [7, 3, 5, 1, 0, 6]  # ragged, right-padded as TRL pads; one completion with no tokens


def rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def inputs(seed=0):
  """Log-probs spread so that ratios fall below 1 - epsilon and above 1 + epsilon_high, with
  advantages of both signs."""
  rng = np.random.default_rng(seed)
  old = -rng.uniform(0.05, 3.0, (N, T)).astype(np.float32)
  logps = (old + rng.normal(0.0, 0.3, (N, T))).astype(np.float32)
  ref = (old + rng.normal(0.0, 0.2, (N, T))).astype(np.float32)
  adv = rng.normal(0.0, 1.0, N).astype(np.float32)
  mask = (np.arange(T)[None, :] < np.array(LENGTHS)[:, None]).astype(np.int64)
  return logps, old, ref, adv, mask


def trl_loss(loss_type, logps, old, ref, adv, mask, beta, eps, eps_high, max_len, bias_kl=True,
             accum=1, num_items=None):
  """TRL's loss, d loss / d logps and logged metrics of one micro-batch on one process: by
  default the whole batch; with `accum` micro-batches per step (TRL's default
  steps_per_generation = accumulation steps) and num_items, the trained tokens of them all."""
  from trl.trainer.grpo_trainer import GRPOTrainer
  lp = torch.tensor(logps, requires_grad=True)
  ident = lambda x, **_: x
  stub = types.SimpleNamespace(
      _get_per_token_logps_and_entropies=lambda *a, **k: (lp, torch.zeros_like(lp), None),
      aux_loss_enabled=False, top_entropy_quantile=1.0, off_policy_mask_threshold=None,
      importance_sampling_level="token", beta=beta, loss_type=loss_type, epsilon_low=eps,
      epsilon_high=eps_high, use_vllm=False, model=types.SimpleNamespace(training=True),
      current_gradient_accumulation_steps=accum, max_completion_length=max_len,
      _entropy_bonus_enabled=False, _metrics={"train": collections.defaultdict(list)},
      accelerator=types.SimpleNamespace(num_processes=1, gather=ident, reduce=ident),
      args=types.SimpleNamespace(use_bias_correction_kl=bias_kl, delta=None,
                                 steps_per_generation=accum))
  m = torch.tensor(mask)
  n = len(mask)
  batch = {"prompt_ids": torch.zeros((n, 2), dtype=torch.long),
           "prompt_mask": torch.ones((n, 2), dtype=torch.long),
           "completion_ids": torch.zeros((n, T), dtype=torch.long), "completion_mask": m,
           "advantages": torch.tensor(adv), "ref_per_token_logps": torch.tensor(ref),
           "num_items_in_batch": m.sum() if num_items is None else torch.tensor(num_items)}
  if old is not None:
    batch["old_per_token_logps"] = torch.tensor(old)
  loss = GRPOTrainer._compute_loss(stub, None, batch)
  loss.backward()
  metrics = {k: v[-1] for k, v in stub._metrics["train"].items()}
  return float(loss.detach()), lp.grad.numpy(), metrics


# (beta, TRL's use_bias_correction_kl): no KL; TRL 1.16's default KL (times the ratio); plain k3
KL_CASES = [(0.0, True), (0.04, True), (0.04, False)]


@pytest.mark.parametrize("beta,bias_kl", KL_CASES, ids=["beta0", "kl", "kl_plain"])
@pytest.mark.parametrize("loss_type", rl_loss.LOSS_TYPES)
def test_loss_and_gradient_equal_trl(loss_type, beta, bias_kl):
  logps, old, ref, adv, mask = inputs()
  eps, eps_high, max_len = 0.2, 0.28, T + 3  # dr_grpo's constant above the padded length
  want, want_grad, want_m = trl_loss(loss_type, logps, old, ref, adv, mask, beta, eps, eps_high,
                                     max_len, bias_kl)

  def f(lp):
    return rl_loss.grpo_loss(lp, jnp.asarray(old), jnp.asarray(adv), jnp.asarray(mask), loss_type,
                             eps, eps_high, beta, jnp.asarray(ref), max_len, bias_kl)

  (got, stats), grad = jax.value_and_grad(f, has_aux=True)(jnp.asarray(logps))
  assert rel(got, want) < 1e-5, (float(got), want)
  assert rel(grad, want_grad) < 1e-5
  assert np.all(np.asarray(grad)[mask == 0] == 0)  # padding gets no gradient
  names = ["clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean",
           "clip_ratio/low_min", "clip_ratio/high_max"] + (["kl"] if beta else [])
  assert set(stats) == set(names)
  for k in names:
    assert abs(float(stats[k]) - want_m[k]) <= 1e-5 * max(abs(want_m[k]), 1e-3), k
  # the case is not degenerate: both clips happen and some completion is never clipped
  assert want_m["clip_ratio/low_mean"] > 0 and want_m["clip_ratio/high_mean"] > 0
  assert want_m["clip_ratio/low_min"] == 0


@pytest.mark.parametrize("loss_type", rl_loss.LOSS_TYPES)
def test_on_policy_without_old_logps_equals_trl(loss_type):
  """One update per rollout: no old log-probs, the ratio is exp(logp - stop_gradient(logp))."""
  logps, _, ref, adv, mask = inputs(seed=1)
  want, want_grad, _ = trl_loss(loss_type, logps, None, ref, adv, mask, 0.04, 0.2, 0.2, T)
  f = lambda lp: rl_loss.grpo_loss(lp, None, jnp.asarray(adv), jnp.asarray(mask), loss_type,
                                   beta=0.04, ref_logps=jnp.asarray(ref))[0]
  got, grad = jax.value_and_grad(f)(jnp.asarray(logps))
  assert rel(got, want) < 1e-5 and rel(grad, want_grad) < 1e-5


@pytest.mark.parametrize("loss_type", rl_loss.LOSS_TYPES)
def test_accumulated_micro_batches_equal_trl(loss_type):
  """Two micro-batches: counts over [2, N/2, T], sums per micro-batch; each micro-batch's loss and
  gradient equal TRL's with gradient_accumulation_steps=2 (dapo's num_items_in_batch: the tokens
  of both micro-batches)."""
  logps, old, ref, adv, mask = inputs(seed=2)
  fn = rl_loss.PolicyLoss(loss_type, 0.2, 0.28, 0.04, max_completion_length=T)
  parts = lambda x: np.asarray(x).reshape(2, N // 2, *np.shape(x)[1:])
  counts = fn.counts(jnp.asarray(parts(mask)))
  assert float(counts["tokens"]) == mask.sum()
  for i in range(2):
    xs = [parts(x)[i] for x in (logps, old, ref, adv, mask)]
    want, want_grad, _ = trl_loss(loss_type, *xs, 0.04, 0.2, 0.28, T, accum=2,
                                  num_items=mask.sum())
    micro = lambda lp: fn.loss(fn.sums(lp, xs[1], xs[3], xs[4], xs[2])[0], counts)
    got, grad = jax.value_and_grad(micro)(jnp.asarray(xs[0]))
    assert rel(got, want) < 1e-5 and rel(grad, want_grad) < 1e-5, i


def trl_advantages(rewards, generations, scale):
  """The advantage block of TRL's _generate_and_score_completions (sum_then_normalize, the
  default), cut from its source and run on `rewards` as the only reward function's output."""
  from trl.trainer import grpo_trainer
  src = inspect.getsource(grpo_trainer.GRPOTrainer._generate_and_score_completions)
  first = 'if self.multi_objective_aggregation == "sum_then_normalize":'
  last = "advantages = torch.nan_to_num(advantages, nan=0.0)"
  assert first in src and last in src, "TRL's advantage block moved: update this test"
  block = src[src.index(first):src.index(last) + len(last)]
  block = textwrap.dedent(" " * 8 + block)  # the first line lost its indent to the cut
  stub = types.SimpleNamespace(multi_objective_aggregation="sum_then_normalize",
                               scale_rewards=scale, reward_weights=torch.ones(1),
                               reward_funcs=[None])
  scope = {"self": stub, "torch": torch, "nanstd": grpo_trainer.nanstd, "device": "cpu",
           "num_generations": generations,
           "rewards_per_func": torch.tensor(rewards, dtype=torch.float32)[:, None],
           "unscorable_mask": torch.zeros(len(rewards), dtype=torch.bool)}
  exec(block, scope)
  return scope["advantages"].numpy()


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_advantages_equal_trl(scale):
  rewards = np.array([1.0, 0.0, 0.5, -1.0, 0.5, 0.5, 0.5, 0.5, 1.0, 3.0, 0.25, 0.0], np.float32)
  got = rl_loss.group_advantages(jnp.asarray(rewards), 4, scale)
  want = trl_advantages(rewards, 4, scale)
  assert rel(got, want) < 1e-5
  # the second group's rewards are equal: no advantage whatever the scaling (not 0 / 0)
  assert np.all(np.asarray(got)[4:8] == 0) and np.all(np.asarray(got)[:4] != 0)


def test_advantages_of_a_group_with_equal_rewards_are_zero():
  got = np.asarray(rl_loss.group_advantages(jnp.array([1.0, 1.0, 1.0, 0.0, 1.0, 2.0]), 3))
  assert np.all(got[:3] == 0)
  # Dr.GRPO's unscaled advantages are the reward minus the group mean
  np.testing.assert_allclose(rl_loss.group_advantages(jnp.array([0.0, 1.0, 2.0, 5.0]), 2, False),
                             [-0.5, 0.5, -1.5, 1.5])
  # group std is the sample std (n - 1), as TRL's nanstd: group [0, 2] has std sqrt(2)
  np.testing.assert_allclose(rl_loss.group_advantages(jnp.array([0.0, 2.0]), 2),
                             np.array([-1.0, 1.0]) / (np.sqrt(2.0) + 1e-4), rtol=1e-6)


def test_bad_settings_name_the_setting():
  with pytest.raises(ConfigError, match="loss_type='ppo': expected one of grpo, bnpo"):
    rl_loss.PolicyLoss("ppo")
  with pytest.raises(ConfigError, match="scale='std'"):
    rl_loss.group_advantages(jnp.zeros(4), 2, "std")
  with pytest.raises(ConfigError, match="5 rewards do not make groups of 2"):
    rl_loss.group_advantages(jnp.zeros(5), 2)
  with pytest.raises(ConfigError, match="needs the reference's log-probs"):
    rl_loss.grpo_loss(jnp.zeros((1, 2)), None, jnp.ones(1), jnp.ones((1, 2)), beta=0.1)
