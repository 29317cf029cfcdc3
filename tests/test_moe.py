"""Mixtral and Qwen3-MoE against transformers: logits of several tiny random configs (top-1/2/3
of 3 to 8 experts, odd head counts, GQA, tied embeddings, renormalised or raw top-k weights),
router logits and the load-balancing loss (padding included), the objective's loss, config.json
in transformers 4 and 5 spellings, KV-cache decoding, LoRA gradients reaching every expert that
received tokens, a LoRA run's merged HF export and PEFT adapter (target_parameters) in
transformers and PEFT, a QLoRA base, and an expert-parallel mesh of 8 CPU devices."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hf_tiny import check_written_back, jaxft_logits, load_tiny, make_tiny, rel_err, torch_logits
from jaxft import configlib, decode, export, peft, session
from jaxft.errors import ConfigError
from jaxft.models import hf, llama
from jaxft.peft.loss import loss_sum_and_aux
from jaxft.peft.base import match_targets

VARIANTS = [
    ("mixtral", {}),  # GQA 4/2, top-2 of 4 experts, untied
    ("mixtral", dict(hidden_size=48, num_attention_heads=3, num_key_value_heads=1, head_dim=16,
                     num_local_experts=3, num_experts_per_tok=1, sliding_window=4)),
    ("qwen3_moe", {}),  # top-2 of 4, renormalised
    ("qwen3_moe", dict(num_attention_heads=3, num_key_value_heads=1, head_dim=24,
                       tie_word_embeddings=True, norm_topk_prob=False)),
    ("qwen3_moe", dict(num_experts=8, num_experts_per_tok=3, num_attention_heads=5,
                       num_key_value_heads=5, head_dim=8)),
]
IDS = [f"{k}-{i}" for i, (k, _) in enumerate(VARIANTS)]


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
@pytest.mark.parametrize("kind,over", VARIANTS[1:], ids=IDS[1:])
def test_logits_match_transformers(kind, over, tmp_path, capfd):
  d = str(tmp_path / "src")
  model = make_tiny(kind, d, seed=len(over), **over)
  ids = _ids(t=13)
  ref = torch_logits(model, ids)
  cfg, params = load_tiny(d)
  assert cfg.num_experts == model.config.num_experts_per_tok * 0 + (
      over.get("num_local_experts") or over.get("num_experts") or 4)
  assert params["layers"]["gate_proj"]["kernel"].shape[:2] == (cfg.num_layers, cfg.num_experts)
  assert rel_err(jaxft_logits(cfg, params, ids), ref) < 1e-4
  # written back (per-expert tensors, as the hub's checkpoints), transformers reads the same model
  check_written_back(cfg, params, model, ids, ref, str(tmp_path / "out"), capfd)
  if kind == "qwen3_moe":  # the renormalisation is exercised: flipped, the logits differ
    flipped = cfg.replace(norm_topk_prob=not cfg.norm_topk_prob)
    assert rel_err(jaxft_logits(flipped, params, ids), ref) > 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("kind,over", [VARIANTS[4]], ids=[IDS[4]])
def test_router_and_aux_loss_match_transformers(kind, over, tmp_path):
  """Router logits of every layer, the load-balancing loss (with padding masked out, as
  transformers' attention_mask does) and the objective's loss (cross-entropy + coef * aux) equal
  transformers' output_router_logits=True forward."""
  import torch
  d = str(tmp_path / "m")
  model = make_tiny(kind, d, router_aux_loss_coef=0.05, **over)
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
  pc = configlib.load("base").peft
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


@pytest.mark.parametrize("kind", ["mixtral", "qwen3_moe"])
def test_read_config_transformers4_spelling(kind, tmp_path):
  d = str(tmp_path / "m")
  make_tiny(kind, d)
  c = json.load(open(os.path.join(d, "config.json")))
  v5 = hf.read_config(d)
  c.pop("dtype", None)
  c["torch_dtype"] = "bfloat16"
  c["rope_theta"] = c.pop("rope_parameters")["rope_theta"]
  (tmp_path / "config.json").write_text(json.dumps(c))
  assert hf.read_config(str(tmp_path)) == v5
  bad = dict(c, mlp_only_layers=[0]) if kind == "qwen3_moe" else dict(c, router_jitter_noise=0.1)
  (tmp_path / "config.json").write_text(json.dumps(bad))
  with pytest.raises(ConfigError, match="config.json"):
    hf.read_config(str(tmp_path))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["mixtral"])
def test_cached_decoding_equals_transformers_generate(kind, tmp_path):
  import torch
  d = str(tmp_path / "m")
  model = make_tiny(kind, d)
  model.generation_config.eos_token_id = None
  cfg, params = load_tiny(d)
  prompts = [np.asarray(p, np.int32) for p in (_ids(3, seed=1)[0], _ids(9, seed=2)[0])]
  got = decode.generate(cfg, peft.Method(), params, prompts, max_new_tokens=8)
  for prompt, g in zip(prompts, got):
    with torch.no_grad():
      want = model.generate(torch.tensor(prompt[None], dtype=torch.long), do_sample=False,
                            max_new_tokens=8, pad_token_id=0)[0, len(prompt):].numpy()
    np.testing.assert_array_equal(g.tokens, want)


@pytest.fixture(scope="module", params=["mixtral"])
def lora_run(request, tmp_path_factory):
  """A 3-step LoRA run (every linear: attention and each expert) on a tiny Mixtral (Qwen3-MoE's
  experts have the same fused layout and PEFT names in transformers 5; its per-expert checkpoint
  names are checked by test_logits_match_transformers)."""
  from test_families import _family_config
  from jaxft.trainer import train
  root = tmp_path_factory.mktemp(request.param)
  config, base = _family_config(root, request.param)
  workdir = str(root / "work")
  train(config, workdir)
  trained = session.restore_trained(workdir)
  ids = _ids(t=10, vocab=32000)
  tuned = jaxft_logits(trained.model.cfg, trained.params, ids, trained.model.method)
  rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl")) if '"loss"' in l]
  return dict(root=root, base=base, workdir=workdir, ids=ids, tuned=tuned, rows=rows,
              trained=trained)


@pytest.mark.slow
def test_lora_run_exports_reproduce_jaxft_in_transformers_and_peft(lora_run):
  """The run trained every expert's LoRA (B left zero nowhere that saw tokens), logged the
  load-balancing loss, and its merged export and PEFT adapter (target_parameters on the fused
  experts) give jaxft's logits and loss in transformers and PEFT."""
  import transformers
  from peft import PeftModel
  from test_families import _loss
  assert all(np.isfinite(r["router_aux"]) for r in lora_run["rows"] if "router_aux" in r)
  assert any("router_aux" in r for r in lora_run["rows"]), lora_run["rows"][0]
  tr = lora_run["trained"].trainable["layers"]
  moved = np.abs(np.asarray(tr["down_proj"]["lora_b"])).sum(axis=(2, 3)) > 0  # [L, E]
  assert moved.mean() > 0.5, moved
  ids, tuned = lora_run["ids"], lora_run["tuned"]
  base = transformers.AutoModelForCausalLM.from_pretrained(lora_run["base"], dtype="float32")
  assert rel_err(torch_logits(base.eval(), ids), tuned) > 1e-3
  merged = str(lora_run["root"] / "merged")
  export.export_hf(lora_run["workdir"], merged)
  model = transformers.AutoModelForCausalLM.from_pretrained(merged, dtype="float32").eval()
  got = torch_logits(model, ids)
  assert rel_err(got, tuned) < 1e-4
  assert abs(_loss(got, ids) - _loss(tuned, ids)) < 1e-4
  adapter = str(lora_run["root"] / "adapter")
  export.export_peft(lora_run["workdir"], adapter)
  with open(os.path.join(adapter, "adapter_config.json")) as f:
    c = json.load(f)
  assert c["target_parameters"] == ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]
  assert sorted(c["target_modules"]) == ["k_proj", "o_proj", "q_proj", "v_proj"]
  assert c["r"] == 8  # rank 4 per gate and up = one rank-8 LoRA of the fused gate_up_proj
  peft_model = PeftModel.from_pretrained(base, adapter).eval()
  got = torch_logits(peft_model, ids)
  assert rel_err(got, tuned) < 1e-4
  assert abs(_loss(got, ids) - _loss(tuned, ids)) < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("kind,quant", [("mixtral", "nf4"), ("qwen3_moe", "int8")])
def test_quantized_base_lora_trains_the_experts(kind, quant, tmp_path):
  """QLoRA (NF4) and int8 bases: the expert kernels stay quantized, the loss goes down."""
  from jaxft import quant as jq
  from jaxft.trainer import train
  from test_families import _family_config
  config, _ = _family_config(tmp_path, kind, quant=quant, steps=4)
  workdir = str(tmp_path / "work")
  train(config, workdir)
  rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl")) if '"loss"' in l]
  losses = [r["loss"] for r in rows if "loss" in r]
  assert len(losses) == 4 and np.all(np.isfinite(losses)) and losses[-1] < losses[0], losses
  trained = session.restore_trained(workdir)
  k = trained.model.base["layers"]["gate_proj"]["kernel"]
  assert jq.is_quantized(k) and k.shape == (2, 4, 64, 32)
  assert np.abs(np.asarray(trained.trainable["layers"]["gate_proj"]["lora_b"])).sum() > 0


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
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={n}",
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
