"""What `python -m jaxft.serve` runs, importable: the models of a workdir loaded into engines, the
FastAPI application over them, and the /compare prompts. See jaxft/serve.py and docs/serve.md."""

import asyncio
import contextlib
import json
import os
import random

from jaxft import eval as evaluation, inference, peft, session
from jaxft.errors import ConfigError
from jaxft.peft.lora import LoRA
from jaxft.serving import api, compare, multi_lora
from jaxft.serving.engine import Engine


# uvicorn's settings, the server's own (jaxft.serve) and the tests'. An idle keep-alive connection
# stays open 75 s: a client's pool (httpx's, so the openai client's, and requests') reuses one for
# up to 5 s, and a server that closes it at 5 s too (uvicorn's default) races the request sent on
# it at that moment, which then fails with "connection reset by peer".
SERVER_OPTIONS = {"log_level": "warning", "timeout_keep_alive": 75, "timeout_graceful_shutdown": 60}


def _prompt_builder(encoder):
  def build(messages=None, text=None):
    if messages is not None:
      return inference.prompt_ids(encoder, inference.Prompt("request", messages))
    return inference.prompt_ids(encoder, inference.Prompt("request", text=text))
  return build


def load_models(workdir: str, adapters: dict[str, str], *, with_base: bool = True,
                slots: int = 8, context: int = 0) -> dict[str, api.Served]:
  """{name: Served} for the tuned model of WORKDIR, each adapter workdir and (with_base) the base.

  The base and every plain-LoRA run share one engine (one batch, each row picking its adapter:
  jaxft/serving/multi_lora.py); other methods (DoRA, prefix, adapters, full fine-tuning) get an
  engine each. The base weights are held once. Raises ConfigError for an adapter trained on
  another base, CheckpointError for a workdir with no intact checkpoint."""
  trained = session.restore_trained(workdir)
  config, model = trained.config, trained.model
  encoder = session.encoder(config, workdir)
  ctx = context or min(model.cfg.max_position_embeddings, 4096)
  detok = lambda ids: encoder.tok.decode(list(map(int, ids)), skip_special_tokens=True)
  eos = inference.eos_ids(model.cfg, encoder)
  build = _prompt_builder(encoder)

  def engine(adapter, params):
    e = Engine(model.cfg, adapter, params, eos_ids=eos, detokenize=detok, slots=slots,
               context=ctx)
    e.start()
    return e

  runs = [(os.path.basename(os.path.normpath(workdir)) or "tuned", trained)]
  for extra, wd in adapters.items():
    other = session.restore_trained(wd)
    if other.model.fingerprint != model.fingerprint:
      raise ConfigError(f"--adapter {extra}={wd}: trained on another base than {workdir}")
    runs.append((extra, other))
  lora = [(n, t) for n, t in runs if type(t.model.method) is LoRA]
  out: dict[str, api.Served] = {}
  if lora or with_base:
    method, params = multi_lora.stack(
        trained.frozen if not model.method.trains_base else model.base,
        [(t.model.method, t.trainable) for _, t in lora]) if lora else (peft.Method(), model.base)
    shared = engine(method, params)
    for row, (n, _) in enumerate(lora, 1):
      out[n] = api.Served(n, shared, encoder, build, row)
    if with_base:
      out["base"] = api.Served("base", shared, encoder, build, 0)
  for n, t in runs:
    if n not in out:  # the base is held once: other runs' trainable leaves over this one's
      frozen = t.frozen if t.model.method.trains_base else trained.frozen
      out[n] = api.Served(n, engine(t.model.method, peft.merge_trees(frozen, t.trainable)),
                          encoder, build)
  first = runs[0][0]
  return {first: out[first], **{k: v for k, v in out.items() if k != first}}


MAX_BODY = 4 << 20  # bytes: 64 prompts filling a 4096-token context, with room to spare


def make_app(models: dict[str, api.Served], max_queue: int = 256,
             ballots: compare.Ballots | None = None, eval_prompts=(), max_body: int = MAX_BODY):
  """The FastAPI application over loaded models (engines started). `max_queue` choices (prompts x
  n) may wait beyond the slots; a request body over `max_body` bytes is refused unread (413).
  With `ballots`, /compare serves the blind side-by-side page (prompts drawn from
  `eval_prompts`)."""
  from fastapi import FastAPI, Request as HttpRequest
  from fastapi.responses import JSONResponse

  @contextlib.asynccontextmanager
  async def lifespan(app):
    del app
    yield
    for s in models.values():  # SIGTERM: in-flight requests finish, queued ones are cancelled
      await asyncio.to_thread(s.engine.stop, True)

  app = FastAPI(title="jaxft", lifespan=lifespan)

  @app.get("/health")
  async def health():
    # A model's numbers are its own row's: the base and the LoRAs of a shared engine are separate
    # models to a client. A stopped engine makes the server unhealthy (503), naming the models.
    stopped = {n: why for n, s in models.items() if (why := s.engine.failure())}
    body = {"status": "error" if stopped else "ok", "models": list(models),
            "busy": {n: s.engine.busy(s.row) for n, s in models.items()},
            "finished": {n: dict(s.engine.finished_by_row.get(s.row, {}))
                         for n, s in models.items()}}
    if stopped:
      body["stopped"] = stopped
      return JSONResponse(body, status_code=503)
    return body

  @app.get("/v1/models")
  async def list_models():
    return {"object": "list", "data": [{"id": n, "object": "model", "created": 0,
                                        "owned_by": "jaxft"} for n in models]}

  if ballots is not None:
    _compare_routes(app, models, ballots, eval_prompts, max_body)

  @app.post("/v1/completions")
  async def completions(http: HttpRequest):
    return await _complete(http, False, models, max_queue, max_body)

  @app.post("/v1/chat/completions")
  async def chat_completions(http: HttpRequest):
    return await _complete(http, True, models, max_queue, max_body)

  return app


def _fail(e: api.BadRequest):
  from fastapi.responses import JSONResponse
  return JSONResponse(api.error_body(str(e), e.param, e.kind), status_code=e.status)


async def _read_json(http, limit: int):
  """The request's JSON body. BadRequest: 413 for a body over `limit` bytes (refused from its
  Content-Length before reading it, or as soon as a body without one passes the limit), 400 for
  malformed JSON (nesting too deep included)."""
  too_big = api.BadRequest(f"the request body is over {limit} bytes, this server's limit "
                           "(jaxft.serve --max_request_mb)", status=413)
  declared = http.headers.get("content-length", "")
  if declared.isdigit() and int(declared) > limit:
    raise too_big
  chunks, size = [], 0
  async for part in http.stream():
    size += len(part)
    if size > limit:
      raise too_big
    chunks.append(part)
  try:
    return json.loads(b"".join(chunks))
  except (ValueError, UnicodeDecodeError) as e:
    raise api.BadRequest(f"malformed JSON body ({e})") from None
  except RecursionError:
    raise api.BadRequest("malformed JSON body (nested too deeply)") from None


async def _disconnected(http) -> None:
  """Returns when the client has gone (its body already read: the next message is the end)."""
  while (await http.receive())["type"] != "http.disconnect":
    pass


async def _complete(http, chat: bool, models: dict, max_queue: int, max_body: int):
  """One /v1/completions or /v1/chat/completions request: parsed, queued, answered (or streamed)."""
  from fastapi.responses import JSONResponse, StreamingResponse
  try:
    body = await _read_json(http, max_body)
    # Tokenizing a large prompt takes seconds: off the event loop, so that /health and the other
    # clients are answered meanwhile.
    served, prompts, settings = await asyncio.to_thread(api.parse, body, chat, models, max_queue)
    # The engine queues choices, so the limit counts them (prompts x n), not requests. No await
    # from here to the submits below: no other request can slip in between.
    choices, limit = len(prompts) * settings["n"], max_queue + served.engine.slots
    if served.engine.busy() + choices > limit:
      raise api.BadRequest(f"the server is busy ({served.engine.busy()} of {limit} choices "
                           "queued or decoding); retry later", status=429,
                           kind="rate_limit_exceeded")
  except api.BadRequest as e:
    return _fail(e)
  loop = asyncio.get_running_loop()
  calls = [api.Call(loop, p, settings, i * settings["n"] + j, served.row)
           for i, p in enumerate(prompts) for j in range(settings["n"])]
  try:
    for c in calls:
      served.engine.submit(c.req)
  except RuntimeError as e:
    return JSONResponse(api.error_body(str(e), kind="server_error"), status_code=503)
  prompt_tokens = sum(len(p) for p in prompts) * settings["n"]
  if settings["stream"]:
    return StreamingResponse(_stream(http, chat, served, calls, prompt_tokens),
                             media_type="text/event-stream")
  ended = asyncio.ensure_future(asyncio.gather(*(c.ended.wait() for c in calls)))
  gone = asyncio.ensure_future(_disconnected(http))
  try:
    await asyncio.wait({ended, gone}, return_when=asyncio.FIRST_COMPLETED)
  finally:  # a client gone (or a server shutting down) stops decoding what it asked for
    gone.cancel()
    if not ended.done():
      ended.cancel()
      for c in calls:
        served.engine.cancel(c.req)
  if not ended.done():
    return JSONResponse(api.error_body("the client disconnected"), status_code=499)
  failed = [c.req.error for c in calls if c.req.finish == "error"]
  if failed:
    return JSONResponse(api.error_body(f"the engine failed on this request: {failed[0]}",
                                       kind="server_error"), status_code=500)
  return api.full_response(chat, served.name, calls, prompt_tokens)


async def _stream(http, chat, served, calls, prompt_tokens):
  rid = api.response_id(chat)
  try:
    for c in calls:
      if chat:
        yield api.chunk(True, rid, served.name, c.index, None, role=True)
      sent = ""
      while True:
        kind, value = await c.queue.get()
        if kind == "token":
          if value.startswith(sent) and len(value) > len(sent):
            yield api.chunk(chat, rid, served.name, c.index, value[len(sent):])
            sent = value
          continue
        if value == "error":  # OpenAI's clients raise on an error event
          yield f"data: {json.dumps(api.error_body(c.req.error, kind='server_error'))}\n\n"
          return
        tail = c.req.text[len(sent):] if c.req.text.startswith(sent) else ""
        if tail:
          yield api.chunk(chat, rid, served.name, c.index, tail)
        yield api.chunk(chat, rid, served.name, c.index, None, api.openai_finish(value))
        break
    yield "data: [DONE]\n\n"
  finally:  # a client that disconnects cancels what is left
    for c in calls:
      if c.req.finish is None:
        served.engine.cancel(c.req)
    del http, prompt_tokens


async def _answer_one(served, prompt_ids, max_tokens) -> str:
  call = api.Call(asyncio.get_running_loop(), prompt_ids,
                  {"max_tokens": max_tokens, "temperature": 0.0, "top_p": 1.0, "top_k": 0,
                   "seed": 0, "stop": ()}, 0, served.row)
  served.engine.submit(call.req)
  await call.ended.wait()
  if call.req.finish == "error":
    raise api.BadRequest(f"the engine failed on this request: {call.req.error}", status=500,
                         kind="server_error")
  return call.req.text.strip()


def _compare_routes(app, models: dict, ballots: compare.Ballots, eval_prompts,
                    max_body: int) -> None:
  """/compare: the blind side-by-side page, a prompt drawn from `eval_prompts`, two answers, a vote."""
  from fastapi import Request as HttpRequest
  from fastapi.responses import HTMLResponse, JSONResponse

  names = list(models)
  other = "base" if "base" in names and names[0] != "base" else names[-1]

  @app.get("/compare", response_class=HTMLResponse)
  async def compare_page():
    return compare.page(names, names[0], other)

  @app.get("/compare/prompt")
  async def compare_prompt():
    if not eval_prompts:
      return JSONResponse(api.error_body("no data.eval prompts to draw from"), status_code=404)
    return {"prompt": random.choice(eval_prompts)}

  @app.post("/compare/answers")
  async def compare_answers(http: HttpRequest):
    try:
      body = await _read_json(http, max_body)
      if not isinstance(body, dict):
        raise api.BadRequest("the request body must be a JSON object")
      prompt, pair = body.get("prompt"), body.get("models")
      if not isinstance(prompt, str) or not prompt.strip():
        raise api.BadRequest("'prompt' must be a non-empty string", "prompt")
      if (not isinstance(pair, list) or len(pair) != 2
          or not all(isinstance(m, str) and m in models for m in pair) or pair[0] == pair[1]):
        raise api.BadRequest(f"'models' must name two different models of: {', '.join(models)}",
                             "models")
      messages = [{"role": "user", "content": prompt}]
      ids = await asyncio.to_thread(models[pair[0]].prompt_ids, messages=messages)
      room = models[pair[0]].engine.room(len(ids))
      if room < 1:
        raise api.BadRequest("the prompt does not fit the context", "prompt")
      texts = await asyncio.gather(*(_answer_one(models[m], ids, min(128, room)) for m in pair))
    except api.BadRequest as e:
      return _fail(e)
    token, shown = ballots.shown(prompt, pair[0], pair[1], dict(zip(pair, texts)))
    return {"token": token, "answers": shown}

  @app.post("/compare/vote")
  async def compare_vote(http: HttpRequest):
    try:
      body = await _read_json(http, max_body)
      if not isinstance(body, dict) or not isinstance(body.get("token"), str):
        raise api.BadRequest("a vote must be a JSON object with a string 'token'", "token")
      row = ballots.vote(body["token"], body.get("choice"))
    except api.BadRequest as e:
      return _fail(e)
    except ValueError as e:
      return _fail(api.BadRequest(f"bad vote ({e})", "choice"))
    except KeyError:
      return _fail(api.BadRequest("unknown or already used token", "token"))
    return {"recorded": True, "winner_is_first_shown": row["winner"] == row["shown_first"]}


def eval_prompts(workdir: str) -> list[str]:
  """The user turns of the workdir's data.eval rows with a reference (for /compare)."""
  config = session.load_workdir_config(workdir)
  if not config.data.eval:
    return []
  refs = evaluation.references(config.data.eval, config.data.format)
  return [m["content"] for r in refs if r.prompt.messages for m in r.prompt.messages[-1:]
          if m["role"] == "user"]
