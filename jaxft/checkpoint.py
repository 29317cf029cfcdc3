"""Orbax checkpoints of the training state (trainable params, optimizer state, step, RNG) plus a
JSON record of the data position and what base the run needs.

For PEFT methods the frozen base is not saved: it is rebuilt from `model.path` (or the preset and
seed) and its fingerprint is checked on restore.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging

from jaxft.errors import CheckpointError


def manager(workdir: str, keep: int, async_save: bool = True) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=max(int(keep), 1), create=True,
                                         enable_async_checkpointing=async_save)
  return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"),
                               options=options, item_names=("state", "meta"))


def save(mngr: ocp.CheckpointManager, step: int, state: Any, meta: dict) -> None:
  """Starts saving `state` and `meta` at `step` (asynchronous; `wait` before exiting)."""
  mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                          meta=ocp.args.JsonSave(meta)), force=True)


def latest_step(mngr: ocp.CheckpointManager) -> int | None:
  return mngr.latest_step()


def restore(mngr: ocp.CheckpointManager, abstract_state: Any, step: int | None = None):
  """(state, meta) of `step` (default: the latest), restored onto the abstract state's shardings."""
  step = mngr.latest_step() if step is None else step
  if step is None:
    raise CheckpointError(f"{mngr.directory}: no checkpoint to restore")
  out = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
  logging.info("restored checkpoint step %d from %s", step, mngr.directory)
  return out["state"], out["meta"]


def read_meta(workdir: str, step: int | None = None) -> tuple[int, dict]:
  """(step, meta) of the latest (or given) checkpoint of a workdir, without restoring arrays."""
  directory = os.path.join(os.path.abspath(workdir), "checkpoints")
  if not os.path.isdir(directory):
    raise CheckpointError(f"{workdir}: no checkpoints/ (train first)")
  mngr = ocp.CheckpointManager(directory, item_names=("state", "meta"))
  step = mngr.latest_step() if step is None else step
  if step is None:
    raise CheckpointError(f"{workdir}: no complete checkpoint in checkpoints/")
  meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
  mngr.close()
  return step, meta


def abstract(tree: Any) -> Any:
  """ShapeDtypeStructs (with shardings) of a tree of arrays."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
