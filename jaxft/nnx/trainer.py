"""Training an NNX module's trainable partition with one jitted step, checkpointed with Orbax.

    trainer = Trainer(model, loss_fn, optax.adamw(1e-3), workdir="runs/a", checkpoint_every=50)
    for batch in batches[trainer.step_count:]:
      metrics = trainer.step(batch)
    tuned = jaxft.nnx.merge(trainer.model())

`nnx.split(model, trainable, ...)` is the partition (default: the `nnx.LoRAParam` leaves that
`jaxft.nnx.lora` adds). The step is one pure function jitted once, donated, with declared
shardings: `nnx.merge` of the graph, the trainable and the frozen state inside the loss, and
`jax.value_and_grad` over the trainable state only; only it has optimizer state. A checkpoint
holds the trainable leaves, the optimizer state and the step (not the frozen base: rebuild the
model the same way to resume), and is refused when the base or the trainable tree differs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from jaxft import checkpoint, optim, sharding
from jaxft.errors import CheckpointError, ConfigError
from jaxft.nnx import shard


def _optimizer(optimizer, steps):
  """(tx, schedule or None) from an optax transformation or a jaxft `optim` config group."""
  if isinstance(optimizer, optax.GradientTransformation):
    return optimizer, None
  if steps is None:
    raise ConfigError("an optim config needs steps= (its learning-rate schedule spans them)")
  return optim.make(optimizer, int(steps))


def _fingerprint(frozen) -> dict:
  """What identifies the frozen base: its numeric leaves' shapes and dtypes, and their sum."""
  leaves = [x for x in jax.tree.leaves(frozen) if jnp.issubdtype(x.dtype, jnp.number)]
  total = jax.jit(lambda xs: sum(jnp.sum(x.astype(jnp.float32)) for x in xs))(leaves)
  return {"shapes": [[list(x.shape), str(x.dtype)] for x in leaves], "sum": float(total)}


class Trainer:
  """Fine-tunes the `trainable` Variables of an NNX module (see the module docstring).

  loss_fn(model, batch) -> scalar loss, traced inside the step (the model is rebuilt from its
  states there; changes it makes to the module are dropped). optimizer: an optax transformation,
  or a jaxft `optim` config group (AdamW + schedule + clipping, jaxft.optim.make; needs steps).
  mesh: default all devices on one `fsdp` axis (a mesh of Auto axes: `jax.sharding.Mesh`; jax's
  `make_mesh` makes Explicit ones unless given axis_types). rules: (regex, PartitionSpec) pairs over Variable
  paths (jaxft.nnx.shard). workdir: checkpoints go to WORKDIR/checkpoints, and a workdir with
  checkpoints is resumed from its newest intact one. Raises ConfigError when nothing is trainable.
  """

  def __init__(self, model: nnx.Module, loss_fn, optimizer, *, steps: int | None = None,
               trainable=nnx.LoRAParam, mesh=None, rules=(), workdir: str | None = None,
               checkpoint_every: int = 0, keep: int = 2):
    self.graphdef, train, frozen = nnx.split(model, trainable, ...)
    if not jax.tree.leaves(train):
      raise ConfigError(f"the model has no {getattr(trainable, '__name__', trainable)} leaves to "
                        "train: call jaxft.nnx.lora(model, ...) first, or pass trainable=nnx.Param "
                        "for full fine-tuning")
    self.tx, self.schedule = _optimizer(optimizer, steps)
    self.mesh = mesh if mesh is not None else Mesh(np.asarray(jax.devices()), ("fsdp",))
    train_sh = shard.shardings(train, self.mesh, rules)
    self.frozen_shardings = shard.shardings(frozen, self.mesh, rules)
    self.frozen = jax.device_put(frozen, self.frozen_shardings)
    # A copy: the step donates its state, and the given module must stay usable.
    train = jax.device_put(train, train_sh, may_alias=False)
    opt_sh = sharding.optimizer_shardings(self.tx, train_sh, self.mesh)
    scalar = sharding.replicated(self.mesh)
    self._state_sh = {"trainable": train_sh, "opt": opt_sh, "step": scalar}
    self.state = {"trainable": train, "opt": jax.jit(self.tx.init, out_shardings=opt_sh)(train),
                  "step": jax.device_put(jnp.zeros((), jnp.int32), scalar)}
    self._step = jax.jit(self._make_step(loss_fn), donate_argnums=0,
                         out_shardings=(self._state_sh, scalar))
    self.workdir, self.every, self._saver = workdir, int(checkpoint_every), None
    if workdir is not None:
      self._meta = {"frozen": _fingerprint(self.frozen), "paths": self._paths()}
      self._saver = checkpoint.Saver(workdir, keep)
      if self._saver.latest_step() is not None:
        self._restore()

  def _make_step(self, loss_fn):
    graphdef, tx = self.graphdef, self.tx

    def train_step(state, frozen, batch):
      def loss_of(trainable):
        return loss_fn(nnx.merge(graphdef, trainable, frozen), batch)

      loss, grads = jax.value_and_grad(loss_of)(state["trainable"])
      updates, opt = tx.update(grads, state["opt"], state["trainable"])
      new = {"trainable": optax.apply_updates(state["trainable"], updates), "opt": opt,
             "step": state["step"] + 1}
      return new, {"loss": loss, "grad_norm": optax.global_norm(grads)}

    return train_step

  @property
  def step_count(self) -> int:
    """Steps taken so far (a resumed run starts at its checkpoint's step)."""
    return int(self.state["step"])

  def step(self, batch) -> dict:
    """One optimizer step on `batch` (rows first, split over the mesh's data/fsdp axes); returns
    {"loss", "grad_norm"(, "lr")} as floats of the step taken, and checkpoints every
    `checkpoint_every` steps when a workdir was given."""
    batch = jax.device_put(batch, shard.batch_shardings(batch, self.mesh))
    lr_step = self.step_count
    self.state, metrics = self._step(self.state, self.frozen, batch)
    out = {k: float(v) for k, v in metrics.items()}
    if self.schedule is not None:
      out["lr"] = float(self.schedule(lr_step))
    if self._saver is not None:
      self._saver.poll()
      if self.every and self.step_count % self.every == 0:
        self.save()
    return out

  def model(self) -> nnx.Module:
    """The module with the trained leaves (a new object; pass it to jaxft.nnx.merge)."""
    return nnx.merge(self.graphdef, self.state["trainable"], self.frozen)

  # -- checkpoints ------------------------------------------------------------------------------
  def _paths(self) -> list[str]:
    flat, _ = jax.tree_util.tree_flatten_with_path(self.state)
    return [jax.tree_util.keystr(p) for p, _ in flat]

  def _flat(self) -> dict:
    return {f"{i:05d}": x for i, x in enumerate(jax.tree.leaves(self.state))}

  def save(self) -> None:
    """Starts an (asynchronous) checkpoint of the current step; `close` waits for it."""
    if self._saver is None:
      raise ConfigError("Trainer.save needs a workdir")
    self._saver.save(self.step_count, self._flat(), dict(self._meta, step=self.step_count))

  def _check(self, meta: dict) -> None:
    where = f"{self.workdir}: checkpoint of step {meta.get('step')}"
    if meta.get("paths") != self._meta["paths"]:
      raise CheckpointError(f"{where} holds a different trainable tree (other targets, rank or "
                            "optimizer); use a new workdir or rebuild the model as it was")
    old, new = meta.get("frozen", {}), self._meta["frozen"]
    if old.get("shapes") != new["shapes"] or abs(old.get("sum", 0.0) - new["sum"]) > 1e-6 * max(
        1.0, abs(new["sum"])):
      raise CheckpointError(f"{where} was trained on another frozen base (shapes or values "
                            "differ); rebuild the model from the same weights or seed")

  def _restore(self) -> None:
    abstract = checkpoint.abstract(self._flat())
    _, flat, _ = checkpoint.restore_latest_good(self._saver.mngr, abstract, self._check)
    treedef = jax.tree.structure(self.state)
    self.state = jax.tree.unflatten(treedef, [flat[k] for k in sorted(flat)])

  def close(self) -> None:
    """Waits for a pending checkpoint and closes the checkpoint manager."""
    if self._saver is not None:
      self._saver.close()
