"""--format=peft and --format=adapter: the trained adapter alone, in the format its method declares
(Method.export_format) and writes (Method.write_export: PEFT's adapter_config.json +
adapter_model.safetensors for LoRA, DoRA and prefix tuning, see jaxft/peft/peft_io.py; jaxft's
documented layout for bottleneck adapters, docs/methods.md). Each method owns its format; this
module only chooses, checks and writes atomically."""

from __future__ import annotations

import os

from absl import logging

from jaxft import peft, session
from jaxft.errors import ConfigError
from jaxft.export.output import check_out, write_atomically


def export_peft(workdir: str, out: str, *, base_model: str = "", step: int | None = None,
                overwrite: bool = False) -> str:
  """Writes WORKDIR's trained adapter in PEFT's format to OUT. base_model (recorded as
  base_model_name_or_path) defaults to model.path. Returns OUT. Raises ConfigError for a method
  with no PEFT format (full fine-tuning: use export_hf)."""
  return _export_method(workdir, out, "peft", base_model, step, overwrite)


def _export_method(workdir, out, fmt: str, base_model: str, step, overwrite) -> str:
  """The one place an adapter export is chosen: the run's method must export to `fmt`
  (peft.export_format) and writes it (Method.write_export)."""
  config = session.load_workdir_config(workdir)
  check_out(out, overwrite, workdir, config)
  name = config.peft.method
  if peft.export_format(name) != fmt:
    if fmt == "adapter":
      raise ConfigError(f"--format=adapter writes bottleneck adapters; this run trained "
                        f"peft.method={name!r} (use --format=peft or --format=hf)")
    other = f"--format={peft.export_format(name) or 'hf'}"
    raise ConfigError(f"peft.method={name!r} has no PEFT adapter format; use "
                      f"{other}. PEFT formats: {', '.join(peft.methods_exporting('peft'))}")
  if fmt == "peft":
    base_model = _base_model_name(config, workdir, base_model)
  trained = session.restore_trained(workdir, config, step=step)
  write_atomically(out, lambda tmp: trained.model.method.write_export(
      tmp, trained.model.cfg, trained.trainable, base_model or config.model.path))
  logging.info("exported %s (%s) to %s (base: %s)", name, fmt, out, base_model or "-")
  if name == "dora":
    logging.warning("vLLM cannot serve DoRA adapters (it refuses use_dora); PEFT and transformers "
                    "load this one. To serve with vLLM, export the merged model: --format=hf")
  return out


def _base_model_name(config, workdir: str, base_model: str) -> str:
  """What an adapter records as base_model_name_or_path: --base_model, else model.path; a local
  directory as an absolute path. A preset base has no directory until `--format=hf --base` writes
  one, so it must then be named."""
  if base_model:
    # PEFT resolves a relative path against the loader's working directory, not the adapter's:
    # `exported/base` broke as soon as the adapter was loaded from anywhere else.
    return os.path.abspath(base_model) if os.path.isdir(base_model) else base_model
  if config.model.path:
    return os.path.abspath(config.model.path) if os.path.isdir(config.model.path) \
        else config.model.path
  raise ConfigError(f"{workdir}: the base is the preset {config.model.preset!r}, which has no "
                    "directory for the adapter to name. Write it first with `python -m "
                    f"jaxft.export --workdir={workdir} --format=hf --base --out=BASE_DIR`, then "
                    "pass --base_model=BASE_DIR")


def export_adapter(workdir: str, out: str, *, base_model: str = "", step: int | None = None,
                   overwrite: bool = False) -> str:
  """Writes WORKDIR's trained bottleneck adapters (peft.method=adapter) to OUT in jaxft's adapter
  format (adapter_config.json + adapter_model.safetensors; see jaxft/peft/adapter.py and
  docs/methods.md). Returns OUT. Raises ConfigError for another method."""
  return _export_method(workdir, out, "adapter", base_model, step, overwrite)
