"""GGUF out and in for every family jaxft trains beyond the quickstart's Llama/Mistral: Llama 3.1's
RoPE scaling (rope_freqs), Qwen2, Qwen3, Gemma 2, Gemma 3 (text), Mixtral and Qwen3-MoE. For a
tiny random checkpoint of each (odd head counts, GQA and multi-query, tied and untied heads,
llama3 RoPE scaling, Gemma's sliding/global mix, top-1 and top-2 experts)
with the family's own chat template (ChatML, Gemma's turns, Mixtral-Instruct; their turn tokens
added to the quickstart's SentencePiece vocabulary), a 2-step LoRA run on all linear layers is
exported (export_gguf in process) as f32, then q8_0, q4_k_m and f16 or bf16: llama.cpp
(llama-cpp-python, f32 KV cache) gives jaxft's logits within 1e-3 and jaxft's greedy answers
through the file's own tokenizer and chat template; the other types load and answer; the file read
back as model.path gives jaxft's logits within 1e-5 and the tokenizer's ids; a damaged file is
refused naming what is wrong. What llama.cpp cannot express is refused by name. One export and
one llama.cpp load per file."""

import json
import os
import shutil
from unittest import mock

import numpy as np
import pytest

from hf_tiny import chat_config, jaxft_logits, make_tiny, one_device_shardings
from jaxft import export, session
from jaxft.errors import ConfigError
from jaxft.models import families

pytest.importorskip("gguf")
llama_cpp = pytest.importorskip("llama_cpp")

# family -> make_tiny overrides (beside chat_base's 32000-token vocabulary)
VARIANTS = {
    # Llama 3.1's RoPE scaling with wavelength cut-offs among these 8 frequencies (6.3, 19.9, 62.8,
    # ...): factor 1, smoothed (2.48) and 4; SEQ is longer than the original 16 positions.
    # low/high other than the published 1/4: read back exactly only through jaxft's own keys.
    "llama": dict(rope_scaling={"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 0.5,
                                "high_freq_factor": 2.0, "original_max_position_embeddings": 16},
                  max_position_embeddings=128),
    "qwen2": dict(num_attention_heads=4, num_key_value_heads=2),  # tied (Qwen2's default), GQA
    "qwen3": dict(num_attention_heads=3, num_key_value_heads=1, head_dim=24,
                  tie_word_embeddings=True),  # odd heads, head_dim free of hidden/heads
    "gemma2": dict(num_attention_heads=3, num_key_value_heads=1, head_dim=20, hidden_size=60),
    # 4 layers sliding/global alternating (window 4), both caps, query_pre_attn_scalar 24 != 20
    "gemma3": dict(num_attention_heads=5, num_key_value_heads=1, head_dim=12, hidden_size=60,
                   tie_word_embeddings=False),  # 7 layers 5:1, local/global RoPE, untied
    "mixtral": dict(num_attention_heads=3, num_key_value_heads=1, head_dim=16, hidden_size=48,
                    num_local_experts=3, num_experts_per_tok=1),  # top-1 of 3, untied
    "qwen3_moe": dict(num_attention_heads=5, num_key_value_heads=5, head_dim=8),  # top-2 of 4
}
ARCH = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma2": "gemma2", "gemma3": "gemma3",
        "mixtral": "llama", "qwen3_moe": "qwen3moe"}
# Each family's own chat template (Qwen's ChatML and Mixtral-Instruct's are the strings
# llama-cpp-python recognises and renders with its built-in formatters; Gemma's is rendered from
# the file by jinja2), its turn tokens added to the quickstart's SentencePiece vocabulary as
# special tokens, and the token that ends an assistant turn as EOS.
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
          "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|im_start|>assistant\n' }}{% endif %}")
GEMMA = ("{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role "
         "not supported') }}{% endif %}{% for message in messages %}{% if (message['role'] == "
         "'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must "
         "alternate user/assistant/user/assistant/...') }}{% endif %}{% if (message['role'] == "
         "'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
         "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + "
         "'<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model"
         "\n'}}{% endif %}")
MIXTRAL = ("{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != "
           "(loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate "
           "user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}"
           "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == "
           "'assistant' %}{{ message['content'] + eos_token}}{% else %}{{ raise_exception('Only "
           "user and assistant roles are supported!') }}{% endif %}{% endfor %}")
LLAMA3 = ("{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] "
          "+ '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
          "{% endif %}")
_QWEN = (CHATML, ["<|im_start|>", "<|im_end|>"], "<|im_end|>")
_GEMMA = (GEMMA, ["<start_of_turn>", "<end_of_turn>"], "<end_of_turn>")
CHAT = {"llama": (LLAMA3, ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"], "<|eot_id|>"),
        "qwen2": _QWEN, "qwen3": _QWEN, "qwen3_moe": _QWEN, "gemma2": _GEMMA, "gemma3": _GEMMA,
        "mixtral": (MIXTRAL, [], "</s>")}
QUANTS = ("f32", "q8_0", "q4_k_m")
# and one 16-bit type per family, alternating (test_deploy.py loads both for Llama)
SIXTEEN = {"llama": "bf16", "qwen2": "f16", "qwen3": "bf16", "gemma2": "f16", "gemma3": "bf16", "mixtral": "f16",
           "qwen3_moe": "bf16"}
SEQ = np.random.RandomState(3).randint(3, 32000, (1, 20))  # longer than Gemma's window of 4
# (no runs of spaces: the quickstart's tokenizer.json splits those unlike SentencePiece, whose ids
# the GGUF and llama.cpp keep; tests/test_gguf.py checks the SentencePiece rebuild on them)
MSGS = [{"role": "user", "content": "Dorian paid 1,290 € in 2031 — naïve?\nÜber café 🤖 東京"},
        {"role": "assistant", "content": "Hold the leaf button."}]
PROMPTS = ["What is 2 plus 2?", "Name a colour.", "Über café 🤖: 東京?", "Say hello", "Count to 3"]


def _llama(path, **kw):
  # chat_format: the template stored in the file, rendered by jinja2 (as `llama-server --jinja`
  # renders it); left to guess, llama-cpp-python swaps a template equal to its ChatML or
  # Mixtral-Instruct string for a built-in formatter (its ChatML adds an empty system turn)
  # One thread: tiny models gain nothing from two (measured 0.5 s either way for load, 20 logits
  # and 5 chats), and the suite's other worker holds the second core.
  return llama_cpp.Llama(model_path=path, n_ctx=128, n_threads=1, n_threads_batch=1,
                         verbose=False, seed=0,
                         type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32,
                         chat_format="chat_template.default", **kw)


@pytest.fixture(scope="module", params=list(VARIANTS))
def fam(request, tmp_path_factory):
  """A 2-step LoRA run (all linear layers, the experts' too) on a tiny checkpoint of the family,
  exported to GGUF in each of QUANTS; jaxft's logits of SEQ and greedy answers to PROMPTS."""
  from jaxft import inference
  from jaxft.data.tokenize import load_tokenizer, write_quickstart_tokenizer
  from jaxft.export.gguf import write_gguf
  from jaxft.export.output import merged_params
  from jaxft.trainer import train
  kind = request.param
  root = tmp_path_factory.mktemp(kind)
  base, tok_dir = str(root / "base"), str(root / "tok")
  template, added, eos = CHAT[kind]
  tok = load_tokenizer(write_quickstart_tokenizer(str(root / "quickstart-tok")))
  tok.add_special_tokens({"additional_special_tokens": added})
  tok.eos_token, tok.chat_template = eos, template
  tok.save_pretrained(tok_dir)  # (its own directory: model.tokenizer)
  with open(os.path.join(tok_dir, "tokenizer_config.json")) as f:
    tc = json.load(f)
  with open(os.path.join(tok_dir, "tokenizer_config.json"), "w") as f:
    json.dump(dict(tc, legacy=True), f)  # (save_pretrained drops the quickstart's legacy: True)
  shutil.copy(str(root / "quickstart-tok" / "tokenizer.model"), tok_dir)
  make_tiny(kind, base, vocab_size=len(tok), bos_token_id=1, pad_token_id=0,
            eos_token_id=tok.eos_token_id, **VARIANTS[kind])
  config = chat_config(root, base, **{"peft.targets": "all-linear", "peft.lora.rank": 4,
                                      "train.steps": 2, "model.tokenizer": tok_dir})
  workdir = str(root / "work")
  train(config, workdir)
  t = session.restore_trained(workdir)
  enc = session.encoder(t.config, workdir)
  # the CLI's export in process once (f32); the other types from the same merged tree
  files = {"f32": export.export_gguf(workdir, str(root / f"{kind}-f32.gguf"), quant="f32")}
  merged, tok_dir = merged_params(t), session.tokenizer_dir(t.config, workdir)
  for q in QUANTS[1:] + (SIXTEEN[kind],):
    files[q] = str(root / f"{kind}-{q}.gguf")
    write_gguf(files[q], t.model.cfg, merged, quant=q, tok_dir=tok_dir, enc=enc)
  dec = inference.Decoder(t.model.cfg, t.model.method, t.params, t.step)
  prompts = [inference.Prompt(f"p{i}", [{"role": "user", "content": p}])
             for i, p in enumerate(PROMPTS)]
  answers = [a["answer"] for a in inference.answer(dec, enc, prompts, max_new_tokens=8)]
  logits = table = jaxft_logits(t.model.cfg, t.params, SEQ, t.model.method)[0]
  if kind.startswith("gemma"):
    with mock.patch.object(families, "geglu", _geglu_f16_table):
      table = jaxft_logits(t.model.cfg, t.params, SEQ, t.model.method)[0]
  return dict(kind=kind, trained=t, enc=enc, files=files, answers=answers, prompts=prompts,
              logits=logits, logits_gelu_table=table)


def _geglu_f16_table(gate, up):
  """GeGLU as llama.cpp's CPU backend computes it (ggml's GGML_GELU_FP16): the input rounded to
  float16, GELU looked up in a float16 table, exact outside [-10, 10]."""
  import jax
  import jax.numpy as jnp
  a = gate.astype(jnp.float32)
  g = jax.nn.gelu(a.astype(jnp.float16).astype(jnp.float32), approximate=True)
  g = jnp.where(a <= -10, 0.0, jnp.where(a >= 10, a, g.astype(jnp.float16).astype(jnp.float32)))
  return (g * up.astype(jnp.float32)).astype(gate.dtype)


def _chat(llm, prompts, max_tokens=8):
  return [llm.create_chat_completion(messages=p.messages, temperature=0.0, top_k=1,
                                     max_tokens=max_tokens, seed=0)["choices"][0]["message"]
          ["content"].strip() for p in prompts]


@pytest.mark.slow
def test_llama_cpp_f32_logits_and_chat_answers_equal_jaxft(fam):
  """The f32 file in llama.cpp: the family's architecture, logits at every position of SEQ
  within 1e-3 of jaxft's, and greedy answers to the 5 prompts through the file's own tokenizer
  and chat template (create_chat_completion) equal jaxft's.

  Gemma's GeGLU: llama.cpp's CPU backend looks GELU up in a float16 table, which moves these tiny
  models' logits by up to 3e-3 (measured: Gemma 2 1.5e-3, Gemma 3 2.9e-3); against jaxft with
  that same table they agree within 1e-3 (2.0e-4, 2.1e-4): the file itself is exact."""
  llm = _llama(fam["files"]["f32"], logits_all=True)
  assert llm.metadata["general.architecture"] == ARCH[fam["kind"]]
  llm.reset()
  llm.eval([int(t) for t in SEQ[0]])
  got = np.array(llm.scores[: SEQ.shape[1]], np.float32)
  diff = float(np.abs(got - fam["logits"]).max())
  table = float(np.abs(got - fam["logits_gelu_table"]).max())
  print(f"{fam['kind']}: max |llama.cpp - jaxft| logit difference (f32) {diff:.2e}, "
        f"{table:.2e} with llama.cpp's float16 GELU table")
  if fam["kind"] in ("gemma2", "gemma3"):
    assert diff < 5e-3 and table < 1e-3, (diff, table)
  else:
    assert diff < 1e-3, diff
  text = fam["enc"].render(MSGS, False)
  ids = fam["enc"].tok(text)["input_ids"]
  assert llm.tokenize(text.encode(), add_bos=True, special=True) == ids
  llm.reset()
  # (an answer cut inside a character: llama-cpp-python drops the incomplete UTF-8 bytes where
  # jaxft's decoding shows U+FFFD; the tokens are the same)
  assert _chat(llm, fam["prompts"]) == [a.replace("\ufffd", "") for a in fam["answers"]]
  llm.close()


@pytest.mark.slow
def test_llama_cpp_quantized_files_load_and_answer(fam):
  """q8_0, q4_k_m and f16 or bf16: llama.cpp loads them, their logits follow jaxft's
  (correlation over every position and token above 0.99 and 0.9: a tensor in the wrong layout
  would leave next to none), and they answer a chat."""
  for q, least in (("q8_0", 0.99), ("q4_k_m", 0.9), (SIXTEEN[fam["kind"]], 0.999)):
    llm = _llama(fam["files"][q], logits_all=True)
    llm.eval([int(t) for t in SEQ[0]])
    got = np.array(llm.scores[: SEQ.shape[1]], np.float32)
    corr = float(np.corrcoef(got.ravel(), fam["logits"].ravel())[0, 1])
    print(f"{fam['kind']} {q}: correlation with jaxft's logits {corr:.4f}, max difference "
          f"{np.abs(got - fam['logits']).max():.3f}")
    assert np.isfinite(got).all() and corr > least, (q, corr)
    llm.reset()
    res = llm.create_chat_completion(messages=fam["prompts"][0].messages, temperature=0.0,
                                     top_k=1, max_tokens=8, seed=0)
    assert res["choices"][0]["finish_reason"] in ("stop", "length"), (q, res)
    llm.close()


@pytest.mark.slow
def test_read_back_gives_the_same_logits_and_tokenizer(fam, tmp_path):
  """The f32 file as model.path (jaxft.session's reading of it): the same model config (Gemma's
  query scale as llama.cpp's, the weights carrying the rest of it), jaxft's logits of the exported
  (merged) model within 1e-5, and the tokenizer and chat template rebuilt into the workdir give the
  original's text and ids on a chat with non-ASCII text."""
  import dataclasses
  from jaxft.models import gguf
  path, t = fam["files"]["f32"], fam["trained"]
  config = t.config.copy_and_resolve_references()
  config.model.path, config.model.tokenizer = path, ""
  cfg = session.model_config(config)
  # (training-only fields the file does not carry keep their defaults)
  same = lambda c: {k: v for k, v in dataclasses.asdict(c).items() if k not in (
      "query_pre_attn_scalar", "router_aux_coef", "initializer_range")}
  assert same(cfg) == same(t.model.cfg)
  params = gguf.load_params(path, cfg, one_device_shardings(cfg))
  got = jaxft_logits(cfg, params, SEQ)[0]
  diff = float(np.abs(got - fam["logits"]).max())
  print(f"{fam['kind']}: max |read back - original| logit difference (f32) {diff:.2e}")
  assert diff < 1e-5, diff
  enc, back = fam["enc"], session.encoder(config, str(tmp_path))
  text = enc.render(MSGS, False)
  assert back.render(MSGS, False) == text
  assert back.tok(text)["input_ids"] == enc.tok(text)["input_ids"]


@pytest.mark.slow
@pytest.mark.parametrize("fam", ["llama"], indirect=True)
def test_llama3_rope_scaling_goes_out_as_rope_freqs(fam):
  """Llama 3.1's RoPE scaling is written as llama.cpp's converter writes it: rope_freqs.weight,
  F32 (also in the quantized files), the ratio of jaxft's unscaled to scaled inverse frequencies
  (here 1, the smoothed 2.48 and the factor 4), and no rope.scaling.* key. The factors matter at
  SEQ's positions: jaxft's logits without them move far beyond the 1e-3 the llama.cpp test allows."""
  from jaxft.models import gguf, gguf_rope, rope
  t = fam["trained"]
  cfg = t.model.cfg
  assert gguf_rope.is_llama3(cfg)
  want = rope.inverse_frequencies(cfg.replace(rope_scaling=None)) / rope.inverse_frequencies(cfg)
  for q, path in fam["files"].items():
    r = gguf._reader(path)
    (freqs,) = [x for x in r.tensors if x.name == "rope_freqs.weight"]
    assert freqs.tensor_type.name == "F32", q
    np.testing.assert_allclose(np.asarray(freqs.data), want, rtol=1e-6)
    assert not [k for k in r.fields if ".rope.scaling." in k and not k.startswith("jaxft.")], q
  assert np.asarray(freqs.data)[[0, 2]].tolist() == [1.0, 4.0] and 1 < freqs.data[1] < 4
  unscaled = jaxft_logits(cfg.replace(rope_scaling=None), t.params, SEQ, t.model.method)[0]
  moved = float(np.abs(unscaled - fam["logits"]).max())
  print(f"llama: max logit change without the llama3 RoPE factors {moved:.2e}")
  assert moved > 1e-2, moved


def _converter_rope_freqs(theta, dim, s):
  """rope_freqs.weight as llama.cpp's convert_hf_to_gguf.py (LlamaModel, llama-cpp-python 0.3.36)
  computes it: torch float32 frequencies, Python float factors."""
  import math
  import torch
  freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
  old, low, high = s["original_max_position_embeddings"], s["low_freq_factor"], s["high_freq_factor"]
  out = []
  for freq in freqs:
    wavelen = 2 * math.pi / freq
    if wavelen < old / high:
      out.append(1)
    elif wavelen > old / low:
      out.append(s["factor"])
    else:
      smooth = (old / wavelen - low) / (high - low)
      out.append(1 / ((1 - smooth) / s["factor"] + smooth))
  return torch.tensor(out, dtype=torch.float32).numpy()


@pytest.mark.parametrize("preset", ["llama3-1b", "llama3-8b"])
def test_third_party_rope_freqs_read_as_llama_3_1(preset):
  """A file without jaxft's keys (llama.cpp's converter's) is read with Llama 3.1/3.2's published
  low 1, high 4, original 8192 and the largest factor (32 for 3.2, 8 for 3.1): the converter's
  float32 factors give the published config back, jaxft's own factors equal them within 1e-6
  (relative), and a tensor no llama3 config with those values reproduces is refused by name."""
  from jaxft.models import gguf_rope
  from jaxft.models.config import PRESETS
  cfg = PRESETS[preset]
  s = dict(cfg.rope_scaling)
  theirs = _converter_rope_freqs(cfg.rope_theta, cfg.head_dim, s)
  np.testing.assert_allclose(gguf_rope.factors(cfg), theirs, rtol=1e-6)
  got = gguf_rope.scaling_from_file("x.gguf", theirs, cfg.rope_theta, cfg.head_dim, lambda k: None)
  assert got == tuple(sorted(s.items()))
  other = _converter_rope_freqs(cfg.rope_theta, cfg.head_dim, dict(
      s, original_max_position_embeddings=4096))
  with pytest.raises(ConfigError, match=r"x\.gguf: tensor rope_freqs\.weight \(per-frequency "
                     r"RoPE factors\) is not llama3 RoPE scaling .*: entry \d+ is"):
    gguf_rope.scaling_from_file("x.gguf", other, cfg.rope_theta, cfg.head_dim, lambda k: None)


# What a damaged or foreign file of a family lacks or adds is refused naming file and key:
# family -> (metadata key dropped or replaced, its new value or None, message). (A missing or
# unexpected tensor is named the same way for every family: tests/test_gguf.py.)
BAD = {
    # without jaxft's key, Llama 3.1's published original_max_position_embeddings (8192) is tried
    "llama": ("jaxft.rope.scaling.original_max_position_embeddings", None,
              r"tensor rope_freqs\.weight \(per-frequency RoPE factors\) is not llama3 RoPE "
              r"scaling .*'original_max_position_embeddings': 8192.*entry 1 is 2\.48"),
    "gemma2": ("gemma2.rope.freq_base_swa", 500.0, r"gemma2\.rope\.freq_base_swa=500\.0"),
    "gemma3": ("gemma3.rope.scaling.type", "yarn", r"gemma3\.rope\.scaling\.type='yarn'"),
    "mixtral": ("llama.expert_used_count", None, r"llama\.expert_used_count is missing"),
    "qwen3_moe": ("qwen3moe.expert_used_count", None, r"qwen3moe\.expert_used_count is missing"),
}


@pytest.mark.slow
@pytest.mark.parametrize("fam", list(BAD), indirect=True)
def test_read_refuses_a_damaged_file_of_the_family(fam, tmp_path):
  import gguf as gg
  from gguf_tiny import _copy_fields, _finish
  from jaxft.errors import CheckpointError
  from jaxft.models import gguf
  key, value, match = BAD[fam["kind"]]
  r = gguf._reader(fam["files"]["f32"])  # (parsed once, for the read-back test too)
  w = gg.GGUFWriter(str(tmp_path / "bad.gguf"), r.fields["general.architecture"].contents())
  vocab = ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type")
  _copy_fields(r, w, skip=(key, *vocab))  # (the config needs no vocabulary: quicker to copy)
  if isinstance(value, float):
    w.add_float32(key, value)
  elif isinstance(value, str):
    w.add_string(key, value)
  for t in r.tensors:
    w.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
  _finish(w)
  with pytest.raises((CheckpointError, ConfigError), match=r"bad\.gguf: .*" + match):
    gguf.read_config(str(tmp_path / "bad.gguf"))


def test_a_sentencepiece_tokenizer_json_without_its_model_is_named(tmp_path):
  """transformers 5 saves a SentencePiece tokenizer as tokenizer.json alone: the export names the
  missing tokenizer.model and where to put it, before writing anything."""
  from jaxft.data.tokenize import Encoder, load_tokenizer, write_quickstart_tokenizer
  from jaxft.export.gguf_tokenizer import add_tokenizer
  from jaxft.models.config import PRESETS
  tok = load_tokenizer(write_quickstart_tokenizer(str(tmp_path / "q")))
  tok.save_pretrained(str(tmp_path / "saved"))
  (tmp_path / "saved" / "tokenizer.model").unlink(missing_ok=True)
  with pytest.raises(ConfigError, match=r"saved/tokenizer.json: a SentencePiece tokenizer "
                     r"\(Metaspace\) without its tokenizer.model .* Copy the checkpoint's"):
    add_tokenizer(None, str(tmp_path / "saved"), Encoder(tok), PRESETS["tiny"])


def test_refusals_name_what_llama_cpp_cannot_express():
  """Each refusal names the family and the reason, before any file is written."""
  from jaxft.export.gguf import check_model
  from jaxft.models.config import PRESETS
  cases = [
      (PRESETS["gemma2-9b"].replace(tie_embeddings=False), "Gemma2ForCausalLM.*untied"),
      (PRESETS["gemma2-9b"].replace(final_softcap=None), "Gemma2ForCausalLM.*soft-capping"),
      (PRESETS["gemma3-12b"].replace(attn_softcap=20.0), "Gemma3ForCausalLM.*attention soft"),
      (PRESETS["qwen3-30b-a3b"].replace(norm_topk_prob=False), "norm_topk_prob=false"),
      (PRESETS["qwen3-8b"].replace(qkv_bias=True), "Qwen3ForCausalLM with q/k/v biases"),
      (PRESETS["llama3-8b"].replace(rope_scaling=(("factor", 8.0), ("rope_type", "yarn"))),
       r"LlamaForCausalLM with rope_scaling .*yarn.* \(only default, linear, llama3 are"),
      (PRESETS["qwen3-8b"].replace(rope_scaling=PRESETS["llama3-8b"].rope_scaling),
       r"Qwen3ForCausalLM with rope_scaling .*llama3.* \(only default, linear are"),
      (PRESETS["qwen3-8b"].replace(architecture="Qwen2ForCausalLM", qkv_bias=True, qk_norm=False,
                                   head_dim=64), "32 heads of 64 != hidden size 4096"),
      (PRESETS["qwen3-8b"].replace(architecture="PhiForCausalLM"), "PhiForCausalLM has no GGUF"),
  ]
  for cfg, match in cases:
    with pytest.raises(ConfigError, match=match):
      check_model(cfg)
  for name in ("llama3-1b", "llama3-8b", "qwen3-8b", "gemma2-9b", "gemma3-12b", "mixtral-8x7b", "qwen3-30b-a3b"):
    check_model(PRESETS[name])  # the published shapes are expressible


@pytest.mark.slow
def test_byte_level_qwen_tokenizer_round_trips(tmp_path):
  """A byte-level BPE tokenizer with Qwen2/3's split regex and ChatML (trained here, tiny) is
  written as tokenizer.ggml.pre=qwen2: llama.cpp's own tokenizer (vocab_only load) and jaxft's
  rebuild from the file give the original's ids on chats with digits, runs of spaces and
  non-ASCII text."""
  from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
  from transformers import PreTrainedTokenizerFast
  from jaxft.data.tokenize import Encoder
  from jaxft.export.gguf import write_gguf
  from jaxft.models import gguf, llama
  from jaxft.models.config import ModelConfig
  import jax
  t = Tokenizer(models.BPE())
  t.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(gguf.SPLIT_REGEXES["qwen2"]), behavior="isolated", invert=False),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  t.decoder = decoders.ByteLevel()
  corpus = [m["content"] for m in MSGS] + PROMPTS + ["The year 2031 had 12345 days, isn't it?"] * 4
  t.train_from_iterator(corpus, trainers.BpeTrainer(
      vocab_size=420, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  tok = PreTrainedTokenizerFast(tokenizer_object=t, eos_token="<|im_end|>",
                                pad_token="<|endoftext|>")
  tok.chat_template = CHATML
  tok.save_pretrained(str(tmp_path / "tok"))
  cfg = ModelConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=32, num_layers=1,
                    num_heads=2, num_kv_heads=1, head_dim=16, architecture="Qwen2ForCausalLM",
                    qkv_bias=True, tie_embeddings=True, bos_token_id=None, eos_token_id=2)
  path = str(tmp_path / "qwen-tok.gguf")
  write_gguf(path, cfg, llama.init_params(cfg, jax.random.PRNGKey(0)), quant="f32",
             tok_dir=str(tmp_path / "tok"), enc=Encoder(tok))
  rebuilt = gguf.build_tokenizer(path)
  llm = llama_cpp.Llama(model_path=path, vocab_only=True, verbose=False)
  texts = [tok.apply_chat_template(MSGS, tokenize=False), "x=12345678;  y = x*2\n\n\tend  ",
           "  two  spaces: café, naïve, 東京 🤖"]
  for text in texts:
    want = tok(text, add_special_tokens=False)["input_ids"]
    assert rebuilt(text, add_special_tokens=False)["input_ids"] == want, text
    assert llm.tokenize(text.encode(), add_bos=False, special=True) == want, text
  llm.close()
