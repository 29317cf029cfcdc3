"""Will a config fit, and how fast might it go: the train step compiled for chips one may not have.

`plan(config, topology)` builds jaxft's own train step (`trainer.build_step`, the function
`jaxft.train` jits) over abstract arrays only: the base, the method's leaves, the optimizer state
and the batch are `jax.eval_shape`s of jaxft's init, quantize, split and optimizer functions, so no
weight is read and nothing is allocated. It compiles the step for the devices of a TPU topology
(deviceless, through libtpu: `pip install "jaxft[tpu]"`) or for the local devices, and reports per
chip what XLA's compiler says: the bytes of frozen and trainable parameters, optimizer state,
temporaries, the total against the chip's memory and the largest buffers; FLOPs per step from
jaxft's own count (jaxft/flops.py); XLA's cost-model step time when it is meaningful (positive, and
the program has no loops, whose bodies the cost model counts once), else unknown; and from it the
implied tokens/s per chip and MFU, labelled model estimates. What the objective runs on the chips
between steps (GRPO's rollouts: its `plan_phases`) is compiled and measured beside the step
(jaxft/plan/phases.py); the plan's total is then the peak of the two, which never run at once.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Any

import jax
import numpy as np

from jaxft import flops, memory, mesh_choice, peft, quant, session, sharding, target, trainer
from jaxft.errors import ConfigError
from jaxft.models import llama, quantized
from jaxft.models.ops import pack_frozen
from jaxft.plan import phases as run_phases

_GIB = memory.GIB
# (re-exported: the plan's callers and tests read them here)
chip_memory_gib, refused_for_memory = memory.chip_memory_gib, memory.refused_for_memory


def topology_devices(topology: str, chips: int = 0) -> list:
  """The devices of `topology` ('local', or a TPU name such as 'v5e:2x2'), the first `chips` of
  them when chips > 0 (a one-chip mesh from 'v5e:2x2'). Raises ConfigError naming the topology."""
  if topology == "local":
    devices = jax.devices()
  else:
    try:
      from jax.experimental import topologies
      devices = topologies.get_topology_desc(platform="tpu", topology_name=topology).devices
    except ImportError as e:
      raise ConfigError(f"--topology={topology}: needs libtpu (pip install 'jaxft[tpu]'): {e}")
    except Exception as e:  # libtpu's own error for an unknown name or a missing wheel
      raise ConfigError(f"--topology={topology}: cannot build its devices ({e}); names look like "
                        "v5e:2x2, v5p:2x2x1, v6e:8x8, and need libtpu (pip install 'jaxft[tpu]')")
  if chips > len(devices):
    raise ConfigError(f"--chips={chips}: the topology {topology} has {len(devices)}")
  return list(devices)[:chips] if chips > 0 else list(devices)


@dataclasses.dataclass(frozen=True)
class Abstract:
  """The train step of a config over abstract arguments, ready to lower."""
  cfg: Any
  method: Any
  mesh: Any
  train_step: Any  # jitted (state, batch, frozen) -> (state, metrics)
  state: Any       # ShapeDtypeStruct trees
  batch: Any
  frozen: Any
  state_shardings: Any
  frozen_shardings: Any
  objective: Any   # the step's objective (what else a run compiles: its plan_phases)


def _strip(tree):
  """Plain ShapeDtypeStructs (no sharding): the jitted step declares its own."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def _abstract_params(config, cfg, method, base_sh, added_sh):
  """(base, added) as abstract trees: llama.init_params (quantized as config.model.quant says)
  and the method's init, completed from the base."""
  kind = config.model.quant
  if kind not in quant.KINDS:
    raise ConfigError(f"model.quant={kind!r}: expected one of {', '.join(quant.KINDS)}")
  if kind != "none" and method.trains_base:
    raise ConfigError("model.quant needs a frozen base: use peft.method=lora (or another PEFT method)")
  key = jax.random.key(config.train.seed)
  base = jax.eval_shape(functools.partial(llama.init_params, cfg), key)
  if kind != "none":
    base = jax.eval_shape(lambda b: quantized.quantize_base(b, kind, base_sh), base)
  added = jax.eval_shape(functools.partial(method.init, cfg), key)
  added = jax.eval_shape(functools.partial(method.init_from_base, cfg), base, added)
  return base, added


def build(config, devices, layers: int | None = None) -> Abstract:
  """The train step of `config` on a mesh of `devices`, with abstract state, batch and frozen
  tree (the shapes `jaxft.train` would feed it); `layers` replaces the model's depth (for the time
  estimate). Raises ConfigError for configs train refuses."""
  trainer.check_config(config)
  mesh = sharding.make_mesh(config.mesh, devices)
  sharding.check_batch(mesh, config.data.batch_size, config.optim.accum_steps)
  with target.building_for(devices[0].platform):  # (model.dtype=auto follows the target chip)
    cfg = session.model_config(config)
  if layers is not None:
    cfg = cfg.replace(num_layers=layers)
  sharding.check_model_fits(mesh, cfg)
  method = peft.from_config(config.peft, cfg)
  rules = sharding.rules_from_config(config.mesh)
  base_sh = sharding.tree_shardings(llama.param_specs(cfg), mesh, rules)
  added_sh = sharding.spread_over_fsdp(
      sharding.tree_shardings(method.trainable_specs(cfg), mesh, rules),
      method.trainable_specs(cfg))
  with target.building_for(devices[0].platform):
    base, added = _abstract_params(config, cfg, method, base_sh, added_sh)
    trainable, frozen = method.split(base, added)
    trainable_sh, frozen_sh = method.split(base_sh, added_sh)
    trainable_sh = sharding.value_shardings(trainable, trainable_sh)
    frozen_sh = sharding.value_shardings(frozen, frozen_sh)
    frozen = jax.eval_shape(pack_frozen, frozen)  # as trainer.prepare stores it
    tx, steps, state_sh, step = trainer.build_step(config, cfg, method, mesh, trainable_sh,
                                                   frozen_sh)
    state = jax.eval_shape(lambda tr: dict(trainer.fresh_state(tx, tr, config.train.seed),
                                           trainable=tr), trainable)
  # (the batch's fields are the objective's: pairs carry their reference log-probs)
  return Abstract(cfg, method, mesh, step, _strip(state), steps.objective.abstract_batch(config),
                  _strip(frozen), state_sh, frozen_sh, steps.objective)


def compile_step(ab: Abstract):
  """The step compiled for the mesh's devices (deviceless for a TPU topology)."""
  with target.building_for(ab.mesh.devices.flat[0].platform):
    return ab.train_step.lower(ab.state, ab.batch, ab.frozen).compile()


def per_chip_bytes(tree, shardings) -> int:
  """Bytes of the largest shard of `tree`'s arrays on one chip, summed over the arrays."""
  total = 0
  for x, sh in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)):
    total += math.prod(sh.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
  return total


_HLO_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1,
              "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8,
              "u64": 8, "f64": 8}
_SHAPE = re.compile(r"%(\S+) = (\w+)\[([\d,]*)\]([^ ]*) (\S+?)\(")
_HOST = "S(5)"  # the layout's memory space of a buffer in host memory (remat=offload's saves)


def largest_buffers(hlo_text: str, n: int = 5) -> list[dict]:
  """The `n` largest array results of the compiled (per-chip) program: shape, op, GiB and memory
  ('device', or 'host' for a buffer XLA placed in the host's memory)."""
  seen: dict[tuple, dict] = {}
  for m in _SHAPE.finditer(hlo_text):
    _, dtype, dims, layout, op = m.groups()
    if dtype in ("token", "tuple") or op in ("parameter", "get-tuple-element", "bitcast"):
      continue
    size = _HLO_BYTES.get(dtype)
    if size is None:
      continue
    shape = f"{dtype}[{dims}]"
    where = "host" if _HOST in layout else "device"
    gib = math.prod(int(d) for d in dims.split(",") if d) * size / _GIB
    if (shape, where) not in seen or seen[shape, where]["gib"] < gib:
      seen[shape, where] = {"shape": shape, "op": op, "gib": gib, "memory": where}
  return sorted(seen.values(), key=lambda b: -b["gib"])[:n]


def _xla_seconds(compiled) -> float | None:
  """XLA's cost-model time of one run of `compiled`, or None when it has none or a negative one.

  On TPU each `ConcatBitcast` custom call enters the model as -1 s (seen with libtpu 0.0.42 on
  v5e); those are added back."""
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  secs = (cost or {}).get("optimal_seconds")
  if secs is None:
    return None
  secs = float(secs) + compiled.as_text().count('custom_call_target="ConcatBitcast"')
  return secs if secs > 0 else None


def estimate_seconds(config, devices) -> float | None:
  """XLA's cost-model time of one train step, or None when the cost model gives none.

  The cost model counts a loop's body once whatever its trip count, so the step of the real depth
  (a scan over the layers) is not costed directly: the same step is compiled with 0 and with 1
  layer (a one-trip scan is no loop), and the time is t0 + layers * (t1 - t0). The loss head's
  chunk loops (jaxft/step.py) stay counted once: an underestimate of the head's few percent."""
  times = []
  for layers in (0, 1):
    ab = build(config, devices, layers=layers)
    times.append(_xla_seconds(compile_step(ab)))
  if None in times or times[1] <= times[0]:
    return None
  layers = session.model_config(config).num_layers
  return times[0] + layers * (times[1] - times[0])


def _peak(device, config) -> float | None:
  per = config.train.peak_tflops
  return per * 1e12 if per > 0 else flops.peak_flops(device.device_kind)


def _state_parts(ab: Abstract) -> dict:
  """Bytes per chip of the frozen params, trainable params and optimizer state (from shapes)."""
  trainable = ab.state["trainable"]
  opt = {k: v for k, v in ab.state.items() if k != "trainable"}
  return {
      "frozen_params": per_chip_bytes(ab.frozen, ab.frozen_shardings),
      "trainable_params": per_chip_bytes(trainable, ab.state_shardings["trainable"]),
      "optimizer_state": per_chip_bytes(opt, {k: ab.state_shardings[k] for k in opt}),
  }


def report(config, ab: Abstract, compiled, secs: float | None) -> dict:
  """The plan's figures (per chip unless named otherwise) as a JSON-able dict; `secs` is the
  estimated step time (estimate_seconds) or None."""
  mem = compiled.memory_analysis()
  parts = dict(_state_parts(ab), temporaries=int(mem.temp_size_in_bytes))
  r = _figures(config, ab, parts, memory.program_bytes(compiled),
               largest_buffers(compiled.as_text()), secs)
  # what XLA placed in the host's memory (remat=offload's saved layer inputs), not in the chip's
  r["host_gib"] = getattr(mem, "host_temp_size_in_bytes", 0) / _GIB
  return r


def refused_report(config, ab: Abstract, message: str, needed: float, available: float) -> dict:
  """The plan of a step XLA refused to compile for memory: the parameter and optimizer figures
  (from shapes), the temporaries XLA said it needed, fits False, and `refused` (XLA's words).
  XLA lists no buffers then, so `largest_buffers` is empty."""
  parts = dict(_state_parts(ab), temporaries=int(needed))
  total = sum(parts.values())
  r = _figures(config, ab, parts, total, [], None)
  r["fits"] = False
  r["refused"] = {"temporaries_gib": needed / _GIB, "available_gib": available / _GIB,
                  "short_gib": (total - available) / _GIB,  # with the params and state
                  "message": message.strip().splitlines()[0][:500]}
  return r


def _figures(config, ab: Abstract, parts: dict, total: float, buffers: list,
             secs: float | None) -> dict:
  device = ab.mesh.devices.flat[0]
  chips = ab.mesh.size
  trainable = ab.state["trainable"]
  hbm = chip_memory_gib(device)
  T, rows = config.data.max_len, config.data.batch_size
  window = ab.cfg.sliding_window
  keys = flops.attended_keys(np.ones((1, T), np.int32), window) / T  # full rows, causal
  n_added = 0 if ab.method.trains_base else peft.count_params(trainable)
  step_flops = rows * T * flops.train_flops_per_token(ab.cfg, ab.method.trains_base, n_added, keys)
  peak = _peak(device, config)
  with target.building_for(device.platform):  # what the compiled step chose
    attention, remat = llama.attention_impl(ab.cfg, length=T), llama.remat_policy(ab.cfg)
  return timing({
      "topology": config_topology(ab), "chips": chips, "device_kind": device.device_kind,
      "mesh": {a: int(ab.mesh.shape[a]) for a in sharding.AXES if a in ab.mesh.shape},
      "model": {"layers": ab.cfg.num_layers, "hidden": ab.cfg.hidden_size},
      "method": ab.method.name, "quant": config.model.quant, "remat": remat,
      "mlp_tile": int(ab.cfg.mlp_tile), "attention": attention,
      "batch": rows, "accum": config.optim.accum_steps, "seq": T,
      "gib": {k: v / _GIB for k, v in parts.items()}, "total_gib": total / _GIB,
      "chip_gib": hbm, "fits": None if hbm is None else total / _GIB <= hbm,
      "largest_buffers": buffers,
      "flops_per_step": step_flops, "flops_per_chip": step_flops / chips,
      "attention_flops_per_step": rows * T * flops.attention_flops_per_token(ab.cfg, keys),
      "xla_step_seconds": secs,
      "peak_tflops": None if not peak else peak / 1e12,
  })


# Attention kernels that enter XLA's program as custom calls, which its cost model gives no time.
_KERNELS = ("splash", "cudnn")


def timing(r: dict) -> dict:
  """`r` with the step time, tokens/s per chip and MFU derived from its XLA seconds and FLOPs.

  XLA's cost model gives a custom call no time, so with an attention kernel (splash on TPU, cuDNN
  on GPU) the attention's FLOPs at the chip's peak are added: a lower bound on the kernel's time
  that barely moves 2,048-token rows and dominates 131,072-token ones. An MFU above 100% means the
  estimate is broken: then both read unknown (None)."""
  r = dict(r)
  secs, peak = r["xla_step_seconds"], r["peak_tflops"]
  if secs is not None and r["attention"] in _KERNELS:
    secs = None if not peak else secs + r["attention_flops_per_step"] / r["chips"] / (peak * 1e12)
  r["step_seconds"] = secs
  tok = None if secs is None else r["batch"] * r["seq"] / secs / r["chips"]
  mfu = None if tok is None or not peak else r["flops_per_step"] / secs / r["chips"] / (peak * 1e12)
  if mfu is not None and mfu > 1.0:
    tok = mfu = None
  r["tokens_per_sec_per_chip"], r["mfu"] = tok, mfu
  return r


def config_topology(ab: Abstract) -> str:
  d = ab.mesh.devices.flat[0]
  return f"{d.platform} x{ab.mesh.size}"


def knobs(r: dict) -> list[tuple[str, str, str]]:
  """What to turn when the plan does not fit: (knob, its value now, what to try), one row for each
  of batch, accum, remat, mesh and seq (try is '' where nothing is left to turn), then the chips."""
  mesh, rows = r["mesh"], r["batch"] // r["accum"]
  remat = ("--config.model.remat=offload (layer inputs in host memory)" if r["remat"] == "full"
           else "--config.model.remat=full (keep only each layer's input for the backward)"
           if r["remat"] != "offload" else "")
  accum = (f"--config.optim.accum_steps={2 * r['accum']} (same batch, half the rows at once)"
           if rows % 2 == 0 and rows // 2 >= mesh["data"] * mesh["fsdp"] else "")
  out = [
      ("batch", f"{r['batch']} rows", f"--config.data.batch_size={max(1, r['batch'] // 2)}"
       if r["batch"] > 1 else ""),
      ("accum", f"{r['accum']} micro-batches", accum),
      ("remat", r["remat"], remat),
      ("mesh", ", ".join(f"{a}={n}" for a, n in mesh.items()),
       "--config.mesh.fsdp=-1 --config.mesh.data=1 (shard every weight over all chips)"
       if mesh["fsdp"] < r["chips"] else ""),
      ("seq", f"{r['seq']} tokens", f"--config.data.max_len={r['seq'] // 2} (shorter rows)"),
  ]
  if r["quant"] == "none" and r["method"] != "full":
    out.append(("quant", "none", "--config.model.quant=nf4 (a 4-bit base: QLoRA)"))
  out.append(("chips", str(r["chips"]), "more chips (a larger --topology)"))
  return out


def knobs_table(r: dict) -> list[str]:
  """knobs(r) as aligned text lines."""
  rows = [("knob", "now", "try")] + knobs(r)
  w0, w1 = (max(len(row[i]) for row in rows) for i in (0, 1))
  return [f"    {k:<{w0}}  {now:<{w1}}  {try_ or '-'}" for k, now, try_ in rows]


def _fmt(x, spec="{:.2f}", none="unknown"):
  return none if x is None else spec.format(x)


def format_report(r: dict) -> str:
  """The plan as text for people."""
  g = r["gib"]
  mesh = ", ".join(f"{a}={n}" for a, n in r["mesh"].items())
  lines = [
      f"plan: {r['method']} (quant {r['quant']}), {r['model']['layers']} layers x "
      f"{r['model']['hidden']}, batch {r['batch']} x {r['seq']} (accum {r['accum']}), remat "
      f"{r['remat']}{', mlp_tile ' + str(r['mlp_tile']) if r.get('mlp_tile') else ''}, "
      f"attention {r['attention']}",
      f"      on {r['chips']} x {r['device_kind']} (mesh {mesh}); figures per chip, from XLA's "
      "compiler (not measured on hardware)",
      f"  frozen params     {g['frozen_params']:9.3f} GiB",
      f"  trainable params  {g['trainable_params']:9.3f} GiB",
      f"  optimizer state   {g['optimizer_state']:9.3f} GiB",
      f"  temporaries       {g['temporaries']:9.3f} GiB",
      f"  {'step total' if r.get('phases') else 'total':<18}"
      f"{r.get('step_total_gib', r['total_gib']):9.3f} GiB of {_fmt(r['chip_gib'], '{:.2f}')} GiB: "
      + {True: "fits", False: "DOES NOT FIT", None: "chip memory unknown"}[r.get("step_fits",
                                                                                 r["fits"])]
      + (f" (and {r['host_gib']:.3f} GiB in host memory)" if r.get("host_gib") else ""),
      "  largest buffers:  " + "; ".join(
          f"{b['shape']} {b['op']} {b['gib']:.2f} GiB"
          + (" (host memory)" if b.get("memory") == "host" else "")
          for b in r["largest_buffers"][:4]),
      f"  FLOPs per step    {r['flops_per_step']:.4g} (jaxft's model count, "
      f"{r['flops_per_chip']:.4g} per chip)",
      f"  XLA step time     {_fmt(r['xla_step_seconds'], '{:.3f} s')} (XLA's cost model, layers "
      "extrapolated from 0- and 1-layer compiles)",
      f"  step time         {_fmt(r['step_seconds'], '{:.3f} s')} (model estimate"
      + (f": XLA's time plus the {r['attention']} attention kernel's FLOPs at peak, which XLA's "
         "cost model does not time)" if r["attention"] in _KERNELS else ": XLA's time)"),
      f"  tokens/s per chip {_fmt(r['tokens_per_sec_per_chip'], '{:.0f}')} (model estimate)",
      f"  MFU               {_fmt(r['mfu'], '{:.1%}')} (model estimate)",
  ]
  if r.get("refused"):
    f = r["refused"]
    lines[6] = (f"  total             {r['total_gib']:9.3f} GiB or more: DOES NOT FIT (XLA refused the "
                f"program: its temporaries need {f['temporaries_gib']:.2f} GiB of the "
                f"{f['available_gib']:.2f} GiB it may use; with the parameters and optimizer "
                f"state at least {f['short_gib']:.2f} GiB short)")
    lines[7] = "  largest buffers:  unknown (XLA lists none for a program it refuses)"
  if r.get("mesh_choice"):
    lines.insert(2, f"  {r['mesh_choice']}")
  lines += run_phases.format_lines(r)
  if r.get("remat_note"):
    lines.insert(2, f"  {r['remat_note']}")
  if r["fits"] is False:
    lines.append("  to fit, turn one of:")
    lines += knobs_table(r)
  return "\n".join(lines)


def check_memory_gib(memory_gib: float) -> None:
  """--memory_gib: a finite number >= 0 (0: the chip's own); ConfigError naming the flag."""
  if not (math.isfinite(memory_gib) and memory_gib >= 0):
    raise ConfigError(f"--memory_gib={memory_gib}: must be a finite number of GiB > 0, or 0 for "
                      "the chip's own memory")


def announce(config, topology: str = "local", chips: int = 0, time: bool = True) -> str:
  """What `plan` is about to compile, for the console: the compiles take minutes for a real
  model on a CPU host, and a silent terminal reads as a hang."""
  model = config.model.path or f"the {config.model.preset} preset"
  where = "the local devices" if topology == "local" else f"TPU {topology} (deviceless, via libtpu)"
  if chips:
    where += f", its first {chips} chips"
  extra = (" and twice more at 0 and 1 layers for the time estimate (--notime skips them)" if time
           else "")
  return (f"jaxft.plan: compiling the train step of {model} ({config.peft.method}, batch "
          f"{config.data.batch_size} x {config.data.max_len} tokens) for {where}, once{extra}, "
          "then what the objective runs between steps, if anything; a real model takes minutes")


def plan(config, topology: str = "local", chips: int = 0, time: bool = True,
         memory_gib: float = 0.0) -> dict:
  """Builds, compiles and reports the train step of `config` on `topology`; see the module doc.
  time=False skips the two extra compiles of the time estimate (then reported unknown);
  memory_gib > 0 replaces the chip's memory (a chip the table does not know, or a share of one).
  Raises ConfigError for a bad topology, chip count or memory_gib."""
  check_memory_gib(memory_gib)  # (before libtpu loads)
  devices = topology_devices(topology, chips)
  config, choice = mesh_choice.resolve(config, devices, memory_gib or None)  # (mesh.fsdp=0)
  ab = build(config, devices)
  built = {None: (config, ab)}

  def measure_with(choice):
    if choice is not None:
      c = config.copy_and_resolve_references()
      chosen = trainer.with_choice(ab.cfg, choice)
      c.model.remat, c.model.mlp_tile = chosen.remat, chosen.mlp_tile
      built[choice] = (c, build(c, devices))
    return memory.measure(lambda: compile_step(built[choice][1]), devices[0])

  # model.remat=auto chooses as jaxft.train does (trainer.fitting_remat): the first of full, full
  # with the MLP tiled (long rows), offload, offload with the MLP tiled that fits
  row_tokens = ab.batch["inputs"].shape[-1] // max(int(ab.mesh.shape.get("context", 1)), 1)
  with target.building_for(devices[0].platform):
    policy, measured, note = trainer.fitting_remat(ab.cfg, measure_with, row_tokens)
  config, ab = built[policy if policy in built else None]
  if measured is None:  # an explicit policy, or auto on CPU: nothing was compiled yet
    measured = measure_with(None)
  if measured.refused is not None:
    r = refused_report(config, ab, measured.message, *measured.refused)
  else:
    secs = estimate_seconds(config, devices) if time else None
    r = report(config, ab, measured.compiled, secs)
  if note:
    r["remat_note"] = note
  if memory_gib > 0 and not r.get("refused"):
    r["chip_gib"], r["fits"] = memory_gib, r["total_gib"] <= memory_gib
  # what the objective runs between steps (GRPO's rollouts), measured the same way
  extra = run_phases.measure(config, ab, _state_parts(ab)["optimizer_state"], largest_buffers)
  if extra:
    r = run_phases.combine(r, extra)
  r["topology"] = topology if not chips else f"{topology} (first {chips} chips)"
  r["mesh_choice"] = choice.reason
  return r
