"""Every shipped config resolves, and runs end to end when pointed at the tiny model and data."""

import glob
import os

import pytest

from conftest import ROOT, run_cli
from jaxft import configlib

CONFIGS = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "configs", "*.py")))


def load(name, arg=None):
  return configlib.sibling(os.path.join(ROOT, "configs", "base.py"), name).get_config(arg)


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


@pytest.mark.parametrize("name", [n for n in CONFIGS if n != "base"])
def test_each_shipped_config_trains_on_tiny_data(tmp_path, name):
  from jaxft.data import bundled
  r = run_cli("jaxft.train", f"--config=configs/{name}.py", f"--workdir={tmp_path / name}",
              # The tiny preset, also for configs that name a real model (smollm2: its GGUF path
              # is tested end to end on a 2-layer copy in test_gguf.py).
              "--config.model.path=", "--config.model.preset=tiny", "--config.model.quant=none",
              "--config.train.steps=2",
              "--config.data.max_len=64", "--config.data.batch_size=4", "--config.train.progress=False",
              f"--config.data.train={bundled.path('capitals_train.jsonl')}",
              f"--config.data.eval={bundled.path('capitals_eval.jsonl')}",
              "--config.train.eval_batches=1")
  assert r.returncode == 0, r.stderr[-3000:]
  assert os.path.isdir(tmp_path / name / "checkpoints" / "2")


def test_bad_variant_argument_exits_2(tmp_path):
  r = run_cli("jaxft.train", "--config=configs/llama3.py:sz=1", f"--workdir={tmp_path}")
  assert r.returncode == 2
  assert "config argument 'sz=1'" in r.stderr.strip().splitlines()[-1]
