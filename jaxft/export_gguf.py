"""GGUF export: the merged model, its tokenizer and chat template in one file llama.cpp loads.

Written with the `gguf` package (no llama.cpp build). Weights are in llama.cpp's layout for the
`llama` architecture: HF tensor names mapped to GGUF's (`blk.N.attn_q.weight`, ...), and the
rows of Q and K permuted from HF's rotate-half RoPE order to llama.cpp's interleaved pairs.
Tensors are streamed one at a time (header first, with every tensor's size computed up front), so
the model never sits whole in host memory.

Quant types (--quant): f32, f16, bf16, q8_0, and q4_k_m: Q4_K for most matrices, Q6_K for the
output head and for attn_v / ffn_down of the layers llama.cpp gives more bits (the first and last
eighth, and every third between). A matrix whose rows are not a multiple of 256 values cannot hold
K-quants: it gets llama.cpp's fallback (Q4_K -> Q5_0, Q6_K -> Q8_0). Norms stay float32.

Tokenizers: SentencePiece (tokenizer.model) as llama.cpp's `llama` model (pieces, scores, types,
add_space_prefix); byte-level BPE (tokenizer.json, e.g. SmolLM2's rebuilt from its GGUF) as `gpt2`
(tokens, merges, types, and the pre-tokenizer's llama.cpp name: gpt2 or smollm).
"""

from __future__ import annotations

import json
import os

import numpy as np
from absl import logging

from jaxft.errors import ConfigError
from jaxft.models import hf
from jaxft.quant import gguf_quants

QUANTS = ("f32", "f16", "bf16", "q8_0", "q4_k_m")
_LLAMA_ARCHS = ("LlamaForCausalLM", "MistralForCausalLM")
_LAYER = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q",
          "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
          "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
          "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
_TOP = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight"}


def gguf_name(hf_name: str) -> str:
  """The GGUF tensor name of an HF Llama tensor name."""
  if hf_name in _TOP:
    return _TOP[hf_name]
  parts = hf_name.split(".")  # model.layers.N.<module...>.weight
  module = ".".join(parts[3:-1])
  return f"blk.{parts[2]}.{_LAYER[module]}.{parts[-1]}"


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
  """HF's q/k rows (per head: the first halves of the rotary pairs, then the second halves) in
  llama.cpp's order (per head: pairs side by side)."""
  return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
          .swapaxes(1, 2).reshape(w.shape))


def check_model(cfg) -> None:
  """Raises ConfigError for what GGUF's llama architecture (as written here) cannot hold."""
  if cfg.architecture not in _LLAMA_ARCHS:
    raise ConfigError(f"--format=gguf: architecture {cfg.architecture} is not supported (only "
                      f"{', '.join(_LLAMA_ARCHS)}); export --format=hf and convert it with "
                      "llama.cpp's convert_hf_to_gguf.py")
  if cfg.qkv_bias:
    raise ConfigError("--format=gguf: q/k/v biases are not supported by the llama architecture; "
                      "export --format=hf and convert it with convert_hf_to_gguf.py")
  if cfg.rope_scaling and dict(cfg.rope_scaling).get("rope_type", "default") not in (
      "default", "linear"):
    raise ConfigError(f"--format=gguf: rope_scaling {dict(cfg.rope_scaling)} is not supported "
                      "(default and linear are); export --format=hf and convert it with "
                      "convert_hf_to_gguf.py")


def _more_bits(layer: int, n_layers: int) -> bool:
  # llama.cpp's use_more_bits for Q4_K_M's attn_v and ffn_down.
  return layer < n_layers // 8 or layer >= 7 * n_layers // 8 or (layer - n_layers // 8) % 3 == 2


def tensor_type(quant: str, name: str, shape: tuple[int, ...], n_layers: int,
                tied: bool = False):
  """The GGMLQuantizationType of tensor `name` (GGUF name, HF-layout shape) under --quant; with
  tied embeddings (no output.weight) token_embd is the output head and gets its type."""
  from gguf import GGMLQuantizationType as T
  if len(shape) == 1 or quant == "f32":
    return T.F32
  if quant in ("f16", "bf16", "q8_0"):
    return {"f16": T.F16, "bf16": T.BF16, "q8_0": T.Q8_0}[quant]
  want = T.Q4_K
  if name == "output.weight" or (tied and name == "token_embd.weight"):
    want = T.Q6_K
  elif name.endswith(("attn_v.weight", "ffn_down.weight")):
    if _more_bits(int(name.split(".")[1]), n_layers):
      want = T.Q6_K
  if shape[-1] % 256:
    want = {T.Q4_K: T.Q5_0, T.Q6_K: T.Q8_0}[want]
  return want


def encode(x: np.ndarray, qtype) -> np.ndarray:
  """x float32 [rows, cols] in GGUF type qtype: float arrays, or uint8 blocks per row."""
  from gguf import GGMLQuantizationType as T
  from gguf import quants
  if qtype == T.F32:
    return x.astype(np.float32)
  if qtype == T.F16:
    return x.astype(np.float16)
  if qtype == T.Q4_K:
    return gguf_quants.quantize_q4_k(x)
  if qtype == T.Q6_K:
    return gguf_quants.quantize_q6_k(x)
  return quants.quantize(x.astype(np.float32), qtype)


def _nbytes(shape, qtype) -> int:
  from gguf import GGML_QUANT_SIZES
  block, size = GGML_QUANT_SIZES[qtype]
  return int(np.prod(shape)) // block * size


# -- tokenizer -----------------------------------------------------------------------------------

def _sentencepiece_vocab(tok_dir: str, tok, vocab_size: int):
  """(pieces, scores, token types) of the SentencePiece model in tok_dir, with the HF tokenizer's
  added tokens, padded to the model's vocab_size."""
  import sentencepiece as spm
  from gguf import TokenType
  sp = spm.SentencePieceProcessor(model_file=os.path.join(tok_dir, "tokenizer.model"))
  pieces, scores, types = [], [], []
  for i in range(sp.vocab_size()):
    pieces.append(sp.id_to_piece(i))
    scores.append(sp.get_score(i))
    types.append(TokenType.UNKNOWN if sp.is_unknown(i) else TokenType.CONTROL if sp.is_control(i)
                 else TokenType.UNUSED if sp.is_unused(i) else TokenType.BYTE if sp.is_byte(i)
                 else TokenType.NORMAL)
  for t, i in sorted(tok.get_added_vocab().items(), key=lambda kv: kv[1]):
    if i < len(pieces):
      continue
    if i != len(pieces):
      raise ConfigError(f"{tok_dir}: added token {t!r} has id {i}, leaving a gap after "
                        f"{len(pieces)}; GGUF vocabularies are dense")
    pieces.append(t)
    scores.append(-1000.0)
    types.append(TokenType.CONTROL if t in tok.all_special_tokens else TokenType.USER_DEFINED)
  if len(pieces) > vocab_size:
    raise ConfigError(f"{tok_dir}: the tokenizer has {len(pieces)} tokens, more than the model's "
                      f"vocab_size {vocab_size}")
  for i in range(len(pieces), vocab_size):
    pieces.append(f"[PAD{i}]")
    scores.append(-1000.0)
    types.append(TokenType.UNUSED)
  return pieces, scores, types, sp


def _add_tokenizer(w, tok_dir: str, enc, cfg) -> None:
  """The tokenizer metadata llama.cpp reads: SentencePiece (tokenizer.model) as `llama`, a
  byte-level BPE tokenizer.json as `gpt2` with its merges and pre-tokenizer name; then the special
  ids, whether BOS/EOS are added, and the chat template."""
  tok = enc.tok
  if os.path.isfile(os.path.join(tok_dir, "tokenizer.model")):
    _add_sentencepiece(w, tok_dir, tok, cfg)
  elif os.path.isfile(os.path.join(tok_dir, "tokenizer.json")):
    _add_byte_level(w, tok_dir, tok, cfg)
  else:
    raise ConfigError(f"--format=gguf: {tok_dir} has neither tokenizer.model (SentencePiece) nor "
                      "tokenizer.json (byte-level BPE)")
  for key, value in (("bos", tok.bos_token_id), ("eos", tok.eos_token_id),
                     ("unk", tok.unk_token_id), ("pad", tok.pad_token_id)):
    if value is not None:
      getattr(w, f"add_{key}_token_id")(int(value))
  # What the tokenizer itself adds around plain text (llama.cpp adds the same when asked to).
  ids = tok("a")["input_ids"]
  w.add_add_bos_token(bool(ids) and tok.bos_token_id is not None and ids[0] == tok.bos_token_id)
  w.add_add_eos_token(len(ids) > 1 and tok.eos_token_id is not None and ids[-1] == tok.eos_token_id)
  w.add_chat_template(enc.template)


def _add_sentencepiece(w, tok_dir: str, tok, cfg) -> None:
  pieces, scores, types, sp = _sentencepiece_vocab(tok_dir, tok, cfg.vocab_size)
  w.add_tokenizer_model("llama")
  w.add_tokenizer_pre("default")
  w.add_token_list(pieces)
  w.add_token_scores(scores)
  w.add_token_types(types)
  add_prefix = _dummy_prefix(sp)
  w.add_add_space_prefix(add_prefix)
  pre = tok.backend_tokenizer.pre_tokenizer
  if add_prefix and pre is not None and "prepend_scheme=first" in str(pre):
    logging.warning("the tokenizer prefixes only the first piece of text with '▁' (legacy=False), "
                    "llama.cpp prefixes every piece after a special token: the ids of text after "
                    "special tokens will differ between jaxft and llama.cpp")


def _add_byte_level(w, tok_dir: str, tok, cfg) -> None:
  path = os.path.join(tok_dir, "tokenizer.json")
  try:
    with open(path, encoding="utf-8") as f:
      spec = json.load(f)
  except (OSError, ValueError) as e:
    raise ConfigError(f"{path}: not readable JSON ({e})") from None
  model = spec.get("model") or {}
  if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
    raise ConfigError(f"{path}: model.type={model.get('type')!r}; GGUF export writes SentencePiece "
                      "(tokenizer.model) or byte-level BPE tokenizers (export --format=hf and "
                      "convert it with llama.cpp's convert_hf_to_gguf.py)")
  pre = bpe_pre_name(path, spec.get("pre_tokenizer"))
  tokens, types = _bpe_vocab(path, model["vocab"], spec.get("added_tokens") or [], cfg.vocab_size)
  merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
  if not merges:
    raise ConfigError(f"{path}: model.merges is empty; a byte-level BPE tokenizer needs its merges")
  w.add_tokenizer_model("gpt2")
  w.add_tokenizer_pre(pre)
  w.add_token_list(tokens)
  w.add_token_types(types)
  w.add_token_merges(merges)


def _step_kinds(pre: dict | None) -> list[dict]:
  if not pre:
    return []
  return list(pre.get("pretokenizers") or []) if pre.get("type") == "Sequence" else [pre]


def bpe_pre_name(path: str, pre: dict | None) -> str:
  """llama.cpp's name (tokenizer.ggml.pre) for a byte-level tokenizer.json's pre-tokenizer: `gpt2`
  (ByteLevel with GPT-2's regex) or `smollm` (every digit alone, then the same). Raises
  ConfigError naming the file for any other, whose split rules llama.cpp would not apply alike."""
  steps = [(s.get("type"), s.get("individual_digits"), s.get("use_regex"))
           for s in _step_kinds(pre)]
  if steps == [("ByteLevel", None, True)]:
    return "gpt2"
  if steps == [("Digits", True, None), ("ByteLevel", None, True)]:
    return "smollm"
  raise ConfigError(f"{path}: pre_tokenizer {[s[0] for s in steps]} is not one GGUF export "
                    "names (ByteLevel: gpt2; Digits(individual) + ByteLevel: smollm); export "
                    "--format=hf and convert it with llama.cpp's convert_hf_to_gguf.py")


def _bpe_vocab(path: str, vocab: dict, added: list, vocab_size: int):
  """(tokens, token types) dense by id: the BPE vocabulary, the added tokens (special ones
  CONTROL, others USER_DEFINED), padded to the model's vocab_size with UNUSED [PADi]."""
  from gguf import TokenType
  by_id = {int(i): (t, TokenType.NORMAL) for t, i in vocab.items()}
  for a in added:
    kind = TokenType.CONTROL if a.get("special") else TokenType.USER_DEFINED
    by_id[int(a["id"])] = (a["content"], kind)
  n = max(by_id) + 1 if by_id else 0
  if n > vocab_size:
    raise ConfigError(f"{path}: the tokenizer has ids up to {n - 1}, beyond the model's vocab_size "
                      f"{vocab_size}")
  missing = [i for i in range(n) if i not in by_id]
  if missing:
    raise ConfigError(f"{path}: no token has id {missing[0]} ({len(missing)} ids missing); GGUF "
                      "vocabularies are dense")
  tokens = [by_id[i][0] for i in range(n)] + [f"[PAD{i}]" for i in range(n, vocab_size)]
  types = [by_id[i][1] for i in range(n)] + [TokenType.UNUSED] * (vocab_size - n)
  return tokens, types


def _dummy_prefix(sp) -> bool:
  from sentencepiece import sentencepiece_model_pb2 as pb
  m = pb.ModelProto()
  m.ParseFromString(sp.serialized_model_proto())
  return bool(m.normalizer_spec.add_dummy_prefix)


# -- the file ------------------------------------------------------------------------------------

def write_gguf(path: str | None, cfg, params, *, quant: str, tok_dir: str, enc,
               name: str = "jaxft") -> dict:
  """Writes params (the merged decoder tree) with the tokenizer of tok_dir and enc's chat
  template as a GGUF file at `path` (a temporary name beside it, renamed at the end). With
  several processes every one calls this (tensors are gathered); only the one whose path is not
  None writes. Returns {GGUF type name: tensor count}. Raises ConfigError for what GGUF's llama
  architecture cannot hold."""
  import gguf
  if quant not in QUANTS:
    raise ConfigError(f"--quant={quant}: expected one of {', '.join(QUANTS)}")
  check_model(cfg)
  entries = []
  for hf_name, p, layer, shape in hf.export_names(cfg):
    gname = gguf_name(hf_name)
    entries.append((gname, p, layer, shape,
                    tensor_type(quant, gname, shape, cfg.num_layers, cfg.tie_embeddings)))
  counts: dict[str, int] = {}
  for e in entries:
    counts[e[4].name] = counts.get(e[4].name, 0) + 1

  def tensor(p, layer, gname):
    x = hf.host_tensor(params, p, layer, "float32")
    if gname.endswith("attn_q.weight"):
      x = permute_qk(x, cfg.num_heads)
    elif gname.endswith("attn_k.weight"):
      x = permute_qk(x, cfg.num_kv_heads)
    return x

  if path is None:  # take part in gathering each tensor
    for gname, p, layer, _, _ in entries:
      tensor(p, layer, gname)
    return counts
  tmp = f"{path}.tmp-{os.getpid()}"
  w = gguf.GGUFWriter(tmp, "llama")
  try:
    _add_metadata(w, cfg, quant, name)
    _add_tokenizer(w, tok_dir, enc, cfg)
    for gname, _, _, shape, qtype in entries:
      w.add_tensor_info(gname, shape, np.dtype(np.float32), _nbytes(shape, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for gname, p, layer, shape, qtype in entries:
      data = encode(tensor(p, layer, gname), qtype)
      w.write_tensor_data(data)
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
  w.add_feed_forward_length(cfg.intermediate_size)
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

