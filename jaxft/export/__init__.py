"""Export in one room: `export(workdir, fmt, out)` hands --format to its writer; the command line
is __main__.py (`python -m jaxft.export --workdir=W --format=hf|peft|adapter|gguf --out=OUT`,
whose help describes each format).

  hf.py              export_hf: the method merged into the base as an HF checkpoint (--base: the
                     base alone); write_checkpoint, the safetensors writer
  adapters.py        export_peft, export_adapter: the adapter alone, in the format its method
                     declares and writes (the PEFT writing itself is jaxft/peft/peft_io.py's)
  gguf.py            export_gguf: the merged model as one GGUF file for llama.cpp
  gguf_tokenizer.py  the GGUF file's tokenizer and chat template
  output.py          refusing an --out that would destroy a workdir or the base; writing into a
                     temporary name renamed at the end, so OUT is absent or complete
"""

from __future__ import annotations

from jaxft.errors import ConfigError
from jaxft.export.adapters import export_adapter, export_peft
from jaxft.export.gguf import QUANTS, export_gguf
from jaxft.export.hf import DTYPES, export_hf, write_checkpoint
from jaxft.export.output import check_out

FORMATS = ("hf", "peft", "adapter", "gguf")

__all__ = ["FORMATS", "DTYPES", "QUANTS", "export", "export_hf", "export_peft", "export_adapter",
           "export_gguf", "write_checkpoint", "check_out"]


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
