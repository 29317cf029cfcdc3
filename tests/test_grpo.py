"""train.objective=grpo end to end on the tiny model: rollouts through the KV-cache decoder,
rewards, the policy loss, its metrics rows, an exact resume, and bad inputs that stop before any
checkpoint. One module-scoped pair of runs (a straight one and one stopped and resumed) is shared
by the assertions; tiny shapes (2 prompts x 4 generations of at most 8 tokens)."""

import json
import math
import os
import signal

import jax
import numpy as np
import pytest

from conftest import make_config, metric_rows, start_and_signal, tiny_config
from jaxft import checkpoint, decode, peft, rl, trainer
from jaxft.data import bundled
from jaxft.data.pipeline import Position
from jaxft.errors import ConfigError, DataError
from jaxft.models import llama
from jaxft.models.config import preset
from jaxft.objectives.base import TOKEN_FIELDS
from jaxft.rl import prompts as prompt_data, rollout

PROMPTS = bundled.path("capital_prompts_train.jsonl")
REWARDS = "match:contains,length:4"
STEPS = 6
GRPO = {"train.objective": "grpo", "data.train": PROMPTS, "data.eval": "", "data.max_len": 48,
        "data.batch_size": 8, "rl.generations": 4, "rl.max_completion_tokens": 8,
        "rl.rewards": REWARDS, "optim.warmup_steps": 0, "optim.schedule": "constant",
        "train.steps": STEPS}  # (constant: a 2-step run's schedule is a longer run's beginning)
# What the rollouts and the step log that must not change when a run is interrupted (all but
# the tokens/s figures).
EXACT_KEYS = ("loss", "grad_norm", "clip_ratio/region_mean", "reward", "reward_std",
              *(f"rewards/{name}/mean" for name in REWARDS.split(",")),
              "completions/mean_length", "completions/max_length", "advantages/std",
              "advantages/max")


def grpo_config(**over):
  return tiny_config(**dict(GRPO, **over))


def grpo_args(**over):
  """grpo_config's settings as `python -m jaxft.train` flags."""
  keys = {"model.preset": "tiny", "train.progress": False, "train.log_every": 1, **GRPO, **over}
  return ["--config=configs/quickstart.py", *(f"--config.{k}={v}" for k, v in keys.items())]


def rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def by_step(workdir, key):
  return {r["step"]: r[key] for r in rows(workdir) if key in r}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """A straight STEPS-step run, and one stopped at step 2 and resumed to step STEPS."""
  root = tmp_path_factory.mktemp("grpo")
  straight, resumed = str(root / "straight"), str(root / "resumed")
  out = trainer.train(grpo_config(), straight)
  trainer.train(grpo_config(**{"train.steps": 2}), resumed)
  trainer.train(grpo_config(), resumed)
  return out, straight, resumed


def test_it_trains_and_logs_rewards_and_rollouts(runs):
  out, straight, _ = runs
  assert out["step"] == STEPS and math.isfinite(out["loss"])
  losses = by_step(straight, "loss")
  steps = list(range(1, STEPS + 1))
  assert sorted(losses) == steps and all(math.isfinite(v) for v in losses.values())
  rollout_rows = [r for r in rows(straight) if "reward" in r]
  assert [r["step"] for r in rollout_rows] == steps
  for r in rollout_rows:
    for name in REWARDS.split(","):
      assert f"rewards/{name}/mean" in r and f"rewards/{name}/std" in r
    assert r["reward_std"] >= 0 and 1 <= r["completions/mean_length"] <= 8 + 1
    assert r["completions/max_length"] <= 9 and r["gen_tokens_per_sec"] > 0
    assert r["advantages/min"] <= 0 <= r["advantages/max"]
  assert all("train_tokens_per_sec" in r for r in rollout_rows[1:])
  train_rows = [r for r in rows(straight) if "loss" in r]
  assert all("clip_ratio/region_mean" in r for r in train_rows)
  assert os.listdir(os.path.join(straight, "tensorboard"))


def test_a_resumed_run_samples_and_trains_as_a_straight_one(runs):
  _, straight, resumed = runs
  for key in EXACT_KEYS:
    assert by_step(resumed, key) == by_step(straight, key), key


def _trained(workdir):
  from jaxft import session
  t = session.restore_trained(workdir)
  return t.step, jax.tree.map(np.asarray, t.trainable)


@pytest.mark.slow
def test_kill_9_mid_run_then_resume_matches_a_straight_run(runs, tmp_path):
  """`python -m jaxft.train` killed with SIGKILL (no chance to save) after a step drawn at
  random, then run again: the same rollouts (rewards, lengths, advantages), losses, gradients
  and final weights as the straight run, bit for bit. The steps after the last checkpoint (the
  one in flight, whose rollouts may be logged) are sampled and trained again."""
  _, straight, _ = runs
  wd = str(tmp_path / "killed")
  args = grpo_args(**{"checkpoint.every": 1})  # (a save finishes before the next one starts)
  at = int(np.random.default_rng().integers(2, 4))  # the rest of the run takes ~1 s
  code, _, err = start_and_signal(args, wd, at, signal.SIGKILL)
  assert code == -signal.SIGKILL, (at, code, err[-2000:])
  saved, _ = checkpoint.read_meta(wd)
  assert 1 <= saved < STEPS and max(metric_rows(wd)) < STEPS, "the run ended before the kill"
  # The same run again, in this process (its programs are compiled already), from the checkpoint
  # the killed command left
  trainer.train(grpo_config(**{"checkpoint.every": 1}), wd)
  for key in EXACT_KEYS:
    assert by_step(wd, key) == by_step(straight, key), (at, key)
  (s1, x), (s2, y) = _trained(straight), _trained(wd)
  assert s1 == s2 == STEPS
  jax.tree.map(np.testing.assert_array_equal, x, y)


def test_the_quickstart_variant_is_grpo_on_the_bundled_prompts():
  c = make_config("quickstart", "objective=grpo")
  assert c.train.objective == "grpo" and c.data.train.endswith("capital_prompts_train.jsonl")
  assert c.data.batch_size % c.rl.generations == 0
  objective = trainer.objectives.from_config(c, False)
  assert [r.name for r in objective.rewards] == ["match:contains", "length:4"]


@pytest.mark.parametrize("key,value,message", [
    ("rl.rewards", "match,nosuch", "unknown reward 'nosuch'"),
    ("rl.loss_type", "ppo", "rl.loss_type='ppo'"),
    ("rl.generations", 3, "data.batch_size=8: must be a multiple of rl.generations=3"),
    ("rl.temperature", 0.0, "rl.temperature=0.0"),
    ("rl.max_completion_tokens", 48, "rl.max_completion_tokens=48"),
    ("rl.reward_weights", "1", "1 weights for 2 rewards")])
def test_bad_settings_name_the_key_before_the_workdir_is_made(tmp_path, key, value, message):
  wd = tmp_path / "wd"
  with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
    trainer.train(grpo_config(**{key: value}), str(wd))
  assert not wd.exists()


def _no_checkpoints(wd):
  return not os.path.isdir(os.path.join(wd, "checkpoints")) or not os.listdir(
      os.path.join(wd, "checkpoints"))


def test_a_prompt_row_without_a_user_message_names_its_line(tmp_path):
  data = tmp_path / "prompts.jsonl"
  data.write_text(json.dumps({"prompt": "Capital of Peru?", "answer": "Lima"}) + "\n" +
                  json.dumps({"messages": [{"role": "system", "content": "Be brief."}],
                              "answer": "Lima"}) + "\n")
  wd = str(tmp_path / "wd")
  with pytest.raises(DataError, match=f"{data}:2: 'messages' has no user message"):
    trainer.train(grpo_config(**{"data.train": str(data)}), wd)
  assert _no_checkpoints(wd)


def test_a_reward_that_raises_is_named_and_nothing_is_saved(tmp_path, monkeypatch):
  (tmp_path / "my_rewards.py").write_text(
      "def broken(prompts, completions, **fields):\n  raise KeyError('score')\n")
  monkeypatch.chdir(tmp_path)
  wd = str(tmp_path / "wd")
  with pytest.raises(ConfigError, match="rl.rewards: my_rewards:broken raised KeyError"):
    trainer.train(grpo_config(**{"rl.rewards": "match,my_rewards:broken"}), wd)
  assert _no_checkpoints(wd)


def test_a_reward_returning_nan_is_named():
  nan = rl.Reward("mine:nan", lambda prompts, completions, **f: [float("nan")] * len(completions))
  with pytest.raises(ConfigError, match="mine:nan returned nan for completion 0"):
    rl.score((nan,), "", ["q"], ["a"], [{}])


def test_the_prompt_stream_serves_each_group_iterations_times_and_resumes_there():
  ex = list(range(5))
  s = prompt_data.PromptStream(ex, prompts=2, iterations=3, seed=0)
  pos, seen, at = Position(), [], []
  for _ in range(7):
    at.append(pos)
    b, pos = s.batch_at(pos)
    seen.append((tuple(b["rows"]), b["repeat"]))
  assert [r for _, r in seen] == [0, 1, 2, 0, 1, 2, 0]
  assert seen[0][0] == seen[1][0] == seen[2][0] != seen[3][0] == seen[5][0]
  # a fresh stream from a saved position (mid-group too) serves what the first one would have
  s2 = prompt_data.PromptStream(ex, prompts=2, iterations=3, seed=0)
  assert [(tuple(b["rows"]), b["repeat"]) for b, _ in map(s2.batch_at, at)] == seen
  one = prompt_data.PromptStream(ex, prompts=2, iterations=1, seed=0)
  assert one.batch_at(Position(0, 2))[1] == Position(0, 4)  # pipeline's units with iterations 1


def test_iterations_reuse_the_rollouts_and_beta_logs_the_kl_to_the_base(tmp_path):
  """rl.iterations=2: step 2 trains on step 1's rollouts with old log-probs from rollout time;
  after step 1's (large) update their ratios are clipped only the way the advantages pushed them
  (above 1 + epsilon where A > 0, below 1 - epsilon where A < 0: TRL's clip_ratio/high_mean and
  low_mean; a sign error would move them the other way, which neither counts). rl.beta > 0: the
  KL to the base (zero before the first update of LoRA's zero-initialised B, positive after)."""
  wd = str(tmp_path / "wd")
  trainer.train(grpo_config(**{"rl.iterations": 2, "rl.beta": 0.04, "train.steps": 2,
                               "optim.lr": 5e-2}), wd)
  rollout_rows = [{k: v for k, v in r.items() if k != "step"} for r in rows(wd) if "reward" in r]
  assert len(rollout_rows) == 2 and rollout_rows[0] == rollout_rows[1]
  assert by_step(wd, "clip_ratio/region_mean")[1] == 0  # on policy: ratio 1
  assert by_step(wd, "clip_ratio/region_mean")[2] > 0.1
  kl = by_step(wd, "kl")
  assert kl[1] == 0 and 0 < kl[2] and all(map(math.isfinite, by_step(wd, "loss").values()))


def test_a_completion_keeps_the_end_token_it_sampled_and_only_its_tokens_are_trained():
  """The trained row is prompt + completion + the end token the decoder chose (of several), and
  the loss mask covers exactly the completion's tokens."""
  cfg = preset("tiny").replace(vocab_size=256)
  params = llama.init_params(cfg, jax.random.key(0))
  prompts = [np.array([5, 6, 7], np.int32), np.array([8, 9, 10, 11, 12], np.int32)]
  free = decode.generate(cfg, peft.Method(), params, prompts, max_new_tokens=4)
  eos = (int(free[0].tokens[1]), int(free[1].tokens[2]))  # two end tokens, as Llama 3 has
  got = decode.generate(cfg, peft.Method(), params, prompts, max_new_tokens=4, eos_ids=eos)
  comps = [rollout.completion_ids(g) for g in got]
  for f, g, c in zip(free, got, comps):
    j = next(i for i, t in enumerate(f.tokens.tolist()) if t in eos)
    assert g.finish == "eos" and g.end_token == f.tokens[j]
    assert c.tolist() == f.tokens[:j + 1].tolist()
  b = rollout.build_rows(prompts, comps, np.array([0.5, -0.5]), 12, TOKEN_FIELDS)
  for r, (p, c) in enumerate(zip(prompts, comps)):
    assert b["targets"][r][b["weights"][r] > 0].tolist() == c.tolist()  # completion tokens alone
    assert b["inputs"][r, :len(p)].tolist() == p.tolist()
    assert b["segment_ids"][r].sum() == len(p) + len(c) - 1
  assert b["advantages"][:, 0].tolist() == [0.5, -0.5] and b["advantages"].shape == (2, 12)
