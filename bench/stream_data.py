"""Streaming vs in-memory data on a large JSONL set: time to the first train step and peak RSS.

Writes ROWS completion rows (~400 bytes each: 5,000,000 rows are ~2 GB) as SHARDS JSONL shards
under --dir (skipped when they are there already), then trains configs/quickstart.py a few steps
on them twice, each in its own process:

- streamed: data.train=DIR/*.jsonl (jaxft/data/stream.py: indexed, read and tokenized lazily);
- in memory: data.stream=off on the first --memory_rows rows (one shard's worth by default:
  reading and tokenizing every row of 5M up front takes long and holds every example) and on
  half as many, the figures extrapolated along the line through the two to ROWS.

  python bench/stream_data.py [--dir=/tmp/jaxft-stream] [--rows=5000000] [--shards=20]

Prints seconds from process start to the first logged step (metrics.jsonl's step-1 row) and the
peak RSS of the training process.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_CITIES = ["Paris", "Lima", "Oslo", "Quito", "Hanoi", "Accra", "Riga", "Bern", "Doha", "Suva"]


def write_shards(directory: str, rows: int, shards: int) -> list[str]:
  """SHARDS files part-NNNNN.jsonl holding `rows` completion rows in all; returns their paths."""
  os.makedirs(directory, exist_ok=True)
  paths = [os.path.join(directory, f"part-{s:05d}.jsonl") for s in range(shards)]
  if all(os.path.exists(p) for p in paths):
    return paths
  filler = "a short note about the weather and the river that runs past the old town " * 4
  per = -(-rows // shards)
  for s, path in enumerate(paths):
    lines = []
    for i in range(s * per, min(rows, (s + 1) * per)):
      city = _CITIES[i % len(_CITIES)]
      lines.append(json.dumps({"id": i, "prompt": f"Row {i}: {filler}Which city is it?",
                               "completion": f" {city}."}) + "\n")
    with open(path + ".tmp", "w") as f:
      f.writelines(lines)
    os.replace(path + ".tmp", path)
  return paths


def train_once(data: str, stream: str, workdir: str, steps: int) -> dict:
  """Trains the quickstart model `steps` steps on `data`; returns seconds to the first logged
  step and the peak RSS (GB) of the training process."""
  args = [sys.executable, "-m", "jaxft.train", "--config=configs/quickstart.py",
          f"--workdir={workdir}", f"--config.data.train={data}", "--config.data.eval=",
          f"--config.data.stream={stream}", f"--config.train.steps={steps}",
          "--config.train.log_every=1", "--config.train.progress=False"]
  env = dict(os.environ, JAXFT_HUGE_PAGES="0")  # (one process: its rusage is the run's)
  t0 = time.time()
  proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE)
  metrics, first = os.path.join(workdir, "metrics.jsonl"), None
  while first is None and proc.poll() is None:
    if os.path.exists(metrics) and os.path.getsize(metrics):
      first = time.time() - t0
    time.sleep(0.05)
  _, status, usage = os.wait4(proc.pid, 0)
  err = proc.stderr.read().decode()[-3000:]
  if status:
    raise SystemExit(f"training failed ({status}):\n{err}")
  return {"first_step_s": first, "peak_rss_gb": usage.ru_maxrss / 2 ** 20}


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "jaxft-stream"))
  ap.add_argument("--rows", type=int, default=5_000_000)
  ap.add_argument("--shards", type=int, default=20)
  ap.add_argument("--memory_rows", type=int, default=0, help="in-memory slice (0: one shard)")
  ap.add_argument("--steps", type=int, default=3)
  a = ap.parse_args()
  t = time.time()
  paths = write_shards(a.dir, a.rows, a.shards)
  size = sum(os.path.getsize(p) for p in paths)
  print(f"data: {a.rows} rows, {len(paths)} shards, {size / 2 ** 30:.2f} GiB "
        f"(written or found in {time.time() - t:.0f} s)", flush=True)
  work = tempfile.mkdtemp(prefix="jaxft-stream-bench-")
  try:
    s = train_once(os.path.join(a.dir, "*.jsonl"), "auto", os.path.join(work, "s"), a.steps)
    print(f"streamed, {a.rows} rows: first step at {s['first_step_s']:.1f} s, peak RSS "
          f"{s['peak_rss_gb']:.2f} GB", flush=True)
    n = a.memory_rows or -(-a.rows // a.shards)
    runs = {}
    for k in (n // 2, n):  # two slices: a line through them extrapolates to ROWS
      part = os.path.join(work, f"slice{k}.jsonl")
      with open(paths[0]) as src, open(part, "w") as dst:
        for _, line in zip(range(k), src):
          dst.write(line)
      runs[k] = m = train_once(part, "off", os.path.join(work, f"m{k}"), a.steps)
      print(f"in memory, {k} rows: first step at {m['first_step_s']:.1f} s, peak RSS "
            f"{m['peak_rss_gb']:.2f} GB", flush=True)
    lo, hi = runs[n // 2], runs[n]
    line = lambda key: hi[key] + (hi[key] - lo[key]) / (n - n // 2) * (a.rows - n)
    print(f"in memory, extrapolated to {a.rows} rows: first step at ~{line('first_step_s'):.0f} s, "
          f"peak RSS ~{line('peak_rss_gb'):.1f} GB", flush=True)
  finally:
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
  main()
