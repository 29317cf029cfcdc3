"""Quantized frozen bases: NF4 against bitsandbytes, double quantization, int8, storage cost, the
pytree node under jit/scan/Orbax/sharding, LoRA training on a quantized base, and the memory of
initialising a quantized model."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import ROOT, make_config
from jaxft import quant

torch = pytest.importorskip("torch")
bnbf = pytest.importorskip("bitsandbytes.functional")


def matrix(dist: str, shape, seed=0) -> np.ndarray:
  rng = np.random.default_rng(seed)
  if dist == "normal":
    return (0.02 * rng.standard_normal(shape)).astype(np.float32)
  return (0.02 * rng.standard_t(2.0, shape)).astype(np.float32)  # heavy tails: outlier blocks


def bnb_nf4(kernel: np.ndarray, compress: bool = False):
  """bitsandbytes on the torch weight of our kernel [in, out]: W = kernel.T, [out, in]."""
  w = torch.from_numpy(np.ascontiguousarray(kernel.T))
  packed, state = bnbf.quantize_4bit(w, quant_type="nf4", blocksize=64, compress_statistics=compress)
  return packed, state, bnbf.dequantize_4bit(packed, state).numpy().T


def bnb_codes(packed: torch.Tensor, n_in: int, n_out: int) -> np.ndarray:
  """bitsandbytes' packed bytes (flattened [out, in], first value high nibble) -> codes [in, out]."""
  b = packed.numpy().reshape(-1)
  return np.stack([b >> 4, b & 0xF], -1).reshape(n_out, n_in).T


@pytest.mark.parametrize("dist", ["normal", "student_t"])
def test_nf4_codes_and_values_equal_bitsandbytes(dist):
  w = matrix(dist, (2, 256, 192))  # a stack of two layers [L, in, out]
  q = jax.jit(lambda x: quant.quantize(x, "nf4", double_quant=False))(jnp.asarray(w))
  codes = np.asarray(q.unpacked_codes())
  deq = np.asarray(quant.dequantize(q, jnp.float32))
  for layer in range(2):  # each layer as bitsandbytes quantizes that layer's weight
    packed, _, ref = bnb_nf4(w[layer])
    np.testing.assert_array_equal(codes[layer], bnb_codes(packed, 256, 192))
    # Same bytes, too: bitsandbytes' packing is ours, transposed.
    np.testing.assert_array_equal(np.asarray(q.codes[layer]), packed.numpy().reshape(192, 128).T)
    np.testing.assert_allclose(deq[layer], ref, rtol=1e-6, atol=0)


def test_dynamic_code_is_bitsandbytes():
  np.testing.assert_allclose(quant.DYNAMIC_CODE, bnbf.create_dynamic_map().numpy(), rtol=0, atol=1e-7)


@pytest.mark.slow
@pytest.mark.parametrize("dist", ["normal", "student_t"])
def test_double_quantization_error_within_qlora_bound(dist):
  """QLoRA's double quantization stores each block absmax c as 8-bit dynamic code * c2 + mean,
  c2 = max |c - mean| over 256 blocks; so |c_dq - c| <= c2 * (half the widest step of the code).
  The weights then move by at most |code| * |c_dq - c| <= |c_dq - c| beyond NF4's own error; and
  the total error equals bitsandbytes' compress_statistics=True to within a percent."""
  w = matrix(dist, (512, 256), seed=1)
  q = quant.quantize(jnp.asarray(w), "nf4")
  plain = quant.quantize(jnp.asarray(w), "nf4", double_quant=False)
  absmax = np.asarray(plain.scale)  # [in/64, out]
  absmax_dq = np.asarray(quant.materialize(q.scale, jnp.float32))
  half_step = float(np.max(np.diff(quant.DYNAMIC_CODE))) / 2
  c = absmax - absmax.mean()
  c2 = np.repeat(np.abs(c).reshape(absmax.shape[0], -1, 256).max(-1), 256, axis=-1)
  assert np.all(np.abs(absmax_dq - absmax) <= c2 * half_step + 1e-7)
  # The first-level codes are the same with and without double quantization.
  np.testing.assert_array_equal(np.asarray(q.codes), np.asarray(plain.codes))
  deq, deq_plain = np.asarray(q.dequantize()), np.asarray(plain.dequantize())
  assert np.all(np.abs(deq - deq_plain) <= np.repeat(np.abs(absmax_dq - absmax), 64, 0) + 1e-7)
  _, _, ref = bnb_nf4(w, compress=True)
  ours_err, bnb_err = np.abs(deq - w).mean(), np.abs(ref - w).mean()
  assert abs(ours_err - bnb_err) <= 0.01 * bnb_err, (ours_err, bnb_err)
  # Double quantization costs little accuracy against plain NF4 (QLoRA: no degradation); heavy
  # tails widen the 256-block ranges, which costs about 1.5% here.
  assert ours_err <= 1.03 * np.abs(deq_plain - w).mean()


@pytest.mark.parametrize("kind,limit", [("nf4", 4.13), ("int8", 8.1)])
def test_bits_per_param_from_stored_bytes(kind, limit):
  w = jax.random.normal(jax.random.key(0), (4096, 4096), jnp.float32)
  q = jax.jit(lambda x: quant.quantize(x, kind))(w)
  stored = sum(x.nbytes for x in jax.tree.leaves(q))  # the arrays a device holds, nothing else
  bits = 8 * stored / w.size
  assert bits <= limit, bits
  assert quant.bits_per_param(q) == bits
  assert q.shape == w.shape and q.size == w.size


def test_int8_per_channel_error_and_zero_columns():
  w = matrix("student_t", (96, 40))
  w[:, 3] = 0.0
  q = quant.quantize(jnp.asarray(w), "int8")
  assert q.codes.dtype == jnp.int8 and q.scale.shape == (40,)
  scale = np.abs(w).max(0) / 127
  err = np.abs(np.asarray(q.dequantize(jnp.float32)) - w)
  assert np.all(err <= scale / 2 * (1 + 1e-5) + 1e-12)
  assert np.all(np.asarray(q.dequantize())[:, 3] == 0)


@pytest.mark.parametrize("shape", [(352, 48), (97, 40)])
def test_nf4_kernels_not_a_multiple_of_the_block(shape):
  """The quickstart's down_proj has in=352 (5.5 blocks); odd `in` needs a padded nibble."""
  w = matrix("normal", shape)
  q = quant.quantize(jnp.asarray(w), "nf4", double_quant=False)
  assert q.shape == shape and q.dequantize().shape == shape
  n_blocks = -(-shape[0] // 64)
  assert q.scale.shape == (n_blocks, shape[1])
  absmax = np.repeat(np.asarray(q.scale), 64, 0)[:shape[0]]
  half_gap = np.max(np.diff(quant.NF4_CODE)) / 2
  assert np.all(np.abs(np.asarray(q.dequantize()) - w) <= absmax * half_gap * (1 + 1e-6))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_node_passes_through_jit_scan_and_per_layer_stacking(kind):
  w = jnp.asarray(matrix("normal", (3, 128, 64)))
  q = jax.jit(lambda x: quant.quantize(x, kind))(w)
  # Every child keeps the leading layer axis; aux data holds no shape, so a layer slice has the
  # same tree structure as a layer quantized on its own.
  assert all(x.shape[0] == 3 for x in jax.tree.leaves(q))
  one = quant.quantize(w[0], kind)
  assert jax.tree.structure(one) == jax.tree.structure(jax.tree.map(lambda x: x[0], q))
  # A loader quantizing layer by layer and stacking gets the same arrays bitwise.
  stacked = quant.stack([quant.quantize(w[i], kind) for i in range(3)])
  jax.tree.map(np.testing.assert_array_equal, stacked, q)
  # lax.scan slices each child along axis 0 and the body sees the quantized layer.
  x = jnp.ones((2, 128))

  def body(h, layer):
    return h, h @ quant.materialize(layer, jnp.float32)

  _, ys = jax.jit(lambda q: jax.lax.scan(body, x, q))(q)
  full = q.dequantize(jnp.float32)
  for i in range(3):
    np.testing.assert_allclose(ys[i], x @ full[i], rtol=1e-5, atol=1e-6)
  assert quant.dequantize(q, jnp.bfloat16).dtype == jnp.bfloat16
  # Donation: a loader writes layer slices into a donated stack (no second copy of the stack).
  write = jax.jit(lambda s, new: jax.tree.map(lambda a, b: a.at[0].set(b), s, new),
                  donate_argnums=0)
  q2 = write(q, quant.quantize(w[2], kind))
  assert all(x.is_deleted() for x in jax.tree.leaves(q))
  np.testing.assert_array_equal(q2.dequantize()[0], full[2])


@pytest.mark.slow
def test_orbax_saves_and_restores_a_quantized_tree(tmp_path):
  import orbax.checkpoint as ocp
  tree = {"nf4": quant.quantize(jnp.asarray(matrix("normal", (2, 128, 64))), "nf4"),
          "int8": quant.quantize(jnp.asarray(matrix("normal", (2, 64, 32))), "int8")}
  ckpt = ocp.StandardCheckpointer()
  ckpt.save(str(tmp_path / "q"), tree)
  ckpt.wait_until_finished()
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
  back = ckpt.restore(str(tmp_path / "q"), abstract)
  assert isinstance(back["nf4"], quant.NF4Tensor) and isinstance(back["int8"], quant.Int8Tensor)
  jax.tree.map(np.testing.assert_array_equal, back, tree)


@pytest.mark.slow
def test_lora_merge_uses_the_dequantized_float32_base():
  from jaxft.peft import LoRA
  w = jnp.asarray(matrix("normal", (2, 64, 32)))
  q = quant.quantize(w, "nf4")
  a = jnp.asarray(matrix("normal", (2, 64, 4), seed=2))
  b = jnp.asarray(matrix("normal", (2, 4, 32), seed=3))
  method = LoRA(targets=("q_proj",), rank=4, alpha=8.0)
  cfg = type("C", (), {"param_dtype": "float32"})()
  merged = method.merge(cfg, {"layers": {"q_proj": {"kernel": q, "lora_a": a, "lora_b": b}}})
  want = q.dequantize(jnp.float32) + 2.0 * jnp.einsum("lir,lro->lio", a, b)
  np.testing.assert_array_equal(merged["layers"]["q_proj"]["kernel"], want)


def tiny_config(kind: str, steps: int = 20):
  c = make_config("quickstart")
  c.model.preset = "tiny"
  c.model.quant = kind
  c.data.batch_size = 4  # small batches: the 32000-word output layer dominates a tiny model
  c.data.max_len = 64
  c.optim.lr = 1e-2
  c.optim.warmup_steps = 0
  c.optim.schedule = "constant"
  c.train.steps = steps
  c.train.progress = False
  return c


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_lora_trains_on_a_quantized_base_that_never_changes(kind, tmp_path):
  from jaxft import session, sharding, trainer
  from jaxft.data import pipeline
  from jaxft.peft.loss import loss_sum
  config = tiny_config(kind)
  model = session.load_model(config)
  kernels = {n: model.base["layers"][n]["kernel"] for n in ("q_proj", "down_proj")}
  assert all(isinstance(k, quant.QTensor) and k.kind == kind for k in kernels.values())
  assert not quant.is_quantized(model.base["embed"]["embedding"])
  assert not quant.is_quantized(model.base["layers"]["attn_norm"]["scale"])
  prep = trainer.prepare(config, model)
  before = jax.tree.map(np.array, prep.frozen)  # host copies
  enc = session.encoder(config, str(tmp_path))
  ds = pipeline.load_examples(config.data.train, enc, "auto", config.data.max_len,
                              model.cfg.vocab_size)
  stream = pipeline.TrainStream(ds.examples, max_len=config.data.max_len, packing=True,
                                rows_per_batch=config.data.batch_size, seed=0, shuffle=False)
  batch = sharding.put_batch(stream.batch_at(pipeline.Position())[0], model.mesh, 1)
  # The decoder on the quantized base computes what it computes on the dequantized float base.
  mb = {k: v[0] for k, v in batch.items()}
  both = jax.jit(lambda tr, fz: [loss_sum(model.cfg, model.method, tr, f, mb, None)[0]
                                 for f in (fz, quant.dequantize_tree(fz))])
  l_q, l_f = both(prep.state["trainable"], prep.frozen)
  np.testing.assert_allclose(l_q, l_f, rtol=1e-5)
  state, losses = prep.state, []
  for _ in range(config.train.steps):
    state, m = prep.train_step(state, batch, prep.frozen)
    losses.append(float(m["loss"]))
  assert losses[-1] <= 0.6 * losses[0], losses  # gradients reached the LoRA leaves
  lora_b = state["trainable"]["layers"]["q_proj"]["lora_b"]
  assert float(jnp.abs(lora_b).max()) > 0
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, prep.frozen), before)


@pytest.mark.slow
def test_quantized_run_checkpoints_and_restores(tmp_path):
  """A QLoRA run saves only the LoRA leaves; restore_trained rebuilds the same quantized base."""
  from jaxft import session, trainer
  config = tiny_config("nf4", steps=2)
  config.data.eval = ""
  workdir = str(tmp_path / "w")
  trainer.train(config, workdir)
  t = session.restore_trained(workdir)
  assert t.step == 2
  fresh = session.load_model(config).base
  got = t.frozen["layers"]["gate_proj"]["kernel"]
  assert isinstance(got, quant.NF4Tensor)
  jax.tree.map(np.testing.assert_array_equal, t.frozen, fresh)
  assert float(jnp.abs(t.trainable["layers"]["v_proj"]["lora_b"]).max()) > 0


_MEMORY = r"""
import json, math, sys
import jax
from jaxft import configlib, session
from jaxft.models import config as mc, llama

def kib(key):
  for line in open("/proc/self/status"):
    if line.startswith(key):
      return int(line.split()[1]) * 1024

mk = lambda L, D, F: mc.ModelConfig(vocab_size=256, hidden_size=D, intermediate_size=F, num_layers=L,
                                    num_heads=8, num_kv_heads=8, head_dim=D // 8)
mc.PRESETS["qwarm"], mc.PRESETS["qbig"] = mk(2, 128, 256), mk(16, 768, 1536)
c = configlib.load("base")
c.model.quant = "nf4"
c.model.preset = "qwarm"  # compiles the same code paths, so the allocator and compiler are warm
jax.block_until_ready(session.load_model(c).base)
open("/proc/self/clear_refs", "w").write("5")  # VmHWM := VmRSS
rss0 = kib("VmRSS:")
c.model.preset = "qbig"
base = jax.block_until_ready(session.load_model(c).base)
sizes = [math.prod(s.shape) * 4 for s in jax.tree.leaves(llama.param_specs(mc.PRESETS["qbig"]),
                                                          is_leaf=llama.is_spec)]
print(json.dumps({"peak": kib("VmHWM:") - rss0, "stored": sum(x.nbytes for x in jax.tree.leaves(base)),
                  "float_model": sum(sizes), "float_kernel": max(sizes)}))
"""


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc")
def test_nf4_init_never_holds_more_than_one_float_kernel(tmp_path):
  """model.quant=nf4 on a 362 MiB float model (16 layers, largest kernel 72 MiB): the process's
  peak memory while the base is built stays below the quantized model (48 MiB) + one float kernel
  + 64 MiB (compiler, allocator, one layer's temporaries), far below the float model."""
  script = tmp_path / "mem.py"
  script.write_text(_MEMORY)
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  r = subprocess.run([sys.executable, str(script)], env=env,
                     capture_output=True, text=True, timeout=300, cwd=ROOT)
  assert r.returncode == 0, r.stderr[-3000:]
  m = json.loads(r.stdout.strip().splitlines()[-1])
  bound = m["stored"] + m["float_kernel"] + 64 * 2**20
  assert m["float_model"] > bound + 100 * 2**20  # the test can tell the two apart
  assert m["peak"] < bound, {k: v / 2**20 for k, v in m.items()}


_SHARDED = r"""
import os, json
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8 " + os.environ.get("XLA_FLAGS", "")
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from jaxft import quant
from jax.sharding import Mesh
mesh = Mesh(np.asarray(jax.devices()).reshape(1, 2, 4), ("data", "fsdp", "tensor"))  # as jaxft.sharding
w = jax.random.normal(jax.random.key(0), (2, 256, 1024))
sh = NamedSharding(mesh, P(None, "fsdp", "tensor"))
out = {}
for kind in ("nf4", "int8"):
  q_sh = quant.shardings_for(kind, w.shape, w.dtype, sh)
  q = jax.jit(lambda x: quant.quantize(x, kind), out_shardings=q_sh)(jax.device_put(w, sh))
  deq = jax.jit(lambda q: q.dequantize(), out_shardings=sh)(q)
  single = quant.quantize(np.asarray(w), kind)
  ref = np.asarray(single.dequantize())
  out[kind] = {"specs": [str(x.sharding.spec) for x in jax.tree.leaves(q)],
               "codes_equal": bool(np.array_equal(np.asarray(q.codes), np.asarray(single.codes))),
               "err": float(np.abs(np.asarray(deq) - ref).max() / np.abs(ref).max())}
print(json.dumps(out))
"""


@pytest.mark.slow
def test_children_shard_like_the_kernel_on_8_devices(tmp_path):
  """fsdp on `in` and tensor on `out` carry over to codes and scales, so each device dequantizes
  its own block of the kernel; results equal the single-device ones."""
  script = tmp_path / "sharded.py"
  script.write_text(_SHARDED)
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  r = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True,
                     timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  out = json.loads(r.stdout.strip().splitlines()[-1])
  # nf4: codes [L, in/2, out], block codes [L, in/64, out], their absmax [L, in/64, out/256] (4
  # columns of blocks: tensor=4 divides), offset [L].
  kernel_like = "P(None, 'fsdp', 'tensor')"
  assert out["nf4"]["specs"] == [kernel_like] * 3 + ["P(None,)"], out
  assert out["int8"]["specs"] == [kernel_like, "P(None, 'tensor')"], out
  for kind in ("nf4", "int8"):  # the sharded mean of the block scales may round differently
    assert out[kind]["codes_equal"] and out[kind]["err"] < 1e-6, out
