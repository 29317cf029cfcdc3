"""How other clients tokenize a conversation, written the way each of them does it, for tests that
compare their ids with the ids jaxft trains on."""

import functools
import json
import os
import re
import subprocess

import numpy as np
import pytest

# The side venv tools/install_test_deps.sh makes with transformers 4.x (tokenizers only, no torch).
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TF4_PYTHON = os.environ.get("JAXFT_TF4_PYTHON", os.path.join(ROOT, ".venv-tf4", "bin", "python"))

_TF4_SCRIPT = """
import json, sys
import transformers
from transformers import AutoTokenizer
req = json.load(sys.stdin)
tok = AutoTokenizer.from_pretrained(req["dir"], local_files_only=True)
out = []
for msgs, gen in req["chats"]:
  ids = tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=gen)
  out.append([int(i) for i in (ids["input_ids"] if hasattr(ids, "keys") else ids)])
print(json.dumps({"version": transformers.__version__, "ids": out}))
"""


def sentencepiece_ids(tok_dir: str, text: str) -> list[int]:
  """SentencePiece itself (what transformers 4.x's slow LlamaTokenizer with legacy=True and
  llama.cpp do): the text split at special tokens, each piece between them encoded on its own
  (so each starts a new word), the special tokens as their ids."""
  sp, specials = _sentencepiece(tok_dir)
  ids = []
  for part in re.split("(" + "|".join(map(re.escape, specials)) + ")", text):
    if part in specials:
      ids.append(specials[part])
    elif part:
      ids.extend(sp.encode(part))
  return ids


@functools.lru_cache(maxsize=None)
def _sentencepiece(tok_dir: str):
  import sentencepiece as spm
  sp = spm.SentencePieceProcessor(model_file=os.path.join(tok_dir, "tokenizer.model"))
  return sp, {sp.id_to_piece(i): i for i in range(sp.vocab_size()) if sp.is_control(i)}


@functools.lru_cache(maxsize=None)
def _tokenizers(tok_dir: str):
  from tokenizers import Tokenizer
  return Tokenizer.from_file(os.path.join(tok_dir, "tokenizer.json"))


@functools.lru_cache(maxsize=None)
def _transformers(tok_dir: str):
  from transformers import AutoTokenizer
  return AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)


def tokenizers_ids(tok_dir: str, text: str) -> list[int]:
  """The `tokenizers` library on tokenizer.json directly (transformers 4.x fast tokenizers, TGI,
  vLLM read this file)."""
  return _tokenizers(tok_dir).encode(text, add_special_tokens=False).ids


def transformers_chat_ids(tok_dir: str, messages, add_generation_prompt: bool) -> list[int]:
  """transformers' AutoTokenizer on the directory, the chat template it finds there."""
  out = _transformers(tok_dir).apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
  if isinstance(out, dict) or hasattr(out, "keys"):
    out = out["input_ids"]
  return [int(i) for i in np.asarray(out).reshape(-1)]


def render(tok_dir: str, messages, add_generation_prompt: bool) -> str:
  """The directory's chat template rendered with jinja2 alone, as llama.cpp's --jinja and
  llama-cpp-python's Jinja2ChatFormatter do (bos_token/eos_token from tokenizer_config.json)."""
  import jinja2
  with open(os.path.join(tok_dir, "tokenizer_config.json"), encoding="utf-8") as f:
    c = json.load(f)
  env = jinja2.Environment(loader=jinja2.BaseLoader(), trim_blocks=True, lstrip_blocks=True)
  return env.from_string(c["chat_template"]).render(
      messages=messages, add_generation_prompt=add_generation_prompt, bos_token=c["bos_token"],
      eos_token=c["eos_token"])


def transformers4_chat_ids(tok_dir: str, chats: list) -> tuple[str, list[list[int]]]:
  """transformers 4.x (the side venv at TF4_PYTHON) on the directory: apply_chat_template(
  tokenize=True) of each (messages, add_generation_prompt) in `chats`. Returns (its version, the
  ids). Skips the calling test, saying why, when that venv is absent."""
  if not os.path.isfile(TF4_PYTHON):
    pytest.skip(f"no transformers 4.x venv at {TF4_PYTHON}: tools/install_test_deps.sh makes it "
                "(or set JAXFT_TF4_PYTHON)")
  r = subprocess.run([TF4_PYTHON, "-c", _TF4_SCRIPT], input=json.dumps({"dir": tok_dir, "chats": chats}),
                     capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  out = json.loads(r.stdout.strip().splitlines()[-1])
  assert out["version"].startswith("4."), out["version"]
  return out["version"], out["ids"]
