"""LoRA / DoRA / QLoRA on a Flax Linen module's params dict, as an NNX module jaxft trains.

`LinenLoRA(module, params, targets, ...)` holds the Linen module (static) and its params: the
frozen base (targeted or `quant_targets` kernels quantized by jaxft.quant) and the adapters
beside each targeted 2-D `kernel` as `nnx.LoRAParam`. Calling it runs `module.apply` on the
params with each adapted kernel made whole: W + scale * A B (LoRA; DoRA scales the columns to
its magnitudes with the norm held constant in the backward pass, as jaxft's DoRA). That is the
adapted layer's output, but it materialises each adapted (or quantized) kernel in float during
the step, which jaxft's NNX layers avoid; Linen layers cannot be swapped from outside.
`merged_params()` gives a plain params dict for `module.apply`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxft.errors import ConfigError
from jaxft.models import ops
from jaxft.nnx import layers, targets as targets_lib
from jaxft.peft import DoRA, flatten, unflatten

_KERNEL = "/kernel"


def _effective(method, w, p: dict, hold_norm: bool):
  """The kernel the adapted layer computes with, in w's logical dtype."""
  dtype = w.dtype
  if not p:
    return ops.weight(w, dtype)
  w2 = ops.weight(w, jnp.float32) + method.scale * (p["lora_a"] @ p["lora_b"])
  if isinstance(method, DoRA):
    norm = jnp.sqrt(jnp.sum(w2 * w2, axis=0))
    w2 = w2 * (p["magnitude"] / (jax.lax.stop_gradient(norm) if hold_norm else norm))
  return w2.astype(dtype)


class LinenLoRA(nnx.Module):
  """A Linen module with LoRA (or DoRA) on its 2-D kernels, trainable by jaxft.nnx.Trainer.

  targets, rank, alpha, method, rslora, quant_kind, quant_targets, seed: as `jaxft.nnx.lora`,
  matched against the layers' param paths without `/kernel` (`params/Dense_0`; a name item
  matches the last part, `Dense_0`). Raises ConfigError when a pattern matches no 2-D kernel."""

  def __init__(self, module, params: dict, targets: str = "all-linear", rank: int = 8,
               alpha: float = 16.0, *, method: str = "lora", rslora: bool = False,
               quant_kind: str = "none", quant_targets: str = "all-linear", seed: int = 0):
    if method not in layers.METHODS or int(rank) < 1:
      raise ConfigError(f"method={method!r}, rank={rank}: expected lora or dora and rank >= 1")
    flat = flatten(params)
    paths = [p[:-len(_KERNEL)] for p, v in flat.items() if p.endswith(_KERNEL) and v.ndim == 2]
    chosen = targets_lib.match(targets, paths)
    quantized = (set() if quant_kind == "none"
                 else set(targets_lib.match(quant_targets, paths, "quant_targets")))
    self.module = module
    self.method = layers.METHODS[method](targets=("t",), rank=int(rank), alpha=float(alpha),
                                         rslora=bool(rslora))
    self.adapted = tuple(sorted(set(chosen) | quantized))
    base, adapters = {}, {}
    for i, (path, value) in enumerate(flat.items()):
      layer = path[:-len(_KERNEL)]
      if layer in quantized and path.endswith(_KERNEL):
        value = layers.quantize_kernel(value, quant_kind)
      base[path] = nnx.Param(value)
      if layer in chosen and path.endswith(_KERNEL):
        init = layers.init_adapters(self.method, value, jax.random.fold_in(jax.random.key(seed), i))
        adapters.update({f"{layer}/{k}": nnx.LoRAParam(v) for k, v in init.items()})
    self.base, self.adapters = nnx.Dict(base), nnx.Dict(adapters)

  def _params(self, hold_norm: bool) -> dict:
    flat = {p: v.get_value() for p, v in self.base.items()}
    ad = {p: v.get_value() for p, v in self.adapters.items()}
    for layer in self.adapted:
      mine = {k: ad[f"{layer}/{k}"] for k in ("lora_a", "lora_b", "magnitude")
              if f"{layer}/{k}" in ad}
      flat[layer + _KERNEL] = _effective(self.method, flat[layer + _KERNEL], mine, hold_norm)
    return unflatten(flat)

  def __call__(self, *args, **kwargs):
    """module.apply(params with adapted kernels, *args, **kwargs)."""
    return self.module.apply(self._params(hold_norm=True), *args, **kwargs)

  def merged_params(self) -> dict:
    """The params dict with merged (and dequantized) kernels, for `module.apply`."""
    return jax.jit(lambda m: m._params(hold_norm=False))(self)
