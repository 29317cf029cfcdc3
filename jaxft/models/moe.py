"""The mixture-of-experts MLP of Mixtral and Qwen3-MoE, and its load-balancing loss.

Per layer: a router `router/kernel` [embed, E] and E SwiGLU experts stored stacked on an `expert`
axis, `gate_proj/kernel`, `up_proj/kernel` [E, embed, F] and `down_proj/kernel` [E, F, embed] (a
leading layers axis outside the scan). Each token goes to the k experts of highest router
probability (softmax over all E, in float32), weighted by those probabilities, renormalised to sum
to 1 when `norm_topk_prob` (Mixtral always; Qwen3-MoE as its config says), as transformers does.

Dispatch is grouped, not dense: the (token, choice) pairs are sorted by expert and each expert's
rows are multiplied by its own weights with `jax.lax.ragged_dot`, so the FLOPs are k/E of running
every expert on every token (Qwen3-30B-A3B: 8 of 128; dense dispatch would do 16x the MLP work).
The method hooks (`Method.expert_linear`) receive the sorted rows and the group sizes, so LoRA on
the experts is a per-expert ragged product too.

The load-balancing loss is transformers' `load_balancing_loss_func`: over the tokens of every
layer together (padding excluded), E * sum_e sum_j f_je * P_e where f_je is the fraction of tokens
whose j-th choice is expert e and P_e the mean router probability of e. The decoder returns the
per-layer sums it needs (`router_stats`), so the loss is exact for any number of layers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxft.models.config import ModelConfig
from jaxft.models.ops import swiglu, unpack_16bit

EXPERT_LINEARS = ("gate_proj", "up_proj", "down_proj")


def route(cfg: ModelConfig, router_kernel, x: jnp.ndarray):
  """Router of tokens x [N, D]: (logits [N, E] float32, top-k weights [N, k] float32, top-k
  expert ids [N, k] int32)."""
  logits = jnp.einsum("nd,de->ne", x, unpack_16bit(router_kernel).astype(x.dtype),
                      preferred_element_type=jnp.float32)
  probs = jax.nn.softmax(logits, axis=-1)
  weights, ids = jax.lax.top_k(probs, cfg.experts_per_token)
  if cfg.norm_topk_prob:
    weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
  return logits, weights, ids.astype(jnp.int32)


def router_stats(cfg: ModelConfig, logits: jnp.ndarray, ids: jnp.ndarray, valid: jnp.ndarray):
  """The sums behind the load-balancing loss of one layer: {"counts": [k, E] number of valid
  tokens whose j-th choice is e, "probs": [E] sum of router probabilities over valid tokens,
  "tokens": valid tokens}. valid [N] bool (False: padding)."""
  v = valid.astype(jnp.float32)
  chosen = jax.nn.one_hot(ids, cfg.num_experts, dtype=jnp.float32)  # [N, k, E]
  return {"counts": jnp.einsum("nke,n->ke", chosen, v),
          "probs": jnp.einsum("ne,n->e", jax.nn.softmax(logits, axis=-1), v),
          "tokens": jnp.sum(v)}


def load_balancing_loss(cfg: ModelConfig, stats) -> jnp.ndarray:
  """transformers' load_balancing_loss_func from per-layer `router_stats` stacked on a leading
  layers axis: every layer's tokens count as separate rows of one mean."""
  n = jnp.maximum(jnp.sum(stats["tokens"]), 1.0)
  f = jnp.sum(stats["counts"], axis=0) / n  # [k, E]
  p = jnp.sum(stats["probs"], axis=0) / n  # [E]
  return jnp.sum(f * p[None]) * cfg.num_experts


def moe_mlp(cfg: ModelConfig, adapter, p, h: jnp.ndarray, valid: jnp.ndarray, dtype, rng):
  """The MoE block on h [B, T, D]: (output [B, T, D] in dtype, router logits [B*T, E], the
  layer's router_stats). `p` holds this layer's router and expert leaves (and the method's)."""
  B, T, D = h.shape
  k = cfg.experts_per_token
  x = h.reshape(B * T, D).astype(dtype)
  logits, weights, ids = route(cfg, p["router"]["kernel"], x)
  flat = ids.reshape(-1)  # [N*k]: choice j of token n at n*k + j
  order = jnp.argsort(flat, stable=True)
  rows = order // k  # the token of each sorted (token, choice) pair
  sizes = jnp.bincount(flat, length=cfg.num_experts).astype(jnp.int32)
  xs = jnp.take(x, rows, axis=0)
  lin = lambda name, a: adapter.expert_linear(name, p[name], a, sizes, dtype, rng)
  act = swiglu(lin("gate_proj", xs), lin("up_proj", xs))
  ys = lin("down_proj", act)
  ys = ys * jnp.take(weights.reshape(-1), order).astype(dtype)[:, None]
  out = jnp.zeros((B * T, D), jnp.float32).at[rows].add(ys.astype(jnp.float32))
  stats = router_stats(cfg, logits, ids, valid.reshape(-1))
  return out.astype(dtype).reshape(B, T, D), logits, stats
