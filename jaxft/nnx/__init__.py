"""Bring your own Flax NNX model: LoRA / DoRA / QLoRA on its `nnx.Linear` layers, sharded,
trained by one jitted step, checkpointed, and merged back. See docs/own_model.md.

    model = jaxft.nnx.lora(MyModel(rngs=nnx.Rngs(0)), targets="q,v", rank=8, quant_kind="nf4")
    trainer = jaxft.nnx.Trainer(model, loss_fn, optax.adamw(1e-3), workdir="runs/a")
    for batch in batches[trainer.step_count:]:
      trainer.step(batch)
    tuned = jaxft.nnx.merge(trainer.model())   # the user's classes, plain nnx.Linear kernels

A Linen module's params dict: `jaxft.nnx.LinenLoRA(module, params, targets, ...)` is an NNX
module the same Trainer trains; `.merged_params()` gives the params dict back.
"""

from jaxft.nnx.layers import AdaptedLinear, lora, merge
from jaxft.nnx.linen import LinenLoRA
from jaxft.nnx.shard import infer_spec, partition_spec, shardings
from jaxft.nnx.targets import linears, match
from jaxft.nnx.trainer import Trainer

__all__ = ["lora", "merge", "AdaptedLinear", "LinenLoRA", "Trainer", "shardings", "partition_spec",
           "infer_spec", "linears", "match"]
