"""The decoder's custom-gradient ops and the CPU 16-bit packing they and the loss read.

Each op is a `jax.custom_vjp` whose backward keeps less than autodiff would (the stored kernel, not
a float copy; x, not float32 copies of it; flash attention's log-sum-exp, not the probabilities):
`rms_norm`, `swiglu`, `mixed_einsum`, `matmul` (a linear layer over a float, packed or quantized
kernel) and `softmax_attention`. `pack_16bit` / `pack_frozen` bit-cast 16-bit floats to integers so
that XLA's CPU backend scans and slices them natively; every reader casts back.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from jaxft import quant, target


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def rms_norm(x: jnp.ndarray, scale: jnp.ndarray, eps: float) -> jnp.ndarray:
  """x / rms(x) * scale over the last axis, computed in float32, returned in x's dtype.

  Custom VJP: the backward keeps x itself (in its own dtype, bit-cast when 16-bit) rather than
  autodiff's float32 copies of x and of the normalised x, and recomputes the rest."""
  return _rms_norm_fwd(x, scale, eps)[0]


def _rms_norm_fwd(x, scale, eps):
  x32 = x.astype(jnp.float32)
  x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return (x32 * scale.astype(jnp.float32)).astype(x.dtype), (pack_16bit(x), scale)


def _rms_norm_bwd(eps, res, g):
  x, scale = res
  x = unpack_16bit(x)
  x32 = x.astype(jnp.float32)
  r = jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  xhat = x32 * r
  g32 = g.astype(jnp.float32)
  dscale = jnp.sum(g32 * xhat, axis=tuple(range(x.ndim - 1))).astype(scale.dtype)
  dxhat = g32 * scale.astype(jnp.float32)
  dx = r * (dxhat - xhat * jnp.mean(dxhat * xhat, axis=-1, keepdims=True))
  return dx.astype(x.dtype), dscale


rms_norm.defvjp(_rms_norm_fwd, _rms_norm_bwd)


@jax.custom_vjp
def swiglu(gate: jnp.ndarray, up: jnp.ndarray) -> jnp.ndarray:
  """silu(gate) * up in float32, returned in gate's dtype; the backward keeps gate and up only
  (bit-cast when 16-bit) instead of autodiff's several activation-sized intermediates."""
  return _swiglu_fwd(gate, up)[0]


def _swiglu_fwd(gate, up):
  a = gate.astype(jnp.float32)
  out = (a * jax.nn.sigmoid(a) * up.astype(jnp.float32)).astype(gate.dtype)
  return out, pack_16bit((gate, up))


def _swiglu_bwd(res, g):
  gate, up = unpack_16bit(res)
  a, b, g32 = gate.astype(jnp.float32), up.astype(jnp.float32), g.astype(jnp.float32)
  sig = jax.nn.sigmoid(a)
  da = g32 * b * sig * (1.0 + a * (1.0 - sig))
  return da.astype(gate.dtype), (g32 * a * sig).astype(up.dtype)


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 3))
def mixed_einsum(spec: str, a: jnp.ndarray, b: jnp.ndarray, out_dtype=None) -> jnp.ndarray:
  """A two-operand einsum in the operands' dtype (both the same) with float32 accumulation,
  returning `out_dtype` (default: the operands'); its backward rounds the cotangent to the
  operands' dtype and runs its dots in that dtype, accumulating in float32.

  With plain `einsum(..., preferred_element_type=float32).astype(bf16)` the transpose of the cast
  hands the dots a float32 cotangent, so every backward dot runs in float32 with an upcast copy of
  its bf16 operand: about 3x slower on CPU and 2x the memory traffic on accelerators. Every index of
  an operand must appear in the other operand or in the output (true of matmuls and attention).
  """
  out = jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)
  return out.astype(out_dtype or a.dtype)


def _mixed_einsum_fwd(spec, a, b, out_dtype):
  return mixed_einsum(spec, a, b, out_dtype), (a, b)


def _mixed_einsum_bwd(spec, out_dtype, res, g):
  a, b = res
  (sa, sb), out = spec.split("->")[0].split(","), spec.split("->")[1]
  g = g.astype(a.dtype)
  da = jnp.einsum(f"{out},{sb}->{sa}", g, b, preferred_element_type=jnp.float32)
  db = jnp.einsum(f"{sa},{out}->{sb}", a, g, preferred_element_type=jnp.float32)
  return da.astype(a.dtype), db.astype(b.dtype)


mixed_einsum.defvjp(_mixed_einsum_fwd, _mixed_einsum_bwd)


def matmul(x: jnp.ndarray, w, dtype) -> jnp.ndarray:
  """x[..., in] @ w[in, out] in `dtype` with float32 accumulation (fast on CPU and accelerators);
  the backward's dots run in `dtype` too (see `mixed_einsum`).

  w: a float array, a 16-bit kernel packed by `pack_16bit`, or a quantized kernel (jaxft.quant).
  It is made a `dtype` array inside a custom VJP, so the backward keeps the stored kernel (a scan's
  own slice, or the quantized codes) and redoes the cast or dequantization, instead of saving a
  float copy of every layer's weights. Only a float w gets a gradient."""
  dtype = jnp.dtype(dtype)
  return checkpoint_name(_linear(x.astype(dtype), w, dtype), "linear")


def ragged_matmul(x: jnp.ndarray, w, group_sizes: jnp.ndarray, dtype) -> jnp.ndarray:
  """Grouped matmul of the mixture-of-experts layer: rows x [M, in] sorted by group, group g's
  `group_sizes[g]` rows times w[g] ([G, in, out]: float, packed or quantized), in `dtype` with
  float32 accumulation (`jax.lax.ragged_dot`). Plain autodiff: only a float w gets a gradient."""
  dtype = jnp.dtype(dtype)
  y = jax.lax.ragged_dot(x.astype(dtype), weight(w, dtype), group_sizes,
                         preferred_element_type=jnp.float32)
  return checkpoint_name(y.astype(dtype), "linear")


def weight(w, dtype):
  """The float weight of a stored kernel in `dtype`: dequantized when quantized (jaxft.quant),
  cast back first when it is a 16-bit float kernel bit-cast to integers (`pack_16bit`)."""
  return quant.materialize(w if quant.is_quantized(w) else unpack_16bit(w), dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _linear(x, w, dtype):
  return mixed_einsum("...i,io->...o", x, weight(w, dtype))


def _linear_fwd(x, w, dtype):
  # x is saved bit-cast when 16-bit, so that a scan stacks it natively on CPU (see pack_16bit).
  return _linear(x, w, dtype), (pack_16bit(x), w)


def _linear_bwd(dtype, res, g):
  x, w = res
  x = unpack_16bit(x)
  g = g.astype(dtype)
  wm = weight(w, dtype)
  dx = jnp.einsum("...o,io->...i", g, wm, preferred_element_type=jnp.float32).astype(dtype)
  if isinstance(w, jax.Array) and jnp.issubdtype(w.dtype, jnp.floating):
    dw = jnp.einsum("...i,...o->io", x, g, preferred_element_type=jnp.float32).astype(w.dtype)
  else:  # packed or quantized: a frozen kernel
    dw = None
  return dx, dw


_linear.defvjp(_linear_fwd, _linear_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def softmax_attention(q, k, v, bias, scale: float):
  """softmax(q k^T * scale + bias) v for q [B,K,Q,hd], k/v [B,K,S,hd] (all in the compute dtype),
  bias [B,1,Q,S] float32 (0 or a large negative number). Scores and softmax in float32, dots in
  the compute dtype with float32 accumulation.

  The backward is flash attention's: it keeps q, k, v, the output and the log-sum-exp of each row
  (not the [Q, S] probabilities), rebuilds P with one more k q^T, and forms
  dS = P * (dP - rowsum(dO * O)) in a single pass (autodiff of softmax saves P and makes several
  passes with transposes between them)."""
  return _softmax_attention_fwd(q, k, v, bias, scale)[0]


def _scores(q, k, bias, scale):
  return jnp.einsum("bkqd,bksd->bkqs", q, k, preferred_element_type=jnp.float32) * scale + bias


def _softmax_attention_fwd(q, k, v, bias, scale):
  s = _scores(q, k, bias, scale)
  m = jnp.max(s, axis=-1, keepdims=True)
  p = jnp.exp(s - m)
  l = jnp.sum(p, axis=-1, keepdims=True)
  out = jnp.einsum("bkqs,bksd->bkqd", (p / l).astype(q.dtype), v,
                   preferred_element_type=jnp.float32).astype(q.dtype)
  # 16-bit residuals bit-cast to integers: a scan stacks them natively on CPU (see pack_16bit).
  return out, (pack_16bit((q, k, v, out)), bias, m + jnp.log(l))


def _softmax_attention_bwd(scale, res, g):
  # Worked on transposed [S, Q] blocks: then every dot is a plain [M, K] x [K, N] product (XLA's CPU
  # backend runs dots contracting a leading dimension, like dS^T q, several times slower) and only
  # dS needs one explicit transpose, for dq (the barrier stops XLA folding it back into the dot).
  (q, k, v, out), bias, lse = unpack_16bit(res[0]), res[1], res[2]
  dt, f32 = q.dtype, jnp.float32
  g = g.astype(dt)
  s_t = (jnp.einsum("bksd,bkqd->bksq", k, q, preferred_element_type=f32) * scale
         + jnp.swapaxes(bias, 2, 3))
  p_t = jnp.exp(s_t - jnp.swapaxes(lse, 2, 3))
  dp_t = jnp.einsum("bksd,bkqd->bksq", v, g, preferred_element_type=f32)
  delta = jnp.sum(g.astype(f32) * out.astype(f32), axis=-1)[:, :, None, :]
  ds_t = (p_t * (dp_t - delta) * scale).astype(dt)
  dk = jnp.einsum("bksq,bkqd->bksd", ds_t, q, preferred_element_type=f32).astype(dt)
  dv = jnp.einsum("bksq,bkqd->bksd", p_t.astype(dt), g, preferred_element_type=f32).astype(dt)
  ds = jax.lax.optimization_barrier(jnp.swapaxes(ds_t, 2, 3))
  dq = jnp.einsum("bkqs,bksd->bkqd", ds, k, preferred_element_type=f32).astype(dt)
  return dq, dk, dv, None


softmax_attention.defvjp(_softmax_attention_fwd, _softmax_attention_bwd)


_PACKED = {jnp.dtype(jnp.bfloat16): jnp.dtype(jnp.uint16),
           jnp.dtype(jnp.float16): jnp.dtype(jnp.int16)}


_UNPACKED = {v: k for k, v in _PACKED.items()}


def pack_16bit(tree):
  """Bit-casts the 16-bit float leaves of a tree (or one array) to 16-bit integers (bf16 -> uint16,
  fp16 -> int16); `unpack_16bit` casts them back. Only for values that are NOT differentiated
  through the cast (the frozen base, or inside a custom VJP).

  Why: XLA's CPU backend has no bf16 dynamic-slice, so a scan over bf16 weights upcasts the whole
  stacked array to float32 once per step, then slices and re-rounds it per layer (2x the weights'
  bytes written, 3x read). An integer slice is native everywhere; the casts are bit-casts. Only
  programs built for CPU pack (jaxft.target): accelerators slice 16-bit floats natively."""
  if target.platform() != "cpu":
    return tree

  def one(x):
    if hasattr(x, "dtype") and jnp.dtype(x.dtype) in _PACKED:
      return jax.lax.bitcast_convert_type(x, _PACKED[jnp.dtype(x.dtype)])
    return x
  return jax.tree.map(one, tree)


def unpack_16bit(tree):
  """The inverse of `pack_16bit`: uint16 leaves become bf16, int16 leaves fp16."""
  def one(x):
    if hasattr(x, "dtype") and jnp.dtype(x.dtype) in _UNPACKED:
      return jax.lax.bitcast_convert_type(x, _UNPACKED[jnp.dtype(x.dtype)])
    return x
  return jax.tree.map(one, tree)



def _pack_kernels(layers):
  """The frozen layer tree with its 16-bit float kernels bit-cast to integers (pack_16bit):
  XLA's CPU backend would otherwise upcast the whole stacked base to float32 every step to slice it
  per layer. matmul casts them back inside the layer."""
  def one(v):  # quantized kernels (integer codes already) are left alone
    if isinstance(v, dict) and isinstance(v.get("kernel"), jax.Array):
      return {**v, "kernel": pack_16bit(v["kernel"])}
    return v
  return {k: one(v) for k, v in layers.items()}


def pack_frozen(frozen):
  """The frozen tree as the train step reads it: the 16-bit float kernels of the layers and of the
  output projection, and the embedding (the output projection of tied models), bit-cast to 16-bit
  integers (pack_16bit; quantized kernels and every other leaf unchanged). Frozen leaves are never differentiated, so the step may scan and slice
  them as integers, which XLA's CPU backend does natively (a bf16 slice there upcasts the whole
  array). `trainer.prepare` packs its frozen tree once, in place; the step packs whatever it is
  given (a no-op on a packed tree), and every reader (matmul, the embedding lookup,
  llama.output_kernel, the loss head) casts back. Packing inside the step would cost a copy of
  every kernel per step (a tenth of a small bf16 model's step on CPU)."""
  out = dict(frozen)
  if "layers" in frozen:
    out["layers"] = _pack_kernels(frozen["layers"])
  for name, leaf in (("lm_head", "kernel"), ("embed", "embedding")):
    node = frozen.get(name)
    if isinstance(node, dict) and isinstance(node.get(leaf), jax.Array):
      out[name] = {**node, leaf: pack_16bit(node[leaf])}
  return out

