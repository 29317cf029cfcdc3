"""python -m jaxft.data --config=configs/NAME.py[:ARG] [--rows=N] [--split=train|eval]
    [--color=auto|always|never] [--workdir=DIR] [--config.KEY=VALUE ...]

Shows the data before training: the first N rows of data.train (or data.eval) as the model sees
them, with the chat template applied, the token ids and the tokens that carry loss (in colour on a
terminal, else between « and »), then the counts of the whole file: rows, tokens, rows truncated
to data.max_len, rows with no target token. Same reading, tokenization and masking as training
(jaxft/data/show.py). The quickstart tokenizer is written into --workdir (default: a temporary
directory).
"""

from __future__ import annotations

import os
import sys
import tempfile

from absl import flags, logging
from ml_collections import config_flags

from jaxft import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/NAME.py[:ARG]).",
                                          lock_config=True)
_ROWS = flags.DEFINE_integer("rows", 3, "How many of the first rows to show (0: the counts only).")
_SPLIT = flags.DEFINE_enum("split", "train", ["train", "eval"], "data.train or data.eval.")
_COLOR = flags.DEFINE_enum("color", "auto", ["auto", "always", "never"],
                           "Mark the tokens that carry loss in colour (auto: when stdout is a "
                           "terminal and NO_COLOR is unset) or between « and ».")
_WORKDIR = flags.DEFINE_string("workdir", "", "A workdir whose tokenizer to use (the quickstart "
                               "tokenizer is written there); default: a temporary directory.")


def _main(argv):
  del argv
  from jaxft import objectives, session
  from jaxft.data import show
  logging.set_verbosity(logging.WARNING)
  config, n = _CONFIG.value, _ROWS.value
  color = _COLOR.value == "always" or (_COLOR.value == "auto" and sys.stdout.isatty()
                                        and "NO_COLOR" not in os.environ)
  objective = objectives.from_config(config, config.peft.method == "full")
  with tempfile.TemporaryDirectory() as scratch:
    encoder = session.encoder(config, _WORKDIR.value or scratch)
  # The objective reads its own rows (supervised rows, preference pairs): shown as it trains them.
  preview = objective.preview(config, encoder, session.model_config(config).vocab_size,
                              _SPLIT.value)
  shown = preview.rows(n)
  try:
    for line in show.format_rows(preview.path, shown, encoder, config.data.max_len, color):
      print(line, flush=True)
    print("\n".join(show.format_counts(preview.path, preview.counts(), config.data.max_len)),
          flush=True)
  except BrokenPipeError:  # `| head`: the reader has seen enough
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def main():
  flags.mark_flags_as_required(["config"])
  cli.run(_main)


if __name__ == "__main__":
  main()
