"""Device mesh (`data`, `fsdp`, `tensor`, `expert`, `context`), the logical-to-mesh rules table, and
the shardings of everything the train step touches: params (trainable, frozen, quantized),
optimizer state, batches.

Parameters name logical axes (see models/llama.py `param_specs`); a rules table maps each to a mesh
axis (or None = replicated); `config.mesh.rules` overrides entries ("embed=fsdp,vocab=none").
Batches are sharded on their row axis over (`data`, `fsdp`), and on their token axis over `context`
(context parallelism: a row's tokens split over chips, models/long_context.py); each process
builds only the rows its own devices hold (`local_rows`).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxft.errors import ConfigError

# (context last: the fastest-varying axis of a TPU slice's device order, nearest neighbours, for
# the all-gather of keys and values that every layer does over it)
AXES = ("data", "fsdp", "tensor", "expert", "context")
# Logical axis -> mesh axis (None = replicated). fsdp shards the model dimension of every matrix
# (ZeRO-3 style: gathered per layer inside the scan, since the decoder pins activations to the batch
# axes, jaxft.target); tensor shards heads, MLP and vocabulary
# (Megatron style). LoRA A/B reuse the logical axes of the kernel they adapt, so they are sharded
# like it on those dimensions; a leaf that fsdp does not split that way is split over fsdp on its
# rank (`spread_over_fsdp`), so that no trainable leaf is whole on every chip.
RULES: dict[str, str | tuple[str, ...] | None] = {
    "layers": None, "norm": None, "lora": None,
    "vocab": "tensor", "embed": "fsdp", "mlp": "tensor", "heads": "tensor", "kv_heads": "tensor",
    "prefix": None, "adapter": None, "head_dim": None,
    # Mixture of experts: the stacked experts split over `expert` (expert parallelism: each chip
    # holds E / mesh.expert experts; the router's [embed, E] stays whole).
    "expert": "expert", "router": None,
}
BATCH = ("data", "fsdp")
Rules = dict[str, Any]


# -- the rules table --------------------------------------------------------------------------------

def parse_rules(text: str, base: Rules | None = None) -> Rules:
  """`base` (default RULES) updated by 'LOGICAL=AXIS,...' where AXIS is a mesh axis, several
  joined by '+' (`embed=data+fsdp`), or `none` (replicated).

  Raises ConfigError naming config.mesh.rules for an unknown logical or mesh axis.
  """
  rules = dict(RULES if base is None else base)
  for item in filter(None, (t.strip() for t in (text or "").split(","))):
    name, sep, value = (s.strip() for s in item.partition("="))
    if not sep or not name:
      raise ConfigError(f"config.mesh.rules item {item!r}: expected LOGICAL=AXIS, e.g. embed=fsdp")
    if name not in rules:
      raise ConfigError(f"config.mesh.rules item {item!r}: unknown logical axis {name!r}; expected "
                        f"one of {', '.join(sorted(rules))}")
    if value.lower() in ("none", "", "replicated"):
      rules[name] = None
      continue
    axes = tuple(a.strip() for a in value.split("+"))
    bad = [a for a in axes if a not in AXES]
    if bad or len(set(axes)) != len(axes):
      raise ConfigError(f"config.mesh.rules item {item!r}: {value!r} is not a mesh axis; expected "
                        f"{', '.join(AXES)}, several joined by '+', or none")
    rules[name] = axes[0] if len(axes) == 1 else axes
  return rules


def rules_from_config(mesh_cfg) -> Rules:
  """The rules table of config.mesh (RULES with config.mesh.rules applied)."""
  return parse_rules(mesh_cfg.rules)


# -- the mesh ---------------------------------------------------------------------------------------

def mesh_sizes(mesh_cfg, num_devices: int) -> dict[str, int]:
  """{axis: size} from config.mesh with -1 (and fsdp=0) resolved; ConfigError when they do not
  fit the devices."""
  sizes = {a: int(getattr(mesh_cfg, a, 1)) for a in AXES}  # (expert, context: 1 when omitted)
  if sizes["fsdp"] == 0:  # left to jaxft: train and plan choose it first (jaxft/mesh_choice.py);
    # elsewhere the weights stay replicated, or fsdp takes the devices an explicit mesh.data leaves
    sizes["fsdp"] = -1 if sizes["data"] > 0 and -1 not in sizes.values() else 1
  free = [a for a, s in sizes.items() if s == -1]
  shown = ", ".join(f"{a}={s}" for a, s in sizes.items())
  if len(free) > 1:
    raise ConfigError(f"config.mesh ({shown}): only one axis may be -1, got {', '.join(free)}")
  if any(s == 0 or s < -1 for s in sizes.values()):
    raise ConfigError(f"config.mesh ({shown}): sizes must be positive or -1")
  fixed = math.prod(s for s in sizes.values() if s != -1)
  if free:
    if num_devices % fixed:
      raise ConfigError(f"config.mesh ({shown}): the fixed sizes multiply to {fixed}, which does not "
                        f"divide the {num_devices} devices")
    sizes[free[0]] = num_devices // fixed
  if math.prod(sizes.values()) != num_devices:
    raise ConfigError(f"config.mesh ({shown}): uses {math.prod(sizes.values())} devices, but there "
                      f"are {num_devices}; set one axis to -1 or make the product {num_devices}")
  return sizes


def make_mesh(mesh_cfg, devices=None) -> Mesh:
  """A mesh over all devices (of every process) with the sizes in config.mesh (-1 = what is left).

  Raises ConfigError when the sizes do not fit the number of devices."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = mesh_sizes(mesh_cfg, len(devices))
  shape = [sizes[a] for a in AXES]
  try:  # topology-aware order on TPU slices (neighbours along the fastest-varying axes)
    from jax.experimental import mesh_utils
    arr = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
  except Exception:  # CPU, odd shapes: plain order (process-major, so batch rows stay local)
    arr = np.asarray(devices, dtype=object).reshape(shape)
  return Mesh(arr, AXES)


def check_model_fits(mesh: Mesh, cfg) -> None:
  """ConfigError when mesh.tensor does not divide the attention heads (kv heads included), or
  mesh.expert the experts."""
  t = mesh.shape["tensor"]
  if cfg.num_heads % t or cfg.num_kv_heads % t:
    raise ConfigError(f"config.mesh.tensor={t} does not divide num_heads={cfg.num_heads} and "
                      f"num_kv_heads={cfg.num_kv_heads}; use a tensor size that divides both")
  e = mesh.shape.get("expert", 1)
  if e > 1 and (not cfg.num_experts or cfg.num_experts % e):
    raise ConfigError(f"config.mesh.expert={e} does not divide num_experts={cfg.num_experts} "
                      "(a dense model takes mesh.expert=1)")


def checked_mesh(config, model_cfg, mesh: Mesh | None = None,
                 batch: bool = False) -> tuple[Mesh, Rules]:
  """(mesh, rules table) of config.mesh, or of `mesh` when given: every mesh check in one place,
  before anything is read or loaded. The model must divide over the mesh; with `batch` (training)
  so must data.batch_size / optim.accum_steps. ConfigError names the key."""
  mesh = mesh or make_mesh(config.mesh)
  if batch:
    check_batch(mesh, config.data.batch_size, config.optim.accum_steps)
    check_context(mesh, config.data.max_len)
  check_model_fits(mesh, model_cfg)
  return mesh, rules_from_config(config.mesh)


def batch_ways(mesh: Mesh) -> int:
  """How many ways the batch rows are split (data * fsdp)."""
  return math.prod(mesh.shape[a] for a in BATCH)


def check_batch(mesh: Mesh, rows: int, accum: int = 1) -> None:
  """ConfigError when the rows of a micro-batch do not split evenly over data * fsdp."""
  ways = batch_ways(mesh)
  if (rows // accum) % ways:
    raise ConfigError(f"data.batch_size={rows} (/ optim.accum_steps={accum}) must be a multiple of "
                      f"config.mesh data*fsdp={ways}: every device takes whole rows")


def check_context(mesh: Mesh, max_len: int) -> None:
  """ConfigError unless rows of data.max_len tokens split into 2 * mesh.context equal chunks (the
  zigzag order of context parallelism, models/long_context.py)."""
  n = dict(mesh.shape).get("context", 1)
  if n > 1 and max_len % (2 * n):
    raise ConfigError(f"config.mesh.context={n}: data.max_len={max_len} must be a multiple of "
                      f"2 * context = {2 * n} (each chip holds two equal chunks of every row)")


# -- parameter shardings ----------------------------------------------------------------------------

def _mesh_size(mesh: Mesh, m) -> int:
  return math.prod(mesh.shape[a] for a in (m if isinstance(m, tuple) else (m,)))


def spec_for(axes: tuple[str, ...], shape: tuple[int, ...], mesh: Mesh, rules: Rules | None = None) -> P:
  """PartitionSpec of an array with logical `axes`. A dim that its mesh axes do not divide, or whose
  mesh axes an earlier dim already uses, is replicated instead (small vectors, odd vocabularies)."""
  rules = RULES if rules is None else rules
  out, used = [], set()
  for name, dim in zip(axes, shape):
    m = rules.get(name)
    names = () if m is None else (m if isinstance(m, tuple) else (m,))
    if any(a not in mesh.shape for a in names):  # a mesh made without that axis
      names, m = (), None
    if not names or used & set(names) or dim % _mesh_size(mesh, m):
      out.append(None)
    else:
      out.append(m)
      used |= set(names)
  return P(*out)


def tree_shardings(spec_tree, mesh: Mesh, rules: Rules | None = None):
  """NamedShardings for a tree of objects with `.axes` and `.shape` (llama.ParamSpec)."""
  is_leaf = lambda x: hasattr(x, "axes") and hasattr(x, "shape")
  return jax.tree.map(lambda s: NamedSharding(mesh, spec_for(s.axes, s.shape, mesh, rules)),
                      spec_tree, is_leaf=is_leaf)


def spread_over_fsdp(shardings, spec_tree):
  """`shardings` (of a tree of llama.ParamSpec-like leaves) with every array that the fsdp axis
  does not split yet split over it on its largest dimension that fsdp divides and no mesh axis
  uses. For the small trainable leaves (LoRA A/B) whose axes map to `tensor` only: on a mesh
  without a tensor axis they would otherwise be whole on every chip, with their optimizer state."""
  is_leaf = lambda x: hasattr(x, "axes") and hasattr(x, "shape")

  def one(sh: NamedSharding, spec) -> NamedSharding:
    n = sh.mesh.shape["fsdp"]
    parts = list(sh.spec) + [None] * (len(spec.shape) - len(sh.spec))
    used = {a for p in parts if p is not None for a in (p if isinstance(p, tuple) else (p,))}
    if n == 1 or "fsdp" in used:
      return sh
    free = [i for i, p in enumerate(parts)  # (never the scanned layer axis: sliced per layer)
            if p is None and spec.axes[i] != "layers" and spec.shape[i] % n == 0]
    if not free:
      return sh
    parts[max(free, key=lambda i: spec.shape[i])] = "fsdp"
    return NamedSharding(sh.mesh, P(*parts))

  return jax.tree.map(one, shardings, spec_tree, is_leaf=lambda x: isinstance(x, NamedSharding)
                      or is_leaf(x))


def _quantized_shardings(value, sh: NamedSharding):
  """Shardings of the arrays inside one quantized parameter, from the sharding `sh` of the float
  weight it stands for.

  Every quantized node (jaxft.quant.QTensor) defines `child_shardings(self, sh)`, returning the
  same node type whose array children are NamedShardings, placed so that each device holds the
  codes and the scales of the same block of the weight.
  """
  return value.child_shardings(sh)


def _is_array(x) -> bool:
  return isinstance(x, (jax.Array, np.ndarray, jax.ShapeDtypeStruct))


def value_shardings(values, shardings):
  """Expands a tree of per-parameter shardings to the arrays of `values` (same tree, where a
  quantized parameter is a pytree node of codes and scales): the tree `jit` and Orbax take."""
  return jax.tree.map(lambda sh, v: sh if _is_array(v) else _quantized_shardings(v, sh),
                      shardings, values)


def place(tree, shardings, what: str = "params"):
  """`tree` on `shardings` (a tree from `value_shardings`). Leaves already there are returned as
  they are (no copy); others, e.g. from a loader that placed them its own way, are moved once with
  a warning. The jitted step insists on its declared shardings, so this is where they must agree."""
  pairs = zip(jax.tree.leaves(tree), jax.tree.leaves(shardings))
  off = sum(not x.sharding.is_equivalent_to(sh, x.ndim) for x, sh in pairs)
  if not off:
    return tree
  logging.warning("%d %s arrays were not on the shardings of the rules table; moving them", off, what)
  return jax.device_put(tree, shardings)


def optimizer_shardings(tx, trainable_shardings, mesh: Mesh):
  """Shardings of `tx.init(trainable)`: every copy of the trainable tree inside the optimizer state
  (Adam's mu and nu, ...) is sharded like the trainable params; counters are replicated."""
  import optax
  params = jax.tree.map(lambda _: jax.ShapeDtypeStruct((), np.float32), trainable_shardings)
  abstract_state = jax.eval_shape(tx.init, params)
  return optax.tree_map_params(tx, lambda _, sh: sh, abstract_state, trainable_shardings,
                               transform_non_params=lambda _: replicated(mesh))


# -- batches ----------------------------------------------------------------------------------------

def batch_sharding(mesh: Mesh, ndim: int, leading: int = 0) -> NamedSharding:
  """Sharding of a batch array whose row axis is at position `leading` (over data and fsdp) and
  token axis after it (over context, when mesh.context > 1)."""
  parts = [None] * ndim
  parts[leading] = BATCH
  if dict(mesh.shape).get("context", 1) > 1 and leading + 1 < ndim:
    parts[leading + 1] = "context"
  return NamedSharding(mesh, P(*parts))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def local_rows(mesh: Mesh, rows: int, accum: int = 1) -> np.ndarray:
  """Sorted indices of the rows of a global batch of `rows` rows (split into `accum` micro-batches
  of consecutive rows) that this process's devices hold: the only rows it needs to build."""
  sh = batch_sharding(mesh, 2, leading=1)
  grid = np.arange(rows).reshape(accum, rows // accum)
  idx = sh.addressable_devices_indices_map(grid.shape)
  return np.unique(np.concatenate([grid[i].ravel() for i in idx.values()]))


def put_local_batch(local: dict, row_ids: np.ndarray, mesh: Mesh, rows: int, accum: int) -> dict:
  """Device arrays [accum, rows/accum, ...] sharded over their rows, from this process's rows.

  local: {name: array [len(row_ids), ...]} holding global rows `row_ids` (from `local_rows`)."""
  grid = np.arange(rows).reshape(accum, rows // accum)
  where = np.full(rows, -1)
  where[row_ids] = np.arange(len(row_ids))
  out = {}
  for k, v in local.items():
    shape = (accum, rows // accum, *v.shape[1:])
    spec = batch_sharding(mesh, len(shape), leading=1).spec  # (tokens over context)

    def fetch(index, v=v):
      pick = where[grid[index[0], index[1]]]
      assert (pick >= 0).all(), "a device asked for a row this process did not build"
      return v[pick][(slice(None), slice(None), *index[2:])]

    out[k] = jax.make_array_from_callback(shape, NamedSharding(mesh, spec), fetch)
  return out


# -- inspection -------------------------------------------------------------------------------------

def bytes_per_device(tree) -> dict[Any, int]:
  """{device: bytes of the tree's arrays held there}, over this process's devices."""
  out: dict[Any, int] = {}
  for x in jax.tree.leaves(tree):
    for s in x.addressable_shards:
      out[s.device] = out.get(s.device, 0) + s.data.nbytes
  return out


def describe(tree, mesh: Mesh) -> str:
  """One line: the mesh and how many bytes of `tree` the fullest device holds (for the log)."""
  per = bytes_per_device(tree)
  total = sum(x.nbytes for x in jax.tree.leaves(tree))
  shape = ", ".join(f"{a}={mesh.shape[a]}" for a in AXES if a in mesh.shape)
  return (f"mesh ({shape}) over {mesh.size} devices in {jax.process_count()} processes; "
          f"params {total / 2**20:.1f} MiB, at most {max(per.values(), default=0) / 2**20:.1f} MiB "
          "on one device")


def put_batch(batch: dict, mesh, accum: int) -> dict:
  """Global numpy batch [rows, T] (the same on every process) -> device arrays
  [accum, rows/accum, T] sharded over rows; each device gets only its rows."""
  rows = next(iter(batch.values())).shape[0]
  ids = local_rows(mesh, rows, accum)
  return put_local_batch({k: v[ids] for k, v in batch.items()}, ids, mesh, rows, accum)
