"""What only the mixtures of experts (Mixtral, Qwen3-MoE) have, against transformers: router
logits and the load-balancing loss (padding included) and the objective's loss, LoRA targets and
gradients reaching every expert that received tokens, and an expert-parallel mesh of 8 CPU
devices. Their logits, config spellings, decoding, LoRA-run exports and quantized bases are
checked with the dense families' in test_families.py."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import forced_devices_flags, make_config
from hf_tiny import load_tiny, make_tiny, rel_err
from jaxft import peft
from jaxft.errors import ConfigError
from jaxft.models import hf, llama
from jaxft.peft.loss import loss_sum_and_aux
from jaxft.peft.base import match_targets


def _ids(t=12, vocab=128, batch=2, seed=0):
  return np.random.RandomState(seed).randint(0, vocab, (batch, t))


def _batch(ids, pad=0):
  """A batch whose inputs are `ids` (every position, as transformers sees them) and whose
  targets are the next tokens; the last `pad` positions of row 0 are padding (segment 0)."""
  B, T = ids.shape
  seg = np.ones((B, T), np.int32)
  if pad:
    seg[0, T - pad:] = 0
  w = (seg > 0).astype(np.float32)
  w[:, -1] = 0
  w[0, T - pad - 1:] = 0
  tgt = np.concatenate([ids[:, 1:], np.zeros((B, 1), ids.dtype)], axis=1)
  return {"inputs": jnp.asarray(ids, jnp.int32), "targets": jnp.asarray(tgt, jnp.int32),
          "weights": jnp.asarray(w), "segment_ids": jnp.asarray(seg),
          "positions": jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))}


@pytest.mark.slow
def test_router_and_aux_loss_match_transformers(tmp_path):
  """Router logits of every layer, the load-balancing loss (with padding masked out, as
  transformers' attention_mask does) and the objective's loss (cross-entropy + coef * aux) equal
  transformers' output_router_logits=True forward."""
  import torch
  d = str(tmp_path / "m")
  # top-3 of 8 experts, 5 heads without GQA
  model = make_tiny("qwen3_moe", d, router_aux_loss_coef=0.05, num_experts=8, num_experts_per_tok=3,
                    num_attention_heads=5, num_key_value_heads=5, head_dim=8)
  cfg, params = load_tiny(d)
  assert cfg.router_aux_coef == 0.05
  ids, pad = _ids(t=10), 3
  mask = np.ones_like(ids)
  mask[0, -pad:] = 0
  with torch.no_grad():
    ref = model(torch.tensor(ids), attention_mask=torch.tensor(mask), output_router_logits=True)
  b = _batch(ids, pad)
  _, _, router = llama.hidden_states_and_router(cfg, params, b["inputs"], adapter=peft.Method(),
                                                segment_ids=b["segment_ids"], router_logits=True)
  want = np.stack([r.float().numpy() for r in ref.router_logits])  # [L, B*T, E]
  got = np.asarray(router["logits"])
  rows = mask.reshape(-1) > 0  # padded rows attend differently; compare the real tokens
  assert rel_err(got[:, rows], want[:, rows]) < 1e-4
  s, n, aux = loss_sum_and_aux(cfg, peft.Method(), {}, params, b, None)
  assert abs(float(aux) - float(ref.aux_loss)) < 1e-5 * max(1.0, abs(float(ref.aux_loss)))
  # the objective: cross-entropy + router_aux_loss_coef * aux, as transformers' loss with labels
  labels = np.where(mask > 0, ids, -100)
  with torch.no_grad():
    full = model(torch.tensor(ids), attention_mask=torch.tensor(mask),
                 labels=torch.tensor(labels), output_router_logits=True)
  from jaxft import objectives
  sft = objectives.SFT()
  terms, stats = sft.sums(cfg, peft.Method(), {}, params, b, None)
  loss = sft.loss(terms, sft.counts(b))
  assert abs(float(loss) - float(full.loss)) < 1e-5
  assert abs(float(stats["router_aux"]) - float(ref.aux_loss)) < 1e-5


def test_targets_reach_the_experts(tmp_path):
  d = str(tmp_path / "m")
  make_tiny("qwen3_moe", d)
  cfg = hf.read_config(d)
  assert match_targets("experts", cfg) == ("gate_proj", "up_proj", "down_proj")
  assert match_targets("all-linear", cfg) == llama.LINEARS
  assert match_targets("experts/down", cfg) == ("down_proj",)
  assert match_targets("q_proj,v_proj", cfg) == ("q_proj", "v_proj")
  lora = peft.LoRA(targets=match_targets("all-linear", cfg), rank=4)
  specs = lora.trainable_specs(cfg)["layers"]
  assert specs["gate_proj"]["lora_a"].shape == (cfg.num_layers, cfg.num_experts, 64, 4)
  assert specs["down_proj"]["lora_b"].axes == ("layers", "expert", "lora", "embed")
  assert specs["q_proj"]["lora_a"].shape == (cfg.num_layers, 64, 4)
  pc = make_config("base").peft
  pc.method, pc.targets = "dora", "all-linear"
  with pytest.raises(ConfigError, match="DoRA does not implement"):
    peft.from_config(pc, cfg)


@pytest.mark.slow
def test_lora_gradient_on_every_expert_that_received_tokens(tmp_path):
  d = str(tmp_path / "m")
  make_tiny("mixtral", d, num_local_experts=8, num_experts_per_tok=1)
  cfg, params = load_tiny(d)
  method = peft.LoRA(targets=match_targets("experts,q_proj", cfg), rank=4)
  added = method.init(cfg, jax.random.key(0))
  b = _batch(_ids(t=4, batch=1))
  grads = jax.grad(lambda tr: loss_sum_and_aux(cfg, method, tr, params, b, None)[0])(added)
  # the tokens the loss depends on: all but the last (which has no target, and nothing after it)
  _, _, router = llama.hidden_states_and_router(cfg, params, b["inputs"][:, :-1],
                                                adapter=peft.Method())
  got_tokens = np.asarray(router["stats"]["counts"]).sum(1) > 0  # [L, E]
  assert got_tokens.any() and not got_tokens.all()
  for n in ("gate_proj", "up_proj", "down_proj"):
    g = np.abs(np.asarray(grads["layers"][n]["lora_b"])).sum(axis=(2, 3))  # [L, E]
    np.testing.assert_array_equal(g > 0, got_tokens, err_msg=n)
  assert np.abs(np.asarray(grads["layers"]["q_proj"]["lora_b"])).sum() > 0


_SHARDED = """
import sys, numpy as np, jax, jax.numpy as jnp, ml_collections
sys.path.insert(0, {tests!r})
from test_moe import _batch
from jaxft import peft, sharding
from jaxft.models import hf, llama
from jaxft.peft.loss import loss_sum_and_aux
from jaxft.peft.base import match_targets
assert jax.device_count() == 8
mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=2, fsdp=2, tensor=1, expert=2)))
cfg = hf.read_config({d!r})
params = hf.load_params({d!r}, cfg, sharding.tree_shardings(llama.param_specs(cfg), mesh))
k = params["layers"]["gate_proj"]["kernel"]
assert k.sharding.spec[1] == "expert" and k.addressable_shards[0].data.shape[1] == 2, k.sharding
method = peft.LoRA(targets=match_targets("all-linear", cfg), rank=4)
added = jax.jit(method.init, static_argnums=0, out_shardings=sharding.tree_shardings(
    method.trainable_specs(cfg), mesh))(cfg, jax.random.key(0))
assert added["layers"]["up_proj"]["lora_a"].sharding.spec[1] == "expert"
added["layers"]["up_proj"]["lora_b"] = added["layers"]["up_proj"]["lora_b"] + 0.05
b = _batch(np.load({ids!r}))
f = jax.jit(jax.value_and_grad(lambda tr: loss_sum_and_aux(cfg, method, tr, params, b, None)[0]))
loss, g = f(added)
print("RESULT", float(loss), float(jnp.abs(g["layers"]["down_proj"]["lora_b"]).sum()))
"""


@pytest.mark.slow
def test_expert_parallel_mesh_of_8_devices_equals_one_device(tmp_path):
  """mesh.expert=2 (with data=2, fsdp=2) on 8 forced CPU devices: the experts and their LoRA
  leaves are split over the expert axis, and the loss and gradients equal one device's."""
  import subprocess
  import sys
  import textwrap
  d = str(tmp_path / "m")
  make_tiny("qwen3_moe", d)
  ids = _ids(t=8, batch=4)
  np.save(tmp_path / "ids.npy", ids)
  tests = os.path.dirname(os.path.abspath(__file__))
  script = _SHARDED.format(tests=tests, d=d, ids=str(tmp_path / "ids.npy"))
  out = {}
  for n in (1, 8):
    s = script if n == 8 else script.replace("== 8", "== 1").replace(
        "data=2, fsdp=2, tensor=1, expert=2", "data=1, fsdp=1, tensor=1, expert=1").replace(
        'k.sharding.spec[1] == "expert" and k.addressable_shards[0].data.shape[1] == 2', "True"
        ).replace('added["layers"]["up_proj"]["lora_a"].sharding.spec[1] == "expert"', "True")
    env = dict(os.environ, XLA_FLAGS=forced_devices_flags(n),
               JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(s)], cwd=os.path.dirname(tests),
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out[n] = [float(x) for x in r.stdout.split("RESULT")[1].split()]
  np.testing.assert_allclose(out[8], out[1], rtol=1e-5)


def test_eval_loss_is_the_cross_entropy_with_the_router_term_beside_it():
  """eval_loss (and so perplexity) included router_aux_coef * the load-balancing loss: a tiny
  Mixtral's step-0 eval loss differed from transformers' cross-entropy by 2e-4 relative. Now it
  is the cross-entropy alone, and eval_router_aux is logged beside it."""
  import math
  import optax
  from conftest import tiny_config
  from jaxft import objectives, sharding
  from jaxft.data import pipeline
  from jaxft.data.formats import Example
  from jaxft.eval.evaluation import evaluate_loss
  from jaxft.models.config import ModelConfig
  from jaxft.step import make_steps
  cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                    num_kv_heads=2, head_dim=8, num_experts=4, experts_per_token=2,
                    moe_intermediate_size=24, router_aux_coef=0.5, initializer_range=0.1)
  params = jax.jit(lambda k: llama.init_params(cfg, k))(jax.random.key(0))
  rng = np.random.RandomState(0)
  examples = [Example(rng.randint(0, 64, n).astype(np.int32), np.arange(n) >= 3) for n in (9, 12, 7)]
  config = tiny_config(**{"data.max_len": 16, "data.batch_size": 2, "data.packing": False})
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  sft = objectives.SFT()
  steps = make_steps(cfg, peft.Method(), optax.identity(), lambda step: 0.0, False, dropout=False,
                     objective=sft)
  eval_step = jax.jit(steps.eval)
  m = evaluate_loss(eval_step, {}, params, examples, config, mesh)
  total = None
  for b in pipeline.eval_batches(examples, 16, 2, False):  # the same sums, by hand
    b = {k: v[0] for k, v in sharding.put_batch(b, mesh, 1).items()}
    out = jax.device_get(eval_step({}, params, b))
    total = out if total is None else jax.tree.map(np.add, total, out)
  terms, stats, counts = total
  ce = float(terms["nll"] / counts["tokens"])
  assert m["eval_loss"] == pytest.approx(ce, rel=1e-5)
  assert m["eval_ppl"] == pytest.approx(math.exp(ce), rel=1e-5)
  assert m["eval_router_aux"] > 0.5  # (about 1 for a balanced router: far from negligible here)
  # what training minimises keeps the term: cross-entropy + coef * aux
  assert float(sft.loss(terms, counts)) == pytest.approx(ce + 0.5 * m["eval_router_aux"], rel=1e-5)
