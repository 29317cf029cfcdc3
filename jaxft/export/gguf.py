"""--format=gguf: the merged model, its tokenizer and chat template in one file llama.cpp loads.

Written with the `gguf` package (no llama.cpp build). Weights are in llama.cpp's layout for the
family's architecture (models/gguf_arch.py: llama for Llama, Mistral and Mixtral, qwen2, qwen3,
qwen3moe, gemma2, gemma3): HF tensor names mapped to GGUF's (`blk.N.attn_q.weight`, ...), the
llama architecture's Q and K rows permuted from HF's rotate-half RoPE order to llama.cpp's
interleaved pairs, Gemma's norms stored as 1 + w, experts stacked per layer, Llama 3.1/3.2's RoPE
scaling as llama.cpp's `rope_freqs.weight` (float32 per-frequency factors: models/gguf_rope.py).
Tensors are streamed one at a time (header first, with every tensor's size computed up front), so
the model never sits whole in host memory.

Quant types (--quant): f32, f16, bf16, q8_0, and q4_k_m: Q4_K for most matrices, Q6_K for the
output head and for attn_v / ffn_down of the layers llama.cpp gives more bits (the first and last
eighth, and every third between). A matrix whose rows are not a multiple of 256 values cannot hold
K-quants: it gets llama.cpp's fallback (Q4_K -> Q5_0, Q6_K -> Q8_0); one whose rows are not a
multiple of 32 values holds no block type and gets F16. Norms, biases, a mixture of experts'
router and rope_freqs stay float32.

The tokenizer and chat template are gguf_tokenizer.py's.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from absl import logging

from jaxft import session
from jaxft.errors import ConfigError
from jaxft.export.gguf_tokenizer import add_tokenizer
from jaxft.export.output import check_out, merged_params
from jaxft.models import gguf_arch, gguf_bulk, gguf_rope, hf
from jaxft.quant import gguf_quants

QUANTS = ("f32", "f16", "bf16", "q8_0", "q4_k_m")
permute_qk = gguf_arch.permute_qk


def check_model(cfg) -> None:
  """Raises ConfigError for what llama.cpp cannot load as cfg describes (gguf_arch.check)."""
  gguf_arch.check(cfg)


def _more_bits(layer: int, n_layers: int) -> bool:
  # llama.cpp's use_more_bits for Q4_K_M's attn_v and ffn_down.
  return layer < n_layers // 8 or layer >= 7 * n_layers // 8 or (layer - n_layers // 8) % 3 == 2


def tensor_type(quant: str, name: str, shape: tuple[int, ...], n_layers: int,
                tied: bool = False):
  """The GGMLQuantizationType of tensor `name` (GGUF name, HF-layout shape) under --quant; with
  tied embeddings (no output.weight) token_embd is the output head and gets its type. Rows too
  short for a block type's 32 values get F16, as llama.cpp's converter and quantizer do."""
  from gguf import GGMLQuantizationType as T
  if len(shape) == 1 or quant == "f32" or name.endswith("ffn_gate_inp.weight"):
    return T.F32  # (norms, biases and the router stay float32, as llama.cpp's converter keeps them)
  if quant in ("f16", "bf16"):
    return {"f16": T.F16, "bf16": T.BF16}[quant]
  if shape[-1] % 32:
    return T.F16
  if quant == "q8_0":
    return T.Q8_0
  want = T.Q4_K
  if name == "output.weight" or (tied and name == "token_embd.weight"):
    want = T.Q6_K
  elif name.endswith(("attn_v.weight", "ffn_down.weight", "ffn_down_exps.weight")):
    if _more_bits(int(name.split(".")[1]), n_layers):
      want = T.Q6_K
  if shape[-1] % 256:
    want = {T.Q4_K: T.Q5_0, T.Q6_K: T.Q8_0}[want]
  return want


def encode(x: np.ndarray, qtype) -> np.ndarray:
  """x float32 [..., rows, cols] in GGUF type qtype: float arrays, or uint8 blocks per row."""
  from gguf import GGMLQuantizationType as T
  from gguf import quants
  if qtype == T.F32:
    return x.astype(np.float32)
  if qtype == T.F16:
    return x.astype(np.float16)
  rows = x.reshape(-1, x.shape[-1])  # (stacked experts: every expert's rows in turn)
  if qtype == T.Q4_K:
    out = gguf_quants.quantize_q4_k(rows)
  elif qtype == T.Q6_K:
    out = gguf_quants.quantize_q6_k(rows)
  else:
    out = quants.quantize(rows.astype(np.float32), qtype)
  return out.reshape(*x.shape[:-1], out.shape[-1])


def _nbytes(shape, qtype) -> int:
  from gguf import GGML_QUANT_SIZES
  block, size = GGML_QUANT_SIZES[qtype]
  return int(np.prod(shape)) // block * size


def export_gguf(workdir: str, out: str, *, quant: str = "f16", step: int | None = None,
                overwrite: bool = False) -> str:
  """Merges WORKDIR's trained method into its base and writes it, with the tokenizer and the chat
  template training used, as the GGUF file OUT (quant: QUANTS). Returns OUT.
  Raises ConfigError (OUT not *.gguf or exists, a bad quant, what llama.cpp cannot express for
  the family, naming the reason, an unmergeable method) or CheckpointError (no checkpoint)."""
  if not out.endswith(".gguf"):
    raise ConfigError(f"--out={out}: a GGUF export is one file; name it FILE.gguf")
  if quant not in QUANTS:
    raise ConfigError(f"--quant={quant}: expected one of {', '.join(QUANTS)}")
  if os.path.isdir(out):
    raise ConfigError(f"--out={out}: is a directory; a GGUF export is one file")
  config = session.load_workdir_config(workdir)
  check_out(out, overwrite, workdir, config)
  trained = session.restore_trained(workdir, config, step=step)
  cfg = trained.model.cfg
  check_model(cfg)
  merged = merged_params(trained)
  del trained
  enc = session.encoder(config, workdir)
  tok_dir = session.tokenizer_dir(config, workdir)
  main = jax.process_index() == 0
  if main and os.path.dirname(os.path.abspath(out)):
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  counts = write_gguf(os.path.abspath(out) if main else None, cfg, merged, quant=quant,
                         tok_dir=tok_dir, enc=enc, name=os.path.basename(out)[:-5])
  if main:
    logging.info("exported %s merged as GGUF (%s: tensor types %s) to %s", config.peft.method,
                 quant, counts, out)
  return out


# -- the file ------------------------------------------------------------------------------------

def write_gguf(path: str | None, cfg, params, *, quant: str, tok_dir: str, enc,
               name: str = "jaxft") -> dict:
  """Writes params (the merged decoder tree) with the tokenizer of tok_dir and enc's chat
  template as a GGUF file at `path` (a temporary name beside it, renamed at the end), in the
  architecture and layout llama.cpp loads for cfg's family (models/gguf_arch.py). With several
  processes every one calls this (tensors are gathered); only the one whose path is not None
  writes. Returns {GGUF type name: tensor count}. Raises ConfigError for what llama.cpp cannot
  express (naming the reason) and for a bad quant."""
  import gguf
  if quant not in QUANTS:
    raise ConfigError(f"--quant={quant}: expected one of {', '.join(QUANTS)}")
  check_model(cfg)
  entries = [(gname, p, layer, shape,
              tensor_type(quant, gname, shape, cfg.num_layers, cfg.tie_embeddings))
             for gname, p, layer, shape in gguf_arch.tensors(cfg)]
  # Llama 3.1's RoPE scaling: llama.cpp's per-frequency factors, float32 (its rope op reads them
  # as such), first in the file as llama.cpp's converter writes them.
  extra = [(gguf_rope.TENSOR, gguf_rope.factors(cfg))] if gguf_rope.is_llama3(cfg) else []
  counts: dict[str, int] = {"F32": len(extra)} if extra else {}
  for e in entries:
    counts[e[4].name] = counts.get(e[4].name, 0) + 1

  def tensor(p, layer, shape):
    if len(shape) == 3:  # one layer's experts, stacked
      x = np.stack([hf.host_tensor(params, p, (layer, e), "float32")
                    for e in range(cfg.num_experts)])
    else:
      x = hf.host_tensor(params, p, layer, "float32")
    return gguf_arch.to_file(cfg, p, x)

  if path is None:  # take part in gathering each tensor
    for _, p, layer, shape, _ in entries:
      tensor(p, layer, shape)
    return counts
  tmp = f"{path}.tmp-{os.getpid()}"
  w = gguf_bulk.writer_class(gguf.GGUFWriter)(tmp, gguf_arch.ARCHS[cfg.architecture])
  try:
    _add_metadata(w, cfg, quant, name)
    add_tokenizer(w, tok_dir, enc, cfg)
    for gname, x in extra:
      w.add_tensor_info(gname, x.shape, x.dtype, x.nbytes)
    for gname, _, _, shape, qtype in entries:
      w.add_tensor_info(gname, shape, np.dtype(np.float32), _nbytes(shape, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for _, x in extra:
      w.write_tensor_data(x)
    for gname, p, layer, shape, qtype in entries:
      w.write_tensor_data(encode(tensor(p, layer, shape), qtype))
    w.close()
    os.replace(tmp, path)
  except BaseException:
    w.close()
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  return counts


_FILE_TYPE = {"f32": 0, "f16": 1, "q8_0": 7, "q4_k_m": 15, "bf16": 32}


def _add_metadata(w, cfg, quant: str, name: str) -> None:
  w.add_name(name)
  w.add_file_type(_FILE_TYPE[quant])
  w.add_quantization_version(2)
  w.add_context_length(cfg.max_position_embeddings)
  w.add_embedding_length(cfg.hidden_size)
  w.add_block_count(cfg.num_layers)
  # (Mixtral's experts are llama's feed-forward; Qwen3-MoE writes theirs apart, gguf_arch)
  w.add_feed_forward_length(cfg.moe_intermediate_size if cfg.architecture == "MixtralForCausalLM"
                            else cfg.intermediate_size)
  w.add_rope_dimension_count(cfg.head_dim)
  w.add_head_count(cfg.num_heads)
  w.add_head_count_kv(cfg.num_kv_heads)
  w.add_key_length(cfg.head_dim)
  w.add_value_length(cfg.head_dim)
  w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
  w.add_rope_freq_base(cfg.rope_theta)
  w.add_vocab_size(cfg.vocab_size)
  if cfg.rope_scaling and dict(cfg.rope_scaling).get("rope_type") == "linear":
    import gguf
    w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
    w.add_rope_scaling_factor(float(dict(cfg.rope_scaling)["factor"]))
  gguf_arch.add_metadata(w, cfg)

