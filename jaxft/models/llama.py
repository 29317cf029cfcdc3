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
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

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
  layers = {
      "attn_norm": {"scale": ParamSpec((L, D), ("layers", "norm"), "ones")},
      "mlp_norm": {"scale": ParamSpec((L, D), ("layers", "norm"), "ones")},
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
  specs = {
      "embed": {"embedding": ParamSpec((V, D), ("vocab", "embed"), "normal")},
      "layers": layers,
      "final_norm": {"scale": ParamSpec((D,), ("norm",), "ones")},
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


def rms_norm(x: jnp.ndarray, scale: jnp.ndarray, eps: float) -> jnp.ndarray:
  x32 = x.astype(jnp.float32)
  x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return (x32 * scale.astype(jnp.float32)).astype(x.dtype)


def matmul(x: jnp.ndarray, w: jnp.ndarray, dtype) -> jnp.ndarray:
  """x[..., in] @ w[in, out] in `dtype` with float32 accumulation (fast on CPU and accelerators)."""
  out = jax.lax.dot_general(x.astype(dtype), w.astype(dtype), (((x.ndim - 1,), (0,)), ((), ())),
                            preferred_element_type=jnp.float32)
  return out.astype(dtype)


def _attend(q, k, v, mask, dtype):
  """q [B,T,H,hd], k/v [B,S,K,hd], mask [B,T,S] -> [B,T,H*hd]. Softmax in float32."""
  B, T, H, hd = q.shape
  K = k.shape[2]
  q = q.reshape(B, T, K, H // K, hd)
  scores = jnp.einsum("btkgd,bskd->bkgts", q.astype(dtype), k.astype(dtype),
                      preferred_element_type=jnp.float32) / np.sqrt(hd).astype(np.float32)
  scores = jnp.where(mask[:, None, None], scores, _NEG)
  probs = jax.nn.softmax(scores, axis=-1)
  out = jnp.einsum("bkgts,bskd->btkgd", probs.astype(dtype), v.astype(dtype),
                   preferred_element_type=jnp.float32)
  return out.reshape(B, T, H * hd).astype(dtype)


def attention_mask(cfg: ModelConfig, q_idx, q_seg, kv_idx, kv_seg):
  """Causal, same-segment (packing, padding) and sliding-window mask [B, T, S]."""
  mask = (kv_idx[:, None, :] <= q_idx[:, :, None]) & (kv_seg[:, None, :] == q_seg[:, :, None])
  if cfg.sliding_window:
    mask &= kv_idx[:, None, :] > q_idx[:, :, None] - cfg.sliding_window
  return mask


def _layer(cfg: ModelConfig, adapter, inv_freq, x, p, ctx):
  """One decoder block. ctx holds positions, segment ids, indices, rng and the cache slice."""
  dtype = jnp.dtype(cfg.dtype)
  B, T, _ = x.shape
  lin = lambda name, h: adapter.linear(name, p[name], h, dtype, ctx["rng"])

  h = rms_norm(x, p["attn_norm"]["scale"], cfg.rms_norm_eps)
  q = lin("q_proj", h).reshape(B, T, cfg.num_heads, cfg.head_dim)
  k = lin("k_proj", h).reshape(B, T, cfg.num_kv_heads, cfg.head_dim)
  v = lin("v_proj", h).reshape(B, T, cfg.num_kv_heads, cfg.head_dim)
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
  attn = _attend(q, k, v, mask, dtype)
  attn = lin("o_proj", attn)
  x = x + adapter.block_output("attn", p, attn, dtype)

  h = rms_norm(x, p["mlp_norm"]["scale"], cfg.rms_norm_eps)
  mlp = lin("down_proj", jax.nn.silu(lin("gate_proj", h)) * lin("up_proj", h))
  x = x + adapter.block_output("mlp", p, mlp, dtype)
  return x, new_cache


def _remat(cfg: ModelConfig, fn: Callable) -> Callable:
  if cfg.remat == "full":
    return jax.checkpoint(fn)
  if cfg.remat == "dots":
    return jax.checkpoint(fn, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
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
  x = jnp.take(params["embed"]["embedding"], tokens, axis=0).astype(dtype)
  q_idx = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
  kv_seg = segment_ids
  if cache is not None:
    q_idx = q_idx + cache_index
    kv_seg = jax.lax.dynamic_update_slice_in_dim(cache["seg"], segment_ids, cache_index, 1)
  kv_idx = jnp.broadcast_to(jnp.arange(kv_seg.shape[1], dtype=jnp.int32), kv_seg.shape)
  mask = attention_mask(cfg, q_idx, segment_ids, kv_idx, kv_seg)
  inv_freq = inverse_frequencies(cfg)
  rngs = (jax.random.split(rng, cfg.num_layers) if rng is not None
          else jnp.zeros((cfg.num_layers,), jnp.uint32))

  def body(x, xs):
    p, layer_rng, layer_cache = xs
    ctx = {"positions": positions, "mask": mask, "rng": None if rng is None else layer_rng,
           "cache": layer_cache, "cache_index": cache_index}
    return _layer(cfg, adapter, inv_freq, x, p, ctx)

  layer_caches = None if cache is None else {"k": cache["k"], "v": cache["v"]}
  layers = adapter.layer_params(cfg, params)  # params["layers"], or derived by the method
  x, new_kv = jax.lax.scan(_remat(cfg, body), x, (layers, rngs, layer_caches))
  x = rms_norm(x, params["final_norm"]["scale"], cfg.rms_norm_eps)
  new_cache = None if cache is None else {"k": new_kv["k"], "v": new_kv["v"], "seg": kv_seg}
  return x, new_cache


def output_kernel(cfg: ModelConfig, params: Params) -> jnp.ndarray:
  """The [embed, vocab] projection to logits (the transposed embedding when tied)."""
  if cfg.tie_embeddings:
    return params["embed"]["embedding"].T
  return params["lm_head"]["kernel"]


def logits(cfg: ModelConfig, params: Params, h: jnp.ndarray) -> jnp.ndarray:
  """Float32 logits [..., vocab] of hidden states h."""
  out = jax.lax.dot_general(h.astype(cfg.dtype), output_kernel(cfg, params).astype(cfg.dtype),
                            (((h.ndim - 1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
  return out


def init_cache(cfg: ModelConfig, batch: int, length: int, dtype=None) -> Params:
  """An empty KV cache for `length` positions (segment id 0 = empty slot)."""
  dtype = jnp.dtype(dtype or cfg.dtype)
  shape = (cfg.num_layers, batch, length, cfg.num_kv_heads, cfg.head_dim)
  return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype),
          "seg": jnp.zeros((batch, length), jnp.int32)}
