"""Long rows: the tiled MLP (model.mlp_tile) against the whole MLP, and context parallelism
(mesh.context) on 8 forced CPU devices against one device (tests/long_context_helper.py, in a
subprocess started first so that it runs beside the in-process tests)."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractMesh

from conftest import ROOT
from jaxft import sharding
from jaxft.errors import ConfigError
from jaxft.models import config as mc
from jaxft.models import llama, long_context
from jaxft.models.loss import token_losses
from jaxft.peft.base import Method

RTOL = 1e-5


@pytest.fixture(scope="module")
def context_runs(tmp_path_factory):
  """The helper's {"METHOD:MESH": losses}, started when the first test of the module asks."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "tests", "long_context_helper.py")],
                          cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)
  yield proc
  proc.kill()


def _result(proc):
  out, err = proc.communicate(timeout=900)
  assert proc.returncode == 0, err[-3000:]
  return json.loads(out.strip().splitlines()[-1])


def _loss_and_grads(cfg, params, batch):
  def loss(p):
    h, _ = llama.hidden_states(cfg, p, batch["inputs"], adapter=Method(),
                               positions=batch["positions"], segment_ids=batch["segment_ids"])
    w = batch["weights"]
    return jnp.sum(token_losses(cfg, p, h, batch["targets"]) * w) / jnp.sum(w)
  return jax.jit(jax.value_and_grad(loss))(params)


def test_tiled_mlp_gives_the_losses_and_gradients_of_the_whole_mlp(context_runs):
  del context_runs  # (started: it runs while this test does)
  cfg = mc.PRESETS["tiny"].replace(vocab_size=512)
  params = llama.init_params(cfg, jax.random.key(0))
  rng = np.random.default_rng(0)
  B, T = 2, 192
  seg = np.repeat(np.array([[1] * 80 + [2] * 100 + [0] * 12]), B, 0).astype(np.int32)
  pos = np.concatenate([np.arange(80), np.arange(100), np.zeros(12, int)])[None].repeat(B, 0)
  batch = {"inputs": rng.integers(0, 512, (B, T)), "targets": rng.integers(0, 512, (B, T)),
           "weights": (seg > 0).astype(np.float32), "positions": pos, "segment_ids": seg}
  whole_loss, whole = _loss_and_grads(cfg, params, batch)
  for tile in (50,):  # slices of 48 tokens, the largest divisor of 192 up to 50
    loss, grads = _loss_and_grads(cfg.replace(mlp_tile=tile), params, batch)
    np.testing.assert_allclose(loss, whole_loss, rtol=RTOL)
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(whole)):
      np.testing.assert_allclose(g, w, rtol=RTOL, atol=1e-6 * float(jnp.max(jnp.abs(w))),
                                 err_msg=jax.tree_util.keystr(path))
  # The tiled program slices the MLP: its [tokens, intermediate] activations are a slice's.
  tiled = jax.jit(lambda p: llama.hidden_states(cfg.replace(mlp_tile=50), p, batch["inputs"],
                                                adapter=Method())[0])
  assert "while" in tiled.lower(params).as_text()


def test_zigzag_order_gives_every_chip_the_same_causal_work():
  order = long_context.zigzag_order(16, 4)
  assert order.tolist() == [0, 1, 14, 15, 2, 3, 12, 13, 4, 5, 10, 11, 6, 7, 8, 9]
  work = (order + 1).reshape(4, 4).sum(axis=1)  # keys each chip's queries see
  assert len(set(work.tolist())) == 1


@pytest.mark.parametrize("block_q,block_kv,offset", [(256, 256, 0), (512, 256, 0), (256, 512, 100)])
def test_splash_block_tables_equal_the_librarys_causal_mask(block_q, block_kv, offset):
  """The splash kernel's causal mask fills the blocks the diagonal does not cut at once (building
  the tables for 131,072 tokens: 79 s with the library's mask, 3.3 s with it); the forward, dq
  and dkv tables the kernel is built from are the library mask's, entry for entry."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
  from jaxft.models import attention_kernels
  T = 4096
  sizes = sk.BlockSizes(block_q=block_q, block_kv=block_kv, block_kv_compute=block_kv,
                        block_q_dkv=block_q, block_kv_dkv=block_kv,
                        block_kv_dkv_compute=block_kv, block_q_dq=block_q, block_kv_dq=block_kv)

  def tables(mask):
    k = sk.make_splash_mqa_single_device(mask=sm.MultiHeadMask([mask] * 2), block_sizes=sizes)
    return [k.fwd_mask_info, k.dq_mask_info, k.dkv_mask_info]

  ours = attention_kernels._CausalMask((T, T), offset=offset)
  for got, want in zip(tables(ours), tables(sm.CausalMask((T, T), offset=offset))):
    for name, a, b in zip(want._fields, got, want):
      if hasattr(b, "shape"):  # numpy or jax arrays
        assert a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b)), name
      else:
        assert a == b, name
  assert np.array_equal(ours[100:612, 0:4096], sm.CausalMask((T, T), offset=offset)[100:612, 0:4096])


def test_offloaded_layer_inputs_go_to_the_host_in_pieces_under_4_gib(monkeypatch):
  """libtpu aborts lowering a 4 GiB copy to host memory (the layer input of 524,288 tokens x
  4,096 in bf16); remat=offload names such an input in pieces of at most 2 GiB along the
  tokens (the 8B QLoRA plan of 524,288 tokens on one v5p compiles with it), values unchanged."""
  cfg = mc.PRESETS["tiny"].replace(remat="offload")

  def named(x, c=cfg):
    jaxpr = jax.make_jaxpr(lambda a: llama._layer_input(c, a))(x)
    return [e.outvars[0].aval.shape for e in jaxpr.eqns if e.primitive.name == "name"]

  assert named(jax.ShapeDtypeStruct((1, 524288, 4096), jnp.bfloat16)) == [(1, 262144, 4096)] * 2
  assert named(jax.ShapeDtypeStruct((1, 262144, 4096), jnp.bfloat16)) == [(1, 262144, 4096)]
  assert named(jax.ShapeDtypeStruct((1, 524288, 4096), jnp.bfloat16),
               cfg.replace(remat="full")) == [(1, 524288, 4096)]
  monkeypatch.setattr(llama, "_OFFLOAD_PIECE_BYTES", 64)
  x = jnp.arange(2 * 12 * 4, dtype=jnp.float32).reshape(2, 12, 4)
  assert named(x) == [(2, 2, 4)] * 6
  np.testing.assert_array_equal(llama._layer_input(cfg, x), x)


def test_context_must_split_rows_into_equal_chunks():
  mesh = AbstractMesh((1, 1, 1, 1, 8), sharding.AXES)
  sharding.check_context(mesh, 8192)
  with pytest.raises(ConfigError, match=r"mesh.context=8: data.max_len=1000 .* 16"):
    sharding.check_context(mesh, 1000)


def test_context_parallel_training_gives_the_losses_of_one_device(context_runs):
  """One packed 8,192-token row: mesh.context=8 trains to the losses of one device, step after
  step, with LoRA and with full fine-tuning (tensor=2 x context=4: long_context_helper.py
  --mixed)."""
  runs = _result(context_runs)
  for method in ("lora", "full"):
    one = np.asarray(runs[f"{method}:1"])
    assert len(one) == 2 and one[1] != one[0]  # it trains: the second step's loss differs
    np.testing.assert_allclose(runs[f"{method}:context=8"], one, rtol=RTOL)
