"""Tokenizers and the rendering of rows to token ids with target masks.

Chat rows (and alpaca rows, as a user/assistant pair) go through the tokenizer's chat template, or
`DEFAULT_CHAT_TEMPLATE` when it has none. Target tokens are found by character spans: the text the
template adds for assistant turn i is render(messages[:i+1]) minus render(messages[:i], generation
prompt), and a token is a target when its character span lies in such a text. This works for any
template whose renders of a conversation's prefixes are prefixes of each other.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import threading

import numpy as np

from jaxft import files
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
  if not os.path.isdir(directory):
    os.makedirs(directory, exist_ok=True)
  # Several processes (hosts sharing a workdir) may write at once: per-process temporary names,
  # then atomic renames, so no one ever reads a half-written file.
  if not os.path.isfile(os.path.join(directory, "tokenizer.model")):
    tmp = os.path.join(directory, f"tokenizer.model.tmp{os.getpid()}")
    shutil.copyfile(src, tmp)
    os.replace(tmp, os.path.join(directory, "tokenizer.model"))
  cfg = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>",
         "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False}
  path = os.path.join(directory, "tokenizer_config.json")
  text = json.dumps(cfg, indent=1)
  if _read_text(path) != text:  # never rewritten when current: a workdir may be read-only
    files.write_text(path, text)
  return directory


def _read_text(path: str) -> str | None:
  try:
    with open(path, encoding="utf-8") as f:
      return f.read()
  except OSError:
    return None


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


RENDER_SECONDS = 10  # a template runs in milliseconds; one that takes this long is looping


class _RenderTimeout(Exception):
  pass


@contextlib.contextmanager
def _time_limit(seconds: float):
  """Raises _RenderTimeout in the block after `seconds` (SIGALRM: main thread only; elsewhere
  the block runs unbounded)."""
  if threading.current_thread() is not threading.main_thread():
    yield
    return

  def expire(signum, frame):
    del signum, frame
    raise _RenderTimeout()

  old = signal.signal(signal.SIGALRM, expire)
  signal.setitimer(signal.ITIMER_REAL, seconds)
  try:
    yield
  finally:
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, old)


class Encoder:
  """Turns validated rows into Examples with one tokenizer and one chat template.

  template_source names where the template came from (a file, or data.chat_template) in errors.
  limit_tokens(n) bounds what is tokenized per example: rows are cut to about n tokens' worth of
  characters first (a 100 MB row is not tokenized whole only to be truncated)."""

  def __init__(self, tokenizer, chat_template: str = "", template_source: str = ""):
    self.tok = tokenizer
    self.template = chat_template or tokenizer.chat_template or DEFAULT_CHAT_TEMPLATE
    if template_source:
      self.template_source = template_source
    elif chat_template:
      self.template_source = "data.chat_template"
    elif tokenizer.chat_template:
      self.template_source = "the tokenizer's chat template"
    else:
      self.template_source = "jaxft's default chat template"
    self._max_chars: int | None = None

  def limit_tokens(self, n: int) -> None:
    """Examples need at most n tokens: longer texts are cut before tokenizing, far enough out
    (twice n times the longest vocabulary entry) that their first n tokens do not change."""
    longest = max((len(t) for t in self.tok.get_vocab()), default=1)
    self._max_chars = 2 * (n + 1) * max(longest, 1) + 1024

  @property
  def eos_text(self) -> str:
    return self.tok.eos_token or ""

  @property
  def bos_text(self) -> str:
    return self.tok.bos_token or ""

  def render(self, messages, add_generation_prompt: bool, origin: str = "") -> str:
    """The chat template applied to `messages`. A template that fails (syntax, a sandbox
    violation, raise_exception, a bad return) or runs longer than RENDER_SECONDS raises
    ConfigError naming the template's source (and the row)."""
    msgs = [{"role": m["role"], "content": m["content"]} for m in messages]
    where = f" (rendering {origin})" if origin else ""
    try:
      with _time_limit(RENDER_SECONDS):
        text = self.tok.apply_chat_template(msgs, chat_template=self.template, tokenize=False,
                                            add_generation_prompt=add_generation_prompt)
    except _RenderTimeout:
      raise ConfigError(f"{self.template_source}: the chat template did not finish within "
                        f"{RENDER_SECONDS} s{where}; does it loop?") from None
    except Exception as e:  # pylint: disable=broad-except  (Jinja and transformers raise many)
      msg = " ".join(str(e).split())[:300]
      raise ConfigError(f"{self.template_source}: the chat template failed{where}: "
                        f"{type(e).__name__}: {msg}") from None
    if not isinstance(text, str):
      raise ConfigError(f"{self.template_source}: the chat template returned "
                        f"{type(text).__name__}, not text{where}")
    return text

  def _encode_spans(self, text: str, spans: list[tuple[int, int]]) -> Example:
    if self._max_chars is not None and len(text) > self._max_chars:
      text = text[: self._max_chars]
    enc = self.tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = np.asarray(enc["input_ids"], np.int32)
    mask = np.zeros(len(ids), bool)
    for i, (s, e) in enumerate(enc["offset_mapping"]):
      mask[i] = e > s and any(s >= a and e <= b for a, b in spans)
    return Example(ids, mask)

  def chat(self, origin: str, messages) -> Example:
    text = self.render(messages, add_generation_prompt=False, origin=origin)
    spans = []
    for i, m in enumerate(messages):
      if m["role"] != "assistant":
        continue
      before = self.render(messages[:i], add_generation_prompt=True, origin=origin) if i else ""
      upto = self.render(messages[: i + 1], add_generation_prompt=False, origin=origin)
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
