"""Does a compiled program fit its chip: the chip's memory, XLA's own out-of-memory refusals, and
the bytes per chip of a compiled step (what `jaxft.plan` reports and what model.remat=auto checks
before training on an accelerator)."""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Callable

import jax

from jaxft.errors import ConfigError

GIB = 2.0 ** 30

# Memory per chip (GiB) by device kind, matched as substrings in order (TPU topology devices do not
# report their memory; local accelerators do, through memory_stats). TPUs: the HBM XLA itself may
# use, as its compiler states when it refuses a program ("exceeds available HBM (15.75G)", libtpu
# 0.0.42, deviceless): the chip's HBM less what the runtime reserves (v5e 16 -> 15.75, v6e 32 ->
# 31.25; v5p 95.74; v4 15.25 per device). GPUs: the total nvidia-smi reports.
HBM_GIB = (("TPU v6 lite", 31.25), ("TPU v6e", 31.25), ("TPU v5 lite", 15.75), ("TPU v5e", 15.75),
           ("TPU v5p", 95.74), ("TPU v5", 95.74), ("TPU v4", 15.25), ("H200", 140.4),
           ("H100", 79.6), ("A100", 80.0), ("L4", 22.5))


def chip_memory_gib(device) -> float | None:
  """The memory of one chip: the device's own report when it has one, else the table."""
  try:
    stats = device.memory_stats() or {}
    if stats.get("bytes_limit"):
      return stats["bytes_limit"] / GIB
  except Exception:  # deviceless topology devices and CPUs report nothing
    pass
  if device.platform == "cpu":  # the host's memory, shared by its CPU devices
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return total / GIB / max(1, len(jax.local_devices(backend="cpu")))
  for name, gib in HBM_GIB:
    if name.lower() in device.device_kind.lower():
      return gib
  return None


# XLA's TPU compiler refusing a program for memory, e.g. "RESOURCE_EXHAUSTED: Ran out of memory in
# memory space hbm. ... the total memory required for HLO temporaries (17.01G) exceeds available
# HBM (15.75G)." Its sizes are in GiB (15.75G is v5e's 16 GiB less what the runtime reserves).
_REFUSED = re.compile(r"required for (?:HLO )?temporaries \(([\d.]+)([KMGT])i?B?\) exceeds "
                      r"available \w+ \(([\d.]+)([KMGT])i?B?\)")
_UNIT = {"K": 2.0 ** 10, "M": 2.0 ** 20, "G": 2.0 ** 30, "T": 2.0 ** 40}


def refused_for_memory(message: str) -> tuple[float, float] | None:
  """(bytes of temporaries required, bytes available) from XLA's out-of-memory refusal, or None
  when `message` is not one (or does not give those sizes)."""
  if "RESOURCE_EXHAUSTED" not in message:
    return None
  m = _REFUSED.search(message)
  if m is None:
    return None
  return float(m.group(1)) * _UNIT[m.group(2)], float(m.group(3)) * _UNIT[m.group(4)]


def program_bytes(compiled) -> int:
  """Bytes one chip holds while `compiled` runs: arguments, outputs not aliased to them,
  temporaries and code (XLA's memory_analysis)."""
  mem = compiled.memory_analysis()
  return int(mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
             + mem.temp_size_in_bytes + mem.generated_code_size_in_bytes)


@dataclasses.dataclass(frozen=True)
class Measured:
  """A step compiled for a chip, or XLA's refusal of it for memory."""
  compiled: Any  # None when refused
  bytes: int | None  # program_bytes, None when refused
  refused: tuple[float, float] | None  # refused_for_memory's sizes
  message: str  # XLA's refusal, '' when it compiled
  chip_gib: float | None

  @property
  def fits(self) -> bool | None:
    if self.refused is not None:
      return False
    return None if self.chip_gib is None else self.bytes / GIB <= self.chip_gib

  def describe(self) -> str:
    if self.refused is not None:
      return (f"XLA refused it, its temporaries alone needing {self.refused[0] / GIB:.2f} GiB of "
              f"the {self.refused[1] / GIB:.2f} it may use")
    return f"{self.bytes / GIB:.2f} GiB per chip of {self.chip_gib:.2f}"


def measure(compile_fn: Callable[[], Any], device) -> Measured:
  """Runs `compile_fn` (a lowered step's .compile()) and measures the result on `device`'s chip;
  an XLA refusal for memory comes back as a Measured that does not fit, other errors propagate."""
  chip = chip_memory_gib(device)
  try:
    compiled = compile_fn()
  except jax.errors.JaxRuntimeError as e:
    sizes = refused_for_memory(str(e))
    if sizes is None:
      if "RESOURCE_EXHAUSTED" in str(e):  # another limit than HBM, e.g. a kernel's scratch memory
        raise ConfigError(_limit_message(str(e))) from None
      raise
    return Measured(None, None, sizes, str(e), chip)
  return Measured(compiled, program_bytes(compiled), None, "", chip)


def _limit_message(message: str) -> str:
  """A compile refused for a limit other than the chip's HBM, in words: XLA's first line, and for
  the splash attention kernel what to turn."""
  first = message.strip().splitlines()[0][:400]
  text = f"XLA cannot compile this step: {first}"
  if "splash" in message and "smem" in message.lower():
    text += (" (the splash attention kernel keeps per-block data of the whole sequence, such as "
             "the segment ids, in the chip's scalar memory (SMEM), which this sequence length "
             "exceeds: try a shorter --config.data.max_len)")
  return text
