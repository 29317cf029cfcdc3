"""LoRA, DoRA and QLoRA on a user's Flax NNX module, by replacing its targeted `nnx.Linear` layers.

`lora(model, targets, rank, ...)` returns a copy of the module in which each targeted linear is an
`AdaptedLinear`: the frozen kernel (float, or NF4/int8 from jaxft.quant) and bias, with the
method's trainable leaves beside them as `nnx.LoRAParam` (`lora_a` [in, r], `lora_b` [r, out],
DoRA's `magnitude` [out]). Paths stay the user's (`layers/0/attn/q/kernel`, `.../q/lora_a`), so
`nnx.split(model, nnx.LoRAParam, ...)` is the trainable/frozen partition. The layer computes with
jaxft's own methods (jaxft.peft LoRA/DoRA `linear`: NF4 dequantized inside the computation, no
float copy of the base kept) and merges with their `merge`. `merge(model)` gives back a module of
the user's classes with plain `nnx.Linear` layers holding merged kernels.
"""

from __future__ import annotations

import functools
import math
import types

import jax
import jax.numpy as jnp
from flax import nnx

from jaxft import quant
from jaxft.errors import ConfigError
from jaxft.models import ops
from jaxft.nnx import targets as targets_lib
from jaxft.peft import DoRA, LoRA, Method

_T = "t"  # the one target name of a layer's method (jaxft's methods loop over named targets)
METHODS = {"lora": LoRA, "dora": DoRA}


def _stack(tree):
  """Adds a leading axis of 1 to every array (quantized nodes too): a one-layer stack, the shape
  jaxft's decoder methods work on."""
  return jax.tree.map(lambda x: x[None], tree)


class AdaptedLinear(nnx.Module):
  """An `nnx.Linear` with a frozen (possibly quantized) kernel and the method's trainable leaves.

  Built by `lora`; call it as the linear it replaces. `merged()` returns that linear (the user's
  `nnx.Linear`, same settings) with kernel = base + adapter."""

  def __init__(self, linear: nnx.Linear, method: Method, kernel, adapters: dict):
    w = linear.kernel.get_value()
    self.template = nnx.graphdef(linear)  # static: rebuilds the user's layer on merge
    self.method = method
    self.dtype = linear.dtype
    self.kernel_dtype = jnp.dtype(w.dtype).name
    self.kernel = nnx.Param(kernel)
    # nnx.data: these attributes hold Variables or None (an empty slot, not static metadata).
    self.bias = nnx.data(None if linear.bias is None else nnx.Param(linear.bias.get_value()))
    self.lora_a = self.lora_b = self.magnitude = nnx.data(None)
    for name, value in adapters.items():
      setattr(self, name, nnx.LoRAParam(value))

  def _params(self) -> dict:
    p = {"kernel": self.kernel.get_value()}
    for name in ("bias", "lora_a", "lora_b", "magnitude"):
      v = getattr(self, name)
      if v is not None:
        p[name] = v.get_value()
    return p

  def __call__(self, x):
    dtype = self.dtype or jnp.result_type(x.dtype, self.kernel_dtype)
    return self.method.linear(_T, self._params(), x, dtype, None)

  def merged(self) -> nnx.Module:
    """The replaced `nnx.Linear` with kernel = (dequantized) base + adapter, in the base's dtype."""
    p = self._params()
    bias = p.pop("bias", None)
    w = _merged_kernel(self.method, self.kernel_dtype, p)
    state = {"kernel": nnx.Param(w)}
    if bias is not None:
      state["bias"] = nnx.Param(bias)
    return nnx.merge(self.template, nnx.State(state))


@functools.partial(jax.jit, static_argnums=(0, 1))
def _merged_kernel(method: Method, dtype: str, p: dict):
  """kernel + adapter through the method's own `merge` (on a one-layer stack), in `dtype`."""
  if "lora_a" not in p:
    return ops.weight(p["kernel"], dtype)
  cfg = types.SimpleNamespace(param_dtype=jnp.dtype(dtype))
  return method.merge(cfg, {"layers": {_T: _stack(p)}})["layers"][_T]["kernel"][0]


# quant.quantize jitted (once per kernel shape): op by op it costs seconds of small compiles.
quantize_kernel = jax.jit(quant.quantize, static_argnums=(1,))


def _child(parent, key):
  return parent[key] if isinstance(key, int) or not hasattr(parent, key) else getattr(parent, key)


def _replace(model, path: tuple, new) -> None:
  parent = model
  for key in path[:-1]:
    parent = _child(parent, key)
  if isinstance(path[-1], int) or not hasattr(parent, path[-1]):
    parent[path[-1]] = new
  else:
    setattr(parent, path[-1], new)


@functools.partial(jax.jit, static_argnums=(0,))
def init_adapters(method: LoRA, kernel, rng) -> dict:
  """A as PEFT and jaxft's LoRA (U(-1/sqrt(in), 1/sqrt(in))), B = 0, float32; DoRA's magnitude
  the column norms of the (dequantized) base, through jaxft's DoRA.init_from_base."""
  n_in, n_out = kernel.shape
  bound = 1.0 / math.sqrt(n_in)
  out = {"lora_a": jax.random.uniform(rng, (n_in, method.rank), jnp.float32, -bound, bound),
         "lora_b": jnp.zeros((method.rank, n_out), jnp.float32)}
  if isinstance(method, DoRA):
    out["magnitude"] = jnp.ones((n_out,), jnp.float32)
    done = method.init_from_base(None, {"layers": {_T: {"kernel": _stack(kernel)}}},
                                 {"layers": {_T: _stack(out)}})
    out = jax.tree.map(lambda x: x[0], done["layers"][_T])
  return out


def lora(model: nnx.Module, targets: str = "all-linear", rank: int = 8, alpha: float = 16.0, *,
         method: str = "lora", rslora: bool = False, quant_kind: str = "none",
         quant_targets: str = "all-linear", seed: int = 0) -> nnx.Module:
  """A copy of `model` with LoRA (or DoRA) on the `nnx.Linear` layers `targets` selects.

  targets: `peft.targets`' grammar over the module's paths (see jaxft.nnx.targets): layer names
  (`q,v`), `all-linear`, or regexes over kernel paths. rank, alpha, rslora: as peft.lora.*.
  method: "lora" or "dora". quant_kind: "none", "nf4" (QLoRA) or "int8": the kernels of the layers
  `quant_targets` selects are stored quantized (jaxft.quant) and stay frozen. seed: A's init.
  The given module is left as it was (the copy shares its unchanged arrays). Trainable leaves are
  `nnx.LoRAParam`; everything else is frozen. Raises ConfigError for bad settings or targets."""
  if method not in METHODS:
    raise ConfigError(f"method={method!r}: expected one of {', '.join(METHODS)}")
  if int(rank) < 1:
    raise ConfigError(f"rank={rank}: must be >= 1")
  if quant_kind not in quant.KINDS:
    raise ConfigError(f"quant_kind={quant_kind!r}: expected one of {', '.join(quant.KINDS)}")
  model = nnx.clone(model)
  paths = targets_lib.linears(model)
  chosen = set(targets_lib.match(targets, paths))
  quantized = (set() if quant_kind == "none"
               else set(targets_lib.match(quant_targets, paths, "quant_targets")))
  adapter = METHODS[method](targets=(_T,), rank=int(rank), alpha=float(alpha), rslora=bool(rslora))
  key = jax.random.key(seed)
  for i, (name, path) in enumerate(paths.items()):
    if name not in chosen and name not in quantized:
      continue
    linear = nnx.clone(_child_at(model, path))
    kernel = linear.kernel.get_value()
    if name in quantized:
      kernel = quantize_kernel(kernel, quant_kind)
    if name in chosen:
      layer = AdaptedLinear(linear, adapter, kernel, init_adapters(adapter, kernel,
                                                               jax.random.fold_in(key, i)))
    else:
      layer = AdaptedLinear(linear, Method(), kernel, {})
    _replace(model, path, layer)
  return model


def _child_at(model, path):
  for key in path:
    model = _child(model, key)
  return model


def merge(model: nnx.Module) -> nnx.Module:
  """A copy of `model` with every `AdaptedLinear` replaced by the user's `nnx.Linear` holding
  kernel = base + adapter (quantized bases dequantized): the module of the user's classes, ready
  to use or save without jaxft."""
  model = nnx.clone(model)
  found = [(tuple(p), m) for p, m in nnx.iter_modules(model) if isinstance(m, AdaptedLinear)]
  for path, layer in found:
    _replace(model, path, layer.merged())
  return model
