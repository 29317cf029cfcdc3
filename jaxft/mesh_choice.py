"""The mesh a run gets when config.mesh leaves it to jaxft (`mesh.data=-1, mesh.fsdp=0`, the
defaults): data parallelism when one chip holds a whole replica of the step, else fsdp.

A replica is estimated from shapes alone (`jax.eval_shape` of jaxft's init, quantization, PEFT
method and optimizer; nothing is compiled or allocated): the parameters as stored (a quantized base
at its packed size), the optimizer state, the gradients of the trainable leaves, the layer inputs
that full rematerialisation keeps for the backward of the chip's rows, and the layer being
recomputed (`_WORK_BYTES` per token per MLP unit: its float32 [tokens, intermediate] activations
and their gradients; against the stored plans of one chip, 8B QLoRA at 4 x 2,048 tokens on v5e
and 1 x 131,072 on v5p, the estimate is 10% and 2% under what XLA allocates). When that fits
`1 - MARGIN` of a chip's memory the weights are replicated (`data` = the chips); otherwise they are
sharded over all of them (`fsdp` = the chips, `data=1`: ZeRO-3 style, gathered per layer). The
margin stands for what the estimate leaves out: the logits' chunks, a layer's gathered weights,
the program, attention scores where no flash kernel runs. With the weights replicated, jaxft's
loss head today holds the final hidden states of the whole micro-batch on every chip, not of its
own rows (its chunk loop runs over the row-sharded token axis, models/loss.py): `_HEAD_BYTES` per
token per hidden unit of the whole micro-batch are added to a data-parallel replica (float32
hidden states and their gradient, the bfloat16 all-gathered copy: the f32[64,8192,4096] and
bf16[64,8192,4096] buffers of 8B QLoRA on v6e:8x8 with data=64, whose step XLA planned at 29.06
GiB per chip against 5.67 with fsdp=64; 8B LoRA there did not fit at all, 46.66 GiB). A mesh
the config sets (any `mesh.fsdp` other than 0, or a `mesh.data` other than -1) is used as it is.
`mesh.context` is never chosen: rows longer than a chip holds need it set (docs/long_context.md).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import numpy as np

from jaxft import memory, optim, peft, session, sharding, target
from jaxft.errors import ConfigError
from jaxft.models import llama, quantized
from jaxft.quant import quantize

MARGIN = 0.2  # share of a chip's memory kept for what the estimate leaves out (module doc)
_WORK_BYTES = 32  # per token and intermediate unit: the recomputed layer's MLP (module doc)
_HEAD_BYTES = 10  # per token of the whole micro-batch and hidden unit, data parallel (module doc)
_GIB = memory.GIB


@dataclasses.dataclass(frozen=True)
class Need:
  """Bytes of one replica of the train step, from shapes."""
  params: int     # frozen (quantized base as stored) and trainable parameters
  optimizer: int  # optimizer state and the trainable leaves' gradients
  per_row: int    # per row of the micro-batch: the layer inputs full remat saves for the
                  # backward, and the working set of the one layer being recomputed
  head_row: int = 0  # per row of the whole micro-batch, on every chip when weights are replicated


@dataclasses.dataclass(frozen=True)
class Choice:
  """The data and fsdp sizes a run uses, whether jaxft chose them, and why (one line)."""
  data: int
  fsdp: int
  chosen: bool
  reason: str


def is_auto(mesh_cfg) -> bool:
  """Whether config.mesh leaves the data/fsdp split to jaxft (mesh.data=-1 with mesh.fsdp=0)."""
  return int(mesh_cfg.fsdp) == 0 and int(mesh_cfg.data) == -1


def _nbytes(tree) -> int:
  return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def _stored_bytes(base, kind: str, prefix: str = "") -> int:
  """Bytes of the base as stored: quantizable kernels [L, in, out] at their packed size."""
  total = 0
  for k, v in base.items():
    path = f"{prefix}{k}"
    if isinstance(v, dict):
      total += _stored_bytes(v, kind, path + "/")
    elif kind != "none" and quantized.quantizable(path):
      one = jax.eval_shape(lambda w: quantize(w, kind), jax.ShapeDtypeStruct(v.shape[1:], v.dtype))
      total += v.shape[0] * _nbytes(one)
    else:
      total += _nbytes(v)
  return total


def estimate(config, platform: str = "cpu") -> Need:
  """One replica's bytes for `config` built for `platform` (model.dtype=auto follows it): the
  parameters, optimizer state and activations per row, from jax.eval_shape (no compile).
  Raises ConfigError as session.model_config and peft.from_config do."""
  with target.building_for(platform):
    cfg = session.model_config(config)
  method = peft.from_config(config.peft, cfg)
  key = jax.random.key(0)
  base = jax.eval_shape(functools.partial(llama.init_params, cfg), key)
  added = jax.eval_shape(functools.partial(method.init, cfg), key)
  added = jax.eval_shape(functools.partial(method.init_from_base, cfg), base, added)
  trainable, _ = method.split(base, added)
  tx, _ = optim.make(config.optim, config.train.steps)
  opt = _nbytes(jax.eval_shape(tx.init, trainable))
  frozen = 0 if method.trains_base else _stored_bytes(base, config.model.quant)
  saved = 0 if config.model.remat == "offload" else cfg.num_layers * cfg.hidden_size  # (host)
  per_token = saved * np.dtype(cfg.dtype).itemsize + cfg.intermediate_size * _WORK_BYTES
  per_row = config.data.max_len * per_token
  return Need(params=frozen + _nbytes(trainable), optimizer=opt + _nbytes(trainable),
              per_row=per_row, head_row=config.data.max_len * cfg.hidden_size * _HEAD_BYTES)


def _shown(sizes: dict) -> str:
  return ", ".join(f"{a}={n}" for a, n in sizes.items() if a in ("data", "fsdp") or n != 1)


def choose(mesh_cfg, devices: int, chip_gib: float | None, need: Need, rows: int) -> Choice:
  """The data and fsdp sizes for `devices` devices of `chip_gib` GiB each (None: unknown), a
  replica needing `need`, and `rows` rows per micro-batch (data.batch_size / optim.accum_steps).

  An explicit mesh is returned as config.mesh says. Raises ConfigError for sizes that do not fit
  the devices, and, for a chosen mesh, for rows that do not split over its chips (naming
  data.batch_size and the keys that would set the mesh by hand)."""
  if not is_auto(mesh_cfg):
    sizes = sharding.mesh_sizes(mesh_cfg, devices)
    return Choice(sizes["data"], sizes["fsdp"], False,
                  f"mesh {_shown(sizes)}, as config.mesh sets it")
  fixed = {a: int(getattr(mesh_cfg, a, 1)) for a in ("tensor", "expert", "context")}
  # (checks the other axes against the devices: the errors config.mesh gives today)
  free = 1 if -1 in fixed.values() else -1  # (another axis already takes what is left)
  sizes = sharding.mesh_sizes(type("Mesh", (), dict(fixed, data=free, fsdp=1)), devices)
  n = sizes["data"]
  if n == 1:
    return Choice(1, 1, True, f"mesh {_shown(sizes)}: one device left for data and fsdp")
  per_chip = ((need.params + need.optimizer) / (fixed["tensor"] * fixed["expert"])
              + (need.per_row * math.ceil(rows / n) + need.head_row * rows) / sizes["context"]
              ) / _GIB
  if chip_gib is None:
    sizes, why = dict(sizes, data=n), ("chip memory unknown, so weights replicated (set "
                                       "--config.mesh.data=1 --config.mesh.fsdp=-1 to shard them)")
  else:
    replica = (f"a replica of the step (weights, optimizer state, activations, the loss head's "
               f"input: {per_chip:.2f} GiB, estimated)")
    budget = f"{1 - MARGIN:.0%} of a chip's {chip_gib:.2f} GiB"
    if per_chip <= (1 - MARGIN) * chip_gib:
      sizes, why = dict(sizes, data=n), f"{replica} fits {budget}, so data parallelism"
    else:
      sizes, why = dict(sizes, data=1, fsdp=n), (
          f"{replica} exceeds {budget}, so the weights and optimizer state are sharded over the "
          f"{n} chips")
  if rows % n:
    raise ConfigError(
        f"data.batch_size / optim.accum_steps = {rows} rows must be a multiple of {n}: the mesh "
        f"jaxft chose ({_shown(sizes)}; {why}) splits each micro-batch's rows over {n} chips. Set "
        f"data.batch_size to a multiple of {n}, or set config.mesh.data and config.mesh.fsdp "
        "yourself (mesh.context or mesh.tensor take chips without splitting rows)")
  return Choice(sizes["data"], sizes["fsdp"], True, f"mesh {_shown(sizes)} chosen by jaxft: {why}")


def resolve(config, devices, chip_gib: float | None = None) -> tuple:
  """(config, Choice): `config` with mesh.data and mesh.fsdp set to the sizes chosen for
  `devices` (a copy; `config` itself when its mesh is explicit: then Choice holds the sizes as
  typed, -1 included), and the choice with its reason.
  `chip_gib` replaces the chips' own memory (jaxft.plan's --memory_gib). The estimate
  (jax.eval_shape of the model) runs only when there is a choice to make. Raises ConfigError as
  `choose` does."""
  devices = list(devices)
  if not is_auto(config.mesh):  # (its sizes are checked where the mesh is made, as before)
    typed = {a: int(getattr(config.mesh, a, 1)) for a in sharding.AXES}
    return config, Choice(typed["data"], typed["fsdp"], False,
                          f"mesh {_shown(typed)}, as config.mesh sets it (-1: the rest)")
  need, chip = Need(0, 0, 0), chip_gib
  if len(devices) > 1:
    local = [d for d in devices if d.process_index == jax.process_index()] or devices
    chip = chip or memory.chip_memory_gib(local[0])
    need = estimate(config, devices[0].platform)
  rows = config.data.batch_size // max(1, config.optim.accum_steps)
  choice = choose(config.mesh, len(devices), chip, need, rows)
  if choice.chosen:
    config = config.copy_and_resolve_references()
    config.mesh.data, config.mesh.fsdp = choice.data, choice.fsdp
  return config, choice
