"""Fine-tuning methods side by side on the quickstart task.

  python bench/methods.py [--methods=full,lora,dora,adapter,prefix,qlora] [--steps=150]

Each method trains `configs/quickstart.py:method=NAME` (its own learning rate, the same data,
model and steps) in a fresh subprocess, which reports:
  trainable   trainable parameters (the partition's count)
  peak RSS    the subprocess's peak resident memory (ru_maxrss): runtime, data, params, optimizer
              state and activations together; on CPU the device memory is host memory
  step        median wall time of one jitted train step after compilation (blocked on its result)
  eval loss   eval loss on the bundled eval set at step 0 and after the last step
and prints one Markdown table (docs/methods.md holds a copy).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = ("full", "lora", "dora", "adapter", "prefix", "qlora")


def _one(method: str, steps: int, workdir: str) -> dict:
  """Trains one method in this process; returns its figures."""
  sys.path.insert(0, ROOT)
  import jax
  import numpy as np
  from jaxft import configlib, peft, session, trainer
  from jaxft.models import llama

  config = configlib.sibling(os.path.join(ROOT, "configs", "quickstart.py"),
                             "quickstart").get_config(f"method={method}")
  if steps:
    config.train.steps = steps
  config.train.progress = False
  config.train.eval_every = 0  # step 0 and the last step only
  cfg = session.model_config(config)
  m = peft.from_config(config.peft, cfg)
  shapes = lambda: (llama.init_params(cfg, jax.random.key(0)), m.init(cfg, jax.random.key(1)))
  trainable, _ = m.split(*jax.eval_shape(shapes))

  times = []
  jit_step = trainer.jit_train_step

  def timed_jit(*args, **kw):  # times each step to completion (the loop's overlap is lost)
    fn = jit_step(*args, **kw)

    def step(*a):
      t = time.perf_counter()
      out = jax.block_until_ready(fn(*a))
      times.append(time.perf_counter() - t)
      return out
    return step

  trainer.jit_train_step = timed_jit
  t0 = time.time()
  last = trainer.train(config, workdir)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    evals = [r["eval_loss"] for r in map(json.loads, f) if "eval_loss" in r]
  return {"method": method, "lr": config.optim.lr, "steps": config.train.steps,
          "quant": config.model.quant, "trainable": peft.count_params(trainable),
          "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
          "step_ms": 1000 * float(np.median(times[1:])), "first_step_s": times[0],
          "eval_loss_0": evals[0], "eval_loss": last["eval_loss"], "wall_s": time.time() - t0}


def table(rows: list[dict]) -> str:
  """The Markdown table of the figures."""
  out = ["| method | trainable params | peak RSS (MB) | step (ms) | eval loss (step 0 -> last) "
         "| lr |",
         "|---|---:|---:|---:|---|---:|"]
  for r in rows:
    name = r["method"] + (f" ({r['quant']} base)" if r["quant"] != "none" else "")
    out.append(f"| {name} | {r['trainable']:,} | {r['peak_rss_mb']:.0f} | {r['step_ms']:.0f} | "
               f"{r['eval_loss_0']:.2f} -> {r['eval_loss']:.3g} | {r['lr']:g} |")
  return "\n".join(out)


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--methods", default=",".join(METHODS))
  ap.add_argument("--steps", type=int, default=0, help="train.steps (0 = the quickstart's)")
  ap.add_argument("--json", default="", help="also write the figures here")
  ap.add_argument("--one", default="", help=argparse.SUPPRESS)  # internal: the subprocess
  ap.add_argument("--workdir", default="", help=argparse.SUPPRESS)
  args = ap.parse_args()
  if args.one:
    print("RESULT " + json.dumps(_one(args.one, args.steps, args.workdir)), flush=True)
    return
  rows, failed = [], []
  for method in filter(None, args.methods.split(",")):
    with tempfile.TemporaryDirectory(prefix=f"bench-{method}-") as wd:
      r = subprocess.run([sys.executable, os.path.abspath(__file__), f"--one={method}",
                          f"--steps={args.steps}", f"--workdir={wd}"], cwd=ROOT,
                         capture_output=True, text=True)
    lines = [l for l in r.stdout.splitlines() if l.startswith("RESULT ")]
    if r.returncode or not lines:  # report it, and go on with the other methods
      print(f"{method}: failed (exit {r.returncode})\n{r.stderr[-3000:]}", file=sys.stderr)
      failed.append(method)
      continue
    rows.append(json.loads(lines[-1][len("RESULT "):]))
    print(f"{method}: done in {rows[-1]['wall_s']:.0f} s: {lines[-1]}", file=sys.stderr, flush=True)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(rows, f, indent=2)
  print(table(rows))
  if failed:
    sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
  main()
