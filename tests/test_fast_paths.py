"""The hand-written backward passes (linear, attention, RMSNorm, SwiGLU, chunked cross-entropy)
against plain autodiff, the attention implementations and remat policies against each other, and the
bf16 step keeping the frozen base in bf16 (no float32 copy of the stacked weights)."""

import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.ad_checkpoint import checkpoint_name

from conftest import make_config
from jaxft import optim, peft, quant
from jaxft.models import llama, ops
from jaxft.models.loss import token_losses
from jaxft.models.config import ModelConfig
from jaxft.step import make_steps

CFG = ModelConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=8, initializer_range=0.1)
F32 = jnp.float32


def _close(a, b, rtol=2e-5):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    x, y = np.asarray(x, np.float32), np.asarray(y, np.float32)
    np.testing.assert_allclose(x, y, rtol=rtol, atol=rtol * float(np.abs(y).max()))


def _keys(n):
  return jax.random.split(jax.random.key(0), n)


@pytest.mark.slow
def test_linear_backward_matches_autodiff_and_frozen_kernels_get_none():
  k = _keys(3)
  x, w = jax.random.normal(k[0], (3, 5, 16)), jax.random.normal(k[1], (16, 24))
  ct = jax.random.normal(k[2], (3, 5, 24))
  ours = jax.grad(lambda x, w: jnp.sum(ops.matmul(x, w, F32) * ct), (0, 1))(x, w)
  ref = jax.grad(lambda x, w: jnp.sum((x @ w) * ct), (0, 1))(x, w)
  _close(ours, ref)
  # A 16-bit kernel bit-cast to integers (how the step scans the frozen base) and a quantized
  # kernel compute what their float weights compute.
  w16 = w.astype(jnp.bfloat16)
  packed = ops.pack_16bit(w16)
  assert packed.dtype == jnp.uint16
  dx = lambda w: jax.grad(lambda x: jnp.sum(ops.matmul(x, w, jnp.bfloat16).astype(F32) * ct))(x)
  np.testing.assert_array_equal(np.asarray(dx(packed), np.float32), np.asarray(dx(w16), np.float32))
  q = quant.quantize(w, "int8")
  _close(dx(q), dx(quant.dequantize(q, jnp.bfloat16)), rtol=1e-2)


def _reference_attention(q, k, v, mask):
  B, T, H, hd = q.shape
  g = H // k.shape[2]
  k, v = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
  s = jnp.einsum("bthd,bshd->bhts", q, k) / np.sqrt(hd)
  s = jnp.where(mask[:, None], s, -1e30)
  return jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(s, -1), v).reshape(B, T, H * hd)


@pytest.mark.slow
@pytest.mark.parametrize("impl,blocks", [("einsum", 1), ("einsum", 3), ("xla", 1)])
def test_attention_matches_reference_with_gqa_packing_and_window(impl, blocks):
  # blocks=3: three query blocks, each against the keys up to its end (causal skipping).
  k = _keys(4)
  B, T, H, K, hd = 2, 9, 4, 2, 8
  q, kk, v = (jax.random.normal(k[i], (B, T, n, hd)) for i, n in enumerate((H, K, K)))
  ct = jax.random.normal(k[3], (B, T, H * hd))
  idx = jnp.broadcast_to(jnp.arange(T), (B, T))
  seg = jnp.array([[1] * 4 + [2] * 5, [1] * 9])  # row 0 packs two examples
  mask = llama.attention_mask(CFG.replace(sliding_window=3), idx, seg, idx, seg)
  ours = jax.value_and_grad(
      lambda *a: jnp.sum(llama._attend(*a, mask, F32, impl, blocks) * ct), (0, 1, 2))(q, kk, v)
  ref = jax.value_and_grad(
      lambda *a: jnp.sum(_reference_attention(*a, mask) * ct), (0, 1, 2))(q, kk, v)
  _close(ours, ref)


@pytest.mark.slow
def test_rms_norm_and_swiglu_backward_match_autodiff():
  k = _keys(4)
  x, s = jax.random.normal(k[0], (3, 5, 16)), jax.random.normal(k[1], (16,))
  u, ct = jax.random.normal(k[2], (3, 5, 16)), jax.random.normal(k[3], (3, 5, 16))

  def norm_ref(x, s):
    return x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-5) * s

  _close(jax.grad(lambda x, s: jnp.sum(ops.rms_norm(x, s, 1e-5) * ct), (0, 1))(x, s),
         jax.grad(lambda x, s: jnp.sum(norm_ref(x, s) * ct), (0, 1))(x, s))
  _close(jax.grad(lambda a, b: jnp.sum(ops.swiglu(a, b) * ct), (0, 1))(x, u),
         jax.grad(lambda a, b: jnp.sum(jax.nn.silu(a) * b * ct), (0, 1))(x, u))


@pytest.mark.slow
@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("chunks", [(8192, 4096, 1 << 30), (4, 40, 1 << 30), (6, 20, 0)])
def test_chunked_cross_entropy_equals_full_logits(tied, chunks, monkeypatch):
  # (token chunk, vocabulary chunk, bytes kept for the backward): one chunk; a padded 97-word
  # vocabulary in 3 chunks over 4 token chunks; logits recomputed in the backward.
  from jaxft.models import loss
  monkeypatch.setattr(loss, "LOSS_SAVE_BYTES", chunks[2])
  cfg = CFG.replace(tie_embeddings=tied)
  k = _keys(4)
  params = {"embed": {"embedding": jax.random.normal(k[0], (97, 16))},
            "lm_head": {"kernel": jax.random.normal(k[1], (16, 97))}}
  h, t = jax.random.normal(k[2], (3, 5, 16)), jax.random.randint(k[3], (3, 5), 0, 97)
  wts = jnp.arange(15.0).reshape(3, 5)

  def ref(p, h):
    w = p["embed"]["embedding"].T if tied else p["lm_head"]["kernel"]
    lg = h @ w
    return jax.nn.logsumexp(lg, -1) - jnp.take_along_axis(lg, t[..., None], -1)[..., 0]

  ours = jax.value_and_grad(
      lambda p, h: jnp.sum(token_losses(cfg, p, h, t, chunks[0], chunks[1]) * wts), (0, 1))
  theirs = jax.value_and_grad(lambda p, h: jnp.sum(ref(p, h) * wts), (0, 1))
  _close(ours(params, h), theirs(params, h))
  # A head that is not trained (every PEFT method): the forward forms d loss / d h itself.
  fixed = jax.value_and_grad(lambda h: jnp.sum(
      token_losses(cfg, params, h, t, chunks[0], chunks[1], head_trained=False) * wts))
  _close(fixed(h), jax.value_and_grad(lambda h: jnp.sum(ref(params, h) * wts))(h))
  # In bf16 the gradient keeps bf16 precision against the float32 one.
  h16 = h.astype(jnp.bfloat16)
  bf = jax.grad(lambda h: jnp.sum(token_losses(cfg.replace(dtype="bfloat16"), params, h, t,
                                               chunks[0], chunks[1], head_trained=False) * wts))
  assert bf(h16).dtype == jnp.bfloat16
  _close(bf(h16), jax.grad(lambda h: jnp.sum(ref(params, h) * wts))(h16.astype(F32)), rtol=3e-2)


def _lora_step(cfg):
  pc = ml_collections.ConfigDict({"method": "lora", "targets": "q_proj,v_proj", "init_from": "",
                                  "lora": {"rank": 4, "alpha": 8.0, "dropout": 0.0,
                                           "rslora": False}})
  oc = ml_collections.ConfigDict(dict(lr=1e-2, schedule="constant", warmup_steps=0,
                                      min_lr_ratio=0.1, weight_decay=0.0, b1=0.9, b2=0.999,
                                      eps=1e-8, clip_norm=0.0, accum_steps=1))
  method = peft.from_config(pc, cfg)
  trainable, frozen = method.split(llama.init_params(cfg, jax.random.key(0)),
                                   method.init(cfg, jax.random.key(1)))
  trainable = jax.tree.map(lambda x: x + 0.01, trainable)  # B != 0: gradients reach A too
  tx, sched = optim.make(oc, 10)
  steps = make_steps(cfg, method, tx, sched, skip_nonfinite=False, dropout=False)
  state = {"step": jnp.zeros((), jnp.int32), "trainable": trainable,
           "opt_state": tx.init(trainable), "rng": jax.random.key(0),
           "skipped": jnp.zeros((), jnp.int32)}
  T = 12
  ids = jax.random.randint(jax.random.key(2), (1, 2, T + 1), 0, cfg.vocab_size)
  batch = {"inputs": ids[..., :-1], "targets": ids[..., 1:], "weights": jnp.ones((1, 2, T)),
           "positions": jnp.broadcast_to(jnp.arange(T), (1, 2, T)),
           "segment_ids": jnp.ones((1, 2, T), jnp.int32)}
  return steps, state, batch, frozen


@pytest.mark.slow
def test_remat_policies_and_attention_implementations_agree():
  results = {}
  for remat, attention in (("none", "einsum"), ("full", "einsum"), ("dots", "einsum"),
                           ("none", "xla")):
    steps, state, batch, frozen = _lora_step(CFG.replace(remat=remat, attention=attention))
    new, m = jax.jit(steps.train)(state, batch, frozen)
    results[(remat, attention)] = (float(m["loss"]), float(m["grad_norm"]), new["trainable"])
  base = results[("none", "einsum")]
  for key, (loss, gnorm, tr) in results.items():
    np.testing.assert_allclose(loss, base[0], rtol=1e-5, err_msg=str(key))
    np.testing.assert_allclose(gnorm, base[1], rtol=1e-5, err_msg=str(key))
    _close(tr, base[2], rtol=1e-4)


@pytest.mark.slow
def test_bf16_step_never_makes_a_float32_copy_of_the_frozen_base():
  # XLA's CPU backend upcasts bf16 dynamic-slices, and a float32 cotangent upcasts the weight of
  # every backward dot: either would put a float32 [layers, in, out] array in the step.
  cfg = CFG.replace(dtype="bfloat16", param_dtype="bfloat16", intermediate_size=40)
  steps, state, batch, frozen = _lora_step(cfg)
  hlo = jax.jit(steps.train).lower(state, batch, frozen).compile().as_text()
  L, D, F = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size
  for shape in (f"{L},{D},{F}", f"{L},{F},{D}"):
    assert not re.search(rf"f32\[{shape}\]", hlo), f"float32 copy of a stacked [{shape}] kernel"
  _, m = jax.jit(steps.train)(state, batch, frozen)
  assert np.isfinite(float(m["loss"]))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state["trainable"]))  # master weights


@pytest.mark.slow
@pytest.mark.parametrize("tied", [False, True])
def test_frozen_base_packed_once_in_place_gives_the_same_step(tied):
  # trainer.prepare bit-casts the frozen 16-bit kernels and tables to integers once, in place, so
  # the step neither copies them per step nor holds a second copy; the step computes the same.
  from jaxft import session, sharding, trainer
  from jaxft.models.ops import pack_frozen
  cfg = CFG.replace(dtype="bfloat16", param_dtype="bfloat16", intermediate_size=40,
                    tie_embeddings=tied)
  steps, state, batch, frozen = _lora_step(cfg)
  packed = pack_frozen(frozen)
  kernels = lambda t: [t["layers"][n]["kernel"] for n in ("q_proj", "down_proj")] + [
      t["embed"]["embedding"]] + ([] if tied else [t["lm_head"]["kernel"]])
  assert all(k.dtype == jnp.uint16 for k in kernels(packed))
  step = jax.jit(steps.train)
  hlo = step.lower(state, batch, packed).compile().as_text()
  L, D, F = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size
  assert not re.search(rf"bf16\[{L},{D},{F}\]", hlo), "the step re-made a bf16 stacked kernel"
  (a, ma), (b, mb) = step(state, batch, frozen), step(state, batch, packed)
  assert float(ma["loss"]) == float(mb["loss"])
  _close(a["trainable"], b["trainable"], rtol=1e-6)

  config = make_config("base")
  config.model.dtype = config.model.param_dtype = "bfloat16"
  config.peft.method, config.peft.targets = "lora", "q_proj,v_proj"
  method = peft.from_config(config.peft, cfg)
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.rules_from_config(config.mesh)
  base = sharding.place(llama.init_params(cfg, jax.random.key(0)),
                        sharding.tree_shardings(llama.param_specs(cfg), mesh, rules), "base")
  before = [k.unsafe_buffer_pointer() for k in kernels(base)]
  model = session.Model(cfg, method, mesh, base,
                        sharding.tree_shardings(llama.param_specs(cfg), mesh, rules),
                        sharding.tree_shardings(method.trainable_specs(cfg), mesh, rules), "t")
  run = trainer.prepare(config, model)
  assert all(k.dtype == jnp.uint16 for k in kernels(run.frozen))
  assert [k.unsafe_buffer_pointer() for k in kernels(run.frozen)] == before  # no copy made
  _, m = run.train_step(run.state, sharding.put_batch(jax.tree.map(lambda x: x[0], batch), mesh, 1),
                        run.frozen)
  assert np.isfinite(float(m["loss"]))


@pytest.mark.slow
def test_bf16_full_fine_tuning_keeps_the_state_dtypes():
  # Float32 gradients must not promote bf16 weights or AdamW moments: the state that comes out
  # must match the one that went in, or the second step recompiles and the moments double.
  cfg = CFG.replace(dtype="bfloat16", param_dtype="bfloat16")
  oc = ml_collections.ConfigDict(dict(lr=1e-2, schedule="constant", warmup_steps=0,
                                      min_lr_ratio=0.1, weight_decay=0.0, b1=0.9, b2=0.999,
                                      eps=1e-8, clip_norm=1.0, accum_steps=1))
  params = llama.init_params(cfg, jax.random.key(0))
  tx, sched = optim.make(oc, 10)
  steps = make_steps(cfg, peft.Method(), tx, sched, skip_nonfinite=False, dropout=False)
  state = {"step": jnp.zeros((), jnp.int32), "trainable": params, "opt_state": tx.init(params),
           "rng": jax.random.key(0), "skipped": jnp.zeros((), jnp.int32)}
  _, _, batch, _ = _lora_step(CFG)
  new, _ = jax.jit(steps.train)(state, batch, {})
  dtypes = lambda t: [x.dtype for x in jax.tree.leaves(t)]
  assert dtypes(new["trainable"]) == dtypes(state["trainable"])
  assert dtypes(new["opt_state"]) == dtypes(state["opt_state"])


def test_remat_offload_gives_the_gradients_of_full():
  """model.remat=offload (layer inputs saved to host memory) recomputes what full does."""

  def body(x, w):
    return jnp.tanh(checkpoint_name(x, "layer_input") @ w), None

  def grads(remat):
    f = llama._remat(CFG.replace(remat=remat), body)
    return jax.jit(jax.grad(lambda ws, x: jax.lax.scan(f, x, ws)[0].sum()))(
        0.1 * jnp.ones((3, 8, 8)), jnp.ones((4, 8)))

  np.testing.assert_allclose(grads("offload"), grads("full"), rtol=1e-6)


def test_learning_rate_warmup_and_steps_are_arguments_of_the_compiled_step():
  """Runs that differ only in optim.lr, optim.warmup_steps, optim.schedule or train.steps lower
  to the same program (an lr sweep, or a resume with more steps, compiles once; the persistent
  compilation cache serves the rest), and the schedule it follows is optax's."""
  import optax
  from jaxft import session, sharding, trainer

  def lowered(**over):
    config = make_config("quickstart", **{"model.preset": "tiny", **over})
    model = session.load_model(config, sharding.make_mesh(config.mesh))
    run = trainer.prepare(config, model)
    batch = run.steps.objective.abstract_batch(config)
    return run.train_step.lower(run.state, batch, run.frozen).as_text()

  a = lowered(**{"optim.lr": 1e-3, "train.steps": 3})
  assert a == lowered(**{"optim.lr": 3e-2, "train.steps": 40, "optim.warmup_steps": 7,
                         "optim.schedule": "constant"})
  assert a != lowered(**{"optim.lr": 1e-3, "train.steps": 3, "optim.weight_decay": 0.5})
  for kind, warm, steps, ratio in (("cosine", 10, 100, 0.1), ("cosine", 0, 7, 0.0),
                                   ("constant", 5, 60, 0.1)):
    c = ml_collections.ConfigDict(dict(lr=3e-3, warmup_steps=warm, schedule=kind,
                                       min_lr_ratio=ratio))
    ours = [float(optim.schedule(c, steps)(i)) for i in range(steps + 3)]
    ref = (optax.warmup_cosine_decay_schedule(0.0 if warm else 3e-3, 3e-3, warm, steps, 3e-3 * ratio)
           if kind == "cosine" else
           optax.join_schedules([optax.linear_schedule(0.0, 3e-3, warm),
                                 optax.constant_schedule(3e-3)], [warm]))
    np.testing.assert_allclose(ours, [float(ref(i)) for i in range(steps + 3)], rtol=1e-6,
                               atol=1e-12)
