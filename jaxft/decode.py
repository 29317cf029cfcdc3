"""Batched decoding with a KV cache: left-padded prompts, one prefill, then a jitted loop of
single-token steps (greedy or sampled) that stops when every row has produced an end token.

Prompts of one batch are left-padded to a common length: padding slots get segment id 0 (never
attended to by real tokens) and each row's positions start at 0 at its first real token, so a row
decodes exactly as it would alone. All rows then write their next token into the same cache slot.

The method (`adapter`) is a static argument: LoRA and DoRA change the linears, prefix tuning adds
key/value prefixes and shifts positions, a quantized base is dequantized inside its `linear`; the
decoder (jaxft/models/llama.py) calls those hooks, so decoding needs nothing per method.

Sampling keys are derived from (seed, prompt index, token index), so a prompt samples the same
tokens whatever batch it lands in.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec

from jaxft.errors import ConfigError, DataError
from jaxft.models import llama
from jaxft.models.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class Sampling:
  """How the next token is chosen. temperature 0 = greedy (argmax); top_k 0 and top_p 1 = off."""
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0

  def __post_init__(self):
    if not math.isfinite(self.temperature) or self.temperature < 0:
      raise ConfigError(f"temperature={self.temperature}: must be a finite number >= 0 (0 = greedy)")
    if self.top_k < 0:
      raise ConfigError(f"top_k={self.top_k}: must be >= 0 (0 = off)")
    if not 0.0 < self.top_p <= 1.0:  # also false for NaN
      raise ConfigError(f"top_p={self.top_p}: must be in (0, 1] (1 = off)")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0.0


@dataclasses.dataclass
class Generation:
  """What one prompt produced: the new token ids (the end token excluded) and why it stopped:
  'eos' (an end token), 'stop' (a stop string; the ids may run past it, cut the text with
  `cut_at_stop`) or 'length' (max_new_tokens, or the end of the model's context).

  logprobs: the log-probability of each of `tokens` under the model's distribution (the softmax
  of its logits, before temperature, top-k or top-p), float32, aligned with `tokens`;
  end_logprob: that of the end token when finish is 'eos', else None; end_token: its id (one of
  eos_ids) when finish is 'eos', else None."""
  tokens: np.ndarray
  finish: str
  logprobs: np.ndarray | None = None
  end_logprob: float | None = None
  end_token: int | None = None


def filter_logits(logits: jnp.ndarray, sampling: Sampling) -> jnp.ndarray:
  """Temperature-scaled logits [B, V] with the tokens outside top-k / top-p set to -inf."""
  lg = logits.astype(jnp.float32) / jnp.float32(sampling.temperature)
  if sampling.top_k > 0 and sampling.top_k < lg.shape[-1]:
    kth = jax.lax.top_k(lg, sampling.top_k)[0][:, -1:]
    lg = jnp.where(lg < kth, -jnp.inf, lg)
  if sampling.top_p < 1.0:
    # Keep the smallest set of most likely tokens whose mass reaches top_p: a token stays when
    # the mass of the tokens ranked above it is still below top_p (so the top token always stays).
    desc = jnp.sort(lg, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(desc, axis=-1)
    above = jnp.cumsum(probs, axis=-1) - probs
    threshold = jnp.min(jnp.where(above < sampling.top_p, desc, jnp.inf), axis=-1, keepdims=True)
    lg = jnp.where(lg < threshold, -jnp.inf, lg)
  return lg


def select(logits: jnp.ndarray, sampling: Sampling, keys: jax.Array) -> jnp.ndarray:
  """Next tokens [B] from float32 logits [B, V]; `keys` are per-row PRNG keys [B]."""
  if sampling.greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  lg = filter_logits(logits, sampling)
  return jax.vmap(jax.random.categorical)(keys, lg).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("cfg", "adapter", "cache_len"))
def _prefill(cfg: ModelConfig, adapter, params, tokens, positions, segment_ids, cache_len: int):
  """Runs the left-padded prompts [B, P] into a fresh cache of cache_len slots; returns the
  logits of each row's last prompt token and the cache."""
  cache = llama.init_cache(cfg, tokens.shape[0], cache_len)
  h, cache = llama.hidden_states(cfg, params, tokens, adapter=adapter, positions=positions,
                                 segment_ids=segment_ids, cache=cache, cache_index=0)
  return llama.logits(cfg, params, h[:, -1]), cache


def _replicated_on(params) -> NamedSharding | None:
  """The replicated sharding of the mesh `params` live on; None when they are not on a mesh."""
  for x in jax.tree.leaves(params):
    if isinstance(getattr(x, "sharding", None), NamedSharding) and x.sharding.mesh.size > 1:
      return NamedSharding(x.sharding.mesh, PartitionSpec())
  return None


@functools.partial(jax.jit, static_argnames=("cfg", "adapter", "sampling", "eos_ids",
                                             "replicate"),
                   donate_argnames=("state",))
def _decode(cfg: ModelConfig, adapter, sampling: Sampling, eos_ids: tuple[int, ...], params,
            state: dict, limit, replicate: NamedSharding | None = None):
  """Chooses and feeds tokens until `limit` tokens were chosen or every row is done.

  state: logits [B, V] (of the last fed token), cache, pos [B] (position of the next token),
  index (its cache slot), n (tokens chosen so far), done [B], length [B], eos [B], out [B, N],
  logprobs [B, N] (of the chosen tokens, the end token included), keys [B] (per-row sampling
  keys). replicate: on a mesh, its replicated sharding: each device chooses the tokens from
  the whole logits, so the choice (top-p's sort and sums, the draw) does not depend on how the
  mesh splits them, and every device agrees on when the loop ends."""
  eos = jnp.asarray(eos_ids or (-1,), jnp.int32)

  def cond(s):
    return (s["n"] < limit) & ~jnp.all(s["done"])

  def body(s):
    step_keys = jax.vmap(jax.random.fold_in, (0, None))(s["keys"], s["n"])
    logits = s["logits"]
    if replicate is not None:
      logits = jax.lax.with_sharding_constraint(logits, replicate)
    tok = select(logits, sampling, step_keys)
    hit_eos = jnp.isin(tok, eos) & ~s["done"]
    out = jax.lax.dynamic_update_slice_in_dim(s["out"], jnp.where(s["done"], 0, tok)[:, None],
                                              s["n"], 1)
    chosen = jnp.take_along_axis(jax.nn.log_softmax(s["logits"].astype(jnp.float32), axis=-1),
                                 tok[:, None], axis=-1)
    logprobs = jax.lax.dynamic_update_slice_in_dim(
        s["logprobs"], jnp.where(s["done"][:, None], 0.0, chosen), s["n"], 1)
    length = s["length"] + (~s["done"] & ~hit_eos).astype(jnp.int32)
    done = s["done"] | hit_eos
    B = tok.shape[0]
    h, cache = llama.hidden_states(cfg, params, tok[:, None], adapter=adapter,
                                   positions=s["pos"][:, None],
                                   segment_ids=jnp.ones((B, 1), jnp.int32),
                                   cache=s["cache"], cache_index=s["index"])
    return dict(s, logits=llama.logits(cfg, params, h[:, 0]), cache=cache, pos=s["pos"] + 1,
                index=s["index"] + 1, n=s["n"] + 1, done=done, length=length,
                eos=s["eos"] | hit_eos, out=out, logprobs=logprobs)

  return jax.lax.while_loop(cond, body, state)


def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


def context_length(cfg: ModelConfig, adapter) -> int:
  """Positions available to prompt + answer (a prefix method's virtual tokens take the first ones)."""
  return cfg.max_position_embeddings - int(adapter.position_offset)


def check_prompts(cfg: ModelConfig, adapter, prompts: Sequence[np.ndarray],
                  names: Sequence[str] | None = None) -> None:
  """DataError naming the prompt that is empty or leaves no room to generate in the context."""
  ctx = context_length(cfg, adapter)
  for i, p in enumerate(prompts):
    name = names[i] if names else f"prompt {i + 1}"
    if len(p) == 0:
      raise DataError(f"{name}: the prompt is empty (no tokens)")
    if len(p) >= ctx:
      raise DataError(f"{name}: the prompt has {len(p)} tokens but the model's context is {ctx} "
                      "(max_position_embeddings); shorten it to leave room for the answer")


def generate(cfg: ModelConfig, adapter, params, prompts: Sequence[np.ndarray], *,
             max_new_tokens: int, sampling: Sampling = Sampling(), seed: int = 0,
             eos_ids: Sequence[int] = (), batch_size: int = 16,
             stop: Sequence[str] = (), detokenize: Callable[[np.ndarray], str] | None = None,
             names: Sequence[str] | None = None) -> list[Generation]:
  """Decodes every prompt (a list of token-id arrays) and returns one Generation per prompt.

  params: the decoder's tree for `adapter` (frozen and trainable merged). Rows stop at any of
  `eos_ids`, after max_new_tokens, at the end of the context, or, when `stop` strings and a
  `detokenize` function are given, once their text contains a stop string (checked every few
  tokens). Raises DataError for an empty prompt or one that fills the context.
  """
  if max_new_tokens < 1:
    raise ConfigError(f"max_new_tokens={max_new_tokens}: must be >= 1")
  if batch_size < 1:
    raise ConfigError(f"batch_size={batch_size}: must be >= 1")
  if stop and detokenize is None:
    raise ValueError("stop strings need a detokenize function")
  check_prompts(cfg, adapter, prompts, names)
  results: list[Generation] = []
  rows = min(batch_size, len(prompts))
  for start in range(0, len(prompts), rows):
    chunk = list(prompts[start:start + rows])
    results.extend(_generate_batch(cfg, adapter, params, chunk, start, rows, max_new_tokens,
                                   sampling, seed, tuple(int(e) for e in eos_ids), tuple(stop),
                                   detokenize))
  return results


def _generate_batch(cfg, adapter, params, prompts, first_index, batch_size, max_new, sampling,
                    seed, eos_ids, stop, detokenize) -> list[Generation]:
  n_real, B = len(prompts), batch_size
  # Rows beyond the prompts (a short last batch) repeat prompt 0 and start done, so every batch
  # has the same shape and the loop never waits for them.
  rows = prompts + [prompts[0]] * (B - n_real)
  longest = max(len(p) for p in rows)
  room = context_length(cfg, adapter) - longest
  if max_new > room:
    logging.warning("max_new_tokens=%d capped to %d: the longest prompt of this batch has %d "
                    "tokens of a %d-token context", max_new, room, longest,
                    context_length(cfg, adapter))
    max_new = room
  # Prompt lengths are bucketed so a stream of varied prompts compiles only a few shapes.
  P = _round_up(longest, 16)
  tokens = np.zeros((B, P), np.int32)
  segs = np.zeros((B, P), np.int32)
  positions = np.zeros((B, P), np.int32)
  for r, p in enumerate(rows):
    tokens[r, P - len(p):] = p
    segs[r, P - len(p):] = 1
    positions[r, P - len(p):] = np.arange(len(p))
  logits, cache = _prefill(cfg, adapter, params, tokens, positions, segs, P + max_new)
  replicate = _replicated_on(params)
  base_key = jax.random.key(seed)
  row_ids = jnp.arange(first_index, first_index + B, dtype=jnp.int32)
  done = np.arange(B) >= n_real
  state = {"logits": logits, "cache": cache,
           "pos": jnp.asarray([len(p) for p in rows], jnp.int32),
           "index": jnp.asarray(P, jnp.int32), "n": jnp.asarray(0, jnp.int32),
           "done": jnp.asarray(done), "length": jnp.zeros((B,), jnp.int32),
           "eos": jnp.zeros((B,), bool), "out": jnp.zeros((B, max_new), jnp.int32),
           "logprobs": jnp.zeros((B, max_new), jnp.float32),
           "keys": jax.vmap(jax.random.fold_in, (None, 0))(base_key, row_ids)}
  stopped = np.zeros(B, bool)
  # Without stop strings one call runs to the end; with them, the host looks at the text between
  # short chunks and marks the rows that reached a stop string as done.
  step = 16 if stop else max_new
  n = 0
  while n < max_new:
    n = min(n + step, max_new)
    state = _decode(cfg, adapter, sampling, eos_ids, params, state, jnp.asarray(n, jnp.int32),
                    replicate=replicate)
    if bool(np.all(np.asarray(state["done"]))):
      break
    if stop:
      out, length, done = jax.device_get((state["out"], state["length"], state["done"]))
      done = np.array(done)
      for r in range(n_real):
        if not done[r] and any(s in detokenize(out[r, :length[r]]) for s in stop):
          stopped[r] = done[r] = True
      state["done"] = jnp.asarray(done)
  out, length, hit_eos, logprobs = jax.device_get(
      (state["out"], state["length"], state["eos"], state["logprobs"]))
  results = []
  for r in range(n_real):
    ids = np.asarray(out[r, :length[r]])
    if hit_eos[r]:
      finish = "eos"
    elif stopped[r] or (stop and any(s in detokenize(ids) for s in stop)):
      finish = "stop"
    else:
      finish = "length"
    # The end token was chosen at slot `length` (and not counted in it).
    end = float(logprobs[r, length[r]]) if hit_eos[r] else None
    end_id = int(out[r, length[r]]) if hit_eos[r] else None
    results.append(Generation(ids, finish, np.asarray(logprobs[r, :length[r]]), end, end_id))
  return results


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
  """`text` up to (not including) the earliest occurrence of any stop string."""
  cut = len(text)
  for s in stop:
    i = text.find(s) if s else -1
    if i >= 0:
      cut = min(cut, i)
  return text[:cut]
