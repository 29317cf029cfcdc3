"""The OpenAI wire format over the engine: /v1/models, /v1/completions, /v1/chat/completions
(streaming as server-sent events ending with `data: [DONE]`), /health.

Errors use OpenAI's shape, {"error": {"message", "type", "param", "code"}}: 400 for a bad request
(malformed JSON, an unknown model, a bad parameter, a prompt that does not fit the context), 429
when the queue is full. A bad request never reaches an engine, so it cannot harm the server's
state; a client that disconnects cancels its request.
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
  if not math.isfinite(v):
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


def parse(body: Any, chat: bool, models: dict[str, Served]) -> tuple[Served, list, dict]:
  """Validates a request body: (model, prompt id arrays (one per choice group), settings)."""
  if not isinstance(body, dict):
    raise BadRequest("the request body must be a JSON object")
  name = body.get("model")
  if not isinstance(name, str) or name not in models:
    raise BadRequest(f"unknown model {name!r}; this server has: {', '.join(models)}", "model",
                     kind="invalid_request_error")
  served = models[name]
  if chat:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in messages):
      raise BadRequest("'messages' must be a non-empty list of {role, content} objects with "
                       "string content", "messages")
    prompts = [served.prompt_ids(messages=[{"role": m["role"], "content": m["content"]}
                                           for m in messages])]
  else:
    prompt = body.get("prompt")
    if isinstance(prompt, str):
      prompt = [prompt]
    if not isinstance(prompt, list) or not prompt or not all(isinstance(p, str) for p in prompt):
      raise BadRequest("'prompt' must be a string or a non-empty list of strings", "prompt")
    prompts = [served.prompt_ids(text=p) for p in prompt]
  limit_key = "max_completion_tokens" if chat and "max_completion_tokens" in body else "max_tokens"
  given = body.get(limit_key) is not None
  settings = {
      "max_tokens": _number(body, limit_key, 256 if chat else 16, int, 1),
      "temperature": _number(body, "temperature", 1.0, float, 0, 2),
      "top_p": _number(body, "top_p", 1.0, float, 0, 1, lo_open=True),
      "top_k": _number(body, "top_k", 0, int, 0),
      "seed": _number(body, "seed", 0, int, 0, 2**63 - 1),
      "n": _number(body, "n", 1, int, 1, MAX_N),
      "stop": _stop(body),
      "stream": bool(body.get("stream", False)),
  }
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
  """One choice in flight: a Request whose tokens arrive on an asyncio queue."""

  def __init__(self, loop, prompt, settings, index, row=0):
    self.queue: asyncio.Queue = asyncio.Queue()
    self.index = index
    put = lambda item: loop.call_soon_threadsafe(self.queue.put_nowait, item)
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
