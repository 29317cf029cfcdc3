"""What the training loop calls between steps: evaluation (loss, answer accuracy), checkpoints and
metrics, as hooks (Levanter's `trainer.add_hook`, Tunix's training hooks). The loop names none of
them: it runs the train step, hands each hook the step's metrics, and calls the hooks that are due.

A hook runs at every `every`-th step (not at the last step, nor at one interrupted by a signal),
at step 0 of a fresh run (`at_start`), and when the loop ends (`at_end`: "done" when the run
reached train.steps, "always" whenever it trained a step or started fresh). Hooks run in list
order; before any hook runs, every hook's `flush` finishes the host work still pending.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable

import jax
from absl import logging

from jaxft import checkpoint, eval as evaluation, flops, peft
from jaxft.data import stream as data_stream
from jaxft.errors import JaxftError
from jaxft.metrics import MetricsWriter


class NonFiniteError(JaxftError):
  """The loss or the gradients became NaN or infinite."""


@dataclasses.dataclass
class Loop:
  """The loop's state as hooks read it: the step just finished, the train state after it, the data
  position of the next batch, and the last logged metrics (what `train` returns)."""
  config: Any
  step: int
  state: dict
  frozen: dict
  pos: Any
  writer: MetricsWriter
  last: dict = dataclasses.field(default_factory=dict)
  batch: dict | None = None  # the host batch of the step just dispatched (after train_batch)


@dataclasses.dataclass
class Hook:
  """`run(loop)` at the steps described in the module docstring; `after_step(loop, metrics)`
  after every step with its (device) metrics; `flush()` finishes pending host work;
  `before_loop()` once, just before the first step."""
  name: str
  run: Callable[[Loop], None] | None = None
  every: int = 0
  at_start: bool = False
  at_end: str = ""  # "", "done" or "always"
  after_step: Callable[[Loop, dict], None] | None = None
  flush: Callable[[], None] | None = None
  before_loop: Callable[[], None] | None = None  # after the step-0 hooks, before the first step


def evaluation_hook(evaluators: list[Callable[[Loop], dict]], every: int) -> Hook:
  """Runs each evaluator (loop -> metrics) and writes their metrics as one eval row: at step 0,
  every `every` steps and at the last step."""

  def run(loop: Loop):
    m = {}
    for fn in evaluators:
      m.update(fn(loop))
    loop.writer.write(loop.step, m)
    loop.last.update(m)
    logging.info("step %d: eval_loss %.4f", loop.step, m["eval_loss"])

  return Hook("evaluation", run, every=every, at_start=True, at_end="done")


def loss_evaluator(eval_step, examples, config, mesh, objective) -> Callable[[Loop], dict]:
  """eval_loss (and the objective's eval metrics) over `examples` (evaluation.evaluate_loss)."""
  return lambda loop: evaluation.evaluate_loss(
      eval_step, loop.state["trainable"], loop.frozen, examples, config, mesh,
      config.train.eval_batches, objective)


def accuracy_evaluator(cfg, method, encoder, refs) -> Callable[[Loop], dict]:
  """eval_exact_match and friends: greedy answers to the reference rows (train.eval_accuracy)."""
  return lambda loop: evaluation.answer_accuracy(
      cfg, method, peft.merge_trees(loop.frozen, loop.state["trainable"]), encoder, refs,
      prefix="eval_")


def checkpoint_hook(saver: checkpoint.Saver, model, every: int) -> Hook:
  """Saves the train state with what a resume needs (data position, base fingerprint, config)
  every `every` steps and when the loop ends; polls the asynchronous save after every step, so a
  failed save stops the run."""

  def run(loop: Loop):
    meta = {"data_position": data_stream.position_record(loop.pos),  # (every process's)
            "base_fingerprint": model.fingerprint, "method": model.method.name,
            "step": loop.step, "config": loop.config.to_dict()}
    saver.save(loop.step, loop.state, meta)

  return Hook("checkpoint", run, every=every, at_end="always",
              after_step=lambda loop, metrics: saver.poll())


class MetricsRecorder:
  """Logs the train metrics every train.log_every steps (and at the last): loss, lr, grad_norm,
  tokens/s, skipped steps, the objective's metrics, TFLOP/s and MFU; stops the run on a
  non-finite loss unless train.skip_nonfinite. Metrics are read one step late, so the host
  prepares batch k+1 while step k runs."""

  def __init__(self, config, flop_counter: flops.FlopCounter, uniform_loss: float | None = None):
    self.config = config
    self.flop_counter = flop_counter
    self.uniform_loss = uniform_loss  # log(vocab): cross-entropy of a uniform guess (None: no check)
    self.pending = None  # (loop, step, device metrics)
    self.t_last, self.tokens_since = time.time(), 0

  def hook(self) -> Hook:
    return Hook("metrics", after_step=self.after_step, flush=self.flush,
                before_loop=self.before_loop)

  def before_loop(self) -> None:
    self.t_last, self.tokens_since = time.time(), 0

  def after_step(self, loop: Loop, metrics: dict) -> None:
    self.flop_counter.observe(loop.batch["segment_ids"])
    self.flush()
    self.pending = (loop, loop.step, metrics)

  def flush(self) -> None:
    if self.pending is None:
      return
    loop, step, dm = self.pending
    self.pending = None
    dm = jax.device_get(dm)
    self.tokens_since += int(dm["tokens"])  # global count (this process builds only its rows)
    if self._record(loop, step, dm):
      self.tokens_since = 0

  def _record(self, loop: Loop, step: int, m: dict) -> bool:
    """Host side of one finished step: non-finite check, logging. Returns whether it logged."""
    train = self.config.train
    if not bool(m["finite"]):
      if not train.skip_nonfinite:
        raise NonFiniteError(f"step {step}: loss or gradients are not finite (loss {m['loss']}); "
                             "stopped; the last good checkpoint is kept "
                             "(train.skip_nonfinite=True skips such updates instead)")
      logging.warning("step %d: non-finite loss or gradients; update skipped", step)
    if step == 1 and self.uniform_loss is not None:
      check_start_loss(float(m["loss"]), self.uniform_loss, self.config.model.path)
    if step % train.log_every and step != train.steps:
      return False
    dt = time.time() - self.t_last
    row = {"loss": float(m["loss"]), "lr": float(m["lr"]), "grad_norm": float(m["grad_norm"]),
           "tokens_per_sec": self.tokens_since / max(dt, 1e-9), "skipped_steps": int(m["skipped"])}
    row.update({k: float(v) for k, v in m["objective"].items()})  # (TRL's names: rewards/...)
    row.update(self.flop_counter.metrics(row["tokens_per_sec"]))
    loop.writer.write(step, row)
    loop.writer.progress(step, row["loss"], row["tokens_per_sec"], row.get("mfu"), row["lr"])
    loop.last.update(row)
    self.t_last = time.time()
    return True


# A starting model whose loss is this many times a uniform guess's predicts worse than knowing
# nothing: a corrupted or mismatched base (a GGUF with changed bytes gave 22.3 against 10.8).
START_LOSS_FACTOR = 1.5


def check_start_loss(loss: float, uniform: float, model_path: str) -> bool:
  """Logs a warning when the loss of the starting weights (step 1's train loss, computed before
  its update) is far above `uniform` = log(vocab size), the loss of guessing every token equally;
  returns whether it warned. Corruption that no reader can see (quantized codes changed within
  range) shows here first."""
  if not loss > START_LOSS_FACTOR * uniform:  # (NaN is the non-finite check's)
    return False
  logging.warning(
      "step 1: the starting model's loss %.2f is far above a uniform guess over its vocabulary "
      "(log(vocab) = %.2f): its weights may be corrupted or not match the tokenizer (model.path=%r). "
      "Training goes on, but check the model file.", loss, uniform, model_path or "a preset")
  return True


def due(hooks: list[Hook], step: int, boundary: bool) -> list[Hook]:
  """The hooks whose period divides `step` (none at a boundary: the end handles it)."""
  return [h for h in hooks if h.run and h.every and step % h.every == 0 and not boundary]


def flush(hooks: list[Hook]) -> None:
  for h in hooks:
    if h.flush:
      h.flush()


def default(config, model, eval_step, eval_ds, encoder, saver, objective, trainable) -> list[Hook]:
  """The hooks of `jaxft.train`: evaluation (loss, and answer accuracy with
  train.eval_accuracy) when data.eval is set, checkpoints, metrics."""
  hooks = []
  if eval_ds is not None:
    evaluators = [loss_evaluator(eval_step, eval_ds.examples, config, model.mesh, objective)]
    refs = (evaluation.references(config.data.eval, config.data.format)
            if config.train.eval_accuracy else [])
    if refs:
      evaluators.append(accuracy_evaluator(model.cfg, model.method, encoder, refs))
    hooks.append(evaluation_hook(evaluators, config.train.eval_every))
  hooks.append(checkpoint_hook(saver, model, config.checkpoint.every))
  method = model.method
  flop_counter = flops.FlopCounter(  # tokens/s -> TFLOP/s and MFU; the count is in jaxft/flops.py
      model.cfg, method.trains_base, 0 if method.trains_base else peft.count_params(trainable),
      config.train.peak_tflops)
  # (None for a loss that does not start at a uniform guess's: a preference loss starts near
  # log 2 whatever the vocabulary)
  uniform = objective.uniform_loss(model.cfg.vocab_size)
  hooks.append(MetricsRecorder(config, flop_counter, uniform).hook())
  return hooks
