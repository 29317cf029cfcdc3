"""Batched serving against one request at a time, on loopback with the openai client.

    python bench/serve.py [--workdir=W] [--clients=32 --per_client=4 --max_tokens=32]

Without --workdir it trains the tiny quickstart model for a few steps first. It starts the server
in-process, sends the same chat requests one after another (a sample of them, timed per request),
then from `clients` threads at once, checks that every concurrent answer equals its single-request
answer, and prints requests/s and tokens/s of both and their ratio.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import socket
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--workdir", default="")
  ap.add_argument("--clients", type=int, default=32)
  ap.add_argument("--per_client", type=int, default=4)
  ap.add_argument("--max_tokens", type=int, default=32)
  ap.add_argument("--slots", type=int, default=32)
  ap.add_argument("--sequential_sample", type=int, default=16)
  ap.add_argument("--model", default="", help="model to query (default: base)")
  args = ap.parse_args()

  import openai
  import uvicorn
  from jaxft import configlib, trainer
  from jaxft.serving import server as serve
  wd = args.workdir
  if not wd:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    c = configlib.sibling(os.path.join(root, "configs", "quickstart.py"), "quickstart").get_config()
    c.model.preset, c.train.steps, c.train.progress = "tiny", 20, False
    wd = os.path.join(tempfile.mkdtemp(), "tuned")
    trainer.train(c, wd)
  models = serve.load_models(wd, {}, slots=args.slots, context=256)
  # The base (random weights for the quickstart preset) answers at full length: the decode work
  # this bench is about; a tuned tiny model stops after a token or two.
  name = args.model or "base"
  port = _free_port()
  srv = uvicorn.Server(uvicorn.Config(serve.make_app(models, max_queue=4096), host="127.0.0.1",
                                      port=port, log_level="warning"))
  threading.Thread(target=srv.run, daemon=True).start()
  while not srv.started:
    time.sleep(0.05)
  client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
  countries = ["France", "Peru", "Japan", "Kenya", "Chile", "Norway", "Egypt", "Canada"]
  prompts = [f"What is the capital of {countries[i % len(countries)]}? ({i})"
             for i in range(args.clients * args.per_client)]

  def ask(p):
    r = client.chat.completions.create(model=name, messages=[{"role": "user", "content": p}],
                                       max_tokens=args.max_tokens, temperature=0)
    return r.choices[0].message.content, r.usage.completion_tokens

  ask(prompts[0])  # compile prefill and decode shapes before timing
  sample = prompts[:args.sequential_sample]
  t0 = time.perf_counter()
  single = {p: ask(p) for p in sample}
  seq_s = (time.perf_counter() - t0) / len(sample)
  seq_tokens = sum(n for _, n in single.values()) / len(sample)

  t0 = time.perf_counter()
  with concurrent.futures.ThreadPoolExecutor(args.clients) as pool:
    results = list(pool.map(ask, prompts))
  wall = time.perf_counter() - t0
  same = all(results[i][0] == single[p][0] for i, p in enumerate(prompts) if p in single)
  n, tokens = len(prompts), sum(t for _, t in results)
  print(f"sequential: {1 / seq_s:.2f} requests/s, {seq_tokens / seq_s:.1f} tokens/s "
        f"({len(sample)} requests, one at a time)")
  print(f"concurrent: {n / wall:.2f} requests/s, {tokens / wall:.1f} tokens/s ({args.clients} "
        f"clients x {args.per_client} requests, {args.slots} slots)")
  print(f"ratio (requests/s, concurrent / sequential): {(n / wall) * seq_s:.2f}x; concurrent "
        f"answers equal single-request answers: {same}")
  srv.should_exit = True


if __name__ == "__main__":
  main()
