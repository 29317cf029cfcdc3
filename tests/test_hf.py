"""HF checkpoints in (and straight back out): config.json spellings, logits parity with
transformers, sharded and bf16 safetensors, streaming memory, quantization on load, and every
refusal."""

import json
import os
import pickle
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from conftest import ROOT
from hf_tiny import (check_sharded_load, check_written_back, jaxft_logits, load_tiny, make_tiny,
                     one_device_shardings, rel_err, torch_logits)
from jaxft.errors import CheckpointError, ConfigError
from jaxft.models import hf

KINDS = ("llama", "mistral", "qwen2")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """kind -> (checkpoint dir, torch model), made on first use."""
  made = {}

  def get(kind):
    if kind not in made:
      d = str(tmp_path_factory.mktemp(kind))
      made[kind] = (d, make_tiny(kind, d))
    return made[kind]
  return get


def _ids(t=12, vocab=128, batch=2):
  return np.random.RandomState(0).randint(0, vocab, (batch, t))


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_logits_match_transformers(tiny, kind, tmp_path, capfd):
  d, model = tiny(kind)
  ids = _ids()
  ref = torch_logits(model, ids)
  cfg, params = load_tiny(d)
  assert rel_err(jaxft_logits(cfg, params, ids), ref) < 1e-4
  # ... and written back, transformers reads the same model, with no weight left out or over.
  check_written_back(cfg, params, model, ids, ref, str(tmp_path / "out"), capfd)
  # The feature each architecture brings is exercised: without it the logits would differ.
  if kind == "llama":
    assert cfg.num_kv_heads < cfg.num_heads and dict(cfg.rope_scaling)["rope_type"] == "llama3"
    assert rel_err(jaxft_logits(cfg.replace(rope_scaling=None), params, ids), ref) > 1e-3
  if kind == "mistral":
    assert cfg.sliding_window == 4 < ids.shape[1]
    assert rel_err(jaxft_logits(cfg.replace(sliding_window=None), params, ids), ref) > 1e-3
  if kind == "qwen2":
    assert cfg.qkv_bias and cfg.tie_embeddings and "lm_head" not in params
    assert "bias" in params["layers"]["q_proj"]


def test_read_config_transformers4_spelling(tiny, tmp_path):
  d, _ = tiny("llama")
  with open(os.path.join(d, "config.json")) as f:
    c = json.load(f)
  v5 = hf.read_config(d)
  rope = c.pop("rope_parameters")
  c.pop("dtype", None)
  c.pop("head_dim")  # derived: hidden_size / num_attention_heads
  c["rope_theta"] = rope.pop("rope_theta")
  rope["type"] = rope.pop("rope_type")  # the oldest spelling
  c["rope_scaling"] = rope
  c["torch_dtype"] = "bfloat16"
  (tmp_path / "config.json").write_text(json.dumps(c))
  assert hf.read_config(str(tmp_path)) == v5
  assert hf.checkpoint_dtype(str(tmp_path)) == "bfloat16"


def test_read_config_qwen2_sliding_window(tmp_path):
  base = {"architectures": ["Qwen2ForCausalLM"], "vocab_size": 16, "hidden_size": 8,
          "intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
          "num_key_value_heads": 1, "rope_theta": 10000.0, "sliding_window": 32}
  (tmp_path / "config.json").write_text(json.dumps(dict(base, use_sliding_window=False)))
  assert hf.read_config(str(tmp_path)).sliding_window is None
  (tmp_path / "config.json").write_text(json.dumps(dict(base, use_sliding_window=True,
                                                        max_window_layers=0)))
  assert hf.read_config(str(tmp_path)).sliding_window == 32
  (tmp_path / "config.json").write_text(json.dumps(dict(base, use_sliding_window=True,
                                                        max_window_layers=1)))
  with pytest.raises(ConfigError, match="config.json.*mixes sliding and full"):
    hf.read_config(str(tmp_path))


@pytest.mark.slow
def test_sharded_bf16_checkpoint(tmp_path):
  """An index over several files, bf16 on disk: loads, cast to the configured param dtype."""
  import jax.numpy as jnp
  import torch
  model = make_tiny("llama", str(tmp_path), dtype=torch.bfloat16, max_shard_size="60KB")
  assert os.path.isfile(tmp_path / hf.INDEX)
  assert len([n for n in os.listdir(tmp_path) if n.endswith(".safetensors")]) > 2
  assert hf.checkpoint_dtype(str(tmp_path)) == "bfloat16"
  cfg = hf.read_config(str(tmp_path))
  _, p16 = load_tiny(str(tmp_path), cfg.replace(param_dtype="bfloat16"))
  _, p32 = load_tiny(str(tmp_path), cfg)
  assert p16["layers"]["q_proj"]["kernel"].dtype == jnp.bfloat16
  assert p32["layers"]["q_proj"]["kernel"].dtype == jnp.float32
  want = model.model.layers[1].mlp.down_proj.weight.detach().float().numpy().T
  np.testing.assert_array_equal(np.asarray(p32["layers"]["down_proj"]["kernel"][1]), want)
  # The peer in float32 read from the bf16 files (a model cast down and up again would keep
  # bf16-rounded rotary frequencies).
  import transformers
  peer = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32)
  ids = _ids()
  assert rel_err(jaxft_logits(cfg, p32, ids), torch_logits(peer.eval(), ids)) < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_quantized_as_loaded(tiny, kind):
  """model.quant: kernels arrive quantized, exactly as quantizing the float kernel layer by layer."""
  import jax
  from jaxft import quant
  d, _ = tiny("llama")
  cfg, ref = load_tiny(d)
  _, q = load_tiny(d, quant_kind=kind)
  assert all(quant.is_quantized(q["layers"][n]["kernel"]) for n in ("q_proj", "down_proj"))
  got = q["layers"]["down_proj"]["kernel"]
  want = jax.lax.map(lambda w: quant.quantize(w, kind), ref["layers"]["down_proj"]["kernel"])
  np.testing.assert_array_equal(np.asarray(got.dequantize(jax.numpy.float32)),
                                np.asarray(want.dequantize(jax.numpy.float32)))
  np.testing.assert_array_equal(np.asarray(q["embed"]["embedding"]), np.asarray(ref["embed"]["embedding"]))


@pytest.mark.slow
def test_sharded_load_on_8_devices(tiny, tmp_path):
  """Loaded straight onto a data x fsdp x tensor mesh; same logits as transformers."""
  d, model = tiny("llama")
  check_sharded_load(d, model, _ids(), tmp_path, (2, 32, 48))


_RSS_SCRIPT = textwrap.dedent("""
  import sys, jax, numpy as np
  from jaxft.models import hf
  sys.path.insert(0, sys.argv[3])
  from hf_tiny import one_device_shardings

  def status(key):
    for line in open("/proc/self/status"):
      if line.startswith(key + ":"):
        return int(line.split()[1]) * 1024

  def load(d):
    cfg = hf.read_config(d)
    return jax.block_until_ready(hf.load_params(d, cfg, one_device_shardings(cfg)))

  load(sys.argv[1])  # warm up: the backend and the compiler's own memory
  with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # resets VmHWM to the current RSS
  before = status("VmRSS")
  params = load(sys.argv[2])
  held = sum(x.nbytes for x in jax.tree.leaves(params))
  print(status("VmHWM") - before, held)
""")


def _write_llama(d, hidden, inter, layers, vocab, heads=4, kv=2):
  """A random Llama checkpoint written with safetensors' numpy API; returns its tensor bytes."""
  from safetensors.numpy import save_file
  os.makedirs(d, exist_ok=True)
  hd = hidden // heads
  cfg = {"architectures": ["LlamaForCausalLM"], "vocab_size": vocab, "hidden_size": hidden,
         "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
         "num_key_value_heads": kv, "rope_theta": 10000.0, "tie_word_embeddings": False}
  with open(os.path.join(d, "config.json"), "w") as f:
    json.dump(cfg, f)
  rng = np.random.default_rng(0)
  t = {"model.embed_tokens.weight": (vocab, hidden), "lm_head.weight": (vocab, hidden),
       "model.norm.weight": (hidden,)}
  for i in range(layers):
    p = f"model.layers.{i}."
    t.update({p + "input_layernorm.weight": (hidden,), p + "post_attention_layernorm.weight": (hidden,),
              p + "self_attn.q_proj.weight": (heads * hd, hidden),
              p + "self_attn.k_proj.weight": (kv * hd, hidden),
              p + "self_attn.v_proj.weight": (kv * hd, hidden),
              p + "self_attn.o_proj.weight": (hidden, heads * hd),
              p + "mlp.gate_proj.weight": (inter, hidden), p + "mlp.up_proj.weight": (inter, hidden),
              p + "mlp.down_proj.weight": (hidden, inter)})
  arrays = {k: rng.standard_normal(s, dtype=np.float32) for k, s in t.items()}
  save_file(arrays, os.path.join(d, "model.safetensors"))
  return sum(a.nbytes for a in arrays.values())


@pytest.mark.slow
def test_streaming_load_keeps_host_memory_low(tmp_path):
  """Loading N MB of tensors raises peak RSS by less than N/2 beyond the loaded params themselves
  (on the CPU backend the devices' memory is the process's, so the params count in RSS)."""
  warm, big = str(tmp_path / "warm"), str(tmp_path / "big")
  _write_llama(warm, 64, 128, 2, 64)
  n = _write_llama(big, 256, 768, 24, 512)
  assert n > 60 * 2**20
  r = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, warm, big, os.path.join(ROOT, "tests")],
                     cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True,
                     text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  rise, held = map(int, r.stdout.split())
  assert held == n
  assert rise - held < n / 2, f"peak RSS rose {rise / 2**20:.1f} MB for {n / 2**20:.1f} MB of params"


# -- refusals -------------------------------------------------------------------------------------

def _copy(src, dst):
  shutil.copytree(src, dst)
  return str(dst)


def _rewrite(d, fn):
  from safetensors import safe_open
  from safetensors.numpy import save_file
  path = os.path.join(d, "model.safetensors")
  with safe_open(path, framework="numpy") as f:
    t = {k: f.get_tensor(k) for k in f.keys()}
  fn(t)
  save_file(t, path, metadata={"format": "pt"})


def test_no_config_json(tmp_path):
  with pytest.raises(CheckpointError, match=f"{tmp_path}: no config.json"):
    hf.read_config(str(tmp_path))
  with pytest.raises(CheckpointError, match="not a directory"):
    hf.read_config(str(tmp_path / "absent"))


def test_unsupported_architecture(tiny, tmp_path):
  d = _copy(tiny("llama")[0], tmp_path / "m")
  c = json.load(open(os.path.join(d, "config.json")))
  c["architectures"] = ["GPT2LMHeadModel"]
  json.dump(c, open(os.path.join(d, "config.json"), "w"))
  with pytest.raises(ConfigError, match=r"config.json: architecture \['GPT2LMHeadModel'\] is not supported"):
    hf.read_config(d)
  c["architectures"] = ["LlamaForCausalLM"]
  c["attention_bias"] = True  # Llama's attention bias includes o_proj, which jaxft lacks
  json.dump(c, open(os.path.join(d, "config.json"), "w"))
  with pytest.raises(ConfigError, match="attention_bias"):
    hf.read_config(d)


def test_missing_tensor(tiny, tmp_path):
  d = _copy(tiny("llama")[0], tmp_path / "m")
  _rewrite(d, lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"))
  with pytest.raises(CheckpointError, match=r"tensor model\.layers\.1\.self_attn\.k_proj\.weight is missing"):
    load_tiny(d)


def test_unexpected_tensor(tiny, tmp_path):
  d = _copy(tiny("llama")[0], tmp_path / "m")
  _rewrite(d, lambda t: t.update({"model.layers.0.self_attn.o_proj.bias": np.zeros(64, np.float32)}))
  with pytest.raises(CheckpointError, match=r"model\.safetensors: unexpected tensor "
                     r"model\.layers\.0\.self_attn\.o_proj\.bias"):
    load_tiny(d)


def test_wrong_shape(tiny, tmp_path):
  d = _copy(tiny("llama")[0], tmp_path / "m")
  _rewrite(d, lambda t: t.update({"model.layers.0.mlp.up_proj.weight": np.zeros((80, 64), np.float32)}))
  with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor model\.layers\.0\.mlp\.up_proj"
                     r"\.weight has shape \[80, 64\], expected \[96, 64\]"):
    load_tiny(d)


class _Trap:
  """Unpickling this creates a file: the proof that a pickle was (wrongly) loaded."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (open, (self.marker, "w"))


def test_pickle_checkpoint_refused_never_loaded(tiny, tmp_path):
  d = tmp_path / "m"
  d.mkdir()
  shutil.copy(os.path.join(tiny("llama")[0], "config.json"), d)
  marker = tmp_path / "unpickled"
  (d / "pytorch_model.bin").write_bytes(pickle.dumps(_Trap(str(marker))))
  cfg = hf.read_config(str(d))
  with pytest.raises(CheckpointError, match=r"pytorch_model\.bin: pickle checkpoints are refused"):
    hf.load_params(str(d), cfg, one_device_shardings(cfg))
  assert not marker.exists()
