"""GGUF block quantizers the `gguf` package lacks: Q4_K and Q6_K (it can only dequantize them).

Written from the block layouts ggml defines (256 values per super-block, QK_K):

  Q4_K (144 bytes): d (f16), dmin (f16), 12 bytes of 6-bit scales and mins for 8 sub-blocks of
    32, then 128 bytes of 4-bit codes; value = d * scale[j] * q - dmin * min[j], q in 0..15.
    The 6-bit pairs pack as: bytes 0-3 = scale[0:4] | (scale[4:8] >> 4) << 6, bytes 4-7 the same
    for the mins, bytes 8-11 = (scale[4:8] & 15) | (min[4:8] & 15) << 4. Codes: 32-byte chunk c
    holds sub-block 2c in its low nibbles and 2c+1 in its high nibbles.
  Q6_K (210 bytes): 128 bytes of low 4 bits, 64 bytes of high 2 bits, 16 int8 scales (one per 16
    values), d (f16); value = d * scale[j] * (q - 32), q in 0..63. Each half of 128 values has
    64 low-bit bytes (value 32k + l: byte 32(k % 2) + l, nibble k // 2) and 32 high-bit bytes
    (value 32k + l: byte l, bits 2k..2k+1).

The codes are chosen by rounding against the stored (f16 / 6-bit / int8) scales, so what a
reader dequantizes is what was rounded to. llama.cpp's own quantizers search scales iteratively
(a little lower error); files written here are read by any GGUF reader alike.
"""

from __future__ import annotations

import numpy as np

QK_K = 256
BLOCK_BYTES = {"Q4_K": 144, "Q6_K": 210}


def _blocks(x: np.ndarray) -> np.ndarray:
  x = np.asarray(x, np.float32)
  if x.shape[-1] % QK_K:
    raise ValueError(f"K-quants need rows that are a multiple of {QK_K} values, got {x.shape}")
  return x.reshape(-1, QK_K)


def _f16(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """x as float16 bytes, and the float32 value a reader gets back."""
  h = x.astype(np.float16)
  return h.view(np.uint8).reshape(len(x), 2), h.astype(np.float32)


def quantize_q4_k(x: np.ndarray) -> np.ndarray:
  """x [..., n] float (n a multiple of 256) -> uint8 [..., n / 256 * 144] in Q4_K blocks."""
  shape = x.shape
  b = _blocks(x).reshape(-1, 8, 32)
  lo = np.minimum(b.min(axis=-1), 0.0)      # the offset is a non-negative min, as ggml's
  hi = np.maximum(b.max(axis=-1), lo)
  scale = (hi - lo) / 15.0                  # [n, 8]
  mins = -lo
  d_bytes, d = _f16(scale.max(axis=-1) / 63.0)
  m_bytes, dmin = _f16(mins.max(axis=-1) / 63.0)
  with np.errstate(divide="ignore", invalid="ignore"):
    sc = np.where(d[:, None] > 0, np.rint(scale / d[:, None]), 0)
    mn = np.where(dmin[:, None] > 0, np.rint(mins / dmin[:, None]), 0)
  sc = np.clip(sc, 0, 63).astype(np.uint8)
  mn = np.clip(mn, 0, 63).astype(np.uint8)
  step = d[:, None] * sc                    # what a reader multiplies by
  offset = dmin[:, None] * mn
  with np.errstate(divide="ignore", invalid="ignore"):
    q = np.where(step[..., None] > 0, np.rint((b + offset[..., None]) / step[..., None]), 0)
  q = np.clip(q, 0, 15).astype(np.uint8)    # [n, 8, 32]
  packed = np.concatenate([
      sc[:, :4] | ((sc[:, 4:] >> 4) << 6),
      mn[:, :4] | ((mn[:, 4:] >> 4) << 6),
      (sc[:, 4:] & 15) | ((mn[:, 4:] & 15) << 4)], axis=1)
  q = q.reshape(-1, 4, 2, 32)
  qs = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(-1, 128)
  out = np.concatenate([d_bytes, m_bytes, packed, qs], axis=1)
  return out.reshape(*shape[:-1], shape[-1] // QK_K * BLOCK_BYTES["Q4_K"])


def quantize_q6_k(x: np.ndarray) -> np.ndarray:
  """x [..., n] float (n a multiple of 256) -> uint8 [..., n / 256 * 210] in Q6_K blocks."""
  shape = x.shape
  b = _blocks(x).reshape(-1, 16, 16)
  amax = np.abs(b).max(axis=-1)             # [n, 16]
  scale = amax / 31.0
  d_bytes, d = _f16(scale.max(axis=-1) / 127.0)
  with np.errstate(divide="ignore", invalid="ignore"):
    sc = np.where(d[:, None] > 0, np.rint(scale / d[:, None]), 0)
  sc = np.clip(sc, -128, 127).astype(np.int8)
  step = d[:, None] * sc.astype(np.float32)
  with np.errstate(divide="ignore", invalid="ignore"):
    q = np.where(step[..., None] > 0, np.rint(b / step[..., None]), 0)
  q = (np.clip(q, -32, 31) + 32).astype(np.uint8).reshape(-1, 2, 4, 32)  # [n, half, k, l]
  low, high = q & 15, q >> 4
  ql = (low[:, :, 0:2] | (low[:, :, 2:4] << 4)).reshape(-1, 128)
  qh = (high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4)
        | (high[:, :, 3] << 6)).reshape(-1, 64)
  out = np.concatenate([ql, qh, sc.view(np.uint8), d_bytes], axis=1)
  return out.reshape(*shape[:-1], shape[-1] // QK_K * BLOCK_BYTES["Q6_K"])
