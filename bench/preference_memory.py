"""Peak memory of a DPO step against the SFT step on the same pairs' tokens, per method.

  python bench/preference_memory.py [--layers=8] [--hidden=512] [--rows=8] [--len=512]

The train step of each objective (jaxft.step.make_steps, as the trainer jits it: state donated)
is compiled for abstract arrays, and XLA's memory analysis of the compiled step gives its peak:
arguments + outputs - donated aliases + temporaries. Both steps read the same batch (rows of
packed pairs: a pair's chosen and rejected sequence side by side); the DPO step also runs the
reference (the frozen base with the method switched off, or for full fine-tuning the stored
reference log-probs). With a PEFT method the reference is the same frozen tree: no second copy of
the base, so the ratio stays near 1 (the check: at most 1.2). Prints one Markdown table.
"""

from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402

from jaxft import objectives, optim, peft  # noqa: E402
from jaxft.models import llama  # noqa: E402
from jaxft.models.config import ModelConfig  # noqa: E402
from jaxft.step import make_steps  # noqa: E402

METHODS = ("lora", "dora", "adapter", "prefix", "full")


def _peft_cfg(name):
  return ml_collections.ConfigDict({
      "method": name, "targets": "all-linear", "init_from": "",
      "lora": {"rank": 16, "alpha": 32.0, "dropout": 0.0, "rslora": False},
      "adapter": {"size": 64, "placement": "houlsby", "activation": "relu"},
      "prefix": {"length": 16, "mlp_hidden": 0}})


def _optim_cfg():
  return ml_collections.ConfigDict(dict(lr=1e-4, schedule="constant", warmup_steps=0,
                                        min_lr_ratio=0.1, weight_decay=0.0, b1=0.9, b2=0.999,
                                        eps=1e-8, clip_norm=1.0, accum_steps=1))


def peak_bytes(cfg, method, objective, rows, length) -> int:
  """XLA's peak of one compiled, donated train step of `objective` on a [1, rows, length] batch."""
  base = jax.eval_shape(lambda: llama.init_params(cfg, jax.random.key(0)))
  added = jax.eval_shape(lambda: method.init(cfg, jax.random.key(1)))
  trainable, frozen = method.split(base, added)
  tx, schedule = optim.make(_optim_cfg(), 100)
  state = {"step": jax.ShapeDtypeStruct((), jnp.int32), "trainable": trainable,
           "opt_state": jax.eval_shape(tx.init, trainable),
           "rng": jax.eval_shape(lambda: jax.random.key(0)),
           "skipped": jax.ShapeDtypeStruct((), jnp.int32)}
  shape = (1, rows, length)
  batch = {k: jax.ShapeDtypeStruct(shape, jnp.int32)
           for k in ("inputs", "targets", "positions", "segment_ids")}
  batch["weights"] = jax.ShapeDtypeStruct(shape, jnp.float32)
  if objective.name != "sft":
    batch["ref_logps"] = jax.ShapeDtypeStruct(shape, jnp.float32)
  steps = make_steps(cfg, method, tx, schedule, skip_nonfinite=False, dropout=False,
                     objective=objective)
  compiled = jax.jit(steps.train, donate_argnums=0).lower(state, batch, frozen).compile()
  m = compiled.memory_analysis()
  return (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
          + m.temp_size_in_bytes)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--layers", type=int, default=8)
  ap.add_argument("--hidden", type=int, default=512)
  ap.add_argument("--rows", type=int, default=8)
  ap.add_argument("--len", type=int, default=512)
  ap.add_argument("--methods", default=",".join(METHODS))
  a = ap.parse_args()
  cfg = ModelConfig(vocab_size=32000, hidden_size=a.hidden, intermediate_size=a.hidden * 3,
                    num_layers=a.layers, num_heads=a.hidden // 64, num_kv_heads=a.hidden // 128,
                    head_dim=64, max_position_embeddings=4096)
  n = sum(x.size for x in jax.tree.leaves(jax.eval_shape(
      lambda: llama.init_params(cfg, jax.random.key(0)))))
  print(f"model: {a.layers} layers, hidden {a.hidden}, vocab 32000: {n / 1e6:.1f}M params "
        f"({4 * n / 2**20:.0f} MiB float32); batch {a.rows} rows x {a.len} tokens on "
        f"{jax.devices()[0].platform}\n")
  print("| method | SFT step peak (MiB) | DPO step peak (MiB) | DPO / SFT | DPO reference |")
  print("|---|---|---|---|---|")
  for name in a.methods.split(","):
    method = peft.from_config(_peft_cfg(name), cfg)
    reference = "data" if method.trains_base else "base"
    sft = peak_bytes(cfg, method, objectives.SFT(), a.rows, a.len)
    dpo = peak_bytes(cfg, method, objectives.Preference(name="dpo", reference=reference),
                     a.rows, a.len)
    ref = "stored log-probs" if reference == "data" else "frozen base, method off"
    print(f"| {name} | {sft / 2**20:.1f} | {dpo / 2**20:.1f} | {dpo / sft:.3f} | {ref} |",
          flush=True)


if __name__ == "__main__":
  main()
