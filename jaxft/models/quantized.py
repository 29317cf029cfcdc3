"""Quantizing a model's base: which leaves, their shardings, and init/quantization one kernel at a
time so that the whole float model never exists beside the quantized one.

Quantized: the decoder layers' linear kernels, `layers/{q,k,v,o,gate,up,down}_proj/kernel`
[L, in, out]. Norms, biases, embeddings and lm_head stay float. The tensor formats themselves
(NF4, int8, the pytree node) are jaxft.quant's; this module knows the model.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxft.models import llama
from jaxft.models.config import ModelConfig
from jaxft.quant import KINDS, is_quantized, quantize, shardings_for
from jaxft.quant.qtensor import QTensor


def quantizable(path: str) -> bool:
  """Whether the base leaf at `path` ("layers/q_proj/kernel") is quantized by model.quant."""
  parts = path.split("/")
  return (len(parts) == 3 and parts[0] == "layers" and parts[1] in llama.LINEARS
          and parts[2] == "kernel")


def _map_paths(fn, tree, prefix=""):
  return {k: (_map_paths(fn, v, f"{prefix}{k}/") if isinstance(v, dict) else fn(f"{prefix}{k}", v))
          for k, v in tree.items()}


def base_shardings(cfg: ModelConfig, kind: str, shardings) -> dict:
  """The shardings tree of the base with `kind` quantization, from the float base's shardings."""
  if kind == "none":
    return shardings
  specs = llama.param_specs(cfg)
  dtype = jnp.dtype(cfg.param_dtype)

  def one(path, sh):
    if not quantizable(path):
      return sh
    spec = _get(specs, path)
    return shardings_for(kind, spec.shape, dtype, sh)
  return _map_paths(one, shardings)


def _get(tree, path):
  for k in path.split("/"):
    tree = tree[k]
  return tree


def _quantize_layers(w: jax.Array, kind: str) -> QTensor:
  """Quantizes a stacked kernel one layer slice at a time (lax.map), so the temporaries of
  quantization are one layer's, not the stack's."""
  if w.ndim == 2:
    return quantize(w, kind)
  return jax.lax.map(lambda x: _quantize_layers(x, kind), w)


def init_base(cfg: ModelConfig, rng: jax.Array, kind: str, shardings) -> dict:
  """Random base params with the linear kernels quantized, made one layer slice at a time.

  Leaves other than the kernels equal `llama.init_params(cfg, rng)`. Each kernel is drawn and
  quantized inside its own jitted call, one layer at a time under `lax.map` (layer i of a kernel
  from `fold_in(leaf key, i)`, normal(0, initializer_range) as in llama.init_params), so only one
  layer's float slice and its temporaries exist at once beside the quantized model. Drawing the
  whole [L, in, out] kernel at once would hold several float copies of it (the random bits and
  their transforms), which is what this avoids; the price is that the quantized random base is not
  the quantization of the float random base of the same seed (the run fingerprint includes
  model.quant, so checkpoints never mix them). `shardings` is the float base's NamedSharding tree.
  """
  if kind == "none":
    return jax.jit(llama.init_params, static_argnums=0, out_shardings=shardings)(cfg, rng)
  out_sh = base_shardings(cfg, kind, shardings)
  base = jax.block_until_ready(_rest_init(cfg, *_hashable(shardings))(rng))
  specs = llama.param_specs(cfg)
  paths = [path for path, _ in _flat(specs)]
  keys = jax.random.split(rng, len(paths))  # the leaf keys of llama.init_params
  for idx, path in enumerate(paths):
    if quantizable(path):
      fn = _kernel_init(_get(specs, path).shape, cfg.param_dtype, cfg.initializer_range, kind,
                        *_hashable(_get(out_sh, path)))
      _, name, leaf = path.split("/")
      base["layers"][name][leaf] = jax.block_until_ready(fn(keys[idx]))
  return base


# The jitted inits are cached on (shapes, dtypes, shardings): kernels of one shape share one
# (q/o, gate/up), and loading the same model again in a process (restore_trained, a test) does not
# compile again.
def _hashable(tree):
  leaves, treedef = jax.tree.flatten(tree)
  return tuple(leaves), treedef


@functools.lru_cache(maxsize=16)
def _rest_init(cfg: ModelConfig, sh_leaves, sh_def):
  """jitted rng -> the base without the quantizable kernels (None in their place)."""
  rest_sh = _map_paths(lambda path, s: None if quantizable(path) else s,
                       jax.tree.unflatten(sh_def, sh_leaves))

  def rest(r):
    p = llama.init_params(cfg, r)  # XLA drops the kernels nobody returns
    return _map_paths(lambda path, x: None if quantizable(path) else x, p)
  return jax.jit(rest, out_shardings=rest_sh)


@functools.lru_cache(maxsize=64)
def _kernel_init(shape, dtype: str, std: float, kind: str, sh_leaves, sh_def):
  """jitted key -> a quantized random kernel [L, in, out], drawn and quantized layer by layer."""

  def make(key):
    def layer(i):
      w = std * jax.random.normal(jax.random.fold_in(key, i), shape[1:])
      return quantize(w.astype(dtype), kind)
    return jax.lax.map(layer, jnp.arange(shape[0]))
  return jax.jit(make, out_shardings=jax.tree.unflatten(sh_def, sh_leaves))


def _flat(specs):
  """(path, spec) in the leaf order of jax.tree.flatten (what llama.init_params splits keys by)."""
  flat, _ = jax.tree_util.tree_flatten_with_path(specs, is_leaf=llama.is_spec)
  return [("/".join(k.key for k in kp), s) for kp, s in flat]


def quantize_base(base: dict, kind: str, shardings) -> dict:
  """Quantizes the linear kernels of a float base tree, one kernel (and within it one layer
  slice) at a time; other leaves are returned as they are. `shardings` is the float base's
  NamedSharding tree. The float kernels are freed once the caller drops `base`."""
  if kind not in KINDS:
    raise ValueError(f"unknown quantization kind {kind!r}; expected one of {', '.join(KINDS)}")
  if kind == "none":
    return base

  def one(path, x):
    if not quantizable(path) or is_quantized(x):
      return x
    sh = shardings_for(kind, x.shape, x.dtype, _get(shardings, path))
    return jax.block_until_ready(
        jax.jit(lambda w: _quantize_layers(w, kind), out_shardings=sh)(x))
  return _map_paths(one, base)

