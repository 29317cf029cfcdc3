"""Fine-tune your own Flax NNX model with jaxft: QLoRA on a small byte-level transformer.

  python examples/nnx_lora.py --steps=100 --quant=nf4 --workdir=runs/nnx_lora

The model below stands for yours: any `nnx.Module` whose projections are `nnx.Linear`. jaxft
swaps the targeted linears for LoRA (or DoRA) layers over a frozen, optionally NF4, base
(`jaxft.nnx.lora`), trains only the adapters with one jitted step (`jaxft.nnx.Trainer`),
checkpoints to --workdir (run the same command again to resume), and merges the adapters back
into a module of your classes (`jaxft.nnx.merge`). See docs/own_model.md.
"""

from __future__ import annotations

import argparse
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import jaxft.nnx

ROWS = ["The capital of France is Paris.", "The capital of Japan is Tokyo.",
        "The capital of Italy is Rome.", "The capital of Egypt is Cairo.",
        "The capital of Peru is Lima.", "The capital of Kenya is Nairobi.",
        "The capital of Chile is Santiago.", "The capital of Spain is Madrid."]


class Block(nnx.Module):
  """Pre-norm causal self-attention and a GELU MLP, every projection an nnx.Linear."""

  def __init__(self, dim: int, heads: int, rngs: nnx.Rngs):
    self.heads = heads
    self.norm1, self.norm2 = nnx.RMSNorm(dim, rngs=rngs), nnx.RMSNorm(dim, rngs=rngs)
    self.q, self.k, self.v, self.o = (nnx.Linear(dim, dim, use_bias=False, rngs=rngs)
                                      for _ in range(4))
    self.up, self.down = nnx.Linear(dim, 4 * dim, rngs=rngs), nnx.Linear(4 * dim, dim, rngs=rngs)

  def __call__(self, x):
    b, t, d = x.shape
    h = self.norm1(x)
    q, k, v = (f(h).reshape(b, t, self.heads, d // self.heads) for f in (self.q, self.k, self.v))
    att = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d // self.heads)
    att = jnp.where(jnp.tril(jnp.ones((t, t), bool)), att, -1e9)
    x = x + self.o(jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(att), v).reshape(b, t, d))
    return x + self.down(jax.nn.gelu(self.up(self.norm2(x))))


class ByteLM(nnx.Module):
  """A byte-level decoder: 256-symbol embedding, blocks, tied-free output head."""

  def __init__(self, dim: int, layers: int, heads: int, rngs: nnx.Rngs):
    self.embed = nnx.Embed(256, dim, rngs=rngs)
    self.blocks = nnx.List([Block(dim, heads, rngs) for _ in range(layers)])
    self.norm = nnx.RMSNorm(dim, rngs=rngs)
    self.head = nnx.Linear(dim, 256, use_bias=False, rngs=rngs)

  def __call__(self, tokens):
    x = self.embed(tokens)
    for block in self.blocks:
      x = block(x)
    return self.head(self.norm(x))


def batch_of(rows: list[str]) -> dict:
  """Byte ids padded to the longest row, with a mask of the real next-token targets."""
  ids = [list(r.encode()) for r in rows]
  n = max(map(len, ids))
  tokens = np.zeros((len(ids), n), np.int32)
  mask = np.zeros((len(ids), n - 1), np.float32)
  for i, row in enumerate(ids):
    tokens[i, :len(row)] = row
    mask[i, :len(row) - 1] = 1.0
  return {"tokens": tokens, "mask": mask}


def loss_fn(model, batch):
  """Mean next-byte cross-entropy over the target positions."""
  logits = model(batch["tokens"][:, :-1])
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["tokens"][:, 1:])
  return jnp.sum(ce * batch["mask"]) / jnp.sum(batch["mask"])


def main(argv=None) -> dict:
  """Runs the example; returns {"losses": [...], "merged": the merged ByteLM}."""
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--steps", type=int, default=100)
  ap.add_argument("--quant", default="nf4", choices=["none", "nf4", "int8"])
  ap.add_argument("--method", default="lora", choices=["lora", "dora"])
  ap.add_argument("--targets", default="q,v,up,down")
  ap.add_argument("--rank", type=int, default=8)
  ap.add_argument("--lr", type=float, default=3e-3)
  ap.add_argument("--dim", type=int, default=64)
  ap.add_argument("--layers", type=int, default=2)
  ap.add_argument("--workdir", default=None)
  ap.add_argument("--checkpoint_every", type=int, default=50)
  args = ap.parse_args(argv)

  base = ByteLM(args.dim, args.layers, heads=4, rngs=nnx.Rngs(0))  # your (pre-trained) model
  model = jaxft.nnx.lora(base, args.targets, rank=args.rank, alpha=2.0 * args.rank,
                         method=args.method, quant_kind=args.quant, seed=0)
  trainer = jaxft.nnx.Trainer(model, loss_fn, optax.adamw(args.lr), workdir=args.workdir,
                              checkpoint_every=args.checkpoint_every)
  batch = batch_of(ROWS)
  losses = []
  for step in range(trainer.step_count, args.steps):
    losses.append(trainer.step(batch)["loss"])
    if step % 10 == 0 or step == args.steps - 1:
      print(f"step {step + 1}: loss {losses[-1]:.4f}")
  if args.workdir is not None:
    if trainer.step_count % max(args.checkpoint_every, 1):
      trainer.save()
    trainer.close()
  merged = jaxft.nnx.merge(trainer.model())  # a ByteLM with plain nnx.Linear kernels
  print(f"merged {type(merged).__name__}: loss {float(nnx.jit(loss_fn)(merged, batch)):.4f}")
  return {"losses": losses, "merged": merged}


if __name__ == "__main__":
  main()
