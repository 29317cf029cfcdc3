"""python -m jaxft.export --workdir=W --format=hf|peft|adapter|gguf --out=OUT

`hf`: the trained method merged into the base (float32 math, then cast), written as an HF
checkpoint: config.json, generation_config.json, safetensors (sharded with an index above
--max_shard_mb) and the tokenizer files with the chat template training used. transformers, vLLM,
TGI and llama.cpp's converter read it.
`peft`: adapter_config.json + adapter_model.safetensors that `peft.PeftModel.from_pretrained` (and
vLLM's LoRA support) load on the base model: LoRA, DoRA (use_dora) and prefix tuning (the
reparameterising MLP folded away).
`adapter`: bottleneck adapters (no PEFT format; they cannot be merged either) as
adapter_config.json + adapter_model.safetensors in jaxft's documented layout (docs/methods.md).
`gguf`: the merged model, tokenizer and chat template as one GGUF file (--out=FILE.gguf,
--quant=f32|f16|bf16|q8_0|q4_k_m) that llama.cpp loads (jaxft/export_gguf.py).
`--format=hf --base`: the base model alone (a preset base, for PEFT adapters to name).

Output is written into a temporary directory beside OUT and renamed at the end, so OUT is either
absent or complete.
"""

from __future__ import annotations

import json
import os
import shutil

import jax
from absl import flags, logging

from jaxft import cli, export_gguf as eg, files, peft, session
from jaxft.errors import ConfigError
from jaxft.models import hf, llama

FORMATS = ("hf", "peft", "adapter", "gguf")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                   "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt",
                   "chat_template.jinja", "chat_template.json")
DTYPES = ("auto", "float32", "bfloat16", "float16")


def _is_workdir(path: str) -> bool:
  return os.path.isdir(os.path.join(path, "checkpoints")) or os.path.isfile(
      os.path.join(path, "jaxft.lock"))


def _inside(a: str, b: str) -> bool:
  """a is b or lies inside b (real paths)."""
  return a == b or a.startswith(b.rstrip(os.sep) + os.sep)


def _check_out(out: str, overwrite: bool, workdir: str, config=None) -> None:
  """Refuses an OUT that exists (unless --overwrite), and always one that is, contains or lies
  inside the workdir, another jaxft workdir or the model and tokenizer directories in use:
  replacing it would destroy checkpoints or the base. Also clears OUT.tmp-PID leftovers of a
  killed export."""
  if not out:
    raise ConfigError("--out is empty")
  real = os.path.realpath(out)
  used = {"--workdir": workdir}
  if config is not None:
    used["model.path"] = config.model.path
    used["model.tokenizer"] = config.model.tokenizer
  for what, path in used.items():
    if not path:
      continue
    p = os.path.realpath(path)
    if what == "model.path" and os.path.isfile(p):
      p = os.path.dirname(p)
    if _inside(real, p) or _inside(p, real):
      raise ConfigError(f"--out={out}: {'is' if real == p else 'overlaps'} the {what} directory "
                        f"in use ({path}); exporting there would destroy it. Choose a directory "
                        "outside it")
  probe = real
  while probe != os.path.dirname(probe):
    if _is_workdir(probe):
      raise ConfigError(f"--out={out}: lies inside the jaxft workdir {probe}; choose a "
                        "directory outside it")
    probe = os.path.dirname(probe)
  if os.path.isdir(real):
    for d, subdirs, _ in os.walk(real):
      if _is_workdir(d):
        raise ConfigError(f"--out={out}: contains the jaxft workdir {d}; choose another "
                          "directory")
      if d.count(os.sep) - real.count(os.sep) >= 2:
        subdirs[:] = []
  if os.path.exists(out) and not (os.path.isdir(out) and not os.listdir(out)) and not overwrite:
    raise ConfigError(f"--out={out}: already exists; choose another directory or pass --overwrite")
  for stale in files.remove_stale(os.path.abspath(out)):
    logging.warning("removed %s, left by an export that did not finish", stale)


def _merged_params(trained: session.Trained) -> dict:
  """The base with the method folded in; the tree must then be exactly the decoder's."""
  cfg, method = trained.model.cfg, trained.model.method
  merged = method.merge(cfg, trained.params)
  want = {"/".join(k.key for k in kp) for kp, _ in
          jax.tree_util.tree_flatten_with_path(llama.param_specs(cfg), is_leaf=llama.is_spec)[0]}
  have = {"/".join(k.key for k in kp) for kp, _ in
          jax.tree_util.tree_flatten_with_path(merged, is_leaf=_is_param)[0]}
  if have != want:
    extra = sorted(have - want) or sorted(want - have)
    raise ConfigError(f"peft.method={method.name}: merging left {extra[:3]} that an HF "
                      "checkpoint cannot hold; export with --format=peft instead")
  return merged


def _is_param(x) -> bool:
  return hasattr(x, "dequantize") or isinstance(x, jax.Array)


def _export_dtype(config, cfg, dtype: str) -> str:
  if dtype not in DTYPES:
    raise ConfigError(f"--dtype={dtype}: expected one of {', '.join(DTYPES)}")
  if dtype != "auto":
    return dtype
  if config.model.path:
    return hf.checkpoint_dtype(config.model.path) or cfg.param_dtype
  return cfg.param_dtype


def _write_tokenizer(config, workdir: str, out: str) -> None:
  """Writes the tokenizer training used, so that every client gives the ids it trained on: the
  source's tokenizer files, tokenizer.json (the fast tokenizer as jaxft loaded it) when the source
  has none, `legacy` set explicitly for SentencePiece tokenizers, and the chat template training
  rendered with both as chat_template.jinja (transformers 5, vLLM) and in tokenizer_config.json
  (transformers 4.x, TGI)."""
  src = session.tokenizer_dir(config, workdir)
  for name in TOKENIZER_FILES:
    if os.path.isfile(os.path.join(src, name)):
      shutil.copyfile(os.path.join(src, name), os.path.join(out, name))
  enc = session.encoder(config, workdir)
  if not os.path.isfile(os.path.join(out, "tokenizer.json")):
    enc.tok.backend_tokenizer.save(os.path.join(out, "tokenizer.json"))
  if os.path.exists(os.path.join(out, "chat_template.json")):
    os.remove(os.path.join(out, "chat_template.json"))  # one template, in the files below
  tc = os.path.join(out, "tokenizer_config.json")
  c = {}
  if os.path.isfile(tc):
    with open(tc, encoding="utf-8") as f:
      c = json.load(f)
  legacy = _legacy(enc.tok)
  if os.path.isfile(os.path.join(out, "tokenizer.model")) and legacy is not None:
    c["legacy"] = legacy
  c["chat_template"] = enc.template
  with open(tc, "w", encoding="utf-8") as f:
    json.dump(c, f, indent=2, ensure_ascii=False)
  with open(os.path.join(out, "chat_template.jinja"), "w", encoding="utf-8") as f:
    f.write(enc.template)


def _legacy(tok) -> bool | None:
  """How the SentencePiece-style tokenizer jaxft trained with treats text after a special token:
  True when every piece of text gets the "▁" prefix (SentencePiece's own behaviour, `legacy`),
  False when only the first does, None when it is not such a tokenizer."""
  pre = str(tok.backend_tokenizer.pre_tokenizer)
  norm = str(tok.backend_tokenizer.normalizer)
  if "Metaspace" in pre and "prepend_scheme=always" in pre or "Prepend" in norm:
    return True
  if "Metaspace" in pre and "prepend_scheme=first" in pre:
    return False
  return None


def _generation_config(config, cfg) -> dict:
  """generation_config.json: model.path's, else from the model config; pad and eos always set
  (pad = the model's pad id, else its first EOS id, as transformers' generate does)."""
  out = {}
  if config.model.path and os.path.isfile(os.path.join(config.model.path, "generation_config.json")):
    with open(os.path.join(config.model.path, "generation_config.json"), encoding="utf-8") as f:
      out = json.load(f)
  eos = list(cfg.eos_token_id) if isinstance(cfg.eos_token_id, tuple) else cfg.eos_token_id
  out.setdefault("bos_token_id", cfg.bos_token_id)
  if out.get("eos_token_id") is None:
    out["eos_token_id"] = eos
  if out.get("pad_token_id") is None:
    first = out["eos_token_id"][0] if isinstance(out["eos_token_id"], list) else out["eos_token_id"]
    out["pad_token_id"] = cfg.pad_token_id if cfg.pad_token_id is not None else first
  return out


def export_hf(workdir: str, out: str, *, max_shard_mb: float = 5000, dtype: str = "auto",
              step: int | None = None, overwrite: bool = False, base: bool = False) -> str:
  """Merges WORKDIR's trained method into its base and writes an HF checkpoint to OUT; with
  base=True writes the base alone (for a preset base: the one PEFT adapters of WORKDIR need).

  dtype: of the written weights; auto = the source checkpoint's (config.json dtype), else
  model.param_dtype. Returns OUT. Raises ConfigError (bad options, OUT exists, an unmergeable
  method) or CheckpointError (no checkpoint in WORKDIR).
  """
  config = session.load_workdir_config(workdir)
  _check_out(out, overwrite, workdir, config)
  if base:
    model = session.load_model(config)
    cfg, merged = model.cfg, model.base
    dtype = _export_dtype(config, cfg, dtype)
    hf.hf_config(cfg, dtype)
  else:
    trained = session.restore_trained(workdir, config, step=step)
    cfg = trained.model.cfg
    dtype = _export_dtype(config, cfg, dtype)
    hf.hf_config(cfg, dtype)  # fails early, before merging, for what HF cannot express
    merged = _merged_params(trained)
    del trained
  shards = []

  def write(tmp):  # every process gathers the tensors; process 0 (tmp != "") writes
    shards.append(hf.write_checkpoint(tmp or None, cfg, merged, dtype, max_shard_mb))
    if tmp:
      with open(os.path.join(tmp, "generation_config.json"), "w", encoding="utf-8") as f:
        json.dump(_generation_config(config, cfg), f, indent=2)
      _write_tokenizer(config, workdir, tmp)

  _write_atomically(out, write)
  if jax.process_index() == 0:
    logging.info("exported %s (%s, %d shard(s)) to %s",
                 "the base model" if base else f"{config.peft.method} merged", dtype, shards[0],
                 out)
  return out


def _write_atomically(out: str, write) -> None:
  """Runs write(tmp_dir) on every process, tmp_dir a temporary directory on process 0 and "" on
  the others, then renames it to OUT; on any failure the temporary directory is removed, so OUT is
  never half-written."""
  main = jax.process_index() == 0
  tmp = files.temp_dir(out) if main else ""
  try:
    write(tmp)
  except BaseException:
    if tmp:
      shutil.rmtree(tmp, ignore_errors=True)
    raise
  if main:
    files.publish_dir(tmp, out)


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
  _check_out(out, overwrite, workdir, config)
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
  _write_atomically(out, lambda tmp: trained.model.method.write_export(
      tmp, trained.model.cfg, trained.trainable, base_model or config.model.path))
  logging.info("exported %s (%s) to %s (base: %s)", name, fmt, out, base_model or "-")
  if name == "dora":
    logging.warning("vLLM cannot serve DoRA adapters (it refuses use_dora); PEFT and transformers "
                    "load this one. To serve with vLLM, export the merged model: --format=hf")
  return out


def _base_model_name(config, workdir: str, base_model: str) -> str:
  """What an adapter records as base_model_name_or_path: --base_model, else model.path. A preset
  base has no directory until `--format=hf --base` writes one, so it must then be named."""
  if base_model:
    return base_model
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


def export_gguf(workdir: str, out: str, *, quant: str = "f16", step: int | None = None,
                overwrite: bool = False) -> str:
  """Merges WORKDIR's trained method into its base and writes it, with the tokenizer and the chat
  template training used, as the GGUF file OUT (quant: jaxft.export_gguf.QUANTS). Returns OUT.
  Raises ConfigError (OUT not *.gguf or exists, a bad quant, what GGUF's llama architecture cannot
  hold, an unmergeable method) or CheckpointError (no checkpoint)."""
  if not out.endswith(".gguf"):
    raise ConfigError(f"--out={out}: a GGUF export is one file; name it FILE.gguf")
  if quant not in eg.QUANTS:
    raise ConfigError(f"--quant={quant}: expected one of {', '.join(eg.QUANTS)}")
  if os.path.isdir(out):
    raise ConfigError(f"--out={out}: is a directory; a GGUF export is one file")
  config = session.load_workdir_config(workdir)
  _check_out(out, overwrite, workdir, config)
  trained = session.restore_trained(workdir, config, step=step)
  cfg = trained.model.cfg
  eg.check_model(cfg)
  merged = _merged_params(trained)
  del trained
  enc = session.encoder(config, workdir)
  tok_dir = session.tokenizer_dir(config, workdir)
  main = jax.process_index() == 0
  if main and os.path.dirname(os.path.abspath(out)):
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  counts = eg.write_gguf(os.path.abspath(out) if main else None, cfg, merged, quant=quant,
                         tok_dir=tok_dir, enc=enc, name=os.path.basename(out)[:-5])
  if main:
    logging.info("exported %s merged as GGUF (%s: tensor types %s) to %s", config.peft.method,
                 quant, counts, out)
  return out


def export(workdir: str, fmt: str, out: str, **kw) -> str:
  """export_hf, export_peft, export_adapter or export_gguf by `fmt`."""
  if fmt not in FORMATS:
    raise ConfigError(f"--format={fmt!r}: expected one of {', '.join(FORMATS)}")
  if fmt == "hf":
    kw.pop("quant", None)
    return export_hf(workdir, out, **kw)
  if kw.pop("base", False):
    raise ConfigError("--base writes the base model as an HF checkpoint: use it with --format=hf")
  kw.pop("max_shard_mb", None)
  kw.pop("dtype", None)
  if fmt == "gguf":
    kw.pop("base_model", None)
    return export_gguf(workdir, out, **kw)
  kw.pop("quant", None)
  return (export_peft if fmt == "peft" else export_adapter)(workdir, out, **kw)


_WORKDIR = flags.DEFINE_string("workdir", None, "The training run's workdir.")
_FORMAT = flags.DEFINE_enum("format", "hf", FORMATS, "hf: merged model; peft: adapter only; "
                            "adapter: bottleneck adapters (peft.method=adapter); gguf: merged "
                            "model as one GGUF file for llama.cpp.")
_OUT = flags.DEFINE_string("out", None, "Output directory, or FILE.gguf for --format=gguf (must "
                           "not exist, unless --overwrite).")
_SHARD = flags.DEFINE_float("max_shard_mb", 5000, "hf: largest safetensors file before sharding.")
_DTYPE = flags.DEFINE_enum("dtype", "auto", DTYPES, "hf: weight dtype; auto = the source's.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_BASE = flags.DEFINE_string("base_model", "", "peft, adapter: base_model_name_or_path to record "
                            "(default: model.path).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace --out if it exists.")
_QUANT = flags.DEFINE_enum("quant", "f16", ("f32", "f16", "bf16", "q8_0", "q4_k_m"),
                           "gguf: weight type (q4_k_m: Q4_K with Q6_K where llama.cpp's Q4_K_M "
                           "puts it).")
_BASE_ONLY = flags.DEFINE_bool("base", False, "hf: write the base model alone (no training "
                               "merged), e.g. the preset base that --format=peft adapters name.")


def _main(argv):
  del argv
  logging.set_verbosity(logging.INFO)
  kw = {"step": _STEP.value, "overwrite": _OVERWRITE.value}
  if _FORMAT.value == "hf":
    kw.update(max_shard_mb=_SHARD.value, dtype=_DTYPE.value, base=_BASE_ONLY.value)
  elif _FORMAT.value == "gguf":
    kw.update(quant=_QUANT.value)
  else:
    kw.update(base_model=_BASE.value)
  if _BASE_ONLY.value and _FORMAT.value != "hf":
    raise ConfigError("--base writes the base model as an HF checkpoint: use it with --format=hf")
  out = export(_WORKDIR.value, _FORMAT.value, _OUT.value, **kw)
  print(f"exported {_FORMAT.value} to {out}", flush=True)


def main():
  flags.mark_flags_as_required(["workdir", "out"])
  cli.run(_main)


if __name__ == "__main__":
  main()
