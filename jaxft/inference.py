"""Prompts and answers: reading prompt files, the chat template, the tuned or base decoder of a
workdir, and text answers from jaxft/decode.py. Shared by jaxft.generate and jaxft.evaluate."""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

from jaxft import checkpoint, decode, peft, session
from jaxft.data import formats
from jaxft.errors import DataError


@dataclasses.dataclass
class Prompt:
  """One prompt: `messages` (chat) or `text` (raw), and where it came from for error messages."""
  origin: str
  messages: list | None = None
  text: str = ""

  @property
  def display(self) -> str:
    if self.messages is None:
      return self.text
    return "\n".join(f"{m['role']}: {m['content']}" for m in self.messages)


def _prompt_from_row(origin: str, row, raw: bool) -> Prompt:
  if isinstance(row, str):
    return Prompt(origin, text=row) if raw else Prompt(origin, [{"role": "user", "content": row}])
  if not isinstance(row, dict):
    raise DataError(f"{origin}: expected a JSON string or object, got {type(row).__name__}")
  if "messages" in row:
    msgs = formats.field(origin, row, "messages", list)
    if not msgs:
      raise DataError(f"{origin}: 'messages' is empty")
    for i, m in enumerate(msgs):
      if not (isinstance(m, dict) and m.get("role") in formats.ROLES
              and isinstance(m.get("content"), str)):
        raise DataError(f"{origin}: messages[{i}] must be an object with a role (one of "
                        f"{', '.join(formats.ROLES)}) and a string content")
    return Prompt(origin, [{"role": m["role"], "content": m["content"]} for m in msgs])
  if "instruction" in row:
    msgs = formats.to_messages(origin, dict(row, output=""), "alpaca")[:1]
    return Prompt(origin, msgs)
  if "prompt" in row:
    return _prompt_from_row(origin, formats.field(origin, row, "prompt"), raw)
  raise DataError(f"{origin}: expected a string or an object with 'prompt', 'messages' or "
                  f"'instruction'; got keys {sorted(row)}")


def read_prompts(path: str, raw: bool = False) -> list[Prompt]:
  """Prompts of a file. A .jsonl/.json file holds one row per line: a JSON string, {"prompt": ...},
  {"messages": [...]} (the conversation so far) or {"instruction", "input"?} (alpaca); any other
  file holds one prompt per non-blank line. Strings are user turns of the chat template unless
  `raw`. Raises DataError for a missing, non-UTF-8 or empty file, or a bad row (file:line)."""
  if not os.path.isfile(path):
    raise DataError(f"{path}: no such prompts file")
  out = []
  try:
    with open(path, encoding="utf-8", errors="strict") as f:
      lines = f.read().splitlines()
  except UnicodeDecodeError as e:
    raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
  jsonl = path.endswith((".jsonl", ".json"))
  for lineno, line in enumerate(lines, 1):
    if not line.strip():
      continue
    origin = f"{path}:{lineno}"
    if jsonl:
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise DataError(f"{origin}: malformed JSON ({e.msg}, column {e.colno})") from None
      out.append(_prompt_from_row(origin, row, raw))
    else:
      out.append(_prompt_from_row(origin, line, raw))
  if not out:
    raise DataError(f"{path}: the prompts file is empty (expected one prompt per line or JSONL)")
  return out


def prompt_ids(encoder, prompt: Prompt) -> np.ndarray:
  """Token ids of a prompt: the chat template with the generation prompt, or BOS + raw text."""
  if prompt.messages is None:
    return encoder.prompt_ids(prompt.text, chat=False)
  if len(prompt.messages) == 1 and prompt.messages[0]["role"] == "user":
    return encoder.prompt_ids(prompt.messages[0]["content"], chat=True)
  text = encoder.render(prompt.messages, add_generation_prompt=True)
  return np.asarray(encoder.tok(text, add_special_tokens=False)["input_ids"], np.int32)


def eos_ids(cfg, encoder) -> tuple[int, ...]:
  """End tokens: the model config's eos_token_id(s) and the tokenizer's."""
  ids = set()
  if cfg.eos_token_id is not None:
    ids |= set(cfg.eos_token_id) if isinstance(cfg.eos_token_id, (tuple, list)) else {cfg.eos_token_id}
  if encoder.tok.eos_token_id is not None:
    ids.add(encoder.tok.eos_token_id)
  return tuple(sorted(int(i) for i in ids))


@dataclasses.dataclass
class Decoder:
  """What decoding needs: the model config, the method (static) and the decoder's param tree."""
  cfg: object
  adapter: object
  params: dict
  step: int | None  # the checkpoint step; None for the base model


def require_checkpoint(workdir: str) -> int:
  """The latest checkpoint step of WORKDIR; CheckpointError (before any weights load) when none."""
  return checkpoint.read_meta(workdir)[0]


def load_decoder(config, workdir: str, base: bool) -> Decoder:
  """The tuned model of WORKDIR's latest checkpoint, or (base=True) the base model alone: the
  frozen base as `config` builds it (model.path, or the preset and seed), with no method.
  Raises CheckpointError when the workdir has no checkpoint (base=False)."""
  if base:
    model = session.load_model(config)
    return Decoder(model.cfg, peft.Method(), model.base, None)
  trained = session.restore_trained(workdir, config)
  return Decoder(trained.model.cfg, trained.model.method, trained.params, trained.step)


def answer(decoder: Decoder, encoder, prompts: list[Prompt], *, max_new_tokens: int,
           sampling: decode.Sampling = decode.Sampling(), seed: int = 0, stop=(),
           batch_size: int = 16) -> list[dict]:
  """Decodes `prompts`; returns one dict per prompt: origin, prompt, answer, tokens, finish,
  logprobs (of the answer's tokens under the model, then of the end token when there is one) and
  confidence (`confidence`: what jaxft/eval/ calibrates)."""
  ids = [prompt_ids(encoder, p) for p in prompts]
  detok = lambda t: encoder.tok.decode(list(map(int, t)), skip_special_tokens=True)
  gens = decode.generate(decoder.cfg, decoder.adapter, decoder.params, ids,
                         max_new_tokens=max_new_tokens, sampling=sampling, seed=seed,
                         eos_ids=eos_ids(decoder.cfg, encoder), batch_size=batch_size,
                         stop=tuple(stop), detokenize=detok, names=[p.origin for p in prompts])
  out = []
  for p, g in zip(prompts, gens):
    text = decode.cut_at_stop(detok(g.tokens), stop) if stop else detok(g.tokens)
    end = [] if g.end_logprob is None else [g.end_logprob]
    out.append({"origin": p.origin, "prompt": p.display, "answer": text.strip(),
                "tokens": int(len(g.tokens)), "finish": g.finish,
                "logprobs": [float(x) for x in g.logprobs] + end,
                "confidence": confidence(g.logprobs, g.end_logprob)})
  return out


def confidence(logprobs, end_logprob: float | None = None) -> float:
  """The mean probability of an answer's tokens (and of its end token when it has one): the
  confidence that evaluation's calibration (jaxft/eval/metrics.py) measures. Raises ValueError
  for an answer with neither."""
  lp = list(logprobs) + ([end_logprob] if end_logprob is not None else [])
  if not lp:
    raise ValueError("an answer with no tokens and no end token has no confidence")
  return float(np.mean(np.exp(np.asarray(lp, np.float64))))


def check_lengths(config, encoder, prompts: list[Prompt]) -> None:
  """Fails before any weights load when a prompt is empty or does not fit the context."""
  cfg = session.model_config(config)
  decode.check_prompts(cfg, peft.from_config(config.peft, cfg),
                       [prompt_ids(encoder, p) for p in prompts], [p.origin for p in prompts])
