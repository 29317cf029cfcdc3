"""Long rows: the tiled MLP, attention in query chunks, and context parallelism (`mesh.context`).

Tiled MLP (model.mlp_tile): the MLP runs over slices of the row under `lax.map`, each slice inside
`jax.checkpoint`, so only one slice's [tokens, intermediate] activations exist at a time, in the
forward and again in the backward (which recomputes the slice). Same numbers as the whole MLP.

Query chunks: on a row of at least LONG_ROW queries (per chip), plain attention runs ATTN_CHUNK
queries at a time (lax.map, each chunk recomputed in the backward) and builds each chunk's causal,
same-segment mask from token indices, so neither the [T, T] scores nor the [T, T] mask exist.

Context parallelism: a row's tokens are split over the `context` mesh axis. The decoder puts each
row in zigzag order first (`to_zigzag`): with n chips and the row cut into 2n chunks, chip i holds
chunks i and 2n-1-i, so every chip has the same causal work. Attention runs under `shard_map`:
each chip all-gathers the keys and values of its rows over `context` (their gradient is the
reduce-scatter back) and attends its own queries; the queries of chunk i (i < n) see only keys of
the first half of the row, so they attend only the first half (a quarter of the scores skipped, the
same quarter on every chip). Everything else in a layer is per token (GSPMD keeps it on the
chip); the hidden states go back to row order (`from_zigzag`) before the loss, so the loss and its
normalisation by the batch's target tokens are as on one chip.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from jaxft import target
from jaxft.errors import ConfigError

# Rows with at least this many queries on a chip attend in chunks of ATTN_CHUNK queries. Below it
# the decoder's own path is faster (it skips the masked upper triangle in up to 8 query blocks;
# measured 12.5 s against 35 s for a tiny model's step at 8,192 tokens on CPU) and its [T, T]
# mask and scores still fit (1 GiB of float32 bias at 16K).
LONG_ROW = 16384
ATTN_CHUNK = 1024
_BATCH = ("data", "fsdp")


def context_size() -> int:
  """Chips a row is split over in the step being traced (the activation mesh's `context`)."""
  mesh = target.current_mesh()
  return 1 if mesh is None else int(dict(mesh.shape).get("context", 1))


def check_length(T: int, n: int) -> None:
  """ConfigError unless rows of T tokens split into 2n equal chunks (the zigzag order)."""
  if T % (2 * n):
    raise ConfigError(f"config.mesh.context={n}: rows of {T} tokens do not split into 2 * {n} "
                      f"equal chunks; make data.max_len a multiple of {2 * n}")


def zigzag_order(T: int, n: int) -> np.ndarray:
  """The row-order index of each token in zigzag order: chip i holds chunks i and 2n-1-i."""
  c = T // (2 * n)
  chunks = [k for i in range(n) for k in (i, 2 * n - 1 - i)]
  return np.concatenate([np.arange(k * c, (k + 1) * c) for k in chunks]).astype(np.int32)


def _rows(mesh, B: int):
  axes = tuple(a for a in _BATCH if mesh.shape[a] > 1)
  return axes if axes and B % int(np.prod([mesh.shape[a] for a in axes])) == 0 else None


def _move(x, n: int, source: Callable[[int, int], tuple[int, int]]):
  """Inside shard_map: this chip's [b, 2c, ...] as two chunks; slot s of chip d becomes slot
  source(d, s)[1] of chip source(d, s)[0] (one ppermute per pair of slots)."""
  c = x.shape[1] // 2
  slots = (x[:, :c], x[:, c:])
  out = []
  for s in range(2):
    got = None
    for t in range(2):
      pairs = [(source(d, s)[0], d) for d in range(n) if source(d, s)[1] == t]
      if pairs:
        r = jax.lax.ppermute(slots[t], "context", pairs)
        got = r if got is None else got + r  # a chip receives from one slot: the other is zeros
    out.append(got)
  return jnp.concatenate(out, axis=1)


def _zig_source(n):  # zigzag chip d slot s holds chunk m, which row order keeps on chip m//2
  def source(d, s):
    m = d if s == 0 else 2 * n - 1 - d
    return m // 2, m % 2
  return source


def _row_source(n):  # row-order chip d slot s holds chunk 2d+s, which zigzag keeps at:
  def source(d, s):
    m = 2 * d + s
    return (m, 0) if m < n else (2 * n - 1 - m, 1)
  return source


def _permuted(x, source_of):
  mesh = target.current_mesh()
  n = mesh.shape["context"]
  spec = P(_rows(mesh, x.shape[0]), "context")
  fn = jax.shard_map(lambda a: _move(a, n, source_of(n)), mesh=mesh, in_specs=spec,
                     out_specs=spec, check_vma=False)
  return fn(x)


def to_zigzag(x):
  """x [B, T, ...] in row order, split over `context` -> the same tokens in zigzag order."""
  return _permuted(x, _zig_source)


def from_zigzag(x):
  """The inverse of `to_zigzag`."""
  return _permuted(x, _row_source)


def _chunked(core, mask_of, q, k, v, qi, qs, ki, ks):
  """core(q, k, v, mask) over chunks of ATTN_CHUNK queries when q is long (each chunk's mask from
  mask_of(q_idx, q_seg, kv_idx, kv_seg), the chunk recomputed in the backward), else at once."""
  B, T = q.shape[:2]
  if T < LONG_ROW or T % ATTN_CHUNK:
    return core(q, k, v, mask_of(qi, qs, ki, ks))
  n = T // ATTN_CHUNK
  split = lambda a: jnp.moveaxis(a.reshape(B, n, ATTN_CHUNK, *a.shape[2:]), 1, 0)

  @jax.checkpoint
  def one(xs):
    qc, ic, sc = xs
    return core(qc, k, v, mask_of(ic, sc, ki, ks))

  out = jax.lax.map(one, (split(q), split(qi), split(qs)))
  return jnp.moveaxis(out, 0, 1).reshape(B, T, *out.shape[3:])


def attention(core, mask_of, q, k, v, index, segment_ids):
  """Plain (causal, same-segment) attention of q [B,T,H,hd], k/v [B,T,K,hd] -> [B,T,H*hd].

  core(q, k, v, mask [B,Tq,S]) attends; mask_of(q_idx, q_seg, kv_idx, kv_seg) builds the mask
  from row-order token indices `index` [B, T] and segment ids. On a mesh with context > 1 (tokens
  in zigzag order) each chip attends its queries against the all-gathered keys; else long rows
  attend in query chunks."""
  n = context_size()
  if n == 1:
    return _chunked(core, mask_of, q, k, v, index, segment_ids, index, segment_ids)
  mesh = target.current_mesh()
  B, K = q.shape[0], k.shape[2]
  rows = _rows(mesh, B)
  heads = "tensor" if mesh.shape["tensor"] > 1 and K % mesh.shape["tensor"] == 0 else None
  spec, ids = P(rows, "context", heads), P(rows, "context")

  def local(q, k, v, qi, qs):
    gather = lambda a: jax.lax.all_gather(a, "context", axis=1, tiled=True)
    k, v, ki, ks = gather(k), gather(v), gather(qi), gather(qs)
    b, S = k.shape[:2]
    c = q.shape[1] // 2
    # Chunk i < n of the row: only the first half's keys (every chip's first slot) can be seen.
    first = lambda a: a.reshape(b, n, 2, S // (2 * n), *a.shape[2:])[:, :, 0].reshape(
        b, S // 2, *a.shape[2:])
    lo = _chunked(core, mask_of, q[:, :c], first(k), first(v), qi[:, :c], qs[:, :c], first(ki),
                  first(ks))
    hi = _chunked(core, mask_of, q[:, c:], k, v, qi[:, c:], qs[:, c:], ki, ks)
    return jnp.concatenate([lo, hi], axis=1)

  out = jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec, ids, ids),
                      out_specs=P(rows, "context", heads), check_vma=False)(
      q, k, v, index, segment_ids)
  return out.reshape(*out.shape[:2], -1)


def tiled_mlp(mlp, h, tile: int, rng):
  """mlp(h_slice, rng) over slices of at most `tile` tokens of h [B, T, D] (of each chip's part
  of the row under context parallelism), each slice recomputed in the backward. The slice length
  is the largest divisor of the tokens per chip up to `tile`; a slice's dropout key is `rng`
  folded with the slice's number."""
  B, T, D = h.shape
  n = context_size()
  local = T // n
  t = max(d for d in range(1, min(tile, local) + 1) if local % d == 0)
  m = local // t
  if m == 1:
    return mlp(h, rng)
  xs = h.reshape(B, n, m, t, D).transpose(2, 0, 1, 3, 4)  # [m, B, n, t, D]: chips keep theirs

  @jax.checkpoint
  def one(args):
    x, i = args
    r = None if rng is None else jax.random.fold_in(rng, i)
    out = mlp(x.reshape(B, n * t, D), r)
    return out.reshape(B, n, t, out.shape[-1])

  out = jax.lax.map(one, (xs, jnp.arange(m)))
  return out.transpose(1, 2, 0, 3, 4).reshape(B, T, out.shape[-1])
