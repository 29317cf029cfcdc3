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
--quant=f32|f16|bf16|q8_0|q4_k_m) that llama.cpp loads (jaxft/export/gguf.py).
`--format=hf --base`: the base model alone (a preset base, for PEFT adapters to name).

Output is written into a temporary directory beside OUT and renamed at the end, so OUT is either
absent or complete.
"""

from __future__ import annotations

from absl import flags, logging

from jaxft import cli
from jaxft.errors import ConfigError
from jaxft.export import DTYPES, FORMATS, QUANTS, export

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
_QUANT = flags.DEFINE_enum("quant", "f16", QUANTS,
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
