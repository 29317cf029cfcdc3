"""Bottleneck adapters: out + act(out W_down + b_down) W_up + b_up on a block's output, inside the
residual (x + adapter(block(x))).

Placement `houlsby` (Houlsby et al. 2019) adapts the attention block and the MLP block; `pfeiffer`
(Pfeiffer et al. 2020) only the MLP block. Leaves, per adapted block (attn_adapter, mlp_adapter):
  layers/attn_adapter/down [L, embed, size]   layers/attn_adapter/down_bias [L, size]
  layers/attn_adapter/up   [L, size, embed]   layers/attn_adapter/up_bias   [L, embed]
`up` and `up_bias` start at zero, so step 0 is the base model. Adapters are not linear in the
input, so they cannot be merged into the base; `python -m jaxft.export --format=adapter` writes them
(see `write` and docs/methods.md for the format).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jaxft.errors import ConfigError
from jaxft.models import hf, llama, ops
from jaxft.models.config import ModelConfig
from jaxft.peft.base import ADAPTER_DTYPE, Method, Params
from jaxft.peft.peft_io import host_array

PLACEMENTS = {"houlsby": ("attn", "mlp"), "pfeiffer": ("mlp",)}
# gelu is the exact (erf) form, as torch.nn.GELU() and transformers' "gelu".
ACTIVATIONS = {"relu": jax.nn.relu, "gelu": functools.partial(jax.nn.gelu, approximate=False),
               "silu": jax.nn.silu, "tanh": jnp.tanh}
FORMAT = "jaxft-bottleneck-adapter"
CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"


@dataclasses.dataclass(frozen=True)
class BottleneckAdapter(Method):
  name: str = "adapter"
  export_format: ClassVar[str] = "adapter"
  size: int = 64
  placement: str = "houlsby"
  activation: str = "relu"

  def write_export(self, directory, cfg, trainable, base_model: str = "") -> None:
    """jaxft's bottleneck-adapter format (`write`)."""
    write(directory, self, cfg, trainable, base_model)

  @property
  def blocks(self) -> tuple[str, ...]:
    """The blocks adapted: ("attn", "mlp") or ("mlp",)."""
    return PLACEMENTS[self.placement]

  def trainable_specs(self, cfg):
    L, D, S = cfg.num_layers, cfg.hidden_size, self.size
    one = {"down": llama.ParamSpec((L, D, S), ("layers", "embed", "adapter"), "normal"),
           "down_bias": llama.ParamSpec((L, S), ("layers", "adapter"), "zeros"),
           "up": llama.ParamSpec((L, S, D), ("layers", "adapter", "embed"), "zeros"),
           "up_bias": llama.ParamSpec((L, D), ("layers", "norm"), "zeros")}
    return {"layers": {f"{b}_adapter": dict(one) for b in self.blocks}}

  def init(self, cfg, rng):
    # down as LoRA's A (U(-1/sqrt(embed), 1/sqrt(embed))), the rest zero: the adapter adds nothing.
    # Float32 master weights whatever the base's dtype, as LoRA's.
    specs = self.trainable_specs(cfg)["layers"]
    dtype = ADAPTER_DTYPE
    bound = 1.0 / math.sqrt(cfg.hidden_size)
    out = {}
    for idx, (block, leaves) in enumerate(specs.items()):
      out[block] = {k: jnp.zeros(s.shape, dtype) for k, s in leaves.items()}
      out[block]["down"] = jax.random.uniform(jax.random.fold_in(rng, idx), leaves["down"].shape,
                                              jnp.float32, -bound, bound).astype(dtype)
    return {"layers": out}

  def block_output(self, kind, p, out, dtype):
    key = f"{kind}_adapter"
    if key not in p:
      return out
    a = p[key]
    h = ops.matmul(out, a["down"], dtype) + a["down_bias"].astype(dtype)
    h = ACTIVATIONS[self.activation](h)
    return out + ops.matmul(h, a["up"], dtype) + a["up_bias"].astype(dtype)

  def merge(self, cfg, params):
    raise ConfigError("peft.method=adapter: bottleneck adapters are non-linear and cannot be "
                      "merged into the base weights; export them with --format=adapter instead")


def check(size: int, placement: str, activation: str) -> None:
  """ConfigError naming the peft.adapter key whose value is invalid."""
  if size < 1:
    raise ConfigError(f"peft.adapter.size={size}: must be >= 1")
  if placement not in PLACEMENTS:
    raise ConfigError(f"peft.adapter.placement={placement!r}: expected one of "
                      f"{', '.join(PLACEMENTS)}")
  if activation not in ACTIVATIONS:
    raise ConfigError(f"peft.adapter.activation={activation!r}: expected one of "
                      f"{', '.join(ACTIVATIONS)}")


# -- export -----------------------------------------------------------------------------------

def tensor_names(method: BottleneckAdapter, cfg: ModelConfig):
  """(safetensors name, jaxft block, jaxft leaf, layer, transpose) of every exported tensor.

  Names follow the transformers module tree: model.layers.{i}.attn_adapter.down_proj.weight is
  [size, hidden] (torch.nn.Linear's [out, in]), .bias [size]; up_proj.weight [hidden, size], .bias
  [hidden]; the same under mlp_adapter."""
  out = []
  for block in method.blocks:
    for i in range(cfg.num_layers):
      stem = f"model.layers.{i}.{block}_adapter"
      out += [(f"{stem}.down_proj.weight", f"{block}_adapter", "down", i, True),
              (f"{stem}.down_proj.bias", f"{block}_adapter", "down_bias", i, False),
              (f"{stem}.up_proj.weight", f"{block}_adapter", "up", i, True),
              (f"{stem}.up_proj.bias", f"{block}_adapter", "up_bias", i, False)]
  return out


def write(directory: str, method: BottleneckAdapter, cfg: ModelConfig, trainable: Params,
          base_model: str = "") -> None:
  """Writes adapter_config.json and adapter_model.safetensors (float32) of the trained adapters
  into `directory` (which must exist). Only process 0 writes; every process must call it."""
  leaves = {(b, k): host_array(v) for b, d in trainable["layers"].items() for k, v in d.items()}
  if jax.process_index() != 0:
    return
  arrays = []
  for name, block, leaf, i, transpose in tensor_names(method, cfg):
    a = leaves[(block, leaf)][i].astype(np.float32)
    arrays.append((name, np.ascontiguousarray(a.T if transpose else a)))
  hf.write_safetensors(os.path.join(directory, WEIGHTS),
                       [(n, a.shape, a.dtype, lambda a=a: a) for n, a in arrays])
  config = {"format": FORMAT, "format_version": 1, "base_model_name_or_path": base_model or None,
            "placement": method.placement, "blocks": [f"{b}_adapter" for b in method.blocks],
            "size": method.size, "activation": method.activation,
            "hidden_size": cfg.hidden_size, "num_layers": cfg.num_layers,
            "formula": "out + up_proj(act(down_proj(out))), out = the output of self_attn "
                       "(attn_adapter) or mlp (mlp_adapter), before the residual add"}
  with open(os.path.join(directory, CONFIG), "w", encoding="utf-8") as f:
    json.dump(config, f, indent=2, sort_keys=True)
