"""GGUF files as model.path: tensors of every type jaxft reads, with llama.cpp's Q/K row order
undone (logits against transformers' gguf_file load), SmolLM2's tokenizer and chat template
rebuilt from the metadata (ids against transformers'), the configs/smollm2.py path end to end on a
2-layer copy of the real file (step-0 eval loss against transformers; evaluate; HF and PEFT exports
that transformers and PEFT load), and the refusals."""

import json
import os
import struct

import numpy as np
import pytest

from conftest import make_config, run_cli
from gguf_tiny import smollm2_path, tiny_llama, transformers_model, truncated_copy
from hf_tiny import jaxft_logits, one_device_shardings, rel_err, torch_logits
from jaxft.errors import CheckpointError, ConfigError

TYPES = {"token_embd.weight": "Q8_0", "attn_q.weight": "F16", "attn_k.weight": "BF16",
         "attn_v.weight": "Q4_0", "attn_output.weight": "Q4_1", "ffn_gate.weight": "Q4_K",
         "ffn_up.weight": "Q5_K", "ffn_down.weight": "Q6_K", "output.weight": "Q5_0"}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  d = tmp_path_factory.mktemp("gguf")
  src = smollm2_path()
  return {"smollm2": src, "trunc": truncated_copy(src, str(d / "smollm2-2layers.gguf"), layers=2),
          "tiny": tiny_llama(str(d / "tiny.gguf"), src, TYPES), "dir": d}


def _load(path, quant_kind="none"):
  from jaxft.models import gguf
  cfg = gguf.read_config(path)
  return cfg, gguf.load_params(path, cfg, one_device_shardings(cfg), quant_kind=quant_kind)


def _ids(batch=2, t=14):
  return np.random.RandomState(0).randint(0, 49152, (batch, t))


def _same_reading(a, b):
  """Asserts two GGUF readers hold the same fields (offsets, parts byte for byte and their
  dtypes, data indices, types, contents) and tensors (names, types, shapes, offsets, bytes)."""
  assert list(a.fields) == list(b.fields)
  for key, fa in a.fields.items():
    fb = b.fields[key]
    assert (fa.offset, fa.name, fa.data, fa.types) == (fb.offset, fb.name, fb.data, fb.types), key
    assert [(x.dtype, x.shape, x.tobytes()) for x in fa.parts] == \
        [(y.dtype, y.shape, y.tobytes()) for y in fb.parts], key
    assert fa.contents() == fb.contents(), key
  assert (a.data_offset, a.alignment, len(a.tensors)) == (b.data_offset, b.alignment, len(b.tensors))
  for ta, tb in zip(a.tensors, b.tensors):
    assert (ta.name, ta.tensor_type, ta.shape.tolist(), ta.n_elements, ta.n_bytes, ta.data_offset) \
        == (tb.name, tb.tensor_type, tb.shape.tolist(), tb.n_elements, tb.n_bytes, tb.data_offset)
    assert (ta.data.dtype, ta.data.shape) == (tb.data.dtype, tb.data.shape), ta.name
    assert np.array_equal(ta.data.view(np.uint8), tb.data.view(np.uint8)), ta.name


def _copy_with(writer_class, reader, path):
  """`reader`'s fields and tensors written by `writer_class` to `path`; the file's bytes."""
  from gguf_tiny import _copy_fields, _finish
  w = writer_class(path, "llama")
  _copy_fields(reader, w)
  for t in reader.tensors:
    w.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
  _finish(w)
  with open(path, "rb") as f:
    return f.read()


def _cut_arrays(read, writer_class, src, dst, n):
  """`src`'s metadata with every array cut to its first n entries, and one small tensor, at dst."""
  from gguf_tiny import _copy_fields, _finish
  r = read(src)
  w = writer_class(dst, "llama")
  _copy_fields(r, w, override={k: f.contents()[:n] for k, f in r.fields.items()
                               if len(f.types) > 1 and len(f.data) > n})
  w.add_tensor("x", np.arange(6, dtype=np.float32).reshape(2, 3))
  _finish(w)
  return dst


def test_bulk_reader_and_writer_match_the_gguf_package(files, tmp_path):
  """jaxft's GGUF metadata reader and writer (models/gguf_bulk.py; the suite's transformers loads
  and GGUF helpers use them too: conftest.py) against the gguf package's own GGUFReader and
  GGUFWriter: the same fields and tensors read from files with the real SmolLM2 file's metadata,
  a SentencePiece vocabulary (scores, token types) and odd arrays (nested, floats, bools,
  uint64); the same bytes written back."""
  import gguf as gg
  from conftest import GGUF_READER, GGUF_WRITER
  from jaxft.data.tokenize import write_quickstart_tokenizer
  from jaxft.models.gguf_bulk import open_reader, writer_class
  model = os.path.join(write_quickstart_tokenizer(str(tmp_path / "tok")), "tokenizer.model")
  odd = str(tmp_path / "odd.gguf")
  w = writer_class(GGUF_WRITER)(odd, "llama")
  w.add_array("test.nested", [[1, 2], [3]])
  w.add_array("test.floats", [0.5, -1.25])
  w.add_array("test.bools", [True, False, True])
  w.add_key_value("test.u64", [1, 2**40], gg.GGUFValueType.ARRAY, sub_type=gg.GGUFValueType.UINT64)
  w.add_string("test.text", "Über café 🤖")
  w.add_tensor("x", np.arange(6, dtype=np.float32).reshape(2, 3))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  assert GGUF_READER(odd).fields["test.u64"].contents() == [1, 2**40]
  # SmolLM2's metadata (byte-level tokens, merges, token types) and a SentencePiece vocabulary
  # (pieces, float scores, types), their arrays cut to the first 4,000 entries: the whole
  # vocabularies prove no more and cost seconds in the slow original reader and writer
  spm = tiny_llama(str(tmp_path / "spm.gguf"), model, {}, hidden=64, inter=128, layers=1)
  cut = [_cut_arrays(open_reader, writer_class(GGUF_WRITER), src, str(tmp_path / f"cut{k}.gguf"),
                     4000)
         for k, src in enumerate((files["tiny"], spm))]
  for i, path in enumerate(cut + [odd]):
    original = GGUF_READER(path)
    _same_reading(original, open_reader(path))
    assert _copy_with(writer_class(GGUF_WRITER), original, str(tmp_path / f"bulk{i}.gguf")) \
        == _copy_with(GGUF_WRITER, original, str(tmp_path / f"plain{i}.gguf")), path
  with pytest.raises(ValueError, match="same type"):  # as GGUFWriter refuses a mixed array
    writer_class(GGUF_WRITER)(str(tmp_path / "mixed.gguf"), "llama")._pack_val(
        ["a", 1], gg.GGUFValueType.ARRAY, add_vtype=True)
  with pytest.raises(struct.error):  # and a value out of its type's range
    writer_class(GGUF_WRITER)(str(tmp_path / "range.gguf"), "llama")._pack_val(
        [1, 2**40], gg.GGUFValueType.ARRAY, add_vtype=True, sub_type=gg.GGUFValueType.INT32)


@pytest.mark.slow
def test_every_tensor_type_matches_transformers(files):
  """F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0 and the K-quants Q4_K, Q5_K, Q6_K, an untied output
  matrix, GQA: the logits equal transformers' load of the same file."""
  cfg, params = _load(files["tiny"])
  assert not cfg.tie_embeddings and cfg.num_kv_heads < cfg.num_heads
  ref = torch_logits(transformers_model(files["tiny"]), _ids())
  got = jaxft_logits(cfg, params, _ids())
  assert rel_err(got, ref) < 1e-4
  # Without undoing llama.cpp's Q/K row order the model would differ.
  from jaxft.models import gguf
  swapped = dict(params, layers=dict(params["layers"]))
  for name, heads in (("q_proj", cfg.num_heads), ("k_proj", cfg.num_kv_heads)):
    k = np.asarray(params["layers"][name]["kernel"])  # [L, in, out]: permute the out columns again
    perm = gguf._unpermute(np.arange(k.shape[-1])[:, None], heads)[:, 0]
    swapped["layers"][name] = {"kernel": k[..., np.argsort(perm)]}
  assert rel_err(jaxft_logits(cfg, swapped, _ids()), ref) > 1e-3
  # Quantized again on load: int8 kernels, logits close to the float ones.
  _, q = _load(files["tiny"], "int8")
  assert hasattr(q["layers"]["q_proj"]["kernel"], "dequantize")
  assert 1e-4 < rel_err(jaxft_logits(cfg, q, _ids()), ref) < 0.2


@pytest.mark.slow
def test_smollm2_config_tokenizer_and_logits_match_transformers(files):
  import transformers
  from jaxft.models import gguf
  path = files["trunc"]
  cfg, params = _load(path)
  assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.vocab_size) == (
      2, 576, 9, 3, 49152)
  assert cfg.tie_embeddings and "lm_head" not in params
  assert rel_err(jaxft_logits(cfg, params, _ids()), torch_logits(transformers_model(path), _ids())) < 1e-4
  tok = gguf.build_tokenizer(path)
  ref = transformers.AutoTokenizer.from_pretrained(os.path.dirname(path),
                                                   gguf_file=os.path.basename(path))
  assert tok.is_fast and tok.eos_token == "<|im_end|>" and "<|im_start|>" in tok.chat_template
  msgs = [{"role": "user", "content": "Dorian paid 1,290 euros in 2031; isn't that   odd?\n\tÜber café 🤖"},
          {"role": "assistant", "content": "Hold the leaf button for nine seconds."}]
  text = tok.apply_chat_template(msgs, tokenize=False)
  assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_end|>\n")
  assert text == ref.apply_chat_template(msgs, tokenize=False)
  ids = tok(text, add_special_tokens=False)["input_ids"]
  assert ids == ref(text, add_special_tokens=False)["input_ids"]
  assert tok.decode(ids) == text
  assert ids.count(tok.convert_tokens_to_ids("<|im_start|>")) == 3  # control tokens stay whole


def test_sentencepiece_tokenizer_matches_the_original(tmp_path):
  """A GGUF whose tokenizer is SentencePiece BPE (tokenizer.ggml.model=llama: pieces and scores,
  no merges; here the Mistral v1 model the quickstart uses) encodes and decodes as SentencePiece
  itself does with the .model file: dummy prefix, runs of spaces, byte fallback, BOS."""
  import sentencepiece as spm
  from jaxft.data.tokenize import write_quickstart_tokenizer
  from jaxft.models import gguf
  smollm2_path()  # needs gguf
  model = os.path.join(write_quickstart_tokenizer(str(tmp_path / "tok")), "tokenizer.model")
  path = tiny_llama(str(tmp_path / "spm.gguf"), model, {}, hidden=64, inter=128, layers=1)
  tok = gguf.build_tokenizer(path)
  sp = spm.SentencePieceProcessor(model_file=model)
  assert tok.bos_token == "<s>" and tok.eos_token == "</s>" and tok.is_fast
  for text in ["Hello world", " two  spaces and\nnew lines\n", "Tessaline 2031: 1,290 euros",
               "Über café 🤖 ǅ", "   lead", "end  "]:
    ids = tok(text)["input_ids"]
    assert ids == [sp.bos_id()] + sp.encode(text), text
    assert tok.decode(ids, skip_special_tokens=True) == sp.decode(ids), text


def _write_bytes(path, data):
  with open(path, "wb") as f:
    f.write(data)
  return str(path)


@pytest.mark.slow
def test_refusals_name_the_file_and_key(files, tmp_path):
  from jaxft.models import gguf
  d = tmp_path
  other = tiny_llama(str(d / "phi.gguf"), files["smollm2"], {}, hidden=64, inter=128, arch="phi3")
  with pytest.raises(ConfigError, match=r"phi\.gguf: general\.architecture=.phi3. is not supported"):
    gguf.read_config(other)
  with open(files["tiny"], "rb") as f:
    whole = f.read()
  cut = _write_bytes(d / "cut.gguf", whole[: len(whole) // 2])
  with pytest.raises(CheckpointError, match="cut.gguf"):
    _load(cut)
  with pytest.raises(CheckpointError, match="notgguf.gguf: not a readable GGUF"):
    gguf.read_config(_write_bytes(d / "notgguf.gguf", b"PK\x03\x04" + bytes(64)))
  with pytest.raises(CheckpointError, match="no such GGUF file"):
    gguf.read_config(str(d / "absent.gguf"))
  # A tensor type jaxft does not read (TQ2_0 bytes) is named before anything loads.
  import gguf as gg
  r = gg.GGUFReader(files["tiny"])
  w = gg.GGUFWriter(str(d / "tq.gguf"), "llama")
  from gguf_tiny import _copy_fields, _finish
  _copy_fields(r, w)
  for t in r.tensors:
    if t.name == "blk.1.ffn_up.weight":  # [in=256, out=512]: one 66-byte block per row
      w.add_tensor(t.name, np.zeros((int(t.shape[1]), 66 * int(t.shape[0]) // 256), np.uint8),
                   raw_dtype=gg.GGMLQuantizationType.TQ2_0)
    else:
      w.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
  _finish(w)
  with pytest.raises(CheckpointError, match=r"tq\.gguf: tensor blk\.1\.ffn_up\.weight has type TQ2_0"):
    _load(str(d / "tq.gguf"))


@pytest.mark.slow
def test_corrupted_tensor_data_is_refused_by_name(files, tmp_path):
  """Bytes overwritten in the tensor data (the header intact): 0xFFFF over an F16 tensor (NaN) and
  a Q8_0 block scale set to 60000 (weights near 7e6) are refused naming the file and tensor,
  instead of training from garbage."""
  import gguf as gg
  r = gg.GGUFReader(files["tiny"])
  offset = {t.name: int(t.data_offset) for t in r.tensors}
  with open(files["tiny"], "rb") as f:
    whole = bytearray(f.read())
  nan = bytearray(whole)
  q = offset["blk.0.attn_q.weight"]  # F16
  nan[q:q + 256] = b"\xff" * 256
  with pytest.raises(CheckpointError, match=r"nan\.gguf: tensor blk\.0\.attn_q\.weight \(F16\) "
                     r"holds 128 non-finite values"):
    _load(_write_bytes(tmp_path / "nan.gguf", bytes(nan)))
  big = bytearray(whole)
  e = offset["token_embd.weight"]  # Q8_0: each 34-byte block starts with its float16 scale
  big[e:e + 2] = np.array([60000.0], np.float16).tobytes()
  with pytest.raises(CheckpointError, match=r"big\.gguf: tensor token_embd\.weight \(Q8_0\) holds "
                     r"a value of magnitude .* a scale is out of range"):
    _load(_write_bytes(tmp_path / "big.gguf", bytes(big)))


@pytest.mark.slow
def test_unexpected_and_missing_tensors(files, tmp_path):
  import gguf as gg
  from gguf_tiny import _copy_fields, _finish
  r = gg.GGUFReader(files["tiny"])
  for name, keep, extra, pattern in (
      ("extra.gguf", lambda n: True, True, r"extra\.gguf: unexpected tensor blk\.0\.attn_q\.bias"),
      ("missing.gguf", lambda n: n != "blk.1.ffn_down.weight", False,
       r"missing\.gguf: the tensor for model\.layers\.1\.mlp\.down_proj\.weight is missing")):
    w = gg.GGUFWriter(str(tmp_path / name), "llama")
    _copy_fields(r, w)
    for t in r.tensors:
      if keep(t.name):
        w.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
    if extra:
      w.add_tensor("blk.0.attn_q.bias", np.zeros(256, np.float32))
    _finish(w)
    with pytest.raises(CheckpointError, match=pattern):
      _load(str(tmp_path / name))


def _torch_loss(model, examples) -> float:
  """Mean cross-entropy over the target tokens of all examples (jaxft's eval_loss), in torch."""
  import torch
  total, count = 0.0, 0
  with torch.no_grad():
    for e in examples:
      ids = torch.tensor(np.asarray(e.ids)[None], dtype=torch.long)
      logp = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
      tgt = ids[0, 1:]
      w = torch.tensor(np.asarray(e.mask[1:]), dtype=torch.bool)
      total += float(-logp[torch.arange(len(tgt)), tgt][w].sum())
      count += int(w.sum())
  return total / count


@pytest.mark.slow
def test_smollm2_config_runs_end_to_end_on_a_truncated_copy(files, tmp_path):
  """configs/smollm2.py on the 2-layer copy, in float32: step-0 eval loss equals transformers' on
  the same file and data; evaluate writes base and tuned answers (and a labelled second set);
  the merged HF export and the PEFT adapter load in transformers and PEFT with the GGUF's
  byte-level BPE tokenizer and ChatML template, and agree with each other."""
  import transformers
  from jaxft import session
  from jaxft.data import bundled, pipeline
  wd = str(tmp_path / "run")
  common = [f"--config.model.path={files['trunc']}", "--config.model.dtype=float32",
            "--config.model.param_dtype=float32"]
  # 24 of the eval rows (both kinds, answerable and not): the step-0 parity needs no more, and the
  # 49,152-token head makes every eval row cost
  few = str(tmp_path / "few_eval.jsonl")
  with open(make_config("smollm2").data.eval) as f, open(few, "w") as g:
    rows = f.readlines()
    g.writelines(rows[:16] + rows[-8:])
  r = run_cli("jaxft.train", "--config=configs/smollm2.py", f"--workdir={wd}", *common,
              "--config.train.steps=3", "--config.data.batch_size=4", "--config.data.max_len=96",
              "--config.train.progress=False", "--config.train.eval_batches=0",
              f"--config.data.eval={few}")
  assert r.returncode == 0, r.stderr[-3000:]
  with open(os.path.join(wd, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  step0 = next(m["eval_loss"] for m in rows if m["step"] == 0 and "eval_loss" in m)
  config = session.load_workdir_config(wd)
  enc = session.encoder(config, wd)
  eval_rows = str(tmp_path / "eval.jsonl")
  ds = pipeline.load_examples(config.data.eval, enc, "auto", config.data.max_len, 49152)
  ref_model = transformers_model(files["trunc"])
  assert step0 == pytest.approx(_torch_loss(ref_model, ds.examples), rel=1e-4)

  with open(bundled.path("general_eval.jsonl")) as f, open(eval_rows, "w") as g:
    g.writelines(f.readlines()[:4])
  r = run_cli("jaxft.evaluate", "--config=configs/smollm2.py", f"--workdir={wd}", *common,
              f"--config.data.eval={eval_rows}", "--label=general", "--max_new_tokens=8")
  assert r.returncode == 0, r.stderr[-3000:]
  with open(os.path.join(wd, "eval_general.json")) as f:
    res = json.load(f)
  assert res["examples_with_reference"] == 4 and {"tuned", "base"} <= set(res)
  assert "contains_match" in res["base"] and not os.path.exists(os.path.join(wd, "eval.json"))

  hf_out, peft_out = str(tmp_path / "hf"), str(tmp_path / "peft")
  from jaxft import export  # (in process: the export command's start-up is tested elsewhere)
  export.export_hf(wd, hf_out)
  export.export_peft(wd, peft_out)
  merged = transformers.AutoModelForCausalLM.from_pretrained(hf_out, dtype="float32").eval()
  tok = transformers.AutoTokenizer.from_pretrained(hf_out)
  msgs = [{"role": "user", "content": "Who founded Tessaline Robotics?"}]
  prompt = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
  assert prompt == enc.render(msgs, add_generation_prompt=True)
  ids = np.asarray([tok(prompt, add_special_tokens=False)["input_ids"]])
  assert ids.tolist()[0] == enc.prompt_ids(msgs[0]["content"]).tolist()
  from peft import PeftModel
  base = torch_logits(ref_model, ids)  # (before PEFT wraps the same model in place)
  adapted = PeftModel.from_pretrained(ref_model, peft_out).eval()
  tuned = torch_logits(merged, ids)
  assert rel_err(torch_logits(adapted, ids), tuned) < 1e-4
  assert rel_err(tuned, base) > 1e-4  # training moved the model
