"""8-bit blockwise quantization with the dynamic data type: QLoRA's double quantization.

QLoRA stores the float32 absmax of every 64-value NF4 block in 8 bits: subtract the mean of the
tensor's absmax values, then quantize blockwise (blocks of 256) with the signed 8-bit "dynamic"
code of Dettmers (2016) that bitsandbytes uses (`quantize_blockwise`, its default code), keeping
one float32 absmax per 256 block. That costs 8/64 + 32/(64*256) ~= 0.127 bits per parameter
instead of 32/64 = 0.5.

Layout (departure from bitsandbytes, for sharding): the scales form a matrix [..., in/64, out] and
the 256-blocks run along `out`, so every block belongs to one column range and sharding `out`
(tensor parallel) or `in` (fsdp) keeps codes, scales and their scales on the same device.
bitsandbytes runs its 256-blocks over the flattened [out, in/64] order. Both quantize 256 absmax
values per block with the same code; the error bound is the same.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxft.quant.qtensor import QTensor, bucket, block_max, expand_blocks


def _dynamic_code() -> np.ndarray:
  """The 256 values of bitsandbytes' `create_dynamic_map(signed=True)` (7 exponent bits): for
  each decade 10^-6..10^0 the midpoints of a linear grid on [0.1, 1], both signs, plus 0 and 1.
  Equal to bitsandbytes' table to within one float32 ulp (torch's linspace rounds differently)."""
  data = []
  for i in range(7):
    grid = np.linspace(0.1, 1.0, 2 ** i + 1, dtype=np.float32)
    means = ((grid[:-1] + grid[1:]) / np.float32(2)).astype(np.float64)
    data += (10.0 ** (i - 6) * means).tolist()
    data += (-(10.0 ** (i - 6)) * means).tolist()
  data += [0.0, 1.0]
  assert len(data) == 256
  return np.asarray(sorted(data), np.float32)


DYNAMIC_CODE = _dynamic_code()
_BOUNDS = (DYNAMIC_CODE[:-1] + DYNAMIC_CODE[1:]) / np.float32(2)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, eq=False)
class Blockwise8(QTensor):
  """x [..., R, C] ~= DYNAMIC_CODE[codes] * absmax (per block of `block` along C) + offset.

  codes uint8 [..., R, C]; absmax float32 [..., R, ceil(C/block)]; offset float32 [...] (the mean
  over the trailing two dims, one per leading index, e.g. per layer)."""
  codes: jax.Array
  absmax: jax.Array
  offset: jax.Array
  block: int = dataclasses.field(default=256, metadata=dict(static=True))

  _AXES = {"codes": (-2, -1), "absmax": (-2, -1), "offset": ()}
  kind = "blockwise8"

  @property
  def shape(self):
    return tuple(self.codes.shape)

  def dequantize(self, dtype=jnp.float32) -> jax.Array:
    scale = expand_blocks(self.absmax, self.block, -1, self.codes.shape[-1])
    x = jnp.take(jnp.asarray(DYNAMIC_CODE), self.codes.astype(jnp.int32), axis=0) * scale
    return (x + self.offset[..., None, None]).astype(dtype)


def quantize_blockwise8(x: jax.Array, block: int = 256) -> Blockwise8:
  """Quantizes a float matrix [..., R, C] (the NF4 block absmax values) to `Blockwise8`.

  The mean over the trailing two dims is subtracted first (bitsandbytes' `offset`); values are
  scaled by 1/absmax of their block, clamped to [-1, 1] and rounded to the nearest code."""
  x = x.astype(jnp.float32)
  offset = jnp.mean(x, axis=(-2, -1))
  y = x - offset[..., None, None]
  absmax = block_max(y, block, -1)
  inv = 1.0 / jnp.maximum(absmax, 1e-38)
  scaled = jnp.clip(y * expand_blocks(inv, block, -1, y.shape[-1]), -1.0, 1.0)
  return Blockwise8(bucket(scaled, _BOUNDS), absmax, offset, block)
