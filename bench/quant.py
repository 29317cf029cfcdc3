"""Quantized frozen bases: storage, dequantization error, and the step time of QLoRA and int8-LoRA
against float LoRA on the same model.

    python bench/quant.py                      # about 3-5 minutes on 2 busy CPU cores
    python bench/quant.py --rounds=5 --steps=5 --hidden=2048 --inter=5632

1. Bits per parameter of a 4096 x 4096 kernel, from the bytes of the arrays the quantized node
   holds (codes, scales, scales of scales), for NF4 with and without double quantization and int8.
2. Dequantization error on that kernel, drawn normal (std 0.02) and Student-t (2 dof, heavy tails):
   relative RMSE ||W - deq(W)|| / ||W|| and the largest absolute error over max |W|.
3. Step time (forward, backward, AdamW on the LoRA leaves; the product path `trainer.prepare`) of
   LoRA rank 16 on all linear layers of one random Llama, with the base stored float32, NF4 and
   int8. Rounds interleave the three so that load from other jobs hits each alike; medians.
   Dequantization happens inside the jitted step (XLA fuses it into the layer's computation).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run from a checkout: bench/ sits beside jaxft/

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jaxft import quant  # noqa: E402

KINDS = ("none", "nf4", "int8")
VARIANTS = {"nf4 (double quant)": dict(kind="nf4"), "nf4 (float32 scales)":
            dict(kind="nf4", double_quant=False), "int8 (per column)": dict(kind="int8")}


def storage_and_error() -> list[tuple]:
  rows = []
  key = jax.random.key(0)
  kernels = {"normal": 0.02 * jax.random.normal(key, (4096, 4096), jnp.float32),
             "student-t": 0.02 * jax.random.t(key, 2.0, (4096, 4096), jnp.float32)}
  for name, kw in VARIANTS.items():
    kw = dict(kw)
    kind = kw.pop("kind")
    errs = []
    for w in kernels.values():
      q = jax.jit(lambda x: quant.quantize(x, kind, **kw))(w)
      d = q.dequantize(jnp.float32)
      rel = float(jnp.linalg.norm(d - w) / jnp.linalg.norm(w))
      mx = float(jnp.max(jnp.abs(d - w)) / jnp.max(jnp.abs(w)))
      errs += [rel, mx]
    bits = 8 * sum(x.nbytes for x in jax.tree.leaves(q)) / q.size
    rows.append((name, bits, *errs))
  return rows


def make_config(kind: str, args):
  from jaxft import configlib
  from jaxft.models import config as mc
  mc.PRESETS["bench-quant"] = mc.ModelConfig(
      vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.inter,
      num_layers=args.layers, num_heads=args.hidden // 64, num_kv_heads=max(args.hidden // 256, 1),
      head_dim=64)
  c = configlib.sibling(os.path.join(ROOT, "configs", "x.py"), "base").get_config()
  c.model.preset = "bench-quant"
  c.model.quant = kind
  c.model.dtype = args.dtype
  c.peft.targets = "all-linear"
  c.peft.lora.rank = 16
  c.data.batch_size = args.batch
  c.data.max_len = args.seq
  c.train.progress = False
  return c


def step_times(args) -> dict[str, list[float]]:
  from jaxft import session, trainer
  rng = np.random.default_rng(0)
  ids = rng.integers(0, args.vocab, (args.batch, args.seq + 1)).astype(np.int32)
  host = {"inputs": ids[:, :-1], "targets": ids[:, 1:],
          "weights": np.ones((args.batch, args.seq), np.float32),
          "positions": np.broadcast_to(np.arange(args.seq, dtype=np.int32), (args.batch, args.seq)),
          "segment_ids": np.ones((args.batch, args.seq), np.int32)}
  runs = {}
  for kind in KINDS:
    config = make_config(kind, args)
    model = session.load_model(config)
    prep = trainer.prepare(config, model)
    batch = trainer.put_batch(host, model.mesh, 1)
    state, m = prep.train_step(prep.state, batch, prep.frozen)  # compile
    jax.block_until_ready(m)
    frozen_mb = sum(x.nbytes for x in jax.tree.leaves(prep.frozen)) / 2**20
    runs[kind] = {"prep": prep, "state": state, "batch": batch, "times": [], "frozen_mb": frozen_mb}
  for _ in range(args.rounds):
    for kind in KINDS:
      r = runs[kind]
      for _ in range(args.steps):
        t = time.perf_counter()
        r["state"], m = r["prep"].train_step(r["state"], r["batch"], r["prep"].frozen)
        jax.block_until_ready(m)
        r["times"].append(time.perf_counter() - t)
  return runs


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--hidden", type=int, default=1024)
  p.add_argument("--inter", type=int, default=2816)
  p.add_argument("--layers", type=int, default=4)
  p.add_argument("--vocab", type=int, default=8192)
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--seq", type=int, default=256)
  p.add_argument("--dtype", default="float32", help="compute dtype (model.dtype)")
  p.add_argument("--steps", type=int, default=3, help="timed steps per round and variant")
  p.add_argument("--rounds", type=int, default=3)
  args = p.parse_args()

  print(f"devices: {jax.devices()}")
  print("\n4096 x 4096 kernel: bits/param from stored bytes, dequantization error")
  print(f"{'format':<22} {'bits':>6} {'normal rRMSE':>13} {'normal max':>11} "
        f"{'t(2) rRMSE':>11} {'t(2) max':>9}")
  print(f"{'float32':<22} {32.0:>6.3f} {0:>13.4f} {0:>11.4f} {0:>11.4f} {0:>9.4f}")
  for name, bits, nr, nm, tr, tm in storage_and_error():
    print(f"{name:<22} {bits:>6.3f} {nr:>13.4f} {nm:>11.4f} {tr:>11.4f} {tm:>9.4f}")

  runs = step_times(args)
  print(f"\nLoRA r=16 all-linear step, hidden {args.hidden}, inter {args.inter}, {args.layers} "
        f"layers, vocab {args.vocab}, batch {args.batch} x {args.seq}, compute {args.dtype}")
  print(f"{'base':<8} {'frozen MiB':>11} {'step ms (median)':>17} {'vs float':>9}")
  ref = statistics.median(runs["none"]["times"])
  for kind in KINDS:
    med = statistics.median(runs[kind]["times"])
    name = "float32" if kind == "none" else kind
    print(f"{name:<8} {runs[kind]['frozen_mb']:>11.1f} {1000 * med:>17.1f} {med / ref:>8.2f}x")


if __name__ == "__main__":
  main()
