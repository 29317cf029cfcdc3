"""GGUF files (llama.cpp's format) -> jaxft: the ModelConfig, the base params and the tokenizer,
so that `model.path` may name a `.gguf` file of the llama (Llama, Mistral, Mixtral), qwen2, qwen3,
qwen3moe, gemma2 or gemma3 architecture.

Tensors are read with the `gguf` package one at a time (the file is memory-mapped; each tensor is
dequantized to float32 on the host, then cast, and quantized again if `model.quant` asks, on the
devices by the same streaming code as safetensors: `hf.stream_params`), so host memory peaks near
the largest tensor (a layer's stacked experts). The family's layout in the file is undone
(models/gguf_arch.py, shared with the writer): the llama architecture's Q/K rows put back in HF's
rotate-half order, Gemma's stored 1 + w norms back to w, stacked experts split per expert, and
a llama file's `rope_freqs.weight` read as Llama 3.1/3.2's RoPE scaling (models/gguf_rope.py).

GGUF names and HF names (the others in gguf_arch.py):
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
from jaxft.models import gguf_arch, gguf_bulk, gguf_rope, hf
from jaxft.models.config import ModelConfig

__all__ = ["is_gguf", "read_config", "load_params", "build_tokenizer", "write_tokenizer",
           "SUPPORTED_TYPES", "SPLIT_REGEXES"]

# Tensor types read (dequantized with gguf.quants); others are refused by name.
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K",
                   "Q4_K", "Q5_K", "Q6_K")

def is_gguf(path: str) -> bool:
  """Whether `model.path` names a GGUF file (by its extension)."""
  return bool(path) and path.lower().endswith(".gguf")


def _reader(path: str):
  """The file's GGUFReader (read-only; gguf_bulk.open_reader: arrays parsed in bulk, 0.1 s for
  SmolLM2's 49,152 tokens and merges against gguf.GGUFReader's 2-3 s). The config, the weights and
  the tokenizer each read it: one parse per file version per process."""
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
  del size, mtime_ns  # (the cache key: a rewritten file is parsed again)
  try:
    return gguf_bulk.open_reader(path, "r")
  except Exception as e:  # bad magic, truncated header or data, unknown value types
    raise CheckpointError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None


def _field(path: str, reader, key: str, default=None, required: bool = False):
  f = reader.fields.get(key)
  if f is None:
    if required:
      raise CheckpointError(f"{path}: metadata key {key} is missing")
    return default
  try:
    value = f.contents()
  except Exception as e:
    raise CheckpointError(f"{path}: metadata key {key} cannot be read ({e})") from None
  if isinstance(value, float) and f.types[0].name == "FLOAT32":
    value = float(str(np.float32(value)))  # the shortest decimal it holds (1e-06, not 9.99e-07)
  return value


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
  if arch not in gguf_arch.READS:
    raise ConfigError(f"{path}: general.architecture={arch!r} is not supported; jaxft reads GGUF "
                      f"files of the {', '.join(gguf_arch.READS)} architectures")
  return arch


def read_config(path: str) -> ModelConfig:
  """The ModelConfig of a GGUF file (its `{arch}.*` metadata; the family's own keys in
  gguf_arch.arch_fields): llama (Llama, Mistral; Mixtral when it has experts), qwen2, qwen3,
  qwen3moe, gemma2, gemma3.

  dtype/param_dtype/remat keep their defaults. Raises ConfigError (naming the file and key) for
  another architecture or a setting jaxft does not implement, CheckpointError for an unreadable
  file or missing metadata."""
  r = _reader(path)
  arch = _architecture(path, r)
  need = lambda k: _field(path, r, f"{arch}.{k}", required=True)
  opt = lambda k, d=None: _field(path, r, f"{arch}.{k}", d)
  names = {t.name for t in r.tensors}
  hidden, heads = int(need("embedding_length")), int(need("attention.head_count"))
  tokens = r.fields.get("tokenizer.ggml.tokens")
  vocab = opt("vocab_size") or (len(tokens.data) if tokens is not None else None)
  if vocab is None:
    raise CheckpointError(f"{path}: neither {arch}.vocab_size nor tokenizer.ggml.tokens is present")
  head_dim = int(opt("attention.key_length") or hidden // heads)
  if int(opt("rope.dimension_count") or head_dim) != head_dim:
    raise ConfigError(f"{path}: {arch}.rope.dimension_count={opt('rope.dimension_count')} (partial "
                      f"rotary embedding) is not supported; head dim is {head_dim}")
  shape = dict(hidden=hidden, heads=heads, head_dim=head_dim, layers=int(need("block_count")),
               ff=int(need("feed_forward_length")),
               rope_theta=float(opt("rope.freq_base", 10000.0)))
  tok = lambda k: _field(path, r, f"tokenizer.ggml.{k}")
  fields = dict(
      vocab_size=int(vocab), hidden_size=hidden, intermediate_size=shape["ff"],
      num_layers=shape["layers"], num_heads=heads,
      num_kv_heads=int(opt("attention.head_count_kv") or heads), head_dim=head_dim,
      rope_theta=shape["rope_theta"],
      rope_scaling=_rope_scaling(path, r, arch, opt, head_dim, shape["rope_theta"]),
      rms_norm_eps=float(opt("attention.layer_norm_rms_epsilon", 1e-5)),
      max_position_embeddings=int(opt("context_length", 4096)),
      tie_embeddings="output.weight" not in names,
      bos_token_id=tok("bos_token_id"), eos_token_id=tok("eos_token_id"),
      pad_token_id=tok("padding_token_id"))
  fields.update(gguf_arch.arch_fields(path, arch, opt, shape))
  try:
    return ModelConfig(**fields)
  except ConfigError as e:
    raise ConfigError(f"{path}: {e}") from None


def _rope_scaling(path: str, r, arch: str, opt, head_dim: int, theta: float) -> tuple | None:
  """The file's rope_scaling pairs: linear from `{arch}.rope.scaling.*`; Llama 3.1's llama3 from
  the llama architecture's `rope_freqs.weight` (gguf_rope.scaling_from_file)."""
  kind, factor = opt("rope.scaling.type", "none"), opt("rope.scaling.factor")
  if kind not in ("none", "linear"):
    raise ConfigError(f"{path}: {arch}.rope.scaling.type={kind!r} is not supported (none, linear)")
  freqs = next((t for t in r.tensors if t.name == gguf_rope.TENSOR), None)
  if freqs is None:
    linear = kind == "linear" and factor not in (None, 1.0)
    return (("factor", float(factor)), ("rope_type", "linear")) if linear else None
  if arch != "llama" or kind != "none":
    raise ConfigError(f"{path}: tensor {gguf_rope.TENSOR} (per-frequency RoPE factors) is read "
                      f"as Llama 3.1's RoPE scaling, for the llama architecture without "
                      f"rope.scaling.type; this file is {arch} with rope.scaling.type={kind!r}")
  if freqs.tensor_type.name != "F32":
    raise CheckpointError(f"{path}: tensor {gguf_rope.TENSOR} has type "
                          f"{freqs.tensor_type.name}; llama.cpp reads it as F32")
  return gguf_rope.scaling_from_file(path, np.asarray(freqs.data), theta, head_dim,
                                     lambda key: _field(path, r, key))


def _gguf_tensors(path: str, reader, cfg: ModelConfig) -> dict[str, tuple[object, int | None]]:
  """{HF name: (GGUF tensor, expert index or None)} of every tensor cfg has (a mixture of experts'
  per-expert HF names share their layer's stacked tensor). Raises CheckpointError naming the
  file for a missing or an unexpected tensor."""
  by_name = {t.name: t for t in reader.tensors}
  out, used, missing = {}, set(), []
  for hf_name, (p, layer, _) in hf.expected_names(cfg).items():
    i, e = layer if isinstance(layer, tuple) else (layer, None)
    gname = gguf_arch.gguf_name(cfg, p, i)
    if gname not in by_name:
      missing.append(hf_name)
      continue
    out[hf_name] = (by_name[gname], e)
    used.add(gname)
  if missing:
    raise CheckpointError(f"{path}: the tensor for {missing[0]} is missing"
                          + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                          + f"; the metadata describes {cfg.architecture} with "
                          f"{cfg.num_layers} layers")
  used.add(gguf_rope.TENSOR)  # (not a parameter: read_config read it as the RoPE scaling)
  extra = [t.name for t in reader.tensors if t.name not in used]
  if extra:
    raise CheckpointError(f"{path}: unexpected tensor {extra[0]} ({cfg.architecture} with "
                          f"{cfg.num_layers} layers has no such parameter)")
  return out


_unpermute = gguf_arch.unpermute_qk


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
  """Reads a GGUF file into the param tree of `cfg` (from `read_config(path)`), each leaf on its
  NamedSharding, cast to cfg.param_dtype and, with quant_kind int8/nf4, the layer kernels
  quantized again; the family's layout in the file (gguf_arch.to_file) is undone. Raises
  CheckpointError naming the file and tensor for a missing, unexpected, misshapen or unsupported
  (type) tensor, and for one whose values show corruption (non-finite, or out of range:
  `_check_values`)."""
  r = _reader(path)
  _architecture(path, r)
  tensors = _gguf_tensors(path, r, cfg)
  expected = hf.expected_names(cfg)
  for t, _ in tensors.values():  # every type checked before any work
    if t.tensor_type.name not in SUPPORTED_TYPES:
      raise CheckpointError(f"{path}: tensor {t.name} has type {t.tensor_type.name}; jaxft reads "
                            f"{', '.join(SUPPORTED_TYPES)}")
  stacked: dict[str, np.ndarray] = {}  # the one layer's experts being read

  def read(name: str, shape: tuple[int, ...]) -> np.ndarray:
    t, expert = tensors[name]
    p = expected[name][0]
    if expert is None:
      return gguf_arch.from_file(cfg, p, _dequantize(path, t, shape))
    if t.name not in stacked:
      stacked.clear()
      stacked[t.name] = _dequantize(path, t, (cfg.num_experts, *shape))
    return gguf_arch.from_file(cfg, p, stacked[t.name][expert])

  # In file order: the mapping is read front to back.
  order = sorted(expected, key=lambda n: (tensors[n][0].data_offset, tensors[n][1] or 0))
  return hf.stream_params(cfg, shardings, quant_kind, order, read)


# -- tokenizer -----------------------------------------------------------------------------------

# tokenizer.ggml.pre -> the split regex llama.cpp applies before byte-level BPE (None: GPT-2's,
# which tokenizers' ByteLevel pre-tokenizer applies itself).
_GPT2 = None
# (the same regexes name a tokenizer.json's pre-tokenizer when one is written:
# export/gguf_tokenizer.py)
SPLIT_REGEXES = {
    "qwen2": (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
              r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"),
    "llama-bpe": (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                  r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"),
}
_PRE = {"default": _GPT2, "gpt2": _GPT2, "smollm": _GPT2, "llama-bpe": SPLIT_REGEXES["llama-bpe"],
        "llama3": SPLIT_REGEXES["llama-bpe"], "qwen2": SPLIT_REGEXES["qwen2"]}
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
