"""python -m jaxft.train --config=configs/NAME.py[:ARG] --workdir=DIR [--config.KEY=VALUE ...]

Several hosts: run the same command on each (see launch/README.md); --coordinator, --num_processes
and --process_id (or JAXFT_* variables) join them, SLURM and Cloud TPU VMs are detected."""

from __future__ import annotations

import os

from absl import flags, logging
from ml_collections import config_flags

from jaxft import cli, distributed

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/NAME.py[:ARG]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints and metrics go.")


def _main(argv):
  del argv
  logging.set_verbosity(logging.INFO)
  logging.info("host malloc: %s", "huge pages" if cli.HUGE_PAGES_TUNABLE in os.environ.get(
      "GLIBC_TUNABLES", "") else "4 KiB pages (JAXFT_HUGE_PAGES=0, or not available here)")
  distributed.initialize_from_flags()  # before anything touches a device
  from jaxft.trainer import summary, train
  result = train(_CONFIG.value, _WORKDIR.value)
  print(summary(result, _CONFIG.value, _WORKDIR.value), flush=True)


def main():
  flags.mark_flags_as_required(["config", "workdir"])
  cli.run(_main)


if __name__ == "__main__":
  main()
