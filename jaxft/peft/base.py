"""The interface every fine-tuning method implements, and the tree helpers of the partition.

A method is a frozen (hashable) dataclass: it is a static argument of the jitted step, and the
decoder calls its hooks. `init` returns the trainable tree; the frozen tree is the base (or empty
for full fine-tuning). The decoder sees `merge_trees(frozen, trainable)`: new dicts, same arrays,
nothing copied.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from jaxft import configlib, quant
from jaxft.errors import ConfigError
from jaxft.models import llama, moe, ops
from jaxft.models.config import ModelConfig

Params = dict[str, Any]
# Trainable adapter leaves (and their AdamW moments) are float32 master weights.
ADAPTER_DTYPE = jnp.float32


def merge_trees(a: Params, b: Params) -> Params:
  """Deep-merges two nested dicts of leaves; a key present in both must be a dict in both."""
  out = dict(a)
  for k, v in b.items():
    if k in out and isinstance(out[k], dict) and isinstance(v, dict):
      out[k] = merge_trees(out[k], v)
    elif k in out:
      raise ValueError(f"leaf {k!r} is in both the trainable and the frozen tree")
    else:
      out[k] = v
  return out


def flatten(tree: Params, prefix: str = "") -> dict[str, Any]:
  """{'a': {'b': x}} -> {'a/b': x}."""
  return configlib.flat(tree, prefix, "/")


def unflatten(flat: dict[str, Any]) -> Params:
  out: Params = {}
  for path, v in flat.items():
    node = out
    *parents, leaf = path.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = v
  return out


def count_params(tree) -> int:
  """Number of parameters; a quantized kernel counts its logical size, not its codes."""
  return int(sum(x.size for x in jax.tree.leaves(tree, is_leaf=quant.is_quantized)))


_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def match_targets(targets: str, cfg: ModelConfig) -> tuple[str, ...]:
  """Resolves `peft.targets` to the linear names it selects, in decoder order.

  Items (comma separated): a linear name (`q_proj`), `all-linear`, or a regex matched (search) against
  parameter paths like `layers/q_proj/kernel`; in a mixture of experts the MLP linears are the
  experts' (`layers/experts/gate_proj/kernel`, so `experts` selects them and all-linear includes
  them; the router is never a target). Raises ConfigError when an item matches nothing.
  """
  chosen = set()
  items = [t.strip() for t in targets.split(",") if t.strip()]
  if not items:
    raise ConfigError("peft.targets is empty: name linear layers (q_proj,v_proj), all-linear or a regex")
  for item in items:
    if item == "all-linear":
      hits = set(llama.LINEARS)
    elif _NAME.match(item) and item != "experts":
      hits = {item} & set(llama.LINEARS)
    else:
      try:
        rx = re.compile(item)
      except re.error as e:
        raise ConfigError(f"peft.targets item {item!r} is not a valid regex: {e}") from None
      hits = {n for n in llama.LINEARS if rx.search(target_path(cfg, n))}
    if not hits:
      raise ConfigError(f"peft.targets item {item!r} matches no linear layer; expected one of "
                        f"{', '.join(llama.LINEARS)}, all-linear or a regex over "
                        f"'{target_path(cfg, 'NAME')}'")
    chosen |= hits
  return tuple(n for n in llama.LINEARS if n in chosen)


def is_expert(cfg: ModelConfig, name: str) -> bool:
  """Whether decoder linear `name` is a stack of experts (the MLP of a mixture of experts)."""
  return bool(cfg.num_experts) and name in moe.EXPERT_LINEARS


def target_path(cfg: ModelConfig, name: str) -> str:
  """The path `peft.targets` regexes are matched against for linear `name`."""
  return f"layers/experts/{name}/kernel" if is_expert(cfg, name) else f"layers/{name}/kernel"


def linear_dims(cfg: ModelConfig, name: str) -> tuple[int, int, str, str]:
  """(in, out, in_axis, out_axis) of a decoder linear layer (of each expert, for experts)."""
  spec = llama.param_specs(cfg)["layers"][name]["kernel"]
  return spec.shape[-2], spec.shape[-1], spec.axes[-2], spec.axes[-1]


def linear_lead(cfg: ModelConfig, name: str) -> tuple[tuple[int, ...], tuple[str, ...]]:
  """(shape, logical axes) of the stacking dims before [in, out]: ([L], [layers]), or
  ([L, E], [layers, expert]) for experts. Adapter leaves of a linear stack the same way."""
  spec = llama.param_specs(cfg)["layers"][name]["kernel"]
  return spec.shape[:-2], spec.axes[:-2]


def base_linear(p: Params, x: jnp.ndarray, dtype) -> jnp.ndarray:
  """x @ kernel (+ bias); a quantized kernel is dequantized inside the jitted computation (by
  ops.matmul, which keeps the stored kernel, not a float copy, for its backward)."""
  y = ops.matmul(x, p["kernel"], dtype)
  if "bias" in p:
    y = y + p["bias"].astype(dtype)
  return y


@dataclasses.dataclass(frozen=True)
class Method:
  """Full fine-tuning, and the no-op hooks every method inherits."""
  name: str = "full"
  position_offset: int = 0
  # The adapter format the method exports to (--format=NAME; "" = only the merged model): each
  # method owns its format and writes it (`write_export`).
  export_format: ClassVar[str] = ""

  def write_export(self, directory: str, cfg: ModelConfig, trainable: Params,
                   base_model: str = "") -> None:
    """Writes the trained leaves in `export_format` into `directory` (which must exist)."""
    raise ConfigError(f"peft.method={self.name!r} has no adapter format; export the merged model "
                      "with --format=hf")

  # -- the partition -------------------------------------------------------------------------
  def init(self, cfg: ModelConfig, rng: jax.Array) -> Params:
    """Returns the trainable leaves the method adds (full: none; the base itself trains)."""
    del cfg, rng
    return {}

  def trainable_specs(self, cfg: ModelConfig) -> Params:
    """Tree of `llama.ParamSpec` of the added leaves (shapes + logical axes, for sharding)."""
    del cfg
    return {}

  def init_from_base(self, cfg: ModelConfig, base: Params, added: Params) -> Params:
    """The added leaves completed from the base weights, once, after `init` (DoRA: magnitudes =
    the base kernels' column norms). Default: `added` unchanged."""
    del cfg, base
    return added

  @property
  def trains_base(self) -> bool:
    return self.name == "full"

  def split(self, base: Params, added: Params) -> tuple[Params, Params]:
    """(trainable, frozen) from the base tree and the added tree."""
    if self.trains_base:
      return merge_trees(base, added), {}
    return added, base

  # -- decoder hooks (traced inside the step) --------------------------------------------------
  def layer_params(self, cfg: ModelConfig, params: Params) -> Params:
    """The per-layer tree the decoder scans over (leaves with a leading layer axis). A method may
    derive per-layer leaves from the whole tree here, once per forward pass (prefix tuning's MLP
    computes every layer's prefixes)."""
    del cfg
    return params["layers"]

  def linear(self, name: str, p: Params, x, dtype, rng):
    del name, rng
    return base_linear(p, x, dtype)

  def expert_linear(self, name: str, p: Params, x, group_sizes, dtype, rng):
    """An expert linear of a mixture of experts: rows x [M, in] sorted by expert, group_sizes
    [E] (see models/moe.py); p holds the [E, in, out] kernel and the method's leaves."""
    del name, rng
    return ops.ragged_matmul(x, p["kernel"], group_sizes, dtype)

  def block_output(self, kind: str, p: Params, out, dtype):
    del kind, p, dtype
    return out

  def kv_prefix(self, p: Params, batch: int, dtype):
    del p, batch, dtype
    return None

  # -- export ----------------------------------------------------------------------------------
  def merge(self, cfg: ModelConfig, params: Params) -> Params:
    """Folds the method into plain base params (float32 math); raises when it cannot be merged."""
    del cfg
    return params
