"""Qwen3, Gemma 2, Gemma 3 (text), Mixtral and Qwen3-MoE against transformers, in one parametrized
set: logits of several tiny random configs (odd head counts, GQA, tied and untied embeddings,
sliding windows shorter than the sequence; top-1/2/3 of 3 to 8 experts, renormalised or raw top-k
weights), config.json in transformers 4 and 5 spellings, KV-cache decoding against transformers'
greedy generation, and a LoRA run whose merged HF export and PEFT adapter give jaxft's logits and
loss in transformers and PEFT; QLoRA (NF4) and int8 bases train on each family. What only the
mixtures of experts have (router, load-balancing loss, expert LoRA gradients, the expert mesh
axis) is in test_moe.py."""

import json
import os

import numpy as np
import pytest

from hf_tiny import (chat_base, chat_config, check_sharded_load, check_written_back, jaxft_logits,
                     load_tiny, make_tiny, rel_err, torch_logits)
from jaxft import decode, export, peft, session
from jaxft.errors import ConfigError
from jaxft.models import hf

DENSE = ("qwen3", "gemma2", "gemma3")
MOE = ("mixtral", "qwen3_moe")
FAMILIES = DENSE + MOE
# (kind, overrides): odd head counts, multi-query and no-GQA, tied and untied embeddings.
VARIANTS = [
    ("qwen3", {}),  # GQA 4/2, untied
    ("qwen3", dict(num_attention_heads=3, num_key_value_heads=1, head_dim=24,
                   tie_word_embeddings=True)),  # head_dim independent of hidden/heads
    ("qwen3", dict(num_attention_heads=5, num_key_value_heads=5, head_dim=8)),
    ("gemma2", {}),  # 4 layers alternating sliding (window 4) / global, both soft-caps
    ("gemma2", dict(hidden_size=60, num_attention_heads=3, num_key_value_heads=1, head_dim=20,
                    tie_word_embeddings=False)),
    ("gemma3", {}),  # 7 layers: 5 sliding, 1 global, 1 sliding; linear-scaled global RoPE
    ("gemma3", dict(hidden_size=60, num_attention_heads=5, num_key_value_heads=1, head_dim=12,
                    tie_word_embeddings=False, final_logit_softcapping=4.0)),
    ("mixtral", dict(hidden_size=48, num_attention_heads=3, num_key_value_heads=1, head_dim=16,
                     num_local_experts=3, num_experts_per_tok=1, sliding_window=4)),
    ("qwen3_moe", {}),  # top-2 of 4, renormalised
    ("qwen3_moe", dict(num_attention_heads=3, num_key_value_heads=1, head_dim=24,
                       tie_word_embeddings=True, norm_topk_prob=False)),
    ("qwen3_moe", dict(num_experts=8, num_experts_per_tok=3, num_attention_heads=5,
                       num_key_value_heads=5, head_dim=8)),
]


def _ids(t=12, vocab=128, batch=2, seed=0):
  return np.random.RandomState(seed).randint(0, vocab, (batch, t))



@pytest.mark.slow
@pytest.mark.parametrize("kind,over", VARIANTS,
                         ids=[f"{k}-{i}" for i, (k, _) in enumerate(VARIANTS)])
def test_logits_match_transformers(kind, over, tmp_path, capfd):
  d = str(tmp_path / "src")
  model = make_tiny(kind, d, seed=len(over), **over)
  ids = _ids(t=13)
  ref = torch_logits(model, ids)
  cfg, params = load_tiny(d)
  if kind in MOE:
    assert cfg.num_experts == (over.get("num_local_experts") or over.get("num_experts") or 4)
    assert params["layers"]["gate_proj"]["kernel"].shape[:2] == (cfg.num_layers, cfg.num_experts)
  assert rel_err(jaxft_logits(cfg, params, ids), ref) < 1e-4
  # written back (the experts as per-expert tensors, as the hub's checkpoints), transformers reads
  # the same model with no weight left out or over
  check_written_back(cfg, params, model, ids, ref, str(tmp_path / "out"), capfd)
  # Each feature is exercised: without it the logits would differ.
  off = {"qwen3": dict(qk_norm=False), "qwen3_moe": dict(norm_topk_prob=not cfg.norm_topk_prob),
         "gemma2": dict(attn_softcap=None, query_pre_attn_scalar=None), "mixtral": {},
         }.get(kind, dict(rope_local_theta=None))
  for key, value in off.items():
    p = params if key != "qk_norm" else dict(params, layers={
        k: v for k, v in params["layers"].items() if k not in ("q_norm", "k_norm")})
    assert rel_err(jaxft_logits(cfg.replace(**{key: value}), p, ids), ref) > 1e-3, key
  if kind in ("gemma2", "gemma3"):
    assert cfg.sliding_window < ids.shape[1] and len(set(cfg.layer_types)) == 2
    assert rel_err(jaxft_logits(cfg.replace(layer_types=None, sliding_window=None), params, ids),
                   ref) > 1e-3
  if kind == "gemma3":
    assert dict(cfg.rope_scaling)["rope_type"] == "linear"
    assert rel_err(jaxft_logits(cfg.replace(rope_scaling=None), params, ids), ref) > 1e-3
  if cfg.final_softcap:
    assert rel_err(jaxft_logits(cfg.replace(final_softcap=None), params, ids), ref) > 1e-3


def _v4_spelling(c: dict) -> dict:
  """A transformers 5 config.json rewritten as transformers 4 wrote it."""
  c = dict(c)
  c.pop("dtype", None)
  c["torch_dtype"] = "bfloat16"
  rope = c.pop("rope_parameters")
  if "full_attention" in rope:  # Gemma 3
    c["rope_local_base_freq"] = rope["sliding_attention"]["rope_theta"]
    rope = dict(rope["full_attention"])
    c["sliding_window_pattern"] = 6
    c.pop("layer_types")
  elif c["model_type"] == "gemma2":
    c.pop("layer_types")  # Gemma 2 configs before layer_types: alternating from layer 0
  c["rope_theta"] = rope.pop("rope_theta")
  if rope.get("rope_type", "default") != "default":
    rope["type"] = rope.pop("rope_type")
    c["rope_scaling"] = rope
  return c


@pytest.mark.parametrize("kind", FAMILIES)
def test_read_config_transformers4_spelling(kind, tmp_path):
  d = str(tmp_path / "m")
  make_tiny(kind, d)
  with open(os.path.join(d, "config.json")) as f:
    c = json.load(f)
  v5 = hf.read_config(d)
  v4 = _v4_spelling(c)
  (tmp_path / "config.json").write_text(json.dumps(v4))
  assert hf.read_config(str(tmp_path)) == v5
  assert hf.checkpoint_dtype(str(tmp_path)) == "bfloat16"
  # and what jaxft writes, transformers 5 reads back as the same model config
  assert hf.hf_config(v5, "float32")["layer_types" if kind in ("gemma2", "gemma3") else "head_dim"]
  if kind in MOE:  # what jaxft's MoE layer does not do is refused, naming the file
    bad = {"qwen3_moe": dict(mlp_only_layers=[0]), "mixtral": dict(router_jitter_noise=0.1)}[kind]
    (tmp_path / "config.json").write_text(json.dumps(dict(v4, **bad)))
    with pytest.raises(ConfigError, match="config.json"):
      hf.read_config(str(tmp_path))


def test_refusals(tmp_path):
  d = str(tmp_path / "m")
  make_tiny("gemma2", d)
  c = json.load(open(os.path.join(d, "config.json")))
  for bad, match in ((dict(hidden_activation="silu", hidden_act="silu"), "hidden_act='silu'"),
                     (dict(attention_bias=True), "attention_bias=true"),
                     (dict(layer_types=["sliding_attention"]), "layer_types")):
    (tmp_path / "config.json").write_text(json.dumps(dict(c, **bad)))
    with pytest.raises(ConfigError, match=f"config.json.*{match}"):
      hf.read_config(str(tmp_path))
  cfg = hf.read_config(d)
  with pytest.raises(ConfigError, match="Gemma2ForCausalLM cannot express qk_norm=True"):
    hf.hf_config(cfg.replace(qk_norm=True), "float32")
  with pytest.raises(ConfigError, match="MistralForCausalLM cannot express layer_types"):
    hf.hf_config(cfg.replace(architecture="MistralForCausalLM", norm_plus_one=False,
                             hidden_act="silu", scale_embeddings=False, post_norms=False),
                 "float32")


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["gemma2", "gemma3", "mixtral"])
def test_cached_decoding_equals_transformers_generate(kind, tmp_path):
  """jaxft's batched KV-cache decoding (left-padded prompts, windows shorter than the text) gives
  transformers' greedy tokens."""
  import torch
  d = str(tmp_path / "m")
  model = make_tiny(kind, d)
  model.generation_config.eos_token_id = None
  cfg, params = load_tiny(d)
  prompts = [np.asarray(p, np.int32) for p in (_ids(3, seed=1)[0], _ids(9, seed=2)[0])]
  got = decode.generate(cfg, peft.Method(), params, prompts, max_new_tokens=10)
  for prompt, g in zip(prompts, got):
    with torch.no_grad():
      want = model.generate(torch.tensor(prompt[None], dtype=torch.long), do_sample=False,
                            max_new_tokens=10, pad_token_id=0)[0, len(prompt):].numpy()
    np.testing.assert_array_equal(g.tokens, want)


def _family_config(root, kind, quant="none", steps=3):
  """A 3-step LoRA run on every linear layer of a tiny `kind` checkpoint with a chat template."""
  base = str(root / f"{kind}-base")
  if not os.path.isdir(base):
    chat_base(base, kind, bos_token_id=1, eos_token_id=2, pad_token_id=0)
  config = chat_config(root, base, **{"model.quant": quant, "peft.targets": "all-linear",
                                      "peft.lora.rank": 4, "train.steps": steps})
  return config, base


@pytest.fixture(scope="module", params=DENSE + ("mixtral",))
def lora_run(request, tmp_path_factory):
  """A 3-step LoRA run (all linear layers: attention and each expert) on a tiny model of each
  family (Qwen3-MoE's experts have Mixtral's fused layout and PEFT names in transformers 5; its
  per-expert checkpoint names are checked by test_logits_match_transformers)."""
  from jaxft.trainer import train
  root = tmp_path_factory.mktemp(request.param)
  config, base = _family_config(root, request.param)
  workdir = str(root / "work")
  train(config, workdir)
  trained = session.restore_trained(workdir)
  ids = _ids(t=10, vocab=32000)
  tuned = jaxft_logits(trained.model.cfg, trained.params, ids, trained.model.method)
  rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl")) if '"loss"' in l]
  return dict(kind=request.param, root=root, base=base, workdir=workdir, ids=ids, tuned=tuned,
              rows=rows, trained=trained)


def _loss(logits, ids):
  """Mean next-token cross-entropy of float32 logits [B, T, V] on ids [B, T]."""
  lg = logits[:, :-1].astype(np.float64)
  lse = np.log(np.exp(lg - lg.max(-1, keepdims=True)).sum(-1)) + lg.max(-1)
  return float(np.mean(lse - np.take_along_axis(lg, ids[:, 1:, None], -1)[..., 0]))


@pytest.mark.slow
def test_lora_exports_reproduce_jaxft_in_transformers_and_peft(lora_run):
  """The merged export and the PEFT adapter give jaxft's logits and loss in transformers and PEFT;
  a mixture of experts' run trained every expert's LoRA (B left zero nowhere that saw tokens),
  logged the load-balancing loss, and its adapter targets the fused experts (target_parameters)."""
  import transformers
  from peft import PeftModel
  moe = lora_run["kind"] in MOE
  if moe:
    assert any("router_aux" in r for r in lora_run["rows"]), lora_run["rows"][0]
    assert all(np.isfinite(r["router_aux"]) for r in lora_run["rows"] if "router_aux" in r)
    tr = lora_run["trained"].trainable["layers"]
    moved = np.abs(np.asarray(tr["down_proj"]["lora_b"])).sum(axis=(2, 3)) > 0  # [L, E]
    assert moved.mean() > 0.5, moved
  ids, tuned = lora_run["ids"], lora_run["tuned"]
  base = transformers.AutoModelForCausalLM.from_pretrained(lora_run["base"], dtype="float32")
  assert rel_err(torch_logits(base.eval(), ids), tuned) > 1e-3  # the run changed the model
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
  attention = ["k_proj", "o_proj", "q_proj", "v_proj"]
  if moe:
    assert c["target_parameters"] == ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]
    assert sorted(c["target_modules"]) == attention
    assert c["r"] == 8  # rank 4 per gate and up = one rank-8 LoRA of the fused gate_up_proj
  else:
    assert sorted(c["target_modules"]) == sorted(attention + ["gate_proj", "up_proj", "down_proj"])
  peft_model = PeftModel.from_pretrained(base, adapter).eval()
  got = torch_logits(peft_model, ids)
  assert rel_err(got, tuned) < 1e-4
  assert abs(_loss(got, ids) - _loss(tuned, ids)) < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("kind,quant", [(k, "nf4") for k in DENSE + ("mixtral",)] +
                         [("gemma2", "int8"), ("qwen3_moe", "int8")])
def test_quantized_base_lora_trains(kind, quant, tmp_path):
  """QLoRA (NF4) and int8 bases of each family: the base kernels (each expert's too) stay
  quantized, the loss goes down in a few steps."""
  from jaxft import quant as jq
  from jaxft.trainer import train
  config, _ = _family_config(tmp_path, kind, quant=quant, steps=4)
  workdir = str(tmp_path / "work")
  train(config, workdir)
  rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl")) if '"loss"' in l]
  losses = [r["loss"] for r in rows if "loss" in r]
  assert len(losses) == 4 and np.all(np.isfinite(losses)) and losses[-1] < losses[0], losses
  trained = session.restore_trained(workdir)
  assert jq.is_quantized(trained.model.base["layers"]["q_proj"]["kernel"])
  if kind in MOE:
    k = trained.model.base["layers"]["gate_proj"]["kernel"]
    assert jq.is_quantized(k) and k.shape == (2, 4, 64, 32)
    assert np.abs(np.asarray(trained.trainable["layers"]["gate_proj"]["lora_b"])).sum() > 0


@pytest.mark.slow
def test_sharded_load_on_8_devices(tmp_path):
  """A Gemma 3 checkpoint loads straight onto a data x fsdp x tensor mesh by the rules table
  (q/k norms replicated, kernels split) and gives transformers' logits there."""
  d = str(tmp_path / "m")
  check_sharded_load(d, make_tiny("gemma3", d), _ids(), tmp_path, (7, 32, 48),
                     'assert params["layers"]["q_norm"]["scale"].addressable_shards[0].data.shape == (7, 16)')
