"""The work a run does on its chips besides the train step (GRPO's rollouts), planned as the step.

An objective names that work (`Objective.plan_phases`: none for objectives trained on fixed data);
each phase's programs are compiled for the same devices as the step, deviceless for a TPU
topology, and measured per chip from XLA's memory analysis. A phase and the step run one after the
other, never at once, so the run's peak per chip is the larger of the two: the step's total, or a
phase's largest program plus what stays in memory while it runs and is not among its arguments
(the optimizer state; the frozen and trainable trees are its arguments, counted in its bytes).
"""

from __future__ import annotations

import jax

from jaxft import memory, target

_GIB = memory.GIB


def _placed(tree, shardings):
  """ShapeDtypeStructs of `tree` carrying `shardings` (what a phase's programs take)."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree,
                      shardings)


def _program(measured, buffers) -> dict:
  """One compiled (or refused) program's figures per chip, in GiB."""
  if measured.refused is not None:
    needed, available = measured.refused
    return {"gib": None, "temporaries_gib": needed / _GIB, "refused": {
        "temporaries_gib": needed / _GIB, "available_gib": available / _GIB,
        "message": measured.message.strip().splitlines()[0][:500]}, "largest_buffers": []}
  mem = measured.compiled.memory_analysis()
  return {"gib": measured.bytes / _GIB, "temporaries_gib": mem.temp_size_in_bytes / _GIB,
          "arguments_gib": mem.argument_size_in_bytes / _GIB,
          "largest_buffers": buffers(measured.compiled.as_text())[:3]}


def measure(config, ab, persisting: int, buffers) -> list[dict]:
  """The objective's phases of `ab` (a jaxft.plan Abstract) compiled and measured: one dict per
  phase with its programs' figures, its arithmetic figures (GiB), `persisting_gib` (the optimizer
  state, `persisting` bytes) and `total_gib` (largest program + persisting; None when XLA
  refused one). `buffers` lists a compiled program's largest buffers (jaxft.plan's)."""
  device = ab.mesh.devices.flat[0]
  frozen = _placed(ab.frozen, ab.frozen_shardings)
  trainable = _placed(ab.state["trainable"], ab.state_shardings["trainable"])
  with target.building_for(device.platform):
    phases = ab.objective.plan_phases(config, ab.cfg, ab.method, frozen, trainable, ab.mesh)
  out = []
  for phase in phases:
    programs = {}
    for name, lower in phase.programs.items():
      with target.building_for(device.platform):
        programs[name] = _program(memory.measure(lambda: lower().compile(), device), buffers)
    sizes = [p["gib"] for p in programs.values()]
    out.append({
        "name": phase.name, "describe": phase.describe, "programs": programs,
        "figures_gib": {k: v / _GIB for k, v in phase.figures.items()},
        "persisting_gib": persisting / _GIB,
        "total_gib": None if None in sizes else max(sizes) + persisting / _GIB})
  return out


def combine(r: dict, phases: list[dict]) -> dict:
  """The step's plan `r` with the phases: `step_total_gib` and `step_fits` keep the step's own
  figures, `total_gib` becomes the run's peak (the largest of the step and the phases) and `fits`
  holds only when every part fits its chip."""
  r = dict(r, phases=phases, step_total_gib=r["total_gib"], step_fits=r["fits"])
  chip = r["chip_gib"]
  for p in phases:
    p["fits"] = False if p["total_gib"] is None else (
        None if chip is None else p["total_gib"] <= chip)
  known = [p["total_gib"] for p in phases if p["total_gib"] is not None]
  r["total_gib"] = max([r["total_gib"]] + known)
  fits = [r["fits"]] + [p["fits"] for p in phases]
  r["fits"] = False if False in fits else None if None in fits else True
  return r


def format_lines(r: dict) -> list[str]:
  """The phases of the plan `r` as text lines (none without phases)."""
  lines = []
  for p in r.get("phases", []):
    lines.append(f"  {p['name']}: {p['describe']}; it and the train step run one after the other, "
                 "never at once")
    for name, prog in p["programs"].items():
      if prog.get("refused"):
        f = prog["refused"]
        lines.append(f"    {name:<16} DOES NOT FIT: XLA refused it, its temporaries needing "
                     f"{f['temporaries_gib']:.2f} GiB of the {f['available_gib']:.2f} GiB it may "
                     "use")
        continue
      top = "; ".join(f"{b['shape']} {b['op']} {b['gib']:.2f} GiB"
                      for b in prog["largest_buffers"][:2])
      lines.append(f"    {name:<16} {prog['gib']:9.3f} GiB (params and inputs "
                   f"{prog['arguments_gib']:.3f}, temporaries {prog['temporaries_gib']:.3f}; "
                   f"largest: {top})")
    for name, gib in p["figures_gib"].items():
      lines.append(f"    {name.replace('_', ' '):<16} {gib:9.3f} GiB (from its shape; within the "
                   "programs' figures above)")
    lines.append(f"    optimizer state  {p['persisting_gib']:9.3f} GiB (stays in memory while "
                 "it runs)")
    total = "unknown (a program was refused)" if p["total_gib"] is None else (
        f"{p['total_gib']:.3f} GiB")
    lines.append(f"    total            {total}: "
                 + {True: "fits", False: "DOES NOT FIT", None: "chip memory unknown"}[p["fits"]])
  if r.get("phases"):
    parts = ", ".join([f"train step {r['step_total_gib']:.3f}"] + [
        f"{p['name']} {_fmt(p['total_gib'])}" for p in r["phases"]])
    chip = "unknown" if r["chip_gib"] is None else f"{r['chip_gib']:.2f}"
    lines.append(f"  peak per chip     {r['total_gib']:9.3f} GiB of {chip} GiB (the largest of "
                 f"{parts}): " + {True: "fits", False: "DOES NOT FIT",
                                  None: "chip memory unknown"}[r["fits"]])
  return lines


def _fmt(gib):
  return "unknown" if gib is None else f"{gib:.3f}"
