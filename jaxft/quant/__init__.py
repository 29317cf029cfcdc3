"""Quantized base weights (int8, NF4). See quant/ modules; `materialize` is what layers call."""

from __future__ import annotations

import jax.numpy as jnp


def materialize(w, dtype):
  """The float weight of `w` in `dtype`: a cast for arrays, dequantization for quantized leaves."""
  dq = getattr(w, "dequantize", None)
  if dq is not None:
    return dq(dtype)
  return w.astype(dtype)


KINDS = ("none", "int8", "nf4")


def quantize_base(base, kind: str, shardings):
  """Quantizes the base kernels of the decoder layers (norms, embeddings stay float)."""
  if kind == "none":
    return base
  raise NotImplementedError(f"model.quant={kind} is not built yet")
