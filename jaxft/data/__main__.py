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
  from jaxft import session
  from jaxft.data import show
  logging.set_verbosity(logging.WARNING)
  config, split = _CONFIG.value, _SPLIT.value
  color = _COLOR.value == "always" or (_COLOR.value == "auto" and sys.stdout.isatty()
                                        and "NO_COLOR" not in os.environ)
  path = show.spec(config, split)  # (bad keys fail before the tokenizer is loaded)
  with tempfile.TemporaryDirectory() as scratch:
    encoder = session.encoder(config, _WORKDIR.value or scratch)
  vocab = session.model_config(config).vocab_size
  rows = show.first_rows(config, encoder, vocab, _ROWS.value, split)
  if rows:
    first = "the first row" if len(rows) == 1 else f"the first {len(rows)} rows"
    print(f"{path}: {first} as training sees {'it' if len(rows) == 1 else 'them'} "
          f"({show.legend(color)})\n", flush=True)
  for i, shown in enumerate(rows, 1):
    print("\n".join(show.format_row(i, shown, encoder, config.data.max_len, color)) + "\n",
          flush=True)
  ds = show.counts(config, encoder, vocab, split)
  print("\n".join(show.format_counts(path, ds, config.data.max_len)), flush=True)


def main():
  flags.mark_flags_as_required(["config"])
  cli.run(_main)


if __name__ == "__main__":
  main()
