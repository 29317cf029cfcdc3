"""Multi-device checks, run by tests/test_sharding.py in a process of their own with 8 forced CPU
devices (XLA_FLAGS must be set before JAX is imported, and ordinary tests keep one device).

  python tests/multidevice_helper.py full|lora WORKDIR   -> one JSON object on the last line of stdout

Everything is measured here and asserted in the test, so one process (one JAX start-up) serves
every mesh of a method; the test runs the two methods' processes side by side.
"""

import os
import sys

# Cheaper XLA compiles (the same for every mesh compared, so parity is unaffected).
FAST_XLA = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
if __name__ == "__main__":  # not when a test imports the constants: its later subprocesses would
  # inherit 8 devices
  os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count=8 {FAST_XLA} " + os.environ.get("XLA_FLAGS", "")
  os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import json  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import logging  # noqa: E402
from conftest import make_config  # noqa: E402

from jaxft import session, sharding, trainer  # noqa: E402
from jaxft.data import bundled, pipeline  # noqa: E402
from jaxft.data.formats import Example  # noqa: E402
from jaxft.errors import ConfigError  # noqa: E402
from jaxft.models import config as mc  # noqa: E402
from jaxft.peft import flatten  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MESHES = {"1": (1, 1, 1), "data=8": (8, 1, 1), "fsdp=8": (1, 8, 1), "data=2,fsdp=4": (2, 4, 1),
          "fsdp=4,tensor=2": (1, 4, 2)}
# What the local 2-process run of test_sharding.py trains (configs/quickstart.py with these
# overrides); multihost_reference trains it on 1 process x 8 devices.
MULTIHOST = {"model.preset": "tiny", "train.steps": 5, "train.log_every": 1, "train.progress": False,
             "data.eval": "", "data.batch_size": 16, "optim.accum_steps": 2, "optim.warmup_steps": 0,
             "mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2}


# The tiny preset (4 heads, 2 kv heads, hidden 64: divisible by tensor=2 and fsdp=8) with a small
# vocabulary, for the parity runs that need no tokenizer.
mc.PRESETS["tiny-v512"] = mc.PRESETS["tiny"].replace(vocab_size=512)


def base_config(method: str, mesh=(1, 1, 1), quant: str = "none", preset: str = "tiny-v512"):
  c = make_config("base")
  c.model.preset = preset
  c.model.quant = quant
  c.peft.method = method
  c.peft.targets = "all-linear"
  c.optim.lr = 3e-3
  c.optim.warmup_steps = 0
  c.train.steps = 5
  c.train.progress = False
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = mesh
  return c


def synthetic_batches(n: int, rows: int = 8, max_len: int = 32, vocab: int = 512):
  """Packed batches of random examples (several segments per row, padding at the ends)."""
  rng = np.random.default_rng(0)
  examples = []
  for _ in range(n * rows * 2):
    k = int(rng.integers(6, 20))
    mask = np.ones(k, bool)
    mask[: k // 3] = False  # a prompt that is not a target
    examples.append(Example(rng.integers(3, vocab, k).astype(np.int32), mask))
  stream = pipeline.TrainStream(examples, max_len=max_len, packing=True, rows_per_batch=rows,
                                seed=0, shuffle=False)
  pos, out = pipeline.Position(), []
  for _ in range(n):
    b, pos = stream.batch_at(pos)
    out.append(b)
  return out


def spec_of(x):
  return [None if p is None else (list(p) if isinstance(p, tuple) else p) for p in x.sharding.spec]


def losses_on(config, devices, batches, record=None):
  """Losses of len(batches) train steps, built the way the trainer builds them."""
  mesh = sharding.make_mesh(config.mesh, devices)
  model = session.load_model(config, mesh)
  run = trainer.prepare(config, model)
  state, out = run.state, []
  if record is not None:  # where the leaves live, for the test to check
    flat_tr = flatten(state["trainable"])
    flat_fr = {k: v for k, v in flatten(run.frozen).items()}
    record["trainable"] = {k: spec_of(v) for k, v in flat_tr.items()}
    record["mu"] = {}  # Adam's first moments, by the path of the param they track
    for path, x in jax.tree_util.tree_flatten_with_path(state["opt_state"])[0]:
      names = [getattr(k, "name", None) or getattr(k, "key", None) for k in path]
      if "mu" in names:
        record["mu"]["/".join(names[names.index("mu") + 1:])] = spec_of(x)
    record["frozen"] = {}  # quantized kernels: a spec per child (codes, scales, nested scales)
    for k, v in flat_fr.items():
      kids = jax.tree_util.tree_flatten_with_path(v)[0]
      record["frozen"][k] = (spec_of(v) if isinstance(v, jax.Array) else
                             {jax.tree_util.keystr(p): spec_of(x) for p, x in kids})
  for b in batches:
    state, m = run.train_step(state, sharding.put_batch(b, mesh, 1), run.frozen)
    out.append(float(m["loss"]))
  return out


def parity(method, batches):
  """{mesh: losses} of 5 steps on every mesh of MESHES, and the layout on fsdp=4 x tensor=2."""
  out, layout = {}, {}
  for name, mesh in MESHES.items():
    devices = jax.devices()[:1] if name == "1" else jax.devices()
    rec = layout if name == "fsdp=4,tensor=2" else None
    out[name] = losses_on(base_config(method, mesh), devices, batches, rec)
  return out, layout


def quantized(batches):
  """LoRA over an NF4 base: one device against fsdp=4 x tensor=2 (codes and scales sharded)."""
  out = {}
  for name in ("1", "fsdp=4,tensor=2"):
    devices = jax.devices()[:1] if name == "1" else jax.devices()
    rec = {} if name != "1" else None
    out[name] = losses_on(base_config("lora", MESHES[name], quant="nf4"), devices, batches[:2], rec)
    if rec is not None:
      out["layout"] = rec["frozen"]
  return out


def bytes_on_devices():
  """Per-device bytes of the base with fsdp=8, and with fsdp=8 but `embed` replicated by
  mesh.rules; and what the sharded init needs per device (XLA's memory analysis)."""
  out = {}
  for name, mesh, rules in (("fsdp=8", (1, 8, 1), ""), ("fsdp=8,embed=none", (1, 8, 1), "embed=none")):
    c = base_config("full", mesh, preset="tiny")  # a vocabulary big enough to dwarf the norms
    c.mesh.rules = rules
    model = session.load_model(c, sharding.make_mesh(c.mesh))
    per = sharding.bytes_per_device(model.base)
    out[name] = {"total": sum(x.nbytes for x in jax.tree.leaves(model.base)),
                 "per_device": sorted(per.values()), "devices": len(per)}
    if name == "fsdp=8":
      from jaxft.models import llama
      compiled = jax.jit(llama.init_params, static_argnums=0,
                         out_shardings=model.base_shardings).lower(model.cfg, jax.random.key(0)).compile()
      mem = compiled.memory_analysis()
      out[name]["init_peak"] = int(mem.temp_size_in_bytes + mem.output_size_in_bytes)
  return out


def misplaced():
  """A tree a loader left replicated, after sharding.place: (spec before, spec after)."""
  from jax.sharding import NamedSharding, PartitionSpec as P
  mesh = sharding.make_mesh(base_config("full", (1, 4, 2)).mesh)
  want = NamedSharding(mesh, P("fsdp", "tensor"))
  tree = {"w": jax.device_put(np.ones((8, 8), np.float32), NamedSharding(mesh, P()))}
  placed = sharding.place(tree, {"w": want}, "test")
  return [spec_of(tree["w"]), spec_of(placed["w"]), sharding.place(placed, {"w": want}) is placed]


def bad_meshes(workdir):
  """ConfigError messages of meshes that cannot work (nothing is written to the workdir)."""
  out = {}
  for name, mesh in (("tensor=8", (1, 1, 8)), ("data=3", (3, 1, 1)), ("fsdp=3,data=-1", (-1, 3, 1))):
    c = base_config("lora", mesh)
    c.data.train = bundled.path("capitals_train.jsonl")
    wd = os.path.join(workdir, "bad-" + name)
    try:
      trainer.train(c, wd)
      out[name] = None
    except ConfigError as e:
      out[name] = str(e)
    out[name + ":written"] = os.path.exists(wd) and sorted(os.listdir(wd))
  for name, key, value in (("rows", "data.batch_size", 4),  # 4 rows over data*fsdp=8 devices
                           ("rules", "mesh.rules", "embed=model")):
    c = base_config("lora", (8, 1, 1))
    c.data.train = bundled.path("capitals_train.jsonl")
    section, field = key.split(".")
    c[section][field] = value
    try:
      trainer.train(c, os.path.join(workdir, "bad-" + name))
      out[name] = None
    except ConfigError as e:
      out[name] = str(e)
  return out


def multihost_reference(workdir):
  """The run of the 2-process test, on 1 process x 8 devices, through trainer.train."""
  c = make_config("quickstart")
  for key, value in MULTIHOST.items():
    section, name = key.split(".")
    c[section][name] = value
  wd = os.path.join(workdir, "one-process")
  trainer.train(c, wd)
  with open(os.path.join(wd, "metrics.jsonl")) as f:
    return [json.loads(line)["loss"] for line in f if '"loss"' in line]


# GRPO on the tiny model (the quickstart's tokenizer) as tests/test_grpo.py runs it, sampled with
# top-p; LoRA also with rl.iterations=2 (old log-probs) and the KL to the base.
GRPO_MESHES = ("1", "fsdp=4,tensor=2")  # (data=2,fsdp=4 measured equal too: ~1 min more)
GRPO = {"model.preset": "tiny", "train.progress": False, "train.log_every": 1,
        "train.objective": "grpo", "data.eval": "", "data.max_len": 48, "data.batch_size": 8,
        "rl.generations": 4, "rl.max_completion_tokens": 8, "rl.rewards": "match:contains,length:4",
        "rl.top_p": 0.95, "optim.warmup_steps": 0, "optim.schedule": "constant", "train.steps": 3}
GRPO_LORA = {"rl.iterations": 2, "rl.beta": 0.04, "train.steps": 4}


def grpo_runs(workdir, method="lora"):
  """{mesh: {"rows": metrics.jsonl's rows, "tokens": every completion's token ids, "params":
  each trained leaf's sum of squares at the end}} of a short GRPO run (trainer.train) on each of
  GRPO_MESHES; "1" is one of the 8 devices."""
  from jaxft import decode
  from jaxft.data import bundled
  from jaxft.hooks import Hook
  c = make_config("quickstart", **dict(GRPO, **GRPO_LORA))
  c.data.train = bundled.path("capital_prompts_train.jsonl")
  c.peft.method = method
  make_mesh, generate, out = sharding.make_mesh, decode.generate, {}
  for name in GRPO_MESHES:
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = MESHES[name]
    tokens = []

    def recorded(*args, **kw):
      gens = generate(*args, **kw)
      tokens.extend(g.tokens.tolist() for g in gens)
      return gens

    decode.generate = recorded
    sharding.make_mesh = lambda cfg, devices=None, n=name: make_mesh(
        cfg, jax.devices()[:1] if n == "1" else devices)
    params = {}
    last = Hook("params", at_end="done", run=lambda loop, p=params: p.update(
        {k: float(np.sum(np.square(np.asarray(v, np.float64))))
         for k, v in flatten(loop.state["trainable"]).items()}))
    wd = os.path.join(workdir, f"grpo-{method}-{name}")
    try:
      trainer.train(c, wd, hooks=(last,))
    finally:
      decode.generate, sharding.make_mesh = generate, make_mesh
    with open(os.path.join(wd, "metrics.jsonl")) as f:
      rows = [json.loads(line) for line in f]
    out[name] = {"rows": rows, "tokens": tokens, "params": params}
  return out


def _timed(fn, *args):
  t, c = time.time(), time.process_time()
  out = fn(*args)
  print(f"multidevice_helper: {fn.__name__} took {time.time() - t:.1f}s "
        f"({time.process_time() - c:.1f}s of CPU)", file=sys.stderr)
  return out


def main(part, workdir):
  logging.set_verbosity(logging.WARNING)
  assert jax.device_count() == 8, jax.devices()
  batches = synthetic_batches(5)
  losses, layout = _timed(parity, part, batches)
  result = {"losses": losses, "layout": layout}
  if part == "full":  # the parts are balanced so that the two processes take about as long
    result.update(bytes=_timed(bytes_on_devices), bad=_timed(bad_meshes, workdir),
                  nf4=_timed(quantized, batches), place=misplaced(),
                  multihost=_timed(multihost_reference, workdir))
  else:
    result.update(grpo=_timed(grpo_runs, workdir))
  print(json.dumps(result))


if __name__ == "__main__":
  main(sys.argv[1], sys.argv[2])
