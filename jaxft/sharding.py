"""Device mesh (`data`, `fsdp`, `tensor`) and the logical-to-mesh rules table.

Parameters name logical axes (see models/llama.py `param_specs`); `RULES` maps each to a mesh axis
(or None = replicated). Batches are sharded over (`data`, `fsdp`).
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxft.errors import ConfigError

AXES = ("data", "fsdp", "tensor")
RULES = {
    "layers": None, "norm": None, "lora": None,
    "vocab": "tensor", "embed": "fsdp", "mlp": "tensor", "heads": "tensor", "kv_heads": "tensor",
    "prefix": None, "adapter": None, "head_dim": None,
}
BATCH = ("data", "fsdp")


def make_mesh(mesh_cfg, devices=None) -> Mesh:
  """A mesh of all devices with the sizes in config.mesh (-1 = what is left); ConfigError otherwise."""
  devices = list(devices if devices is not None else jax.devices())
  sizes = {a: int(getattr(mesh_cfg, a)) for a in AXES}
  free = [a for a, s in sizes.items() if s == -1]
  if len(free) > 1:
    raise ConfigError(f"config.mesh: only one axis may be -1, got {free}")
  if any(s == 0 or s < -1 for s in sizes.values()):
    raise ConfigError(f"config.mesh: sizes must be positive or -1, got {sizes}")
  fixed = math.prod(s for s in sizes.values() if s != -1)
  if free:
    if len(devices) % fixed:
      raise ConfigError(f"config.mesh: {sizes} does not divide the {len(devices)} devices")
    sizes[free[0]] = len(devices) // fixed
  if math.prod(sizes.values()) != len(devices):
    raise ConfigError(f"config.mesh: {sizes} uses {math.prod(sizes.values())} devices, "
                      f"but there are {len(devices)}")
  arr = np.asarray(devices).reshape([sizes[a] for a in AXES])
  return Mesh(arr, AXES)


def spec_for(axes: tuple[str, ...], shape: tuple[int, ...], mesh: Mesh, rules=None) -> P:
  """PartitionSpec of a parameter with logical `axes`; a dim that the mesh axis does not divide
  is replicated instead (small vectors, odd vocabularies)."""
  rules = RULES if rules is None else rules
  out, used = [], set()
  for name, dim in zip(axes, shape):
    m = rules.get(name)
    if m is None or m in used or dim % mesh.shape[m]:
      out.append(None)
    else:
      out.append(m)
      used.add(m)
  return P(*out)


def tree_shardings(spec_tree, mesh: Mesh, rules=None):
  """NamedShardings for a tree of objects with `.axes` and `.shape` (llama.ParamSpec)."""
  is_leaf = lambda x: hasattr(x, "axes") and hasattr(x, "shape")
  return jax.tree.map(lambda s: NamedSharding(mesh, spec_for(s.axes, s.shape, mesh, rules)),
                      spec_tree, is_leaf=is_leaf)


def batch_sharding(mesh: Mesh, ndim: int, leading: int = 0) -> NamedSharding:
  """Sharding of a batch array whose row axis is at position `leading`."""
  parts = [None] * ndim
  parts[leading] = BATCH
  return NamedSharding(mesh, P(*parts))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def check_model_fits(mesh: Mesh, cfg) -> None:
  """ConfigError when mesh.tensor does not divide the attention heads (kv heads included)."""
  t = mesh.shape["tensor"]
  if cfg.num_heads % t or cfg.num_kv_heads % t:
    raise ConfigError(f"config.mesh.tensor={t} does not divide num_heads={cfg.num_heads} and "
                      f"num_kv_heads={cfg.num_kv_heads}")
