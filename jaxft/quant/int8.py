"""int8: symmetric absmax quantization per output channel (LLM.int8()'s weight format, without
the outlier decomposition): w[:, j] ~= codes[:, j] * absmax_j / 127.

Layout: codes int8 [..., in, out], scale float32 [..., out] (8 + 32/in bits per parameter)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxft.quant.qtensor import QTensor


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, eq=False)
class Int8Tensor(QTensor):
  """An int8 kernel [..., in, out] with one float32 scale per output column."""
  codes: jax.Array
  scale: jax.Array
  dtype: str = dataclasses.field(default="float32", metadata=dict(static=True))

  _AXES = {"codes": (-2, -1), "scale": (-1,)}
  kind = "int8"

  @property
  def shape(self):
    return tuple(self.codes.shape)

  def dequantize(self, dtype=None) -> jax.Array:
    """codes * scale (float32), cast to `dtype` (default: the dtype that was quantized)."""
    w = self.codes.astype(jnp.float32) * self.scale[..., None, :]
    return w.astype(self.dtype if dtype is None else dtype)


def quantize_int8(w: jax.Array) -> Int8Tensor:
  """Quantizes a float kernel [..., in, out]: scale_j = max_i |w_ij| / 127, codes rounded to
  nearest (an all-zero column gets scale 0 and zero codes)."""
  if w.ndim < 2:
    raise ValueError(f"int8 quantizes kernels [..., in, out]; got shape {tuple(w.shape)}")
  w32 = w.astype(jnp.float32)
  scale = jnp.max(jnp.abs(w32), axis=-2) / 127.0
  q = jnp.round(w32 / jnp.where(scale > 0, scale, 1.0)[..., None, :])
  return Int8Tensor(jnp.clip(q, -127, 127).astype(jnp.int8), scale, jnp.dtype(w.dtype).name)
