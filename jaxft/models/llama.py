"""The Llama-family decoder as pure functions of a parameter pytree.

Parameters are a nested dict; the decoder layers are stacked on a leading `layers` axis and run
under `jax.lax.scan`, so compile time does not grow with depth. Paths (used by PEFT targets,
sharding rules and the HF mapping):

  embed/embedding [vocab, embed]            final_norm/scale [embed]    lm_head/kernel [embed, vocab]
  layers/attn_norm/scale [L, embed]         layers/mlp_norm/scale [L, embed]
  layers/{q,k,v}_proj/kernel [L, embed, heads*head_dim]   (+ bias [L, out] when qkv_bias)
  layers/o_proj/kernel [L, heads*head_dim, embed]
  layers/{gate,up}_proj/kernel [L, embed, mlp]            layers/down_proj/kernel [L, mlp, embed]
  mixture of experts (models/moe.py): layers/router/kernel [L, embed, E] and the experts stacked,
  layers/{gate,up}_proj/kernel [L, E, embed, mlp], layers/down_proj/kernel [L, E, mlp, embed]

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
from jax.ad_checkpoint import checkpoint_name

from jaxft import target
from jaxft.models import attention_kernels
from jaxft.models import families, long_context, moe
from jaxft.models.config import ModelConfig
from jaxft.models.ops import rms_norm, softmax_attention, swiglu, unpack_16bit
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
  if cfg.num_experts:  # Mixtral, Qwen3-MoE: a router and stacked experts instead of the MLP
    E, Fe = cfg.num_experts, cfg.moe_intermediate_size
    exp = lambda i, o, ai, ao: {"kernel": ParamSpec((L, E, i, o), ("layers", "expert", ai, ao),
                                                    "normal")}
    layers.update(router={"kernel": ParamSpec((L, D, E), ("layers", "embed", "router"), "normal")},
                  gate_proj=exp(D, Fe, "embed", "mlp"), up_proj=exp(D, Fe, "embed", "mlp"),
                  down_proj=exp(Fe, D, "mlp", "embed"))
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
    outs.append(softmax_attention(qh[:, :, rows], kh[:, :, :keys], vh[:, :, :keys],
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
  prefix = adapter.kv_prefix(p, B, dtype)
  mask = ctx["mask"]
  if mask is None and (prefix is not None or ctx["cache"] is not None):  # whole, for this path
    mask = attention_mask(cfg, ctx["index"], ctx["segment_ids"], ctx["index"], ctx["segment_ids"])
  if prefix is not None:  # prefix keys/values: visible to every position, no rotation
    pk, pv = prefix
    k = jnp.concatenate([pk.astype(k.dtype), k], axis=1)
    v = jnp.concatenate([pv.astype(v.dtype), v], axis=1)
    mask = jnp.concatenate([jnp.ones((B, T, pk.shape[1]), bool), mask], axis=-1)
  plain = ctx["cache"] is None and prefix is None
  if cfg.attn_softcap:
    attn = families.softcap_attention(q, k, v, mask, dtype, cfg.attn_softcap)
  elif ctx["mask"] is None and plain:  # long rows, or context parallelism (models/long_context)
    core = lambda q, k, v, m: _attend(q, k, v, m, dtype)
    mask_of = lambda qi, qs, ki, ks: attention_mask(cfg, qi, qs, ki, ks)
    attn = long_context.attention(core, mask_of, q, k, v, ctx["index"], ctx["segment_ids"])
  else:
    impl = attention_impl(cfg, plain=plain, length=T)
    if impl == "splash" and cfg.sliding_layers is not None:
      impl = "einsum"  # the splash kernel takes one window for every layer
    blocks = _causal_blocks(T) if plain else 1
    if long_context.context_size() > 1:  # zigzag order: only the mask knows what is causal
      impl, blocks = "einsum", 1
    attn = _attend(q, k, v, mask, dtype, impl, blocks,
                   ctx["segment_ids"], cfg.sliding_window)
  attn = lin("o_proj", attn)
  if cfg.post_norms:
    attn = norm(cfg, attn, p["attn_post_norm"]["scale"])
  x = x + adapter.block_output("attn", p, attn, dtype)

  h = norm(cfg, x, p["mlp_norm"]["scale"])
  router = None
  if cfg.num_experts:
    mlp, logits, stats = moe.moe_mlp(cfg, adapter, p, h, ctx["segment_ids"] > 0, dtype, ctx["rng"])
    router = {"stats": stats, "logits": logits if ctx["router_logits"] else None}
  else:
    act_fn = families.geglu if cfg.hidden_act == "gelu_tanh" else swiglu

    def dense(h, rng):
      lin_r = lambda name, a: adapter.linear(name, p[name], a, dtype, rng)
      act = target.constrain(act_fn(lin_r("gate_proj", h), lin_r("up_proj", h)),
                             ("batch", "length", "mlp"))
      return lin_r("down_proj", act)

    mlp = (long_context.tiled_mlp(dense, h, cfg.mlp_tile, ctx["rng"]) if cfg.mlp_tile
           else dense(h, ctx["rng"]))
  if cfg.post_norms:
    mlp = norm(cfg, mlp, p["mlp_post_norm"]["scale"])
  x = x + adapter.block_output("mlp", p, mlp, dtype)
  return x, (new_cache, router)


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
  v5e chips and full fits (`python -m jaxft.plan` shows what a config needs); offload is full with
  each layer's input (named "layer_input" in the scan body) kept in the host's memory instead of
  the chip's (`save_and_offload_only_these_names`; accelerators only): the saved inputs of all
  layers, [layers, rows, T, hidden], are the largest buffer of a long or deep step."""
  remat = remat_policy(cfg)
  if remat == "full":
    return jax.checkpoint(fn)
  if remat == "dots":
    return jax.checkpoint(fn, policy=jax.checkpoint_policies.save_only_these_names("linear"))
  if remat == "offload":
    policy = jax.checkpoint_policies.save_and_offload_only_these_names(
        names_which_can_be_saved=[], names_which_can_be_offloaded=["layer_input"],
        offload_src="device", offload_dst="pinned_host")
    return jax.checkpoint(fn, policy=policy)
  return fn


# One piece of a layer input that remat=offload copies to host memory: libtpu (0.0.42) aborts
# lowering a host copy of 4 GiB (a layer input of 524,288 tokens x 4,096 in bf16: its loop's trip
# count comes out -1), so longer inputs are named, and copied, in pieces along the tokens.
_OFFLOAD_PIECE_BYTES = 2**31


def _layer_input(cfg: ModelConfig, x):
  """x named "layer_input" (the value remat=offload keeps): in pieces of at most
  _OFFLOAD_PIECE_BYTES along the tokens when offloaded."""
  n = 1
  if remat_policy(cfg) == "offload":
    T = x.shape[1]
    n = next((k for k in range(1, T + 1) if T % k == 0
              and x.size * x.dtype.itemsize // k <= _OFFLOAD_PIECE_BYTES), 1)
  if n == 1:
    return checkpoint_name(x, "layer_input")
  return jnp.concatenate([checkpoint_name(p, "layer_input") for p in jnp.split(x, n, axis=1)],
                         axis=1)


def hidden_states(cfg: ModelConfig, params: Params, tokens: jnp.ndarray, *, adapter,
                  positions=None, segment_ids=None, rng=None, cache=None, cache_index=None):
  """Runs the decoder and returns (final-norm hidden states [B, T, D], new cache or None).

  tokens [B, T] int; positions [B, T] (default arange, shifted by the adapter's prefix);
  segment_ids [B, T] (default all 1; 0 marks padding; packed examples get distinct ids).
  cache: {"k","v": [L, B, S, K, hd], "seg": [B, S]} for decoding, with cache_index the slot of
  tokens[:, 0]; indices then run over the whole cache.
  """
  return hidden_states_and_router(cfg, params, tokens, adapter=adapter, positions=positions,
                                  segment_ids=segment_ids, rng=rng, cache=cache,
                                  cache_index=cache_index)[:2]


def hidden_states_and_router(cfg: ModelConfig, params: Params, tokens: jnp.ndarray, *, adapter,
                             positions=None, segment_ids=None, rng=None, cache=None,
                             cache_index=None, router_logits: bool = False):
  """`hidden_states` plus, for a mixture of experts, the router's outputs of every layer:
  {"stats": moe.router_stats stacked [L, ...], "logits": [L, B*T, E] float32 when
  `router_logits`, else None}; None for a dense model."""
  B, T = tokens.shape
  dtype = jnp.dtype(cfg.dtype)
  if positions is None:
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
  positions = positions + adapter.position_offset
  if segment_ids is None:
    segment_ids = jnp.ones((B, T), jnp.int32)
  n = long_context.context_size() if cache is None else 1
  if n > 1:  # context parallelism: the row's tokens in zigzag order (models/long_context.py)
    long_context.check_length(T, n)
    tokens, positions, segment_ids = (long_context.to_zigzag(a)
                                      for a in (tokens, positions, segment_ids))
  # (unpack: the trainer's frozen tree holds 16-bit tables bit-cast to integers, ops.pack_frozen)
  x = unpack_16bit(jnp.take(params["embed"]["embedding"], tokens, axis=0)).astype(dtype)
  if cfg.scale_embeddings:  # Gemma: times sqrt(hidden) rounded to the compute dtype, as HF does
    x = x * jnp.asarray(np.sqrt(cfg.hidden_size), dtype)
  x = target.constrain(x, _ACTS)  # rows stay on their chips through every layer (FSDP)
  q_idx = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
  if n > 1:  # each token's index in the row, which causal attention compares
    q_idx = target.constrain(jnp.broadcast_to(jnp.asarray(long_context.zigzag_order(T, n)),
                                              (B, T)), ("batch", "length"))
  kv_seg = segment_ids
  if cache is not None:
    q_idx = q_idx + cache_index
    kv_seg = jax.lax.dynamic_update_slice_in_dim(cache["seg"], segment_ids, cache_index, 1)
  kv_idx = jnp.broadcast_to(jnp.arange(kv_seg.shape[1], dtype=jnp.int32), kv_seg.shape)
  # Long rows and context parallelism: each layer builds the mask of a chunk of queries at a time.
  long = (cache is None and cfg.layer_types is None and not cfg.attn_softcap and
          (n > 1 or T >= long_context.LONG_ROW and attention_impl(cfg, True, T) == "einsum"))
  mask = None if long else attention_mask(cfg, q_idx, segment_ids, kv_idx, kv_seg)
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
    x = _layer_input(cfg, x)  # what remat=offload keeps, in host memory
    m, freq = mask, inv_freq
    if sliding is not None:  # Gemma 2/3: this layer's mask (and RoPE base, rope_local_theta)
      m = jnp.where(sliding, local[0], mask)
      freq = jnp.where(sliding, jnp.asarray(local[1]), jnp.asarray(inv_freq))
    ctx = {"positions": positions, "mask": m, "segment_ids": segment_ids, "index": q_idx,
           "rng": None if rng is None else layer_rng, "cache": layer_cache,
           "cache_index": cache_index, "router_logits": router_logits}
    x, out = _layer(cfg, adapter, freq, x, p, ctx)
    return target.constrain(x, _ACTS), out

  layer_caches = None if cache is None else {"k": cache["k"], "v": cache["v"]}
  layers = adapter.layer_params(cfg, params)  # params["layers"], or derived by the method
  x, (new_kv, router) = jax.lax.scan(_remat(cfg, body), x, (layers, rngs, layer_caches, flags))
  if n > 1:
    x = long_context.from_zigzag(x)
  x = norm(cfg, x, params["final_norm"]["scale"])
  new_cache = None if cache is None else {"k": new_kv["k"], "v": new_kv["v"], "seg": kv_seg}
  return x, new_cache, router


def output_kernel(cfg: ModelConfig, params: Params) -> jnp.ndarray:
  """The [embed, vocab] projection to logits (the transposed embedding when tied)."""
  # (unpack: packed when it is the trainer's frozen tree, see ops.pack_frozen)
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
