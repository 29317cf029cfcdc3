"""Orbax checkpoints of the training state (trainable params, optimizer state, step, RNG) plus a
JSON record of the data position and what base the run needs.

For PEFT methods the frozen base is not saved: it is rebuilt from `model.path` (or the preset and
seed) and its fingerprint is checked on restore.
"""

from __future__ import annotations

import os
import time
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


def restore_latest_good(mngr: ocp.CheckpointManager, abstract_state: Any):
  """(step, state, meta) of the newest checkpoint that restores; a newer one that does not (an
  interrupted or corrupted write) is skipped with a warning. Raises CheckpointError when none does."""
  steps = sorted(mngr.all_steps(), reverse=True)
  errors = []
  for step in steps:
    try:
      state, meta = restore(mngr, abstract_state, step)
    except Exception as e:  # a damaged checkpoint surfaces as many error types
      errors.append(f"step {step}: {type(e).__name__}: {str(e)[:200]}")
      logging.warning("checkpoint step %d in %s cannot be restored (%s); trying an older one",
                      step, mngr.directory, errors[-1])
      continue
    if errors:
      logging.warning("restored step %d; skipped damaged checkpoints: %s", step, "; ".join(errors))
      _set_aside(mngr, [s for s in steps if s > step])
    return step, state, meta
  raise CheckpointError(f"{mngr.directory}: no checkpoint can be restored ({'; '.join(errors)})")


def _set_aside(mngr: ocp.CheckpointManager, steps: list[int]) -> None:
  """Moves damaged step directories to WORKDIR/damaged_checkpoints/ (kept for inspection, out of
  the manager's way so the run can save those steps again)."""
  if jax.process_index() == 0:
    root = os.path.dirname(os.path.abspath(str(mngr.directory)))
    dest = os.path.join(root, "damaged_checkpoints")
    os.makedirs(dest, exist_ok=True)
    for step in steps:
      src = os.path.join(str(mngr.directory), str(step))
      if os.path.isdir(src):
        target = os.path.join(dest, f"{step}-{int(time.time())}")
        os.replace(src, target)
        logging.warning("moved damaged checkpoint step %d to %s", step, target)
  mngr.reload()


# Config keys that fix the shapes of the saved state: a resume that changes them is refused.
SHAPE_KEYS = ("model.path", "model.preset", "model.quant", "model.param_dtype", "peft.method",
              "peft.targets", "peft.lora.rank", "peft.adapter", "peft.prefix", "optim.clip_norm",
              "optim.weight_decay")


def _flat(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    key = f"{prefix}.{k}" if prefix else k
    if isinstance(v, dict):
      out.update(_flat(v, key))
    else:
      out[key] = v
  return out


def changed_shape_keys(saved: dict, current: dict) -> list[str]:
  """Keys under SHAPE_KEYS whose values differ between a saved and the current config dict."""
  a, b = _flat(saved), _flat(current)
  keys = {k for k in a.keys() | b.keys() if any(k == s or k.startswith(s + ".") for s in SHAPE_KEYS)}
  return sorted(f"{k} ({a.get(k)!r} -> {b.get(k)!r})" for k in keys if a.get(k) != b.get(k))


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
