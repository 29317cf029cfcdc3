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
import tempfile
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


# The quickstart tokenizer's settings. `legacy: True` is SentencePiece's own behaviour: every
# piece of text, also the one after a special token such as `<s>`, starts a new word ("▁" prefix).
# That is what SentencePiece, llama.cpp and transformers 4.x (slow and fast) give for Mistral v1;
# transformers 5 without `legacy` prefixes only the first piece, so `<s>User:` would become
# ids no other client produces.
QUICKSTART_TOKENIZER_CONFIG = {
    "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>",
    "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False, "legacy": True,
    "add_prefix_space": None, "clean_up_tokenization_spaces": False}


def write_quickstart_tokenizer(directory: str) -> str:
  """Writes the Mistral v1 SentencePiece tokenizer that mistral-common ships into `directory`:
  tokenizer.model, the same tokenizer as tokenizer.json (so fast-tokenizer clients need no
  conversion) and a tokenizer_config.json with `legacy` set explicitly."""
  import mistral_common
  src = os.path.join(os.path.dirname(mistral_common.__file__), "data", "tokenizer.model.v1")
  if not os.path.isfile(src):
    raise ConfigError(f"mistral-common does not ship {src}; reinstall mistral-common")
  if not os.path.isdir(directory):
    os.makedirs(directory, exist_ok=True)
  # Nothing is rewritten when it is already current: reading commands (generate, evaluate,
  # export) may run on a read-only workdir. Several processes (hosts sharing a workdir) may
  # write at once: per-process temporary names, then atomic renames.
  model = os.path.join(directory, "tokenizer.model")
  if not os.path.isfile(model):
    files.write_with(model, lambda tmp: shutil.copyfile(src, tmp))
  config_path = os.path.join(directory, "tokenizer_config.json")
  text = json.dumps(QUICKSTART_TOKENIZER_CONFIG, indent=1)
  if _read_text(config_path) != text:
    files.write_text(config_path, text)
  tj = os.path.join(directory, "tokenizer.json")
  if not _quickstart_json_ok(tj):
    cached = _cached_quickstart_json(src, text)
    if cached:
      files.write_with(tj, lambda tmp: shutil.copyfile(cached, tmp))
      return directory
    # transformers converts tokenizer.model (with `legacy` from the config) when no
    # tokenizer.json is beside it: do that in a scratch directory, then ship the result.
    from transformers import AutoTokenizer
    with tempfile.TemporaryDirectory(dir=directory) as scratch:
      shutil.copyfile(model, os.path.join(scratch, "tokenizer.model"))
      shutil.copyfile(config_path, os.path.join(scratch, "tokenizer_config.json"))
      tok = AutoTokenizer.from_pretrained(scratch, local_files_only=True)
      files.write_with(tj, tok.backend_tokenizer.save)
    _cache_quickstart_json(src, text, tj)
  return directory


def cache_dir() -> str:
  """Where jaxft keeps what it can rebuild (the quickstart tokenizer.json): $JAXFT_CACHE_DIR,
  else $XDG_CACHE_HOME/jaxft, else ~/.cache/jaxft."""
  if os.environ.get("JAXFT_CACHE_DIR"):
    return os.environ["JAXFT_CACHE_DIR"]
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "jaxft")


def _quickstart_json_key(src: str, config_text: str) -> str:
  """The cache name of the tokenizer.json converted from `src` with `config_text`: it changes with
  either file and with the transformers and tokenizers versions that convert."""
  import hashlib
  import importlib.metadata
  h = hashlib.sha256()
  with open(src, "rb") as f:
    h.update(f.read())
  h.update(config_text.encode())
  for package in ("transformers", "tokenizers"):
    h.update(importlib.metadata.version(package).encode())
  return os.path.join(cache_dir(), f"quickstart-tokenizer-{h.hexdigest()[:20]}.json")


def _cached_quickstart_json(src: str, config_text: str) -> str | None:
  """The cached conversion (converting takes ~2 s: every new workdir would pay it), if usable."""
  try:
    path = _quickstart_json_key(src, config_text)
  except OSError:
    return None
  return path if _quickstart_json_ok(path) else None


def _cache_quickstart_json(src: str, config_text: str, converted: str) -> None:
  """Keeps a copy of `converted` in the cache; a cache that cannot be written is skipped."""
  try:
    path = _quickstart_json_key(src, config_text)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    files.write_with(path, lambda tmp: shutil.copyfile(converted, tmp))
  except OSError:
    pass


def _read_text(path: str) -> str | None:
  try:
    with open(path, encoding="utf-8") as f:
      return f.read()
  except OSError:
    return None


def _quickstart_json_ok(path: str) -> bool:
  """Whether PATH is a tokenizer.json with SentencePiece's every-piece "▁" prefix (workdirs
  written before it was shipped have none)."""
  if not os.path.isfile(path):
    return False
  try:
    with open(path, encoding="utf-8") as f:
      text = f.read()
    # The `tokenizers` library writes the file indented, its top-level keys two spaces in:
    # decoding that one value spares parsing the whole vocabulary (3.5 MB) on every command.
    key = '\n  "pre_tokenizer": '
    at = text.find(key)
    if at >= 0:
      pre = json.JSONDecoder().raw_decode(text, at + len(key))[0]
    else:
      pre = json.loads(text).get("pre_tokenizer")
  except (OSError, ValueError, AttributeError):
    return False
  pre = pre if isinstance(pre, dict) else {}
  return pre.get("type") == "Metaspace" and pre.get("prepend_scheme") == "always"


# The classes of the tokenizer directories jaxft writes itself (the quickstart's, a GGUF file's):
# AutoTokenizer picks these same classes for them (tests/test_tokenization_clients.py).
OWN_CLASSES = ("LlamaTokenizer", "TokenizersBackend", "PreTrainedTokenizerFast")


def load_tokenizer(directory: str, written_by_jaxft: bool = False):
  """An HF tokenizer from a local directory (no remote code); raises ConfigError when unusable.

  A directory jaxft wrote (`written_by_jaxft`: the quickstart's, a GGUF file's) is loaded with the
  class its tokenizer_config.json names, the one AutoTokenizer picks for it, without going
  through AutoTokenizer: its model-config machinery imports torch where torch is installed,
  1.5-3 s of every command's start-up."""
  try:
    own = _own_class(directory) if written_by_jaxft else None
    if own is not None:
      tok = own.from_pretrained(directory, local_files_only=True)
    else:
      from transformers import AutoTokenizer
      tok = AutoTokenizer.from_pretrained(directory, trust_remote_code=False,
                                          local_files_only=True)
  except Exception as e:
    raise ConfigError(f"{directory}: cannot load a tokenizer ({type(e).__name__}: {e})") from None
  if not tok("a b c", add_special_tokens=False)["input_ids"]:
    raise ConfigError(f"{directory}: the tokenizer encodes text to no ids (missing vocabulary?)")
  if not tok.is_fast:
    raise ConfigError(f"{directory}: a fast (tokenizers) tokenizer is needed for target masks")
  return tok


def _own_class(directory: str):
  """The transformers class the tokenizer_config.json of a directory jaxft wrote names, when it
  is one of OWN_CLASSES (else None: AutoTokenizer decides)."""
  try:
    with open(os.path.join(directory, "tokenizer_config.json"), encoding="utf-8") as f:
      name = json.load(f).get("tokenizer_class")
  except (OSError, ValueError, AttributeError):
    return None
  if name not in OWN_CLASSES:
    return None
  import transformers
  return getattr(transformers, name)


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
  stop_ids: the ids that end a generation (the model's EOS ids) besides the tokenizer's EOS; an
  assistant turn must end with one of them, as a target.
  limit_tokens(n) bounds what is tokenized per example: rows are cut to about n tokens' worth of
  characters first (a 100 MB row is not tokenized whole only to be truncated)."""

  def __init__(self, tokenizer, chat_template: str = "", template_source: str = "", stop_ids=()):
    self.tok = tokenizer
    self.stop_ids = frozenset(int(i) for i in stop_ids) | (
        {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())
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

  def _encode_spans(self, text: str, spans: list[tuple[int, int]], origin: str = "",
                    last_targets: list | None = None) -> Example:
    """Tokens of text, targets where a token lies in one of spans; appends the index of each
    span's last target token (or -1, also for a span the length cap cut) to last_targets when
    given."""
    if self._max_chars is not None and len(text) > self._max_chars:
      text = text[: self._max_chars]
    enc = self.tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = np.asarray(enc["input_ids"], np.int32)
    mask = np.zeros(len(ids), bool)
    last = [-1] * len(spans)
    for i, (s, e) in enumerate(enc["offset_mapping"]):
      for k, (a, b) in enumerate(spans):
        if e > s and s >= a and e <= b:
          mask[i] = True
          last[k] = i
    if last_targets is not None:
      last_targets.extend(-1 if b > len(text) else i for i, (_, b) in zip(last, spans))
    bos = self.tok.bos_token_id
    if bos is not None and len(ids) > 1 and ids[0] == bos and ids[1] == bos:
      raise DataError(f"{origin or 'a row'}: the rendered text starts with two BOS tokens "
                      f"({self.bos_text!r}); the chat template (data.chat_template) or the text "
                      "already has one: keep only one")
    return Example(ids, mask)

  def _check_turn_ends(self, origin: str, ex: Example, last_targets: list[int]) -> None:
    """Each trained assistant turn must end with a stop id that is itself a target, or the
    model never learns to stop (a missing EOS, or one the mask leaves out)."""
    if not self.stop_ids:
      return
    for end in last_targets:
      if end < 0 or int(ex.ids[end]) in self.stop_ids:
        continue
      eos = self.eos_text or f"id {min(self.stop_ids)}"
      if end + 1 < len(ex.ids) and int(ex.ids[end + 1]) in self.stop_ids:
        raise DataError(f"{origin}: the EOS token ({eos!r}) after an assistant turn is outside "
                        "the loss mask (masked EOS): the model would never learn to stop. The "
                        "chat template must put it right after the assistant's content "
                        "(data.chat_template)")
      raise DataError(f"{origin}: an assistant turn ends without the EOS token ({eos!r}): the "
                      "model would never learn to stop. Use a chat template that appends "
                      "{{ eos_token }} to assistant turns (data.chat_template)")

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
    last: list[int] = []
    ex = self._encode_spans(text, spans, origin, last)
    self._check_turn_ends(origin, ex, last)
    return ex

  def segments(self, ex: Example) -> list[tuple[str, bool]]:
    """The example's decoded text (special tokens included) in runs of (text, is_target)."""
    parts, i, done = [], 0, ""
    while i < len(ex.ids):
      j = i
      while j < len(ex.ids) and ex.mask[j] == ex.mask[i]:
        j += 1
      # decode whole prefixes: a run decoded alone would lose its leading space
      upto = self.tok.decode(ex.ids[:j].tolist(), skip_special_tokens=False)
      piece = upto[len(done):] if upto.startswith(done) else self.tok.decode(ex.ids[i:j].tolist())
      parts.append((piece, bool(ex.mask[i])))
      i, done = j, upto
    return parts

  def describe(self, ex: Example) -> str:
    """The example as a user would check it: its token count, first ids, and its text with the
    target (loss) tokens between « and »."""
    text = "".join(f"«{p}»" if target else p for p, target in self.segments(ex))
    head = ", ".join(str(int(t)) for t in ex.ids[:12])
    return (f"{len(ex.ids)} tokens, {int(ex.mask.sum())} targets; ids [{head}"
            f"{', ...' if len(ex.ids) > 12 else ''}]; text (targets in «»): {text!r}")

  def text_of(self, r, origin: str = "") -> str | None:
    """The text a parsed row (formats.Row) is tokenized from: the chat template applied to its
    messages, or the completion or text row with BOS and EOS; None for a tokens row."""
    if r.messages is not None:
      return self.render(r.messages, add_generation_prompt=False, origin=origin)
    if r.kind == "completion":
      return self._completion_text(r.prompt, r.completion)[1]
    if r.kind == "text":
      return self._full_text(r.text)
    return None

  def _completion_text(self, prompt: str, completion: str) -> tuple[str, str]:
    head = self.bos_text + prompt
    return head, head + completion + self.eos_text

  def _full_text(self, text: str) -> str:
    return self.bos_text + text + self.eos_text

  def completion(self, prompt: str, completion: str) -> Example:
    head, text = self._completion_text(prompt, completion)
    return self._encode_spans(text, [(len(head), len(text))], "a completion row")

  def text(self, text: str) -> Example:
    full = self._full_text(text)
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
