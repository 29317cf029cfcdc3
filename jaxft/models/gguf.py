"""GGUF files (llama.cpp's format) of Llama-architecture models -> jaxft: the ModelConfig, the base
params and the tokenizer, so that `model.path` may name a `.gguf` file.

Tensors are read with the `gguf` package one at a time (the file is memory-mapped; each tensor is
dequantized to float32 on the host, then cast, and quantized again if `model.quant` asks, on the
devices by the same streaming code as safetensors: `hf.stream_params`), so host memory peaks near
the largest tensor. llama.cpp's converter permutes the rows of the Q and K projections (per head,
the two rotary halves interleaved) for its RoPE; they are put back in HF's order here.

GGUF names and HF names:
  token_embd.weight        model.embed_tokens.weight      output_norm.weight  model.norm.weight
  output.weight            lm_head.weight (absent: tied embeddings)
  blk.N.attn_{q,k,v,output}.weight   model.layers.N.self_attn.{q,k,v,o}_proj.weight
  blk.N.ffn_{gate,up,down}.weight    model.layers.N.mlp.{gate,up,down}_proj.weight
  blk.N.attn_norm.weight   model.layers.N.input_layernorm.weight
  blk.N.ffn_norm.weight    model.layers.N.post_attention_layernorm.weight

The tokenizer (byte-level BPE with merges, `tokenizer.ggml.model=gpt2`, or SentencePiece,
`llama`) and the chat template are rebuilt from the metadata as a fast HF tokenizer and written
to a directory (`write_tokenizer`), which every entry point then loads like any other.
"""

from __future__ import annotations

import functools
import json
import os

import numpy as np

from jaxft import files
from jaxft.errors import CheckpointError, ConfigError
from jaxft.models import hf
from jaxft.models.config import ModelConfig

__all__ = ["is_gguf", "read_config", "load_params", "build_tokenizer", "write_tokenizer",
           "SUPPORTED_TYPES"]

# Tensor types read (dequantized with gguf.quants); others are refused by name.
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K",
                   "Q4_K", "Q5_K", "Q6_K")

_TOP = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight"}
_LAYER = {"attn_q.weight": "self_attn.q_proj.weight", "attn_k.weight": "self_attn.k_proj.weight",
          "attn_v.weight": "self_attn.v_proj.weight", "attn_output.weight": "self_attn.o_proj.weight",
          "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
          "ffn_down.weight": "mlp.down_proj.weight", "attn_norm.weight": "input_layernorm.weight",
          "ffn_norm.weight": "post_attention_layernorm.weight"}


def is_gguf(path: str) -> bool:
  """Whether `model.path` names a GGUF file (by its extension)."""
  return bool(path) and path.lower().endswith(".gguf")


def _reader(path: str):
  """The file's GGUFReader (read-only). Parsing the metadata takes seconds for a real vocabulary
  (SmolLM2's 49,152 tokens and merges: 6.5 s), and the config, the weights and the tokenizer each
  read it: one parse per file version per process."""
  try:
    import gguf  # noqa: F401
  except ImportError:
    raise ConfigError(f"{path}: reading GGUF files needs the gguf package "
                      "(pip install 'jaxft[smollm2]' or pip install gguf)") from None
  if not os.path.isfile(path):
    raise CheckpointError(f"model.path={path!r}: no such GGUF file")
  st = os.stat(path)
  return _parsed(path, st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=2)
def _parsed(path: str, size: int, mtime_ns: int):
  import gguf
  del size, mtime_ns  # (the cache key: a rewritten file is parsed again)
  try:
    return gguf.GGUFReader(path, "r")
  except Exception as e:  # bad magic, truncated header or data, unknown value types
    raise CheckpointError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None


def _field(path: str, reader, key: str, default=None, required: bool = False):
  f = reader.fields.get(key)
  if f is None:
    if required:
      raise CheckpointError(f"{path}: metadata key {key} is missing")
    return default
  try:
    return f.contents()
  except Exception as e:
    raise CheckpointError(f"{path}: metadata key {key} cannot be read ({e})") from None


def _strings(path: str, reader, key: str) -> list[str]:
  """A string-array field, decoded (contents() would decode every token separately too, but
  bytes that are not UTF-8 must name the key)."""
  f = reader.fields.get(key)
  if f is None:
    return []
  try:
    return [bytes(f.parts[i]).decode("utf-8") for i in f.data]
  except UnicodeDecodeError as e:
    raise CheckpointError(f"{path}: metadata key {key} holds a string that is not UTF-8 ({e})") from None


def _architecture(path: str, reader) -> str:
  arch = _field(path, reader, "general.architecture", required=True)
  if arch != "llama":
    raise ConfigError(f"{path}: general.architecture={arch!r} is not supported; jaxft reads GGUF "
                      "files of the llama architecture")
  return arch


def read_config(path: str) -> ModelConfig:
  """The ModelConfig of a GGUF file of the llama architecture (its `llama.*` metadata).

  dtype/param_dtype/remat keep their defaults. Raises ConfigError (naming the file and key) for
  another architecture or a setting jaxft does not implement, CheckpointError for an unreadable
  file or missing metadata."""
  r = _reader(path)
  arch = _architecture(path, r)
  need = lambda k: _field(path, r, f"{arch}.{k}", required=True)
  opt = lambda k, d=None: _field(path, r, f"{arch}.{k}", d)
  scaling = opt("rope.scaling.type", "none")
  if scaling not in ("none", "linear"):
    raise ConfigError(f"{path}: {arch}.rope.scaling.type={scaling!r} is not supported (none, linear)")
  names = {t.name for t in r.tensors}
  if "rope_freqs.weight" in names:
    raise ConfigError(f"{path}: tensor rope_freqs.weight (per-frequency RoPE factors, as Llama 3.1 "
                      "files carry) is not supported")
  if opt("expert_count", 0):
    raise ConfigError(f"{path}: {arch}.expert_count={opt('expert_count')}: mixture-of-experts "
                      "models are not supported")
  hidden, heads = int(need("embedding_length")), int(need("attention.head_count"))
  tokens = r.fields.get("tokenizer.ggml.tokens")
  vocab = opt("vocab_size") or (len(tokens.data) if tokens is not None else None)
  if vocab is None:
    raise CheckpointError(f"{path}: neither {arch}.vocab_size nor tokenizer.ggml.tokens is present")
  head_dim = int(opt("attention.key_length") or hidden // heads)
  if int(opt("rope.dimension_count") or head_dim) != head_dim:
    raise ConfigError(f"{path}: {arch}.rope.dimension_count={opt('rope.dimension_count')} (partial "
                      f"rotary embedding) is not supported; head dim is {head_dim}")
  tok = lambda k: _field(path, r, f"tokenizer.ggml.{k}")
  return ModelConfig(
      vocab_size=int(vocab), hidden_size=hidden, intermediate_size=int(need("feed_forward_length")),
      num_layers=int(need("block_count")), num_heads=heads,
      num_kv_heads=int(opt("attention.head_count_kv") or heads), head_dim=head_dim,
      rope_theta=float(opt("rope.freq_base", 10000.0)),
      rope_scaling=((("factor", float(opt("rope.scaling.factor"))), ("rope_type", "linear"))
                    if scaling == "linear" else None),
      rms_norm_eps=float(opt("attention.layer_norm_rms_epsilon", 1e-5)),
      max_position_embeddings=int(opt("context_length", 4096)),
      tie_embeddings="output.weight" not in names, architecture="LlamaForCausalLM",
      bos_token_id=tok("bos_token_id"), eos_token_id=tok("eos_token_id"),
      pad_token_id=tok("padding_token_id"))


def _hf_names(path: str, reader, cfg: ModelConfig) -> dict[str, object]:
  """{HF name: GGUF tensor} of every tensor; raises CheckpointError for an unknown one."""
  out = {}
  for t in reader.tensors:
    name = t.name
    if name in _TOP:
      out[_TOP[name]] = t
      continue
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER:
      out[f"model.layers.{parts[1]}.{_LAYER[parts[2]]}"] = t
      continue
    raise CheckpointError(f"{path}: unexpected tensor {name} (general.architecture=llama with "
                          f"{cfg.num_layers} layers; jaxft has no such parameter)")
  return out


def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
  """Undoes llama.cpp's row order of a Q or K projection [heads * head_dim, in]: per head it stores
  the even rotary components, then the odd ones; HF keeps the two halves of each head apart."""
  rows = w.shape[0]
  return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _dequantize(path: str, t, shape: tuple[int, ...]) -> np.ndarray:
  from gguf import quants
  kind = t.tensor_type.name
  if kind not in SUPPORTED_TYPES:
    raise CheckpointError(f"{path}: tensor {t.name} has type {kind}; jaxft reads "
                          f"{', '.join(SUPPORTED_TYPES)}")
  stored = tuple(int(d) for d in t.shape)[::-1]  # GGUF lists dims fastest first
  if stored != tuple(shape):
    raise CheckpointError(f"{path}: tensor {t.name} has shape {stored}; expected {tuple(shape)}")
  try:
    x = np.asarray(t.data)
    x = x.astype(np.float32) if kind in ("F32", "F16") else quants.dequantize(x, t.tensor_type)
    x = x.reshape(shape)
  except Exception as e:  # a data section cut short, a shape that disagrees with the blocks
    raise CheckpointError(f"{path}: tensor {t.name} ({kind}, shape {stored}) cannot be read "
                          f"({type(e).__name__}: {e})") from None
  x = np.asarray(x, np.float32)
  _check_values(path, t.name, kind, x)
  return x


# No trained llama weight comes near this magnitude (they sit within a few units, norm gains within
# tens); a float16 block scale of a corrupted file reaches 65504 * 127.
_MAX_ABS = 1e4


def _check_values(path: str, name: str, kind: str, x: np.ndarray) -> None:
  """Corruption that can be seen in one tensor: NaN or infinite values (an F16/F32 value or a
  block's float16 scale overwritten, e.g. with 0xFFFF) or values out of any trained model's range
  (a scale overwritten with a large one). Raises CheckpointError naming the file and tensor;
  changed quantized codes within range cannot be told apart from weights (the trainer's warning
  about a step-0 loss far above a uniform guess is the net for those)."""
  finite = np.isfinite(x)
  if not finite.all():
    bad = int(x.size - np.count_nonzero(finite))
    raise CheckpointError(f"{path}: tensor {name} ({kind}) holds {bad} non-finite value"
                          f"{'s' if bad > 1 else ''} (NaN or infinity) after dequantization; "
                          "the file is corrupted")
  peak = float(np.abs(x).max()) if x.size else 0.0
  if peak > _MAX_ABS:
    raise CheckpointError(f"{path}: tensor {name} ({kind}) holds a value of magnitude {peak:.3g} "
                          f"after dequantization (trained weights stay far below {_MAX_ABS:g}): a "
                          "scale is out of range; the file is corrupted")


def load_params(path: str, cfg: ModelConfig, shardings, quant_kind: str = "none") -> dict:
  """Reads a llama GGUF file into the param tree of `cfg` (from `read_config(path)`), each leaf on
  its NamedSharding, cast to cfg.param_dtype and, with quant_kind int8/nf4, the layer kernels
  quantized again. Raises CheckpointError naming the file and tensor for a missing, unexpected,
  misshapen or unsupported (type) tensor, and for one whose values show corruption (non-finite,
  or out of range: `_check_values`)."""
  r = _reader(path)
  _architecture(path, r)
  tensors = _hf_names(path, r, cfg)
  expected = hf.expected_names(cfg)
  missing = [n for n in expected if n not in tensors]
  if missing:
    raise CheckpointError(f"{path}: the tensor for {missing[0]} is missing"
                          + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                          + f"; the metadata describes {cfg.num_layers} layers")
  extra = [n for n in tensors if n not in expected and not (n == "lm_head.weight" and cfg.tie_embeddings)]
  if extra:
    raise CheckpointError(f"{path}: unexpected tensor {tensors[extra[0]].name}")
  for name, t in tensors.items():  # every type checked before any work
    if t.tensor_type.name not in SUPPORTED_TYPES:
      raise CheckpointError(f"{path}: tensor {t.name} has type {t.tensor_type.name}; jaxft reads "
                            f"{', '.join(SUPPORTED_TYPES)}")

  def read(name: str, shape: tuple[int, ...]) -> np.ndarray:
    x = _dequantize(path, tensors[name], shape)
    if name.endswith("q_proj.weight"):
      x = _unpermute(x, cfg.num_heads)
    elif name.endswith("k_proj.weight"):
      x = _unpermute(x, cfg.num_kv_heads)
    return x

  # In file order: the mapping is read front to back.
  order = sorted(expected, key=lambda n: tensors[n].data_offset)
  return hf.stream_params(cfg, shardings, quant_kind, order, read)


# -- tokenizer -----------------------------------------------------------------------------------

# tokenizer.ggml.pre -> the split regex llama.cpp applies before byte-level BPE (None: GPT-2's,
# which tokenizers' ByteLevel pre-tokenizer applies itself).
_GPT2 = None
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_PRE = {"default": _GPT2, "gpt2": _GPT2, "smollm": _GPT2, "llama-bpe": _LLAMA3, "llama3": _LLAMA3}
_DIGITS_ALONE = ("smollm",)  # every digit its own piece (SmolLM's tokenizer.json does the same)

# tokenizer.ggml.token_type values
_NORMAL, _UNKNOWN, _CONTROL, _USER, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6


def _byte_level(path: str, r, tokens: list[str]):
  from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
  merges = _strings(path, r, "tokenizer.ggml.merges")
  if not merges:
    raise CheckpointError(f"{path}: tokenizer.ggml.model=gpt2 without tokenizer.ggml.merges")
  pairs = []
  for m in merges:
    a, sep, b = m.partition(" ")
    if not sep:
      raise CheckpointError(f"{path}: tokenizer.ggml.merges entry {m!r} is not 'A B'")
    pairs.append((a, b))
  pre = _field(path, r, "tokenizer.ggml.pre", "default")
  if pre not in _PRE:
    raise ConfigError(f"{path}: tokenizer.ggml.pre={pre!r} is not supported; jaxft knows "
                      f"{', '.join(sorted(_PRE))}")
  vocab = {t: i for i, t in enumerate(tokens)}
  tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False))
  steps = []
  if pre in _DIGITS_ALONE:
    steps.append(pre_tokenizers.Digits(individual_digits=True))
  if _PRE[pre] is None:
    steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True))
  else:
    steps += [pre_tokenizers.Split(Regex(_PRE[pre]), behavior="isolated", invert=False),
              pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
  tok.pre_tokenizer = steps[0] if len(steps) == 1 else pre_tokenizers.Sequence(steps)
  tok.decoder = decoders.ByteLevel()
  tok.post_processor = processors.ByteLevel(trim_offsets=False)
  return tok


def _merges_from_scores(tokens: list[str], scores: list[float], normal: list[bool]):
  """SentencePiece BPE keeps scores, not merges: a merge (a, b) exists when a, b and a+b are all
  pieces, and ranks by the score of a+b (higher first), as SentencePiece applies them."""
  index = {t: i for i, t in enumerate(tokens) if normal[i]}
  found = []
  for piece, i in index.items():
    for k in range(1, len(piece)):
      a, b = piece[:k], piece[k:]
      if a in index and b in index:
        found.append((-scores[i], index[a], index[b], a, b))
  found.sort()
  return [(a, b) for *_, a, b in found]


def _sentencepiece(path: str, r, tokens: list[str], types: list[int]):
  from tokenizers import Tokenizer, decoders, models, normalizers
  scores = _field(path, r, "tokenizer.ggml.scores")
  if not scores or len(scores) != len(tokens):
    raise CheckpointError(f"{path}: tokenizer.ggml.model=llama needs tokenizer.ggml.scores, one "
                          "per token")
  unk = _field(path, r, "tokenizer.ggml.unknown_token_id", 0)
  normal = [t in (_NORMAL, _USER) or t == 0 for t in types]
  merges = _merges_from_scores(tokens, list(scores), normal)
  vocab = {t: i for i, t in enumerate(tokens)}
  tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=tokens[unk], fuse_unk=True,
                             byte_fallback=True))
  prefix = _field(path, r, "tokenizer.ggml.add_space_prefix", True)
  # As SentencePiece: a dummy "▁" before the text (even one that starts with a space), spaces as
  # "▁", and the whole text one piece for BPE.
  replace = normalizers.Replace(" ", "\u2581")
  tok.normalizer = (normalizers.Sequence([normalizers.Prepend("\u2581"), replace]) if prefix
                    else replace)
  steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
  if prefix:
    steps.append(decoders.Strip(" ", 1, 0))
  tok.decoder = decoders.Sequence(steps)
  return tok


def build_tokenizer(path: str):
  """The fast HF tokenizer of a GGUF file: vocabulary, merges (or SentencePiece scores), special
  tokens, BOS/EOS and the chat template from its `tokenizer.*` metadata. Raises CheckpointError
  when the metadata is missing or malformed, ConfigError for a tokenizer kind jaxft does not
  rebuild."""
  from tokenizers import AddedToken, processors
  from transformers import PreTrainedTokenizerFast
  r = _reader(path)
  kind = _field(path, r, "tokenizer.ggml.model", required=True)
  tokens = _strings(path, r, "tokenizer.ggml.tokens")
  if not tokens:
    raise CheckpointError(f"{path}: metadata key tokenizer.ggml.tokens is missing")
  types = list(_field(path, r, "tokenizer.ggml.token_type") or [_NORMAL] * len(tokens))
  if kind == "gpt2":
    tok = _byte_level(path, r, tokens)
  elif kind == "llama":
    tok = _sentencepiece(path, r, tokens, types)
  else:
    raise ConfigError(f"{path}: tokenizer.ggml.model={kind!r} is not supported (gpt2, llama)")
  # Control tokens (and user-defined ones) match as whole strings before the model splits text.
  added = [AddedToken(tokens[i], special=types[i] == _CONTROL, normalized=False)
           for i in range(len(tokens)) if types[i] in (_CONTROL, _USER)]
  tok.add_tokens(added)
  special = lambda k: (tokens[i] if (i := _field(path, r, f"tokenizer.ggml.{k}_token_id")) is not None
                       and 0 <= i < len(tokens) else None)
  bos, eos = special("bos"), special("eos")
  add_bos = bool(_field(path, r, "tokenizer.ggml.add_bos_token", kind == "llama"))
  add_eos = bool(_field(path, r, "tokenizer.ggml.add_eos_token", False))
  if add_bos or add_eos:
    one = ([f"{bos}:0"] if add_bos else []) + ["$A:0"] + ([f"{eos}:0"] if add_eos else [])
    pair = one + ([f"{bos}:1"] if add_bos else []) + ["$B:1"] + ([f"{eos}:1"] if add_eos else [])
    ids = {t: tokens.index(t) for t in (bos if add_bos else None, eos if add_eos else None) if t}
    post = processors.TemplateProcessing(single=" ".join(one), pair=" ".join(pair),
                                         special_tokens=list(ids.items()))
    tok.post_processor = (processors.Sequence([tok.post_processor, post])
                          if tok.post_processor is not None else post)
  out = PreTrainedTokenizerFast(
      tokenizer_object=tok, bos_token=bos, eos_token=eos, unk_token=special("unknown"),
      pad_token=special("padding"), clean_up_tokenization_spaces=False)
  template = _field(path, r, "tokenizer.chat_template")
  if template:
    out.chat_template = template
  return out


def write_tokenizer(path: str, directory: str) -> str:
  """Writes the tokenizer of GGUF file `path` (build_tokenizer) into `directory` as HF files
  (tokenizer.json, tokenizer_config.json with the chat template); returns `directory`. Written
  under a temporary name and renamed, so concurrent processes never read half a file."""
  os.makedirs(directory, exist_ok=True)
  stamp = os.path.join(directory, "gguf_source.json")
  source = {"gguf": os.path.abspath(path), "size": os.path.getsize(path),
            "mtime": int(os.path.getmtime(path))}
  if os.path.isfile(stamp):
    with open(stamp, encoding="utf-8") as f:
      if json.load(f) == source:
        return directory
  tmp = files.temp_dir(directory)
  build_tokenizer(path).save_pretrained(tmp)
  for name in os.listdir(tmp):  # file by file: the directory may hold other files (a workdir's)
    os.replace(os.path.join(tmp, name), os.path.join(directory, name))
  os.rmdir(tmp)
  files.write_json(stamp, source, indent=None)
  return directory
