"""python -m jaxft.train --config=configs/NAME.py[:ARG] --workdir=DIR [--config.KEY=VALUE ...]"""

from __future__ import annotations

from absl import app, flags, logging
from ml_collections import config_flags

from jaxft import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/NAME.py[:ARG]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints and metrics go.")


def _main(argv):
  del argv
  from jaxft.trainer import train
  logging.set_verbosity(logging.INFO)
  result = train(_CONFIG.value, _WORKDIR.value)
  keys = ("step", "loss", "eval_loss")
  print("done: " + ", ".join(f"{k}={result[k]:.4g}" if isinstance(result[k], float) else
                             f"{k}={result[k]}" for k in keys if k in result), flush=True)


def main():
  flags.mark_flags_as_required(["config", "workdir"])
  cli.run(_main)


if __name__ == "__main__":
  main()
