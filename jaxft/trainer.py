"""`train(config, workdir)`: the training loop around the pure step."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from jaxft import (checkpoint, configlib, curves, files, flops, objectives, optim, peft, session,
                   sharding, workdir as workdir_lib)
from jaxft.data import pipeline, preference
from jaxft.errors import CheckpointError, JaxftError
from jaxft.metrics import MetricsWriter
from jaxft.models.ops import pack_frozen
from jaxft.step import StepFns, make_steps


class NonFiniteError(JaxftError):
  """The loss or the gradients became NaN or infinite."""


def check_config(config) -> None:
  """Value and cross-key checks the schema cannot express, before anything is read or loaded;
  ConfigError names the key."""
  configlib.check_values(config)


def put_batch(batch: dict, mesh, accum: int) -> dict:
  """Global numpy batch [rows, T] (the same on every process) -> device arrays
  [accum, rows/accum, T] sharded over rows; each device gets only its rows."""
  rows = next(iter(batch.values())).shape[0]
  ids = sharding.local_rows(mesh, rows, accum)
  return sharding.put_local_batch({k: v[ids] for k, v in batch.items()}, ids, mesh, rows, accum)


def state_shardings(tx, trainable_shardings, mesh) -> dict:
  """Shardings of the train state: trainable params as given, optimizer state like the params it
  tracks, step/rng/counters replicated."""
  rep = sharding.replicated(mesh)
  return {"step": rep, "trainable": trainable_shardings,
          "opt_state": sharding.optimizer_shardings(tx, trainable_shardings, mesh),
          "rng": rep, "skipped": rep}


def init_state(tx, trainable, seed: int, shardings: dict) -> dict:
  """The train state around `trainable` (already on the mesh); the optimizer state and counters
  are created directly on their shardings."""

  def fresh(tr):
    return {"step": jnp.zeros((), jnp.int32), "opt_state": tx.init(tr),
            "rng": jax.random.key_data(jax.random.key(seed)), "skipped": jnp.zeros((), jnp.int32)}

  out_sh = {k: v for k, v in shardings.items() if k != "trainable"}
  return dict(jax.jit(fresh, out_shardings=out_sh)(trainable), trainable=trainable)


def jit_train_step(steps, mesh, state_sh: dict, frozen_sh):
  """`steps.train` jitted once with explicit shardings: (state, batch, frozen) -> (state, metrics).

  The state is donated; batches [accum, rows, T] are sharded on rows over (data, fsdp); metrics
  (with `tokens`, the non-padding tokens of the global batch, and the `skipped` count) come back
  replicated."""

  def _train_step(state, batch, frozen):
    s, m = steps.train(dict(state, rng=jax.random.wrap_key_data(state["rng"])), batch, frozen)
    # Read from the metrics, never from the (donated) state after the next step was dispatched.
    m = dict(m, tokens=jnp.sum(batch["segment_ids"] > 0), skipped=s["skipped"])
    return dict(s, rng=jax.random.key_data(s["rng"])), m

  rep = sharding.replicated(mesh)
  return jax.jit(_train_step, donate_argnums=0,
                 in_shardings=(state_sh, sharding.batch_sharding(mesh, 3, leading=1), frozen_sh),
                 out_shardings=(state_sh, rep))


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
  tx, schedule = optim.make(config.optim, config.train.steps)
  steps = make_steps(model.cfg, method, tx, schedule, config.train.skip_nonfinite,
                     dropout=getattr(method, "dropout", 0.0) > 0,
                     objective=objectives.from_config(config, method.trains_base))
  state_sh = state_shardings(tx, trainable_sh, mesh)
  state = init_state(tx, trainable, config.train.seed, state_sh)
  return Prepared(frozen, state, state_sh, frozen_sh, steps,
                  jit_train_step(steps, mesh, state_sh, frozen_sh))


def evaluate_loss(steps, trainable, frozen, examples, config, mesh, max_batches: int = 0,
                  objective=objectives.SFT()) -> dict:
  """The objective's loss over the eval examples (one pass, file order): eval_loss, eval_tokens
  and eval_ppl (supervised) or eval_ plus the preference metrics (pairs). `steps` is the jitted
  StepFns.eval of `objective`."""
  sft = objective.name == "sft"
  batches = (pipeline.eval_batches if sft else preference.eval_batches)(
      examples, config.data.max_len, config.data.batch_size, config.data.packing)
  total = None
  for i, b in enumerate(batches):
    if max_batches and i >= max_batches:
      break
    b = {k: v[0] for k, v in put_batch(b, mesh, 1).items()}
    out = jax.tree.map(lambda x: np.asarray(x, np.float64), jax.device_get(steps(trainable, frozen, b)))
    total = out if total is None else jax.tree.map(np.add, total, out)
  terms, stats, counts = total
  loss = float(objective.loss(terms, counts))
  m = {"eval_loss": loss, "eval_tokens": float(counts["tokens"])}
  if sft:
    m["eval_ppl"] = float(np.exp(min(loss, 50.0)))
  m.update({f"eval_{k}": float(v) for k, v in objective.metrics(terms, stats, counts).items()})
  return m


def precompute_reference(run: Prepared, model: session.Model, datasets, config) -> None:
  """Stores in every pair of `datasets` the per-token log-probabilities of the model as `run`
  starts (train.precompute_reference): DPO's reference in one forward pass over the data, so that
  no frozen copy of the starting weights is kept (full fine-tuning)."""
  # (replicated out: every process reads the whole [rows, T] block, as it holds every pair)
  fn = jax.jit(lambda tr, fz, b: objectives.token_logps(model.cfg, model.method, tr, fz, b, None),
               out_shardings=sharding.replicated(model.mesh))
  for ds in datasets:
    t0 = time.time()
    preference.attach_reference(
        ds.examples, lambda b: fn(run.state["trainable"], run.frozen,
                                  {k: v[0] for k, v in put_batch(b, model.mesh, 1).items()}),
        config.data.max_len, config.data.batch_size)
    logging.info("reference log-probs of %d pairs in %.1fs", len(ds.examples), time.time() - t0)


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


def train(config, workdir: str) -> dict:
  """Trains as `config` says, writing checkpoints and metrics into `workdir`; resumes when the
  workdir has a checkpoint. Returns the last logged metrics. Raises JaxftError subclasses for bad
  configs, data and checkpoints, before anything is written."""
  check_config(config)
  mesh = sharding.make_mesh(config.mesh)  # a bad mesh fails before any data is read
  sharding.check_batch(mesh, config.data.batch_size, config.optim.accum_steps)
  model_cfg = session.model_config(config)
  sharding.check_model_fits(mesh, model_cfg)
  sharding.rules_from_config(config.mesh)  # so is a bad mesh.rules
  objective = objectives.from_config(config, config.peft.method == "full")
  # One run per workdir: a second one would interleave metrics and delete the first's saves.
  lock = workdir_lib.Lock(workdir) if jax.process_index() == 0 else contextlib.nullcontext()
  with lock:
    return _train(config, workdir, mesh, model_cfg, objective)


def _train(config, workdir: str, mesh, model_cfg, objective) -> dict:
  enc = session.encoder(config, workdir)
  fmt, max_len = config.data.format, config.data.max_len
  pairs = objective.name != "sft"  # preference objectives read pairs (jaxft/data/preference.py)
  if pairs:
    train_ds = preference.load_pairs(config.data.train, enc, fmt, max_len, model_cfg.vocab_size)
  else:  # (show: the first example is logged with its loss mask)
    train_ds = pipeline.load_examples(config.data.train, enc, fmt, max_len, model_cfg.vocab_size,
                                      show=True)
  load = preference.load_pairs if pairs else pipeline.load_examples
  eval_ds = load(config.data.eval, enc, fmt, max_len, model_cfg.vocab_size) if config.data.eval else None
  model = session.load_model(config, mesh)
  cfg, method = model.cfg, model.method

  run = prepare(config, model)
  frozen, steps, state = run.frozen, run.steps, run.state
  if objective.reference == "data":  # from the starting weights, so before any resume
    precompute_reference(run, model, [d for d in (train_ds, eval_ds) if d is not None], config)
  accum = config.optim.accum_steps
  stream = (preference.PairStream if pairs else pipeline.TrainStream)(
      train_ds.examples, max_len=max_len, packing=config.data.packing,
      rows_per_batch=config.data.batch_size, seed=config.train.seed, shuffle=config.data.shuffle)
  pos = pipeline.Position()
  os.makedirs(workdir, exist_ok=True)
  saver = checkpoint.Saver(workdir, config.checkpoint.keep)
  start, notes = 0, []
  if saver.latest_step() is not None:
    start, state, meta = resume(saver, state, config, model, workdir, notes)
    pos = pipeline.Position(**meta["data_position"])
  elif jax.process_index() == 0:  # a fresh start: rows of a run killed before its first save go
    workdir_lib.trim_metrics(workdir, None)
  if jax.process_index() == 0:
    files.write_json(os.path.join(workdir, "config.json"), config.to_dict())

  train_step = run.train_step
  rows = config.data.batch_size
  local_ids = sharding.local_rows(mesh, rows, accum)  # this process builds only these rows
  if jax.process_count() > 1:
    logging.info("process %d builds %d of the %d rows of each batch", jax.process_index(),
                 len(local_ids), rows)
  eval_step = jax.jit(steps.eval)
  writer = MetricsWriter(workdir, config.train.steps, start, config.train.progress)
  for note in notes:
    writer.write(start, note)
  total = config.train.steps
  last: dict = {}
  flop_counter = flops.FlopCounter(  # tokens/s -> TFLOP/s and MFU; the count is in jaxft/flops.py
      cfg, method.trains_base, 0 if method.trains_base else peft.count_params(state["trainable"]),
      config.train.peak_tflops)

  eval_refs = []
  if eval_ds is not None and config.train.eval_accuracy:
    from jaxft import evaluation
    eval_refs = evaluation.references(config.data.eval, config.data.format)

  def do_eval(step):
    if eval_ds is None:
      return
    m = evaluate_loss(eval_step, state["trainable"], frozen, eval_ds.examples, config, mesh,
                      config.train.eval_batches, objective)
    if config.train.eval_accuracy and eval_refs:
      from jaxft import evaluation
      m.update(evaluation.answer_accuracy(cfg, method, peft.merge_trees(frozen, state["trainable"]),
                                          enc, eval_refs, prefix="eval_"))
    writer.write(step, m)
    last.update(m)
    logging.info("step %d: eval_loss %.4f", step, m["eval_loss"])

  def do_save(step):
    meta = {"data_position": dataclasses.asdict(pos), "base_fingerprint": model.fingerprint,
            "method": method.name, "step": step, "config": config.to_dict()}
    saver.save(step, state, meta)

  def record(step, m, tokens, t_last):
    """Host side of one finished step: non-finite check, logging. Returns the new t_last."""
    if not bool(m["finite"]):
      if not config.train.skip_nonfinite:
        raise NonFiniteError(f"step {step}: loss or gradients are not finite (loss {m['loss']}); "
                             "stopped; the last good checkpoint is kept "
                             "(train.skip_nonfinite=True skips such updates instead)")
      logging.warning("step %d: non-finite loss or gradients; update skipped", step)
    if step % config.train.log_every == 0 or step == total:
      dt = time.time() - t_last
      row = {"loss": float(m["loss"]), "lr": float(m["lr"]), "grad_norm": float(m["grad_norm"]),
             "tokens_per_sec": tokens / max(dt, 1e-9), "skipped_steps": int(m["skipped"])}
      row.update({k: float(v) for k, v in m["objective"].items()})  # (TRL's names: rewards/...)
      row.update(flop_counter.metrics(row["tokens_per_sec"]))
      writer.write(step, row)
      writer.progress(step, row["loss"], row["tokens_per_sec"], row.get("mfu"))
      last.update(row)
      return time.time(), True
    return t_last, False

  if start == 0:
    do_eval(0)
  step = start
  try:
    with _Stop() as stop:
      # Metrics are read one step late, so the host prepares batch k+1 while step k runs.
      pending = None  # (step, device metrics)
      t_last, tokens_since = time.time(), 0

      def flush():
        nonlocal pending, t_last, tokens_since
        if pending is not None:
          k, dm = pending
          pending = None
          dm = jax.device_get(dm)
          tokens_since += int(dm["tokens"])  # global count (this process builds only its rows)
          t_last, logged = record(k, dm, tokens_since, t_last)
          if logged:
            tokens_since = 0

      while step < total and stop.signal is None:
        batch, pos = stream.batch_at(pos, select=local_ids)
        flop_counter.observe(batch["segment_ids"])
        device_batch = sharding.put_local_batch(batch, local_ids, mesh, rows, accum)
        state, metrics = train_step(state, device_batch, frozen)
        saver.poll()
        flush()
        step += 1
        pending = (step, metrics)
        boundary = step == total or stop.signal is not None
        if config.train.eval_every and step % config.train.eval_every == 0 and not boundary:
          flush()
          do_eval(step)
        if config.checkpoint.every and step % config.checkpoint.every == 0 and not boundary:
          flush()
          do_save(step)
      flush()
      if step > start or start == 0:
        if step == total:
          do_eval(step)
        do_save(step)
      if stop.signal is not None and step < total:
        logging.warning("%s at step %d: checkpoint saved", stop.signal, step)
        print(f"stopped by {stop.signal} at step {step}; checkpoint saved. Run the same command "
              "to resume.", flush=True)
  finally:
    try:
      saver.close()
    finally:
      writer.close()
  if jax.process_index() == 0:
    try:
      curves.write_loss_curve(workdir)
    except Exception as e:  # a picture must never fail a finished run
      logging.warning("could not write the loss curve: %s", e)
  last["step"] = step
  return last
