"""Several processes (hosts) as one JAX program: `initialize` joins them before any device is used.

Where the settings come from, first match wins:
  --coordinator / --num_processes / --process_id flags, else JAXFT_COORDINATOR /
  JAXFT_NUM_PROCESSES / JAXFT_PROCESS_ID in the environment: an explicit cluster;
  SLURM (inside `srun`, more than one task) and Cloud TPU VMs: detected by JAX itself;
  nothing: one process (the default, and what a single GPU host or a laptop needs).
--distributed=on|off|auto (or JAXFT_DISTRIBUTED) forces the choice.

On CPU the processes exchange tensors with gloo, so N processes on one machine run the same
collectives as N hosts (launch/local.sh).
"""

from __future__ import annotations

import glob
import importlib.util
import os

from absl import flags, logging

from jaxft.errors import ConfigError

MODES = ("auto", "on", "off")

_MODE = flags.DEFINE_enum("distributed", None, MODES,
                          "Join several processes with jax.distributed: auto (when a coordinator "
                          "is given, under SLURM with several tasks, on a Cloud TPU VM), on, off. "
                          "Default: $JAXFT_DISTRIBUTED or auto.")
_COORDINATOR = flags.DEFINE_string("coordinator", None,
                                   "host:port of process 0 (default $JAXFT_COORDINATOR).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None,
                                      "How many processes in all (default $JAXFT_NUM_PROCESSES).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None,
                                   "This process's index, 0-based (default $JAXFT_PROCESS_ID).")


def _env_int(name: str) -> int | None:
  value = os.environ.get(name, "").strip()
  if not value:
    return None
  try:
    return int(value)
  except ValueError:
    raise ConfigError(f"${name}={value!r}: expected an integer") from None


def under_slurm() -> bool:
  """True inside an `srun` job step with more than one task."""
  if "SLURM_JOB_ID" not in os.environ or "SLURM_STEP_NODELIST" not in os.environ:
    return False
  try:
    return int(os.environ.get("SLURM_NTASKS", "1")) > 1
  except ValueError:
    return False


def on_cloud_tpu_vm() -> bool:
  """True on a Cloud TPU VM with libtpu installed (TPU chips visible to this host)."""
  chips = glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*")
  return bool(chips) and importlib.util.find_spec("libtpu") is not None


def initialize(mode: str | None = None, coordinator: str | None = None,
               num_processes: int | None = None, process_id: int | None = None) -> bool:
  """Calls `jax.distributed.initialize` when the settings ask for several processes.

  Arguments left None come from JAXFT_* environment variables. Must run before JAX touches a
  device. Returns True when this process joined a multi-process run. Raises ConfigError for
  inconsistent settings or when the coordinator cannot be reached.
  """
  mode = mode or os.environ.get("JAXFT_DISTRIBUTED", "").strip() or "auto"
  if mode not in MODES:
    raise ConfigError(f"--distributed / $JAXFT_DISTRIBUTED={mode!r}: expected one of {', '.join(MODES)}")
  coordinator = coordinator or os.environ.get("JAXFT_COORDINATOR", "").strip() or None
  num_processes = num_processes if num_processes is not None else _env_int("JAXFT_NUM_PROCESSES")
  process_id = process_id if process_id is not None else _env_int("JAXFT_PROCESS_ID")
  explicit = coordinator is not None or num_processes is not None or process_id is not None
  if mode == "off":
    return False
  if mode == "auto" and not (explicit or under_slurm() or on_cloud_tpu_vm()):
    return False
  if explicit and not (under_slurm() or on_cloud_tpu_vm()):
    missing = [n for n, v in (("--coordinator", coordinator), ("--num_processes", num_processes),
                              ("--process_id", process_id)) if v is None]
    if missing:
      raise ConfigError(f"distributed run: {', '.join(missing)} not set (flags or JAXFT_COORDINATOR,"
                        " JAXFT_NUM_PROCESSES, JAXFT_PROCESS_ID); all three are needed outside "
                        "SLURM and TPU VMs")
  if num_processes is not None and num_processes < 1:
    raise ConfigError(f"--num_processes={num_processes}: must be >= 1")
  if process_id is not None and num_processes is not None and not 0 <= process_id < num_processes:
    raise ConfigError(f"--process_id={process_id}: must be in [0, {num_processes})")

  import jax
  # CPU devices of different processes talk through gloo (a no-op setting on GPU and TPU).
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  kwargs = {k: v for k, v in (("coordinator_address", coordinator), ("num_processes", num_processes),
                              ("process_id", process_id)) if v is not None}
  try:
    jax.distributed.initialize(**kwargs)
  except (ValueError, RuntimeError) as e:
    raise ConfigError(f"jax.distributed.initialize({', '.join(f'{k}={v}' for k, v in kwargs.items())})"
                      f" failed: {e}") from None
  logging.info("process %d of %d; %d local devices of %d", jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count())
  return True


def initialize_from_flags() -> bool:
  """`initialize` with the --distributed, --coordinator, --num_processes, --process_id flags (an
  entry point calls this first thing in its main)."""
  return initialize(_MODE.value, _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
