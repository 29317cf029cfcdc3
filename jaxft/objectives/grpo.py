"""GRPO: the policy trained on rewards of its own samples (TRL's GRPOTrainer, its loss types).

Each train step's batch is made in `train_batch` from the stream's prompts: data.batch_size is the
number of completions a step trains on (prompts x rl.generations, TRL's convention), so a step
samples rl.generations completions of data.batch_size / rl.generations prompts. Sampling runs
jaxft's KV-cache decoder (jaxft/decode.py) on the arrays the trainer holds (loop.frozen and the
train state's trainable leaves: no second copy of the weights), with the decoder's seed derived
from (train.seed, step). The rewards (jaxft/rl/scoring.py) score the completions, group-relative
advantages weight them, and the step minimises rl.loss.PolicyLoss over the completion tokens.

rl.iterations = k: the rollouts made before step s (s a multiple of k) are trained on for steps s+1
.. s+k, each an optimizer step; old log-probs are then the policy's at rollout time. With k = 1
they equal the current ones and are not computed (TRL's detached log-probs). A run resumed after a
step that is a multiple of k (every checkpoint.every and train.steps that are multiples of k) is
exact; resumed within a group, the group's rollouts are sampled again with the same seed from the
policy of the restored step (deterministic, but not the uninterrupted run's).

The KL term (rl.beta > 0) compares with the base: the frozen tree run with the method switched off,
as DPO's reference. Evaluation during training is off (no eval loss: a policy loss on fixed
rollouts measures nothing); data.eval's prompts are checked, and jaxft.evaluate scores a workdir.
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from jaxft import decode, inference, rl, sharding
from jaxft.errors import ConfigError
from jaxft.models import llama
from jaxft.objectives.base import TOKEN_FIELDS, Objective, PlanPhase, finite, token_logps
from jaxft.peft.base import Method, merge_trees
from jaxft.rl import prompts as prompt_data, rollout

_STEP_METRICS = ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean")


@dataclasses.dataclass(frozen=True)
class GRPO(Objective):
  """GRPO-family policy loss on rollout batches; `host` holds the host-side state (encoder,
  cached rollouts, timings), out of the hash that makes the objective a static jit argument."""
  name: str = "grpo"
  policy: rl.PolicyLoss = rl.PolicyLoss()
  generations: int = 8
  iterations: int = 1
  rewards: tuple = ()
  weights: tuple = ()
  scale: str = "group"
  sampling: decode.Sampling = decode.Sampling(temperature=1.0)
  max_completion_tokens: int = 64
  metric_names: tuple = _STEP_METRICS
  host: dict = dataclasses.field(default_factory=dict, compare=False, hash=False, repr=False)

  # -- the loss, inside the jitted step --------------------------------------------------------

  def counts(self, batch):
    return self.policy.counts(batch["weights"])

  def sums(self, cfg, method, trainable, frozen, batch, rng):
    mask = batch["weights"]
    keep = lambda x: jnp.where(mask > 0, x, 0.0)  # no overflow off the completion tokens
    ref = None
    if self.policy.beta:  # the reference first: its temporaries go before the policy's activations
      ref = keep(jax.lax.stop_gradient(token_logps(cfg, Method(), {}, frozen, batch, None)))
    logps = keep(token_logps(cfg, method, trainable, frozen, batch, rng))
    old = keep(batch["old_logps"]) if self.iterations > 1 else None
    return self.policy.sums(logps, old, batch["advantages"], mask, ref)

  def loss(self, terms, counts):
    return self.policy.loss(terms, counts)

  def metrics(self, terms, stats, counts):
    return self.policy.metrics(terms, stats, counts)

  # -- data and batches, on the host -----------------------------------------------------------

  def preview(self, config, encoder, vocab_size, split="train"):
    del vocab_size
    return prompt_data.Preview(config, encoder, split)

  def load_data(self, config, encoder, vocab_size):
    """The prompt rows of data.train (and data.eval's, checked only: module docstring)."""
    del vocab_size
    self.host["encoder"] = encoder
    load = lambda spec: prompt_data.load_prompts(spec, encoder, config.data.max_len,
                                                 self.max_completion_tokens)
    train = load(config.data.train)
    if config.data.eval:
      load(config.data.eval)
      logging.info("train.objective=grpo: data.eval's prompts are checked, not evaluated during "
                   "training (jaxft.evaluate scores the trained workdir)")
    return train, None

  def stream(self, config, train_ds):
    k, every = self.iterations, config.checkpoint.every
    if k > 1 and (config.train.steps % k or every % k):
      logging.warning("rl.iterations=%d: train.steps=%d and checkpoint.every=%d are not both "
                      "multiples of it, so a checkpoint may fall within a group of steps that "
                      "share rollouts; a run resumed there samples them again from the restored "
                      "policy (docs/grpo.md)", k, config.train.steps, every)
    return prompt_data.PromptStream(
        train_ds.examples, prompts=config.data.batch_size // self.generations,
        iterations=self.iterations, seed=config.train.seed, shuffle=config.data.shuffle)

  def eval_batches(self, examples, config):
    del examples, config
    return iter(())  # (never called: load_data returns no eval set)

  def batch_fields(self):
    extra = {"advantages": jnp.float32}
    if self.iterations > 1:
      extra["old_logps"] = jnp.float32
    return dict(TOKEN_FIELDS, **extra)

  # -- rollouts --------------------------------------------------------------------------------

  def plan_phases(self, config, cfg, method, frozen, trainable, mesh):
    """The rollouts before each step as `train_batch` runs them: decode.generate's two programs
    (the prefill of the prompts into a fresh KV cache, then the loop of single-token steps) on the
    step's own frozen and trainable trees, at data.batch_size completions, the longest prompt
    data.max_len - rl.max_completion_tokens allows (padded to 16 slots, as generate pads it) and
    a cache of prompt + completion slots. The inputs besides the params are replicated on the
    mesh: exact on one chip; on several, XLA may split the cache further than that."""
    B, N = config.data.batch_size, self.max_completion_tokens
    P = -(-(config.data.max_len - N) // 16) * 16
    S = P + N
    rep = sharding.replicated(mesh)
    put = lambda tree: jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep), tree)
    sds = jax.ShapeDtypeStruct
    params = merge_trees(frozen, trainable)
    tokens = put(sds((B, P), jnp.int32))
    cache = jax.eval_shape(functools.partial(llama.init_cache, cfg, B, S))
    state = put({"logits": sds((B, cfg.vocab_size), jnp.float32), "cache": cache,
                 "pos": sds((B,), jnp.int32), "index": sds((), jnp.int32),
                 "n": sds((), jnp.int32), "done": sds((B,), jnp.bool_),
                 "length": sds((B,), jnp.int32), "eos": sds((B,), jnp.bool_),
                 "out": sds((B, N), jnp.int32), "logprobs": sds((B, N), jnp.float32),
                 "keys": jax.eval_shape(lambda: jax.random.split(jax.random.key(0), B))})
    limit = put(sds((), jnp.int32))
    # (decode's own jitted programs, the ones generate runs, not a copy of them)
    programs = {
        "prefill": lambda: decode._prefill.lower(cfg, method, params, tokens, tokens, tokens, S),
        "decode": lambda: decode._decode.lower(
            cfg, method, self.sampling, (), params, state, limit,
            replicate=rep if mesh.size > 1 else None)}
    kv = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache))
    return [PlanPhase("rollout", programs, {"kv_cache": int(kv)},
                      f"the rollouts before each step: {B} completions x {S} cache slots (prompt "
                      f"{P} + completion {N}); decode.generate's prefill, then its decode loop")]

  def train_batch(self, loop, model, batch):
    """Rollouts of the batch's prompts with the policy as it is now (or, within an rl.iterations
    group, the group's cached ones), scored; their metrics are written as the step's row."""
    group = loop.step - batch["repeat"]  # steps done when the group's rollouts were made
    cached = self.host.get("rollouts")
    if cached is None or cached[0] != group:
      if batch["repeat"]:
        logging.warning("step %d is step %d of an rl.iterations group whose rollouts this run "
                        "did not make (resumed within it): sampled again from the policy now",
                        loop.step + 1, batch["repeat"] + 1)
      cached = (group, *self._rollouts(loop, model, batch["rows"], group))
      self.host["rollouts"] = cached
    _, train, row = cached
    step, config = loop.step + 1, loop.config
    if step % config.train.log_every == 0 or step == config.train.steps:
      loop.writer.write(step, row)
      loop.last.update(row)
      logging.info("step %d: reward %.4f (std %.4f), completions %.1f tokens, generation %.0f "
                   "tokens/s", step, row["reward"], row["reward_std"],
                   row["completions/mean_length"], row["gen_tokens_per_sec"])
    return train

  def _rollouts(self, loop, model, rows, group):
    """(train batch, metrics row) of fresh rollouts of `rows` after `group` steps."""
    G, enc = self.generations, self.host["encoder"]
    t_ready = _ready(loop.state["trainable"])  # the previous step has finished
    params = merge_trees(loop.frozen, loop.state["trainable"])
    prompt_ids = [r.ids for r in rows for _ in range(G)]
    eos = inference.eos_ids(model.cfg, enc)
    gens = decode.generate(
        model.cfg, model.method, params, prompt_ids, max_new_tokens=self.max_completion_tokens,
        sampling=self.sampling, seed=rollout.sampling_seed(loop.config.train.seed, group),
        eos_ids=eos, batch_size=len(prompt_ids))
    comps = [rollout.completion_ids(g) for g in gens]
    t_gen = time.time()
    texts = [enc.tok.decode(list(map(int, g.tokens)), skip_special_tokens=True) for g in gens]
    src = [r for r in rows for _ in range(G)]
    total, per = rl.score(self.rewards, self.weights, [r.messages for r in src], texts,
                          [r.fields for r in src],
                          completion_ids=[[int(t) for t in g.tokens] for g in gens])
    adv = np.asarray(rl.group_advantages(total, G, self.scale))
    train = rollout.build_rows(prompt_ids, comps, adv, loop.config.data.max_len, TOKEN_FIELDS)
    if self.iterations > 1:
      train["old_logps"] = self._logps(loop, model, train)
    row = dict(rl.reward_metrics(total, per),
               **rollout.rollout_metrics(comps, [g.finish for g in gens], adv, total, G))
    row["gen_tokens_per_sec"] = sum(len(c) for c in comps) / max(t_gen - t_ready, 1e-9)
    prev = self.host.get("last_train")  # (tokens, time the rollouts were ready) of the last step
    if prev is not None:  # the last step ran from then until the policy was ready now
      row["train_tokens_per_sec"] = prev[0] / max(t_ready - prev[1], 1e-9)
    self.host["last_train"] = (int(np.sum(train["segment_ids"] > 0)), time.time())
    return train, row

  def _logps(self, loop, model, train):
    """The policy's per-token log-probs of `train` now (old log-probs of an iterations group)."""
    if "logps_fn" not in self.host:
      self.host["logps_fn"] = jax.jit(
          lambda tr, fz, b: token_logps(model.cfg, model.method, tr, fz, b, None),
          out_shardings=sharding.replicated(model.mesh))
    fields = {k: train[k] for k in TOKEN_FIELDS}
    b = {k: v[0] for k, v in sharding.put_batch(fields, model.mesh, 1).items()}
    out = np.asarray(self.host["logps_fn"](loop.state["trainable"], loop.frozen, b))
    return (out * train["weights"]).astype(np.float32)


def _ready(tree) -> float:
  jax.block_until_ready(tree)
  return time.time()


def _check(config) -> None:
  """ConfigError naming the first rl.* (or related) key GRPO cannot run with."""
  r, d = config.rl, config.data
  for key, ok, want in (
      ("generations", isinstance(r.generations, int) and r.generations >= 2,
       "must be an integer >= 2 (advantages compare completions of one prompt)"),
      ("iterations", isinstance(r.iterations, int) and r.iterations >= 1, "must be >= 1"),
      ("epsilon", finite(r.epsilon) and 0 < r.epsilon < 1, "must be in (0, 1)"),
      ("epsilon_high", finite(r.epsilon_high) and r.epsilon_high >= 0,
       "must be a finite number >= 0 (0 = rl.epsilon)"),
      ("beta", finite(r.beta) and r.beta >= 0, "must be a finite number >= 0"),
      ("temperature", finite(r.temperature) and r.temperature > 0,
       "must be a finite number > 0 (rollouts are sampled)"),
      ("top_p", finite(r.top_p) and 0 < r.top_p <= 1, "must be in (0, 1] (1 = off)"),
      ("top_k", isinstance(r.top_k, int) and r.top_k >= 0, "must be an integer >= 0 (0 = off)"),
      ("max_completion_tokens", isinstance(r.max_completion_tokens, int)
       and 1 <= r.max_completion_tokens < d.max_len,
       f"must be an integer in [1, data.max_len={d.max_len})")):
    if not ok:
      raise ConfigError(f"rl.{key}={r[key]!r}: {want}")
  if r.loss_type not in rl.LOSS_TYPES:
    raise ConfigError(f"rl.loss_type={r.loss_type!r}: expected one of {', '.join(rl.LOSS_TYPES)}")
  if r.scale_rewards not in rl.loss.SCALES:
    raise ConfigError(f"rl.scale_rewards={r.scale_rewards!r}: expected one of "
                      f"{', '.join(rl.loss.SCALES)}")
  if d.batch_size % r.generations:
    raise ConfigError(f"data.batch_size={d.batch_size}: must be a multiple of rl.generations="
                      f"{r.generations} (it counts the completions of a step: prompts x "
                      "generations)")
  t = config.train
  for key, value in (("base_kl", t.base_kl), ("precompute_reference", t.precompute_reference),
                     ("eval_accuracy", t.eval_accuracy)):
    if value:
      raise ConfigError(f"train.{key}={value}: not used by train.objective=grpo")


def from_config(config, trains_base: bool) -> GRPO:
  """GRPO with its rl.* settings. Raises ConfigError naming the key on a bad value, an unknown
  loss type or reward name, or rl.beta > 0 with full fine-tuning (no frozen base to compare)."""
  _check(config)
  if jax.process_count() > 1:
    raise ConfigError("train.objective=grpo runs its rollouts on one process; this run has "
                      f"{jax.process_count()}")
  r = config.rl
  if r.beta and trains_base:
    raise ConfigError(f"rl.beta={r.beta} with peft.method=full: the KL term compares with the "
                      "base, and full fine-tuning keeps no frozen copy of it")
  rewards = rl.resolve(r.rewards, tuple(config.eval.abstain_patterns))
  weights = rl.parse_weights(r.reward_weights, len(rewards))
  policy = rl.PolicyLoss(r.loss_type, float(r.epsilon), float(r.epsilon_high or r.epsilon),
                         float(r.beta), int(r.max_completion_tokens))
  return GRPO(policy=policy, generations=r.generations, iterations=r.iterations, rewards=rewards,
              weights=weights, scale=r.scale_rewards,
              sampling=decode.Sampling(float(r.temperature), int(r.top_k), float(r.top_p)),
              max_completion_tokens=int(r.max_completion_tokens))
