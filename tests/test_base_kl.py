"""Replay toward the base: rows marked "distill": true are trained toward the base model's
next-token distributions (train.base_kl * KL(base || tuned)), not toward their own text.

The batch layout of such rows, the chunked KL against a dense reference (values and gradients),
the term at init (zero: LoRA's B = 0 is the base) and after a change, accumulation exactness, the
refusals, and a tiny end-to-end run whose distill rows stay closer to the base than plain replay."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config
from step_tiny import one_step
from jaxft import objectives, peft, trainer
from jaxft.data import pipeline
from jaxft.data.formats import Example
from jaxft.data.tokenize import load_tokenizer, write_quickstart_tokenizer, Encoder
from jaxft.errors import ConfigError, DataError
from jaxft.models import llama, loss
from jaxft.models.config import ModelConfig

CFG = ModelConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=8, initializer_range=0.1)


def examples(n, seed=0, distill=()):
  rng = np.random.default_rng(seed)
  out = []
  for i in range(n):
    k = int(rng.integers(4, 12))
    out.append(Example(rng.integers(0, CFG.vocab_size, k).astype(np.int32), rng.random(k) < 0.7,
                       distill=i in distill))
  return out


def test_distill_rows_in_the_batch():
  """A distill example carries no cross-entropy weight and a KL weight on each of its tokens,
  packed or not; the others are unchanged."""
  exs = examples(6, distill=(1, 4))
  for packing in (False, True):
    b = pipeline.make_batch(pipeline._rows(exs, 32, packing), 32, 6)
    plain = pipeline.make_batch(pipeline._rows([Example(e.ids, e.mask) for e in exs], 32,
                                               packing), 32, 6)
    d = b["distill"] > 0
    assert int(d.sum()) == sum(len(exs[i].ids) - 1 for i in (1, 4))
    assert not (b["weights"][d]).any()  # no cross-entropy on the distill tokens
    np.testing.assert_array_equal(b["weights"][~d], plain["weights"][~d])
    for k in ("inputs", "targets", "positions", "segment_ids"):
      np.testing.assert_array_equal(b[k], plain[k])


def test_distill_field_is_read_and_checked(tmp_path):
  tok = load_tokenizer(write_quickstart_tokenizer(str(tmp_path / "tok")))
  enc = Encoder(tok)
  chat = lambda q, a: {"messages": [{"role": "user", "content": q},
                                    {"role": "assistant", "content": a}]}
  path = tmp_path / "d.jsonl"
  path.write_text("\n".join(json.dumps(r) for r in [
      chat("Capital of Spain?", "Madrid."), dict(chat("Capital of Peru?", "Lima."), distill=True),
      dict(chat("2 + 2?", "4."), distill=False)]) + "\n")
  ds = pipeline.load_examples(str(path), enc, "auto", 64, tok.vocab_size)
  assert [e.distill for e in ds.examples] == [False, True, False] and ds.distill == 1
  path.write_text(json.dumps(dict(chat("Capital of Peru?", "Lima."), distill="yes")) + "\n")
  with pytest.raises(DataError, match=r"d\.jsonl:1.*'distill' must be true or false"):
    pipeline.load_examples(str(path), enc, "auto", 64, tok.vocab_size)


def dense_kl(cfg, params, h, ref_params, h_ref, w):
  lp = jax.nn.log_softmax(llama.logits(cfg, params, h), axis=-1)
  lq = jax.nn.log_softmax(llama.logits(cfg, ref_params, h_ref), axis=-1)
  return jnp.sum(w * jnp.sum(jnp.exp(lq) * (lq - lp), axis=-1))


def test_chunked_kl_equals_the_dense_one():
  cfg = CFG.replace(dtype="float32")
  params = llama.init_params(cfg, jax.random.key(0))
  ref = jax.tree.map(lambda x: x * 1.1, params)
  h = jax.random.normal(jax.random.key(1), (3, 7, 32))
  h_ref = h + 0.3 * jax.random.normal(jax.random.key(2), h.shape)
  w = (jax.random.uniform(jax.random.key(3), (3, 7)) < 0.6).astype(jnp.float32)
  want = dense_kl(cfg, params, h, ref, h_ref, w)
  f = lambda hh, p: loss.kl_sum(cfg, p, hh, ref, h_ref, w, chunk_tokens=4)  # 21 tokens: 6 chunks
  got = f(h, params)
  assert float(want) > 0.1
  np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
  g_want = jax.grad(lambda hh, p: dense_kl(cfg, p, hh, ref, h_ref, w), argnums=(0, 1))(h, params)
  g_got = jax.grad(f, argnums=(0, 1))(h, params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4,
                                                       atol=1e-6), g_got, g_want)
  # An untrained head (every PEFT method): the forward forms the gradient for h.
  fixed = lambda hh: loss.kl_sum(cfg, params, hh, params, h_ref, w, head_trained=False,
                                 chunk_tokens=4)
  dense = lambda hh: dense_kl(cfg, params, hh, params, h_ref, w)
  np.testing.assert_allclose(float(fixed(h)), float(dense(h)), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(jax.grad(fixed)(h)), np.asarray(jax.grad(dense)(h)),
                             rtol=1e-4, atol=1e-6)
  # Identical distributions: zero, whatever the weights.
  assert abs(float(loss.kl_sum(cfg, ref, h_ref, ref, h_ref, w * 5, chunk_tokens=4))) < 1e-5


def lora_parts(seed=1):
  method = peft.LoRA(targets=("q_proj", "v_proj", "down_proj"), rank=4, alpha=8.0)
  base = llama.init_params(CFG, jax.random.key(0))
  trainable, frozen = method.split(base, method.init(CFG, jax.random.key(seed)))
  return method, trainable, frozen


def jbatch(b):
  return {k: jnp.asarray(v) for k, v in b.items()}


def test_kl_term_is_zero_at_init_and_grows_when_the_adapter_moves():
  method, trainable, frozen = lora_parts()
  objective = objectives.SFT(base_kl=1.0)
  batch = jbatch(pipeline.make_batch(pipeline._rows(examples(6, distill=(0, 3)), 32, True), 32, 4))
  terms, _ = objective.sums(CFG, method, trainable, frozen, batch, None)
  plain, _ = objectives.SFT().sums(CFG, method, trainable, frozen, batch, None)
  assert abs(float(terms["kl"])) < 1e-5  # B = 0: the tuned model is the base
  np.testing.assert_allclose(float(terms["nll"]), float(plain["nll"]), rtol=1e-6)
  moved = jax.tree.map(lambda x: x + 0.05, trainable)
  terms, _ = objective.sums(CFG, method, moved, frozen, batch, None)
  assert float(terms["kl"]) > 1e-3
  # Only the distill tokens count: without them the term is zero whatever the adapter.
  none = dict(batch, distill=jnp.zeros_like(batch["distill"]))
  terms, _ = objective.sums(CFG, method, moved, frozen, none, None)
  assert float(terms["kl"]) == 0.0


def test_accumulation_equals_one_large_batch():
  method, trainable, frozen = lora_parts()
  trainable = jax.tree.map(lambda x: x + 0.02, trainable)
  objective = objectives.SFT(base_kl=0.5)
  batch = pipeline.make_batch([[e] for e in examples(8, seed=4, distill=(0, 2, 7))], 16, 8)
  big, m1 = one_step(CFG, method, objective, trainable, frozen, batch, 1)
  small, m4 = one_step(CFG, method, objective, trainable, frozen, batch, 4)
  assert float(m1["objective"]["base_kl"]) > 0
  for k in ("loss", "grad_norm"):
    np.testing.assert_allclose(float(m1[k]), float(m4[k]), rtol=1e-5)
  # The KL is a small difference of log-probabilities (here 2.4e-3): float32 sums in another
  # order move it by ~4e-8 absolute, 1.5e-5 relative on some CPUs.
  np.testing.assert_allclose(float(m1["objective"]["base_kl"]),
                             float(m4["objective"]["base_kl"]), rtol=1e-5, atol=1e-7)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5,
                                                       atol=2e-6), big["trainable"], small["trainable"])


def test_settings_are_checked(tmp_path):
  config = tiny_config
  with pytest.raises(ConfigError, match="train.base_kl=-1.0: must be a finite number >= 0"):
    objectives.from_config(config(**{"train.base_kl": -1.0}), False)
  with pytest.raises(ConfigError, match="full fine-tuning keeps no frozen copy"):
    objectives.from_config(config(**{"train.base_kl": 1.0}), True)
  with pytest.raises(ConfigError, match="part of train.objective=sft, not orpo"):
    objectives.from_config(config(**{"train.base_kl": 1.0, "train.objective": "orpo"}), False)
  # The setting without marked rows is refused before anything is written; marked rows without
  # the setting are plain rows (the same run as the file without the marks).
  wd = str(tmp_path / "wd")
  with pytest.raises(ConfigError, match="no row of .* is marked"):
    trainer.train(config(**{"train.base_kl": 1.0, "train.steps": 1}), wd)
  assert not os.path.exists(os.path.join(wd, "checkpoints"))
  rows = [json.loads(line) for line in open(tiny_config().data.train)][:40]
  marked, plain = tmp_path / "marked.jsonl", tmp_path / "plain.jsonl"
  marked.write_text("".join(json.dumps(dict(r, distill=i < 5)) + "\n" for i, r in enumerate(rows)))
  plain.write_text("".join(json.dumps(r) + "\n" for r in rows))
  losses = [trainer.train(config(**{"data.train": str(f), "train.steps": 2,
                                    "train.eval_every": 0}), str(tmp_path / f.stem))["loss"]
            for f in (marked, plain)]
  assert losses[0] == losses[1]


def test_distill_rows_stay_closer_to_the_base_than_plain_replay():
  """The same steps twice, 3 of 8 rows replay: trained on their text (plain replay) or toward the
  base (base_kl=1): the second ends much closer to the base on those rows."""
  method, trainable, frozen = lora_parts()
  exs = examples(8, seed=5, distill=(1, 4, 6))
  marked = pipeline.make_batch([[e] for e in exs], 16, 8)
  plain = pipeline.make_batch([[Example(e.ids, e.mask)] for e in exs], 16, 8)
  runs = {"kl": (objectives.SFT(base_kl=1.0), marked), "plain": (objectives.SFT(), plain)}
  kls = {}
  for name, (objective, batch) in runs.items():
    state = {"trainable": trainable}
    for _ in range(8):
      state, _ = one_step(CFG, method, objective, state["trainable"], frozen, batch, 1)
    terms, _ = objectives.SFT(base_kl=1.0).sums(CFG, method, state["trainable"], frozen,
                                                jbatch(marked), None)
    kls[name] = float(terms["kl"])
  assert kls["kl"] < 0.5 * kls["plain"], kls


def test_a_run_with_distill_rows_logs_the_kl(tmp_path):
  rows = [json.loads(line) for line in open(tiny_config().data.train)][:48]
  marked = tmp_path / "marked.jsonl"
  marked.write_text("".join(json.dumps(dict(r, distill=i < 12)) + "\n" for i, r in enumerate(rows)))
  out = trainer.train(tiny_config(**{"train.steps": 4, "train.eval_every": 0, "optim.lr": 3e-3,
                                     "data.train": str(marked), "train.base_kl": 1.0}),
                      str(tmp_path / "wd"))
  assert np.isfinite(out["loss"]) and 0 < out["base_kl"] < 0.1, out
