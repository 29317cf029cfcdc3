"""The platform a program is built for, and the mesh its activations are laid out on.

Both are read while a step is traced. `platform()` is normally the default backend, but
`jaxft.plan` traces on a CPU host for TPU chips it does not have: it sets the target with
`building_for`, so that choices made from the platform (the attention kernel, the CPU-only
16-bit bit-casts of models/llama.py) follow the chips the program is compiled for, not the host.
`activation_mesh` names the mesh (and the rules table) under which the decoder pins its
activations to the batch axes (`constrain`); outside it the decoder leaves layout to XLA.
"""

from __future__ import annotations

import contextlib
import contextvars
import math

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

_PLATFORM: contextvars.ContextVar[str | None] = contextvars.ContextVar("jaxft_platform",
                                                                        default=None)
_MESH: contextvars.ContextVar = contextvars.ContextVar("jaxft_activation_mesh", default=None)

# Logical axes of activations -> mesh axes. Rows are split over the batch axes (data, fsdp), so
# that every chip keeps the activations of its own rows only and the fsdp-sharded weights are
# gathered per layer instead (FSDP / ZeRO-3); heads and the MLP width follow the tensor axis, and
# the tokens of a row the context axis (context parallelism, models/long_context.py).
ACTIVATION_RULES = {"batch": ("data", "fsdp"), "length": "context", "embed": None,
                    "heads": "tensor", "kv_heads": "tensor", "mlp": "tensor", "head_dim": None}


def platform() -> str:
  """'cpu', 'gpu' or 'tpu': the platform of the program being built."""
  return _PLATFORM.get() or jax.default_backend()


@contextlib.contextmanager
def building_for(name: str):
  """Within the block, `platform()` is `name` (the platform of the devices compiled for)."""
  token = _PLATFORM.set(name)
  try:
    yield
  finally:
    _PLATFORM.reset(token)


@contextlib.contextmanager
def activation_mesh(mesh: Mesh):
  """Within the block (while a step is traced), `constrain` lays activations out on `mesh`; the
  platform is that of the mesh's devices."""
  token = _MESH.set(mesh)
  try:
    with building_for(mesh.devices.flat[0].platform):
      yield
  finally:
    _MESH.reset(token)


def current_mesh() -> Mesh | None:
  """The activation mesh of the step being traced, or None."""
  return _MESH.get()


def _size(mesh: Mesh, axes) -> int:
  return math.prod(dict(mesh.shape).get(a, 1) for a in axes)


def constrain(x: jax.Array, axes: tuple[str | None, ...]) -> jax.Array:
  """x pinned to the layout of its logical `axes` (ACTIVATION_RULES) on the activation mesh; a
  dimension the mesh axes do not divide stays whole. x itself when no mesh is set or it is one
  device (the CPU programs are then unchanged)."""
  mesh = _MESH.get()
  if mesh is None or mesh.size == 1:
    return x
  parts, used = [], set()
  for name, dim in zip(axes, x.shape):
    m = ACTIVATION_RULES.get(name) if name else None
    names = tuple(a for a in ((m,) if isinstance(m, str) else (m or ()))
                  if dict(mesh.shape).get(a, 1) > 1)
    if not names or used & set(names) or dim % _size(mesh, names):
      parts.append(None)
      continue
    parts.append(names[0] if len(names) == 1 else names)
    used |= set(names)
  if all(p is None for p in parts):
    return x
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(*parts)))
