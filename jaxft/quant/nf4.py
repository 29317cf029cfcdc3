"""NF4 (4-bit NormalFloat, QLoRA): blockwise absmax scaling onto 16 normal quantiles.

Codes equal bitsandbytes' `quantize_4bit(W, quant_type="nf4", blocksize=64)` for a torch weight
W [out, in]: our kernel is W.T, [in, out], and bitsandbytes' blocks of 64 consecutive values of the
row-major [out, in] weight run along `in`, so here a block is 64 consecutive rows of one column.
Values are scaled by 1/absmax of their block, clamped to [-1, 1] and rounded to the nearest code,
ties to the lower code, exactly as bitsandbytes does. Two codes share a byte, the first (even
`in` index) in the high nibble, as in bitsandbytes.

Layout: codes uint8 [..., ceil(in/2), out], block scales [..., ceil(in/64), out] (float32, or
`Blockwise8` with double quantization). `in` need not be a multiple of 64 (the last block is
short; bitsandbytes would run such a block across rows instead).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxft.quant.blockwise8 import Blockwise8, quantize_blockwise8
from jaxft.quant.qtensor import QTensor, block_max, bucket, expand_blocks, lookup, materialize

# bitsandbytes' get_4bit_type("nf4"): quantiles of N(0, 1) scaled to [-1, 1], with an exact 0.
NF4_CODE = np.asarray([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0], np.float32)
_BOUNDS = (NF4_CODE[:-1] + NF4_CODE[1:]) / np.float32(2)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, eq=False)
class NF4Tensor(QTensor):
  """An NF4 kernel [..., in, out]: packed codes and per-block absmax (see the module docstring)."""
  codes: jax.Array
  scale: jax.Array | Blockwise8
  block: int = dataclasses.field(default=64, metadata=dict(static=True))
  odd: bool = dataclasses.field(default=False, metadata=dict(static=True))
  dtype: str = dataclasses.field(default="float32", metadata=dict(static=True))

  _AXES = {"codes": (-2, -1), "scale": (-2, -1)}
  kind = "nf4"

  @property
  def shape(self):
    *lead, half, out = self.codes.shape
    return (*lead, 2 * half - int(self.odd), out)

  def unpacked_codes(self) -> jax.Array:
    """The 4-bit codes as uint8 [..., in, out]."""
    *lead, half, out = self.codes.shape
    q = jnp.stack([self.codes >> 4, self.codes & 0xF], axis=-2).reshape(*lead, 2 * half, out)
    return q[..., :2 * half - int(self.odd), :]

  def dequantize(self, dtype=None) -> jax.Array:
    """NF4_CODE[codes] * block absmax, in `dtype` (default: the dtype that was quantized). The
    product is float32, as in bitsandbytes, then cast."""
    q = self.unpacked_codes()
    absmax = materialize(self.scale, jnp.float32)
    w = lookup(q, NF4_CODE)  # fused selects, not a gather (see qtensor.lookup)
    w = w * expand_blocks(absmax, self.block, -2, q.shape[-2])
    return w.astype(self.dtype if dtype is None else dtype)


def quantize_nf4(w: jax.Array, block: int = 64, double_quant: bool = True,
                 dq_block: int = 256) -> NF4Tensor:
  """Quantizes a float kernel [..., in, out] (blocks of `block` along `in`) to NF4.

  double_quant: store the block absmax values as `Blockwise8` (8-bit, blocks of `dq_block`,
  mean subtracted), as QLoRA does; else as float32. Leading dims are kept (a stacked [L, in, out]
  kernel quantizes each layer independently, as bitsandbytes would each layer's weight)."""
  if w.ndim < 2:
    raise ValueError(f"NF4 quantizes kernels [..., in, out]; got shape {tuple(w.shape)}")
  w32 = w.astype(jnp.float32)
  n = w.shape[-2]
  absmax = block_max(w32, block, -2)
  inv = 1.0 / jnp.maximum(absmax, 1e-38)
  scaled = jnp.clip(w32 * expand_blocks(inv, block, -2, n), -1.0, 1.0)
  q = bucket(scaled, _BOUNDS)
  if n % 2:
    q = jnp.pad(q, [(0, 0)] * (q.ndim - 2) + [(0, 1), (0, 0)])
  packed = (q[..., 0::2, :] << 4) | q[..., 1::2, :]
  scale = quantize_blockwise8(absmax, dq_block) if double_quant else absmax
  return NF4Tensor(packed, scale, block, bool(n % 2), jnp.dtype(w.dtype).name)
