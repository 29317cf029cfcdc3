"""Shared fixtures. Tests run on one CPU device; multi-device tests start subprocesses with
XLA_FLAGS=--xla_force_host_platform_device_count=8."""

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="session")
def root():
  return ROOT


@pytest.fixture(scope="session")
def quickstart_tokenizer(tmp_path_factory):
  """The Mistral v1 tokenizer the quickstart uses, as an HF tokenizer."""
  from jaxft.data.tokenize import load_tokenizer, write_quickstart_tokenizer
  return load_tokenizer(write_quickstart_tokenizer(str(tmp_path_factory.mktemp("tok"))))


def run_cli(module, *args, env=None, timeout=600, cwd=ROOT):
  """Runs `python -m module args` from the repo root (or `cwd`); returns the CompletedProcess."""
  import subprocess
  e = dict(os.environ, **(env or {}))
  return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=e, capture_output=True,
                        text=True, timeout=timeout)


def tiny_config(**over):
  """configs/quickstart.py on the tiny preset, quiet, logging every step; keyword arguments set
  dotted keys: tiny_config(**{"train.steps": 3, "peft.lora.rank": 4})."""
  from jaxft import configlib
  c = configlib.load("quickstart")
  c.model.preset = "tiny"
  c.train.progress = False
  c.train.log_every = 1
  for key, value in over.items():
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c
