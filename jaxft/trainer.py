"""`train(config, workdir)`: the training loop around the pure step."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from jaxft import (checkpoint, compile_cache, configlib, curves, files, hooks as hooks_lib, memory,
                   mesh_choice, objectives, optim, peft, session, sharding, target, trackers,
                   workdir as workdir_lib)
from jaxft.data import pipeline, sources
from jaxft.data import stream as data_stream
from jaxft.errors import CheckpointError
from jaxft.hooks import NonFiniteError  # noqa: F401 (jaxft.trainer.NonFiniteError, as before)
from jaxft.metrics import MetricsWriter
from jaxft.models import llama
from jaxft.models.ops import pack_frozen
from jaxft.peft import peft_io
from jaxft.step import StepFns, make_steps


def check_config(config) -> None:
  """Value and cross-key checks the schema cannot express, before anything is read or loaded;
  ConfigError names the key."""
  configlib.check_values(config)


def state_shardings(tx, trainable_shardings, mesh) -> dict:
  """Shardings of the train state: trainable params as given, optimizer state like the params it
  tracks, step/rng/counters replicated."""
  rep = sharding.replicated(mesh)
  return {"step": rep, "trainable": trainable_shardings,
          "opt_state": sharding.optimizer_shardings(tx, trainable_shardings, mesh),
          "rng": rep, "skipped": rep}


def fresh_state(tx, trainable, seed: int) -> dict:
  """The train state's leaves other than `trainable`: step, optimizer state, rng, skipped."""
  return {"step": jnp.zeros((), jnp.int32), "opt_state": tx.init(trainable),
          "rng": jax.random.key_data(jax.random.key(seed)), "skipped": jnp.zeros((), jnp.int32)}


def init_state(tx, trainable, seed: int, shardings: dict) -> dict:
  """The train state around `trainable` (already on the mesh); the optimizer state and counters
  are created directly on their shardings."""
  out_sh = {k: v for k, v in shardings.items() if k != "trainable"}
  fresh = jax.jit(lambda tr: fresh_state(tx, tr, seed), out_shardings=out_sh)
  return dict(fresh(trainable), trainable=trainable)


def jit_train_step(steps, mesh, state_sh: dict, frozen_sh, schedule=None):
  """`steps.train` jitted once with explicit shardings: (state, batch, frozen) -> (state, metrics).

  The state is donated; batches [accum, rows, T] are sharded on rows over (data, fsdp); metrics
  (with `tokens`, the non-padding tokens of the global batch, and the `skipped` count) come back
  replicated. The learning-rate schedule's numbers (`optim.Schedule`) are an argument of the
  compiled step, not constants in it."""

  def _train_step(state, batch, frozen, lr_numbers):
    bind = schedule.given(lr_numbers) if schedule is not None else contextlib.nullcontext()
    with bind, target.activation_mesh(mesh):  # activations pinned to the batch axes as it traces
      s, m = steps.train(dict(state, rng=jax.random.wrap_key_data(state["rng"])), batch, frozen)
    # Read from the metrics, never from the (donated) state after the next step was dispatched.
    m = dict(m, tokens=jnp.sum(batch["segment_ids"] > 0), skipped=s["skipped"])
    return dict(s, rng=jax.random.key_data(s["rng"])), m

  rep = sharding.replicated(mesh)
  jitted = jax.jit(_train_step, donate_argnums=0,
                   in_shardings=(state_sh, sharding.batch_sharding(mesh, 3, leading=1), frozen_sh,
                                 rep),
                   out_shardings=(state_sh, rep))
  numbers = schedule.numbers if schedule is not None else np.zeros(5, np.float32)
  return _TrainStep(jitted, numbers, rep)


class _TrainStep:
  """The jitted step with its schedule numbers: called, and lowered (jaxft.plan, where the mesh
  may be a deviceless TPU topology: abstract numbers), as (state, batch, frozen)."""

  def __init__(self, jitted, numbers: np.ndarray, sharding):
    self.jitted, self._numbers, self._sharding, self._on_device = jitted, numbers, sharding, None

  def __call__(self, state, batch, frozen):
    if self._on_device is None:
      self._on_device = jax.make_array_from_callback(  # (every process: the same numbers)
          self._numbers.shape, self._sharding, lambda index: self._numbers[index])
    return self.jitted(state, batch, frozen, self._on_device)

  def lower(self, state, batch, frozen):
    numbers = jax.ShapeDtypeStruct(self._numbers.shape, self._numbers.dtype)
    return self.jitted.lower(state, batch, frozen, numbers)


@dataclasses.dataclass
class Prepared:
  """A model on the mesh made ready to train: the frozen tree, the sharded train state (trainable
  params, optimizer state, counters), their shardings and the step functions."""
  frozen: dict
  state: dict
  state_shardings: dict
  frozen_shardings: Any
  steps: StepFns
  train_step: Callable  # jitted (state, batch [accum, rows, T], frozen) -> (state, metrics)


def prepare(config, model: session.Model) -> Prepared:
  """Splits the model into trainable and frozen leaves, builds the optimizer and its state on the
  shardings of the params it tracks, and jits the train step with explicit shardings."""
  method, mesh = model.method, model.mesh
  added = session.init_added(model, config.train.seed)
  trainable, frozen = method.split(model.base, added)
  n_train, n_frozen = peft.count_params(trainable), peft.count_params(frozen)
  logging.info("trainable params: %d of %d (%.4f%%)", n_train, n_train + n_frozen,
               100.0 * n_train / max(n_train + n_frozen, 1))
  logging.info("%s", sharding.describe((trainable, frozen), mesh))
  # The same partition applied to the declared shardings (LoRA A/B follow their kernel's axes).
  trainable_sh, frozen_sh = method.split(model.base_shardings, model.added_shardings)
  trainable_sh = sharding.value_shardings(trainable, trainable_sh)
  frozen_sh = sharding.value_shardings(frozen, frozen_sh)
  trainable = sharding.place(trainable, trainable_sh, "trainable")
  frozen = sharding.place(frozen, frozen_sh, "frozen")
  # Bit-cast the frozen 16-bit kernels to integers once, in place (donated: no second copy; the
  # base arrays the model held are consumed), as the step reads them (ops.pack_frozen), instead
  # of once per step.
  dtypes = lambda t: [x.dtype for x in jax.tree.leaves(t)]
  if dtypes(jax.eval_shape(pack_frozen, frozen)) != dtypes(frozen):
    frozen = jax.jit(pack_frozen, donate_argnums=0, out_shardings=frozen_sh)(frozen)
  tx, steps, state_sh, train_step = build_step(config, model.cfg, method, mesh, trainable_sh,
                                               frozen_sh)
  state = init_state(tx, trainable, config.train.seed, state_sh)
  batch = steps.objective.abstract_batch(config)

  def measure_with(choice):
    step = train_step if choice is None else build_step(
        config, with_choice(model.cfg, choice), method, mesh, trainable_sh, frozen_sh)[3]
    return memory.measure(lambda: step.lower(state, batch, frozen).compile(),
                          mesh.local_devices[0])

  row_tokens = batch["inputs"].shape[-1] // max(int(mesh.shape.get("context", 1)), 1)
  choice, _, note = fitting_remat(model.cfg, measure_with, row_tokens)
  if note:
    logging.warning("%s", note)
  if model.cfg.remat == "auto" and choice not in (None, "full", "auto"):
    tx, steps, state_sh, train_step = build_step(config, with_choice(model.cfg, choice), method,
                                                 mesh, trainable_sh, frozen_sh)
  return Prepared(frozen, state, state_sh, frozen_sh, steps, train_step)


# The MLP slice model.remat=auto tries when a chip's part of a row is longer (model.mlp_tile).
AUTO_MLP_TILE = 8192


def remat_choices(cfg, row_tokens: int = 0) -> list[str | None]:
  """What model.remat=auto compiles, in order of speed, until one fits: None (full, as
  configured), then, for rows longer than AUTO_MLP_TILE tokens per chip and no model.mlp_tile set,
  full with the MLP tiled, then offload, then offload with the MLP tiled."""
  tile = row_tokens > AUTO_MLP_TILE and not cfg.mlp_tile
  return [None] + (["full+mlp_tile"] if tile else []) + ["offload"] + \
      (["offload+mlp_tile"] if tile else [])


def with_choice(cfg, choice: str | None):
  """The model config a `remat_choices` entry compiles."""
  if choice is None:
    return cfg
  policy, _, tile = choice.partition("+")
  return cfg.replace(remat=policy, mlp_tile=AUTO_MLP_TILE if tile else cfg.mlp_tile)


def fitting_remat(cfg, measure_with: Callable[[str | None], memory.Measured], row_tokens: int = 0):
  """model.remat=auto on an accelerator: full rematerialisation, unless the step compiled with it
  does not fit the chip's memory; then the first of `remat_choices` that fits (the MLP tiled over
  slices of the row, each layer's saved input kept in host memory, or both). `measure_with(choice)`
  compiles the step with that choice (None: as configured; else `with_choice`) and measures it
  (memory.measure); `row_tokens` is a chip's part of a row. Returns (choice, its Measured, a note
  for the log and the plan ('' when auto had nothing to choose)); (cfg.remat, None, '') without
  compiling anything for an explicit policy and on CPU, where auto is dots."""
  if cfg.remat != "auto" or llama.remat_policy(cfg) != "full":
    return cfg.remat, None, ""
  choices = remat_choices(cfg, row_tokens)
  full = measure_with(None)
  if full.fits is not False:
    return "full", full, ""
  for choice in choices[1:]:
    m = measure_with(choice)
    if m.fits:
      what = {"offload": "offload (each layer's saved input in host memory)",
              "full+mlp_tile": f"full with model.mlp_tile={AUTO_MLP_TILE}",
              "offload+mlp_tile": f"offload with model.mlp_tile={AUTO_MLP_TILE} (each layer's "
                                  "saved input in host memory, the MLP in slices)"}[choice]
      return choice, m, (f"model.remat=auto chose {what}: with full the step does not fit "
                         f"({full.describe()}); with {choice} it needs {m.describe()}")
  return "full", full, (f"model.remat=auto: the step fits neither with full ({full.describe()}) "
                        f"nor with {choices[-1]} ({m.describe()})")


def build_step(config, cfg, method, mesh, trainable_sh, frozen_sh):
  """(optimizer, StepFns, train-state shardings, the jitted train step) of `config`: what `prepare`
  runs and what `jaxft.plan` compiles on abstract arrays (one code path)."""
  tx, schedule = optim.make(config.optim, config.train.steps)
  steps = make_steps(cfg, method, tx, schedule, config.train.skip_nonfinite,
                     dropout=getattr(method, "dropout", 0.0) > 0,
                     objective=objectives.from_config(config, method.trains_base))
  state_sh = state_shardings(tx, trainable_sh, mesh)
  return tx, steps, state_sh, jit_train_step(steps, mesh, state_sh, frozen_sh, schedule)


def resume(saver: checkpoint.Saver, state, config, model, workdir: str, writer_rows: list):
  """Restores the newest intact checkpoint onto `state`'s shardings: (step, state, meta).

  Refuses (CheckpointError) a checkpoint made with other shape-defining config keys or on another
  base; keys that change the trained function but not the shapes are allowed with a warning, and
  recorded (appended to `writer_rows` for metrics.jsonl). Metrics rows of steps after the
  restored one (a crash after logging) are dropped."""
  current = config.to_dict()
  changed: list[str] = []

  def check_meta(meta):
    shape, function = configlib.changed_keys(meta.get("config", current), current)
    if shape:
      raise CheckpointError(f"{workdir}: cannot resume: the config changed keys that fix the "
                            f"saved state's shapes: {', '.join(shape)}. Use a new workdir.")
    changed[:] = function

  start, state, meta = checkpoint.restore_latest_good(saver.mngr, checkpoint.abstract(state),
                                                      check_meta)
  if meta.get("base_fingerprint") != model.fingerprint and not model.method.trains_base:
    raise CheckpointError(f"{workdir}: its checkpoints were trained on another base model "
                          "(model.path, preset, seed or quant changed)")
  if changed:
    logging.warning("resuming step %d with a config that changes what is trained: %s",
                    start, "; ".join(changed))
    writer_rows.append({"resumed_with_changes": "; ".join(changed)})
  if jax.process_index() == 0:
    workdir_lib.trim_metrics(workdir, start)
  logging.info("resuming from step %d", start)
  return start, state, meta


class _Stop:
  """Turns SIGTERM/SIGINT into a flag checked between steps."""

  def __init__(self):
    self.signal = None
    self._old = {}

  def __enter__(self):
    for s in (signal.SIGTERM, signal.SIGINT):
      try:
        self._old[s] = signal.signal(s, self._handle)
      except ValueError:  # not the main thread
        pass
    return self

  def _handle(self, signum, frame):
    del frame
    self.signal = signal.Signals(signum).name

  def __exit__(self, *exc):
    for s, h in self._old.items():
      signal.signal(s, h)


def train(config, workdir: str, hooks: tuple = ()) -> dict:
  """Trains as `config` says, writing checkpoints and metrics into `workdir`; resumes when the
  workdir has a checkpoint. `hooks` (jaxft.hooks.Hook) run after the default ones (evaluation,
  checkpoints, metrics). Returns the last logged metrics. Raises JaxftError subclasses for bad
  configs, data and checkpoints, before anything is written."""
  check_config(config)
  trackers.check(config)  # a missing tracker package is named before anything is read
  config, choice = mesh_choice.resolve(config, jax.devices())  # (mesh.fsdp=0: jaxft chooses)
  logging.info("%s", choice.reason)
  mesh = sharding.make_mesh(config.mesh)  # a bad mesh fails before any file is read
  model_cfg = session.model_config(config)
  mesh, _ = sharding.checked_mesh(config, model_cfg, mesh, batch=True)  # before any data
  objective = objectives.from_config(config, config.peft.method == "full")
  # A missing or unreadable data file is named before the workdir is made or filled.
  sources.check(config.data.train)
  if config.data.eval:
    sources.check(config.data.eval)
  if config.peft.init_from:  # and so is a missing adapter to start from
    peft_io.check_dir(config.peft.init_from)
  # One run per workdir: a second one would interleave metrics and delete the first's saves.
  lock = workdir_lib.Lock(workdir) if jax.process_index() == 0 else contextlib.nullcontext()
  with lock:
    return _train(config, workdir, mesh, model_cfg, objective, hooks)


def _train(config, workdir: str, mesh, model_cfg, objective, extra_hooks) -> dict:
  enc = session.encoder(config, workdir)
  train_ds, eval_ds = objective.load_data(config, enc, model_cfg.vocab_size)
  # (after the data, so that a bad row leaves no cache behind; before anything compiles)
  cache = compile_cache.use(config.train.compile_cache, workdir)
  if cache:
    logging.info("compilation cache: %s", cache)
  model = session.load_model(config, mesh)
  run = prepare(config, model)
  # (from the starting weights, so before any resume)
  objective.before_training(run, model, [d for d in (train_ds, eval_ds) if d is not None], config)
  os.makedirs(workdir, exist_ok=True)
  saver = checkpoint.Saver(workdir, config.checkpoint.keep)
  start, state, pos, notes = 0, run.state, pipeline.Position(), []
  if saver.latest_step() is not None:
    start, state, meta = resume(saver, state, config, model, workdir, notes)
    pos = data_stream.position_from(meta["data_position"])  # (this process's own)
    if start >= config.train.steps:
      logging.info("%s: already trained to step %d of train.steps=%d; nothing to do", workdir,
                   start, config.train.steps)
  elif jax.process_index() == 0:  # a fresh start: rows of a run killed before its first save go
    workdir_lib.trim_metrics(workdir, None)
  if jax.process_index() == 0:
    files.write_json(os.path.join(workdir, "config.json"), config.to_dict())
  opened = trackers.open_all(config, workdir) if jax.process_index() == 0 else []
  writer = MetricsWriter(workdir, config.train.steps, start, config.train.progress, opened)
  for note in notes:
    writer.write(start, note)
  loop = hooks_lib.Loop(config, start, state, run.frozen, pos, writer)
  hooks = hooks_lib.default(config, model, jax.jit(run.steps.eval), eval_ds, enc, saver,
                            objective, state["trainable"]) + list(extra_hooks)
  ok = False
  try:
    _loop(loop, hooks, run.train_step, objective.stream(config, train_ds), mesh,
          lambda lp, batch: objective.train_batch(lp, model, batch))
    ok = True
  finally:
    try:
      saver.close()
    except BaseException:
      ok = False  # a failed last save fails the run
      raise
    finally:
      writer.close()
      if ok and jax.process_index() == 0:
        _write_curve(workdir)
      writer.end_trackers(ok)  # (after the curve: it is one of the artifacts)
  loop.last["step"] = loop.step
  loop.last["already_complete"] = start >= config.train.steps
  return loop.last


def _write_curve(workdir: str) -> None:
  try:
    curves.write_loss_curve(workdir)
  except Exception as e:  # a picture must never fail a finished run
    logging.warning("could not write the loss curve: %s", e)


def summary(result: dict, config, workdir: str) -> str:
  """What `python -m jaxft.train` prints last: the final metrics of `result` (train's), or that
  the run was already complete and how to train further; then where the run's files are and the
  commands to run next (a run stopped early by a signal has said how to resume instead)."""
  keys = ("step", "loss", "eval_loss")
  done = "done: " + ", ".join(f"{k}={result[k]:.4g}" if isinstance(result[k], float) else
                              f"{k}={result[k]}" for k in keys if k in result)
  step, steps = result.get("step", 0), config.train.steps
  if step < steps:
    return done
  lines = [done]
  if result.get("already_complete"):
    lines = [f"{workdir}: already complete at step {step} (train.steps={steps}); nothing was "
             f"trained. To train further, run the same command with a larger train.steps, "
             f"e.g. --config.train.steps={2 * steps}"]
  fmt = "adapter" if config.peft.method == "adapter" else "hf"
  out = f"{workdir.rstrip(os.sep)}-{fmt}"
  lines += [f"the run's files: {workdir} (checkpoints/, metrics.jsonl, {curves.LOSS_CURVE}, "
            "config.json); next:",
            f"  python -m jaxft.evaluate --workdir={workdir}",
            f"  python -m jaxft.export --workdir={workdir} --format={fmt} --out={out}",
            f"  python -m jaxft.serve --workdir={workdir}"]
  return "\n".join(lines)


def _run_hooks(hooks, due, loop) -> None:
  if due:
    hooks_lib.flush(hooks)
  for h in due:
    h.run(loop)


def _loop(loop: hooks_lib.Loop, hooks, train_step, stream, mesh, train_batch) -> None:
  """Runs train steps from loop.step to train.steps (or a SIGTERM/SIGINT), calling the hooks;
  `train_batch(loop, batch)` turns each batch of the stream into the one trained on (the
  objective's: rollouts of the policy as it is now, or the batch itself)."""
  config = loop.config
  start, total, rows = loop.step, config.train.steps, config.data.batch_size
  accum = config.optim.accum_steps
  local_ids = sharding.local_rows(mesh, rows, accum)  # this process builds only these rows
  if jax.process_count() > 1:
    logging.info("process %d builds %d of the %d rows of each batch", jax.process_index(),
                 len(local_ids), rows)
  if start == 0:
    _run_hooks(hooks, [h for h in hooks if h.run and h.at_start], loop)
  for h in hooks:
    if h.before_loop:
      h.before_loop()
  with _Stop() as stop:
    while loop.step < total and stop.signal is None:
      batch, loop.pos = stream.batch_at(loop.pos, select=local_ids)
      loop.batch = train_batch(loop, batch)
      device_batch = sharding.put_local_batch(loop.batch, local_ids, mesh, rows, accum)
      loop.state, metrics = train_step(loop.state, device_batch, loop.frozen)
      loop.step += 1
      for h in hooks:
        if h.after_step:
          h.after_step(loop, metrics)
      boundary = loop.step == total or stop.signal is not None
      _run_hooks(hooks, hooks_lib.due(hooks, loop.step, boundary), loop)
    hooks_lib.flush(hooks)
    if loop.step > start or start == 0:
      _run_hooks(hooks, [h for h in hooks if h.at_end == "always"
                         or h.at_end == "done" and loop.step == total], loop)
    if stop.signal is not None and loop.step < total:
      logging.warning("%s at step %d: checkpoint saved", stop.signal, loop.step)
      print(f"stopped by {stop.signal} at step {loop.step}; checkpoint saved. Run the same "
            "command to resume.", flush=True)
