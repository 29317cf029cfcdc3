"""Exact resume after preemption, damaged checkpoints, non-finite steps, checkpoint size, and bad
input that must leave an existing workdir intact."""

import os
import signal
import time

import jax
import numpy as np
import pytest

from conftest import metric_rows, run_cli, start_and_signal, tiny_config

QUICK = ["--config=configs/quickstart.py", "--config.train.progress=False", "--config.train.log_every=1"]
TINY = QUICK + ["--config.model.preset=tiny", "--config.data.batch_size=4", "--config.data.max_len=64"]


def losses(workdir):
  return metric_rows(workdir, "loss")


def trained_leaves(workdir):
  from jaxft import session
  t = session.restore_trained(workdir)
  return t.step, jax.tree.map(np.asarray, t.trainable)


def tree_bytes(path):
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


RESUME_ARGS = TINY + ["--config.train.steps=30", "--config.checkpoint.every=5"]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  """30 steps, uninterrupted: what every interrupted run must reproduce exactly."""
  wd = str(tmp_path_factory.mktemp("straight") / "run")
  r = run_cli("jaxft.train", *RESUME_ARGS, f"--workdir={wd}")
  assert r.returncode == 0, r.stderr[-3000:]
  return wd


def _start_and_signal(workdir, at_step, sig):
  """Starts the 30-step run on workdir and sends `sig` once it has logged step >= at_step."""
  return start_and_signal(RESUME_ARGS, workdir, at_step, sig)


def assert_same_run(a, b):
  assert losses(a) == losses(b)  # exactly equal, every step
  (s1, x), (s2, y) = trained_leaves(a), trained_leaves(b)
  assert s1 == s2 == 30
  jax.tree.map(np.testing.assert_array_equal, x, y)


@pytest.mark.slow
def test_sigterm_then_resume_matches_a_straight_run(tmp_path, straight):
  """Stop with SIGTERM mid-run, re-run the same command to step 30."""
  split = str(tmp_path / "split")
  code, out, err = _start_and_signal(split, 8, signal.SIGTERM)
  assert code == 0, err[-3000:]
  stopped = max(losses(split))
  assert stopped < 30, "the run finished before the signal arrived"
  assert f"stopped by SIGTERM at step {stopped}" in out
  assert "Run the same command to resume" in out
  r = run_cli("jaxft.train", *RESUME_ARGS, f"--workdir={split}")
  assert r.returncode == 0, r.stderr[-3000:]
  assert_same_run(straight, split)


@pytest.mark.slow
def test_kill_9_at_random_points_then_resume_matches_a_straight_run(tmp_path, straight):
  """kill -9 (no chance to save) at points drawn at random, each time re-running the command;
  rows logged after the last checkpoint are dropped and those steps recomputed identically."""
  wd = str(tmp_path / "killed")
  points = sorted(np.random.default_rng(int(time.time())).choice(np.arange(3, 28), 2,
                                                                 replace=False))
  for at in points:
    code, _, err = _start_and_signal(wd, int(at), signal.SIGKILL)
    assert code == -signal.SIGKILL, (at, code, err[-2000:])
  r = run_cli("jaxft.train", *RESUME_ARGS, f"--workdir={wd}")
  assert r.returncode == 0, (points, r.stderr[-3000:])
  assert_same_run(straight, wd)


@pytest.mark.slow
def test_damaged_newest_checkpoint_falls_back_with_a_warning(tmp_path):
  wd = str(tmp_path / "wd")
  args = TINY + ["--config.checkpoint.every=2", "--config.checkpoint.keep=5"]
  r = run_cli("jaxft.train", *args, f"--workdir={wd}", "--config.train.steps=6")
  assert r.returncode == 0, r.stderr[-3000:]
  ckpts = os.path.join(wd, "checkpoints")
  assert sorted(os.listdir(ckpts), key=int) == ["2", "4", "6"]
  # Damage step 6's array files; and leave an interrupted async save (a tmp dir) for step 7.
  for d, _, files in os.walk(os.path.join(ckpts, "6", "state")):
    for f in files:
      with open(os.path.join(d, f), "r+b") as fh:
        fh.truncate(3)
  os.makedirs(os.path.join(ckpts, "7.orbax-checkpoint-tmp", "state"))
  r = run_cli("jaxft.train", *args, f"--workdir={wd}", "--config.train.steps=8")
  assert r.returncode == 0, r.stderr[-3000:]
  assert "checkpoint step 6: damaged files state/" in r.stderr and "expected" in r.stderr
  assert "resuming from step 4" in r.stderr
  assert sorted(losses(wd)) == list(range(1, 9))
  step, leaves = trained_leaves(wd)
  assert step == 8 and all(np.isfinite(x).all() for x in jax.tree.leaves(leaves))


@pytest.mark.slow
def test_peft_checkpoint_holds_trainable_and_optimizer_state_only(tmp_path):
  wd = str(tmp_path / "wd")
  r = run_cli("jaxft.train", *QUICK, f"--workdir={wd}", "--config.train.steps=2")
  assert r.returncode == 0, r.stderr[-3000:]
  from jaxft import peft, session
  t = session.restore_trained(wd)
  trainable = peft.count_params(t.trainable) * 4
  base = peft.count_params(t.frozen) * 4
  size = tree_bytes(os.path.join(wd, "checkpoints", "2"))
  # params + two Adam moments (+ small metadata); the 36 MB base is not in it.
  assert size < 3 * trainable * 1.1 + 256 * 1024, (size, trainable)
  assert size < base / 10


def _nan_at(step_k):
  """Wraps make_steps so that the loss of step k (1-based) is NaN."""
  from jaxft import step as step_mod

  def make(*a, **kw):
    fns = step_mod.make_steps(*a, **kw)

    def train(state, batch, frozen):
      poison = jax.numpy.where(state["step"] == step_k - 1, jax.numpy.nan, 1.0)
      return fns.train(state, dict(batch, weights=batch["weights"] * poison), frozen)

    return step_mod.StepFns(train, fns.eval)

  return make


@pytest.mark.slow
def test_nan_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
  from jaxft import trainer
  monkeypatch.setattr(trainer, "make_steps", _nan_at(5))
  wd = str(tmp_path / "wd")
  with pytest.raises(trainer.NonFiniteError, match="step 5: loss or gradients are not finite"):
    trainer.train(tiny_config(**{"train.steps": 10, "checkpoint.every": 2}), wd)
  assert sorted(os.listdir(os.path.join(wd, "checkpoints")), key=int) == ["2", "4"]
  step, leaves = trained_leaves(wd)
  assert step == 4 and all(np.isfinite(x).all() for x in jax.tree.leaves(leaves))


@pytest.mark.slow
def test_skip_nonfinite_finishes_and_counts_the_skipped_step(tmp_path, monkeypatch):
  from jaxft import trainer
  monkeypatch.setattr(trainer, "make_steps", _nan_at(3))
  wd = str(tmp_path / "wd")
  out = trainer.train(tiny_config(**{"train.steps": 6, "train.skip_nonfinite": True}), wd)
  assert out["step"] == 6 and out["skipped_steps"] == 1
  _, leaves = trained_leaves(wd)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(leaves))


@pytest.mark.slow
def test_bad_input_leaves_an_existing_workdir_intact(tmp_path):
  wd = tmp_path / "wd"
  r = run_cli("jaxft.train", *TINY, f"--workdir={wd}", "--config.train.steps=2")
  assert r.returncode == 0, r.stderr[-3000:]
  snapshot = {os.path.join(d, f): os.path.getmtime(os.path.join(d, f))
              for d, _, fs in os.walk(wd / "checkpoints") for f in fs}
  bad_utf8 = tmp_path / "latin1.jsonl"
  bad_utf8.write_bytes(b'{"text": "caf\xe9"}\n')
  malformed = tmp_path / "m.jsonl"
  malformed.write_text('{"text": "ok"}\n{oops}\n')
  cases = [([f"--config.data.train={bad_utf8}"], "latin1.jsonl:1: not UTF-8"),
           ([f"--config.data.train={malformed}"], "m.jsonl:2: malformed JSON"),
           ([f"--config.model.path={tmp_path / 'nope'}"], "nope"),
           (["--config.optim.lrr=1"], "lrr")]
  for extra, needle in cases:
    r = run_cli("jaxft.train", *TINY, f"--workdir={wd}", "--config.train.steps=4", *extra)
    assert r.returncode == 2, (extra, r.stderr[-2000:])
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("jaxft: error:") and needle in last, last
  after = {os.path.join(d, f): os.path.getmtime(os.path.join(d, f))
           for d, _, fs in os.walk(wd / "checkpoints") for f in fs}
  assert after == snapshot
