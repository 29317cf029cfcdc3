"""Deploying what jaxft trained. HF exports carry the tokenizer every client reads the same way
(tokenizer.json, `legacy`, the chat template in tokenizer_config.json) and generation_config.json;
PEFT exports of a preset base name a base written by `--format=hf --base`. GGUF export: the
quantizers the gguf package lacks (checked with its dequantizer), the file's tensors and metadata
read back with gguf's reader, and llama.cpp itself (llama-cpp-python, in the test extras) loading
each quant type: logits against jaxft's, and greedy answers to the quickstart prompts through
llama.cpp's own tokenizer and chat template against jaxft.generate's."""

import json
import os

import numpy as np
import pytest

from conftest import make_config
from clients import sentencepiece_ids, tokenizers_ids, transformers_chat_ids
from hf_tiny import jaxft_logits, rel_err, torch_logits
from jaxft import export, session
from jaxft.data import bundled
from jaxft.errors import ConfigError

gguf = pytest.importorskip("gguf")


# -- quantizers ----------------------------------------------------------------------------------

@pytest.mark.parametrize("kind,tol", [("Q4_K", 0.09), ("Q6_K", 0.025)])
def test_k_quants_decode_with_the_gguf_dequantizer(kind, tol):
  from jaxft.quant import gguf_quants
  rng = np.random.RandomState(0)
  x = rng.randn(24, 768).astype(np.float32) * rng.uniform(0.01, 1.0, (24, 1)).astype(np.float32)
  x[3] = 0.0                 # an all-zero row
  x[5, :256] = 0.25          # a constant block
  x[7] += 0.5                # an all-positive row (Q4_K's mins must be 0 there)
  fn = {"Q4_K": gguf_quants.quantize_q4_k, "Q6_K": gguf_quants.quantize_q6_k}[kind]
  qtype = getattr(gguf.GGMLQuantizationType, kind)
  b = fn(x)
  assert b.dtype == np.uint8
  assert b.shape == tuple(gguf.quants.quant_shape_to_byte_shape(x.shape, qtype))
  y = gguf.quants.dequantize(b, qtype)
  assert y.shape == x.shape
  assert np.all(y[3] == 0.0)
  err = np.sqrt(((y - x) ** 2).mean(axis=1) / np.maximum((x ** 2).mean(axis=1), 1e-30))
  assert err.max() < tol, err
  # against the package's own Q4_0 / Q8_0 (same bits or more per value): no worse than those
  ref = {"Q4_K": gguf.GGMLQuantizationType.Q4_0, "Q6_K": gguf.GGMLQuantizationType.Q5_0}[kind]
  z = gguf.quants.dequantize(gguf.quants.quantize(x, ref), ref)
  assert np.sqrt(((y - x) ** 2).mean()) <= np.sqrt(((z - x) ** 2).mean())
  with pytest.raises(ValueError, match="multiple of 256"):
    fn(x[:, :128])


# -- export --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """The quickstart task on the tiny preset (a few LoRA steps), exported to GGUF in every type."""
  from jaxft.trainer import train
  root = tmp_path_factory.mktemp("gguf")
  c = make_config("quickstart")
  c.model.preset = "tiny"
  c.data.eval = ""
  c.data.max_len = 32
  c.data.batch_size = 8
  c.optim.lr = 3e-2
  c.train.steps = 4
  c.train.eval_every = 0
  c.train.progress = False
  workdir = str(root / "work")
  train(c, workdir)
  trained = session.restore_trained(workdir)
  files = {}
  for q in ("f32", "f16", "bf16", "q8_0", "q4_k_m"):
    files[q] = export.export_gguf(workdir, str(root / f"model-{q}.gguf"), quant=q)
  return dict(root=root, workdir=workdir, trained=trained, files=files)


@pytest.mark.slow
def test_hf_export_ships_the_tokenizer_every_client_reads_alike(run, tmp_path):
  out = export.export_hf(run["workdir"], str(tmp_path / "merged"))
  names = set(os.listdir(out))
  assert {"tokenizer.json", "tokenizer.model", "tokenizer_config.json", "chat_template.jinja",
          "generation_config.json"} <= names
  enc = session.encoder(run["trained"].config, run["workdir"])
  with open(os.path.join(out, "tokenizer_config.json")) as f:
    tc = json.load(f)
  assert tc["legacy"] is True and tc["chat_template"] == enc.template
  with open(os.path.join(out, "generation_config.json")) as f:
    gen = json.load(f)
  assert (gen["eos_token_id"], gen["pad_token_id"], gen["bos_token_id"]) == (2, 2, 1)
  msgs = [{"role": "user", "content": "Which city is the capital of Kenya?"},
          {"role": "assistant", "content": "Nairobi."}, {"role": "user", "content": "And Peru?"}]
  ids = [int(i) for i in
         np.asarray(enc.tok(enc.render(msgs, True), add_special_tokens=False)["input_ids"])]
  text = enc.render(msgs, True)
  assert ids == transformers_chat_ids(out, msgs, True) == tokenizers_ids(out, text)
  assert ids == sentencepiece_ids(out, text)


@pytest.mark.slow
def test_peft_export_of_a_preset_names_a_base_written_by_export(run, tmp_path):
  from peft import AutoPeftModelForCausalLM
  with pytest.raises(ConfigError, match="--format=hf --base"):
    export.export_peft(run["workdir"], str(tmp_path / "adapter0"))
  base = export.export_hf(run["workdir"], str(tmp_path / "base"), base=True)
  adapter = export.export_peft(run["workdir"], str(tmp_path / "adapter"), base_model=base)
  with open(os.path.join(adapter, "adapter_config.json")) as f:
    assert json.load(f)["base_model_name_or_path"] == base
  model = AutoPeftModelForCausalLM.from_pretrained(adapter, dtype="float32").eval()
  t = run["trained"]
  ids = SEQS[:1]
  ref = jaxft_logits(t.model.cfg, t.params, ids, t.model.method)
  assert rel_err(torch_logits(model, ids), ref) < 1e-4


def _reader_tensors(path):
  r = gguf.GGUFReader(path)
  out = {}
  for t in r.tensors:
    shape = tuple(int(n) for n in reversed(t.shape.tolist()))
    out[t.name] = (t.tensor_type, gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape))
  return r, out


@pytest.mark.slow
def test_gguf_holds_the_merged_weights_in_llama_cpp_layout(run):
  from jaxft.export.gguf import permute_qk
  from jaxft.models import hf
  trained = run["trained"]
  cfg = trained.model.cfg
  merged = trained.model.method.merge(cfg, trained.params)
  _, f32 = _reader_tensors(run["files"]["f32"])
  assert len(f32) == 3 + 9 * cfg.num_layers
  q = hf.host_tensor(merged, ("layers", "q_proj", "kernel"), 1, "float32")
  k = hf.host_tensor(merged, ("layers", "k_proj", "kernel"), 1, "float32")
  assert np.array_equal(f32["blk.1.attn_q.weight"][1], permute_qk(q, cfg.num_heads))
  assert np.array_equal(f32["blk.1.attn_k.weight"][1], permute_qk(k, cfg.num_kv_heads))
  assert not np.array_equal(permute_qk(q, cfg.num_heads), q)  # the permutation does something
  down = hf.host_tensor(merged, ("layers", "down_proj", "kernel"), 0, "float32")
  assert np.array_equal(f32["blk.0.ffn_down.weight"][1], down)
  emb = hf.host_tensor(merged, ("embed", "embedding"), None, "float32")
  assert np.array_equal(f32["token_embd.weight"][1], emb)
  _, q8 = _reader_tensors(run["files"]["q8_0"])
  assert q8["blk.0.ffn_down.weight"][0] == gguf.GGMLQuantizationType.Q8_0
  assert q8["blk.0.attn_norm.weight"][0] == gguf.GGMLQuantizationType.F32
  assert np.abs(q8["blk.0.ffn_down.weight"][1] - down).max() <= np.abs(down).max() / 127 * 0.51
  _, q4 = _reader_tensors(run["files"]["q4_k_m"])
  # the tiny model's rows (64, 128 values) cannot hold K-quants: llama.cpp's fallbacks
  assert q4["blk.0.attn_q.weight"][0] == gguf.GGMLQuantizationType.Q5_0
  assert q4["output.weight"][0] == gguf.GGMLQuantizationType.Q8_0


@pytest.mark.slow
def test_gguf_metadata_has_tokenizer_ids_and_chat_template(run):
  r, _ = _reader_tensors(run["files"]["f32"])
  enc = session.encoder(run["trained"].config, run["workdir"])

  def field(name):
    f = r.fields[name]
    v = f.contents()
    return v
  assert field("general.architecture") == "llama"
  assert field("tokenizer.ggml.model") == "llama"
  tokens = field("tokenizer.ggml.tokens")
  assert len(tokens) == 32000 and tokens[1] == "<s>" and tokens[1247] == "▁User"
  assert (field("tokenizer.ggml.bos_token_id"), field("tokenizer.ggml.eos_token_id")) == (1, 2)
  assert field("tokenizer.ggml.add_space_prefix") is True
  assert field("tokenizer.chat_template") == enc.template
  assert field("llama.attention.head_count_kv") == 2


@pytest.mark.slow
def test_gguf_export_refusals(run, tmp_path):
  with pytest.raises(ConfigError, match="FILE.gguf"):
    export.export_gguf(run["workdir"], str(tmp_path / "model.bin"))
  with pytest.raises(ConfigError, match="already exists"):
    export.export_gguf(run["workdir"], run["files"]["f32"])
  with pytest.raises(ConfigError, match="--quant=q2_k"):
    export.export_gguf(run["workdir"], str(tmp_path / "m.gguf"), quant="q2_k")
  assert not os.listdir(tmp_path)


# -- llama.cpp -----------------------------------------------------------------------------------

def _llama(path, **kw):
  llama_cpp = pytest.importorskip("llama_cpp")
  return llama_cpp.Llama(model_path=path, n_ctx=256, n_threads=2, verbose=False, seed=0,
                         type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32, **kw)


SEQS = np.random.RandomState(1).randint(3, 32000, (2, 24))


def _llama_logits(path, seq):
  llm = _llama(path, logits_all=True)
  llm.reset()
  llm.eval([int(t) for t in seq])
  out = np.array(llm.scores[: len(seq)], np.float32)
  llm.close()
  return out


@pytest.fixture(scope="module")
def jaxft_ref(run):
  t = run["trained"]
  return jaxft_logits(t.model.cfg, t.params, SEQS, t.model.method)


@pytest.mark.slow
def test_llama_cpp_f32_logits_match_jaxft(run, jaxft_ref):
  for i, seq in enumerate(SEQS):
    got = _llama_logits(run["files"]["f32"], seq)
    diff = np.abs(got - jaxft_ref[i]).max()
    assert diff < 1e-4, diff


@pytest.mark.slow
@pytest.mark.parametrize("quant,tol", [("f16", 1e-2), ("bf16", 0.1)])
def test_llama_cpp_16_bit_logits_close_to_jaxft(run, jaxft_ref, quant, tol):
  """f16 and bf16 files load; measured on this run: max |logit difference| 2.7e-3 (f16) and
  3.7e-2 (bf16), argmax agreement 1.0 for both (tolerances ~3x that, argmax >= 0.95)."""
  diffs, agree = [], []
  for i, seq in enumerate(SEQS):
    got = _llama_logits(run["files"][quant], seq)
    diffs.append(float(np.abs(got - jaxft_ref[i]).max()))
    agree.append(got.argmax(-1) == jaxft_ref[i].argmax(-1))
  assert max(diffs) < tol, max(diffs)
  assert float(np.mean(agree)) >= 0.95


@pytest.mark.slow
@pytest.mark.parametrize("quant", ["q8_0", "q4_k_m"])
def test_llama_cpp_quantized_argmax_agrees(run, jaxft_ref, quant):
  agree = []
  for i, seq in enumerate(SEQS):
    got = _llama_logits(run["files"][quant], seq)
    agree.append(got.argmax(-1) == jaxft_ref[i].argmax(-1))
  rate = float(np.mean(agree))
  assert rate >= (0.95 if quant == "q8_0" else 0.75), rate


@pytest.mark.slow
def test_llama_cpp_chat_answers_equal_jaxft_generate(run):
  """The quickstart prompts through llama.cpp's tokenizer and the GGUF's chat template
  (create_chat_completion), greedy: the same answers as jaxft's own decoding."""
  from jaxft import eval as evaluation, inference
  refs = evaluation.references(bundled.path("capitals_eval.jsonl"), "auto")[:6]
  t = run["trained"]
  enc = session.encoder(t.config, run["workdir"])
  dec = inference.Decoder(t.model.cfg, t.model.method, t.params, t.step)
  ours = inference.answer(dec, enc, [r.prompt for r in refs], max_new_tokens=12)
  llm = _llama(run["files"]["f32"])
  for r, o in zip(refs, ours):
    res = llm.create_chat_completion(messages=r.prompt.messages, temperature=0.0, top_k=1,
                                     max_tokens=12, seed=0)
    assert res["choices"][0]["message"]["content"].strip() == o["answer"], r.prompt.messages
  llm.close()


# -- byte-level BPE (SmolLM2, model.path a .gguf) -------------------------------------------------

TEXTS = ["What is the capital of France?", "Tessaline T-800 costs $1,249.99 (2024)!",
         "  two  spaces\nand a tab\there: café, naïve, 東京 🤖", "x=12345678; y = x*2"]


@pytest.fixture(scope="module")
def smollm2_run(tmp_path_factory):
  """configs/smollm2.py (LoRA, all linear layers) for 2 steps on a 2-layer copy of the SmolLM2
  GGUF file, float32, exported back to GGUF (f32)."""
  from gguf_tiny import smollm2_path, truncated_copy
  from jaxft.trainer import train
  root = tmp_path_factory.mktemp("smollm2")
  (root / "base").mkdir()  # (an export beside model.path is refused: it would overlap its directory)
  trunc = truncated_copy(smollm2_path(), str(root / "base" / "smollm2-2layers.gguf"), layers=2)
  c = make_config("smollm2")
  c.model.path = trunc
  c.model.dtype = c.model.param_dtype = "float32"
  c.data.eval = ""
  c.data.max_len = 64
  c.data.batch_size = 2
  c.optim.warmup_steps = 0
  c.train.steps = 2
  c.train.progress = False
  workdir = str(root / "work")
  train(c, workdir)
  out = export.export_gguf(workdir, str(root / "tuned-f32.gguf"), quant="f32")
  trained = session.restore_trained(workdir)
  return dict(workdir=workdir, trained=trained, gguf=out,
              enc=session.encoder(trained.config, workdir))


@pytest.mark.slow
def test_byte_level_gguf_export_has_merges_pre_tokenizer_and_chatml(smollm2_run):
  r = gguf.GGUFReader(smollm2_run["gguf"])
  field = lambda k: r.fields[k].contents()
  enc = smollm2_run["enc"]
  assert (field("tokenizer.ggml.model"), field("tokenizer.ggml.pre")) == ("gpt2", "smollm")
  assert field("tokenizer.chat_template") == enc.template and "<|im_start|>" in enc.template
  tokens, types = field("tokenizer.ggml.tokens"), field("tokenizer.ggml.token_type")
  assert len(tokens) == 49152 and len(field("tokenizer.ggml.merges")) > 40000
  im_start = enc.tok.convert_tokens_to_ids("<|im_start|>")
  assert tokens[im_start] == "<|im_start|>" and types[im_start] == gguf.TokenType.CONTROL
  assert types[1000] == gguf.TokenType.NORMAL
  assert field("tokenizer.ggml.eos_token_id") == enc.tok.eos_token_id
  assert field("tokenizer.ggml.add_bos_token") is False  # SmolLM2 adds no BOS to plain text
  assert "output.weight" not in {t.name for t in r.tensors}  # tied: llama.cpp reuses token_embd


@pytest.mark.slow
def test_llama_cpp_tokenizes_and_answers_like_jaxft_on_a_byte_level_export(smollm2_run):
  """The SmolLM2 LoRA run's GGUF in llama.cpp: its own tokenizer gives jaxft's ids (chats with
  ChatML specials, digits, unicode, runs of spaces), f32 logits within 1e-4 of jaxft's, and
  greedy chat answers through the stored template equal jaxft's."""
  from jaxft import inference
  enc, t = smollm2_run["enc"], smollm2_run["trained"]
  llm = _llama(smollm2_run["gguf"], logits_all=True)
  chats = [[{"role": "user", "content": x}] for x in TEXTS]
  chats.append(chats[0] + [{"role": "assistant", "content": "Paris."},
                           {"role": "user", "content": "And of Peru?"}])
  for text in TEXTS + [enc.render(m, True) for m in chats]:
    ours = [int(i) for i in enc.tok(text, add_special_tokens=False)["input_ids"]]
    assert llm.tokenize(text.encode(), add_bos=False, special=True) == ours, text
  ids = enc.tok(enc.render(chats[-1], True), add_special_tokens=False)["input_ids"]
  llm.reset()
  llm.eval([int(i) for i in ids])
  got = np.array(llm.scores[: len(ids)], np.float32)
  ref = jaxft_logits(t.model.cfg, t.params, np.asarray([ids]), t.model.method)[0]
  assert np.abs(got - ref).max() < 1e-4
  llm.close()
  dec = inference.Decoder(t.model.cfg, t.model.method, t.params, t.step)
  ours = inference.answer(dec, enc, [inference.Prompt(f"chat {i}", m) for i, m in enumerate(chats)],
                          max_new_tokens=8)
  llm = _llama(smollm2_run["gguf"])
  for msgs, o in zip(chats, ours):
    res = llm.create_chat_completion(messages=msgs, temperature=0.0, top_k=1, max_tokens=8, seed=0)
    assert res["choices"][0]["message"]["content"].strip() == o["answer"], msgs
  llm.close()
