"""The trainable/frozen partition, LoRA at step 0, and the exactness of packing and accumulation."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jaxft import optim, peft
from jaxft.data import formats, pipeline
from jaxft.errors import ConfigError
from jaxft.models import llama
from jaxft.models.config import ModelConfig
from jaxft.peft.loss import loss_sum
from jaxft.step import make_steps
from step_tiny import optim_cfg

CFG = ModelConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=8, initializer_range=0.1)


def lora_cfg(**kw):
  c = ml_collections.ConfigDict({"method": "lora", "targets": "q_proj,v_proj", "init_from": "",
                                 "lora": {"rank": 4, "alpha": 8.0, "dropout": 0.0, "rslora": False}})
  for k, v in kw.items():
    c[k] = v
  return c


def random_examples(n, seed=0, lo=3, hi=12):
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    k = int(rng.integers(lo, hi))
    out.append(formats.Example(rng.integers(0, CFG.vocab_size, k).astype(np.int32),
                               rng.random(k) < 0.7))
  return out


def jbatch(b, accum=None):
  b = {k: jnp.asarray(v) for k, v in b.items()}
  if accum:
    b = {k: v.reshape(accum, v.shape[0] // accum, *v.shape[1:]) for k, v in b.items()}
  return b


def setup(method):
  base = llama.init_params(CFG, jax.random.key(0))
  added = method.init(CFG, jax.random.key(1))
  return method.split(base, added)


def test_param_tree_shapes_and_axes():
  specs = llama.param_specs(CFG)
  params = llama.init_params(CFG, jax.random.key(0))
  flat_p, flat_s = peft.flatten(params), peft.flatten(specs)
  assert flat_p.keys() == flat_s.keys()
  for path, spec in flat_s.items():
    assert flat_p[path].shape == spec.shape, path
    assert len(spec.axes) == len(spec.shape), path
  assert flat_p["layers/q_proj/kernel"].shape == (2, 32, 32)
  assert flat_p["layers/k_proj/kernel"].shape == (2, 32, 16)
  assert "lm_head/kernel" in flat_p
  tied = llama.param_specs(CFG.replace(tie_embeddings=True, qkv_bias=True))
  assert "lm_head" not in tied and tied["layers"]["q_proj"]["bias"].shape == (2, 32)


def test_targets_resolution():
  assert peft.match_targets("q_proj,v_proj", CFG) == ("q_proj", "v_proj")
  assert peft.match_targets("all-linear", CFG) == llama.LINEARS
  assert peft.match_targets(r"(gate|up)_proj", CFG) == ("gate_proj", "up_proj")
  with pytest.raises(ConfigError, match="'qproj' matches no linear layer"):
    peft.match_targets("qproj", CFG)


@pytest.mark.slow
def test_lora_partition_counts_and_step0_logits():
  method = peft.from_config(lora_cfg(targets="all-linear"), CFG)
  trainable, frozen = setup(method)
  # Formula: per target, layers * rank * (in + out).
  D, F, Q, KV, L, r = 32, 48, 32, 16, 2, 4
  dims = [(D, Q), (D, KV), (D, KV), (Q, D), (D, F), (D, F), (F, D)]
  assert peft.count_params(trainable) == sum(L * r * (i + o) for i, o in dims)
  assert peft.count_params(frozen) == peft.count_params(llama.init_params(CFG, jax.random.key(0)))
  tokens = jax.random.randint(jax.random.key(2), (2, 10), 0, CFG.vocab_size)
  h_base, _ = llama.hidden_states(CFG, frozen, tokens, adapter=peft.Method())
  h_lora, _ = llama.hidden_states(CFG, peft.merge_trees(frozen, trainable), tokens, adapter=method)
  np.testing.assert_array_equal(np.asarray(llama.logits(CFG, frozen, h_base)),
                                np.asarray(llama.logits(CFG, frozen, h_lora)))


def test_rslora_scale():
  assert peft.from_config(lora_cfg(), CFG).scale == 2.0
  c = lora_cfg()
  c.lora.rslora = True
  assert peft.from_config(c, CFG).scale == pytest.approx(8.0 / 2.0)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["lora", "full"])
def test_training_touches_only_trainable_and_opt_state_mirrors_it(name):
  method = peft.from_config(lora_cfg(method=name), CFG)
  trainable, frozen = setup(method)
  frozen_before = jax.tree.map(np.array, frozen)
  tx, sched = optim.make(optim_cfg(), 10)
  steps = make_steps(CFG, method, tx, sched, skip_nonfinite=False, dropout=False)
  state = {"step": jnp.zeros((), jnp.int32), "trainable": trainable, "opt_state": tx.init(trainable),
           "rng": jax.random.key(0), "skipped": jnp.zeros((), jnp.int32)}
  # Optimizer state holds moments for the trainable leaves only.
  opt_leaves = [x for x in jax.tree.leaves(state["opt_state"]) if x.ndim > 0]
  assert sum(x.size for x in opt_leaves) == 2 * peft.count_params(trainable)
  if name == "full":
    assert frozen == {}
  batch = jbatch(pipeline.make_batch([[e] for e in random_examples(4)], 16, 4), accum=1)
  step = jax.jit(steps.train)
  losses = []
  for _ in range(3):
    state, m = step(state, batch, frozen)
    losses.append(float(m["loss"]))
  assert losses[-1] < losses[0]
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), frozen, frozen_before)
  changed = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))),
                         state["trainable"], trainable)
  assert any(jax.tree.leaves(changed))


@pytest.mark.slow
def test_packed_and_padded_batches_give_the_same_loss():
  method = peft.from_config(lora_cfg(), CFG)
  trainable, frozen = setup(method)
  exs = random_examples(6)
  packed = pipeline.make_batch(pipeline._rows(exs, 32, True), 32, 3)
  padded = pipeline.make_batch(pipeline._rows(exs, 32, False), 32, 6)
  assert (packed["segment_ids"].max(axis=1) > 1).any()  # really packed
  f = jax.jit(lambda b: loss_sum(CFG, method, trainable, frozen, b, None))
  (s1, n1), (s2, n2) = f(jbatch(packed)), f(jbatch(padded))
  assert float(n1) == float(n2)
  np.testing.assert_allclose(float(s1 / n1), float(s2 / n2), rtol=1e-5)


@pytest.mark.slow
def test_accumulation_equals_one_large_batch():
  method = peft.from_config(lora_cfg(), CFG)
  trainable, frozen = setup(method)
  # Make B non-zero so gradients reach A as well.
  trainable = jax.tree.map(lambda x: x + 0.01, trainable)
  batch = pipeline.make_batch([[e] for e in random_examples(8, seed=5)], 16, 8)
  results = []
  for accum in (1, 4):
    tx, sched = optim.make(optim_cfg(accum_steps=accum), 10)
    steps = make_steps(CFG, method, tx, sched, skip_nonfinite=False, dropout=False)
    state = {"step": jnp.zeros((), jnp.int32), "trainable": trainable,
             "opt_state": tx.init(trainable), "rng": jax.random.key(0),
             "skipped": jnp.zeros((), jnp.int32)}
    new, m = jax.jit(steps.train)(state, jbatch(batch, accum), frozen)
    results.append((new["trainable"], float(m["loss"]), float(m["grad_norm"])))
  np.testing.assert_allclose(results[0][1], results[1][1], rtol=1e-5)
  # Adam's first update is nearly sign(g): the gradient norm is the sharper check.
  np.testing.assert_allclose(results[0][2], results[1][2], rtol=1e-5)
  # (atol: where a gradient is near Adam's eps, float32 summation order alone moves the update by
  # ~1e-4 of its 1e-2 size)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5,
                                                       atol=2e-6), results[0][0], results[1][0])
