"""The OpenAI wire format over the engine: /v1/models, /v1/completions, /v1/chat/completions
(streaming as server-sent events ending with `data: [DONE]`), /health.

Errors use OpenAI's shape, {"error": {"message", "type", "param", "code"}}: 400 for a bad request
(malformed JSON, an unknown model, a bad parameter or one out of range, a prompt that does not fit
the context), 413 for a body over the size limit, 429 when the queue is full, 500 for a request
the engine failed on (that request alone). A bad request never reaches an engine, so it cannot
harm the server's state; a client that disconnects cancels its request.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
import uuid
from typing import Any

from jaxft.serving.engine import Engine, Request

MAX_N = 8
MAX_SEED = 2**63 - 1  # jax.random.key takes an int64
MAX_TOP_K = 2**31 - 1  # the engine holds top_k as int32; past the vocabulary it is "off" anyway

# OpenAI fields this server does not implement, accepted only at the value that changes nothing
# (clients send them by default) so that a request asking for them is refused, not answered
# without them: {field: the values accepted}.
_UNSUPPORTED = {
    "logprobs": "false, 0 or null",
    "top_logprobs": "0 or null",
    "presence_penalty": "0 or null",
    "frequency_penalty": "0 or null",
    "best_of": "1, n or null",
    "echo": "false or null",
    "logit_bias": "{} or null",
}


class BadRequest(Exception):
  def __init__(self, message: str, param: str | None = None, status: int = 400,
               kind: str = "invalid_request_error"):
    super().__init__(message)
    self.param, self.status, self.kind = param, status, kind


def error_body(message: str, param=None, kind="invalid_request_error", code=None) -> dict:
  return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class Served:
  """One model the server answers for: its engine (shared by the LoRA fine-tunes of one base and
  the base itself, each a `row` of it), encoder and prompt builder."""

  def __init__(self, name: str, engine: Engine, encoder, prompt_ids, row: int = 0):
    self.name, self.engine, self.encoder, self.prompt_ids = name, engine, encoder, prompt_ids
    self.row = row


def _number(body: dict, key: str, default, kind=float, lo=None, hi=None, lo_open=False):
  v = body.get(key, default)
  if v is None:
    v = default
  if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and not isinstance(v, int)):
    raise BadRequest(f"'{key}' must be {'an integer' if kind is int else 'a number'}", key)
  # (math.isfinite of an int past a float's range raises; every int is finite.)
  if isinstance(v, float) and not math.isfinite(v):
    raise BadRequest(f"'{key}' must be finite", key)
  if lo is not None and (v <= lo if lo_open else v < lo):
    raise BadRequest(f"'{key}' must be {'>' if lo_open else '>='} {lo}, got {v}", key)
  if hi is not None and v > hi:
    raise BadRequest(f"'{key}' must be <= {hi}, got {v}", key)
  return kind(v)


def _stop(body: dict) -> tuple[str, ...]:
  stop = body.get("stop")
  if stop is None:
    return ()
  if isinstance(stop, str):
    stop = [stop]
  if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 4:
    raise BadRequest("'stop' must be a non-empty string or a list of up to 4 of them", "stop")
  return tuple(stop)


def _unsupported(body: dict, n: int) -> None:
  for key, accepted in _UNSUPPORTED.items():
    v = body.get(key)
    if key == "best_of":
      off = v is None or (isinstance(v, int) and not isinstance(v, bool) and v in (1, n))
    else:
      off = v in (None, False, 0, {})
    if off:
      continue
    raise BadRequest(f"'{key}' is not supported by this server: it must be {accepted}, got "
                     f"{json.dumps(v)[:80]}", key)


def _settings(body: dict, chat: bool, choices_per_n: int) -> dict:
  """The sampling settings of a body, every number range-checked (choices_per_n: the prompts;
  each of their n choices decodes with seed + its index, which must stay a valid seed too)."""
  limit_key = "max_completion_tokens" if chat and "max_completion_tokens" in body else "max_tokens"
  n = _number(body, "n", 1, int, 1, MAX_N)
  stream = body.get("stream", False)
  if stream is None:
    stream = False
  if not isinstance(stream, bool):
    raise BadRequest(f"'stream' must be true or false, got {json.dumps(stream)[:80]}", "stream")
  _unsupported(body, n)
  seed, last = _number(body, "seed", 0, int, 0, MAX_SEED), choices_per_n * n - 1
  if seed + last > MAX_SEED:
    raise BadRequest(f"'seed' must be <= {MAX_SEED - last} for {last + 1} choices (choice i "
                     f"samples with seed + i, which must stay below 2**63), got {seed}", "seed")
  return {
      "max_tokens": _number(body, limit_key, 256 if chat else 16, int, 1),
      "temperature": _number(body, "temperature", 1.0, float, 0, 2),
      "top_p": _number(body, "top_p", 1.0, float, 0, 1, lo_open=True),
      "top_k": _number(body, "top_k", 0, int, 0, MAX_TOP_K),
      "seed": seed,
      "n": n,
      "stop": _stop(body),
      "stream": stream,
  }


def parse(body: Any, chat: bool, models: dict[str, Served],
          max_queue: int | None = None) -> tuple[Served, list, dict]:
  """Validates a request body: (model, prompt id arrays (one per choice group), settings).

  Every setting is checked before the prompts are tokenized (the slow part, which callers run off
  the event loop), as is the number of choices (prompts x n) against what the engine can ever
  hold, max_queue + its slots. Raises BadRequest naming the field."""
  if not isinstance(body, dict):
    raise BadRequest("the request body must be a JSON object")
  name = body.get("model")
  if not isinstance(name, str) or name not in models:
    raise BadRequest(f"unknown model {str(name)[:80]!r}; this server has: {', '.join(models)}",
                     "model", kind="invalid_request_error")
  served = models[name]
  if chat:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in messages):
      raise BadRequest("'messages' must be a non-empty list of {role, content} objects with "
                       "string content", "messages")
    texts = None
  else:
    texts = body.get("prompt")
    if isinstance(texts, str):
      texts = [texts]
    if not isinstance(texts, list) or not texts or not all(isinstance(p, str) for p in texts):
      raise BadRequest("'prompt' must be a string or a non-empty list of strings", "prompt")
  limit_key = "max_completion_tokens" if chat and "max_completion_tokens" in body else "max_tokens"
  given = body.get(limit_key) is not None
  settings = _settings(body, chat, 1 if chat else len(texts))
  choices = (1 if chat else len(texts)) * settings["n"]
  if max_queue is not None and choices > max_queue + served.engine.slots:
    raise BadRequest(f"the request asks for {choices} choices (prompts x n); this server holds "
                     f"at most {max_queue + served.engine.slots} (--max_queue + --slots)", "n")
  if chat:
    prompts = [served.prompt_ids(messages=[{"role": m["role"], "content": m["content"]}
                                           for m in messages])]
  else:
    prompts = [served.prompt_ids(text=p) for p in texts]
  for p in prompts:
    room = served.engine.room(len(p))
    if room < 1:
      raise BadRequest(f"the prompt has {len(p)} tokens; this model's context is "
                       f"{served.engine.context}", "messages" if chat else "prompt",
                       kind="invalid_request_error")
    if not given:
      settings["max_tokens"] = min(settings["max_tokens"], room)
    elif settings["max_tokens"] > room:
      raise BadRequest(f"max_tokens={settings['max_tokens']} does not fit: the prompt has "
                       f"{len(p)} tokens of a {served.engine.context}-token context (at most "
                       f"{room})", "max_tokens")
  return served, prompts, settings


class Call:
  """One choice in flight: a Request whose tokens arrive on an asyncio queue; `ended` is set
  once it has finished (however it finished: see req.finish)."""

  def __init__(self, loop, prompt, settings, index, row=0):
    self.queue: asyncio.Queue = asyncio.Queue()
    self.ended = asyncio.Event()
    self.index = index

    def put(item):
      loop.call_soon_threadsafe(self.queue.put_nowait, item)
      if item[0] == "done":
        loop.call_soon_threadsafe(self.ended.set)
    # Each choice of n gets its own seed so that sampled choices differ.
    self.req = Request(prompt=prompt, max_new_tokens=settings["max_tokens"],
                       temperature=settings["temperature"], top_p=settings["top_p"],
                       top_k=settings["top_k"], seed=settings["seed"] + index,
                       stop=settings["stop"], row=row,
                       on_token=lambda t, text: put(("token", text)),
                       on_done=lambda finish: put(("done", finish)))


def openai_finish(finish: str) -> str:
  return {"eos": "stop", "stop": "stop", "length": "length"}.get(finish, "stop")


def response_id(chat: bool) -> str:
  return f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"


def full_response(chat: bool, model: str, calls: list[Call], prompt_tokens: int) -> dict:
  choices, completion = [], 0
  for c in calls:
    completion += len(c.req.tokens)
    finish = openai_finish(c.req.finish or "stop")
    if chat:
      choices.append({"index": c.index, "message": {"role": "assistant", "content": c.req.text},
                      "finish_reason": finish, "logprobs": None})
    else:
      choices.append({"index": c.index, "text": c.req.text, "finish_reason": finish,
                      "logprobs": None})
  return {"id": response_id(chat), "object": "chat.completion" if chat else "text_completion",
          "created": int(time.time()), "model": model, "choices": choices,
          "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                    "total_tokens": prompt_tokens + completion}}


def chunk(chat: bool, rid: str, model: str, index: int, delta: str | None, finish=None,
          role=False) -> str:
  if chat:
    d = {"role": "assistant", "content": ""} if role else ({} if delta is None else
                                                            {"content": delta})
    choice = {"index": index, "delta": d, "finish_reason": finish, "logprobs": None}
    obj = "chat.completion.chunk"
  else:
    choice = {"index": index, "text": delta or "", "finish_reason": finish, "logprobs": None}
    obj = "text_completion"
  body = {"id": rid, "object": obj, "created": int(time.time()), "model": model,
          "choices": [choice]}
  return f"data: {json.dumps(body)}\n\n"
