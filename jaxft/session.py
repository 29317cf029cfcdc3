"""Builds what every entry point needs from a resolved config: the model config, the fine-tuning
method, the mesh, the tokenizer, and the base parameters placed on the mesh."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os

import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from jax.sharding import Mesh

from jaxft import checkpoint, configlib, peft, quant, sharding, target
from jaxft.data.tokenize import Encoder, load_tokenizer, write_quickstart_tokenizer
from jaxft.errors import ConfigError
from jaxft.models import gguf, hf, llama, quantized
from jaxft.models.config import ModelConfig, preset
from jaxft.peft import peft_io

_DTYPES = ("float32", "bfloat16", "float16", "auto")
# CPU instruction sets (Linux /proc/cpuinfo flags) whose bfloat16 dot products run at speed in
# XLA's CPU backend; without them bf16 dots are emulated, slower than float32 ones.
_BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


@functools.lru_cache(maxsize=None)
def cpu_has_fast_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
  """Whether this host's CPU has bfloat16 dot instructions (AMX or AVX512-BF16)."""
  try:
    with open(cpuinfo, encoding="utf-8", errors="replace") as f:
      flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
  except OSError:  # not Linux: no way to tell, float32 is the safe choice
    return False
  return any(flag in flags for flag in _BF16_CPU_FLAGS)


def resolve_dtype(name: str, platform: str, fast_bf16_cpu: bool) -> str:
  """model.dtype / model.param_dtype: `auto` is bfloat16 on accelerators and on CPUs with bf16 dot
  instructions, else float32 (measured on a 2-core CPU without them: a bf16 LoRA step of
  SmolLM2-135M ran 1.43x slower than the float32 one); other names are themselves."""
  if name != "auto":
    return name
  return "bfloat16" if platform != "cpu" or fast_bf16_cpu else "float32"


def _resolved_dtypes(m) -> tuple[str, str]:
  if "auto" not in (m.dtype, m.param_dtype):
    return m.dtype, m.param_dtype  # (without touching the backend)
  platform, fast = target.platform(), cpu_has_fast_bf16()
  out = resolve_dtype(m.dtype, platform, fast), resolve_dtype(m.param_dtype, platform, fast)
  _log_auto_dtypes(out, platform, fast)
  return out


@functools.lru_cache(maxsize=None)
def _log_auto_dtypes(dtypes, platform, fast) -> None:
  why = ("an accelerator" if platform != "cpu" else
         "a CPU with bf16 dot instructions" if fast else "a CPU without bf16 dot instructions")
  logging.info("model dtype=auto: compute %s, parameters %s (%s)", *dtypes, why)


def model_config(config: ml_collections.ConfigDict) -> ModelConfig:
  """The ModelConfig of config.model (HF config.json when model.path is set, else the preset)."""
  m = config.model
  for key in ("dtype", "param_dtype"):
    if m[key] not in _DTYPES:
      raise ConfigError(f"model.{key}={m[key]!r}: expected one of {', '.join(_DTYPES)}")
  if m.path:
    base = (gguf if gguf.is_gguf(m.path) else hf).read_config(m.path)
  else:
    base = preset(m.preset)
  aux = base.router_aux_coef if m.router_aux_coef < 0 else float(m.router_aux_coef)
  dtype, param_dtype = _resolved_dtypes(m)
  return base.replace(dtype=dtype, param_dtype=param_dtype, remat=m.remat,
                      attention=m.attention, mlp_tile=m.mlp_tile, router_aux_coef=aux)


def own_tokenizer(config: ml_collections.ConfigDict) -> bool:
  """Whether the tokenizer directory is one jaxft writes (the quickstart's, a GGUF file's)."""
  return not config.model.tokenizer and (gguf.is_gguf(config.model.path) or not config.model.path)


def tokenizer_dir(config: ml_collections.ConfigDict, workdir: str) -> str:
  """The tokenizer directory: model.tokenizer, else model.path (a GGUF file's tokenizer is written
  into WORKDIR/tokenizer), else the quickstart tokenizer (written into WORKDIR/tokenizer)."""
  if not own_tokenizer(config):
    return config.model.tokenizer or config.model.path
  if gguf.is_gguf(config.model.path):
    return gguf.write_tokenizer(config.model.path, os.path.join(workdir, "tokenizer"))
  return write_quickstart_tokenizer(os.path.join(workdir, "tokenizer"))


def stop_ids(config) -> tuple[int, ...]:
  """The ids that end a generation: the model's EOS ids (config.json) and generation_config.json's
  of model.path, if any."""
  eos = model_config(config).eos_token_id
  ids = set(eos if isinstance(eos, tuple) else () if eos is None else (eos,))
  gen = os.path.join(config.model.path, "generation_config.json") if config.model.path else ""
  if gen and os.path.isfile(gen):
    try:
      with open(gen, encoding="utf-8") as f:
        g = json.load(f).get("eos_token_id")
    except (OSError, ValueError) as e:
      raise ConfigError(f"{gen}: not valid JSON ({e})") from None
    ids |= set(g if isinstance(g, list) else () if g is None else (g,))
  return tuple(sorted(int(i) for i in ids))


def encoder(config, workdir: str) -> Encoder:
  """The tokenizer and chat template a run renders rows with; errors of the template name the
  file it came from."""
  directory = tokenizer_dir(config, workdir)
  tok = load_tokenizer(directory, written_by_jaxft=own_tokenizer(config))
  source = ""
  if not config.data.chat_template and tok.chat_template:
    for name in ("chat_template.jinja", "chat_template.json", "tokenizer_config.json"):
      if os.path.isfile(os.path.join(directory, name)):
        source = os.path.join(directory, name)
        break
  return Encoder(tok, config.data.chat_template, source, stop_ids(config))


@dataclasses.dataclass
class Model:
  """A model on the mesh: its config, method, base params and their shardings."""
  cfg: ModelConfig
  method: peft.Method
  mesh: Mesh
  base: dict
  base_shardings: dict
  added_shardings: dict
  fingerprint: str
  init_from: str = ""  # a PEFT adapter directory the trainable leaves start from


def _numerics_only(config) -> tuple[str, ...]:
  """The ModelConfig fields set from model.* keys that do not fix the base (configlib's
  declaration): dtype, remat, attention, mlp_tile, ... A resume may change them."""
  return tuple(f.name for f in dataclasses.fields(ModelConfig)
               if f.name in config.model and configlib.effect(f"model.{f.name}") != configlib.SHAPE)


def _fingerprint(config, cfg: ModelConfig) -> str:
  """What identifies the frozen base a PEFT checkpoint needs (checked again on resume)."""
  src = {"path": os.path.abspath(config.model.path) if config.model.path else "",
         "preset": "" if config.model.path else config.model.preset,
         "seed": config.train.seed, "quant": config.model.quant, "model": {k: v for k, v in dataclasses.asdict(cfg).items()
                   if k not in _numerics_only(config)}}
  return hashlib.sha256(json.dumps(src, sort_keys=True, default=str).encode()).hexdigest()[:16]


def load_model(config: ml_collections.ConfigDict, mesh: Mesh | None = None) -> Model:
  """Model config, method and base params, already sharded on the mesh (and quantized if asked)."""
  cfg = model_config(config)
  method = peft.from_config(config.peft, cfg)
  if config.peft.init_from:  # the adapter's rank, alpha and targets win over the config's
    method = peft_io.adopt_settings(config.peft.init_from, method, cfg)
  mesh, rules = sharding.checked_mesh(config, cfg, mesh)
  specs = llama.param_specs(cfg)
  base_sh = sharding.tree_shardings(specs, mesh, rules)
  added_sh = sharding.spread_over_fsdp(
      sharding.tree_shardings(method.trainable_specs(cfg), mesh, rules), method.trainable_specs(cfg))
  if config.model.quant not in quant.KINDS:
    raise ConfigError(f"model.quant={config.model.quant!r}: expected one of {', '.join(quant.KINDS)}")
  if config.model.quant != "none" and method.trains_base:
    raise ConfigError("model.quant needs a frozen base: use peft.method=lora (or another PEFT method)")
  if config.model.path:
    base = (gguf if gguf.is_gguf(config.model.path) else hf).load_params(
        config.model.path, cfg, base_sh, quant_kind=config.model.quant)
  else:
    # One kernel at a time, quantized as it is made: the float model never exists whole.
    base = quantized.init_base(cfg, jax.random.key(config.train.seed), config.model.quant, base_sh)
  return Model(cfg, method, mesh, base, base_sh, added_sh, _fingerprint(config, cfg),
               config.peft.init_from)


def init_added(model: Model, seed: int):
  """The method's new trainable leaves, initialised on their shardings (or read from the PEFT
  adapter of peft.init_from)."""
  if model.init_from:
    return peft_io.read_lora_weights(model.init_from, model.cfg, model.method,
                                     model.added_shardings)
  fn = jax.jit(model.method.init, static_argnums=0, out_shardings=model.added_shardings)
  added = fn(model.cfg, jax.random.fold_in(jax.random.key(seed), 1))
  # Leaves that depend on the base (DoRA's magnitudes), computed where they will live.
  complete = jax.jit(model.method.init_from_base, static_argnums=0,
                     out_shardings=model.added_shardings, donate_argnums=2)
  return complete(model.cfg, model.base, added)


def load_workdir_config(workdir: str) -> ml_collections.ConfigDict:
  """The resolved config a training run wrote to WORKDIR/config.json, laid over today's defaults
  (configs/base.py's schema, so a workdir from before a key existed still loads), locked.

  Keys the saved config has that the schema lacks are ignored with a warning."""
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    raise ConfigError(f"{workdir}: no config.json (is this a jaxft workdir? train first)")
  try:
    with open(path, encoding="utf-8") as f:
      saved = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ConfigError(f"{path}: not valid JSON ({e})") from None
  c = configlib.base_config()

  def overlay(node, values, prefix):
    for k, v in values.items():
      if k not in node:
        logging.warning("%s: ignoring unknown key %s%s", path, prefix, k)
      elif isinstance(v, dict) and isinstance(node[k], ml_collections.ConfigDict):
        overlay(node[k], v, f"{prefix}{k}.")
      else:
        node[k] = v

  overlay(c, saved, "")
  c.lock()
  return c


@dataclasses.dataclass
class Trained:
  """A trained run, restored: its config, model (base on the mesh) and trainable leaves."""
  config: ml_collections.ConfigDict
  model: Model
  trainable: dict
  frozen: dict
  step: int

  @property
  def params(self) -> dict:
    """The decoder's view: frozen and trainable leaves merged (no copies)."""
    return peft.merge_trees(self.frozen, self.trainable)


def restore_trained(workdir: str, config: ml_collections.ConfigDict | None = None,
                    step: int | None = None) -> Trained:
  """Rebuilds the base and restores the trainable leaves of WORKDIR's newest intact checkpoint
  (or of `step`): a newer checkpoint whose files fail their checksums or do not restore is
  skipped with a warning naming the damage. Nothing is written into WORKDIR.

  `config` defaults to WORKDIR/config.json. Raises CheckpointError, before the base loads, when
  there is no checkpoint or none of `step`; after it, when no checkpoint is intact (or `step` is
  damaged).
  """
  config = config or load_workdir_config(workdir)
  checkpoint.read_meta(workdir, step)  # no checkpoint, or no such step: say so before loading
  model = load_model(config)
  added = init_added(model, config.train.seed)
  trainable, frozen = model.method.split(model.base, added)
  item = {"trainable": checkpoint.abstract(trainable)}
  restore_args = jax.tree.map(lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding),
                              {"trainable": trainable})
  mngr = checkpoint.reader(workdir)

  def restore_fn(s):
    out = mngr.restore(s, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item=item, restore_args=restore_args, partial_restore=True)))
    return out["state"]["trainable"]

  try:
    step, restored = checkpoint.restore_newest_intact(mngr, restore_fn, step=step)
  finally:
    mngr.close()
  return Trained(config, model, restored, frozen, int(step))
