"""One tokenization everywhere: the ids jaxft trains on (chat, alpaca, completion rows) and prompts
with are the ids SentencePiece, the `tokenizers` library on tokenizer.json, and transformers'
apply_chat_template give for the same conversation; and the template bugs every tracker reports
(double BOS, missing EOS, masked EOS) stop training with a clear error."""

import json
import logging
import os

import pytest

from clients import render, sentencepiece_ids, tokenizers_ids, transformers4_chat_ids, \
    transformers_chat_ids
from jaxft.data import bundled, formats, pipeline, sources
from jaxft.data.tokenize import DEFAULT_CHAT_TEMPLATE, Encoder, load_tokenizer, \
    write_quickstart_tokenizer
from jaxft.errors import DataError


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
  """The quickstart tokenizer as a workdir holds it, with jaxft's default chat template recorded
  in tokenizer_config.json as exports write it."""
  d = write_quickstart_tokenizer(str(tmp_path_factory.mktemp("tok")))
  with open(os.path.join(d, "tokenizer_config.json")) as f:
    c = json.load(f)
  c["chat_template"] = DEFAULT_CHAT_TEMPLATE
  with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
    json.dump(c, f)
  return d


@pytest.fixture(scope="module")
def enc(tok_dir):
  return Encoder(load_tokenizer(tok_dir))


def _conversations():
  """The 90 eval questions (80 capitals, 10 unanswerable; prompts) and multi-turn chats made of the
  training rows."""
  evals = [formats.to_messages(o, r, "chat") for o, r in
           sources.read_rows(bundled.path("capitals_eval.jsonl"))]
  train = [formats.to_messages(o, r, "chat") for o, r in
           sources.read_rows(bundled.path("capitals_train.jsonl"))]
  multi = [train[i] + train[i + 1] + train[i + 2] for i in range(0, 30, 3)]
  multi.append([{"role": "system", "content": "Answer with the city only."}] + train[40] + train[41])
  return evals, multi


def test_workdir_tokenizer_ships_tokenizer_json_with_legacy(tok_dir):
  names = set(os.listdir(tok_dir))
  assert {"tokenizer.model", "tokenizer.json", "tokenizer_config.json"} <= names
  with open(os.path.join(tok_dir, "tokenizer_config.json")) as f:
    assert json.load(f)["legacy"] is True


def test_prompts_and_chats_give_the_same_ids_in_every_client(tok_dir, enc):
  evals, multi = _conversations()
  assert len(evals) == 90
  checked = 0
  for msgs in evals:
    prompt = msgs[:-1]
    ids = enc.prompt_ids(prompt[0]["content"]).tolist()
    text = enc.render(prompt, add_generation_prompt=True)
    assert text == render(tok_dir, prompt, True)  # plain jinja2, as llama.cpp --jinja renders
    assert ids[:2] == [1, 1247]  # <s> "▁User": the word after <s> starts with "▁"
    assert ids == sentencepiece_ids(tok_dir, text) == tokenizers_ids(tok_dir, text)
    assert ids == transformers_chat_ids(tok_dir, prompt, True)
    checked += 1
  for msgs in multi + evals[:5]:
    ex = enc.chat("x:1", msgs)
    text = enc.render(msgs, add_generation_prompt=False)
    assert ex.ids.tolist() == sentencepiece_ids(tok_dir, text) == tokenizers_ids(tok_dir, text)
    assert ex.ids.tolist() == transformers_chat_ids(tok_dir, msgs, False)
    checked += 1
  assert checked == 106  # 90 eval prompts + 16 chats


def test_transformers_4_gives_the_same_ids(tok_dir, enc):
  """transformers 4.x (its own venv, no torch) on the same directory: apply_chat_template(
  tokenize=True) of the 90 eval prompts and the 16 chats gives the ids jaxft trains and prompts
  with (it reads the template from tokenizer_config.json and `legacy` from there too)."""
  evals, multi = _conversations()
  chats = [(m[:-1], True) for m in evals] + [(m, False) for m in multi + evals[:5]]
  _, got = transformers4_chat_ids(tok_dir, chats)
  want = [enc.prompt_ids(m[0]["content"]).tolist() for m, _ in chats[:90]]
  want += [enc.chat("x:1", m).ids.tolist() for m, _ in chats[90:]]
  assert len(got) == 106 and got == want
  assert got[0][:2] == [1, 1247]


def test_completion_and_alpaca_rows_match_sentencepiece(tok_dir, enc):
  import sentencepiece as spm
  sp = spm.SentencePieceProcessor(model_file=os.path.join(tok_dir, "tokenizer.model"))
  ex = enc.completion("Capital of Peru?", " Lima.")
  assert ex.ids.tolist() == [1] + sp.encode("Capital of Peru? Lima.") + [2]
  msgs = formats.to_messages("x:1", {"instruction": "Name the capital", "input": "Chile",
                                     "output": "Santiago."}, "alpaca")
  ex = enc.chat("x:1", msgs)
  text = enc.render(msgs, add_generation_prompt=False)
  assert ex.ids.tolist() == sentencepiece_ids(tok_dir, text)


def _encoder_with(tok_dir, template):
  return Encoder(load_tokenizer(tok_dir), template)


CHAT = [{"role": "user", "content": "Capital of Peru?"}, {"role": "assistant", "content": "Lima."}]


def test_double_bos_stops_with_a_clear_error(tok_dir):
  enc = _encoder_with(tok_dir, "{{ bos_token }}" + DEFAULT_CHAT_TEMPLATE)
  with pytest.raises(DataError, match=r"x:3: .*two BOS tokens"):
    enc.chat("x:3", CHAT)


def test_missing_eos_stops_with_a_clear_error(tok_dir):
  enc = _encoder_with(tok_dir, DEFAULT_CHAT_TEMPLATE.replace("{{ eos_token }}", ""))
  with pytest.raises(DataError, match=r"x:4: an assistant turn ends without the EOS token"):
    enc.chat("x:4", CHAT)


def test_masked_eos_stops_with_a_clear_error(tok_dir):
  # EOS that closes an assistant turn only when the next user turn is rendered: it lies outside
  # the text the assistant turn adds, so the mask leaves it out
  enc = _encoder_with(tok_dir, (
      "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}"
      "{% if not loop.first %}{{ eos_token }}{% endif %}User: {{ m['content'] }}\n\n"
      "{% else %}Assistant: {{ m['content'] }}{% endif %}{% endfor %}"
      "{% if add_generation_prompt %}Assistant:{% endif %}"))
  with pytest.raises(DataError, match=r"x:5: .*masked EOS"):
    enc.chat("x:5", CHAT + CHAT)


def test_train_logs_one_tokenized_example_with_its_mask(tok_dir, enc, tmp_path, caplog):
  data = tmp_path / "d.jsonl"
  data.write_text(json.dumps({"messages": CHAT}) + "\n")
  with caplog.at_level(logging.INFO):
    pipeline.load_examples(str(data), enc, "auto", 64, 32000, show=True)
  line = next(r.getMessage() for r in caplog.records if "first example" in r.getMessage())
  assert "ids [1, 1247, 28747," in line
  assert "« Lima.</s>»" in line and "User: Capital of Peru?" in line


@pytest.mark.parametrize("source", ["quickstart", "gguf"])
def test_tokenizers_jaxft_writes_load_as_autotokenizer_loads_them(source, tok_dir, tmp_path):
  """The tokenizer directories jaxft writes (the quickstart's; a GGUF file's, rebuilt from its
  metadata) load with the class their tokenizer_config.json names, without AutoTokenizer (which
  imports torch): the same class AutoTokenizer picks, the same ids, special tokens, added tokens,
  decoding and chat template."""
  from transformers import AutoTokenizer
  if source == "gguf":
    from gguf_tiny import smollm2_path
    from jaxft.models import gguf
    directory = gguf.write_tokenizer(smollm2_path(), str(tmp_path / "tok"))
  else:
    directory = tok_dir
  own = load_tokenizer(directory, written_by_jaxft=True)
  auto = AutoTokenizer.from_pretrained(directory, local_files_only=True)
  assert type(own) is type(auto)
  for text in ["Hello world", " two  spaces and\nnew lines\n", "Tessaline 2031: 1,290 euros",
               "Über café 🤖 ǅ", "   lead", "end  ", "<s>[INST] x [/INST]</s><|im_start|>"]:
    for special in (True, False):
      ids = own(text, add_special_tokens=special)["input_ids"]
      assert ids == auto(text, add_special_tokens=special)["input_ids"], (text, special)
      assert own.decode(ids) == auto.decode(ids)
  assert (own.special_tokens_map, own.get_added_vocab(), len(own), own.chat_template) == \
      (auto.special_tokens_map, auto.get_added_vocab(), len(auto), auto.chat_template)
  msgs = [{"role": "user", "content": "What is the capital of France?"},
          {"role": "assistant", "content": "Paris."}]
  template = own.chat_template or DEFAULT_CHAT_TEMPLATE
  assert own.apply_chat_template(msgs, chat_template=template) == \
      auto.apply_chat_template(msgs, chat_template=template)


def test_another_tokenizer_class_is_left_to_autotokenizer(tok_dir, tmp_path):
  """A class name jaxft does not write itself (an older transformers' LlamaTokenizerFast) is
  AutoTokenizer's to resolve, as for any model directory."""
  import shutil
  d = str(tmp_path / "tok")
  shutil.copytree(tok_dir, d)
  with open(os.path.join(d, "tokenizer_config.json")) as f:
    c = json.load(f)
  c["tokenizer_class"] = "LlamaTokenizerFast"
  with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
    json.dump(c, f)
  tok = load_tokenizer(d, written_by_jaxft=True)
  assert type(tok).__name__ == "LlamaTokenizer"
  assert tok("Hello world")["input_ids"] == load_tokenizer(tok_dir)("Hello world")["input_ids"]


def test_a_workdir_tokenizer_json_from_before_the_metaspace_fix_is_rewritten(tok_dir, tmp_path):
  """A workdir whose tokenizer.json lacks SentencePiece's every-piece "▁" prefix (written by an
  older jaxft) gets the current one on the next command; a current one is left as it is."""
  import shutil
  d = str(tmp_path / "old")
  shutil.copytree(tok_dir, d)
  tj = os.path.join(d, "tokenizer.json")
  with open(tj, encoding="utf-8") as f:
    current = json.load(f)
  old = dict(current, pre_tokenizer=None)
  with open(tj, "w", encoding="utf-8") as f:
    json.dump(old, f, indent=2, ensure_ascii=False)
  write_quickstart_tokenizer(d)
  with open(tj, encoding="utf-8") as f:
    assert json.load(f)["pre_tokenizer"] == current["pre_tokenizer"]
  stamp = os.path.getmtime(tj)
  write_quickstart_tokenizer(d)
  assert os.path.getmtime(tj) == stamp
