"""Hugging Face checkpoints <-> jaxft's param tree: the public API of HF interop (config.json in
hf_config.py, the files in safetensors_io.py).

Loading streams one tensor at a time: each is read from its safetensors file (the file is opened
and closed around every tensor, so the operating system's mapping of it never piles up in the
process), sent to the devices already laid out as its target sharding, then transposed, cast and,
for the stacked decoder layers, written into its slice of a stacked array that was allocated once
on the mesh. Host memory peaks near the largest tensor, not near the model.

HF names (out x in linear weights) and our paths (in x out kernels, layers stacked):
  model.embed_tokens.weight [V, D]            embed/embedding [V, D]
  model.norm.weight                           final_norm/scale
  lm_head.weight [V, D]                       lm_head/kernel [D, V]   (absent when tied)
  model.layers.N.input_layernorm.weight       layers/attn_norm/scale[N]
  model.layers.N.post_attention_layernorm.weight   layers/mlp_norm/scale[N]
  model.layers.N.self_attn.q_proj.weight [o, i]    layers/q_proj/kernel[N] [i, o]   (+ .bias)
  model.layers.N.mlp.gate_proj.weight [o, i]       layers/gate_proj/kernel[N] [i, o]
Only safetensors and JSON are read: pickle checkpoints (.bin, .pt) are refused, never opened.
"""

from __future__ import annotations

import functools
import re
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxft import quant
from jaxft.errors import CheckpointError
from jaxft.models import llama, moe, ops
from jaxft.models.config import ModelConfig
from jaxft.models.hf_config import ARCHITECTURES, checkpoint_dtype, hf_config, read_config
from jaxft.models.safetensors_io import (INDEX, read_tensor, refuse_pickle, shard_entries,
                                        tensor_files, write_safetensors)

__all__ = ["ARCHITECTURES", "INDEX", "read_config", "checkpoint_dtype", "hf_config", "load_params",
           "tensor_files", "refuse_pickle", "write_safetensors", "shard_entries",
           "expected_names", "export_names", "stream_params", "hf_name", "host_tensor"]

# Buffers that old checkpoints saved beside the weights; they are recomputed, not loaded.
_IGNORED = re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")


# -- names ---------------------------------------------------------------------------------------

_LAYER_NAMES = {"input_layernorm.weight": ("attn_norm", "scale"),
                "post_attention_layernorm.weight": ("mlp_norm", "scale")}
for _n in llama.LINEARS:
  _block = "self_attn" if _n in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
  _LAYER_NAMES[f"{_block}.{_n}.weight"] = (_n, "kernel")
  if _n in ("q_proj", "k_proj", "v_proj"):
    _LAYER_NAMES[f"{_block}.{_n}.bias"] = (_n, "bias")
_LAYER_NAMES.update({"self_attn.q_norm.weight": ("q_norm", "scale"),
                     "self_attn.k_norm.weight": ("k_norm", "scale")})
# Gemma 2/3 norm four times per layer; their post_attention_layernorm is the attention output's.
_POST_NORM_NAMES = {"input_layernorm.weight": ("attn_norm", "scale"),
                    "post_attention_layernorm.weight": ("attn_post_norm", "scale"),
                    "pre_feedforward_layernorm.weight": ("mlp_norm", "scale"),
                    "post_feedforward_layernorm.weight": ("mlp_post_norm", "scale")}
_TOP_NAMES = {"model.embed_tokens.weight": ("embed", "embedding"),
              "model.norm.weight": ("final_norm", "scale"), "lm_head.weight": ("lm_head", "kernel")}
_OURS_TO_LAYER = {v: k for k, v in _LAYER_NAMES.items()}
_OURS_TO_POST_NORM = {v: k for k, v in {**_LAYER_NAMES, **_POST_NORM_NAMES}.items()
                      if k != "post_attention_layernorm.weight" or v[0] == "attn_post_norm"}


# Mixture of experts on disk (what the hub's checkpoints and transformers' save_pretrained hold):
# the router and each expert as its own [out, in] matrix, in the block each family names.
#   Mixtral:   model.layers.N.block_sparse_moe.gate.weight [E, D]
#              model.layers.N.block_sparse_moe.experts.J.{w1,w3,w2}.weight (gate, up, down)
#   Qwen3-MoE: model.layers.N.mlp.gate.weight [E, D]
#              model.layers.N.mlp.experts.J.{gate_proj,up_proj,down_proj}.weight
MOE_BLOCKS = {"MixtralForCausalLM": ("block_sparse_moe", {"gate_proj": "w1", "up_proj": "w3",
                                                          "down_proj": "w2"}),
              "Qwen3MoeForCausalLM": ("mlp", {n: n for n in moe.EXPERT_LINEARS})}


def hf_name(path: tuple[str, ...], layer=None, post_norms: bool = False, arch: str = "") -> str:
  """The HF tensor name of our leaf `path` (e.g. ('layers', 'q_proj', 'kernel')) at `layer`
  (an int, or (layer, expert) for the experts of a mixture-of-experts `arch`); `post_norms`:
  the Gemma 2/3 names of the four norms of a layer."""
  if path[0] == "layers" and arch in MOE_BLOCKS and path[1] in ("router", *moe.EXPERT_LINEARS):
    block, names = MOE_BLOCKS[arch]
    if path[1] == "router":
      return f"model.layers.{layer}.{block}.gate.weight"
    i, e = layer
    return f"model.layers.{i}.{block}.experts.{e}.{names[path[1]]}.weight"
  if path[0] == "layers":
    names = _OURS_TO_POST_NORM if post_norms else _OURS_TO_LAYER
    return f"model.layers.{layer}.{names[path[1:]]}"
  return {v: k for k, v in _TOP_NAMES.items()}[path]


def _index(layer) -> tuple[int, ...]:
  """The leading indices of one HF tensor in its stacked leaf: () , (layer,) or (layer, expert)."""
  return () if layer is None else tuple(layer) if isinstance(layer, tuple) else (layer,)


def _transposed(path: tuple[str, ...]) -> bool:
  return path[-1] == "kernel"


def expected_names(cfg: ModelConfig) -> dict[str, tuple[tuple[str, ...], int | None, tuple[int, ...]]]:
  """{HF name: (our path, layer or None, HF shape)} of every tensor a checkpoint of cfg holds."""
  out = {}
  flat = _flat_specs(cfg)
  for path, spec in flat.items():
    experts = len(spec.axes) > 1 and spec.axes[1] == "expert"
    shape = spec.shape[1 + experts:] if path[0] == "layers" else spec.shape
    if _transposed(path):
      shape = shape[::-1]
    layers = range(cfg.num_layers) if path[0] == "layers" else [None]
    if experts:
      layers = [(i, e) for i in layers for e in range(cfg.num_experts)]
    for i in layers:
      out[hf_name(path, i, cfg.post_norms, cfg.architecture)] = (path, i, tuple(shape))
  return out


def _flat_specs(cfg: ModelConfig) -> dict[tuple[str, ...], llama.ParamSpec]:
  leaves = jax.tree_util.tree_flatten_with_path(llama.param_specs(cfg), is_leaf=llama.is_spec)[0]
  return {tuple(k.key for k in kp): s for kp, s in leaves}


# -- files ---------------------------------------------------------------------------------------

# -- loading -------------------------------------------------------------------------------------

def _quantizer(kind: str):
  """`quant.quantize` for kind, or None for 'none'. The quantized value is a pytree whose leaves
  keep the array's leading dims, so one layer quantized as [1, in, out] fills slice i of the
  stacked [L, in, out] value."""
  if kind == "none":
    return None
  return functools.partial(quant.quantize, kind=kind)


@functools.lru_cache(maxsize=None)
def _stacked_fns(shape: tuple, dtype: str, kind: str, sharding: NamedSharding, transpose: bool):
  """(allocate, write) of a stacked layer leaf, jitted once per shape/dtype/sharding/quant kind
  (q_proj and o_proj, gate_proj and up_proj share theirs).

  allocate() -> the zero (or quantized zero) stacked value on its shardings.
  write(stacked, x, i) -> stacked with slice i replaced by layer tensor x (HF layout: transposed,
  cast, quantized here); `stacked` is donated, so the stack exists once on the devices and never
  on the host."""
  quantize = _quantizer(kind)
  if quantize is None:
    out_sh = sharding
    make = lambda: jnp.zeros(shape, dtype)
  else:
    abstract = jax.eval_shape(quantize, jax.ShapeDtypeStruct(shape, dtype))
    out_sh = quant.leaf_shardings(abstract, sharding)
    make = lambda: quantize(jnp.zeros(shape, dtype))

  def write(stacked, x, idx):  # idx: [layer] or [layer, expert]
    x = (x.T if transpose else x).astype(dtype)
    x = x.reshape((1,) * idx.shape[0] + x.shape)
    new = jax.tree.leaves(quantize(x)) if quantize is not None else [x]  # as models.quantized.init_base does
    leaves, treedef = jax.tree.flatten(stacked)
    starts = lambda s: [idx[j] for j in range(idx.shape[0])] + [0] * (s.ndim - idx.shape[0])
    leaves = [jax.lax.dynamic_update_slice(s, n.astype(s.dtype), starts(s))
              for s, n in zip(leaves, new)]
    return jax.tree.unflatten(treedef, leaves)

  return (jax.jit(make, out_shardings=out_sh),
          jax.jit(write, donate_argnums=0, out_shardings=out_sh))


@functools.lru_cache(maxsize=None)
def _convert_fn(dtype: str, sharding: NamedSharding, transpose: bool):
  return jax.jit(lambda a: (a.T if transpose else a).astype(dtype), out_shardings=sharding)


def _to_device(x: np.ndarray, sharding: NamedSharding, spec_dims: tuple) -> jax.Array:
  """Host tensor -> device array laid out as `spec_dims` (one mesh axis or None per dim)."""
  sh = NamedSharding(sharding.mesh, P(*spec_dims))
  return jax.make_array_from_callback(x.shape, sh, lambda idx: x[idx])


def load_params(path: str, cfg: ModelConfig, shardings, quant_kind: str = "none") -> dict:
  """Reads an HF safetensors checkpoint (single file or sharded with an index) into the param
  tree of `cfg`, each leaf placed on its NamedSharding from `shardings` (a tree like the params)
  and cast to cfg.param_dtype; with quant_kind int8/nf4 the layer kernels are quantized as they
  arrive. Raises CheckpointError naming the file and tensor for a missing, unexpected or
  misshapen tensor and for pickle checkpoints.
  """
  files = tensor_files(path)
  expected = expected_names(cfg)
  missing = [n for n in expected if n not in files]
  if missing:
    raise CheckpointError(f"{path}: tensor {missing[0]} is missing"
                          + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                          + f"; config.json describes {cfg.architecture} with "
                          f"{cfg.num_layers} layers")
  for name, file in files.items():
    if name in expected or _IGNORED.match(name):
      continue
    if name == "lm_head.weight" and cfg.tie_embeddings:
      continue  # a tied checkpoint that also stored the (identical) output matrix
    raise CheckpointError(f"{file}: unexpected tensor {name} (config.json describes "
                          f"{cfg.architecture} with {cfg.num_layers} layers; jaxft has no such "
                          "parameter)")
  return stream_params(cfg, shardings, quant_kind,
                       sorted(expected, key=lambda n: (files[n], n)),  # each file visited once
                       lambda name, shape: read_tensor(files[name], name, shape))


def stream_params(cfg: ModelConfig, shardings, quant_kind: str, names,
                  read: Callable[[str, tuple[int, ...]], np.ndarray]) -> dict:
  """The param tree of `cfg` built one tensor at a time: `read(hf_name, hf_shape)` returns each
  tensor of `names` (every HF name of `expected_names(cfg)`, in the order to read them) as a host
  array in HF layout; it goes to the devices, is cast, transposed and (layer kernels, with
  quant_kind int8/nf4) quantized there. The safetensors and GGUF readers share this."""
  expected = expected_names(cfg)
  _quantizer(quant_kind)  # fails before any work when quantization is unavailable
  dtype = jnp.dtype(cfg.param_dtype).name
  flat_sh = {tuple(k.key for k in kp): s for kp, s in
             jax.tree_util.tree_flatten_with_path(shardings)[0]}
  specs = _flat_specs(cfg)
  out: dict[tuple[str, ...], Any] = {}
  fns = {}
  for path, spec in specs.items():  # stacked layer leaves: allocated once, filled slice by slice
    if path[0] == "layers":
      # (the linears' kernels only: a mixture of experts' router stays float)
      kind = quant_kind if path[-1] == "kernel" and path[1] in llama.LINEARS else "none"
      fns[path] = _stacked_fns(spec.shape, dtype, kind, flat_sh[path], _transposed(path))
      out[path] = fns[path][0]()
  for name in names:
    path, layer, shape = expected[name]
    x = read(name, shape)
    sh = flat_sh[path]
    spec = tuple(sh.spec) + (None,) * (len(specs[path].shape) - len(sh.spec))
    if layer is None:
      dims = spec[::-1] if _transposed(path) else spec
      out[path] = _convert_fn(dtype, sh, _transposed(path))(_to_device(x, sh, dims))
    else:
      idx = _index(layer)
      dims = spec[len(idx):][::-1] if _transposed(path) else spec[len(idx):]
      out[path] = fns[path][1](out[path], _to_device(x, sh, dims), jnp.asarray(idx, jnp.int32))
    del x
  tree: dict = {}
  for path, v in out.items():
    node = tree
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = v
  return tree


# -- writing -------------------------------------------------------------------------------------

def export_names(cfg: ModelConfig) -> Iterator[tuple[str, tuple[str, ...], int | None, tuple[int, ...]]]:
  """(HF name, our path, layer or None, HF shape) of every tensor of cfg, in HF's usual order."""
  names = expected_names(cfg)
  order = lambda n: (0 if n.startswith("model.embed") else 1 if n.startswith("model.layers")
                     else 2, _index(names[n][1]), n)
  for n in sorted(names, key=order):
    yield (n, *names[n])


def host_tensor(params, path: tuple[str, ...], layer: int | None, dtype) -> np.ndarray:
  """The HF-layout host copy of one tensor (one layer's slice of a stacked leaf), in `dtype`."""
  x = params
  for k in path:
    x = x[k]
  idx = _index(layer)
  x = _slicer(len(idx), _transposed(path), jnp.dtype(dtype).name)(x, jnp.asarray(idx, jnp.int32))
  if not x.is_fully_addressable:
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


@functools.lru_cache(maxsize=None)
def _slicer(levels: int, transpose: bool, dtype: str):
  def fn(x, idx):
    for j in range(levels):  # a quantized kernel: slice its codes, dequantize only the slice
      x = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, idx[j], 0, keepdims=False), x)
    x = ops.weight(x, dtype)  # a quantized base kernel (QLoRA) is written dequantized
    return x.T if transpose else x
  return jax.jit(fn)
