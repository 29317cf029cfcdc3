"""python -m jaxft.plan --config=configs/NAME.py[:ARG] [--topology=v5e:2x2|local] [--chips=N] [--json]
[--config.KEY=VALUE ...]

Compiles the train step of the config for a TPU topology (deviceless: no TPU needed, libtpu from
`pip install "jaxft[tpu]"`) or for the local devices, from abstract arrays (no weights read), and
prints per chip the memory, the largest buffers, FLOPs, XLA's cost-model time, tokens/s and MFU
(model estimates). Exit status 1 when it does not fit (the knobs to turn are printed), 2 for a bad
config."""

from __future__ import annotations

import json
import os
import sys

from absl import flags
from ml_collections import config_flags

from jaxft import cli, plan

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/NAME.py[:ARG]).",
                                          lock_config=True)
_TOPOLOGY = flags.DEFINE_string("topology", "local",
                                "'local' or a TPU topology name: v5e:2x2, v5p:2x2x1, v6e:8x8, ...")
_CHIPS = flags.DEFINE_integer("chips", 0, "Use only the first N chips of the topology (0: all).")
_TIME = flags.DEFINE_bool("time", True, "Estimate the step time (two more, shallow, compiles).")
_MEMORY = flags.DEFINE_float("memory_gib", 0.0, "Memory per chip in GiB (0: the chip's own).")
_JSON = flags.DEFINE_bool("json", False, "Print the plan as one JSON object.")


def _main(argv):
  del argv
  if _TOPOLOGY.value != "local":
    # Compiling for a topology loads libtpu (when the first device is asked for, so after this),
    # which locks a file in the temporary directory: let a second planner, or a test beside it,
    # load it too. No TPU is opened.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  plan.check_memory_gib(_MEMORY.value)  # before the notice below
  print(plan.announce(_CONFIG.value, _TOPOLOGY.value, _CHIPS.value, _TIME.value), file=sys.stderr,
        flush=True)
  r = plan.plan(_CONFIG.value, _TOPOLOGY.value, _CHIPS.value, _TIME.value,
                _MEMORY.value)
  print(json.dumps(r, indent=1) if _JSON.value else plan.format_report(r), flush=True)
  if r["fits"] is False:
    sys.exit(1)


def main():
  flags.mark_flags_as_required(["config"])
  cli.run(_main)


if __name__ == "__main__":
  main()
