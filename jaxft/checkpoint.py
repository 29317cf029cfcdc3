"""Orbax checkpoints of the training state (trainable params, optimizer state, step, RNG) plus a
JSON record of the data position and what base the run needs, each step verified by checksums.

For PEFT methods the frozen base is not saved: it is rebuilt from `model.path` (or the preset and
seed) and its fingerprint is checked on restore.

Every finished step directory gets `jaxft_checksums.json` (size and CRC-32 of each file). Restores
verify it first, so bit rot in a checkpoint's files is found before it can reach the parameters;
a damaged step is skipped for the newest intact one, with a warning naming the damaged files.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import time
import zlib
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp
from absl import logging

from jaxft import files
from jaxft.errors import CheckpointError

CHECKSUMS = "jaxft_checksums.json"
_CHUNK = 16 << 20


def manager(workdir: str, keep: int, async_save: bool = True) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=max(int(keep), 1), create=True,
                                         enable_async_checkpointing=async_save)
  return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"),
                               options=options, item_names=("state", "meta"))


def reader(workdir: str) -> ocp.CheckpointManager:
  """A manager that only reads WORKDIR/checkpoints (creates, cleans and writes nothing: reading
  commands may run on a read-only workdir, or beside a run that is saving). CheckpointError when
  the workdir has no checkpoints directory."""
  directory = os.path.join(os.path.abspath(workdir), "checkpoints")
  if not os.path.isdir(directory):
    raise CheckpointError(f"{workdir}: no checkpoints/ (train first)")
  options = ocp.CheckpointManagerOptions(create=False, read_only=True,
                                         enable_async_checkpointing=False)
  return ocp.CheckpointManager(directory, options=options, item_names=("state", "meta"))


def save(mngr: ocp.CheckpointManager, step: int, state: Any, meta: dict) -> None:
  """Starts saving `state` and `meta` at `step` (asynchronous; `wait` before exiting)."""
  mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                          meta=ocp.args.JsonSave(meta)), force=True)


# ---------------------------------------------------------------------------------------------
# Checksums


def _digest(path: str) -> dict:
  crc = 0
  with open(path, "rb") as f:
    while chunk := f.read(_CHUNK):
      crc = zlib.crc32(chunk, crc)
  return {"size": os.path.getsize(path), "crc32": f"{crc:08x}"}


def _files_of(step_dir: str) -> list[str]:
  out = []
  for d, _, names in os.walk(step_dir):
    for n in names:
      rel = os.path.relpath(os.path.join(d, n), step_dir)
      if rel != CHECKSUMS:
        out.append(rel)
  return sorted(out)


def write_checksums(step_dir: str) -> None:
  """Records the size and CRC-32 of every file of a finished step directory."""
  sums = {rel: _digest(os.path.join(step_dir, rel)) for rel in _files_of(step_dir)}
  files.write_json(os.path.join(step_dir, CHECKSUMS), {"version": 1, "files": sums})


def damaged_files(step_dir: str) -> list[str] | None:
  """The files of a step directory that differ from its checksums ("path (why)"); [] when all
  match; None when the step has no checksums (written before they existed, or killed between
  the save and the checksums): such a step is restored unverified."""
  path = os.path.join(step_dir, CHECKSUMS)
  if not os.path.isfile(path):
    return None
  try:
    with open(path, encoding="utf-8") as f:
      sums = json.load(f)["files"]
  except (OSError, ValueError, KeyError, TypeError) as e:
    return [f"{CHECKSUMS} (unreadable: {e})"]
  bad = []
  for rel, want in sorted(sums.items()):
    full = os.path.join(step_dir, rel)
    if not os.path.isfile(full):
      bad.append(f"{rel} (missing)")
      continue
    have = _digest(full)
    if have["size"] != want.get("size"):
      bad.append(f"{rel} (size {have['size']}, expected {want.get('size')})")
    elif have["crc32"] != want.get("crc32"):
      bad.append(f"{rel} (checksum mismatch)")
  return bad


# ---------------------------------------------------------------------------------------------
# Saving


class Saver:
  """Saves training checkpoints asynchronously and settles each save before the next one (and at
  `close`): waits for it, checks that Orbax finalized it, and writes its checksums.

  A save that fails (a full disk, a read-only or vanished directory) raises CheckpointError at
  once, naming the step and the error; its partial directory is removed and older checkpoints
  are left as they were, so the run can be resumed once the cause is fixed."""

  def __init__(self, workdir: str, keep: int, async_save: bool = True):
    self.mngr = manager(workdir, keep, async_save)
    self.directory = str(self.mngr.directory)
    self._pending: int | None = None
    self._closed = False

  def latest_step(self) -> int | None:
    return self.mngr.latest_step()

  def save(self, step: int, state: Any, meta: dict) -> None:
    self.settle()
    try:
      save(self.mngr, step, state, meta)
    except Exception as e:  # pylint: disable=broad-except  (Orbax and the OS raise many types)
      self._fail(step, e)
    self._pending = step

  def poll(self) -> None:
    """Settles the pending save if its background write has ended (cheap; call every step), so a
    failed save stops the run at the next step rather than at the next save. Single process
    only: with several, processes must settle at the same step (the next save, or the end)."""
    if (self._pending is not None and jax.process_count() == 1
        and not self.mngr.is_saving_in_progress()):
      self.settle()

  def settle(self) -> None:
    """Waits for the pending save; raises CheckpointError if it did not complete."""
    if self._pending is None:
      return
    step, self._pending = self._pending, None
    try:
      self.mngr.wait_until_finished()
      self.mngr.check_for_errors()
    except Exception as e:  # pylint: disable=broad-except
      self._fail(step, e)
    final = os.path.join(self.directory, str(step))
    if jax.process_index() == 0:
      # Orbax logs a failed background write and skips finalizing it instead of raising.
      if not os.path.isdir(final) or glob.glob(f"{final}.orbax-checkpoint-tmp*"):
        self._fail(step, "the write did not complete (see the log above)")
      try:
        write_checksums(final)
      except OSError as e:
        self._fail(step, e)

  def _fail(self, step: int, error) -> None:
    reason = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    # Let Orbax's and TensorStore's background writes of this save end (they fail too) before
    # its event loop goes away, or their callbacks print tracebacks into a closed loop.
    with contextlib.suppress(Exception):
      self.mngr.wait_until_finished()
    with contextlib.suppress(Exception):
      self.mngr.close()
    self._closed = True
    if jax.process_index() == 0:
      for partial in glob.glob(os.path.join(self.directory, f"{step}.orbax-checkpoint-tmp*")):
        shutil.rmtree(partial, ignore_errors=True)
    older = [int(n) for n in os.listdir(self.directory) if n.isdigit() and int(n) != step]
    kept = (f"the checkpoint of step {max(older)} is intact" if older
            else "no earlier checkpoint exists")
    raise CheckpointError(f"{self.directory}: saving the checkpoint of step {step} failed "
                          f"({str(reason)[:300]}); training stopped; {kept}. Fix the cause (disk "
                          "space?) and run the same command to resume.")

  def close(self) -> None:
    try:
      self.settle()
    finally:
      if not self._closed:
        self.mngr.close()


# ---------------------------------------------------------------------------------------------
# Restoring


def _steps(mngr: ocp.CheckpointManager) -> list[int]:
  return sorted(mngr.all_steps(), reverse=True)


def read_step_meta(mngr: ocp.CheckpointManager, step: int) -> dict:
  """The JSON record saved with `step` (no arrays read)."""
  return mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]


def restore_newest_intact(mngr: ocp.CheckpointManager, restore_fn: Callable[[int], Any], *,
                          step: int | None = None, set_aside: bool = False) -> tuple[int, Any]:
  """(step, restore_fn(step)) for the newest checkpoint whose files match their checksums and
  that restores; older ones are tried when a newer one is damaged, with a warning naming what was
  damaged. With `step`, only that checkpoint is tried.

  restore_fn may raise CheckpointError to refuse a checkpoint for a reason other than damage (a
  changed config): that propagates. set_aside: move damaged step directories out of the
  manager's way into WORKDIR/damaged_checkpoints/ (the trainer does; reading commands never
  write into a workdir). Raises CheckpointError when no checkpoint can be restored."""
  steps = _steps(mngr)
  if step is not None:
    if step not in steps:
      have = ", ".join(map(str, sorted(steps))) or "none"
      raise CheckpointError(f"{mngr.directory}: no checkpoint of step {step} (steps: {have})")
    steps = [step]
  if not steps:
    raise CheckpointError(f"{mngr.directory}: no checkpoint to restore (train first)")
  errors = []
  for s in steps:
    bad = damaged_files(os.path.join(str(mngr.directory), str(s)))
    if bad:
      errors.append(f"step {s}: damaged files {', '.join(bad[:4])}"
                    + (f" and {len(bad) - 4} more" if len(bad) > 4 else ""))
    else:
      if bad is None:
        logging.info("checkpoint step %d has no checksums; restoring it unverified", s)
      try:
        out = restore_fn(s)
      except CheckpointError:
        raise
      except Exception as e:  # pylint: disable=broad-except  (a damaged checkpoint raises many types)
        errors.append(f"step {s}: cannot be restored ({type(e).__name__}: {str(e)[:200]})")
      else:
        if errors:
          logging.warning("checkpoint(s) skipped as damaged: %s; using step %d",
                          "; ".join(errors), s)
          if set_aside:
            _set_aside(mngr, [x for x in steps if x > s])
        logging.info("restored checkpoint step %d from %s", s, mngr.directory)
        return s, out
    logging.warning("checkpoint %s in %s", errors[-1], mngr.directory)
  raise CheckpointError(f"{mngr.directory}: no intact checkpoint ({'; '.join(errors)})")


def restore_latest_good(mngr: ocp.CheckpointManager, abstract_state: Any,
                        check_meta: Callable[[dict], None] | None = None):
  """(step, state, meta) of the newest intact checkpoint of a training run, restored onto the
  abstract state's shardings; damaged newer ones are set aside. check_meta(meta) may refuse a
  checkpoint with CheckpointError (the trainer's changed-config check)."""

  def restore_fn(step):
    meta = read_step_meta(mngr, step)
    if check_meta is not None:
      check_meta(meta)
    out = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    return out["state"], out["meta"]

  step, (state, meta) = restore_newest_intact(mngr, restore_fn, set_aside=True)
  return step, state, meta


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


def read_meta(workdir: str, step: int | None = None) -> tuple[int, dict]:
  """(step, meta) of the latest (or given) checkpoint of a workdir, without restoring arrays or
  verifying checksums (restores do that)."""
  mngr = reader(workdir)
  try:
    steps = _steps(mngr)
    if not steps:
      raise CheckpointError(f"{workdir}: no complete checkpoint in checkpoints/ (train first)")
    if step is not None and step not in steps:
      raise CheckpointError(f"{workdir}: no checkpoint of step {step} (steps: "
                            f"{', '.join(map(str, sorted(steps)))})")
    step = steps[0] if step is None else step
    try:
      meta = read_step_meta(mngr, step)
    except Exception:  # pylint: disable=broad-except  (damaged: the restore will fall back)
      meta = {}
  finally:
    mngr.close()
  return step, meta


def abstract(tree: Any) -> Any:
  """ShapeDtypeStructs (with shardings) of a tree of arrays."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
