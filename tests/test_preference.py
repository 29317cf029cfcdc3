"""Preference pairs and objectives: TRL's row formats and the refusals, the pair batch layout,
accumulation and packing exactness, DPO on every method (the reference is the base with the
method off), and the end-to-end runs: resume after SIGTERM, full fine-tuning with precomputed
reference log-probs, export."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from conftest import ROOT, forced_devices_flags, make_config, run_cli
from step_tiny import one_step, optim_cfg
from jaxft import objectives, optim, peft
from jaxft.data import pipeline, preference
from jaxft.data.formats import Example
from jaxft.data.tokenize import Encoder
from jaxft.errors import ConfigError, DataError
from jaxft.models import llama
from jaxft.models.config import ModelConfig
from jaxft.step import make_steps

CFG = ModelConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=8, initializer_range=0.1)


def write_rows(path, rows):
  with open(path, "w") as f:
    for r in rows:
      f.write(json.dumps(r) + "\n")
  return str(path)


def targets_text(enc, ex):
  return enc.tok.decode(ex.ids[ex.mask].tolist())


# -- rows ---------------------------------------------------------------------------------------

def test_row_formats_and_implicit_prompts(tmp_path, quickstart_tokenizer):
  enc = Encoder(quickstart_tokenizer)
  msgs = lambda role, text: [{"role": role, "content": text}]
  rows = [
      {"prompt": "The capital of France is", "chosen": " Paris.", "rejected": " Lyon, I think."},
      {"chosen": "The capital of France is Paris.", "rejected": "The capital of France is Lyon, I think."},
      {"prompt": msgs("user", "Capital of Peru?"), "chosen": msgs("assistant", "Lima."),
       "rejected": msgs("assistant", "Cusco.")},
      {"chosen": msgs("user", "Capital of Peru?") + msgs("assistant", "Lima."),
       "rejected": msgs("user", "Capital of Peru?") + msgs("assistant", "Cusco.")},
  ]
  ds = preference.load_pairs(write_rows(tmp_path / "p.jsonl", rows), enc, "auto", 64)
  assert ds.formats == {"standard": 2, "conversational": 2}
  p = ds.examples
  # Targets are the completions only (and the end of sequence), never the prompt.
  assert targets_text(enc, p[0].chosen).strip() == "Paris.</s>"
  assert targets_text(enc, p[0].rejected).strip() == "Lyon, I think.</s>"
  assert "Peru" not in targets_text(enc, p[2].chosen) and "Lima" in targets_text(enc, p[2].chosen)
  # An implicit prompt gives exactly the pair an explicit one does.
  for explicit, implicit in ((p[0], p[1]), (p[2], p[3])):
    for a, b in ((explicit.chosen, implicit.chosen), (explicit.rejected, implicit.rejected)):
      np.testing.assert_array_equal(a.ids, b.ids)
      np.testing.assert_array_equal(a.mask, b.mask)


@pytest.mark.parametrize("row,needle", [
    ({"prompt": "Q?", "chosen": " A."}, "missing required field 'rejected'"),
    ({"prompt": "Q?", "chosen": " A.", "rejected": " A."}, "are the same"),
    ({"prompt": "Q?", "chosen": " A.", "rejected": [{"role": "assistant", "content": "B"}]},
     "must be a string"),
    ({"prompt": [{"role": "user", "content": "Q?"}], "chosen": [{"role": "user", "content": "A"}],
      "rejected": [{"role": "assistant", "content": "B"}]}, "'chosen' has no assistant message"),
    ({"messages": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A"}]},
     "a chat row in a preference run"),
    ({"chosen": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A"}],
      "rejected": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A"}]},
     "'chosen' and 'rejected' are the same"),
    ({"chosen": "Q? A.", "rejected": "Q? A."}, "'chosen' and 'rejected' are the same"),
    ({"prompt": None, "chosen": " A.", "rejected": " B."}, "field 'prompt' is null"),
])
def test_bad_preference_rows_name_the_line(tmp_path, quickstart_tokenizer, row, needle):
  good = {"prompt": "Q?", "chosen": " A.", "rejected": " B."}
  path = write_rows(tmp_path / "p.jsonl", [good, row])
  with pytest.raises(DataError, match=needle) as e:
    preference.load_pairs(path, Encoder(quickstart_tokenizer), "auto", 64)
  assert f"{path}:2" in str(e.value)


def test_preference_row_in_a_supervised_run(tmp_path, quickstart_tokenizer):
  path = write_rows(tmp_path / "p.jsonl", [{"prompt": "Q?", "completion": " A."},
                                           {"prompt": "Q?", "chosen": " A.", "rejected": " B."}])
  with pytest.raises(DataError, match=r":2: a preference row .* train.objective=dpo"):
    pipeline.load_examples(path, Encoder(quickstart_tokenizer), "auto", 64, 32000)


def test_objective_settings_are_checked():
  c = make_config("base")
  c.train.objective = "dpo"
  assert objectives.from_config(c, trains_base=False).reference == "base"
  with pytest.raises(ConfigError, match="train.precompute_reference=True"):
    objectives.from_config(c, trains_base=True)
  c.train.precompute_reference = True
  assert objectives.from_config(c, trains_base=True).reference == "data"
  for key, value, needle in (("train.objective", "kto", "train.objective"),
                             ("pref.beta", 0.0, "pref.beta"),
                             ("pref.loss_type", "hinge", "pref.loss_type")):
    bad = make_config("base")
    bad.train.objective = "dpo"
    group, name = key.split(".")
    bad[group][name] = value
    with pytest.raises(ConfigError, match=needle):
      objectives.from_config(bad, trains_base=False)


@pytest.mark.parametrize("objective,key,value", [
    ("dpo", "pref.beta", float("nan")), ("simpo", "pref.simpo_gamma", float("nan")),
    ("simpo", "pref.simpo_gamma", -1.0), ("orpo", "pref.orpo_lambda", float("inf")),
    ("dpo", "pref.label_smoothing", float("nan")), ("sft", "train.base_kl", float("nan")),
])
def test_non_finite_settings_are_refused_naming_the_key(tmp_path, objective, key, value):
  """NaN reached step 1 and was blamed on training ("loss or gradients are not finite"); now the
  key is named before any data is read or the workdir is made."""
  from conftest import tiny_config
  from jaxft import trainer
  c = tiny_config(**{"train.objective": objective, key: value,
                     "data.train": str(tmp_path / "absent.jsonl")})
  with pytest.raises(ConfigError, match=rf"^{key}={value}: must be"):
    trainer.train(c, str(tmp_path / "wd"))
  assert not (tmp_path / "wd").exists()


# -- batches and steps --------------------------------------------------------------------------

def random_pairs(n, seed=0):
  rng = np.random.default_rng(seed)

  def seq(prompt):
    k = int(rng.integers(2, 7))
    ids = np.concatenate([prompt, rng.integers(3, CFG.vocab_size, k)]).astype(np.int32)
    return Example(ids, np.arange(len(ids)) >= len(prompt))

  out = []
  for _ in range(n):
    prompt = rng.integers(3, CFG.vocab_size, int(rng.integers(2, 6)))
    out.append(preference.Pair(seq(prompt), seq(prompt)))
  return out


def test_pairs_sit_together_in_a_row():
  pairs = random_pairs(9)
  rows = preference.rows_of(pairs, 24, packing=True)
  assert sum(len(r) for r in rows) == 9 and any(len(r) > 1 for r in rows)
  b = preference.make_batch(rows, 24, len(rows))
  seq_w = objectives.per_sequence(jnp.asarray(b["weights"]), jnp.asarray(b["segment_ids"]))
  for r, row in enumerate(rows):
    for k, p in enumerate(row):  # pair k: chosen segment 2k+1 and rejected 2k+2 of the same row
      assert float(seq_w[r, k, 0]) == p.chosen.mask[1:].sum()
      assert float(seq_w[r, k, 1]) == p.rejected.mask[1:].sum()
  counts = objectives.Preference().counts({k: jnp.asarray(v) for k, v in b.items()})
  assert int(counts["pairs"]) == 9


def lora_method():
  return peft.LoRA(targets=("q_proj", "v_proj"), rank=4, alpha=8.0)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["dpo", "orpo"])
def test_accumulation_equals_one_large_batch(name):
  method = lora_method()
  base = llama.init_params(CFG, jax.random.key(0))
  trainable, frozen = method.split(base, method.init(CFG, jax.random.key(1)))
  trainable = jax.tree.map(lambda x: x + 0.01, trainable)  # B != 0: policy != reference
  objective = objectives.Preference(name=name, reference="base" if name == "dpo" else "none")
  pairs = random_pairs(8, seed=3)
  batch = preference.make_batch(preference.rows_of(pairs, 24, False), 24, 8)
  big, m1 = one_step(CFG, method, objective, trainable, frozen, batch, 1)
  small, m4 = one_step(CFG, method, objective, trainable, frozen, batch, 4)
  for k in ("loss", "grad_norm"):
    np.testing.assert_allclose(float(m1[k]), float(m4[k]), rtol=1e-5)
  for k in objectives.PREFERENCE_METRICS:
    np.testing.assert_allclose(float(m1["objective"][k]), float(m4["objective"][k]), rtol=1e-5,
                               atol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5,
                                                       atol=2e-6), big["trainable"], small["trainable"])
  # Packing the same pairs (several per row) gives the same loss and gradients.
  rows = preference.rows_of(pairs, 48, True)
  assert len(rows) < 8
  packed = preference.make_batch(rows, 48, len(rows))
  _, mp = one_step(CFG, method, objective, trainable, frozen, packed, 1)
  np.testing.assert_allclose(float(mp["loss"]), float(m1["loss"]), rtol=1e-5)
  np.testing.assert_allclose(float(mp["grad_norm"]), float(m1["grad_norm"]), rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["lora", "dora", "adapter", "prefix", "qlora"])
def test_dpo_reference_is_the_base_with_the_method_off(kind):
  """On every method the reference is the frozen base run without the method: rewards are zero
  exactly when the method is the identity (LoRA/DoRA at init, zeroed adapters), and a few DPO
  steps raise the margin."""
  pc = ml_collections.ConfigDict({"method": "lora" if kind == "qlora" else kind,
                                  "targets": "q_proj,v_proj", "init_from": "",
                                  "lora": {"rank": 4, "alpha": 8.0, "dropout": 0.0, "rslora": False},
                                  "adapter": {"size": 8, "placement": "houlsby", "activation": "relu"},
                                  "prefix": {"length": 3, "mlp_hidden": 0}})
  method = peft.from_config(pc, CFG)
  base = llama.init_params(CFG, jax.random.key(0))
  if kind == "qlora":
    from hf_tiny import one_device_shardings
    from jaxft.models.quantized import quantize_base
    base = quantize_base(base, "nf4", one_device_shardings(CFG))
  added = method.init_from_base(CFG, base, method.init(CFG, jax.random.key(1)))
  trainable, frozen = method.split(base, added)
  objective = objectives.Preference(name="dpo", beta=0.5, reference="base")
  rows = preference.rows_of(random_pairs(4, seed=7), 24, True)
  batch = preference.make_batch(rows, 24, len(rows))
  jb = {k: jnp.asarray(v) for k, v in batch.items()}
  _, stats = objective.sums(CFG, method, trainable, frozen, jb, None)
  at_init = abs(float(stats["rewards/chosen"])) + abs(float(stats["rewards/rejected"]))
  if kind == "prefix":  # virtual tokens change the policy from the start; not the reference
    assert at_init > 1e-4
  else:
    assert at_init < 1e-5
  tx, sched = optim.make(optim_cfg(lr=3e-2 if kind != "prefix" else 0.3), 10)
  steps = make_steps(CFG, method, tx, sched, skip_nonfinite=False, dropout=False,
                     objective=objective)
  state = {"step": jnp.zeros((), jnp.int32), "trainable": trainable, "opt_state": tx.init(trainable),
           "rng": jax.random.key(0), "skipped": jnp.zeros((), jnp.int32)}
  step = jax.jit(steps.train)
  margins = []
  for _ in range(6):
    state, m = step(state, {k: v[None] for k, v in jb.items()}, frozen)
    margins.append(float(m["objective"]["rewards/margins"]))
  assert margins[-1] > margins[0] + 0.05, margins
  assert float(m["objective"]["rewards/accuracies"]) >= 0.75


# -- end to end ---------------------------------------------------------------------------------

TINY_DPO = ["--config=configs/quickstart.py:objective=dpo", "--config.model.preset=tiny",
            "--config.train.progress=False", "--config.train.log_every=1",
            "--config.peft.init_from=", "--config.train.precompute_reference=False",
            "--config.data.batch_size=4"]


def metrics_rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


DPO_ARGS = TINY_DPO + ["--config.train.steps=12", "--config.checkpoint.every=3",
                       "--config.train.eval_every=0"]


@pytest.fixture(scope="module")
def straight_dpo(tmp_path_factory):
  """The metrics rows of 12 uninterrupted DPO steps (LoRA, tiny preset, one device)."""
  wd = str(tmp_path_factory.mktemp("dpo") / "straight")
  r = run_cli("jaxft.train", *DPO_ARGS, f"--workdir={wd}")
  assert r.returncode == 0, r.stderr[-3000:]
  return metrics_rows(wd)


@pytest.mark.slow
def test_dpo_sharded_matches_one_device(straight_dpo, tmp_path):
  wd = str(tmp_path / "sharded")
  r = run_cli("jaxft.train", *DPO_ARGS, "--config.mesh.data=2", "--config.mesh.fsdp=2",
              "--config.mesh.tensor=2", f"--workdir={wd}",
              env={"XLA_FLAGS": forced_devices_flags(8)})
  assert r.returncode == 0, r.stderr[-3000:]
  got = [m for m in metrics_rows(wd) if "loss" in m]
  want = [m for m in straight_dpo if "loss" in m]
  for k in ("loss", "rewards/margins", "logps/chosen"):
    np.testing.assert_allclose([m[k] for m in got], [m[k] for m in want], rtol=2e-4, atol=1e-5)


@pytest.mark.slow
def test_dpo_sigterm_then_resume_matches_a_straight_run(straight_dpo, tmp_path):
  split = str(tmp_path / "split")
  args = DPO_ARGS
  rows = straight_dpo
  train = [m for m in rows if "loss" in m]
  assert {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
          "logps/chosen", "logps/rejected"} <= train[0].keys()
  assert "eval_rewards/accuracies" in rows[-1]
  assert abs(train[0]["loss"] - np.log(2)) < 1e-4  # a fresh LoRA is its own reference

  proc = subprocess.Popen([sys.executable, "-m", "jaxft.train", *args, f"--workdir={split}"],
                          cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  path = os.path.join(split, "metrics.jsonl")
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    if os.path.exists(path) and any(m.get("step", 0) >= 4 and "loss" in m for m in metrics_rows(split)):
      proc.send_signal(signal.SIGTERM)
      break
    time.sleep(0.02)
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-3000:]
  assert "stopped by SIGTERM" in out
  r = run_cli("jaxft.train", *args, f"--workdir={split}")
  assert r.returncode == 0, r.stderr[-3000:]
  want = {m["step"]: m["loss"] for m in rows if "loss" in m}
  got = {m["step"]: m["loss"] for m in metrics_rows(split) if "loss" in m}
  assert got == want


@pytest.mark.slow
def test_full_finetuning_dpo_with_precomputed_reference_then_export(tmp_path):
  wd = str(tmp_path / "full")
  args = TINY_DPO + ["--config.peft.method=full", "--config.optim.lr=1e-4",
                          "--config.train.steps=3", "--config.train.eval_every=0"]
  r = run_cli("jaxft.train", *args, f"--workdir={wd}")
  assert r.returncode == 2 and "train.precompute_reference=True" in r.stderr, r.stderr[-2000:]
  r = run_cli("jaxft.train", *args, "--config.train.precompute_reference=True", f"--workdir={wd}")
  assert r.returncode == 0, r.stderr[-3000:]
  train = [m for m in metrics_rows(wd) if "loss" in m]
  assert abs(train[0]["loss"] - np.log(2)) < 1e-4  # the stored reference is the starting model
  assert train[-1]["rewards/margins"] > 0
  out = str(tmp_path / "hf")
  r = run_cli("jaxft.export", f"--workdir={wd}", "--format=hf", f"--out={out}")
  assert r.returncode == 0, r.stderr[-3000:]
  assert os.path.isfile(os.path.join(out, "config.json"))
