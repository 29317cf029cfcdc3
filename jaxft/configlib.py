"""Helpers for config files: variant arguments and loading the shared base config by path."""

from __future__ import annotations

import importlib.util
import os

import ml_collections

from jaxft.errors import ConfigError


def sibling(config_file: str, name: str):
  """Imports configs/NAME.py next to `config_file` (configs are files, not an installed package)."""
  path = os.path.join(os.path.dirname(os.path.abspath(config_file)), f"{name}.py")
  spec = importlib.util.spec_from_file_location(f"jaxft_config_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """Parses a variant argument 'size=8b,method=lora' against typed defaults.

  Raises ConfigError for a key that is not in `defaults`, naming the choices.
  """
  out = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, sep, value = item.partition("=")
    if not sep or key not in defaults:
      raise ConfigError(f"config argument {item!r}: expected KEY=VALUE with KEY one of {sorted(defaults)}")
    kind = type(defaults[key])
    if kind is bool:
      out[key] = value.lower() in ("1", "true", "yes")
    else:
      out[key] = kind(value)
  return out


def apply_method(c: ml_collections.ConfigDict, method: str) -> None:
  """Sets peft.method and model.quant for a variant name: lora, qlora, int8, full (or any
  peft.method name)."""
  shortcuts = {"qlora": ("lora", "nf4"), "int8": ("lora", "int8")}
  c.peft.method, quant = shortcuts.get(method, (method, "none"))
  c.model.quant = quant


def base_config() -> ml_collections.ConfigDict:
  """configs/base.py's defaults (the schema), found next to the package or in the working tree."""
  here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  for root in (here, os.getcwd()):
    path = os.path.join(root, "configs", "base.py")
    if os.path.isfile(path):
      return sibling(path, "base").get_config()
  raise ConfigError("configs/base.py not found: run from the jaxft checkout")


def real_model_defaults(c: ml_collections.ConfigDict, preset: str, method: str) -> None:
  """What the published-model configs (llama3.py, mistral.py) share: bf16, remat, a preset shape,
  the method variant, 2k-token rows and a 1000-step schedule with periodic eval and checkpoints."""
  c.model.preset = preset
  c.model.dtype = "bfloat16"
  c.model.param_dtype = "bfloat16"
  c.model.remat = "dots"
  apply_method(c, method)
  c.data.max_len = 2048
  c.data.batch_size = 16
  c.optim.lr = 2e-4
  c.optim.warmup_steps = 50
  c.train.steps = 1000
  c.train.eval_every = 200
  c.checkpoint.every = 200
