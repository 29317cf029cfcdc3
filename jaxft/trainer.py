"""`train(config, workdir)`: the training loop around the pure step."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from jaxft import checkpoint, curves, flops, optim, peft, session, sharding
from jaxft.data import pipeline
from jaxft.errors import CheckpointError, ConfigError, JaxftError
from jaxft.metrics import MetricsWriter
from jaxft.step import StepFns, make_steps, pack_frozen


class NonFiniteError(JaxftError):
  """The loss or the gradients became NaN or infinite."""


def write_json_atomic(path: str, obj) -> None:
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(obj, f, indent=2, sort_keys=True, default=str)
  os.replace(tmp, path)


def check_config(config) -> None:
  """Cross-key checks the schema cannot express; ConfigError names the key."""
  if config.train.steps < 1:
    raise ConfigError(f"train.steps={config.train.steps}: must be >= 1")
  if config.data.max_len < 2:
    raise ConfigError(f"data.max_len={config.data.max_len}: must be >= 2")
  if config.optim.accum_steps < 1 or config.data.batch_size % config.optim.accum_steps:
    raise ConfigError(f"data.batch_size={config.data.batch_size} must be a multiple of "
                      f"optim.accum_steps={config.optim.accum_steps}")
  if config.train.log_every < 1:
    raise ConfigError(f"train.log_every={config.train.log_every}: must be >= 1")


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
  # base arrays the model held are consumed), as the step reads them (step.pack_frozen), instead
  # of once per step.
  dtypes = lambda t: [x.dtype for x in jax.tree.leaves(t)]
  if dtypes(jax.eval_shape(pack_frozen, frozen)) != dtypes(frozen):
    frozen = jax.jit(pack_frozen, donate_argnums=0, out_shardings=frozen_sh)(frozen)
  tx, schedule = optim.make(config.optim, config.train.steps)
  steps = make_steps(model.cfg, method, tx, schedule, config.train.skip_nonfinite,
                     dropout=getattr(method, "dropout", 0.0) > 0)
  state_sh = state_shardings(tx, trainable_sh, mesh)
  state = init_state(tx, trainable, config.train.seed, state_sh)
  return Prepared(frozen, state, state_sh, frozen_sh, steps,
                  jit_train_step(steps, mesh, state_sh, frozen_sh))


def evaluate_loss(steps, trainable, frozen, examples, config, mesh, max_batches: int = 0) -> dict:
  """Mean target-token loss over the eval examples (one pass, file order)."""
  total, count = 0.0, 0.0
  for i, b in enumerate(pipeline.eval_batches(examples, config.data.max_len,
                                              config.data.batch_size, config.data.packing)):
    if max_batches and i >= max_batches:
      break
    b = {k: v[0] for k, v in put_batch(b, mesh, 1).items()}
    s, n = steps(trainable, frozen, b)
    total, count = total + float(s), count + float(n)
  loss = total / max(count, 1.0)
  return {"eval_loss": loss, "eval_ppl": float(np.exp(min(loss, 50.0))), "eval_tokens": count}


def resume(mngr, state, config, model, workdir: str):
  """Restores the newest complete checkpoint onto `state`'s shardings: (step, state, meta).

  Refuses (CheckpointError) a checkpoint made with other shape-defining config keys or on another
  base; metrics rows of steps after the restored one (a crash after logging) are dropped."""
  try:
    saved_config = checkpoint.read_meta(workdir)[1].get("config", {})
  except Exception:  # a damaged newest checkpoint: restore_latest_good below says which
    saved_config = {}
  changed = checkpoint.changed_shape_keys(saved_config, config.to_dict()) if saved_config else []
  if changed:
    raise CheckpointError(f"{workdir}: cannot resume: the config changed keys that fix the saved "
                          f"state's shapes: {', '.join(changed)}. Use a new workdir.")
  start, state, meta = checkpoint.restore_latest_good(mngr, checkpoint.abstract(state))
  if meta.get("base_fingerprint") != model.fingerprint and not model.method.trains_base:
    raise CheckpointError(f"{workdir}: its checkpoints were trained on another base model "
                          "(model.path, preset, seed or quant changed)")
  metrics_path = os.path.join(workdir, "metrics.jsonl")
  if jax.process_index() == 0 and os.path.isfile(metrics_path):
    with open(metrics_path, encoding="utf-8") as f:
      rows = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= start]
    tmp = metrics_path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
      f.writelines(rows)
    os.replace(tmp, metrics_path)
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
  enc = session.encoder(config, workdir)
  fmt, max_len = config.data.format, config.data.max_len
  train_ds = pipeline.load_examples(config.data.train, enc, fmt, max_len, model_cfg.vocab_size,
                                    show=True)
  eval_ds = (pipeline.load_examples(config.data.eval, enc, fmt, max_len, model_cfg.vocab_size)
             if config.data.eval else None)
  model = session.load_model(config, mesh)
  cfg, method = model.cfg, model.method

  run = prepare(config, model)
  frozen, steps, state = run.frozen, run.steps, run.state
  accum = config.optim.accum_steps
  stream = pipeline.TrainStream(train_ds.examples, max_len=max_len, packing=config.data.packing,
                                rows_per_batch=config.data.batch_size, seed=config.train.seed,
                                shuffle=config.data.shuffle)
  pos = pipeline.Position()
  os.makedirs(workdir, exist_ok=True)
  mngr = checkpoint.manager(workdir, config.checkpoint.keep)
  start = 0
  if mngr.latest_step() is not None:
    start, state, meta = resume(mngr, state, config, model, workdir)
    pos = pipeline.Position(**meta["data_position"])
  if jax.process_index() == 0:
    write_json_atomic(os.path.join(workdir, "config.json"), config.to_dict())

  train_step = run.train_step
  rows = config.data.batch_size
  local_ids = sharding.local_rows(mesh, rows, accum)  # this process builds only these rows
  if jax.process_count() > 1:
    logging.info("process %d builds %d of the %d rows of each batch", jax.process_index(),
                 len(local_ids), rows)
  eval_step = jax.jit(steps.eval)
  writer = MetricsWriter(workdir, config.train.steps, start, config.train.progress)
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
                      config.train.eval_batches)
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
    checkpoint.save(mngr, step, state, meta)

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
    mngr.wait_until_finished()
    mngr.close()
    writer.close()
  if jax.process_index() == 0:
    try:
      curves.write_loss_curve(workdir)
    except Exception as e:  # a picture must never fail a finished run
      logging.warning("could not write the loss curve: %s", e)
  last["step"] = step
  return last
