"""A LoRA training step in jaxft and in HF transformers + PEFT (PyTorch, CPU), same model and batch.

    python bench/peft_compare.py              # float32 and bfloat16: about 6-9 minutes on 2 cores
    python bench/peft_compare.py --dtypes=bfloat16 --rounds=3 --set model.remat=full

The model is a random Llama (hidden 512, intermediate 1376, 8 layers, 8 heads, vocab 32000), the
batch 4 x 256 random token ids, LoRA rank 8 (alpha 16) on q_proj and v_proj, AdamW on the LoRA
parameters only with global-norm clipping at 1.0 on both sides. A step is forward, backward and the
optimizer update.

Each side runs in its own subprocess (so each peak RSS is its own), and so does a probe that times
XLA dots at the step's own shapes (float32 accumulation, as the model asks): the matmul rate the
step is compared with. PEFT runs twice: with PyTorch's default threads (peft) and with one thread
(peft1; on a machine shared with other jobs PyTorch's threads wait on each other at every op, and
one thread can be faster), and once more with huge-page malloc (peft_hp): jaxft's commands re-execute
themselves with GLIBC_TUNABLES=glibc.malloc.hugetlb=1 where the machine offers it (jaxft.cli), and
the jaxft side and the probe here run so too, so peft_hp gives PEFT the same machine setting. The parent interleaves them: a round runs `--steps` steps of jaxft, of
each PEFT, then the probe; medians are taken over all rounds, so load from other jobs on the machine
hits every side alike. The ratio is given against default PEFT and against the faster PEFT.

jaxft runs its product path: the config schema of configs/base.py, `trainer.prepare` (make_steps +
jaxft.optim, jitted once with a donated state, as the trainer does). In bfloat16 both sides store
the frozen base in bfloat16 and keep the LoRA parameters (and AdamW moments) in float32 (PEFT's
autocast_adapter_dtype; jaxft's LoRA weights are always float32 master weights).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run from a checkout: bench/ sits beside jaxft/

SHAPE = dict(vocab=32000, hidden=512, inter=1376, layers=8, heads=8, batch=4, seq=256, rank=8)


def _peak_rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: kilobytes


def step_flops(s=SHAPE) -> dict:
  """Matmul FLOPs one LoRA step executes (a multiply-add = 2), by part.

  Frozen base: forward x W and, in the backward, the input gradient dy W^T (no weight gradient).
  LoRA: forward two thin products, backward their input and weight gradients. Attention: Q K^T and
  P V over all T x T pairs (both implementations compute the full square, then mask), forward and
  backward (2 products each way per forward one). Logits: forward and input gradient.
  """
  tok = s["batch"] * s["seq"]
  D, F, L, V, r = s["hidden"], s["inter"], s["layers"], s["vocab"], s["rank"]
  linear = L * (4 * D * D + 3 * D * F)
  base = 2 * 2 * tok * linear                   # forward + input gradient
  lora = L * 2 * (2 * tok * (D * r + r * D)) * 3  # q and v: forward, input and weight gradients
  attn = L * 2 * (2 * tok * s["seq"] * D) * 3   # QK^T and PV, forward + 2x backward
  logits = 2 * 2 * tok * D * V                  # forward + input gradient
  return {"base_linears": base, "lora": lora, "attention": attn, "logits": logits,
          "total": base + lora + attn + logits}


# --------------------------------------------------------------------------------------------------
# Workers: each reads commands ("run N", "quit") on stdin and answers one JSON line on stdout.


def _serve(setup_info: dict, run_one) -> None:
  out = sys.__stdout__
  out.write(json.dumps(dict(setup_info, ready=True, rss_mb=_peak_rss_mb())) + "\n")
  out.flush()
  for line in sys.stdin:
    cmd = line.split()
    if not cmd:
      continue
    if cmd[0] == "quit":
      out.write(json.dumps({"peak_rss_mb": _peak_rss_mb()}) + "\n")
      out.flush()
      return
    times = [run_one() for _ in range(int(cmd[1]))]
    out.write(json.dumps({"times": times}) + "\n")
    out.flush()


def _random_ids(seed: int):
  import numpy as np
  rng = np.random.default_rng(seed)
  return rng.integers(0, SHAPE["vocab"], (SHAPE["batch"], SHAPE["seq"] + 1)).astype(np.int32)


def jaxft_config(dtype: str, overrides: list[str]):
  """configs/base.py with the benchmark's model, LoRA and optimizer settings (+ --set
  overrides)."""
  from jaxft import configlib
  c = configlib.base_config()
  c.model.dtype = dtype
  c.model.param_dtype = dtype
  c.peft.method, c.peft.targets = "lora", "q_proj,v_proj"
  c.peft.lora.rank, c.peft.lora.alpha = SHAPE["rank"], 16.0
  c.data.batch_size, c.data.max_len = SHAPE["batch"], SHAPE["seq"]
  c.optim.warmup_steps, c.optim.clip_norm = 0, 1.0
  c.train.steps = 10_000
  for item in overrides:
    key, _, value = item.partition("=")
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    kind = type(node[leaf])
    node[leaf] = (value.lower() in ("1", "true")) if kind is bool else kind(value)
  return c


def jaxft_model_config(config, layers: int | None = None):
  """The ModelConfig of the benchmark shape, with config.model's numerics keys applied."""
  from jaxft import session
  from jaxft.models.config import ModelConfig
  s = SHAPE
  cfg = ModelConfig(vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["inter"],
                    num_layers=layers or s["layers"], num_heads=s["heads"], num_kv_heads=s["heads"],
                    head_dim=s["hidden"] // s["heads"], max_position_embeddings=4096)
  # session.model_config applies the model.* numerics keys to a preset; do the same to our shape.
  numerics = session.model_config(config)
  keep = ("dtype", "param_dtype", "remat", "attention")
  return cfg.replace(**{k: getattr(numerics, k) for k in keep if hasattr(numerics, k)})


def build_jaxft(config, cfg):
  """(prepared run, device batch) through the trainer's own `prepare` (jitted donated step)."""
  import jax
  import numpy as np
  from jaxft import peft, session, sharding, trainer
  from jaxft.models import llama, quantized

  method = peft.from_config(config.peft, cfg)
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.rules_from_config(config.mesh)
  base_sh = sharding.tree_shardings(llama.param_specs(cfg), mesh, rules)
  added_sh = sharding.tree_shardings(method.trainable_specs(cfg), mesh, rules)
  base = quantized.init_base(cfg, jax.random.key(0), config.model.quant, base_sh)
  model = session.Model(cfg, method, mesh, base, base_sh, added_sh, "bench")
  run = trainer.prepare(config, model)
  ids = _random_ids(1)
  rows, T = SHAPE["batch"], SHAPE["seq"]
  batch = {"inputs": ids[:, :-1], "targets": ids[:, 1:],
           "weights": np.ones((rows, T), np.float32),
           "positions": np.broadcast_to(np.arange(T, dtype=np.int32), (rows, T)).copy(),
           "segment_ids": np.ones((rows, T), np.int32)}
  device_batch = trainer.put_batch(batch, mesh, 1)
  return run, device_batch


def worker_jaxft(args) -> None:
  import jax
  config = jaxft_config(args.dtype, args.set)
  cfg = jaxft_model_config(config)
  run, batch = build_jaxft(config, cfg)
  jax.block_until_ready((run.state, run.frozen, batch))  # random init runs asynchronously
  box = {"state": run.state}
  t0 = time.perf_counter()
  box["state"], m = run.train_step(box["state"], batch, run.frozen)
  jax.block_until_ready(m)
  compile_s = time.perf_counter() - t0

  def one():
    t = time.perf_counter()
    box["state"], m = run.train_step(box["state"], batch, run.frozen)
    jax.block_until_ready(m)  # a benchmark sync; the trainer itself reads metrics one step late
    dt = time.perf_counter() - t
    box["loss"] = float(m["loss"])
    return dt

  one()
  _serve({"side": "jaxft", "first_step_s": compile_s, "loss": box.get("loss"),
          "devices": str(jax.devices()), "model": {k: getattr(cfg, k) for k in
                                                    ("dtype", "param_dtype", "remat")}}, one)


def worker_peft(args) -> None:
  import torch
  import transformers
  from peft import LoraConfig, get_peft_model
  if args.worker == "peft1":  # PyTorch with one intra-op thread (see --peft-1thread)
    torch.set_num_threads(1)
  torch.manual_seed(0)
  s = SHAPE
  hf = transformers.LlamaConfig(vocab_size=s["vocab"], hidden_size=s["hidden"],
                                intermediate_size=s["inter"], num_hidden_layers=s["layers"],
                                num_attention_heads=s["heads"], num_key_value_heads=s["heads"],
                                max_position_embeddings=4096, tie_word_embeddings=False)
  model = transformers.LlamaForCausalLM(hf)
  if args.dtype == "bfloat16":
    model = model.to(torch.bfloat16)
  model = get_peft_model(model, LoraConfig(r=s["rank"], lora_alpha=16, lora_dropout=0.0,
                                           target_modules=["q_proj", "v_proj"]))
  model.train()
  params = [p for p in model.parameters() if p.requires_grad]
  opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
  ids = torch.from_numpy(_random_ids(1)[:, :-1].astype("int64"))
  box = {}

  def one():
    t = time.perf_counter()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    box["loss"] = float(loss)
    return time.perf_counter() - t

  t0 = time.perf_counter()
  one()
  first = time.perf_counter() - t0
  _serve({"side": args.worker, "first_step_s": first, "loss": box["loss"],
          "threads": torch.get_num_threads(), "attn": model.config._attn_implementation,
          "lora_dtype": str(params[0].dtype)}, one)


def matmul_shapes(s=SHAPE) -> list[tuple[str, int, tuple, tuple, tuple, int]]:
  """(name, count per step, lhs shape, rhs shape, contracting dims, FLOPs of one) of each dot.

  Dense dots over the batch's tokens (forward x W, backward dy W^T) and the attention products per
  head (batched over batch x heads)."""
  tok, D, F, V, L = s["batch"] * s["seq"], s["hidden"], s["inter"], s["vocab"], s["layers"]
  H, T = s["heads"], s["seq"]
  hd = D // H
  BH = s["batch"] * H
  out = []
  for name, i, o, n in (("x@W[D,D]", D, D, 4 * L), ("x@W[D,F]", D, F, 2 * L), ("x@W[F,D]", F, D, L),
                        ("x@W[D,V]", D, V, 1)):
    out.append((name, n, (tok, i), (i, o), ((1,), (0,)), 2 * tok * i * o))
    out.append((name.replace("x@W", "dy@W^T"), n, (tok, o), (i, o), ((1,), (1,)), 2 * tok * i * o))
  # attention: q k^T [BH,T,hd]x[BH,T,hd] -> [BH,T,T]; p v [BH,T,T]x[BH,T,hd]; 3 of each per layer
  out.append(("qk^T", 3 * L, (BH, T, hd), (BH, T, hd), ((2,), (2,)), 2 * BH * T * T * hd))
  out.append(("pv", 3 * L, (BH, T, T), (BH, T, hd), ((2,), (1,)), 2 * BH * T * T * hd))
  return out


def worker_matmul(args) -> None:
  import jax
  import jax.numpy as jnp
  dtype = jnp.dtype(args.dtype)
  fns = []
  for name, count, ls, rs, contract, flops in matmul_shapes():
    batch = ((0,), (0,)) if len(ls) == 3 else ((), ())
    f = jax.jit(lambda a, b, c=contract, bd=batch: jax.lax.dot_general(
        a, b, (c, bd), preferred_element_type=jnp.float32))
    a = jax.random.normal(jax.random.key(0), ls, jnp.float32).astype(dtype)
    b = jax.random.normal(jax.random.key(1), rs, jnp.float32).astype(dtype)
    f(a, b).block_until_ready()
    fns.append((name, count, flops, f, a, b))

  def one():
    # Time of all the step's dots, each shape timed alone (best of 3 per shape); returns seconds.
    total = 0.0
    for name, count, flops, f, a, b in fns:
      best = float("inf")
      for _ in range(3):
        t = time.perf_counter()
        f(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t)
      total += count * best
    return total

  one()
  info = {"side": "matmul", "shapes": [(n, c, fl) for n, c, _, _, _, fl in matmul_shapes()]}
  _serve(info, one)


# --------------------------------------------------------------------------------------------------
# Parent


def worker_env(kind: str) -> dict:
  """Each side's environment: jaxft's the one its commands give themselves (huge-page malloc where
  the machine offers it, jaxft.cli.huge_pages_env); PEFT's as it comes (peft, peft1), and with the
  same huge-page setting (peft_hp)."""
  from jaxft import cli
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", TOKENIZERS_PARALLELISM="false")
  if kind in ("jaxft", "peft_hp", "matmul"):
    return cli.huge_pages_env(env) or env
  env.pop("GLIBC_TUNABLES", None)
  return env


class Worker:
  def __init__(self, kind: str, args):
    cmd = [sys.executable, os.path.abspath(__file__), f"--worker={kind}", f"--dtype={args.dtype}"]
    cmd += [f"--set={s}" for s in args.set]
    env = worker_env(kind)
    self.kind = kind
    self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                 env=env)
    self.info = None

  def read(self) -> dict:
    line = self.proc.stdout.readline()
    if not line:
      raise RuntimeError(f"{self.kind} worker died (exit {self.proc.wait()})")
    return json.loads(line)

  def ask(self, text: str) -> dict:
    self.proc.stdin.write(text + "\n")
    self.proc.stdin.flush()
    return self.read()


def compare(args) -> dict:
  kinds = ["jaxft", "peft", "matmul"] if not args.jaxft_only else ["jaxft", "matmul"]
  if args.peft_huge_pages and not args.jaxft_only:
    kinds.insert(2, "peft_hp")
  if args.peft_1thread and not args.jaxft_only:
    kinds.insert(2, "peft1")
  workers = {}
  for k in kinds:  # set up one at a time: compiles and model init do not overlap
    workers[k] = Worker(k, args)
    workers[k].info = workers[k].read()
  times = {k: [] for k in kinds}
  for _ in range(args.rounds):
    for k in kinds:
      times[k] += workers[k].ask(f"run {args.steps if k != 'matmul' else 1}")["times"]
  rss = {k: workers[k].ask("quit")["peak_rss_mb"] for k in kinds}
  for w in workers.values():
    w.proc.wait()
  tokens = SHAPE["batch"] * SHAPE["seq"]
  flops = step_flops()["total"]
  med = {k: statistics.median(v) for k, v in times.items()}
  res = {"dtype": args.dtype, "tokens_per_step": tokens, "step_gflop": flops / 1e9,
         "median_s": med, "min_s": {k: min(v) for k, v in times.items()}, "rss_mb": rss,
         "info": {k: w.info for k, w in workers.items()},
         "samples": {k: len(v) for k, v in times.items()}, "load_avg": os.getloadavg()[0]}
  res["matmul_gflops"] = flops / med["matmul"] / 1e9
  res["jaxft_gflops"] = flops / med["jaxft"] / 1e9
  res["jaxft_fraction_of_matmul"] = med["matmul"] / med["jaxft"]
  if "peft" in med:
    res["speedup"] = med["peft"] / med["jaxft"]
    best = min((k for k in med if k.startswith("peft")), key=lambda k: med[k])
    res["best_peft"] = best
    res["speedup_vs_best_peft"] = med[best] / med["jaxft"]
  return res


def report(r: dict) -> None:
  tok = r["tokens_per_step"]
  m = r["median_s"]
  print(f"\n== {r['dtype']}: batch {SHAPE['batch']} x {SHAPE['seq']} tokens, step "
        f"{r['step_gflop']:.1f} GFLOP of matmuls; medians over {r['samples']}")
  for side in ("jaxft", "peft", "peft1", "peft_hp"):
    if side in m:
      print(f"  {side:7s} {m[side]:.3f} s/step  {tok / m[side]:8.0f} tokens/s  (fastest step "
            f"{r['min_s'][side]:.3f} s)  peak RSS {r['rss_mb'][side]:6.0f} MB  (first step "
            f"{r['info'][side]['first_step_s']:.1f} s)")
  if "speedup" in r:
    print(f"  jaxft / PEFT tokens/s: {r['speedup']:.2f}x (medians), "
          f"{r['min_s']['peft'] / r['min_s']['jaxft']:.2f}x (fastest steps); "
          f"load average {r['load_avg']:.1f}")
    if r["best_peft"] != "peft":
      print(f"  jaxft / fastest PEFT configuration ({r['best_peft']}): "
            f"{r['speedup_vs_best_peft']:.2f}x (medians)")
  print(f"  matmul probe: the step's dots alone take {m['matmul']:.3f} s "
        f"({r['matmul_gflops']:.0f} GFLOP/s at the model's shapes, float32 accumulation)")
  print(f"  jaxft: {r['jaxft_gflops']:.0f} GFLOP/s = {100 * r['jaxft_fraction_of_matmul']:.0f}% "
        "of the measured matmul rate")


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--dtypes", default="float32,bfloat16")
  ap.add_argument("--rounds", type=int, default=6, help="interleaved rounds per dtype")
  ap.add_argument("--steps", type=int, default=2, help="steps per side per round")
  ap.add_argument("--set", action="append", default=[],
                  help="jaxft config override, e.g. --set model.remat=dots (repeatable)")
  ap.add_argument("--jaxft-only", action="store_true", help="skip PEFT (quick jaxft iterations)")
  ap.add_argument("--peft-1thread", action=argparse.BooleanOptionalAction, default=True,
                  help="also time PEFT with torch.set_num_threads(1) (peft1): on a shared machine "
                       "PyTorch's threads wait on each other at every op, and one thread can be "
                       "the faster PEFT; the ratio is also given against the faster of the two")
  ap.add_argument("--peft-huge-pages", action=argparse.BooleanOptionalAction, default=True,
                  help="also time PEFT with the huge-page malloc jaxft's commands give themselves "
                       "(peft_hp, GLIBC_TUNABLES=glibc.malloc.hugetlb=1): the same machine "
                       "setting on both sides")
  ap.add_argument("--json", default="", help="also write the results here")
  ap.add_argument("--worker", default="", help=argparse.SUPPRESS)
  ap.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
  args = ap.parse_args(argv)
  if args.worker:
    {"jaxft": worker_jaxft, "peft": worker_peft, "peft1": worker_peft, "peft_hp": worker_peft,
     "matmul": worker_matmul}[args.worker](args)
    return
  t0 = time.time()
  print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start",
        flush=True)
  results = []
  for dtype in args.dtypes.split(","):
    args.dtype = dtype
    r = compare(args)
    report(r)
    results.append(r)
  print(f"\nload average {os.getloadavg()[0]:.1f} at the end; wall {time.time() - t0:.0f} s")
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump(results, f, indent=1)


if __name__ == "__main__":
  main()
