"""Shardings of an NNX module's state on a mesh: the user's rules, the module's own annotations,
or jaxft's inference.

For each Variable (path `layers/0/attn/q/kernel`), in this order:
  1. the first user rule `(regex, PartitionSpec)` whose regex is found in the path;
  2. the Variable's own NNX annotation (`out_sharding` / `sharding_names` metadata, e.g. from
     `nnx.with_partitioning`);
  3. inferred: the largest dimension the `fsdp` mesh axis divides is split over it (ZeRO-3 style,
     as jaxft's decoder shards its `embed` axis); other dimensions, and arrays that fsdp divides
     nowhere, are replicated.
A quantized kernel (jaxft.quant) is placed by the spec of the float kernel it stands for: its codes
and block scales follow the blocked axis (`QTensor.child_shardings`), so dequantization needs no
communication. Optimizer state follows the trainable params (jaxft.sharding).
"""

from __future__ import annotations

import re

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxft import quant
from jaxft.errors import ConfigError
from jaxft.nnx.targets import path_str

BATCH = ("data", "fsdp")


def infer_spec(shape, mesh_shape: dict) -> P:
  """The inferred spec of an array of `shape`: its largest dim that fsdp divides split over it."""
  n = mesh_shape.get("fsdp", 1)
  free = [i for i, d in enumerate(shape) if n > 1 and d % n == 0]
  if not free:
    return P()
  parts = [None] * len(shape)
  parts[max(free, key=lambda i: (shape[i], -i))] = "fsdp"
  return P(*parts)


def _size(mesh_shape: dict, entry) -> int:
  size = 1
  for a in entry if isinstance(entry, tuple) else (entry,):
    if a not in mesh_shape:
      raise KeyError(a)
    size *= mesh_shape[a]
  return size


def _check(spec, shape, mesh_shape: dict, where: str) -> P:
  spec = P(*spec) if not isinstance(spec, P) else spec
  if len(spec) > len(shape):
    raise ConfigError(f"{where}: spec {spec} has more entries than the array's shape {tuple(shape)}")
  for entry, dim in zip(spec, shape):
    if entry is None:
      continue
    try:
      size = _size(mesh_shape, entry)
    except KeyError as e:
      raise ConfigError(f"{where}: spec {spec} names mesh axis {e.args[0]!r}; the mesh has "
                        f"{', '.join(mesh_shape)}") from None
    if dim % size:
      raise ConfigError(f"{where}: spec {spec} splits a dim of {dim} over {size} devices; "
                        f"shape {tuple(shape)} is not divisible")
  return spec


def partition_spec(path: str, shape, mesh_shape: dict, rules=(), annotation=None) -> P:
  """The PartitionSpec of the Variable at `path` (see the module docstring). Raises ConfigError
  naming the rule or path when a spec names an unknown mesh axis or does not divide the shape."""
  for pattern, spec in rules:
    if re.search(pattern, path):
      return _check(spec, shape, mesh_shape, f"sharding rule {pattern!r} on {path}")
  if annotation is not None:
    return _check(annotation, shape, mesh_shape, f"{path}'s NNX sharding annotation")
  return infer_spec(shape, mesh_shape)


def _annotation(var):
  meta = var.get_metadata()
  spec = meta.get("out_sharding") or meta.get("sharding_names") or meta.get("sharding")
  return None if spec is None else tuple(spec)


def shardings(state: nnx.State, mesh: Mesh, rules=()) -> nnx.State:
  """A State like `state` whose values are NamedShardings (a quantized value: the same node with
  a NamedSharding per child): the tree `jax.device_put` and `jax.jit` take for `state`.

  rules: a sequence of (regex, PartitionSpec or tuple) pairs, first match wins. Raises
  ConfigError for a rule that names an axis the mesh lacks or does not divide its array."""
  for pattern, _ in rules:
    try:
      re.compile(pattern)
    except re.error as e:
      raise ConfigError(f"sharding rule {pattern!r} is not a valid regex: {e}") from None
  mesh_shape = dict(mesh.shape)
  out = []
  for path, var in nnx.to_flat_state(state):
    value = var.get_value()
    spec = partition_spec(path_str(path), value.shape, mesh_shape, rules, _annotation(var))
    sh = NamedSharding(mesh, spec)
    out.append((path, var.replace(value.child_shardings(sh) if quant.is_quantized(value) else sh)))
  return nnx.from_flat_state(out)


def batch_shardings(batch, mesh: Mesh):
  """Shardings of a batch (a pytree of arrays with rows first): rows split over the mesh's
  `data` and `fsdp` axes. Raises ConfigError when those devices do not divide the rows."""
  axes = tuple(a for a in BATCH if a in mesh.shape and mesh.shape[a] > 1)
  ways = _size(dict(mesh.shape), axes) if axes else 1

  def one(x):
    if x.shape[0] % ways:
      raise ConfigError(f"batch of {x.shape[0]} rows: the mesh's {'x'.join(axes)} axes split rows "
                        f"{ways} ways; use a multiple of {ways}")
    return NamedSharding(mesh, P(axes or None, *([None] * (x.ndim - 1))))

  return jax.tree.map(one, batch)
