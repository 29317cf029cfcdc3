"""The tokenizer of a GGUF export, as llama.cpp reads it: SentencePiece (tokenizer.model) as
llama.cpp's `llama` model (pieces, scores, types, add_space_prefix); byte-level BPE
(tokenizer.json: SmolLM2's, Qwen2/3's, Llama 3's) as `gpt2` (tokens, merges, types, and the
pre-tokenizer's llama.cpp name: gpt2, smollm, qwen2 or llama-bpe); and the chat template training
rendered with.
"""

from __future__ import annotations

import json
import os

from absl import logging

from jaxft.errors import ConfigError
from jaxft.models.gguf import SPLIT_REGEXES


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


def add_tokenizer(w, tok_dir: str, enc, cfg) -> None:
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
  pad = tok.pad_token_id if tok.pad_token_id is not None else cfg.pad_token_id  # (config.json's)
  for key, value in (("bos", tok.bos_token_id), ("eos", tok.eos_token_id),
                     ("unk", tok.unk_token_id), ("pad", pad)):
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
  if any(k.get("type") == "Metaspace" for k in _step_kinds(spec.get("pre_tokenizer"))):
    raise ConfigError(f"{path}: a SentencePiece tokenizer (Metaspace) without its tokenizer.model "
                      f"beside it: llama.cpp's llama vocabulary needs the SentencePiece pieces and "
                      f"scores. Copy the checkpoint's tokenizer.model into {tok_dir} (transformers "
                      "5's save_pretrained leaves it out) or point model.tokenizer at a directory "
                      "that has it")
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


def _split_name(s: dict) -> str | None:
  """The llama.cpp name of a Split(Regex, Isolated) step whose regex it knows, else None."""
  if s.get("type") != "Split" or s.get("behavior") != "Isolated" or s.get("invert"):
    return None
  regex = (s.get("pattern") or {}).get("Regex")
  return next((name for name, r in SPLIT_REGEXES.items() if r == regex), None)  # llama.cpp's


def bpe_pre_name(path: str, pre: dict | None) -> str:
  """llama.cpp's name (tokenizer.ggml.pre) for a byte-level tokenizer.json's pre-tokenizer: `gpt2`
  (ByteLevel with GPT-2's regex), `smollm` (every digit alone, then the same), `qwen2` (Qwen2/3's
  split regex, then ByteLevel without its own) or `llama-bpe` (Llama 3's). Raises ConfigError
  naming the file for any other, whose split rules llama.cpp would not apply alike."""
  kinds = _step_kinds(pre)
  steps = [(s.get("type"), s.get("individual_digits"), s.get("use_regex")) for s in kinds]
  if steps == [("ByteLevel", None, True)]:
    return "gpt2"
  if steps == [("Digits", True, None), ("ByteLevel", None, True)]:
    return "smollm"
  if len(kinds) == 2 and steps[1] == ("ByteLevel", None, False) and _split_name(kinds[0]):
    return _split_name(kinds[0])
  raise ConfigError(f"{path}: pre_tokenizer {[s[0] for s in steps]} is not one GGUF export "
                    "names (ByteLevel: gpt2; Digits(individual) + ByteLevel: smollm; Qwen2's or "
                    "Llama 3's Split regex + ByteLevel: qwen2, llama-bpe); export --format=hf and "
                    "convert it with llama.cpp's convert_hf_to_gguf.py")


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
