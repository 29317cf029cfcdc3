"""--format=hf: the trained method merged into the base (float32 math, then cast), written as an HF
checkpoint: config.json, generation_config.json, safetensors (sharded with an index above
--max_shard_mb) and the tokenizer files with the chat template training used. transformers, vLLM,
TGI and llama.cpp's converter read it. With base=True the base alone (a preset base, for PEFT
adapters to name).

The tensors go to the host one at a time, in HF's layout and names (models.hf.export_names and
host_tensor, the inverse of loading).
"""

from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from jaxft import session
from jaxft.errors import ConfigError
from jaxft.export.output import check_out, merged_params, write_atomically
from jaxft.models import hf
from jaxft.models.config import ModelConfig

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                   "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt",
                   "chat_template.jinja", "chat_template.json")
DTYPES = ("auto", "float32", "bfloat16", "float16")


def export_hf(workdir: str, out: str, *, max_shard_mb: float = 5000, dtype: str = "auto",
              step: int | None = None, overwrite: bool = False, base: bool = False) -> str:
  """Merges WORKDIR's trained method into its base and writes an HF checkpoint to OUT; with
  base=True writes the base alone (for a preset base: the one PEFT adapters of WORKDIR need).

  dtype: of the written weights; auto = the source checkpoint's (config.json dtype), else
  model.param_dtype. Returns OUT. Raises ConfigError (bad options, OUT exists, an unmergeable
  method) or CheckpointError (no checkpoint in WORKDIR).
  """
  config = session.load_workdir_config(workdir)
  check_out(out, overwrite, workdir, config)
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
    merged = merged_params(trained)
    del trained
  shards = []

  def write(tmp):  # every process gathers the tensors; process 0 (tmp != "") writes
    shards.append(write_checkpoint(tmp or None, cfg, merged, dtype, max_shard_mb))
    if tmp:
      with open(os.path.join(tmp, "generation_config.json"), "w", encoding="utf-8") as f:
        json.dump(_generation_config(config, cfg), f, indent=2)
      write_tokenizer(config, workdir, tmp)

  write_atomically(out, write)
  if jax.process_index() == 0:
    logging.info("exported %s (%s, %d shard(s)) to %s",
                 "the base model" if base else f"{config.peft.method} merged", dtype, shards[0],
                 out)
  return out


def _export_dtype(config, cfg, dtype: str) -> str:
  if dtype not in DTYPES:
    raise ConfigError(f"--dtype={dtype}: expected one of {', '.join(DTYPES)}")
  if dtype != "auto":
    return dtype
  if config.model.path:
    return hf.checkpoint_dtype(config.model.path) or cfg.param_dtype
  return cfg.param_dtype


def write_tokenizer(config, workdir: str, out: str) -> None:
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


def write_checkpoint(directory: str | None, cfg: ModelConfig, params, dtype: str,
                     max_shard_mb: float = 5000) -> int:
  """Writes params (the decoder's tree, quantized kernels allowed) as an HF checkpoint into
  `directory`: config.json and safetensors in `dtype`, sharded with model.safetensors.index.json
  above max_shard_mb. Tensors go to the host one at a time (one layer's slice of a stacked leaf).
  With several processes every one must call this (tensors are gathered); only the one whose
  `directory` is not None writes. Returns the number of safetensors files."""
  hf_cfg = hf.hf_config(cfg, dtype)
  np_dtype = np.dtype(jnp.dtype(dtype))
  entries = [(name, shape, np_dtype, lambda p=path, i=layer: hf.host_tensor(params, p, i, dtype))
             for name, path, layer, shape in hf.export_names(cfg)]
  shards = hf.shard_entries(entries, int(max_shard_mb * 2**20))
  weight_map, total = {}, 0
  for k, shard in enumerate(shards):
    fname = ("model.safetensors" if len(shards) == 1
             else f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors")
    if directory is not None:
      total += hf.write_safetensors(os.path.join(directory, fname), shard)
    else:  # take part in gathering each tensor
      for e in shard:
        e[3]()
    weight_map.update({e[0]: fname for e in shard})
  if directory is None:
    return len(shards)
  if len(shards) > 1:
    with open(os.path.join(directory, hf.INDEX), "w", encoding="utf-8") as f:
      json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
  with open(os.path.join(directory, "config.json"), "w", encoding="utf-8") as f:
    json.dump(hf_cfg, f, indent=2)
  return len(shards)
