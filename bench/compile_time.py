"""Compile time of the train step against depth: 2 layers vs 32 layers of the peft_compare model.

    python bench/compile_time.py                 # float32 and bfloat16, LoRA; about a minute
    python bench/compile_time.py --layers=2,8,32 --method=full

Each depth is built in a fresh subprocess (no compilation cache), through the trainer's own
`prepare` (the jitted, donated step), and times `train_step.lower(...).compile()`: tracing, XLA
optimisation and code generation of the first step. The decoder scans over stacked layers, so the
program does not grow with depth; the goal is 32 layers in at most 1.5x the time of 2.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def measure(layers: int, dtype: str, method: str) -> dict:
  import jax
  import peft_compare as pc
  config = pc.jaxft_config(dtype, [f"peft.method={method}"])
  cfg = pc.jaxft_model_config(config, layers=layers)
  run, batch = pc.build_jaxft(config, cfg)
  jax.block_until_ready((run.state, run.frozen, batch))  # random init runs asynchronously
  t0 = time.perf_counter()
  lowered = run.train_step.lower(run.state, batch, run.frozen)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  state, m = compiled(run.state, batch, run.frozen)
  jax.block_until_ready(m)
  t3 = time.perf_counter()
  return {"layers": layers, "trace_s": t1 - t0, "compile_s": t2 - t1, "first_step_s": t3 - t2,
          "loss": float(m["loss"])}


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--layers", default="2,32")
  ap.add_argument("--dtypes", default="float32,bfloat16")
  ap.add_argument("--method", default="lora", help="peft.method (lora, full, ...)")
  ap.add_argument("--repeats", type=int, default=3,
                  help="fresh processes per depth, alternating depths; the minimum is reported "
                       "(compile time on a shared machine is noisy)")
  ap.add_argument("--worker", default="", help=argparse.SUPPRESS)
  args = ap.parse_args(argv)
  if args.worker:
    layers, dtype = args.worker.split(":")
    print(json.dumps(measure(int(layers), dtype, args.method)), flush=True)
    return
  print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; "
        f"peft.method={args.method}", flush=True)
  depths = [int(x) for x in args.layers.split(",")]
  for dtype in args.dtypes.split(","):
    runs = {d: [] for d in depths}
    for _ in range(args.repeats):
      for layers in depths:
        out = subprocess.run([sys.executable, os.path.abspath(__file__),
                              f"--worker={layers}:{dtype}", f"--method={args.method}"],
                             capture_output=True, text=True,
                             env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"), check=True)
        runs[layers].append(json.loads(out.stdout.strip().splitlines()[-1]))
    rows = [min(runs[d], key=lambda r: r["trace_s"] + r["compile_s"]) for d in depths]
    base = rows[0]["trace_s"] + rows[0]["compile_s"]
    for r in rows:
      total = r["trace_s"] + r["compile_s"]
      print(f"  {dtype:8s} {r['layers']:3d} layers: trace {r['trace_s']:5.2f} s + compile "
            f"{r['compile_s']:5.2f} s = {total:5.2f} s ({total / base:.2f}x the "
            f"{rows[0]['layers']}-layer model; best of {args.repeats}); first step runs "
            f"{r['first_step_s']:.2f} s",
            flush=True)


if __name__ == "__main__":
  main()
