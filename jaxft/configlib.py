"""Helpers for config files: finding them (the shipped configs/, or any path), variant arguments,
and what each key means for a resumed run."""

from __future__ import annotations

import importlib.util
import math
import os

import ml_collections

from jaxft.errors import ConfigError


def _configs_dir() -> str:
  """The shipped configs: the top-level configs/ of a checkout (and of an editable install), which
  a wheel installs as the package jaxft.configs (setup.py)."""
  here = os.path.dirname(os.path.abspath(__file__))
  installed = os.path.join(here, "configs")
  return installed if os.path.isdir(installed) else os.path.join(os.path.dirname(here), "configs")


CONFIGS_DIR = _configs_dir()


def packaged(name: str) -> str:
  """The path of the config jaxft ships as configs/NAME.py ('' when there is none)."""
  path = os.path.join(CONFIGS_DIR, f"{name}.py")
  return path if name and os.path.isfile(path) else ""


def resolve(spec: str) -> str:
  """A --config value as ml_collections loads it ('PATH[:ARG]'). An existing file is itself;
  'NAME[:ARG]' and a missing 'configs/NAME.py[:ARG]' (the commands documented for a checkout)
  are the shipped configs/NAME.py; anything else is left for the loader to refuse."""
  path, sep, arg = spec.partition(":")
  if os.path.isfile(path):
    return spec
  name = os.path.basename(path)[:-3] if path.endswith(".py") else path
  plain = path == name or os.path.normpath(os.path.dirname(path)) == "configs"
  found = packaged(name) if plain else ""
  return found + sep + arg if found else spec


def sibling(config_file: str, name: str):
  """Imports NAME.py next to `config_file`, or the shipped configs/NAME.py when there is no
  such file (configs are files, loaded by path)."""
  path = os.path.join(os.path.dirname(os.path.abspath(config_file)), f"{name}.py")
  if not os.path.isfile(path) and packaged(name):
    path = packaged(name)
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


def load(name: str, arg: str | None = None) -> ml_collections.ConfigDict:
  """get_config(arg) of the shipped config configs/NAME.py (quickstart, llama3, ...)."""
  if not packaged(name):
    raise ConfigError(f"no shipped config {name!r}: expected one of "
                      f"{', '.join(sorted(n[:-3] for n in os.listdir(CONFIGS_DIR) if n[0] != '_'))}")
  return sibling(packaged(name), name).get_config(arg)


def base_config() -> ml_collections.ConfigDict:
  """configs/base.py's defaults: the schema (shipped with the package, so a workdir's saved
  config can be laid over it wherever jaxft is installed)."""
  return load("base")


def real_model_defaults(c: ml_collections.ConfigDict, preset: str, method: str) -> None:
  """What the published-model configs (llama3.py, mistral.py) share: bf16, remat, a preset shape,
  the method variant, 2k-token rows and a 1000-step schedule with periodic eval and checkpoints."""
  c.model.preset = preset
  c.model.dtype = "bfloat16"
  c.model.param_dtype = "bfloat16"
  c.model.remat = "auto"  # dots on CPU, full on accelerators (llama._remat)
  apply_method(c, method)
  c.data.max_len = 2048
  c.data.batch_size = 16
  c.optim.lr = 2e-4
  c.optim.warmup_steps = 50
  c.train.steps = 1000
  c.train.eval_every = 200
  c.checkpoint.every = 200


# What each config key fixes: the one declaration behind the trainer's resume checks and the base
# fingerprint (session). SHAPE: the saved state's shapes or the base itself (a resume is refused;
# the base fingerprint includes it). NUMERICS: what the step computes (a resume warns and records
# it in metrics.jsonl). NOTHING: how the run is driven (a resume passes silently). A key names
# itself or a section (every key under it); keys not named are NUMERICS.
SHAPE, NUMERICS, NOTHING = "shape", "numerics", "nothing"
KEY_EFFECTS = {
    "model.path": SHAPE, "model.preset": SHAPE, "model.quant": SHAPE, "model.param_dtype": SHAPE,
    "peft.method": SHAPE, "peft.targets": SHAPE, "peft.lora.rank": SHAPE, "peft.adapter": SHAPE,
    "peft.prefix": SHAPE, "optim.clip_norm": SHAPE, "optim.weight_decay": SHAPE,
    "model.dtype": NUMERICS,
    "model.remat": NOTHING, "model.attention": NOTHING, "train.log_every": NOTHING,
    "train.eval_every": NOTHING, "train.eval_batches": NOTHING, "train.eval_accuracy": NOTHING,
    "train.progress": NOTHING, "train.peak_tflops": NOTHING, "train.compile_cache": NOTHING,
    "checkpoint": NOTHING,
    "data.eval": NOTHING, "mesh": NOTHING, "eval": NOTHING,
}
SHAPE_KEYS = tuple(k for k, v in KEY_EFFECTS.items() if v == SHAPE)
LOGISTICS_KEYS = tuple(k for k, v in KEY_EFFECTS.items() if v == NOTHING)


def effect(key: str) -> str:
  """SHAPE, NUMERICS or NOTHING for a dotted config key (see KEY_EFFECTS)."""
  for name, what in KEY_EFFECTS.items():
    if key == name or key.startswith(name + "."):
      return what
  return NUMERICS


def flat(d: dict, prefix: str = "", sep: str = ".") -> dict:
  """{"a.b": v} from nested dicts (joined by `sep`)."""
  out = {}
  for k, v in d.items():
    key = f"{prefix}{sep}{k}" if prefix else k
    if isinstance(v, dict):
      out.update(flat(v, key, sep))
    else:
      out[key] = v
  return out


def changed_keys(saved: dict, current: dict) -> tuple[list[str], list[str]]:
  """(shape keys, function keys) that differ between a saved and the current config dict, each
  as "key (old -> new)"; logistics keys are left out."""
  a, b = flat(saved), flat(current)
  shape, function = [], []
  for k in sorted(a.keys() | b.keys()):
    if a.get(k) == b.get(k) or effect(k) == NOTHING:
      continue
    (shape if effect(k) == SHAPE else function).append(f"{k} ({a.get(k)!r} -> {b.get(k)!r})")
  return shape, function


def check_values(c: ml_collections.ConfigDict) -> None:
  """Range checks of the values a run needs, before anything is loaded; ConfigError names the key.
  (Keys with a fixed set of values are checked where they are read.)"""

  def need(ok, key, want):
    if not ok:
      node = c
      for part in key.split("."):
        node = node[part]
      raise ConfigError(f"{key}={node!r}: {want}")

  finite = lambda x: isinstance(x, (int, float)) and math.isfinite(x)
  need(c.train.steps >= 1, "train.steps", "must be >= 1")
  need(0 <= c.train.seed < 2**63, "train.seed", "must be in [0, 2**63)")
  need(c.train.log_every >= 1, "train.log_every", "must be >= 1")
  need(c.train.eval_every >= 0, "train.eval_every", "must be >= 0 (0 = at the start and end)")
  need(c.train.eval_batches >= 0, "train.eval_batches", "must be >= 0 (0 = all)")
  need(c.data.max_len >= 2, "data.max_len", "must be >= 2")
  need(c.data.batch_size >= 1, "data.batch_size", "must be >= 1")
  need(c.optim.accum_steps >= 1, "optim.accum_steps", "must be >= 1")
  if c.data.batch_size % c.optim.accum_steps:
    raise ConfigError(f"data.batch_size={c.data.batch_size} must be a multiple of "
                      f"optim.accum_steps={c.optim.accum_steps}")
  need(finite(c.optim.lr) and c.optim.lr > 0, "optim.lr", "must be a finite number > 0")
  need(c.optim.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
  need(finite(c.optim.min_lr_ratio) and 0 <= c.optim.min_lr_ratio <= 1, "optim.min_lr_ratio",
       "must be in [0, 1]")
  need(finite(c.optim.weight_decay) and c.optim.weight_decay >= 0, "optim.weight_decay",
       "must be >= 0")
  for key in ("b1", "b2"):
    need(finite(c.optim[key]) and 0 <= c.optim[key] < 1, f"optim.{key}", "must be in [0, 1)")
  need(finite(c.optim.eps) and c.optim.eps >= 0, "optim.eps", "must be >= 0")
  need(finite(c.optim.clip_norm) and c.optim.clip_norm >= 0, "optim.clip_norm",
       "must be >= 0 (0 = no clipping)")
  need(c.peft.lora.rank >= 1, "peft.lora.rank", "must be >= 1")
  need(finite(c.peft.lora.alpha) and c.peft.lora.alpha > 0, "peft.lora.alpha",
       "must be a finite number > 0 (the update is scaled by alpha / rank)")
  need(finite(c.peft.lora.dropout) and 0 <= c.peft.lora.dropout < 1, "peft.lora.dropout",
       "must be in [0, 1)")
  need(c.peft.adapter.size >= 1, "peft.adapter.size", "must be >= 1")
  need(c.peft.prefix.length >= 1, "peft.prefix.length", "must be >= 1")
  need(c.peft.prefix.mlp_hidden >= 0, "peft.prefix.mlp_hidden", "must be >= 0")
  need(c.checkpoint.every >= 0, "checkpoint.every", "must be >= 0 (0 = only at the end)")
  need(c.checkpoint.keep >= 1, "checkpoint.keep", "must be >= 1")
