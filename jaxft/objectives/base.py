"""What an objective owns, as the trainer, evaluation and the planner call it.

An objective is a frozen (hashable) dataclass. Inside the jitted step it is three pure functions
of arrays (the loss):

- `counts(batch)`: the normalisers (target tokens, pairs) of the whole accumulated batch, known
  from the data before any forward pass;
- `sums(cfg, method, trainable, frozen, batch, rng)`: (terms, stats) of one micro-batch: loss
  terms and metric sums that add up over micro-batches;
- `loss(terms, counts)`: linear in the terms, so that summing the gradients of micro-batches
  normalised by the whole batch's counts equals the gradient of one large batch;

and `eval_loss` / `metrics` turn summed terms into the logged values. Around the step it owns
its data and batches (`load_data`, `stream`, `eval_batches`, `abstract_batch`), what it must
compute before the first step (`before_training`), and, for an objective whose batches come from
the policy being trained (rollouts, as GRPO's), the step from a data batch to a train batch
(`train_batch`), and what a run compiles besides the train step (`plan_phases`, which jaxft.plan
compiles and measures beside it). The trainer, evaluation and jaxft.plan call these and never ask
which objective they hold.
"""

from __future__ import annotations

import abc
import dataclasses
import math
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp

from jaxft.errors import ConfigError
from jaxft.models import llama
from jaxft.models.loss import token_losses
from jaxft.models.ops import pack_frozen
from jaxft.peft.base import merge_trees

# The fields of a batch of tokens (jaxft.data.pipeline.make_batch) and their dtypes.
TOKEN_FIELDS = {"inputs": jnp.int32, "targets": jnp.int32, "weights": jnp.float32,
                "positions": jnp.int32, "segment_ids": jnp.int32, "distill": jnp.float32}


@dataclasses.dataclass(frozen=True)
class PlanPhase:
  """Work a run does on the chips between train steps (GRPO's rollouts), as jaxft.plan compiles
  it: `programs` run one after the other, and the phase and the train step never run at once.

  programs: {name: a function returning the program lowered for the mesh (jax's Lowered)}; each
  takes the frozen and trainable trees as arguments, while the rest of the train state (the
  optimizer's) stays in memory beside them. figures: {name: bytes} computed from shapes, printed
  beside XLA's figures (a KV cache's size). describe: one line saying what the phase is."""
  name: str
  programs: dict[str, Callable[[], Any]]
  figures: dict[str, int]
  describe: str


class Objective(abc.ABC):
  """The base of every objective: the abstract methods are what one must define; the others have
  the defaults of an objective trained on fixed data with no work before training."""
  name: str = ""
  metric_names: tuple = ()  # the names `metrics` returns (TRL's where TRL logs them)

  # -- the loss, inside the jitted step --------------------------------------------------------

  @abc.abstractmethod
  def counts(self, batch) -> dict:
    """The normalisers of the whole accumulated batch (at least "tokens": its target tokens)."""

  @abc.abstractmethod
  def sums(self, cfg, method, trainable, frozen, batch, rng) -> tuple[dict, dict]:
    """(terms, stats) of one micro-batch under merge(frozen, trainable) run with `method`."""

  @abc.abstractmethod
  def loss(self, terms, counts):
    """The training loss from the terms summed over the micro-batches."""

  def eval_loss(self, terms, counts):
    """The loss evaluation reports (eval_loss); by default the training loss."""
    return self.loss(terms, counts)

  def metrics(self, terms, stats, counts) -> dict:
    """The objective's own logged metrics (train rows as named, eval rows with eval_)."""
    del terms, stats, counts
    return {}

  def perplexity(self, eval_loss: float) -> float | None:
    """The perplexity evaluation reports beside `eval_loss` (None: the loss is not a
    cross-entropy per token)."""
    del eval_loss
    return None

  def uniform_loss(self, vocab_size: int) -> float | None:
    """The loss of guessing every token equally (step 1 is checked against it for a corrupted
    base, hooks.check_start_loss); None when the loss does not start there."""
    del vocab_size
    return None

  # -- data and batches, on the host -----------------------------------------------------------

  @abc.abstractmethod
  def load_data(self, config, encoder, vocab_size: int) -> tuple[Any, Any]:
    """(train, eval or None) datasets of data.train / data.eval, read and checked (each with an
    `examples` list). Raises DataError naming the row, ConfigError naming the key."""

  @abc.abstractmethod
  def stream(self, config, train_ds):
    """The resumable train stream: `batch_at(pos, select) -> (host batch [rows, T], next pos)`
    with pos a jaxft.data.pipeline.Position (saved in every checkpoint)."""

  @abc.abstractmethod
  def eval_batches(self, examples, config) -> Iterator[dict]:
    """Every eval example once, in file order, as host batches [data.batch_size, data.max_len]."""

  @abc.abstractmethod
  def batch_fields(self) -> dict:
    """{field: dtype} of the train step's batch (each [accum, rows / accum, T])."""

  def abstract_batch(self, config) -> dict:
    """The train step's batch as ShapeDtypeStructs [accum, rows / accum, T] (what prepare and
    jaxft.plan compile the step with)."""
    accum, rows, T = config.optim.accum_steps, config.data.batch_size, config.data.max_len
    return {k: jax.ShapeDtypeStruct((accum, rows // accum, T), dtype)
            for k, dtype in self.batch_fields().items()}

  def plan_phases(self, config, cfg, method, frozen, trainable, mesh) -> list[PlanPhase]:
    """What a run compiles and runs on the chips besides the train step, for jaxft.plan to
    compile and measure: `frozen` and `trainable` are the step's trees as ShapeDtypeStructs with
    their shardings on `mesh`. None by default (an objective trained on fixed data)."""
    del config, cfg, method, frozen, trainable, mesh
    return []

  # -- work around the loop --------------------------------------------------------------------

  def before_training(self, run, model, datasets, config) -> None:
    """Runs once before the first step (and before a resume restores anything): `run` is the
    trainer's Prepared (frozen tree, train state as it starts), `model` the session.Model,
    `datasets` the loaded datasets. May annotate the datasets (a reference's log-probs)."""
    del run, model, datasets, config

  def preview(self, config, encoder, vocab_size: int, split: str = "train"):
    """What `python -m jaxft.data` shows of data.<split>: an object with `path`, `rows(n)` (the
    first n rows as this objective trains them, jaxft.data.show.Shown) and `counts()` (the whole
    file, jaxft.data.show.Counts): jaxft/data/show.py's Supervised and Pairs, jaxft/rl/prompts.py's
    Preview.
    Raises ConfigError when the objective's rows cannot be shown (the default)."""
    del encoder, vocab_size, split
    raise ConfigError(f"train.objective={config.train.objective!r}: python -m jaxft.data does "
                      "not show its rows")

  def train_batch(self, loop, model, batch: dict) -> dict:
    """The host batch the train step takes, made from the stream's `batch` (this process's rows)
    with the policy as it is now (`loop.state["trainable"]`, `loop.frozen`, `model`'s config,
    method and mesh). The identity for objectives trained on fixed data; an objective that learns
    from its own samples (GRPO) generates and scores completions of the batch's prompts here and
    returns the rows to train on, with what its metrics read (rewards, old log-probs) as fields."""
    del loop, model
    return batch


def token_logps(cfg, method, trainable, frozen, batch, rng):
  """Log-probability [R, T] (float32) of each target token under merge(frozen, trainable) run
  with `method`."""
  frozen = pack_frozen(frozen)
  params = merge_trees(frozen, trainable)
  h, _ = llama.hidden_states(cfg, params, batch["inputs"], adapter=method,
                             positions=batch["positions"], segment_ids=batch["segment_ids"], rng=rng)
  head = "embed" if cfg.tie_embeddings else "lm_head"
  return -token_losses(cfg, params, h, batch["targets"], head_trained=head in trainable)


def finite(x) -> bool:
  """Whether a config value is a finite int or float (not a bool, None or a string)."""
  return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
