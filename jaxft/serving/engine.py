"""Continuous batching: concurrent requests share one jitted decode step over a fixed pool of
KV-cache slots; a request joins when a slot frees, and leaves when it ends.

The cache keeps one write clock for all slots (the model's decode path writes every row at the
same cache index). A request is prefilled alone (prompt lengths bucketed, so only a few shapes
compile) and its keys/values are copied into its slot so that the prompt ends at the clock; from
then on it decodes with every other slot, each row at its own position (RoPE) and its own
sampling settings. When the clock nears the end of the cache, the cache is shifted left by what no
active request still needs. Slots no request holds decode a dummy token that attends only to
itself, so no row ever sees another's keys (segment ids) and nothing produces NaN.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import threading
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from jaxft.models import llama
from jaxft.models.config import ModelConfig

_BUCKET = 32


@dataclasses.dataclass
class Request:
  """One generation: prompt ids, limits and sampling; the engine fills in the rest.

  on_token(token_id, text_so_far) is called from the engine thread for every new token;
  on_done(finish) once, with finish one of eos | length | stop | cancelled | error (then `error`
  says why: the engine failed on this request, and goes on serving the others)."""
  prompt: np.ndarray
  max_new_tokens: int
  temperature: float = 0.0
  top_p: float = 1.0
  top_k: int = 0
  seed: int = 0
  stop: tuple[str, ...] = ()
  row: int = 0  # which adapter of a multi-adapter engine (0 = the base); else ignored
  on_token: Callable[[int, str], None] | None = None
  on_done: Callable[[str], None] | None = None
  tokens: list = dataclasses.field(default_factory=list)
  text: str = ""
  finish: str | None = None
  cancelled: bool = False
  error: str = ""


def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


def _bind(adapter, params, rows):
  """A multi-adapter method (jaxft/serving/multi_lora.py) learns each row's adapter here."""
  return adapter.bind_rows(params, rows) if hasattr(adapter, "bind_rows") else params


@functools.partial(jax.jit, static_argnames=("cfg", "adapter"))
def _prefill(cfg: ModelConfig, adapter, params, tokens, positions, segs, rows):
  """One left-padded prompt [1, P] -> (last-token logits [V], its cache [L, 1, P, K, hd] k and v)."""
  params = _bind(adapter, params, rows)
  cache = llama.init_cache(cfg, 1, tokens.shape[1])
  h, cache = llama.hidden_states(cfg, params, tokens, adapter=adapter, positions=positions,
                                 segment_ids=segs, cache=cache, cache_index=0)
  return llama.logits(cfg, params, h[0, -1]), cache["k"], cache["v"]


@functools.partial(jax.jit, donate_argnames=("cache",))
def _insert(cache, k, v, segs, slot, start):
  """Copies a prefilled prompt into `slot` so that it ends at start + P; the slot's other
  entries are cleared (segment 0)."""
  ck = jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), (0, slot, start, 0, 0))
  cv = jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), (0, slot, start, 0, 0))
  row = jnp.zeros((1, cache["seg"].shape[1]), jnp.int32)
  row = jax.lax.dynamic_update_slice(row, segs, (0, start))
  seg = jax.lax.dynamic_update_slice(cache["seg"], row, (slot, 0))
  return {"k": ck, "v": cv, "seg": seg}


@functools.partial(jax.jit, donate_argnames=("cache",))
def _shift(cache, by):
  """Moves every slot's entries `by` places towards the start; the freed tail is cleared."""
  S = cache["seg"].shape[1]
  keep = jnp.arange(S) < S - by
  k = jnp.roll(cache["k"], -by, axis=2)
  v = jnp.roll(cache["v"], -by, axis=2)
  seg = jnp.where(keep[None, :], jnp.roll(cache["seg"], -by, axis=1), 0)
  return {"k": k, "v": v, "seg": seg}


def _select(logits, temperature, top_k, top_p, keys):
  """Per-row next tokens [B] from float32 logits [B, V]: argmax where temperature is 0, else a
  sample from the temperature-scaled distribution cut to top-k and top-p (per row). The sorts
  sampling needs run only when some row samples."""
  greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  return jax.lax.cond(jnp.any(temperature > 0),
                      lambda: jnp.where(temperature > 0,
                                        _sample(logits, temperature, top_k, top_p, keys), greedy),
                      lambda: greedy)


def _sample(logits, temperature, top_k, top_p, keys):
  lg = logits / jnp.maximum(temperature, 1e-6)[:, None]
  desc = jnp.sort(lg, axis=-1)[:, ::-1]
  V = lg.shape[-1]
  kth = jnp.take_along_axis(desc, jnp.clip(top_k - 1, 0, V - 1)[:, None], axis=-1)
  lg = jnp.where((top_k[:, None] > 0) & (lg < kth), -jnp.inf, lg)
  desc = jnp.where((top_k[:, None] > 0) & (desc < kth), -jnp.inf, desc)
  probs = jax.nn.softmax(desc, axis=-1)
  above = jnp.cumsum(probs, axis=-1) - probs
  threshold = jnp.min(jnp.where(above < top_p[:, None], desc, jnp.inf), axis=-1, keepdims=True)
  lg = jnp.where(lg < threshold, -jnp.inf, lg)
  return jax.vmap(jax.random.categorical)(keys, lg).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("cfg", "adapter"), donate_argnames=("cache",))
def _step(cfg: ModelConfig, adapter, params, cache, logits, pos, active, index, temperature,
          top_k, top_p, keys, n, rows):
  """Chooses each slot's next token from its logits and feeds it at cache `index`; returns the
  tokens, their log-probabilities and the new logits and cache."""
  params = _bind(adapter, params, rows)
  step_keys = jax.vmap(jax.random.fold_in)(keys, n)
  tok = _select(logits, temperature, top_k, top_p, step_keys)
  logp = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), tok[:, None], axis=-1)[:, 0]
  feed = jnp.where(active, tok, 0)
  h, cache = llama.hidden_states(cfg, params, feed[:, None], adapter=adapter,
                                 positions=pos[:, None], segment_ids=jnp.ones_like(feed)[:, None],
                                 cache=cache, cache_index=index)
  return tok, logp, llama.logits(cfg, params, h[:, 0]), cache


class Engine:
  """A pool of `slots` decoding rows over one model (cfg, adapter: the method, params: the
  decoder's tree). Thread-safe `submit`; `run_forever` (or `start`) drives the loop."""

  def __init__(self, cfg: ModelConfig, adapter, params, *, eos_ids, detokenize, slots: int = 8,
               context: int | None = None):
    self.cfg, self.adapter, self.params = cfg, adapter, params
    self.eos_ids = frozenset(int(e) for e in eos_ids)
    self.detokenize = detokenize
    self.slots = slots
    limit = cfg.max_position_embeddings - int(adapter.position_offset)
    self.context = min(context or limit, limit)
    self.cache_len = _round_up(self.context, _BUCKET) + _BUCKET
    self.cache = llama.init_cache(cfg, slots, self.cache_len)
    self.logits = jnp.zeros((slots, cfg.vocab_size), jnp.float32)
    self.index = 0
    self.pos = np.zeros(slots, np.int32)
    self.first = np.zeros(slots, np.int64)  # cache index of each slot's first prompt entry
    self.n = np.zeros(slots, np.int32)
    self.rows = np.zeros(slots, np.int32)
    self.temperature = np.zeros(slots, np.float32)
    self.top_k = np.zeros(slots, np.int32)
    self.top_p = np.ones(slots, np.float32)
    self.keys = np.array(jax.random.key_data(jax.random.split(jax.random.key(0), slots)))
    self.held: list[Request | None] = [None] * slots
    self.queue: list[Request] = []
    self._cv = threading.Condition()
    self._stop = False
    self._thread: threading.Thread | None = None
    self.error = ""
    self.finished: collections.Counter = collections.Counter()  # requests ended, by finish
    # The same by row: the base and each LoRA of a shared engine are separate models to a client.
    self.finished_by_row: dict[int, collections.Counter] = collections.defaultdict(
        collections.Counter)

  # -- requests ---------------------------------------------------------------------------------

  def room(self, prompt_len: int) -> int:
    """Most new tokens a prompt of this length can get."""
    return self.context - prompt_len

  def submit(self, req: Request) -> None:
    """Queues a request; RuntimeError when the engine has stopped on an error."""
    with self._cv:
      if self.error:
        raise RuntimeError(f"the decoding engine stopped: {self.error}")
      self.queue.append(req)
      self._cv.notify()

  def cancel(self, req: Request) -> None:
    req.cancelled = True
    with self._cv:
      self._cv.notify()

  def busy(self, row: int | None = None) -> int:
    """Requests queued or decoding: all of them, or those of one row (one model)."""
    with self._cv:
      return sum(r is not None and (row is None or r.row == row)
                 for r in self.queue + self.held)

  def failure(self) -> str:
    """Why the engine no longer decodes ("" while it does): its loop stopped on an error, or its
    thread is gone."""
    if self.error:
      return self.error
    if self._thread is not None and not self._thread.is_alive() and not self._stop:
      return "the decoding thread has exited"
    return ""

  # -- loop -------------------------------------------------------------------------------------

  def start(self) -> None:
    self._thread = threading.Thread(target=self.run_forever, name="jaxft-engine", daemon=True)
    self._thread.start()

  def stop(self, finish_running: bool = True, timeout: float = 60.0) -> None:
    """Stops the loop: in-flight requests run to their end (finish_running) or are cancelled;
    queued ones are cancelled."""
    with self._cv:
      for r in self.queue:
        r.cancelled = True
      if not finish_running:
        for r in self.held:
          if r is not None:
            r.cancelled = True
      self._stop = True
      self._cv.notify()
    if self._thread is not None:
      self._thread.join(timeout)

  def run_forever(self) -> None:
    """The loop; an unexpected error ends every request with finish "error" and marks the engine
    broken (`error`), so no request waits forever."""
    try:
      self._loop()
    except Exception as e:  # pylint: disable=broad-except
      logging.exception("the decoding engine stopped")
      with self._cv:
        self.error = f"{type(e).__name__}: {e}"
        for r in self.queue + [r for r in self.held if r is not None]:
          r.error = f"the decoding engine stopped: {self.error}"
          self._finish_req(r, "error")
        self.queue.clear()
        self.held = [None] * self.slots

  def _loop(self) -> None:
    while True:
      with self._cv:
        while not self._stop and not self.queue and not any(self.held):
          self._cv.wait()
        if self._stop and not any(r is not None and not r.cancelled for r in self.held):
          for r in self.queue + [r for r in self.held if r is not None]:
            self._finish_req(r, "cancelled")
          self.queue.clear()
          self.held = [None] * self.slots
          return
        admit = []
        for slot in range(self.slots):
          if self.held[slot] is None and self.queue and not self._stop:
            admit.append((slot, self.queue.pop(0)))
      for slot, req in admit:
        if req.cancelled:
          self._finish_req(req, "cancelled")
          continue
        try:
          admitted = self._admit(slot, req)
        except Exception as e:  # pylint: disable=broad-except
          self._fail_one(req, e)
          continue
        if not admitted:  # no room in the cache until others finish
          with self._cv:
            self.queue.insert(0, req)
          break
      self._release_cancelled()
      if any(self.held):
        try:
          self._decode_once()
        except Exception as e:  # pylint: disable=broad-except
          # The batched step cannot say which row failed: the requests decoding now fail, the
          # queued ones and later ones are served from a fresh cache.
          logging.exception("a decode step failed; failing the requests in it")
          self._fail_held(f"{type(e).__name__}: {e}")

  def _finish_req(self, req: Request, finish: str) -> None:
    if req.finish is None:
      req.finish = finish
      self.finished[finish] += 1
      self.finished_by_row[req.row][finish] += 1
      if req.on_done:
        try:
          req.on_done(finish)
        except Exception:  # pylint: disable=broad-except
          # A caller gone (its event loop closed) must not stop the engine for everyone else.
          logging.exception("a request's on_done callback failed")

  def _fail_one(self, req: Request, e: Exception) -> None:
    """Ends one request that could not be admitted; the others go on (a cache the failed
    admission had already donated is rebuilt, failing the requests that were in it)."""
    logging.exception("request failed in the engine")
    req.error = f"{type(e).__name__}: {e}"
    self._finish_req(req, "error")
    if any(a.is_deleted() for a in jax.tree.leaves(self.cache)):
      self._fail_held("the decoding cache was lost when another request failed")

  def _fail_held(self, error: str) -> None:
    """Ends every decoding request with `error` and starts over from an empty cache (one that a
    failed computation had donated is gone)."""
    for slot, r in enumerate(self.held):
      if r is not None:
        r.error = error
        self._finish_req(r, "error")
        self.held[slot] = None
    self.cache = llama.init_cache(self.cfg, self.slots, self.cache_len)
    self.logits = jnp.zeros((self.slots, self.cfg.vocab_size), jnp.float32)
    self.index = 0

  def _release_cancelled(self) -> None:
    for slot, req in enumerate(self.held):
      if req is not None and req.cancelled:
        self._finish_req(req, "cancelled")
        self.held[slot] = None

  def _admit(self, slot: int, req: Request) -> bool:
    n = len(req.prompt)
    P = _round_up(n, _BUCKET)
    need = req.max_new_tokens + 1
    # A setting the per-slot arrays cannot hold (a seed past int64, a top_k past int32) fails
    # here, before the cache is touched.
    key = np.array(jax.random.key_data(jax.random.key(req.seed)))
    temperature, top_k, top_p = (np.float32(req.temperature), np.int32(req.top_k),
                                 np.float32(req.top_p))
    active = [s for s, r in enumerate(self.held) if r is not None]
    if not active:
      self.index = 0
    if self.index < P:
      self.index = P  # every row may skip cache entries: empty ones are masked (segment 0)
    if self.index + need > self.cache_len:
      oldest = min((int(self.first[s]) for s in active), default=self.index)
      by = min(oldest, self.index - P)
      if by > 0:
        self.cache = _shift(self.cache, jnp.asarray(by, jnp.int32))
        self.index -= by
        self.first[active] -= by
      if self.index + need > self.cache_len:
        return False
    tokens = np.zeros((1, P), np.int32)
    segs = np.zeros((1, P), np.int32)
    positions = np.zeros((1, P), np.int32)
    tokens[0, P - n:], segs[0, P - n:], positions[0, P - n:] = req.prompt, 1, np.arange(n)
    logits, k, v = _prefill(self.cfg, self.adapter, self.params, tokens, positions, segs,
                            np.asarray([req.row], np.int32))
    start = self.index - P
    self.cache = _insert(self.cache, k, v, jnp.asarray(segs), jnp.asarray(slot, jnp.int32),
                         jnp.asarray(start, jnp.int32))
    self.logits = self.logits.at[slot].set(logits)
    self.first[slot], self.pos[slot], self.n[slot], self.rows[slot] = start, n, 0, req.row
    self.temperature[slot], self.top_k[slot], self.top_p[slot] = temperature, top_k, top_p
    self.keys[slot] = key
    self.held[slot] = req
    return True

  def _decode_once(self) -> None:
    active = np.array([r is not None for r in self.held])
    self.pos[~active] = 0  # idle rows decode a dummy token; keep their positions bounded
    tok, logp, self.logits, self.cache = _step(
        self.cfg, self.adapter, self.params, self.cache, self.logits, jnp.asarray(self.pos),
        jnp.asarray(active), jnp.asarray(self.index, jnp.int32), jnp.asarray(self.temperature),
        jnp.asarray(self.top_k), jnp.asarray(self.top_p),
        jax.random.wrap_key_data(jnp.asarray(self.keys)), jnp.asarray(self.n),
        jnp.asarray(self.rows))
    tok, logp = np.asarray(tok), np.asarray(logp)
    self.index += 1
    self.pos += 1
    self.n += 1
    for slot, req in enumerate(self.held):
      if req is None:
        continue
      try:
        self._advance(slot, req, int(tok[slot]))
      except Exception as e:  # pylint: disable=broad-except
        # One request's text or callback failing ends that request, not the step's others.
        logging.exception("request failed after a decode step")
        req.error = f"{type(e).__name__}: {e}"
        self._end(slot, "error")
    del logp

  def _advance(self, slot: int, req: Request, t: int) -> None:
    """Adds token t to the request in `slot`; ends it at an end token, a stop string or its
    length."""
    if t in self.eos_ids:
      self._end(slot, "eos")
      return
    req.tokens.append(t)
    text = self.detokenize(req.tokens)
    hit = [text.find(s) for s in req.stop if s in text]
    if hit:
      text = text[:min(hit)]
    req.text = text
    if req.on_token:
      req.on_token(t, text)
    if hit:
      self._end(slot, "stop")
    elif len(req.tokens) >= req.max_new_tokens or self.pos[slot] >= self.context:
      self._end(slot, "length")

  def _end(self, slot: int, finish: str) -> None:
    req = self.held[slot]
    self.held[slot] = None
    self._finish_req(req, finish)
