"""Hugging Face checkpoints: config.json <-> `ModelConfig`, and safetensors <-> the param tree.

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
import json
import os
import re
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxft.errors import CheckpointError, ConfigError
from jaxft.models import llama
from jaxft.models.config import ModelConfig

# architecture -> model_type
ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral",
                 "Qwen2ForCausalLM": "qwen2"}
INDEX = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
# Buffers that old checkpoints saved beside the weights; they are recomputed, not loaded.
_IGNORED = re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")
_DTYPE_NAMES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16",
                "fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "float": "float32",
                "half": "float16"}


# -- config.json -------------------------------------------------------------------------------

def _read_json(path: str) -> dict:
  try:
    with open(path, encoding="utf-8") as f:
      out = json.load(f)
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{path}: not valid JSON ({e})") from None
  if not isinstance(out, dict):
    raise CheckpointError(f"{path}: expected a JSON object")
  return out


def _config_json(path: str) -> tuple[str, dict]:
  if not os.path.isdir(path):
    raise CheckpointError(f"model.path={path!r}: not a directory (expected an HF checkpoint "
                          "directory with config.json and *.safetensors)")
  file = os.path.join(path, "config.json")
  if not os.path.isfile(file):
    raise CheckpointError(f"{path}: no config.json (expected an HF checkpoint directory, as "
                          "save_pretrained writes it)")
  return file, _read_json(file)


def _rope(file: str, c: dict) -> tuple[float, tuple | None]:
  """(rope_theta, rope_scaling pairs) from transformers 5's rope_parameters or 4's rope_theta +
  rope_scaling."""
  params = c.get("rope_parameters")
  if isinstance(params, dict) and params and all(isinstance(v, dict) for v in params.values()):
    raise ConfigError(f"{file}: rope_parameters per layer type are not supported")
  params = dict(params or {})
  theta = params.pop("rope_theta", None)
  if theta is None:
    theta = c.get("rope_theta", 10000.0)
  scaling = params or dict(c.get("rope_scaling") or {})
  scaling.pop("rope_theta", None)
  if "type" in scaling and "rope_type" not in scaling:
    scaling["rope_type"] = scaling.pop("type")
  kind = scaling.get("rope_type", "default")
  if scaling.get("partial_rotary_factor", 1.0) != 1.0:
    raise ConfigError(f"{file}: partial_rotary_factor is not supported")
  if kind == "default":
    return float(theta), None
  scaling = {k: v for k, v in scaling.items() if not isinstance(v, (list, dict)) and v is not None}
  return float(theta), tuple(sorted(scaling.items()))


def _sliding_window(file: str, arch: str, c: dict, num_layers: int) -> int | None:
  window = c.get("sliding_window")
  if arch == "MistralForCausalLM":
    return int(window) if window else None
  if arch == "LlamaForCausalLM":
    return None
  # Qwen2: use_sliding_window switches it on, for the layers from max_window_layers on.
  types = c.get("layer_types")
  if types is None:
    on = bool(c.get("use_sliding_window")) and window
    first = int(c.get("max_window_layers", 0)) if on else num_layers
    types = ["sliding_attention" if on and i >= first else "full_attention"
             for i in range(num_layers)]
  kinds = set(types)
  if kinds == {"full_attention"}:
    return None
  if kinds == {"sliding_attention"} and window:
    return int(window)
  raise ConfigError(f"{file}: layer_types mixes sliding and full attention across layers "
                    f"({sorted(kinds)}); jaxft needs one kind for every layer")


def read_config(path: str) -> ModelConfig:
  """The ModelConfig of an HF checkpoint directory (its config.json).

  Reads LlamaForCausalLM, MistralForCausalLM and Qwen2ForCausalLM configs in both transformers 4
  and 5 spellings. dtype/param_dtype/remat keep their defaults (the caller sets them). Raises
  CheckpointError when there is no readable config.json, ConfigError (naming the file and key)
  for an architecture or setting jaxft does not implement.
  """
  file, c = _config_json(path)
  archs = c.get("architectures") or []
  arch = next((a for a in archs if a in ARCHITECTURES), None)
  if arch is None and not archs:
    arch = {v: k for k, v in ARCHITECTURES.items()}.get(c.get("model_type"))
  if arch is None:
    raise ConfigError(f"{file}: architecture {archs or c.get('model_type')!r} is not supported; "
                      f"expected one of {', '.join(ARCHITECTURES)}")
  if c.get("hidden_act", "silu") != "silu":
    raise ConfigError(f"{file}: hidden_act={c['hidden_act']!r} is not supported (silu)")
  for key in ("attention_bias", "mlp_bias"):  # Llama's attention_bias also biases o_proj
    if arch == "LlamaForCausalLM" and c.get(key):
      raise ConfigError(f"{file}: {key}=true is not supported for {arch}")
  try:
    hidden, heads, layers = int(c["hidden_size"]), int(c["num_attention_heads"]), int(c["num_hidden_layers"])
    theta, scaling = _rope(file, c)
    eos = c.get("eos_token_id")
    cfg = ModelConfig(
        vocab_size=int(c["vocab_size"]), hidden_size=hidden,
        intermediate_size=int(c["intermediate_size"]), num_layers=layers, num_heads=heads,
        num_kv_heads=int(c.get("num_key_value_heads") or heads),
        head_dim=int(c.get("head_dim") or hidden // heads),
        rope_theta=theta, rope_scaling=scaling, rms_norm_eps=float(c.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=int(c.get("max_position_embeddings", 4096)),
        qkv_bias=arch == "Qwen2ForCausalLM",
        sliding_window=_sliding_window(file, arch, c, layers),
        tie_embeddings=bool(c.get("tie_word_embeddings", False)), architecture=arch,
        bos_token_id=c.get("bos_token_id"),
        eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
        pad_token_id=c.get("pad_token_id"),
        initializer_range=float(c.get("initializer_range", 0.02)))
  except KeyError as e:
    raise ConfigError(f"{file}: missing key {e.args[0]!r}") from None
  except (TypeError, ValueError) as e:
    raise ConfigError(f"{file}: {e}") from None
  from jaxft.models.rope import inverse_frequencies
  try:
    inverse_frequencies(cfg)
  except (ConfigError, KeyError) as e:
    raise ConfigError(f"{file}: rope scaling {dict(scaling or ())}: {e}") from None
  return cfg


def checkpoint_dtype(path: str) -> str | None:
  """The dtype config.json records for the weights (`dtype` or `torch_dtype`), or None."""
  file, c = _config_json(path)
  del file
  name = c.get("dtype") or c.get("torch_dtype")
  return _DTYPE_NAMES.get(str(name).replace("torch.", "")) if name else None


def hf_config(cfg: ModelConfig, dtype: str) -> dict:
  """config.json for `cfg` in transformers 5's spelling, plus the transformers 4 keys
  (rope_theta, rope_scaling, torch_dtype) that older readers (vLLM, TGI, llama.cpp) look for."""
  arch = cfg.architecture
  if arch not in ARCHITECTURES:
    raise ConfigError(f"architecture {arch!r} cannot be exported; expected one of {', '.join(ARCHITECTURES)}")
  if cfg.qkv_bias != (arch == "Qwen2ForCausalLM"):
    raise ConfigError(f"{arch} cannot express qkv_bias={cfg.qkv_bias}")
  if cfg.sliding_window and arch == "LlamaForCausalLM":
    raise ConfigError(f"{arch} cannot express sliding_window={cfg.sliding_window}")
  scaling = dict(cfg.rope_scaling or ())
  rope = {"rope_theta": cfg.rope_theta, "rope_type": "default", **scaling}
  eos = list(cfg.eos_token_id) if isinstance(cfg.eos_token_id, tuple) else cfg.eos_token_id
  out = {
      "architectures": [arch], "model_type": ARCHITECTURES[arch],
      "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
      "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_layers,
      "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
      "head_dim": cfg.head_dim, "hidden_act": "silu",
      "max_position_embeddings": cfg.max_position_embeddings, "rms_norm_eps": cfg.rms_norm_eps,
      "rope_parameters": rope, "rope_theta": cfg.rope_theta,
      "tie_word_embeddings": cfg.tie_embeddings, "bos_token_id": cfg.bos_token_id,
      "eos_token_id": eos, "pad_token_id": cfg.pad_token_id,
      "initializer_range": cfg.initializer_range, "attention_dropout": 0.0, "use_cache": True,
      "dtype": dtype, "torch_dtype": dtype,
  }
  if scaling:
    out["rope_scaling"] = scaling
  if arch == "LlamaForCausalLM":
    out.update(attention_bias=False, mlp_bias=False)
  elif arch == "MistralForCausalLM":
    out["sliding_window"] = cfg.sliding_window
  else:
    w = cfg.sliding_window
    out.update(use_sliding_window=bool(w), sliding_window=w,
               max_window_layers=0 if w else cfg.num_layers,
               layer_types=["sliding_attention" if w else "full_attention"] * cfg.num_layers)
  return out


# -- names ---------------------------------------------------------------------------------------

_LAYER_NAMES = {"input_layernorm.weight": ("attn_norm", "scale"),
                "post_attention_layernorm.weight": ("mlp_norm", "scale")}
for _n in llama.LINEARS:
  _block = "self_attn" if _n in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
  _LAYER_NAMES[f"{_block}.{_n}.weight"] = (_n, "kernel")
  if _n in ("q_proj", "k_proj", "v_proj"):
    _LAYER_NAMES[f"{_block}.{_n}.bias"] = (_n, "bias")
_TOP_NAMES = {"model.embed_tokens.weight": ("embed", "embedding"),
              "model.norm.weight": ("final_norm", "scale"), "lm_head.weight": ("lm_head", "kernel")}
_OURS_TO_LAYER = {v: k for k, v in _LAYER_NAMES.items()}


def hf_name(path: tuple[str, ...], layer: int | None = None) -> str:
  """The HF tensor name of our leaf `path` (e.g. ('layers', 'q_proj', 'kernel')) at `layer`."""
  if path[0] == "layers":
    return f"model.layers.{layer}.{_OURS_TO_LAYER[path[1:]]}"
  return {v: k for k, v in _TOP_NAMES.items()}[path]


def _parse_name(name: str, cfg: ModelConfig):
  """(our path, layer or None) of an HF tensor name; None when jaxft has no such parameter."""
  m = _LAYER.match(name)
  if m:
    sub = _LAYER_NAMES.get(m.group(2))
    layer = int(m.group(1))
    if sub is None or layer >= cfg.num_layers or (sub[1] == "bias" and not cfg.qkv_bias):
      return None
    return ("layers",) + sub, layer
  path = _TOP_NAMES.get(name)
  if path is None or (path[0] == "lm_head" and cfg.tie_embeddings):
    return None
  return path, None


def _transposed(path: tuple[str, ...]) -> bool:
  return path[-1] == "kernel"


def expected_names(cfg: ModelConfig) -> dict[str, tuple[tuple[str, ...], int | None, tuple[int, ...]]]:
  """{HF name: (our path, layer or None, HF shape)} of every tensor a checkpoint of cfg holds."""
  out = {}
  flat = _flat_specs(cfg)
  for path, spec in flat.items():
    shape = spec.shape[1:] if path[0] == "layers" else spec.shape
    if _transposed(path):
      shape = shape[::-1]
    layers = range(cfg.num_layers) if path[0] == "layers" else [None]
    for i in layers:
      out[hf_name(path, i)] = (path, i, tuple(shape))
  return out


def _flat_specs(cfg: ModelConfig) -> dict[tuple[str, ...], llama.ParamSpec]:
  leaves = jax.tree_util.tree_flatten_with_path(llama.param_specs(cfg), is_leaf=llama.is_spec)[0]
  return {tuple(k.key for k in kp): s for kp, s in leaves}


# -- files ---------------------------------------------------------------------------------------

def refuse_pickle(path: str) -> None:
  """CheckpointError when `path` (a directory) holds only pickle weights, naming the file."""
  names = sorted(os.listdir(path))
  if any(n.endswith(".safetensors") for n in names):
    return
  for n in names:
    if n.endswith(PICKLE_SUFFIXES) or n.endswith(".bin.index.json"):
      raise CheckpointError(
          f"{os.path.join(path, n)}: pickle checkpoints are refused (loading one can run "
          "arbitrary code); convert it to safetensors (transformers: "
          "model.save_pretrained(dir, safe_serialization=True)) and point at that")


def tensor_files(path: str) -> dict[str, str]:
  """{tensor name: safetensors file} of a checkpoint directory, from the index or the file(s).

  Raises CheckpointError for no weights, pickle-only weights, an index naming a missing file.
  """
  from safetensors import safe_open
  refuse_pickle(path)
  index = os.path.join(path, INDEX)
  if os.path.isfile(index):
    weight_map = _read_json(index).get("weight_map")
    if not isinstance(weight_map, dict):
      raise CheckpointError(f"{index}: no weight_map")
    out = {}
    for name, f in weight_map.items():
      file = os.path.join(path, f)
      if not os.path.isfile(file):
        raise CheckpointError(f"{index}: tensor {name} is in {f}, which does not exist")
      out[name] = file
    return out
  single = os.path.join(path, "model.safetensors")
  files = [single] if os.path.isfile(single) else sorted(
      os.path.join(path, n) for n in os.listdir(path)
      if n.endswith(".safetensors") and not n.startswith("consolidated"))
  if not files:
    raise CheckpointError(f"{path}: no *.safetensors weights (and no {INDEX})")
  out = {}
  for file in files:
    try:
      with safe_open(file, framework="numpy") as f:
        for name in f.keys():
          out[name] = file
    except Exception as e:  # a truncated or foreign file
      raise CheckpointError(f"{file}: cannot read as safetensors ({e})") from None
  return out


def _read(file: str, name: str, want: tuple[int, ...]) -> np.ndarray:
  """One tensor from a safetensors file, its shape checked before it is read."""
  from safetensors import safe_open
  # Open and close around each tensor: safetensors maps the file, and touched pages of a mapping
  # count in the process's resident memory until it is unmapped.
  with safe_open(file, framework="numpy") as f:
    sl = f.get_slice(name)
    shape = tuple(sl.get_shape())
    if shape != want:
      raise CheckpointError(f"{file}: tensor {name} has shape {list(shape)}, expected "
                            f"{list(want)} (from config.json)")
    if sl.get_dtype() not in ("F32", "BF16", "F16", "F64"):
      raise CheckpointError(f"{file}: tensor {name} has dtype {sl.get_dtype()}; expected a float "
                            "tensor (quantized checkpoints are not supported)")
    return f.get_tensor(name)


# -- loading -------------------------------------------------------------------------------------

def _quantizer(kind: str):
  """`quant.quantize` for kind, or None for 'none'. The quantized value is a pytree whose leaves
  keep the array's leading dims, so one layer quantized as [1, in, out] fills slice i of the
  stacked [L, in, out] value."""
  if kind == "none":
    return None
  from jaxft import quant
  fn = getattr(quant, "quantize", None)
  if fn is None:
    raise ConfigError(f"model.quant={kind}: quantization is not available in this build")
  return functools.partial(fn, kind=kind)


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
    from jaxft import quant
    abstract = jax.eval_shape(quantize, jax.ShapeDtypeStruct(shape, dtype))
    out_sh = quant.leaf_shardings(abstract, sharding)
    make = lambda: quantize(jnp.zeros(shape, dtype))

  def write(stacked, x, i):
    x = (x.T if transpose else x).astype(dtype)[None]
    new = jax.tree.leaves(quantize(x)) if quantize is not None else [x]  # as quant.init_base does
    leaves, treedef = jax.tree.flatten(stacked)
    leaves = [jax.lax.dynamic_update_slice_in_dim(s, n.astype(s.dtype), i, 0)
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
  _quantizer(quant_kind)  # fails before any work when quantization is unavailable
  dtype = jnp.dtype(cfg.param_dtype).name
  flat_sh = {tuple(k.key for k in kp): s for kp, s in
             jax.tree_util.tree_flatten_with_path(shardings)[0]}
  specs = _flat_specs(cfg)
  out: dict[tuple[str, ...], Any] = {}
  fns = {}
  for path, spec in specs.items():  # stacked layer leaves: allocated once, filled slice by slice
    if path[0] == "layers":
      kind = quant_kind if path[-1] == "kernel" else "none"
      fns[path] = _stacked_fns(spec.shape, dtype, kind, flat_sh[path], _transposed(path))
      out[path] = fns[path][0]()
  # Read in file order, so a sharded checkpoint's files are each visited once.
  for name in sorted(expected, key=lambda n: (files[n], n)):
    path, layer, shape = expected[name]
    x = _read(files[name], name, shape)
    sh = flat_sh[path]
    spec = tuple(sh.spec) + (None,) * (len(specs[path].shape) - len(sh.spec))
    if layer is None:
      dims = spec[::-1] if _transposed(path) else spec
      out[path] = _convert_fn(dtype, sh, _transposed(path))(_to_device(x, sh, dims))
    else:
      dims = spec[1:][::-1] if _transposed(path) else spec[1:]
      out[path] = fns[path][1](out[path], _to_device(x, sh, dims), jnp.int32(layer))
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
                     else 2, names[n][1] or 0, n)
  for n in sorted(names, key=order):
    yield (n, *names[n])


def host_tensor(params, path: tuple[str, ...], layer: int | None, dtype) -> np.ndarray:
  """The HF-layout host copy of one tensor (one layer's slice of a stacked leaf), in `dtype`."""
  x = params
  for k in path:
    x = x[k]
  x = _slicer(layer is not None, _transposed(path), jnp.dtype(dtype).name)(x, jnp.int32(layer or 0))
  if not x.is_fully_addressable:
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


@functools.lru_cache(maxsize=None)
def _slicer(layered: bool, transpose: bool, dtype: str):
  def fn(x, i):
    from jaxft import quant
    x = quant.materialize(x, dtype)  # a quantized base kernel (QLoRA) is written dequantized
    if layered:
      x = jax.lax.dynamic_index_in_dim(x, i, 0, keepdims=False)
    return x.T if transpose else x
  return jax.jit(fn)


_ST_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16", "float64": "F64",
              "int32": "I32", "int64": "I64", "int8": "I8", "uint8": "U8", "bool": "BOOL"}


def write_safetensors(file: str, entries, metadata: dict | None = None) -> int:
  """Writes a safetensors file tensor by tensor, so only one tensor is on the host at a time.

  entries: (name, shape, numpy dtype, fetch) with fetch() returning that array when its turn
  comes. metadata defaults to {"format": "pt"}, which transformers requires. Returns the bytes
  of tensor data written.
  """
  import struct
  header: dict[str, Any] = {"__metadata__": metadata or {"format": "pt"}}
  offset = 0
  for name, shape, dtype, _ in entries:
    size = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    header[name] = {"dtype": _ST_DTYPES[np.dtype(dtype).name], "shape": list(shape),
                    "data_offsets": [offset, offset + size]}
    offset += size
  raw = json.dumps(header, separators=(",", ":")).encode()
  raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
  with open(file, "wb") as f:
    f.write(struct.pack("<Q", len(raw)))
    f.write(raw)
    for name, shape, dtype, fetch in entries:
      a = np.ascontiguousarray(fetch())
      if a.shape != tuple(shape) or a.dtype != np.dtype(dtype):
        raise ValueError(f"{file}: tensor {name} is {a.dtype}{list(a.shape)}, declared "
                         f"{np.dtype(dtype)}{list(shape)}")
      f.write(a.reshape(-1).view(np.uint8).data)
  return offset


def _shards(entries, max_bytes: int) -> list[list]:
  """Groups (name, shape, dtype, fetch) entries in order into shards of at most max_bytes
  (a tensor larger than that gets a shard of its own)."""
  shards, cur, size = [], [], 0
  for e in entries:
    n = int(np.prod(e[1], dtype=np.int64)) * np.dtype(e[2]).itemsize
    if cur and size + n > max_bytes:
      shards.append(cur)
      cur, size = [], 0
    cur.append(e)
    size += n
  if cur:
    shards.append(cur)
  return shards


def write_checkpoint(directory: str | None, cfg: ModelConfig, params, dtype: str,
                     max_shard_mb: float = 5000) -> int:
  """Writes params (the decoder's tree, quantized kernels allowed) as an HF checkpoint into
  `directory`: config.json and safetensors in `dtype`, sharded with model.safetensors.index.json
  above max_shard_mb. Tensors go to the host one at a time (one layer's slice of a stacked leaf).
  With several processes every one must call this (tensors are gathered); only the one whose
  `directory` is not None writes. Returns the number of safetensors files."""
  hf_cfg = hf_config(cfg, dtype)
  np_dtype = np.dtype(jnp.dtype(dtype))
  entries = [(name, shape, np_dtype, lambda p=path, i=layer: host_tensor(params, p, i, dtype))
             for name, path, layer, shape in export_names(cfg)]
  shards = _shards(entries, int(max_shard_mb * 2**20))
  weight_map, total = {}, 0
  for k, shard in enumerate(shards):
    fname = ("model.safetensors" if len(shards) == 1
             else f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors")
    if directory is not None:
      total += write_safetensors(os.path.join(directory, fname), shard)
    else:  # take part in gathering each tensor
      for e in shard:
        e[3]()
    weight_map.update({e[0]: fname for e in shard})
  if directory is None:
    return len(shards)
  if len(shards) > 1:
    with open(os.path.join(directory, INDEX), "w", encoding="utf-8") as f:
      json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
  with open(os.path.join(directory, "config.json"), "w", encoding="utf-8") as f:
    json.dump(hf_cfg, f, indent=2)
  return len(shards)
