"""Every shipped config resolves, and runs end to end when pointed at the tiny model and data."""

import glob
import os

import pytest

from conftest import ROOT, make_config, run_cli
from jaxft import configlib

CONFIGS = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "configs", "[a-z]*.py")))

load = make_config


def test_base_is_the_schema_for_every_config():
  base_keys = set(_flat(load("base").to_dict()))
  for name in CONFIGS:
    assert set(_flat(load(name).to_dict())) == base_keys, name


def _flat(d, prefix=""):
  for k, v in d.items():
    if isinstance(v, dict):
      yield from _flat(v, f"{prefix}{k}.")
    else:
      yield f"{prefix}{k}"


@pytest.mark.parametrize("arg,preset,method,quant", [
    ("size=8b,method=qlora", "llama3-8b", "lora", "nf4"),
    ("size=1b,method=int8", "llama3-1b", "lora", "int8"),
    ("size=70b,method=full", "llama3-70b", "full", "none"),
])
def test_llama3_variants(arg, preset, method, quant):
  c = load("llama3", arg)
  assert (c.model.preset, c.peft.method, c.model.quant) == (preset, method, quant)


@pytest.mark.parametrize("name,arch,billions", [
    ("qwen3", "Qwen3ForCausalLM", 8.19), ("gemma2", "Gemma2ForCausalLM", 9.24),
    ("gemma3", "Gemma3ForCausalLM", 11.77),  # Gemma 3 12B's language model (no vision tower)
    ("mixtral", "MixtralForCausalLM", 46.70), ("qwen3_moe", "Qwen3MoeForCausalLM", 30.53),
])
def test_family_configs_have_the_published_sizes(name, arch, billions):
  import jax
  import numpy as np
  from jaxft.models import llama
  from jaxft.models.config import preset
  c = load(name, "method=qlora")
  assert (c.peft.method, c.model.quant, c.peft.targets) == ("lora", "nf4", "all-linear")
  cfg = preset(c.model.preset)
  assert cfg.architecture == arch
  n = sum(int(np.prod(s.shape)) for s in jax.tree.leaves(llama.param_specs(cfg), is_leaf=llama.is_spec))
  assert round(n / 1e9, 2) == billions


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in CONFIGS if n != "base"])
def test_each_shipped_config_trains_on_tiny_data(tmp_path, name):
  from jaxft.data import bundled
  # A config that trains toward the base on marked rows (train.base_kl) needs data with such rows.
  data = "tessaline" if load(name).train.base_kl > 0 else "capitals"
  r = run_cli("jaxft.train", f"--config=configs/{name}.py", f"--workdir={tmp_path / name}",
              # The tiny preset, also for configs that name a real model (smollm2: its GGUF path
              # is tested end to end on a 2-layer copy in test_gguf.py).
              "--config.model.path=", "--config.model.preset=tiny", "--config.model.quant=none",
              "--config.train.steps=2",
              "--config.data.max_len=64", "--config.data.batch_size=4", "--config.train.progress=False",
              f"--config.data.train={bundled.path(data + '_train.jsonl')}",
              f"--config.data.eval={bundled.path(data + '_eval.jsonl')}",
              "--config.train.eval_batches=1")
  assert r.returncode == 0, r.stderr[-3000:]
  assert os.path.isdir(tmp_path / name / "checkpoints" / "2")


@pytest.mark.slow
def test_bad_variant_argument_exits_2(tmp_path):
  r = run_cli("jaxft.train", "--config=configs/llama3.py:sz=1", f"--workdir={tmp_path}")
  assert r.returncode == 2
  assert "config argument 'sz=1'" in r.stderr.strip().splitlines()[-1]


def test_config_names_and_checkout_paths_load_the_shipped_configs(tmp_path, monkeypatch):
  shipped = os.path.join(ROOT, "configs", "quickstart.py")
  monkeypatch.chdir(tmp_path)  # anywhere: an installed jaxft has no configs/ beside it
  assert configlib.resolve("quickstart") == shipped
  assert configlib.resolve("quickstart:method=dora") == shipped + ":method=dora"
  assert configlib.resolve("configs/quickstart.py:method=dora") == shipped + ":method=dora"
  own = tmp_path / "configs" / "quickstart.py"
  own.parent.mkdir()
  own.write_text("x = 1\n")
  assert configlib.resolve("configs/quickstart.py") == "configs/quickstart.py"  # a file wins
  assert configlib.resolve("nosuch:a=1") == "nosuch:a=1"  # left for the loader to refuse
  assert configlib.base_config().peft.method == load("base").peft.method
  with pytest.raises(configlib.ConfigError, match="no shipped config 'nosuch'.*quickstart"):
    configlib.load("nosuch")


@pytest.mark.slow
def test_config_by_name_on_the_command_line(tmp_path):
  # The config loads (a missing checkpoint is the next thing generate reports), from a directory
  # without configs/; a name that is no config fails as one line.
  r = run_cli("jaxft.generate", "--config=quickstart:method=dora", f"--workdir={tmp_path}",
              "--prompt=hi", cwd=str(tmp_path))
  assert r.returncode == 2, r.stderr[-2000:]
  assert "checkpoint" in r.stderr.strip().splitlines()[-1]
  r = run_cli("jaxft.train", "--config=nosuch", f"--workdir={tmp_path / 'w'}", cwd=str(tmp_path))
  assert r.returncode == 2
  assert "--config: cannot load the config file" in r.stderr.strip().splitlines()[-1]


def test_every_declared_key_effect_names_a_key_of_the_schema():
  # A misspelt declaration would silently make its key NUMERICS (a resume that should be refused
  # would only warn).
  keys = set(_flat(load("base").to_dict()))
  for name in configlib.KEY_EFFECTS:
    assert any(k == name or k.startswith(name + ".") for k in keys), name
  assert configlib.effect("peft.adapter.size") == configlib.SHAPE
  assert configlib.effect("optim.lr") == configlib.NUMERICS
  assert configlib.effect("mesh.data") == configlib.NOTHING
  from jaxft import session
  assert session._numerics_only(load("base")) == ("dtype", "remat", "attention", "mlp_tile",
                                                 "router_aux_coef")


def test_auto_dtype_is_bf16_where_bf16_matmuls_are_fast_and_float32_elsewhere(tmp_path):
  from jaxft import session
  intel = tmp_path / "intel"
  intel.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n")
  amd = tmp_path / "amd"
  amd.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f\n")
  assert session.cpu_has_fast_bf16(str(intel)) and not session.cpu_has_fast_bf16(str(amd))
  assert not session.cpu_has_fast_bf16(str(tmp_path / "missing"))  # not Linux: float32
  assert session.resolve_dtype("auto", "cpu", True) == "bfloat16"
  assert session.resolve_dtype("auto", "cpu", False) == "float32"
  assert session.resolve_dtype("auto", "tpu", False) == "bfloat16"
  assert session.resolve_dtype("float32", "tpu", True) == "float32"  # a named dtype is kept
  # The model config the trainer builds takes the resolved names (this host's CPU decides).
  c = load("smollm2")
  c.model.path, c.model.preset = "", "tiny"
  want = "bfloat16" if session.cpu_has_fast_bf16() else "float32"
  cfg = session.model_config(c)
  assert (cfg.dtype, cfg.param_dtype) == (want, want)
