"""LoRA, QLoRA and full fine-tuning of a Llama-3-8B-shaped model on one accelerator: tokens/s, MFU.

    python bench/gpu.py                          # one H200 (or any GPU/TPU): about 5-8 minutes
    python bench/gpu.py --methods=qlora --batch=4 --seq=4096
    python bench/gpu.py --tiny                   # smoke check on CPU: the tiny preset, 2 steps

Random weights (the `llama3-8b` preset of jaxft/models/config.py; no download), bf16 compute, random
token ids, unpacked rows of --seq tokens. Each method runs in its own subprocess (so one method's
memory is freed before the next) through the trainer's own path: configs/base.py keys,
`session.load_model` (random base made one kernel at a time, NF4-quantized as it is made for
QLoRA), `trainer.prepare` (the jitted step with a donated state).

  lora   base bf16, LoRA r=16 on all linear layers (float32 A/B and AdamW moments)
  qlora  base NF4 (double-quantized scales), the same LoRA
  full   every weight trains, stored in bf16 (AdamW moments in bf16 too: float32 master weights
         and moments for 8B parameters need 128 GB before activations)

Steps are dispatched back to back and synchronised once at the end, as the trainer does. MFU is
model FLOPs (jaxft/flops.py: 6N per token for full fine-tuning, 4N + 6N_lora with a frozen base,
plus causal attention; rematerialisation not counted) over the device's dense bf16 peak
(flops.PEAK_TFLOPS: 989 TFLOP/s for an H200). Prints one line per method, then a summary.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

METHODS = {"lora": ("lora", "none"), "qlora": ("lora", "nf4"), "full": ("full", "none")}


def build_config(args, method: str):
  from jaxft import configlib
  c = configlib.base_config()
  c.model.preset = args.preset
  c.model.dtype = "bfloat16"
  c.model.param_dtype = "bfloat16"
  c.model.remat = args.remat
  c.model.attention = args.attention
  c.peft.method, c.model.quant = METHODS[method]
  c.peft.targets = args.targets
  c.peft.lora.rank, c.peft.lora.alpha = args.rank, 2.0 * args.rank
  c.data.batch_size, c.data.max_len = args.batch, args.seq
  c.optim.warmup_steps = 0
  c.train.steps = args.steps + args.warmup
  return c


def run_method(args, method: str) -> dict:
  import jax
  import numpy as np
  from jaxft import flops, peft, session, trainer

  config = build_config(args, method)
  t0 = time.perf_counter()
  model = session.load_model(config)
  run = trainer.prepare(config, model)
  jax.block_until_ready((run.state, run.frozen))
  setup_s = time.perf_counter() - t0
  cfg = model.cfg
  rows, T = args.batch, args.seq
  rng = np.random.default_rng(0)
  ids = rng.integers(0, cfg.vocab_size, (rows, T + 1)).astype(np.int32)
  batch = trainer.put_batch({
      "inputs": ids[:, :-1], "targets": ids[:, 1:], "weights": np.ones((rows, T), np.float32),
      "positions": np.broadcast_to(np.arange(T, dtype=np.int32), (rows, T)).copy(),
      "segment_ids": np.ones((rows, T), np.int32)}, model.mesh, 1)

  state = run.state
  t0 = time.perf_counter()
  for _ in range(args.warmup):  # the first compiles
    state, m = run.train_step(state, batch, run.frozen)
  loss0 = float(m["loss"])
  warm_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  for _ in range(args.steps):
    state, m = run.train_step(state, batch, run.frozen)
  loss = float(m["loss"])  # waits for the last step
  dt = (time.perf_counter() - t0) / args.steps

  n_added = 0 if model.method.trains_base else peft.count_params(state["trainable"])
  per_token = flops.train_flops_per_token(cfg, model.method.trains_base, n_added,
                                          mean_keys=(T + 1) / 2)
  tokens_per_s = rows * T / dt
  devices = jax.devices()
  peak = flops.peak_flops(devices[0].device_kind)
  out = {"method": method, "device": devices[0].device_kind, "step_s": dt,
         "tokens_per_s": tokens_per_s, "tflops_per_s": tokens_per_s * per_token / 1e12,
         "mfu": tokens_per_s * per_token / peak if peak else None, "setup_s": setup_s,
         "warmup_s": warm_s, "loss_first": loss0, "loss_last": loss,
         "trainable_params": peft.count_params(state["trainable"]),
         "attention": __import__("jaxft.models.llama", fromlist=["x"]).attention_impl(cfg),
         "host_peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
  stats = devices[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    out["device_peak_gb"] = stats["peak_bytes_in_use"] / 2**30
  return out


def line(r: dict) -> str:
  if "error" in r:
    return f"{r['method']:6s} FAILED: {r['error']}"
  mfu = f"MFU {100 * r['mfu']:5.1f}%" if r.get("mfu") is not None else "MFU n/a (peak unknown)"
  mem = f", device peak {r['device_peak_gb']:.1f} GB" if "device_peak_gb" in r else ""
  return (f"{r['method']:6s} {r['step_s']:7.3f} s/step  {r['tokens_per_s']:9.0f} tokens/s  "
          f"{r['tflops_per_s']:7.1f} TFLOP/s  {mfu}  (attention {r['attention']}, loss "
          f"{r['loss_first']:.3f} -> {r['loss_last']:.3f}, trainable {r['trainable_params']:,}"
          f"{mem})")


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--methods", default="lora,qlora,full")
  ap.add_argument("--preset", default="llama3-8b")
  ap.add_argument("--batch", type=int, default=4, help="rows per step")
  ap.add_argument("--seq", type=int, default=2048, help="tokens per row")
  ap.add_argument("--steps", type=int, default=10, help="timed steps (after --warmup)")
  ap.add_argument("--warmup", type=int, default=2)
  ap.add_argument("--remat", default="full", help="model.remat (8B activations need it)")
  ap.add_argument("--attention", default="auto", help="model.attention")
  ap.add_argument("--targets", default="all-linear", help="peft.targets for lora/qlora")
  ap.add_argument("--rank", type=int, default=16)
  ap.add_argument("--tiny", action="store_true",
                  help="CPU smoke check: preset tiny, batch 2 x 64, 2 steps")
  ap.add_argument("--json", default="", help="also write the results here")
  ap.add_argument("--worker", default="", help=argparse.SUPPRESS)
  args = ap.parse_args(argv)
  if args.tiny:
    args.preset, args.batch, args.seq, args.steps, args.warmup = "tiny", 2, 64, 2, 1
  if args.worker:
    print("RESULT " + json.dumps(run_method(args, args.worker)), flush=True)
    return

  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
  env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")  # full fine-tuning of 8B needs most
  print(f"preset {args.preset}, batch {args.batch} x {args.seq} tokens, bf16, remat "
        f"{args.remat}, {args.steps} timed steps", flush=True)
  results = []
  for method in args.methods.split(","):
    cmd = [sys.executable, os.path.abspath(__file__), f"--worker={method}"] + [
        a for a in (argv if argv is not None else sys.argv[1:]) if not a.startswith("--worker")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    found = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode == 0 and found:
      r = json.loads(found[-1][len("RESULT "):])
    else:
      tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
      r = {"method": method, "error": f"exit {proc.returncode}: " + " | ".join(tail)}
    results.append(r)
    print(line(r), flush=True)
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump(results, f, indent=1)


if __name__ == "__main__":
  main()
