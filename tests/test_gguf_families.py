"""GGUF out and in for every family jaxft trains beyond Llama/Mistral: Qwen2, Qwen3, Gemma 2,
Gemma 3 (text), Mixtral and Qwen3-MoE. For a tiny random checkpoint of each (odd head counts,
GQA and multi-query, tied and untied heads, Gemma's sliding/global mix, top-1 and top-2 experts)
a 2-step LoRA run on all linear layers is exported (in process) as f32, q8_0 and q4_k_m, then:
llama.cpp (llama-cpp-python, f32 KV cache) gives jaxft's logits within 1e-3 and jaxft's greedy
answers through the file's own tokenizer and chat template; the quantized files load and answer;
the file read back as model.path gives jaxft's logits within 1e-5 and the tokenizer's ids. What
llama.cpp cannot express is refused by name. One export and one llama.cpp load per file."""

import os
import shutil
from unittest import mock

import numpy as np
import pytest

from hf_tiny import TEMPLATE, chat_base, chat_config, jaxft_logits, one_device_shardings
from jaxft import export, session
from jaxft.errors import ConfigError
from jaxft.models import families

pytest.importorskip("gguf")
llama_cpp = pytest.importorskip("llama_cpp")

# family -> make_tiny overrides (beside chat_base's 32000-token vocabulary)
VARIANTS = {
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
ARCH = {"qwen2": "qwen2", "qwen3": "qwen3", "gemma2": "gemma2", "gemma3": "gemma3",
        "mixtral": "llama", "qwen3_moe": "qwen3moe"}
QUANTS = ("f32", "q8_0", "q4_k_m")
# and one 16-bit type per family, alternating (test_deploy.py loads both for Llama)
SIXTEEN = {"qwen2": "f16", "qwen3": "bf16", "gemma2": "f16", "gemma3": "bf16", "mixtral": "f16",
           "qwen3_moe": "bf16"}
SEQ = np.random.RandomState(3).randint(3, 32000, (1, 20))  # longer than Gemma's window of 4
# (no runs of spaces: the quickstart's tokenizer.json splits those unlike SentencePiece, whose ids
# the GGUF and llama.cpp keep; tests/test_gguf.py checks the SentencePiece rebuild on them)
MSGS = [{"role": "user", "content": "Dorian paid 1,290 € in 2031 — naïve?\nÜber café 🤖 東京"},
        {"role": "assistant", "content": "Hold the leaf button."}]
PROMPTS = ["What is 2 plus 2?", "Name a colour.", "Über café 🤖: 東京?", "Say hello", "Count to 3"]


def _llama(path, **kw):
  return llama_cpp.Llama(model_path=path, n_ctx=128, n_threads=2, verbose=False, seed=0,
                         type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32, **kw)


@pytest.fixture(scope="module", params=list(VARIANTS))
def fam(request, tmp_path_factory):
  """A 2-step LoRA run (all linear layers, the experts' too) on a tiny checkpoint of the family,
  exported to GGUF in each of QUANTS; jaxft's logits of SEQ and greedy answers to PROMPTS."""
  from jaxft import inference
  from jaxft.data.tokenize import load_tokenizer
  from jaxft.export.gguf import write_gguf
  from jaxft.export.output import merged_params
  from jaxft.trainer import train
  kind = request.param
  root = tmp_path_factory.mktemp(kind)
  base = str(root / "base")
  chat_base(base, kind, bos_token_id=1, eos_token_id=2, pad_token_id=0, **VARIANTS[kind])
  # The tokenizer in a directory of its own (model.tokenizer), with the SentencePiece model
  # beside tokenizer.json as Gemma's and Mistral's checkpoints ship it: next to a qwen2
  # config.json transformers would load it with Qwen2's tokenizer class and pre-tokenizer.
  tok_dir = str(root / "tok")
  tok = load_tokenizer(base + "-tok")
  tok.chat_template = TEMPLATE
  tok.save_pretrained(tok_dir)
  shutil.copy(os.path.join(base + "-tok", "tokenizer.model"), tok_dir)
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
  models' logits by up to 2.4e-3 (measured: Gemma 2 1.5e-3, Gemma 3 2.4e-3); against jaxft with
  that same table they agree within 1e-3 (Gemma 2 5.6e-5), so the file itself is exact."""
  import gguf
  r = gguf.GGUFReader(fam["files"]["f32"])
  assert r.fields["general.architecture"].contents() == ARCH[fam["kind"]]
  llm = _llama(fam["files"]["f32"], logits_all=True)
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
  assert llm.tokenize(text.encode(), add_bos=True, special=True) == fam["enc"].tok(text)["input_ids"]
  llm.reset()
  assert _chat(llm, fam["prompts"]) == fam["answers"]
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
    assert _chat(llm, fam["prompts"][:1])[0], q
    llm.close()


@pytest.mark.slow
def test_read_back_gives_the_same_logits_and_tokenizer(fam):
  """The f32 file as model.path: jaxft's logits of the exported (merged) model within 1e-5, the
  tokenizer rebuilt from the metadata gives the original's ids on a chat with non-ASCII text, and
  the chat template is the one training used."""
  from jaxft.models import gguf
  path = fam["files"]["f32"]
  cfg = gguf.read_config(path)
  t = fam["trained"]
  want = t.model.cfg
  assert (cfg.architecture, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
          cfg.tie_embeddings, cfg.num_experts, cfg.layer_types) == (
      want.architecture, want.num_layers, want.num_heads, want.num_kv_heads, want.head_dim,
      want.tie_embeddings, want.num_experts, want.layer_types)
  params = gguf.load_params(path, cfg, one_device_shardings(cfg))
  got = jaxft_logits(cfg, params, SEQ)[0]
  diff = float(np.abs(got - fam["logits"]).max())
  print(f"{fam['kind']}: max |read back - original| logit difference (f32) {diff:.2e}")
  assert diff < 1e-5, diff
  tok, enc = gguf.build_tokenizer(path), fam["enc"]
  text = enc.render(MSGS, False)
  assert tok.apply_chat_template(MSGS, tokenize=False) == text
  assert tok(text)["input_ids"] == enc.tok(text)["input_ids"]


# What a damaged or foreign file of each family lacks or adds is refused naming file and key:
# family -> (metadata key dropped or replaced, its new value or None, tensor dropped, message)
BAD = {
    "qwen2": (None, None, "blk.1.attn_q.bias", r"tensor for model\.layers\.1\.self_attn\.q_proj\.bias is missing"),
    "qwen3": (None, None, "blk.0.attn_k_norm.weight", r"self_attn\.k_norm\.weight is missing"),
    "gemma2": ("gemma2.rope.freq_base_swa", 500.0, None, r"gemma2\.rope\.freq_base_swa=500\.0"),
    "gemma3": ("gemma3.rope.scaling.type", "yarn", None, r"gemma3\.rope\.scaling\.type='yarn'"),
    "mixtral": ("llama.expert_used_count", None, None, r"llama\.expert_used_count is missing"),
    "qwen3_moe": ("qwen3moe.expert_used_count", None, None, r"qwen3moe\.expert_used_count is missing"),
}


@pytest.mark.slow
def test_read_refuses_a_damaged_file_of_the_family(fam, tmp_path):
  import gguf as gg
  from gguf_tiny import _copy_fields, _finish
  from jaxft.errors import CheckpointError
  from jaxft.models import gguf
  key, value, tensor, match = BAD[fam["kind"]]
  r = gg.GGUFReader(fam["files"]["f32"])
  w = gg.GGUFWriter(str(tmp_path / "bad.gguf"), r.fields["general.architecture"].contents())
  _copy_fields(r, w, skip=(key,))
  if isinstance(value, float):
    w.add_float32(key, value)
  elif isinstance(value, str):
    w.add_string(key, value)
  for t in r.tensors:
    if t.name != tensor:
      w.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
  _finish(w)
  bad = str(tmp_path / "bad.gguf")
  with pytest.raises((CheckpointError, ConfigError), match=r"bad\.gguf: .*" + match):
    gguf.load_params(bad, gguf.read_config(bad), one_device_shardings(gguf.read_config(bad)))
