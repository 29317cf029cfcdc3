"""Tiny random transformers checkpoints (the peers of the HF interop tests) and jaxft logits."""

import numpy as np

SMALL = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, head_dim=16)


def make_tiny(kind: str, directory: str, seed: int = 0, dtype=None, max_shard_size=None,
              **overrides):
  """Saves a random tiny LlamaForCausalLM (GQA, Llama 3 rope scaling), MistralForCausalLM
  (sliding window 4), Qwen2ForCausalLM (q/k/v bias, tied embeddings), Qwen3ForCausalLM (q/k norms,
  untied), Gemma2ForCausalLM, Gemma3ForCausalLM (text), MixtralForCausalLM or
  Qwen3MoeForCausalLM (tiny mixtures of experts) with save_pretrained and
  returns the torch model (float32, eval mode). Every weight, norms and biases included, is
  perturbed so that a mis-mapped tensor shows in the logits."""
  import torch
  import transformers
  torch.manual_seed(seed)
  kw = dict(SMALL, **overrides)
  if kind == "llama":
    kw.setdefault("rope_scaling", {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 16})
    kw.setdefault("max_position_embeddings", 64)
    cls, conf = transformers.LlamaForCausalLM, transformers.LlamaConfig
  elif kind == "mistral":
    kw.setdefault("sliding_window", 4)
    cls, conf = transformers.MistralForCausalLM, transformers.MistralConfig
  elif kind == "qwen2":
    kw.setdefault("tie_word_embeddings", True)
    cls, conf = transformers.Qwen2ForCausalLM, transformers.Qwen2Config
  elif kind == "qwen3":
    cls, conf = transformers.Qwen3ForCausalLM, transformers.Qwen3Config
  elif kind == "gemma2":  # alternating sliding (window 4) and global layers, both soft-caps
    kw.update(num_hidden_layers=kw["num_hidden_layers"] if "num_hidden_layers" in overrides else 4)
    kw.setdefault("sliding_window", 4)
    kw.setdefault("query_pre_attn_scalar", 24)
    kw.setdefault("attn_logit_softcapping", 5.0)  # small: the caps bend these random scores
    kw.setdefault("final_logit_softcapping", 3.0)
    cls, conf = transformers.Gemma2ForCausalLM, transformers.Gemma2Config
  elif kind == "gemma3":  # 5:1 pattern over 7 layers, local/global RoPE bases, linear scaling
    kw.update(num_hidden_layers=kw["num_hidden_layers"] if "num_hidden_layers" in overrides else 7)
    kw.setdefault("sliding_window", 4)
    kw.setdefault("query_pre_attn_scalar", 16)
    kw.setdefault("rope_parameters", {
        "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1000000.0},
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}})
    cls, conf = transformers.Gemma3ForCausalLM, transformers.Gemma3TextConfig
  elif kind == "mixtral":  # 4 experts of width 32, top-2
    kw.update(intermediate_size=overrides.get("intermediate_size", 32))
    kw.setdefault("num_local_experts", 4)
    kw.setdefault("num_experts_per_tok", 2)
    cls, conf = transformers.MixtralForCausalLM, transformers.MixtralConfig
  elif kind == "qwen3_moe":  # 4 experts of width 32, top-2, renormalised
    kw.setdefault("moe_intermediate_size", 32)
    kw.setdefault("num_experts", 4)
    kw.setdefault("num_experts_per_tok", 2)
    kw.setdefault("norm_topk_prob", True)
    cls, conf = transformers.Qwen3MoeForCausalLM, transformers.Qwen3MoeConfig
  else:
    raise ValueError(kind)
  model = cls(conf(**kw, attn_implementation="eager"))
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  if dtype is not None:
    model.to(dtype)
  model.save_pretrained(directory, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
  return model.float().eval()


def torch_logits(model, ids: np.ndarray) -> np.ndarray:
  import torch
  with torch.no_grad():
    return model(torch.tensor(np.asarray(ids), dtype=torch.long)).logits.float().numpy()


def jaxft_logits(cfg, params, ids: np.ndarray, method=None) -> np.ndarray:
  import jax.numpy as jnp
  from jaxft import peft
  from jaxft.models import llama
  h, _ = llama.hidden_states(cfg, params, jnp.asarray(ids), adapter=method or peft.Method())
  return np.asarray(llama.logits(cfg, params, h))


def rel_err(got: np.ndarray, ref: np.ndarray) -> float:
  """max |got - ref| / max |ref|: the parity measure of the HF interop tests."""
  return float(np.abs(got - ref).max() / np.abs(ref).max())


def one_device_shardings(cfg):
  import jax
  from jax.sharding import NamedSharding, PartitionSpec as P
  from jaxft.models import llama
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
  return jax.tree.map(lambda s: NamedSharding(mesh, P()), llama.param_specs(cfg),
                      is_leaf=llama.is_spec)


def load_tiny(directory: str, cfg=None, **kw):
  """(cfg, params) of the HF checkpoint in `directory` on one device; kw go to hf.load_params."""
  from jaxft.models import hf
  cfg = cfg or hf.read_config(directory)
  return cfg, hf.load_params(directory, cfg, one_device_shardings(cfg), **kw)


def check_written_back(cfg, params, model, ids: np.ndarray, ref: np.ndarray, out: str,
                       capfd) -> None:
  """jaxft writes `params` back as an HF checkpoint in `out`: its config reads back as `cfg`, and
  transformers loads it as `model`'s class with no tensor missing, unexpected or misshapen and
  gives the logits `ref` (within 1e-6) without a load report."""
  import os
  import transformers
  from jaxft.export import write_checkpoint
  from jaxft.models import hf
  os.makedirs(out)
  write_checkpoint(out, cfg, params, "float32")
  assert hf.read_config(out) == cfg
  capfd.readouterr()
  back, info = transformers.AutoModelForCausalLM.from_pretrained(out, dtype="float32",
                                                                  output_loading_info=True)
  assert type(back) is type(model)
  assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
  assert "LOAD REPORT" not in capfd.readouterr().err
  assert rel_err(torch_logits(back.eval(), ids), ref) < 1e-6


def check_sharded_load(directory: str, model, ids: np.ndarray, tmp_path, kernel_shard: tuple,
                       extra_checks: str = "") -> None:
  """Loads the HF checkpoint in `directory` straight onto a data x fsdp x tensor mesh of 8 forced
  CPU devices (in a subprocess) and asserts: gate_proj's kernel spans the 8 devices with local
  shards of `kernel_shard`, `extra_checks` (Python lines over `params`) hold, and the logits equal
  transformers' (`model`) within 1e-4."""
  import os
  import subprocess
  import sys
  import textwrap
  from conftest import forced_devices_flags
  np.save(tmp_path / "ids.npy", ids)
  np.save(tmp_path / "ref.npy", torch_logits(model, ids))
  tests = os.path.dirname(os.path.abspath(__file__))
  extra = textwrap.indent(textwrap.dedent(extra_checks), "    ")
  script = textwrap.dedent(f"""
    import sys, numpy as np, jax, ml_collections
    sys.path.insert(0, {tests!r})
    from hf_tiny import jaxft_logits, rel_err
    from jaxft import sharding
    from jaxft.models import hf, llama
    assert jax.device_count() == 8
    mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=2, fsdp=2, tensor=2)))
    cfg = hf.read_config({directory!r})
    params = hf.load_params({directory!r}, cfg, sharding.tree_shardings(llama.param_specs(cfg), mesh))
    k = params["layers"]["gate_proj"]["kernel"]
    assert len(k.sharding.device_set) == 8, k.sharding
    assert k.addressable_shards[0].data.shape == {tuple(kernel_shard)!r}, k.sharding
{extra}
    err = rel_err(jaxft_logits(cfg, params, np.load({str(tmp_path / 'ids.npy')!r})),
                  np.load({str(tmp_path / 'ref.npy')!r}))
    assert err < 1e-4, err
    print("OK")
  """)
  env = dict(os.environ, XLA_FLAGS=forced_devices_flags(8), JAX_PLATFORMS="cpu")
  r = subprocess.run([sys.executable, "-c", script], cwd=os.path.dirname(tests), env=env,
                     capture_output=True, text=True, timeout=300)
  assert r.returncode == 0 and "OK" in r.stdout, r.stderr[-3000:]


# A chat template of the tests' own (the quickstart tokenizer ships none): every role in brackets,
# the assistant's turn ended by the eos token.
TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% if m['role'] == "
            "'assistant' %}{{ eos_token }}{% endif %}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def chat_base(directory: str, kind: str, **overrides):
  """make_tiny(kind) with the quickstart's 32000-token Mistral tokenizer and TEMPLATE saved beside
  it in `directory` (a checkpoint a chat run can start from); returns the torch model."""
  from jaxft.data.tokenize import load_tokenizer, write_quickstart_tokenizer
  model = make_tiny(kind, directory, vocab_size=32000, **overrides)
  tok = load_tokenizer(write_quickstart_tokenizer(directory + "-tok"))
  tok.chat_template = TEMPLATE
  tok.save_pretrained(directory)
  return model


def chat_config(root, base: str, **over):
  """configs/base.py training the checkpoint `base` on 8 toy chat rows (root/train.jsonl, sums):
  LoRA, 32-token rows, batch 2, lr 1e-2 without warmup, 3 steps logged each, quiet; keyword
  arguments set dotted keys ({"model.quant": "nf4"})."""
  import json
  from conftest import make_config
  data = root / "train.jsonl"
  with open(data, "w") as f:
    for i in range(8):
      f.write(json.dumps({"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                                       {"role": "assistant", "content": f"{2 * i}"}]}) + "\n")
  return make_config("base", **{
      "model.path": base, "data.train": str(data), "data.max_len": 32, "data.batch_size": 2,
      "optim.lr": 1e-2, "optim.warmup_steps": 0, "train.steps": 3, "train.log_every": 1,
      "train.progress": False, **over})
