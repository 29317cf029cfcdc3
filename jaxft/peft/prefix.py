"""Prefix tuning: `length` trainable key/value vectors per layer that every query attends to.

Leaves: layers/prefix/key and layers/prefix/value [L, P, kv_heads, head_dim], used as they are
(they are not rotated: like PEFT's past_key_values, they sit in the attention as already-rotated
keys). The decoder concatenates them before the keys with a mask that shows them to every query
(each packed example too, and every decoding step, since they live in the params, not the cache),
and the real tokens' positions start after them (`position_offset = length`), as in PEFT, where
the prefixes fill the first `length` slots of the cache.

With `mlp_hidden` > 0 the prefixes are reparameterised during training as in Li & Liang and PEFT's
`prefix_projection`: prefix_mlp/embedding [P, kv] -> Linear(kv, H) -> tanh -> Linear(H, L*2*kv)
(kv = kv_heads * head_dim), computed once per forward pass in `layer_params`. `fold` evaluates the
MLP and returns the plain key/value leaves (what export writes; the MLP is a training device).

PEFT stores the folded prefixes as `prompt_embeddings` [P, L*2*kv]; each row is ordered
(layer, key|value, kv head, head_dim).
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import jax
import jax.numpy as jnp

from jaxft.errors import ConfigError
from jaxft.models import llama
from jaxft.peft import peft_io
from jaxft.peft.base import ADAPTER_DTYPE, Method, Params


@dataclasses.dataclass(frozen=True)
class Prefix(Method):
  name: str = "prefix"
  export_format: ClassVar[str] = "peft"
  length: int = 16
  mlp_hidden: int = 0  # 0 = train the prefixes directly

  def write_export(self, directory, cfg, trainable, base_model: str = "") -> None:
    """PEFT's prefix-tuning adapter (the MLP folded into the prefixes), see peft_io."""
    peft_io.write_adapter(directory, self, cfg, trainable, base_model, peft_io.prefix_tensors)

  def __post_init__(self):
    # Real tokens take the positions after the virtual ones (static: part of the jit key).
    object.__setattr__(self, "position_offset", int(self.length))

  # -- the partition -------------------------------------------------------------------------
  def trainable_specs(self, cfg):
    L, P, K, hd = cfg.num_layers, self.length, cfg.num_kv_heads, cfg.head_dim
    if not self.mlp_hidden:
      kv = llama.ParamSpec((L, P, K, hd), ("layers", "prefix", "kv_heads", "head_dim"), "normal")
      return {"layers": {"prefix": {"key": kv, "value": kv}}}
    H, D = self.mlp_hidden, cfg.kv_size
    return {"prefix_mlp": {
        "embedding": llama.ParamSpec((P, D), ("prefix", "adapter"), "normal"),
        "w1": llama.ParamSpec((D, H), ("adapter", "adapter"), "normal"),
        "b1": llama.ParamSpec((H,), ("adapter",), "normal"),
        "w2": llama.ParamSpec((H, L * 2 * D), ("adapter", "adapter"), "normal"),
        "b2": llama.ParamSpec((L * 2 * D,), ("adapter",), "normal")}}

  def init(self, cfg, rng):
    # PEFT's defaults: nn.Embedding ~ N(0, 1); nn.Linear ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    # Float32 master weights whatever the base's dtype, as LoRA's.
    dtype = ADAPTER_DTYPE
    specs = self.trainable_specs(cfg)
    if not self.mlp_hidden:
      shape = specs["layers"]["prefix"]["key"].shape
      k1, k2 = jax.random.split(rng)
      normal = lambda k: jax.random.normal(k, shape, jnp.float32).astype(dtype)
      return {"layers": {"prefix": {"key": normal(k1), "value": normal(k2)}}}
    m = specs["prefix_mlp"]
    keys = jax.random.split(rng, 5)
    uni = lambda k, s, fan_in: jax.random.uniform(k, s, jnp.float32, -1.0, 1.0) / math.sqrt(fan_in)
    D, H = cfg.kv_size, self.mlp_hidden
    out = {"embedding": jax.random.normal(keys[0], m["embedding"].shape, jnp.float32),
           "w1": uni(keys[1], m["w1"].shape, D), "b1": uni(keys[2], m["b1"].shape, D),
           "w2": uni(keys[3], m["w2"].shape, H), "b2": uni(keys[4], m["b2"].shape, H)}
    return {"prefix_mlp": jax.tree.map(lambda x: x.astype(dtype), out)}

  def fold(self, cfg, trainable: Params) -> Params:
    """The plain prefixes {"layers": {"prefix": {"key", "value"}}} [L, P, K, hd] in float32: the
    reparameterising MLP evaluated (or the trained prefixes themselves without one)."""
    if not self.mlp_hidden:
      return jax.tree.map(lambda x: x.astype(jnp.float32), trainable)
    return {"layers": {"prefix": _mlp_prefixes(cfg, self.length, trainable["prefix_mlp"],
                                               jnp.float32)}}

  # -- decoder hooks -------------------------------------------------------------------------
  def layer_params(self, cfg, params):
    if not self.mlp_hidden:
      return params["layers"]
    prefixes = _mlp_prefixes(cfg, self.length, params["prefix_mlp"], jnp.dtype(cfg.dtype))
    return {**params["layers"], "prefix": prefixes}

  def kv_prefix(self, p, batch, dtype):
    k, v = p["prefix"]["key"], p["prefix"]["value"]
    return (jnp.broadcast_to(k.astype(dtype), (batch, *k.shape)),
            jnp.broadcast_to(v.astype(dtype), (batch, *v.shape)))

  def merge(self, cfg, params):
    raise ConfigError("peft.method=prefix adds key/value prefixes that no base weight can hold; "
                      "export with --format=peft (PEFT's prefix-tuning format) instead")


def _mlp_prefixes(cfg, length: int, m: Params, dtype) -> Params:
  """Every layer's key/value prefixes [L, P, K, hd] from the reparameterising MLP (float32 math)."""
  f32 = lambda x: x.astype(jnp.float32)
  h = jnp.tanh(f32(m["embedding"]) @ f32(m["w1"]) + f32(m["b1"]))
  flat = h @ f32(m["w2"]) + f32(m["b2"])  # [P, L*2*kv], PEFT's prompt_embeddings layout
  kv = flat.reshape(length, cfg.num_layers, 2, cfg.num_kv_heads, cfg.head_dim)
  kv = jnp.transpose(kv, (1, 2, 0, 3, 4)).astype(dtype)  # [L, 2, P, K, hd]
  return {"key": kv[:, 0], "value": kv[:, 1]}
