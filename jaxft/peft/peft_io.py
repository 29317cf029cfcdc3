"""PEFT-format adapters: what `peft.PeftModel.from_pretrained` reads and `save_pretrained` writes.

A directory holds `adapter_config.json` and `adapter_model.safetensors`. Tensor names are the
module path in the wrapped model plus the leaf, e.g.
  base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight   A as [r, in]
  base_model.model.model.layers.3.mlp.down_proj.lora_B.weight      B as [out, r]
while jaxft stacks layers: layers/q_proj/lora_a [L, in, r], layers/q_proj/lora_b [L, r, out].

Each method's `write_export` calls `write_adapter` with its tensors function (the
adapter_config.json entries and the tensors): LoRA, DoRA (LoRA with use_dora=true and
`...q_proj.lora_magnitude_vector` [out]) and prefix tuning (peft_type PREFIX_TUNING,
`prompt_embeddings` [num_virtual_tokens, layers*2*kv_heads*head_dim]).
Reading supports LoRA and DoRA adapters (`peft.init_from`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Callable, Iterator

import jax
import numpy as np
from absl import logging

from jaxft.errors import CheckpointError, ConfigError
from jaxft.models import hf, llama
from jaxft.models.config import ModelConfig
from jaxft.peft.base import ADAPTER_DTYPE, is_expert, linear_dims

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."
_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
_KEY = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.(.+)$")


def module_key(linear: str, layer: int) -> str:
  """PEFT's name of the module wrapping decoder linear `linear` in layer `layer`."""
  block = "self_attn" if linear in _ATTN else "mlp"
  return f"{PREFIX}model.layers.{layer}.{block}.{linear}"


def parse_key(key: str) -> tuple[str, int, str] | None:
  """(linear, layer, leaf) of a PEFT tensor name, e.g. ('q_proj', 3, 'lora_A.weight'); None when
  the name is not a decoder linear's adapter tensor."""
  m = _KEY.match(key)
  if not m or m.group(3) not in llama.LINEARS:
    return None
  block = "self_attn" if m.group(3) in _ATTN else "mlp"
  if block != m.group(2):
    return None
  return m.group(3), int(m.group(1)), m.group(4)


def host_array(x) -> np.ndarray:
  """A whole (small) trainable leaf on the host, gathered across processes when needed."""
  if not x.is_fully_addressable:
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


# -- writing ---------------------------------------------------------------------------------

def _alpha(a: float):
  return int(a) if float(a).is_integer() else float(a)


# What PEFT's LoraConfig writes beside the method's own entries (the LoRA family only).
_LORA_DEFAULTS = {"bias": "none", "fan_in_fan_out": False, "modules_to_save": None,
                  "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {},
                  "alpha_pattern": {}, "init_lora_weights": True}


def lora_tensors(method, cfg: ModelConfig, trainable) -> tuple[dict, Iterator[tuple[str, np.ndarray]]]:
  """adapter_config.json entries and (name, array) tensors of a LoRA or DoRA method's trainable
  tree. DoRA adds `...q_proj.lora_magnitude_vector` [out] and use_dora=true. The experts of a
  mixture of experts go out as PEFT's `target_parameters` (see `_expert_tensors`)."""
  dora = method.name == "dora"
  experts = tuple(n for n in method.targets if is_expert(cfg, n))
  linears = tuple(n for n in method.targets if n not in experts)
  rank = _export_rank(method, experts)
  scale = method.scale * (np.sqrt(rank) if method.rslora else rank)  # alpha keeping the scale
  alpha = method.alpha if rank == method.rank else float(scale)
  config = {**_LORA_DEFAULTS, "peft_type": "LORA", "r": rank,
            "lora_alpha": _alpha(alpha), "lora_dropout": float(method.dropout),
            "target_modules": sorted(linears), "use_rslora": bool(method.rslora),
            "use_dora": dora}
  if experts:
    config["target_parameters"] = sorted({f"mlp.experts.{_PARAMS[n]}" for n in experts})

  def tensors():
    for n in linears:
      leaves = trainable["layers"][n]
      a, b = _padded(host_array(leaves["lora_a"]), host_array(leaves["lora_b"]), rank)
      m = host_array(leaves["magnitude"]) if dora else None
      for i in range(cfg.num_layers):
        yield f"{module_key(n, i)}.lora_A.weight", np.ascontiguousarray(a[i].T)
        yield f"{module_key(n, i)}.lora_B.weight", np.ascontiguousarray(b[i].T)
        if dora:
          yield f"{module_key(n, i)}.lora_magnitude_vector", np.ascontiguousarray(m[i])
    if experts:
      yield from _expert_tensors(cfg, trainable, experts, rank)

  return config, tensors()


# -- experts (PEFT's target_parameters) --------------------------------------------------------
# transformers 5 holds a layer's experts fused in one module `mlp.experts` (Mixtral's too) with 3D
# parameters gate_up_proj [E, 2F, D] (gate rows first) and down_proj [E, D, F], each expert an
# [out, in] matrix. PEFT 0.21's ParamWrapper adapts such a parameter with lora_A.weight [E*r, in]
# (rows expert-major: [E, r, in]) and lora_B.weight [out, r*E] (columns rank-major: [out, r, E]),
# W[e] += scale * B[:, :, e] @ A[e]. jaxft's per-expert lora_a [E, in, r] and lora_b [E, r, out]
# are those, transposed. jaxft's separate gate and up LoRAs (rank r each) are one fused LoRA of
# rank 2r (A side by side, B block-diagonal), so an adapter with both is written at r = 2r, every
# other module zero-padded to it and lora_alpha keeping the scale alpha / r. When both parameters
# of the module are targeted PEFT nests two wrappers: gate_up_proj's tensors sit one
# `base_layer` deeper than down_proj's.
_PARAMS = {"gate_proj": "gate_up_proj", "up_proj": "gate_up_proj", "down_proj": "down_proj"}


def _export_rank(method, experts) -> int:
  return 2 * method.rank if {"gate_proj", "up_proj"} <= set(experts) else method.rank


def _padded(a: np.ndarray, b: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
  """lora_a [..., in, r] and lora_b [..., r, out] zero-padded to `rank` (the same product)."""
  extra = rank - a.shape[-1]
  if not extra:
    return a, b
  pad = lambda x, axis: np.concatenate(
      [x, np.zeros(x.shape[:axis] + (extra,) + x.shape[axis + 1:], x.dtype)], axis=axis)
  return pad(a, a.ndim - 1), pad(b, b.ndim - 2)


def expert_key(layer: int) -> str:
  """PEFT's name of the module holding a layer's fused experts (transformers 5)."""
  return f"{PREFIX}model.layers.{layer}.mlp.experts"


def _fused_gate_up(cfg: ModelConfig, trainable, experts, rank: int):
  """(a [L, E, D, R], b [L, E, R, 2F]) of the gate_up_proj LoRA equal to the gate and up LoRAs."""
  F = cfg.moe_intermediate_size
  parts = []
  for n in ("gate_proj", "up_proj"):
    if n in experts:
      leaves = trainable["layers"][n]
      parts.append((host_array(leaves["lora_a"]), host_array(leaves["lora_b"])))
    else:
      parts.append(None)
  like = next(p for p in parts if p is not None)
  L, E, D, r = like[0].shape
  a = np.zeros((L, E, D, rank), like[0].dtype)
  b = np.zeros((L, E, rank, 2 * F), like[1].dtype)
  at = 0
  for half, p in enumerate(parts):
    if p is not None:
      a[..., at:at + r] = p[0]
      b[..., at:at + r, half * F:(half + 1) * F] = p[1]
      at += r
  return a, b


def _expert_tensors(cfg: ModelConfig, trainable, experts, rank: int):
  fused = {}
  if {"gate_proj", "up_proj"} & set(experts):
    fused["gate_up_proj"] = _fused_gate_up(cfg, trainable, experts, rank)
  if "down_proj" in experts:
    leaves = trainable["layers"]["down_proj"]
    fused["down_proj"] = _padded(host_array(leaves["lora_a"]), host_array(leaves["lora_b"]), rank)
  for param, (a, b) in fused.items():
    L, E, d_in, R = a.shape
    for i in range(cfg.num_layers):
      key = f"{expert_key(i)}{'.base_layer' if param == 'gate_up_proj' and len(fused) > 1 else ''}"
      yield f"{key}.lora_A.weight", np.ascontiguousarray(a[i].transpose(0, 2, 1).reshape(E * R, d_in))
      yield f"{key}.lora_B.weight", np.ascontiguousarray(b[i].transpose(2, 1, 0).reshape(-1, R * E))



def prefix_tensors(method, cfg: ModelConfig,
                    trainable) -> tuple[dict, Iterator[tuple[str, np.ndarray]]]:
  """PEFT prefix tuning: `prompt_embeddings` [P, L*2*kv_heads*head_dim], each row ordered (layer,
  key|value, kv head, head_dim), the reparameterising MLP folded away (prefix_projection=false).
  PEFT loads it as past_key_values and starts the real tokens' positions after the prefix, as
  jaxft does."""
  kv = cfg.num_kv_heads * cfg.head_dim
  config = {"peft_type": "PREFIX_TUNING", "num_virtual_tokens": method.length,
            "num_layers": cfg.num_layers, "token_dim": kv, "num_attention_heads": cfg.num_kv_heads,
            "encoder_hidden_size": kv, "num_transformer_submodules": 1,
            "prefix_projection": False, "modules_to_save": None}

  def tensors():
    folded = method.fold(cfg, trainable)["layers"]["prefix"]
    k, v = host_array(folded["key"]), host_array(folded["value"])  # [L, P, K, hd]
    both = np.stack([k, v], axis=1)  # [L, 2, P, K, hd]
    rows = np.transpose(both, (2, 0, 1, 3, 4)).reshape(method.length, -1)
    yield "prompt_embeddings", np.ascontiguousarray(rows.astype(np.float32))

  return config, tensors()


def write_adapter(directory: str, method, cfg: ModelConfig, trainable, base_model: str,
                  tensors_of: Callable[..., tuple[dict, Iterator[tuple[str, np.ndarray]]]]) -> None:
  """Writes adapter_config.json and adapter_model.safetensors of `method`'s trainable leaves into
  `directory` (which must exist); `tensors_of(method, cfg, trainable)` (lora_tensors,
  prefix_tensors: the method's `write_export` chooses) gives the config entries and tensors."""
  entries, tensors = tensors_of(method, cfg, trainable)
  config = {"task_type": "CAUSAL_LM", "base_model_name_or_path": base_model or None,
            "inference_mode": True, "revision": None, **entries}
  arrays = list(tensors)
  if jax.process_index() != 0:
    return
  hf.write_safetensors(os.path.join(directory, WEIGHTS),
                       [(n, a.shape, a.dtype, lambda a=a: a) for n, a in arrays])
  with open(os.path.join(directory, CONFIG), "w", encoding="utf-8") as f:
    json.dump(config, f, indent=2, sort_keys=True)


# -- reading (peft.init_from) ------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class LoraAdapter:
  """What a PEFT LoRA (or DoRA: use_dora) adapter directory holds, checked against a model
  config."""
  directory: str
  rank: int
  alpha: float
  rslora: bool
  targets: tuple[str, ...]
  tensors: dict[str, tuple[tuple[int, ...], str]]  # name -> (shape, file)
  dora: bool = False

  @property
  def method(self) -> str:
    return "dora" if self.dora else "lora"


def check_dir(directory: str) -> None:
  """Raises CheckpointError, naming the command that writes it, unless the peft.init_from
  `directory` exists (a cheap check for before anything is written)."""
  if os.path.isdir(directory):
    return
  # Usually a step not yet run: the adapter is another run's export (the DPO quickstart starts
  # from the SFT quickstart's), so say which command writes it.
  what = "is not a directory" if os.path.exists(directory) else "does not exist"
  raise CheckpointError(
      f"peft.init_from={directory!r} {what}: it names the PEFT LoRA adapter to start from, "
      f"another run's export. Write it first: `python -m jaxft.export --workdir=WORKDIR "
      f"--format=peft --out={directory}` (the DPO quickstart's WORKDIR is workdirs/quickstart, "
      "whose preset base also needs --base_model: docs/preference.md has the commands)")


def read_lora_config(directory: str, cfg: ModelConfig) -> LoraAdapter:
  """Reads and checks a PEFT LoRA or DoRA adapter directory (config and tensor shapes, no weights
  yet).

  Raises CheckpointError for a missing or pickle-only adapter, missing/unexpected/misshapen tensors;
  ConfigError for adapter features jaxft does not implement (per-module ranks, biases,
  modules_to_save, a subset of layers).
  """
  from safetensors import safe_open
  check_dir(directory)
  cfile = os.path.join(directory, CONFIG)
  if not os.path.isfile(cfile):
    raise CheckpointError(f"{directory}: no {CONFIG} (expected a PEFT adapter directory)")
  wfile = os.path.join(directory, WEIGHTS)
  if not os.path.isfile(wfile):
    if os.path.isfile(os.path.join(directory, "adapter_model.bin")):
      raise CheckpointError(f"{os.path.join(directory, 'adapter_model.bin')}: pickle adapters are "
                            "refused (loading one can run arbitrary code); save it with "
                            "safe_serialization=True")
    raise CheckpointError(f"{directory}: no {WEIGHTS}")
  with open(cfile, encoding="utf-8") as f:
    c = json.load(f)
  kind = c.get("peft_type")
  if kind != "LORA":
    raise ConfigError(f"{cfile}: peft_type={kind!r}; peft.init_from reads LoRA adapters")
  unsupported = {"bias": c.get("bias", "none") != "none",
                 "modules_to_save": c.get("modules_to_save"), "rank_pattern": c.get("rank_pattern"),
                 "alpha_pattern": c.get("alpha_pattern"), "layers_to_transform":
                 c.get("layers_to_transform") is not None, "fan_in_fan_out": c.get("fan_in_fan_out"),
                 "lora_bias": c.get("lora_bias")}
  for key, bad in unsupported.items():
    if bad:
      raise ConfigError(f"{cfile}: {key}={c.get(key)!r} is not supported by peft.init_from")
  if not isinstance(c.get("r"), int) or c["r"] < 1:
    raise ConfigError(f"{cfile}: r={c.get('r')!r}; expected a positive integer")
  r = c["r"]
  dora = bool(c.get("use_dora", False))
  leaves = ("lora_A.weight", "lora_B.weight") + (("lora_magnitude_vector",) if dora else ())
  tensors = {}
  with safe_open(wfile, framework="numpy") as f:
    for name in f.keys():
      tensors[name] = (tuple(f.get_slice(name).get_shape()), wfile)
  found: dict[str, set] = {}
  for name, (shape, _) in tensors.items():
    parsed = parse_key(name)
    if parsed is None or parsed[2] not in leaves or parsed[1] >= cfg.num_layers:
      what = "LoRA A/B weight or DoRA magnitude" if dora else "LoRA A/B weight"
      raise CheckpointError(f"{wfile}: unexpected tensor {name} (not a {what} of a decoder linear "
                            f"layer of this {cfg.num_layers}-layer model"
                            + ("" if dora else f"; {CONFIG} has no use_dora") + ")")
    n, i, leaf = parsed
    d_in, d_out, _, _ = linear_dims(cfg, n)
    want = {"lora_A.weight": (r, d_in), "lora_B.weight": (d_out, r),
            "lora_magnitude_vector": (d_out,)}[leaf]
    if shape != want:
      raise CheckpointError(f"{wfile}: tensor {name} has shape {list(shape)}, expected {list(want)} "
                            f"(r={r} from {CONFIG}, and the model's {n} is {d_in} -> {d_out})")
    found.setdefault(n, set()).add((i, leaf))
  targets = tuple(n for n in llama.LINEARS if n in found)
  if not targets:
    raise CheckpointError(f"{wfile}: no LoRA tensors")
  for n in targets:
    for i in range(cfg.num_layers):
      for leaf in leaves:
        if (i, leaf) not in found[n]:
          raise CheckpointError(f"{wfile}: tensor {module_key(n, i)}.{leaf} is missing (jaxft adapts "
                                "every layer of a targeted linear)")
  return LoraAdapter(directory, r, float(c.get("lora_alpha", 8)), bool(c.get("use_rslora", False)),
                     targets, tensors, dora)


def adopt_settings(directory: str, method, cfg: ModelConfig):
  """The LoRA or DoRA `method` with rank, alpha, rsLoRA and targets taken from the adapter in
  `directory`; logs each value that differs from the config. ConfigError unless the method is
  the adapter's kind (lora for a LoRA adapter, dora for one with use_dora)."""
  if method.name not in ("lora", "dora"):
    raise ConfigError(f"peft.init_from needs peft.method=lora or dora (got {method.name!r})")
  ad = read_lora_config(directory, cfg)
  if ad.method != method.name:
    raise ConfigError(f"{os.path.join(directory, CONFIG)}: a {ad.method.upper()} adapter "
                      f"(use_dora={ad.dora}); set peft.method={ad.method} (config: {method.name})")
  new = dataclasses.replace(method, rank=ad.rank, alpha=ad.alpha, rslora=ad.rslora,
                            targets=ad.targets)
  keys = {"rank": "peft.lora.rank", "alpha": "peft.lora.alpha", "rslora": "peft.lora.rslora",
          "targets": "peft.targets"}
  changed = [f"{keys[k]}={getattr(new, k)!r} (config: {getattr(method, k)!r})" for k in keys
             if getattr(new, k) != getattr(method, k)]
  if changed:
    logging.warning("peft.init_from=%s: taking from the adapter: %s", directory, "; ".join(changed))
  return new


def read_lora_weights(directory: str, cfg: ModelConfig, method, shardings) -> dict:
  """The adapter's weights as jaxft's trainable tree (layers/NAME/lora_a [L, in, r], lora_b
  [L, r, out], and for DoRA magnitude [L, out]) in float32 (lora.ADAPTER_DTYPE, as a fresh
  LoRA), placed on `shardings`. `method` must carry the adapter's settings (see
  `adopt_settings`)."""
  from safetensors import safe_open
  ad = read_lora_config(directory, cfg)
  if (ad.rank, ad.targets, ad.method) != (method.rank, method.targets, method.name):
    raise ConfigError(f"{directory}: adapter {ad.method} r={ad.rank}, targets={ad.targets} differ "
                      f"from the method's {method.name} r={method.rank}, targets={method.targets}")
  out: dict[str, Any] = {}
  dtype = np.dtype(ADAPTER_DTYPE)
  # (PEFT's A is [r, in] and B [out, r]: transposed into jaxft's [in, r] and [r, out])
  leaves = {"lora_a": ("lora_A.weight", np.transpose), "lora_b": ("lora_B.weight", np.transpose)}
  if ad.dora:
    leaves["magnitude"] = ("lora_magnitude_vector", np.asarray)
  with safe_open(os.path.join(directory, WEIGHTS), framework="numpy") as f:
    for n in ad.targets:
      out[n] = {}
      for leaf, (peft_leaf, layout) in leaves.items():
        x = np.stack([layout(f.get_tensor(f"{module_key(n, i)}.{peft_leaf}"))
                      for i in range(cfg.num_layers)]).astype(dtype)
        out[n][leaf] = jax.make_array_from_callback(x.shape, shardings["layers"][n][leaf],
                                                    lambda idx, x=x: x[idx])
  logging.info("peft.init_from: loaded %s r=%d on %s from %s", ad.method.upper(), ad.rank,
               ",".join(ad.targets), directory)
  return {"layers": out}
