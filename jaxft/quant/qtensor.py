"""What every quantized tensor is: a registered pytree node over plain arrays.

A quantized tensor stands for a logical float array [..., rows, cols] (a kernel [.., in, out]).
Its children (codes, scales) are plain arrays that all keep the logical array's leading dims, so
`lax.scan` over a stacked [L, in, out] kernel slices every child along axis 0 and hands the body
the quantized layer. Static metadata (aux data) holds only what slicing leading dims cannot change
(block sizes, the original dtype); shapes are derived from the children, so the same node type
describes one layer or a stack of them.

Each subclass is a frozen dataclass registered with `jax.tree_util.register_dataclass`, lists its
array fields in `_AXES` (which trailing axes of the logical [rows, cols] matrix each child's
trailing axes follow, for sharding) and implements `dequantize(dtype)` and `shape`.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P


class QTensor:
  """Base of the quantized tensor nodes (see the module docstring)."""

  # child name -> for each trailing axis of the child, the logical axis it follows (-2 = rows,
  # -1 = cols) or None (never sharded). Children also carry the logical array's leading dims.
  _AXES: dict[str, tuple[int | None, ...]] = {}
  kind: str = ""

  def dequantize(self, dtype=None) -> jax.Array:
    raise NotImplementedError

  @property
  def shape(self) -> tuple[int, ...]:
    raise NotImplementedError

  @property
  def ndim(self) -> int:
    return len(self.shape)

  @property
  def size(self) -> int:
    """Number of logical parameters (what a float array of `shape` would hold)."""
    return math.prod(self.shape)

  @property
  def nbytes(self) -> int:
    """Bytes of the stored children (what the device holds)."""
    return sum(int(math.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(self))

  def children(self) -> dict:
    return {f: getattr(self, f) for f in self._AXES}

  def child_shardings(self, sharding: NamedSharding) -> "QTensor":
    """The node with a NamedSharding per child, from the sharding of the logical array.

    Leading dims keep the logical array's partitioning; a trailing child axis follows the logical
    axis it blocks (codes and scales of one column stay on one device, so dequantization needs no
    communication), or is replicated when the mesh axis does not divide it. Works on a node of
    arrays or of ShapeDtypeStructs (e.g. from `jax.eval_shape`).
    """
    mesh = sharding.mesh
    lead = self.ndim - 2
    spec = tuple(sharding.spec) + (None,) * (self.ndim - len(sharding.spec))
    out = {}
    for name, child in self.children().items():
      if isinstance(child, QTensor):
        out[name] = child.child_shardings(
            NamedSharding(mesh, _fit(spec, child.shape, mesh)))
        continue
      trailing = self._AXES[name]
      parts = list(spec[:lead]) + [None if a is None else spec[a] for a in trailing]
      out[name] = NamedSharding(mesh, _fit(parts, child.shape, mesh))
    return dataclasses.replace(self, **out)


def _fit(parts, shape, mesh) -> P:
  """A PartitionSpec for `shape`: each entry kept when its mesh axes divide that dim."""
  out = []
  for entry, dim in zip(parts, shape):
    if entry is None:
      out.append(None)
      continue
    axes = entry if isinstance(entry, tuple) else (entry,)
    size = math.prod(mesh.shape[a] for a in axes)
    out.append(entry if dim % size == 0 else None)
  return P(*out)


def is_quantized(x) -> bool:
  """True for a quantized tensor node (also one whose children are ShapeDtypeStructs)."""
  return isinstance(x, QTensor)


def materialize(w, dtype):
  """The float array `w` stands for, in `dtype`: dequantization for a quantized tensor, a cast for
  an array. (A model kernel that may be bit-cast to 16-bit integers goes through
  `jaxft.models.ops.weight`, which casts it back first.)"""
  if isinstance(w, QTensor):
    return w.dequantize(dtype)
  return w.astype(dtype)


def block_max(x: jax.Array, block: int, axis: int) -> jax.Array:
  """max |x| over blocks of `block` along `axis` (the last block may be short): the axis shrinks
  to ceil(n / block)."""
  axis = axis % x.ndim
  n = x.shape[axis]
  nb = -(-n // block)
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, nb * block - n)
  a = jnp.pad(jnp.abs(x), pad)
  a = a.reshape(*x.shape[:axis], nb, block, *x.shape[axis + 1:])
  return jnp.max(a, axis=axis + 1)


def expand_blocks(s: jax.Array, block: int, axis: int, n: int) -> jax.Array:
  """Inverse of `block_max`'s shrinking: repeats each block scale `block` times along `axis` and
  cuts to length n."""
  s = jnp.repeat(s, block, axis=axis)
  return jax.lax.slice_in_dim(s, 0, n, axis=axis)


def lookup(codes: jax.Array, table: np.ndarray) -> jax.Array:
  """table[codes] (float32, codes' shape) for a table of 2^k values and integer codes < 2^k.

  A tree of selects on the code bits (k levels, 2^k - 1 selects of constants), elementwise, so
  XLA fuses it into whatever reads the result. `jnp.take` from the table is a gather, which XLA's
  TPU backend does not fuse: it materialised int32 indices and float32 values of a whole kernel
  (two [in, out] buffers of 4 bytes per weight beside the 4-bit codes) for every dequantization."""
  n = len(table)
  if n & (n - 1):
    raise ValueError(f"lookup needs a table of 2^k values; got {n}")
  level = [np.float32(v) for v in table]
  bit = 0
  while len(level) > 1:
    on = ((codes >> bit) & 1).astype(bool)
    level = [jnp.where(on, level[i + 1], level[i]) for i in range(0, len(level), 2)]
    bit += 1
  return jnp.broadcast_to(jnp.asarray(level[0], jnp.float32), codes.shape)


def bucket(x: jax.Array, bounds: np.ndarray) -> jax.Array:
  """Index of the code nearest to x, given the 2^k - 1 sorted midpoints between 2^k codes: the
  number of midpoints strictly below x (torch.bucketize with right=False, which bitsandbytes uses,
  so a value exactly on a midpoint takes the lower code). uint8 of x's shape.

  A binary search of k elementwise steps (XLA fuses them; no [..., codes] temporary): each step
  adds `step` when the midpoint `step` places further is still below x."""
  n = len(bounds) + 1
  if n & (n - 1) or n > 256:
    raise ValueError(f"bucket needs 2^k <= 256 codes; got {n}")
  table = jnp.asarray(bounds, jnp.float32)
  step = n // 2
  idx = jnp.where(x > bounds[step - 1], step, 0).astype(jnp.int32)  # first step: a scalar bound
  step //= 2
  while step:
    idx = jnp.where(x > jnp.take(table, idx + step - 1), idx + step, idx)
    step //= 2
  return idx.astype(jnp.uint8)
