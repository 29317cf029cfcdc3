"""Bring your own NNX model (jaxft.nnx): LoRA on a user's module against hand-written LoRA in a
plain optax loop, QLoRA (NF4 base) memory and training, DoRA, merging back into the user's
classes, checkpoint/resume, sharding rules, and the example script."""

import functools
import importlib.util
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import jaxft
from jaxft import nnx as jnnx
from jaxft import quant

D, HEADS, VOCAB, LAYERS, RANK, ALPHA, STEPS = 64, 4, 32, 4, 4, 8.0, 6


class Attention(nnx.Module):
  def __init__(self, rngs):
    self.q, self.k, self.v, self.o = (nnx.Linear(D, D, rngs=rngs) for _ in range(4))

  def __call__(self, x):
    b, t, _ = x.shape
    split = lambda y: y.reshape(b, t, HEADS, D // HEADS)
    q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
    att = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(D // HEADS)
    att = jnp.where(jnp.tril(jnp.ones((t, t), bool)), att, -1e9)
    out = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(att, axis=-1), v)
    return self.o(out.reshape(b, t, D))


class Block(nnx.Module):
  def __init__(self, rngs):
    self.norm1, self.norm2 = nnx.RMSNorm(D, rngs=rngs), nnx.RMSNorm(D, rngs=rngs)
    self.attn = Attention(rngs)
    self.up, self.down = nnx.Linear(D, 2 * D, rngs=rngs), nnx.Linear(2 * D, D, rngs=rngs)

  def __call__(self, x):
    x = x + self.attn(self.norm1(x))
    return x + self.down(jax.nn.gelu(self.up(self.norm2(x))))


class TinyLM(nnx.Module):
  def __init__(self, rngs):
    self.embed = nnx.Embed(VOCAB, D, rngs=rngs)
    self.layers = nnx.List([Block(rngs) for _ in range(LAYERS)])
    self.head = nnx.Linear(D, VOCAB, use_bias=False, rngs=rngs)

  def __call__(self, tokens):
    x = self.embed(tokens)
    for layer in self.layers:
      x = layer(x)
    return self.head(x)


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, tokens):
  return nnx.merge(graphdef, state)(tokens)


def logits(model, tokens):
  """model(tokens), jitted (eager forwards of a 4-layer model cost seconds of op compiles)."""
  return _forward(*nnx.split(model), tokens)


def loss_fn(model, batch):
  logits = model(batch[:, :-1])
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()


TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, VOCAB, (STEPS, 4, 9)), jnp.int32)
TARGETS = "attn/(q|v)/kernel,up"


class HandLoRA(nnx.Module):
  """LoRA written out: the user's linear plus (x A) B * alpha / r."""

  def __init__(self, linear, a):
    self.linear = linear
    self.a = nnx.LoRAParam(a)
    self.b = nnx.LoRAParam(jnp.zeros((RANK, linear.out_features), jnp.float32))

  def __call__(self, x):
    return self.linear(x) + (x @ self.a[...]) @ self.b[...] * (ALPHA / RANK)


def hand_lora(base, adapted):
  """The base model with HandLoRA on the targeted layers, A copied from jaxft's adapted model."""
  ref = nnx.clone(base)
  for la, lr in zip(adapted.layers, ref.layers):
    for name in ("q", "v"):
      setattr(lr.attn, name, HandLoRA(getattr(lr.attn, name),
                                      getattr(la.attn, name).lora_a[...]))
    lr.up = HandLoRA(lr.up, la.up.lora_a[...])
  return ref


def plain_optax_losses(model, steps):
  graphdef, train, rest = nnx.split(model, nnx.LoRAParam, ...)
  tx = optax.adamw(1e-2)
  opt = tx.init(train)

  @jax.jit
  def step(train, opt, batch):
    loss, g = jax.value_and_grad(lambda t: loss_fn(nnx.merge(graphdef, t, rest), batch))(train)
    upd, opt = tx.update(g, opt, train)
    return optax.apply_updates(train, upd), opt, loss

  losses = []
  for i in range(steps):
    train, opt, loss = step(train, opt, TOKENS[i])
    losses.append(float(loss))
  return losses, nnx.merge(graphdef, train, rest)


def run(model, steps, start=0, **kw):
  trainer = jnnx.Trainer(model, loss_fn, optax.adamw(1e-2), **kw)
  losses = [trainer.step(TOKENS[i])["loss"] for i in range(trainer.step_count, steps)]
  trainer.close()
  return trainer, losses


@pytest.fixture(scope="module")
def base():
  return TinyLM(nnx.Rngs(0))


@pytest.fixture(scope="module")
def lora_run(base):
  model = jnnx.lora(base, TARGETS, rank=RANK, alpha=ALPHA)
  trainer, losses = run(model, STEPS)
  return model, trainer, losses


def test_targets_select_layers_and_leave_the_rest(base, lora_run):
  model = lora_run[0]
  adapted = {p for p, m in nnx.iter_modules(model) if isinstance(m, jnnx.AdaptedLinear)}
  assert len(adapted) == 3 * LAYERS and ("layers", 2, "attn", "v") in adapted
  assert type(base.layers[0].attn.q) is nnx.Linear  # the given module is unchanged
  a = model.layers[0].attn.q.lora_a[...]
  assert a.shape == (D, RANK) and model.layers[0].up.lora_b[...].shape == (RANK, 2 * D)
  with pytest.raises(jaxft.ConfigError, match="matches no nnx.Linear.*q_proj|q_proj.*matches"):
    jnnx.lora(base, "q_proj")


def test_lora_matches_hand_written_lora_in_plain_optax(base, lora_run):
  model, _, losses = lora_run
  ref_losses, _ = plain_optax_losses(hand_lora(base, model), STEPS)
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  assert losses[-1] < losses[0]


def test_merged_module_is_base_plus_adapter(base, lora_run):
  _, trainer, _ = lora_run
  trained = trainer.model()
  merged = jnnx.merge(trained)
  assert type(merged) is TinyLM and type(merged.layers[3].attn.q) is nnx.Linear
  lin = trained.layers[1].attn.v
  want = base.layers[1].attn.v.kernel[...] + ALPHA / RANK * lin.lora_a[...] @ lin.lora_b[...]
  np.testing.assert_allclose(merged.layers[1].attn.v.kernel[...], want, rtol=1e-6, atol=1e-7)
  out = logits(merged, TOKENS[0])
  np.testing.assert_allclose(out, logits(trained, TOKENS[0]), rtol=1e-5, atol=1e-5)
  assert not np.allclose(out, logits(base, TOKENS[0]), atol=1e-3)  # it did train


def test_resume_gives_the_straight_run(base, lora_run, tmp_path):
  straight = lora_run[2]
  make = lambda: jnnx.lora(base, TARGETS, rank=RANK, alpha=ALPHA)
  _, first = run(make(), 4, workdir=str(tmp_path), checkpoint_every=3)  # stopped after step 4
  trainer, rest = run(make(), STEPS, workdir=str(tmp_path), checkpoint_every=3)
  assert len(rest) == STEPS - 3  # resumed from the checkpoint of step 3
  np.testing.assert_allclose(first + rest, straight[:4] + straight[3:], rtol=1e-6)
  other = jnnx.lora(TinyLM(nnx.Rngs(1)), TARGETS, rank=RANK, alpha=ALPHA)
  with pytest.raises(jaxft.CheckpointError, match="another frozen base"):
    jnnx.Trainer(other, loss_fn, optax.adamw(1e-2), workdir=str(tmp_path))


def test_qlora_nf4_base_trains_at_nf4_bytes(base):
  model = jnnx.lora(base, TARGETS, rank=RANK, alpha=ALPHA, quant_kind="nf4")
  kernels = [m.kernel.get_value() for _, m in nnx.iter_modules(model)
             if isinstance(m, jnnx.AdaptedLinear)]
  assert len(kernels) == 6 * LAYERS + 1 and all(quant.is_quantized(k) for k in kernels)
  # Per kernel [in, out]: 4-bit codes, one 8-bit absmax per 64 rows of a column (double
  # quantization), a float32 absmax per 256 of those along out, and one float32 mean: 4.138 bits
  # per weight at these shapes (4.127 when out >= 256), against 32 for float32.
  want = sum(i * o // 2 + i // 64 * o + 4 * (i // 64) * -(-o // 256) + 4
             for i, o in (k.shape for k in kernels))
  assert sum(k.nbytes for k in kernels) == want
  assert 4.12 < 8 * want / sum(k.size for k in kernels) < 4.14
  float_bytes = 4 * sum(x.size for x in jax.tree.leaves(nnx.state(base)))
  _, frozen = nnx.split(model, nnx.LoRAParam, ...)[1:]
  frozen_bytes = sum(x.nbytes for x in jax.tree.leaves(frozen))
  assert frozen_bytes < 0.2 * float_bytes
  trainer, losses = run(model, STEPS)
  assert losses[-1] < losses[0] - 0.05
  trained = trainer.model()
  merged = jnnx.merge(trained)
  assert type(merged.layers[0].attn.k) is nnx.Linear  # frozen NF4 layers come back dequantized
  x = jax.random.normal(jax.random.key(1), (4, D))
  for name in ("k", "q"):  # a frozen NF4 layer, and one with a trained adapter
    np.testing.assert_allclose(logits(getattr(merged.layers[1].attn, name), x),
                               logits(getattr(trained.layers[1].attn, name), x), rtol=1e-5,
                               atol=1e-5)


def test_dora_on_nf4_starts_at_the_base_and_merges(base):
  # DoRA trains through the same step as LoRA (above); here, on one layer: its magnitudes start
  # at the column norms of the dequantized NF4 base (output = the base layer's), and merging
  # keeps the output of a changed adapter.
  model = jnnx.lora(base, "down", rank=RANK, alpha=ALPHA, method="dora", quant_kind="nf4",
                    quant_targets="down")
  layer = model.layers[2].down
  x = jax.random.normal(jax.random.key(2), (4, 2 * D))
  w = quant.dequantize(layer.kernel.get_value())
  np.testing.assert_allclose(logits(layer, x), x @ w + layer.bias[...], rtol=1e-5, atol=1e-5)
  layer.lora_b[...] = jnp.full((RANK, D), 0.02)
  layer.magnitude[...] = layer.magnitude[...] * 1.1
  out = logits(layer, x)
  assert not np.allclose(out, x @ w + layer.bias[...], atol=1e-3)
  merged = layer.merged()
  assert type(merged) is nnx.Linear
  np.testing.assert_allclose(logits(merged, x), out, rtol=1e-5, atol=1e-5)


def test_linen_params_dict_trains_and_merges():
  import flax.linen as nn

  class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(8, name="out")(nn.gelu(nn.Dense(D, name="hidden")(x)))

  module, x = MLP(), jax.random.normal(jax.random.key(3), (8, D))
  y = jax.random.normal(jax.random.key(4), (8, 8))
  params = module.init(jax.random.key(0), x)
  model = jnnx.LinenLoRA(module, params, "hidden,out", rank=RANK, alpha=ALPHA)
  assert model.adapters["params/hidden/lora_a"][...].shape == (D, RANK)
  np.testing.assert_allclose(logits(model, x), module.apply(params, x), rtol=1e-6)  # B = 0
  mse = lambda m, batch: jnp.mean((m(batch[0]) - batch[1]) ** 2)
  trainer, losses = jnnx.Trainer(model, mse, optax.adamw(1e-2)), []
  for _ in range(4):
    losses.append(trainer.step((x, y))["loss"])
  assert losses[-1] < losses[0]
  trained = trainer.model()
  merged = trained.merged_params()
  assert jax.tree.map(jnp.shape, merged) == jax.tree.map(jnp.shape, params)
  np.testing.assert_allclose(module.apply(merged, x), logits(trained, x), rtol=1e-5, atol=1e-6)


def test_sharding_rules_and_inference():
  mesh = {"data": 1, "fsdp": 4, "tensor": 2}
  assert jnnx.partition_spec("layers/0/up/kernel", (64, 128), mesh) == P(None, "fsdp")
  assert jnnx.partition_spec("head/bias", (6,), mesh) == P()
  rules = [(r"attn/\w/kernel$", P(None, "tensor"))]
  assert jnnx.partition_spec("layers/1/attn/q/kernel", (64, 64), mesh, rules) == P(None, "tensor")
  with pytest.raises(jaxft.ConfigError, match="sharding rule.*not divisible"):
    jnnx.partition_spec("layers/1/attn/q/kernel", (64, 7), mesh, rules)
  with pytest.raises(jaxft.ConfigError, match="names mesh axis 'model'"):
    jnnx.partition_spec("x/kernel", (8, 8), mesh, [("kernel", P("model"))])


def test_example_script_trains(tmp_path):
  path = os.path.join(os.path.dirname(os.path.dirname(__file__)), "examples", "nnx_lora.py")
  spec = importlib.util.spec_from_file_location("nnx_lora_example", path)
  example = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(example)
  out = example.main(["--steps=4", "--quant=nf4", "--layers=1", f"--workdir={tmp_path}"])
  assert out["losses"][-1] < out["losses"][0]
  assert os.path.isdir(tmp_path / "checkpoints" / "4")
