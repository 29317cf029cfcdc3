"""Quantizing a model's base: which leaves, their shardings, and init/quantization one kernel at a
time so that the whole float model never exists beside the quantized one.

Quantized: the decoder layers' linear kernels, `layers/{q,k,v,o,gate,up,down}_proj/kernel`
[L, in, out]. Norms, biases, embeddings and lm_head stay float.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxft.quant.int8 import quantize_int8
from jaxft.quant.nf4 import quantize_nf4
from jaxft.quant.qtensor import QTensor, is_quantized, materialize

KINDS = ("none", "int8", "nf4")


def quantize(w: jax.Array, kind: str = "nf4", **kw) -> QTensor:
  """Quantizes a float kernel [..., in, out] (one layer [in, out] or a stack [L, in, out]).

  kind="nf4" takes `block` (64), `double_quant` (True) and `dq_block` (256); "int8" takes none.
  Traceable (use it inside jit, per layer slice as tensors arrive, and stack the results with
  `stack`). Raises ValueError for an unknown kind or a kernel of fewer than 2 dims."""
  if kind == "nf4":
    return quantize_nf4(w, **kw)
  if kind == "int8":
    if kw:
      raise ValueError(f"int8 quantization takes no options; got {sorted(kw)}")
    return quantize_int8(w)
  raise ValueError(f"unknown quantization kind {kind!r}; expected int8 or nf4")


def dequantize(q, dtype=None) -> jax.Array:
  """The float array a quantized tensor stands for, in `dtype` (default: the dtype quantized)."""
  if not is_quantized(q):
    raise TypeError(f"dequantize expects a quantized tensor; got {type(q).__name__}")
  return q.dequantize(dtype)


def stack(qs) -> QTensor:
  """Stacks quantized layer slices [in, out] (same kind and options) into one [L, in, out]."""
  return jax.tree.map(lambda *xs: jnp.stack(xs), *qs)


def shardings_for(kind: str, shape, dtype, sharding, **kw) -> QTensor:
  """NamedShardings of the children of `quantize(w, kind, **kw)` for a float kernel of `shape`
  and `dtype` placed with `sharding` (a NamedSharding over the kernel's [..., in, out] axes);
  returned as the quantized node with a sharding per child (usable as jit out_shardings or for
  `jax.make_array_from_callback` per child)."""
  abstract = jax.eval_shape(lambda w: quantize(w, kind, **kw), jax.ShapeDtypeStruct(shape, dtype))
  return abstract.child_shardings(sharding)


def leaf_shardings(abstract: QTensor, sharding) -> QTensor:
  """NamedShardings of the children of a quantized (or abstract quantized) value, from the
  sharding of the float kernel it stands for (`QTensor.child_shardings`)."""
  return abstract.child_shardings(sharding)


def dequantize_tree(tree, dtype=None):
  """The tree with every quantized node replaced by its float array (e.g. for export)."""
  return jax.tree.map(lambda x: materialize(x, x.dtype if dtype is None else dtype)
                      if is_quantized(x) else x, tree, is_leaf=is_quantized)


def bits_per_param(q: QTensor) -> float:
  """Stored bits per logical parameter, from the bytes of the node's arrays."""
  return 8.0 * q.nbytes / q.size
