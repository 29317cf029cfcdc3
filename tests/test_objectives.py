"""The objective seam: an objective owns its data, batches, pre-training work and the batch it
trains on, and the trainer, evaluation and the planner run whichever they are given without
asking its name. A toy objective registered here (its own row format, which no built-in objective
reads) is trained and evaluated by jaxft.trainer; the sources of the trainer, evaluation, hooks
and planner compare nothing with an objective's name."""

import ast
import collections
import dataclasses
import glob
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import ROOT, make_config, tiny_config
from jaxft import objectives, plan, trainer
from jaxft.data import pipeline, sources
from jaxft.errors import ConfigError
from jaxft.peft.loss import loss_sum

CALLS = collections.Counter()


@dataclasses.dataclass(frozen=True)
class Toy(objectives.Objective):
  """Cross-entropy on the answers of {"q", "a"} rows, counting each call the loop makes."""
  name: str = "toy"
  metric_names: tuple = ("answer_tokens",)

  def counts(self, batch):
    return {"tokens": jnp.sum(batch["weights"])}

  def sums(self, cfg, method, trainable, frozen, batch, rng):
    s, _ = loss_sum(cfg, method, trainable, frozen, batch, rng)
    return {"nll": s}, {}

  def loss(self, terms, counts):
    return terms["nll"] / jnp.maximum(counts["tokens"], 1.0)

  def metrics(self, terms, stats, counts):
    return {"answer_tokens": counts["tokens"]}

  def load_data(self, config, encoder, vocab_size):
    CALLS["load_data"] += 1
    examples = [encoder.completion(row["q"], row["a"])
                for _, row in sources.read_rows(config.data.train)]
    ds = pipeline.Dataset(examples, {"toy": len(examples)}, 0,
                          sum(int(e.mask[1:].sum()) for e in examples))
    return ds, ds

  def stream(self, config, train_ds):
    CALLS["stream"] += 1
    return pipeline.TrainStream(train_ds.examples, max_len=config.data.max_len, packing=False,
                                rows_per_batch=config.data.batch_size, seed=0)

  def eval_batches(self, examples, config):
    CALLS["eval_batches"] += 1
    return pipeline.eval_batches(examples, config.data.max_len, config.data.batch_size, False)

  def batch_fields(self):
    return dict(objectives.TOKEN_FIELDS)

  def before_training(self, run, model, datasets, config):
    CALLS["before_training"] += 1
    assert "trainable" in run.state and model.cfg.vocab_size and len(datasets) == 2

  def train_batch(self, loop, model, batch):
    CALLS["train_batch"] += 1
    assert loop.state["step"] is not None and model.mesh is not None  # the policy as it is now
    return batch


def test_a_registered_objective_is_trained_without_the_trainer_knowing_it(tmp_path, monkeypatch):
  monkeypatch.setattr(objectives, "_BUILDERS", dict(objectives._BUILDERS))
  objectives.register("toy", lambda config, trains_base: Toy())
  assert "toy" in objectives.names()
  data = tmp_path / "toy.jsonl"
  # (a row no built-in objective reads: SFT's formats cannot tell what {"q", "a"} is)
  data.write_text("".join(json.dumps({"q": f"What is {i} plus {i}? ", "a": str(2 * i)}) + "\n"
                          for i in range(8)))
  CALLS.clear()
  steps = 2
  out = trainer.train(tiny_config(**{"train.objective": "toy", "data.train": str(data),
                                     "data.eval": str(data), "data.max_len": 32,
                                     "data.batch_size": 4, "train.steps": steps,
                                     "train.eval_every": 0}), str(tmp_path / "wd"))
  assert CALLS == {"load_data": 1, "stream": 1, "before_training": 1, "train_batch": steps,
                   "eval_batches": 2}  # (evaluation at step 0 and at the end)
  assert out["step"] == steps and math.isfinite(out["loss"]) and out["answer_tokens"] > 0
  assert "eval_ppl" not in out and out["eval_answer_tokens"] > 0  # (no perplexity: its choice)


def test_each_objective_names_its_batch_fields():
  c = tiny_config(**{"data.batch_size": 4, "optim.accum_steps": 2, "data.max_len": 16})
  sft = objectives.SFT().abstract_batch(c)
  dpo = objectives.Preference().abstract_batch(c)
  assert set(dpo) - set(sft) == {"ref_logps"}
  assert {x.shape for x in dpo.values()} == {(2, 2, 16)}
  assert sft["inputs"].dtype == np.int32 and dpo["ref_logps"].dtype == np.float32


def test_the_planner_compiles_with_the_objectives_batch():
  """jaxft.plan builds a DPO step (with a precomputed reference: pairs carry ref_logps) from
  abstract arrays, as it builds SFT's."""
  c = make_config("quickstart", "objective=dpo", **{"model.preset": "tiny"})
  assert c.train.precompute_reference
  ab = plan.build(c, jax.devices()[:1])
  assert "ref_logps" in ab.batch and ab.batch["inputs"].shape == (1, 8, 128)


def test_an_unknown_objective_lists_the_registered_ones():
  with pytest.raises(ConfigError, match="train.objective='kto': expected one of sft, dpo, orpo, "
                                        "simpo"):
    objectives.from_config(tiny_config(**{"train.objective": "kto"}), False)


def _compared_names(path: str) -> list[str]:
  """`path`'s comparisons that read an objective's name or compare with a registered one."""
  names = set(objectives.names())
  with open(path, encoding="utf-8") as f:
    tree = ast.parse(f.read())
  found = []
  for node in ast.walk(tree):
    if not isinstance(node, ast.Compare):
      continue
    text = ast.unparse(node)
    consts = {n.value for n in ast.walk(node) if isinstance(n, ast.Constant)}
    if "objective" in text or consts & names:
      found.append(f"{os.path.relpath(path, ROOT)}:{node.lineno}: {text}")
  return found


def test_the_loop_evaluation_and_planner_never_ask_an_objective_its_name():
  paths = [os.path.join(ROOT, "jaxft", p) for p in ("trainer.py", "hooks.py", "step.py",
                                                    "evaluate.py")]
  paths += glob.glob(os.path.join(ROOT, "jaxft", "eval", "*.py"))
  paths += glob.glob(os.path.join(ROOT, "jaxft", "plan", "*.py"))
  assert [p for p in paths if _compared_names(p)] == [], sum(map(_compared_names, paths), [])
  # (and the check finds one)
  probe = os.path.join(ROOT, "jaxft", "objectives", "preference.py")
  assert any("self.name == 'orpo'" in f for f in _compared_names(probe))
