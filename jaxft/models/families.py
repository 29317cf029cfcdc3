"""The layer pieces that Qwen3 and Gemma 2/3 add to the Llama decoder, each switched on by a
`ModelConfig` flag and called from models/llama.py: GeGLU (tanh GELU), tanh soft-capping of
attention scores and of logits, the softcapped attention itself, per-layer masks and RoPE
frequencies of models that mix sliding-window and global layers, and the cross-entropy of
soft-capped logits.

These are plain differentiable functions (autodiff), not the hand-written custom-gradient paths
of the Llama operations: the Llama path never reaches them.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxft.models.config import ModelConfig
from jaxft.models.rope import inverse_frequencies

_NEG = -1e30


def geglu(gate: jnp.ndarray, up: jnp.ndarray) -> jnp.ndarray:
  """gelu_tanh(gate) * up in float32 (HF's `gelu_pytorch_tanh`), returned in gate's dtype."""
  a = gate.astype(jnp.float32)
  return (jax.nn.gelu(a, approximate=True) * up.astype(jnp.float32)).astype(gate.dtype)


def softcap(x: jnp.ndarray, cap: float) -> jnp.ndarray:
  """cap * tanh(x / cap): bounds x to (-cap, cap), near identity for |x| << cap."""
  return cap * jnp.tanh(x / cap)


def query_scale(cfg: ModelConfig) -> float | None:
  """The factor queries are multiplied by so that the decoder's 1/sqrt(head_dim) score scale
  becomes query_pre_attn_scalar**-1/2 (Gemma); None when there is nothing to change."""
  if cfg.query_pre_attn_scalar is None or cfg.query_pre_attn_scalar == cfg.head_dim:
    return None
  return float(np.sqrt(cfg.head_dim) / np.sqrt(cfg.query_pre_attn_scalar))


def softcap_attention(q, k, v, mask, dtype, cap: float) -> jnp.ndarray:
  """Attention with soft-capped scores (Gemma 2): softmax(cap * tanh(q k^T / sqrt(hd) / cap) +
  mask) v. q [B,T,H,hd], k/v [B,S,K,hd], mask [B,T,S] bool -> [B,T,H*hd] in `dtype`; scores and
  softmax in float32, GQA without repeating keys."""
  B, T, H, hd = q.shape
  K = k.shape[2]
  qh = q.astype(dtype).reshape(B, T, K, H // K, hd)
  s = jnp.einsum("btkgd,bskd->bkgts", qh, k.astype(dtype), preferred_element_type=jnp.float32)
  s = softcap(s / np.sqrt(hd), cap)
  s = jnp.where(mask[:, None, None], s, _NEG)
  p = jax.nn.softmax(s, axis=-1).astype(dtype)
  out = jnp.einsum("bkgts,bskd->btkgd", p, v.astype(dtype), preferred_element_type=jnp.float32)
  return out.astype(dtype).reshape(B, T, H * hd)


def local_inverse_frequencies(cfg: ModelConfig) -> np.ndarray | None:
  """The sliding layers' own RoPE frequencies (Gemma 3's rope_local_base_freq, unscaled), or
  None when every layer uses `inverse_frequencies(cfg)`."""
  if cfg.rope_local_theta is None:
    return None
  return inverse_frequencies(dataclasses.replace(cfg, rope_theta=cfg.rope_local_theta,
                                                 rope_scaling=None))


def layer_variants(cfg: ModelConfig, mask_of, inv_freq):
  """The masks and RoPE frequencies of models with `layer_types` (Gemma 2/3), where
  `sliding_window` applies to the sliding layers only and those may have their own RoPE base.

  mask_of(window) -> the attention mask with that sliding window (None: none); inv_freq: the
  default frequencies. Returns (flags, default, local): flags [L] bool marking the sliding layers
  when layers differ (else None, and every layer uses `default`); default and local are
  (mask, inverse frequencies) of a global and of a sliding layer."""
  local_freq = local_inverse_frequencies(cfg)
  local = (mask_of(cfg.sliding_window), inv_freq if local_freq is None else local_freq)
  default = (mask_of(None), inv_freq)
  if cfg.sliding_layers is not None:
    return jnp.asarray(cfg.sliding_layers), default, local
  return None, (local if "sliding_attention" in cfg.layer_types else default), None


def softcapped_token_losses(cfg: ModelConfig, kernel, h, targets, chunk_tokens: int):
  """Per-token cross-entropy [B, T] (float32) of soft-capped logits (Gemma 2's
  final_logit_softcapping). kernel [embed, vocab]; the logits are made `chunk_tokens` rows at a
  time and rebuilt in the backward (jax.checkpoint), so the full [B*T, vocab] never exists."""
  B, T, D = h.shape
  n = B * T
  dtype = jnp.dtype(cfg.dtype)
  w = kernel.astype(dtype)

  @jax.checkpoint
  def ce(a, t):
    lg = jnp.einsum("nd,dv->nv", a, w, preferred_element_type=jnp.float32)
    lg = softcap(lg, cfg.final_softcap)
    lse = jax.nn.logsumexp(lg, axis=-1)
    return lse - jnp.take_along_axis(lg, t[:, None], axis=-1)[:, 0]

  hf = h.reshape(n, D).astype(dtype)
  tf = targets.reshape(n).astype(jnp.int32)
  if n <= chunk_tokens:
    return ce(hf, tf).reshape(B, T)
  pad = (-n) % chunk_tokens
  hf = jnp.pad(hf, ((0, pad), (0, 0))).reshape(-1, chunk_tokens, D)
  tf = jnp.pad(tf, (0, pad)).reshape(-1, chunk_tokens)
  return jax.lax.map(lambda a: ce(*a), (hf, tf)).reshape(-1)[:n].reshape(B, T)
