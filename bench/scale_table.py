"""The scale targets of issue 21 through `python -m jaxft.plan`, into a JSON file and docs/scale.md.

    python bench/scale_table.py                   # every target not yet in bench/scale.json
    python bench/scale_table.py --only=8b-qlora-v5e1 --time
    python bench/scale_table.py --render          # docs/scale.md from bench/scale.json alone

Each target is compiled once, deviceless, for its TPU topology (libtpu from `pip install
"jaxft[tpu]"`, or the ROOT/.libtpu directory that tools/install_test_deps.sh fills), in its own
process, and its plan is added to bench/scale.json as it finishes (so an interrupted run keeps what
it had). The figures come from XLA's compiler and cost model for chips that were not there: memory
per chip as XLA allocates it, not measured on hardware.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from jaxft import files, mesh_choice, plan  # noqa: E402  (after the path: run from a checkout)

RESULTS = os.path.join(ROOT, "bench", "scale.json")
DOC = os.path.join(ROOT, "docs", "scale.md")

# name -> (config, topology, chips, overrides). No target sets config.mesh: jaxft chooses it
# (data parallelism when a replica of the step fits a chip, else fsdp over the chips;
# jaxft/mesh_choice.py) and the plan's `mesh_choice` says which and why.
TARGETS = {
    "8b-qlora-v5e1": ("llama3.py:size=8b,method=qlora", "v5e:2x2", 1, ["data.batch_size=4"]),
    "8b-lora-v5e4-b16": ("llama3.py:size=8b,method=lora", "v5e:2x2", 0, ["data.batch_size=16"]),
    "8b-qlora-v5e4-b16": ("llama3.py:size=8b,method=qlora", "v5e:2x2", 0, ["data.batch_size=16"]),
    "70b-qlora-v5e4": ("llama3.py:size=70b,method=qlora", "v5e:2x2", 0, ["data.batch_size=8"]),
    "8b-full-v5e16": ("llama3.py:size=8b,method=full", "v5e:4x4", 0, ["data.batch_size=16"]),
    "8b-qlora-v5p1-128k": ("llama3.py:size=8b,method=qlora", "v5p:2x2x1", 1,
                           ["data.batch_size=1", "data.max_len=131072"]),
    # the same with each layer's saved input in host memory: how long a row fits on one chip
    "8b-qlora-v5p1-128k-offload": ("llama3.py:size=8b,method=qlora", "v5p:2x2x1", 1,
                                   ["data.batch_size=1", "data.max_len=131072",
                                    "model.remat=offload"]),
    "8b-qlora-v5p1-256k-offload": ("llama3.py:size=8b,method=qlora", "v5p:2x2x1", 1,
                                   ["data.batch_size=1", "data.max_len=262144",
                                    "model.remat=offload"]),
    # half a million tokens on one chip: splash blocks of 1,024 past 262,144 tokens (their block
    # tables outgrew scalar memory), the MLP in slices of 8,192 tokens
    "8b-qlora-v5p1-512k-offload": ("llama3.py:size=8b,method=qlora", "v5p:2x2x1", 1,
                                   ["data.batch_size=1", "data.max_len=524288",
                                    "model.remat=offload", "model.mlp_tile=8192"]),
    # one v6e chip (31.25 GiB), a 131,072-token row, nothing but the batch shape set:
    # model.remat=auto picks what fits (issue 33)
    "8b-qlora-v6e1-128k": ("llama3.py:size=8b,method=qlora", "v6e:2x2", 1,
                           ["data.batch_size=1", "data.max_len=131072"]),
    # the same on v6e:8x8 (64 chips, 16 hosts of 4): four rows per chip, fsdp over all of them
    "8b-qlora-v6e64": ("llama3.py:size=8b,method=qlora", "v6e:8x8", 0, ["data.batch_size=256"]),
    "8b-lora-v6e64": ("llama3.py:size=8b,method=lora", "v6e:8x8", 0, ["data.batch_size=256"]),
    "70b-qlora-v6e64": ("llama3.py:size=70b,method=qlora", "v6e:8x8", 0, ["data.batch_size=256"]),
    "8b-full-v6e64": ("llama3.py:size=8b,method=full", "v6e:8x8", 0, ["data.batch_size=256"]),
    "8b-qlora-v6e64-128k": ("llama3.py:size=8b,method=qlora", "v6e:8x8", 0,
                             ["data.batch_size=64", "data.max_len=131072"]),  # a row per chip
    # GRPO (issue 30): 8 generations of 20,480 tokens, prompt 256 (Unsloth's notebooks'
    # max_prompt_length) + completion 20,224; the rollouts' programs planned beside the step
    "8b-qlora-grpo-v5p1-20k": ("llama3.py:size=8b,method=qlora", "v5p:2x2x1", 1,
                               ["train.objective=grpo", "data.batch_size=8", "rl.generations=8",
                                "data.max_len=20480", "rl.max_completion_tokens=20224",
                                "optim.accum_steps=4"]),
}


def command(name: str, time: bool) -> list[str]:
  config, topology, chips, over = TARGETS[name]
  args = [sys.executable, "-m", "jaxft.plan", f"--config=configs/{config}",
          f"--topology={topology}", f"--chips={chips}", "--json", f"--time={str(time).lower()}"]
  return args + [f"--config.{kv}" for kv in over]


def run(name: str, time: bool) -> dict:
  env = dict(os.environ)
  libtpu = os.path.join(ROOT, ".libtpu")
  if os.path.isdir(libtpu):
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [libtpu, env.get("PYTHONPATH")]))
  r = subprocess.run(command(name, time), cwd=ROOT, env=env, capture_output=True, text=True)
  if r.returncode not in (0, 1) or "{" not in r.stdout:
    return {"name": name, "error": (r.stderr.strip().splitlines() or ["?"])[-1][:300]}
  out = json.loads(r.stdout[r.stdout.index("{"):])
  out["name"] = name
  out["command"] = " ".join(["python"] + command(name, time)[1:])
  return out


def _buffer(b: dict) -> str:
  return (f"{b['shape']} {b['gib']:.2f}" + (" (host memory)" if b.get("memory") == "host" else ""))


def _remat(r: dict) -> str:
  """The remat policy the step was compiled with, and the MLP tile where one was set; '(auto)'
  where model.remat=auto chose them."""
  tile = f" + mlp_tile {r['mlp_tile']}" if r.get("mlp_tile") else ""
  return r["remat"] + tile + (" (auto)" if "auto chose" in r.get("remat_note", "") else "")


def _cell(x, spec):
  return "unknown" if x is None else spec.format(x)


def target_config(name: str):
  """The config of target `name` as jaxft.plan builds it: its file, variant and overrides."""
  config, _, _, over = TARGETS[name]
  file, _, arg = config.partition(":")
  c = importlib.import_module(f"configs.{file[:-3]}").get_config(arg or None)
  for kv in over:
    key, _, value = kv.partition("=")
    group, leaf = key.rsplit(".", 1)
    node = functools.reduce(getattr, group.split("."), c)
    old = node[leaf]
    node[leaf] = value.lower() == "true" if isinstance(old, bool) else type(old)(value)
  return c


def _stale_mesh(name: str, r: dict) -> str:
  """'' when the stored plan `r` has the mesh the defaults choose today for `name` on its chips,
  else that mesh (a row planned with the mesh typed by hand, before the defaults chose it)."""
  c = target_config(name)
  rows = c.data.batch_size // c.optim.accum_steps
  try:
    need = mesh_choice.estimate(c, "tpu")
    now = mesh_choice.choose(c.mesh, r["chips"], r["chip_gib"], need, rows)
  except Exception as e:  # noqa: BLE001 (shown in the table)
    return str(e)[:80]
  same = (r["mesh"].get("data", 1), r["mesh"].get("fsdp", 1)) == (now.data, now.fsdp)
  return "" if same else f"data={now.data},fsdp={now.fsdp}"


def render(results: dict) -> str:
  rows = ["| target | model | method | batch x seq | remat | topology (mesh) | GiB per chip | fits | "
          "largest buffer | est. tokens/s per chip | est. MFU |", "|" + "---|" * 11]
  for name in TARGETS:
    r = results.get(name)
    if r is None:
      rows.append(f"| {name} | | | | | | not compiled yet | | | | |")
      continue
    if "error" in r:
      rows.append(f"| {name} | | | | | | error: {r['error']} | | | | |")
      continue
    # tokens/s and MFU derived again from the stored XLA seconds and FLOPs (jaxft.plan.timing), so
    # a fix in that derivation needs no recompile
    r = plan.timing(r)
    model = {32: "Llama-3-8B", 80: "Llama-3-70B"}.get(r["model"]["layers"], r["model"]["layers"])
    method = "qlora" if r["quant"] == "nf4" else r["method"]
    mesh = ",".join(f"{a}={n}" for a, n in r["mesh"].items() if n > 1) or "1 chip"
    stale = _stale_mesh(name, r)  # planned with a mesh typed by hand the defaults no longer choose
    if stale:
      mesh += f"; typed, the defaults now choose {stale}: not re-planned"
    big = r["largest_buffers"][0] if r["largest_buffers"] else None
    gib = f"{r['total_gib']:.2f} of {r['chip_gib']:.2f}" + (
        f" (+{r['host_gib']:.2f} in host memory)" if r.get("host_gib") else "")
    if r.get("phases"):  # the peak of the step and what the objective runs between steps
      gib += " (" + ", ".join([f"step {r['step_total_gib']:.2f}"] + [
          f"{p['name']} {_cell(p['total_gib'], '{:.2f}')}" for p in r["phases"]]) + ")"
    if r.get("refused"):  # XLA refused it: its temporaries alone, no buffer list
      f = r["refused"]
      gib = (f"{r['total_gib']:.2f}+ of {r['chip_gib']:.2f} (XLA: temporaries "
             f"{f['temporaries_gib']:.2f} of {f['available_gib']:.2f})")
    rows.append(
        f"| {name} | {model} | {method} | {r['batch']} x {r['seq']} | {_remat(r)} | "
        f"{r['topology']} ({mesh}) | "
        f"{gib} | {'yes' if r['fits'] else '**no**'} | "
        f"{'unknown (refused)' if big is None else _buffer(big)} | "
        f"{_cell(r['tokens_per_sec_per_chip'], '{:.0f}')} | {_cell(r['mfu'], '{:.0%}')} |")
  return "\n".join(rows)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--only", default="", help="comma-separated target names")
  ap.add_argument("--time", action="store_true", help="also XLA's time estimate (2 more compiles)")
  ap.add_argument("--render", action="store_true", help="only write docs/scale.md from the JSON")
  ap.add_argument("--redo", action="store_true", help="compile targets already in the JSON again")
  a = ap.parse_args()
  results = {}
  if os.path.exists(RESULTS):
    with open(RESULTS, encoding="utf-8") as f:
      results = json.load(f)
  names = [n for n in (a.only.split(",") if a.only else TARGETS) if n]
  for name in [] if a.render else names:
    if name in results and not a.redo:
      continue
    print(f"{name}: compiling", flush=True)
    results[name] = run(name, a.time)
    files.write_json(RESULTS, results)
    print(f"{name}: {json.dumps({k: results[name].get(k) for k in ('total_gib', 'fits', 'error')})}",
          flush=True)
  table = render(results)
  print(table)
  with open(DOC, encoding="utf-8") as f:
    doc = f.read()
  start, end = "<!-- table -->", "<!-- /table -->"
  files.write_text(DOC, doc[:doc.index(start) + len(start)] + "\n" + table + "\n" + doc[doc.index(end):])


if __name__ == "__main__":
  main()
