"""Fused attention kernels for accelerators: TPU splash (flash) attention through Pallas.

`splash(q, k, v, segment_ids, window)` computes causal, same-segment (and sliding-window)
attention without ever forming the [T, S] scores: the kernel walks blocks of queries and keys,
skipping the blocks the causal mask empties, in the forward and in its own backward. It serves the
plain case of the decoder (no KV cache, no prefix keys; see llama.attention_impl). Grouped-query
attention runs as multi-query attention per key/value head, so keys are never repeated.

Pallas kernels are opaque to XLA's partitioner, so on a mesh (jaxft.target.activation_mesh) the
kernel runs under `shard_map`: rows split over the batch axes and key/value heads over `tensor`,
as the activations are laid out; each chip attends its own rows.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
from jax.sharding import PartitionSpec as P

from jaxft import target

# Query and key block of the kernels (forward and backward): 512 where the length allows (fewer
# grid steps; the blocks of q, k, v and the float32 accumulators stay within a few MiB of VMEM).
_BLOCKS = (512, 256, 128)
# The kernels' block tables (which key block comes next, which blocks the mask empties) sit in the
# chip's scalar memory (SMEM: 1 MiB on v5p), one 2-byte entry per pair of query and key blocks,
# so they grow with the square of the length: with 512-token blocks XLA refuses 393,216 tokens
# (768 x 768 entries, 1,179,648 bytes) and 524,288 (2,097,152). Longer rows take larger blocks,
# so that the tables stay within this share; the score tile computed at once stays 512 keys wide.
_SMEM_TABLE_BYTES = 512 * 1024
_COMPUTE = 512


def supported(T: int, head_dim: int) -> bool:
  """Whether the kernel takes sequences of length T and this head size."""
  return T % 128 == 0 and head_dim % 128 == 0


def _block(T: int) -> int:
  b = next(b for b in _BLOCKS if T % b == 0)
  while 2 * (T // b) ** 2 > _SMEM_TABLE_BYTES and T % (2 * b) == 0:
    b *= 2
  return b


class _CausalMask(sm.CausalMask):
  """The splash causal mask, with the blocks it does not cut filled whole.

  Building a kernel turns its mask into block tables on the host (numpy): every block of
  queries x keys is sliced from the mask and checked for being empty, full or cut. The library's
  causal mask computes each slice element by element, so building took 79 s at 131,072 tokens
  and grows with the square of the length (about 21 minutes at 524,288) before the first step.
  Here a block wholly below or above the diagonal is filled at once; the tables come out the same
  (tests/test_long_context.py)."""

  def __getitem__(self, idx) -> np.ndarray:
    q, kv = idx if len(idx) == 2 else (None, None)
    if isinstance(q, slice) and isinstance(kv, slice):
      q0, q1, qs = q.indices(self.shape[0])
      k0, k1, ks = kv.indices(self.shape[1])
      if qs == ks == 1 and q1 > q0 and k1 > k0:
        if q0 + self.offset >= k1 - 1:  # every query sees every key of the block
          return np.ones((q1 - q0, k1 - k0), np.bool_)
        if q1 - 1 + self.offset < k0:  # no query sees any
          return np.zeros((q1 - q0, k1 - k0), np.bool_)
    return super().__getitem__(idx)


@functools.lru_cache(maxsize=32)
def _kernel(T: int, groups: int, window: int | None):
  """The splash MQA kernel for `groups` query heads per key/value head, sequences of length T."""
  if window:
    one = sm.LocalMask((T, T), window_size=(window - 1, 0), offset=0)
  else:
    one = _CausalMask((T, T))
  b = _block(T)
  c = min(b, _COMPUTE)
  sizes = sk.BlockSizes(block_q=b, block_kv=b, block_kv_compute=c, block_q_dkv=b, block_kv_dkv=b,
                        block_kv_dkv_compute=c, block_q_dq=b, block_kv_dq=b)
  return sk.make_splash_mqa_single_device(mask=sm.MultiHeadMask([one] * groups),
                                          block_sizes=sizes)


def _local(q, k, v, seg, window):
  """q [B, K, G, T, hd] (already scaled), k/v [B, K, T, hd], seg [B, T] -> [B, K, G, T, hd]."""
  kernel = _kernel(q.shape[3], q.shape[2], window)

  def one(qb, kb, vb, sb):  # one row, one key/value head
    return kernel(qb, kb, vb, segment_ids=sk.SegmentIds(q=sb, kv=sb))

  per_head = jax.vmap(one, in_axes=(0, 0, 0, None))
  return jax.vmap(per_head, in_axes=(0, 0, 0, 0))(q, k, v, seg)


def splash(q, k, v, segment_ids, dtype, window: int | None = None):
  """q [B,T,H,hd], k/v [B,T,K,hd], segment_ids [B,T] (0 = padding) -> [B,T,H*hd] in `dtype`."""
  B, T, H, hd = q.shape
  K = k.shape[2]
  G = H // K
  scale = float(1.0 / np.sqrt(hd))
  qh = (q.astype(jnp.float32) * scale).astype(dtype)
  qh = qh.reshape(B, T, K, G, hd).transpose(0, 2, 3, 1, 4)
  kh = k.astype(dtype).transpose(0, 2, 1, 3)
  vh = v.astype(dtype).transpose(0, 2, 1, 3)
  seg = segment_ids.astype(jnp.int32)
  fn = functools.partial(_local, window=window)
  mesh = target.current_mesh()
  if mesh is not None and mesh.size > 1:
    rows = tuple(a for a in ("data", "fsdp") if mesh.shape[a] > 1) or None
    rows = rows if rows is None or B % int(np.prod([mesh.shape[a] for a in rows])) == 0 else None
    heads = "tensor" if mesh.shape["tensor"] > 1 and K % mesh.shape["tensor"] == 0 else None
    spec = P(rows, heads)
    fn = jax.shard_map(fn, mesh=mesh, in_specs=(spec, spec, spec, P(rows)), out_specs=spec,
                       check_vma=False)
  out = fn(qh, kh, vh, seg)
  return out.transpose(0, 3, 1, 2, 4).reshape(B, T, H * hd).astype(dtype)
