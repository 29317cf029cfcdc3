"""The Llama-family decoder as pure functions of a parameter pytree.

Parameters are a nested dict; the decoder layers are stacked on a leading `layers` axis and run
under `jax.lax.scan`, so compile time does not grow with depth. Paths (used by PEFT targets,
sharding rules and the HF mapping):

  embed/embedding [vocab, embed]            final_norm/scale [embed]    lm_head/kernel [embed, vocab]
  layers/attn_norm/scale [L, embed]         layers/mlp_norm/scale [L, embed]
  layers/{q,k,v}_proj/kernel [L, embed, heads*head_dim]   (+ bias [L, out] when qkv_bias)
  layers/o_proj/kernel [L, heads*head_dim, embed]
  layers/{gate,up}_proj/kernel [L, embed, mlp]            layers/down_proj/kernel [L, mlp, embed]

A PEFT method is a static `Adapter` (see jaxft/peft/base.py): the decoder calls its hooks for every
linear layer, after each block and for key/value prefixes; the method's leaves sit beside the base
leaves in the same tree (e.g. layers/q_proj/lora_a).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from jaxft import target
from jaxft.models import attention_kernels
from jaxft.models import families
from jaxft.models.config import ModelConfig
from jaxft.models.rope import apply_rope, inverse_frequencies

Params = dict[str, Any]
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_NEG = -1e30


@dataclasses.dataclass(frozen=True)
class ParamSpec:
  """Shape, logical axis names and initialiser of one base parameter."""
  shape: tuple[int, ...]
  axes: tuple[str, ...]
  init: str  # normal | ones | zeros


def param_specs(cfg: ModelConfig) -> Params:
  """Returns the tree of `ParamSpec`s of the base model (same structure as the params)."""
  L, D, F, V = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
  lin = lambda i, o, ai, ao: {"kernel": ParamSpec((L, i, o), ("layers", ai, ao), "normal")}
  one = "zeros" if cfg.norm_plus_one else "ones"  # (1 + weight) norms start at weight 0
  norm = lambda n: {"scale": ParamSpec((L, n), ("layers", "norm"), one)}
  layers = {
      "attn_norm": norm(D),
      "mlp_norm": norm(D),
      "q_proj": lin(D, cfg.q_size, "embed", "heads"),
      "k_proj": lin(D, cfg.kv_size, "embed", "kv_heads"),
      "v_proj": lin(D, cfg.kv_size, "embed", "kv_heads"),
      "o_proj": lin(cfg.q_size, D, "heads", "embed"),
      "gate_proj": lin(D, F, "embed", "mlp"),
      "up_proj": lin(D, F, "embed", "mlp"),
      "down_proj": lin(F, D, "mlp", "embed"),
  }
  if cfg.qkv_bias:
    layers["q_proj"]["bias"] = ParamSpec((L, cfg.q_size), ("layers", "heads"), "zeros")
    layers["k_proj"]["bias"] = ParamSpec((L, cfg.kv_size), ("layers", "kv_heads"), "zeros")
    layers["v_proj"]["bias"] = ParamSpec((L, cfg.kv_size), ("layers", "kv_heads"), "zeros")
  if cfg.qk_norm:
    layers["q_norm"], layers["k_norm"] = norm(cfg.head_dim), norm(cfg.head_dim)
  if cfg.post_norms:
    layers["attn_post_norm"], layers["mlp_post_norm"] = norm(D), norm(D)
  specs = {
      "embed": {"embedding": ParamSpec((V, D), ("vocab", "embed"), "normal")},
      "layers": layers,
      "final_norm": {"scale": ParamSpec((D,), ("norm",), one)},
  }
  if not cfg.tie_embeddings:
    specs["lm_head"] = {"kernel": ParamSpec((D, V), ("embed", "vocab"), "normal")}
  return specs


def is_spec(x) -> bool:
  return isinstance(x, ParamSpec)


def init_params(cfg: ModelConfig, rng: jax.Array) -> Params:
  """Random base parameters (normal(0, initializer_range) kernels, unit norms), in param_dtype."""
  specs = param_specs(cfg)
  leaves, treedef = jax.tree.flatten(specs, is_leaf=is_spec)
  keys = jax.random.split(rng, len(leaves))
  dtype = jnp.dtype(cfg.param_dtype)

  def one(spec, key):
    if spec.init == "ones":
      return jnp.ones(spec.shape, dtype)
    if spec.init == "zeros":
      return jnp.zeros(spec.shape, dtype)
    return (cfg.initializer_range * jax.random.normal(key, spec.shape, jnp.float32)).astype(dtype)

  return jax.tree.unflatten(treedef, [one(s, k) for s, k in zip(leaves, keys)])


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


def _weight(w, dtype):
  from jaxft import quant  # local: quant imports this module
  return quant.materialize(w, dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _linear(x, w, dtype):
  return mixed_einsum("...i,io->...o", x, _weight(w, dtype))


def _linear_fwd(x, w, dtype):
  # x is saved bit-cast when 16-bit, so that a scan stacks it natively on CPU (see pack_16bit).
  return _linear(x, w, dtype), (pack_16bit(x), w)


def _linear_bwd(dtype, res, g):
  x, w = res
  x = unpack_16bit(x)
  g = g.astype(dtype)
  wm = _weight(w, dtype)
  dx = jnp.einsum("...o,io->...i", g, wm, preferred_element_type=jnp.float32).astype(dtype)
  if isinstance(w, jax.Array) and jnp.issubdtype(w.dtype, jnp.floating):
    dw = jnp.einsum("...i,...o->io", x, g, preferred_element_type=jnp.float32).astype(w.dtype)
  else:  # packed or quantized: a frozen kernel
    dw = None
  return dx, dw


_linear.defvjp(_linear_fwd, _linear_bwd)


ATTENTION = ("auto", "einsum", "xla", "cudnn", "splash")


def attention_impl(cfg: ModelConfig, plain: bool = True, length: int = 0) -> str:
  """The attention implementation `cfg.attention` (model.attention) resolves to.

  `plain`: no KV cache and no prefix keys, so queries and keys share positions (causal is the
  usual lower triangle). auto: cuDNN's fused (flash) attention through
  `jax.nn.dot_product_attention` on GPUs in bf16/fp16 for plain attention, else jaxft's einsum
  path, which serves every case (packed segments, sliding windows, KV caches, prefix keys) and on
  CPU measured as fast as the XLA implementation of `jax.nn.dot_product_attention`; on TPUs the
  splash (flash) Pallas kernel (models/attention_kernels.py) for plain attention over `length`
  tokens that it supports. The platform is the one the program is built for (jaxft.target), not
  necessarily this host's."""
  if not plain:
    return "einsum"
  if cfg.attention != "auto":
    return cfg.attention
  if target.platform() == "tpu" and attention_kernels.supported(length or 128, cfg.head_dim):
    return "splash"
  if (target.platform() == "gpu"
      and jnp.dtype(cfg.dtype) in (jnp.bfloat16, jnp.float16) and cfg.head_dim % 8 == 0
      and cfg.head_dim <= 128):
    return "cudnn"
  return "einsum"


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _softmax_attention(q, k, v, bias, scale: float):
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


_softmax_attention.defvjp(_softmax_attention_fwd, _softmax_attention_bwd)


def _causal_blocks(T: int) -> int:
  """Query blocks for plain causal attention: each block attends only to the keys up to its end,
  skipping the masked upper triangle (3/4 of the scores at 2 blocks, 9/16 at 8)."""
  if T < 256 or T % 128:
    return 1
  return min(T // 128, 8)


def _attend(q, k, v, mask, dtype, impl: str = "einsum", causal_blocks: int = 1,
            segment_ids=None, window=None):
  """q [B,T,H,hd], k/v [B,S,K,hd], mask [B,T,S] -> [B,T,H*hd] in `dtype`. Softmax in float32.

  einsum: the G = H/K query heads that share a key/value head become rows of one [T*G, S] score
  matrix per (batch, kv head), so every dot is a plain batched matmul (GQA without repeating keys),
  and the mask enters as an additive bias. causal_blocks > 1 (plain causal attention only, where
  query i never sees key j > i) splits the queries into that many blocks, each against the keys up
  to its own end."""
  B, T, H, hd = q.shape
  S, K = k.shape[1], k.shape[2]
  G = H // K
  if impl == "splash":  # plain attention only: causal within segments (and the window)
    return attention_kernels.splash(q, k, v, segment_ids, dtype, window)
  if impl in ("xla", "cudnn"):  # plain attention only (see attention_impl): causal is exact
    out = jax.nn.dot_product_attention(q.astype(dtype), k.astype(dtype), v.astype(dtype),
                                       mask=mask[:, None], is_causal=True, implementation=impl)
    return out.reshape(B, T, H * hd)
  qh = q.astype(dtype).reshape(B, T, K, G, hd).transpose(0, 2, 1, 3, 4).reshape(B, K, T * G, hd)
  kh = k.astype(dtype).transpose(0, 2, 1, 3)
  vh = v.astype(dtype).transpose(0, 2, 1, 3)
  bias = jnp.where(mask, 0.0, _NEG).astype(jnp.float32)
  bias = jnp.broadcast_to(bias[:, None, :, None], (B, 1, T, G, S)).reshape(B, 1, T * G, S)
  scale = float(1.0 / np.sqrt(hd))
  n = causal_blocks
  outs = []
  for i in range(n):  # static: block i holds queries [i*T/n, (i+1)*T/n), keys [0, (i+1)*T/n)
    rows = slice(i * T // n * G, (i + 1) * T // n * G)
    keys = (i + 1) * T // n if n > 1 else S
    outs.append(_softmax_attention(qh[:, :, rows], kh[:, :, :keys], vh[:, :, :keys],
                                   bias[:, :, rows, :keys], scale))
  out = outs[0] if n == 1 else jnp.concatenate(outs, axis=2)
  return out.reshape(B, K, T, G, hd).transpose(0, 2, 1, 3, 4).reshape(B, T, H * hd)


def attention_mask(cfg: ModelConfig, q_idx, q_seg, kv_idx, kv_seg):
  """Causal, same-segment (packing, padding) and sliding-window mask [B, T, S]."""
  mask = (kv_idx[:, None, :] <= q_idx[:, :, None]) & (kv_seg[:, None, :] == q_seg[:, :, None])
  if cfg.sliding_window:
    mask &= kv_idx[:, None, :] > q_idx[:, :, None] - cfg.sliding_window
  return mask


def norm(cfg: ModelConfig, x: jnp.ndarray, scale: jnp.ndarray) -> jnp.ndarray:
  """The decoder's RMSNorm: by `scale`, or by (1 + scale) in float32 with cfg.norm_plus_one."""
  if cfg.norm_plus_one:
    scale = unpack_16bit(scale).astype(jnp.float32) + 1.0
  return rms_norm(x, scale, cfg.rms_norm_eps)


def _layer(cfg: ModelConfig, adapter, inv_freq, x, p, ctx):
  """One decoder block. ctx holds positions, segment ids, indices, rng and the cache slice."""
  dtype = jnp.dtype(cfg.dtype)
  B, T, _ = x.shape
  lin = lambda name, h: adapter.linear(name, p[name], h, dtype, ctx["rng"])

  h = norm(cfg, x, p["attn_norm"]["scale"])
  q = lin("q_proj", h).reshape(B, T, cfg.num_heads, cfg.head_dim)
  k = lin("k_proj", h).reshape(B, T, cfg.num_kv_heads, cfg.head_dim)
  v = lin("v_proj", h).reshape(B, T, cfg.num_kv_heads, cfg.head_dim)
  if cfg.qk_norm:  # per head, over head_dim, before RoPE (Qwen3, Gemma 3)
    q, k = norm(cfg, q, p["q_norm"]["scale"]), norm(cfg, k, p["k_norm"]["scale"])
  if families.query_scale(cfg) is not None:  # Gemma's query_pre_attn_scalar
    q = q * jnp.asarray(families.query_scale(cfg), q.dtype)
  q = apply_rope(q, ctx["positions"], inv_freq)
  k = apply_rope(k, ctx["positions"], inv_freq)

  new_cache = None
  if ctx["cache"] is not None:  # decoding: write this step's keys/values at cache index
    cache = ctx["cache"]
    start = ctx["cache_index"]
    ck = jax.lax.dynamic_update_slice_in_dim(cache["k"], k.astype(cache["k"].dtype), start, 1)
    cv = jax.lax.dynamic_update_slice_in_dim(cache["v"], v.astype(cache["v"].dtype), start, 1)
    new_cache = {"k": ck, "v": cv}
    k, v = ck, cv
  mask = ctx["mask"]
  prefix = adapter.kv_prefix(p, B, dtype)
  if prefix is not None:  # prefix keys/values: visible to every position, no rotation
    pk, pv = prefix
    k = jnp.concatenate([pk.astype(k.dtype), k], axis=1)
    v = jnp.concatenate([pv.astype(v.dtype), v], axis=1)
    mask = jnp.concatenate([jnp.ones((B, T, pk.shape[1]), bool), mask], axis=-1)
  plain = ctx["cache"] is None and prefix is None
  if cfg.attn_softcap:
    attn = families.softcap_attention(q, k, v, mask, dtype, cfg.attn_softcap)
  else:
    impl = attention_impl(cfg, plain=plain, length=T)
    if impl == "splash" and cfg.sliding_layers is not None:
      impl = "einsum"  # the splash kernel takes one window for every layer
    attn = _attend(q, k, v, mask, dtype, impl, _causal_blocks(T) if plain else 1,
                   ctx["segment_ids"], cfg.sliding_window)
  attn = lin("o_proj", attn)
  if cfg.post_norms:
    attn = norm(cfg, attn, p["attn_post_norm"]["scale"])
  x = x + adapter.block_output("attn", p, attn, dtype)

  h = norm(cfg, x, p["mlp_norm"]["scale"])
  act_fn = families.geglu if cfg.hidden_act == "gelu_tanh" else swiglu
  act = target.constrain(act_fn(lin("gate_proj", h), lin("up_proj", h)), ("batch", "length", "mlp"))
  mlp = lin("down_proj", act)
  if cfg.post_norms:
    mlp = norm(cfg, mlp, p["mlp_post_norm"]["scale"])
  x = x + adapter.block_output("mlp", p, mlp, dtype)
  return x, new_cache


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


_ACTS = ("batch", "length", "embed")  # logical axes of the hidden states (jaxft.target)


def remat_policy(cfg: ModelConfig) -> str:
  """model.remat with auto resolved for the platform being built for (see `_remat`)."""
  if cfg.remat == "auto":
    return "dots" if target.platform() == "cpu" else "full"
  return cfg.remat


def _remat(cfg: ModelConfig, fn: Callable) -> Callable:
  """model.remat: none keeps every residual of a layer for the backward; full keeps only the layer's
  input and recomputes the layer in the backward (least memory, about a third more FLOPs); dots
  keeps the outputs of the linear layers (tagged "linear" by `matmul`) and recomputes the rest
  (norms, activations, attention); auto is dots in programs built for CPU (jaxft.target) and full
  on accelerators, where dots kept 25 GB per chip for Llama-3-8B at batch 8 x 2048 on four 16 GB
  v5e chips and full fits (`python -m jaxft.plan` shows what a config needs)."""
  remat = remat_policy(cfg)
  if remat == "full":
    return jax.checkpoint(fn)
  if remat == "dots":
    return jax.checkpoint(fn, policy=jax.checkpoint_policies.save_only_these_names("linear"))
  return fn


def hidden_states(cfg: ModelConfig, params: Params, tokens: jnp.ndarray, *, adapter,
                  positions=None, segment_ids=None, rng=None, cache=None, cache_index=None):
  """Runs the decoder and returns (final-norm hidden states [B, T, D], new cache or None).

  tokens [B, T] int; positions [B, T] (default arange, shifted by the adapter's prefix);
  segment_ids [B, T] (default all 1; 0 marks padding; packed examples get distinct ids).
  cache: {"k","v": [L, B, S, K, hd], "seg": [B, S]} for decoding, with cache_index the slot of
  tokens[:, 0]; indices then run over the whole cache.
  """
  B, T = tokens.shape
  dtype = jnp.dtype(cfg.dtype)
  if positions is None:
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
  positions = positions + adapter.position_offset
  if segment_ids is None:
    segment_ids = jnp.ones((B, T), jnp.int32)
  # (unpack: the trainer's frozen tree holds 16-bit tables bit-cast to integers, step.pack_frozen)
  x = unpack_16bit(jnp.take(params["embed"]["embedding"], tokens, axis=0)).astype(dtype)
  if cfg.scale_embeddings:  # Gemma: times sqrt(hidden) rounded to the compute dtype, as HF does
    x = x * jnp.asarray(np.sqrt(cfg.hidden_size), dtype)
  x = target.constrain(x, _ACTS)  # rows stay on their chips through every layer (FSDP)
  q_idx = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
  kv_seg = segment_ids
  if cache is not None:
    q_idx = q_idx + cache_index
    kv_seg = jax.lax.dynamic_update_slice_in_dim(cache["seg"], segment_ids, cache_index, 1)
  kv_idx = jnp.broadcast_to(jnp.arange(kv_seg.shape[1], dtype=jnp.int32), kv_seg.shape)
  mask = attention_mask(cfg, q_idx, segment_ids, kv_idx, kv_seg)
  inv_freq = inverse_frequencies(cfg)
  flags = local = None
  if cfg.layer_types is not None:  # Gemma 2/3: sliding and global layers
    mask_of = lambda w: attention_mask(cfg.replace(sliding_window=w, layer_types=None), q_idx,
                                       segment_ids, kv_idx, kv_seg)
    flags, (mask, inv_freq), local = families.layer_variants(cfg, mask_of, inv_freq)
  rngs = (jax.random.split(rng, cfg.num_layers) if rng is not None
          else jnp.zeros((cfg.num_layers,), jnp.uint32))

  def body(x, xs):
    p, layer_rng, layer_cache, sliding = xs
    m, freq = mask, inv_freq
    if sliding is not None:  # Gemma 2/3: this layer's mask (and RoPE base, rope_local_theta)
      m = jnp.where(sliding, local[0], mask)
      freq = jnp.where(sliding, jnp.asarray(local[1]), jnp.asarray(inv_freq))
    ctx = {"positions": positions, "mask": m, "segment_ids": segment_ids,
           "rng": None if rng is None else layer_rng, "cache": layer_cache,
           "cache_index": cache_index}
    x, new_cache = _layer(cfg, adapter, freq, x, p, ctx)
    return target.constrain(x, _ACTS), new_cache

  layer_caches = None if cache is None else {"k": cache["k"], "v": cache["v"]}
  layers = adapter.layer_params(cfg, params)  # params["layers"], or derived by the method
  x, new_kv = jax.lax.scan(_remat(cfg, body), x, (layers, rngs, layer_caches, flags))
  x = norm(cfg, x, params["final_norm"]["scale"])
  new_cache = None if cache is None else {"k": new_kv["k"], "v": new_kv["v"], "seg": kv_seg}
  return x, new_cache


def output_kernel(cfg: ModelConfig, params: Params) -> jnp.ndarray:
  """The [embed, vocab] projection to logits (the transposed embedding when tied)."""
  # (unpack: packed when it is the trainer's frozen tree, see step.pack_frozen)
  if cfg.tie_embeddings:
    return unpack_16bit(params["embed"]["embedding"]).T
  return unpack_16bit(params["lm_head"]["kernel"])


def logits(cfg: ModelConfig, params: Params, h: jnp.ndarray) -> jnp.ndarray:
  """Float32 logits [..., vocab] of hidden states h."""
  out = jax.lax.dot_general(h.astype(cfg.dtype), output_kernel(cfg, params).astype(cfg.dtype),
                            (((h.ndim - 1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
  if cfg.final_softcap:  # Gemma 2's final_logit_softcapping
    out = families.softcap(out, cfg.final_softcap)
  return out


def init_cache(cfg: ModelConfig, batch: int, length: int, dtype=None) -> Params:
  """An empty KV cache for `length` positions (segment id 0 = empty slot)."""
  dtype = jnp.dtype(dtype or cfg.dtype)
  shape = (cfg.num_layers, batch, length, cfg.num_kv_heads, cfg.head_dim)
  return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype),
          "seg": jnp.zeros((batch, length), jnp.int32)}
