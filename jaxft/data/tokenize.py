"""Tokenizers and the rendering of rows to token ids with target masks.

Chat rows (and alpaca rows, as a user/assistant pair) go through the tokenizer's chat template, or
`DEFAULT_CHAT_TEMPLATE` when it has none. Target tokens are found by character spans: the text the
template adds for assistant turn i is render(messages[:i+1]) minus render(messages[:i], generation
prompt), and a token is a target when its character span lies in such a text. This works for any
template whose renders of a conversation's prefixes are prefixes of each other.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np

from jaxft.data.formats import Example
from jaxft.errors import ConfigError, DataError

# Used when a tokenizer has no chat template. Plain text markers, so any vocabulary can encode it:
#   <bos>System: ...\n\nUser: ...\n\nAssistant: ...<eos>\n\n ... and "Assistant:" as the generation prompt.
DEFAULT_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}Assistant: {{ m['content'] }}{{ eos_token }}\n\n"
    "{% elif m['role'] == 'user' %}User: {{ m['content'] }}\n\n"
    "{% else %}{{ m['role'] | capitalize }}: {{ m['content'] }}\n\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}")


def write_quickstart_tokenizer(directory: str) -> str:
  """Writes the Mistral v1 SentencePiece tokenizer that mistral-common ships into `directory`."""
  import mistral_common
  src = os.path.join(os.path.dirname(mistral_common.__file__), "data", "tokenizer.model.v1")
  if not os.path.isfile(src):
    raise ConfigError(f"mistral-common does not ship {src}; reinstall mistral-common")
  os.makedirs(directory, exist_ok=True)
  # Several processes (hosts sharing a workdir) may write at once: per-process temporary names,
  # then atomic renames, so no one ever reads a half-written file.
  if not os.path.isfile(os.path.join(directory, "tokenizer.model")):
    tmp = os.path.join(directory, f"tokenizer.model.tmp{os.getpid()}")
    shutil.copyfile(src, tmp)
    os.replace(tmp, os.path.join(directory, "tokenizer.model"))
  cfg = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>",
         "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False}
  tmp = os.path.join(directory, f"tokenizer_config.json.tmp{os.getpid()}")
  with open(tmp, "w") as f:
    json.dump(cfg, f, indent=1)
  os.replace(tmp, os.path.join(directory, "tokenizer_config.json"))
  return directory


def load_tokenizer(directory: str):
  """An HF tokenizer from a local directory (no remote code); raises ConfigError when unusable."""
  from transformers import AutoTokenizer
  try:
    tok = AutoTokenizer.from_pretrained(directory, trust_remote_code=False, local_files_only=True)
  except Exception as e:
    raise ConfigError(f"{directory}: cannot load a tokenizer ({type(e).__name__}: {e})") from None
  if not tok("a b c", add_special_tokens=False)["input_ids"]:
    raise ConfigError(f"{directory}: the tokenizer encodes text to no ids (missing vocabulary?)")
  if not tok.is_fast:
    raise ConfigError(f"{directory}: a fast (tokenizers) tokenizer is needed for target masks")
  return tok


class Encoder:
  """Turns validated rows into Examples with one tokenizer and one chat template."""

  def __init__(self, tokenizer, chat_template: str = ""):
    self.tok = tokenizer
    self.template = chat_template or tokenizer.chat_template or DEFAULT_CHAT_TEMPLATE

  @property
  def eos_text(self) -> str:
    return self.tok.eos_token or ""

  @property
  def bos_text(self) -> str:
    return self.tok.bos_token or ""

  def render(self, messages, add_generation_prompt: bool) -> str:
    msgs = [{"role": m["role"], "content": m["content"]} for m in messages]
    return self.tok.apply_chat_template(msgs, chat_template=self.template, tokenize=False,
                                        add_generation_prompt=add_generation_prompt)

  def _encode_spans(self, text: str, spans: list[tuple[int, int]]) -> Example:
    enc = self.tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = np.asarray(enc["input_ids"], np.int32)
    mask = np.zeros(len(ids), bool)
    for i, (s, e) in enumerate(enc["offset_mapping"]):
      mask[i] = e > s and any(s >= a and e <= b for a, b in spans)
    return Example(ids, mask)

  def chat(self, origin: str, messages) -> Example:
    text = self.render(messages, add_generation_prompt=False)
    spans = []
    for i, m in enumerate(messages):
      if m["role"] != "assistant":
        continue
      before = self.render(messages[:i], add_generation_prompt=True) if i else ""
      upto = self.render(messages[: i + 1], add_generation_prompt=False)
      if not upto.startswith(before) or not text.startswith(upto):
        raise DataError(f"{origin}: the chat template does not render conversations "
                        "incrementally; cannot locate assistant turns for the loss mask")
      if m.get("weight", 1):
        end = len(upto.rstrip())  # trailing separators are not targets
        spans.append((len(before), end))
    return self._encode_spans(text, spans)

  def completion(self, prompt: str, completion: str) -> Example:
    head = self.bos_text + prompt
    text = head + completion + self.eos_text
    return self._encode_spans(text, [(len(head), len(text))])

  def text(self, text: str) -> Example:
    full = self.bos_text + text + self.eos_text
    ex = self._encode_spans(full, [(0, len(full))])
    ex.mask[:] = True
    return ex

  def prompt_ids(self, prompt: str, chat: bool = True) -> np.ndarray:
    """Ids of a generation prompt: the chat template with a generation prompt, or raw text."""
    if chat:
      text = self.render([{"role": "user", "content": prompt}], add_generation_prompt=True)
    else:
      text = self.bos_text + prompt
    return np.asarray(self.tok(text, add_special_tokens=False)["input_ids"], np.int32)
