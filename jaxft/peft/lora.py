"""LoRA: y = x W + (alpha / r) * dropout(x) A B, with B = 0 at init so step 0 is the base model.

A is [L, in, r], B is [L, r, out], beside the kernel they adapt (layers/q_proj/lora_a). PEFT stores
A as [r, in] and B as [out, r]; jaxft/peft/peft_io.py transposes on the way in and out.
rsLoRA scales by alpha / sqrt(r).
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import jax
import jax.numpy as jnp

from jaxft.models import llama, ops
from jaxft.peft import peft_io
from jaxft.peft.base import ADAPTER_DTYPE, Method, base_linear, linear_dims, linear_lead


@dataclasses.dataclass(frozen=True)
class LoRA(Method):
  name: str = "lora"
  export_format: ClassVar[str] = "peft"
  targets: tuple[str, ...] = ("q_proj", "v_proj")
  rank: int = 8
  alpha: float = 16.0
  dropout: float = 0.0
  rslora: bool = False

  def write_export(self, directory, cfg, trainable, base_model: str = "") -> None:
    """PEFT's LoRA adapter (DoRA's too: use_dora and the magnitudes), see peft_io."""
    peft_io.write_adapter(directory, self, cfg, trainable, base_model, peft_io.lora_tensors)

  @property
  def scale(self) -> float:
    return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

  def trainable_specs(self, cfg):
    out = {}
    for n in self.targets:
      i, o, ai, ao = linear_dims(cfg, n)
      lead, axes = linear_lead(cfg, n)  # [L] or, for experts, [L, E]: one A, B per expert
      out[n] = {"lora_a": llama.ParamSpec((*lead, i, self.rank), (*axes, ai, "lora"), "lora_a"),
                "lora_b": llama.ParamSpec((*lead, self.rank, o), (*axes, "lora", ao), "zeros")}
    return {"layers": out}

  def init(self, cfg, rng):
    # A as PEFT: kaiming-uniform(a=sqrt(5)) on [r, in], i.e. U(-1/sqrt(in), 1/sqrt(in)); B zero.
    # A and B are float32 master weights whatever model.param_dtype stores the base in (as PEFT's
    # autocast_adapter_dtype): AdamW steps on bf16 weights would mostly round away.
    out = {}
    for idx, n in enumerate(self.targets):
      i, o, _, _ = linear_dims(cfg, n)
      lead, _ = linear_lead(cfg, n)
      bound = 1.0 / math.sqrt(i)
      a = jax.random.uniform(jax.random.fold_in(rng, idx), (*lead, i, self.rank),
                             jnp.float32, -bound, bound)
      out[n] = {"lora_a": a.astype(ADAPTER_DTYPE),
                "lora_b": jnp.zeros((*lead, self.rank, o), ADAPTER_DTYPE)}
    return {"layers": out}

  def _dropout(self, name, x, rng):
    if self.dropout <= 0.0 or rng is None:
      return x
    key = jax.random.fold_in(rng, llama.LINEARS.index(name))
    keep = jax.random.bernoulli(key, 1.0 - self.dropout, x.shape)
    return jnp.where(keep, x / (1.0 - self.dropout), 0).astype(x.dtype)

  def delta(self, name, p, x, dtype, rng):
    h = ops.matmul(self._dropout(name, x, rng), p["lora_a"], dtype)
    return ops.matmul(h, p["lora_b"], dtype) * jnp.asarray(self.scale, dtype)

  def linear(self, name, p, x, dtype, rng):
    y = base_linear(p, x, dtype)
    if "lora_a" in p:
      y = y + self.delta(name, p, x, dtype, rng)
    return y

  def expert_linear(self, name, p, x, group_sizes, dtype, rng):
    y = ops.ragged_matmul(x, p["kernel"], group_sizes, dtype)
    if "lora_a" in p:  # each expert's own A [in, r] and B [r, out], on its own rows
      h = ops.ragged_matmul(self._dropout(name, x, rng), p["lora_a"], group_sizes, dtype)
      y = y + ops.ragged_matmul(h, p["lora_b"], group_sizes, dtype) * jnp.asarray(self.scale, dtype)
    return y

  def merge(self, cfg, params):
    return self._merge_each(cfg, params, lambda w, p: w)

  def _merge_each(self, cfg, params, finish):
    """params with each target's kernel W replaced by finish(W + scale * A B, rest) in
    model.param_dtype, A and B dropped; `rest` holds the target's other leaves (finish may pop
    its own, as DoRA's magnitude)."""
    layers = dict(params["layers"])
    for n in self.targets:
      p = dict(layers[n])
      w = ops.weight(p.pop("kernel"), jnp.float32)
      a, b = p.pop("lora_a").astype(jnp.float32), p.pop("lora_b").astype(jnp.float32)
      p["kernel"] = finish(w + self.scale * jnp.einsum("...ir,...ro->...io", a, b), p).astype(
          cfg.param_dtype)
      layers[n] = p
    return {**params, "layers": layers}
