"""python -m jaxft.evaluate --config=configs/NAME.py --workdir=DIR [--max_new_tokens=N] [--nobase]
    [--label=NAME]

Evaluates the latest checkpoint of DIR on `data.eval` (and the base model alone) and writes
DIR/eval.json, DIR/samples.jsonl, DIR/eval_report.md and DIR/reliability.png (with --label=NAME:
eval_NAME.json, samples_NAME.jsonl, eval_report_NAME.md, so a second eval set keeps its own
files); see jaxft/eval/ (and the `eval.*` config keys for abstentions, the style rubric,
calibration and the bootstrap).
"""

from __future__ import annotations

import os

from absl import flags, logging
from ml_collections import config_flags

from jaxft import cli

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file (configs/NAME.py[:ARG]); default: the workdir's config.json.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "A training workdir.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 0,
                                "Most tokens per answer; 0 = the longest reference + 16.")
_BATCH = flags.DEFINE_integer("batch_size", 32, "Prompts decoded together.")
_MAX_EXAMPLES = flags.DEFINE_integer("max_examples", 0, "Answer only the first N references (0 = all).")
_LABEL = flags.DEFINE_string("label", "", "Names the output files (eval_LABEL.json, ...) of a "
                             "second eval set; empty = eval.json, samples.jsonl, eval_report.md.")
_BASE = flags.DEFINE_bool("base", True, "Also evaluate the base model alone (--nobase skips it).")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", "", "Where eval.json, samples.jsonl and the report "
                                  "go (default: the workdir).")


def _main(argv):
  del argv
  from jaxft import session
  from jaxft.eval import evaluate, output_names
  from jaxft.eval.evaluation import plot_path
  from jaxft.eval.report import console
  logging.set_verbosity(logging.WARNING)
  workdir = _WORKDIR.value
  config = _CONFIG.value or session.load_workdir_config(workdir)
  res = evaluate(config, workdir, max_new_tokens=_MAX_NEW.value, batch_size=_BATCH.value,
                 max_examples=_MAX_EXAMPLES.value, compare_base=_BASE.value,
                 output_dir=_OUTPUT_DIR.value, label=_LABEL.value)
  out_json, samples, report = output_names(_LABEL.value)
  out = _OUTPUT_DIR.value or workdir
  written = [os.path.join(out, out_json), samples, report]
  if "quality" in res:
    written.append(f"{os.path.basename(plot_path(out, _LABEL.value))} (accuracy against "
                   "confidence)")
  print("\n".join(console(res, written)), flush=True)


def main():
  flags.mark_flags_as_required(["workdir"])
  cli.run(_main)


if __name__ == "__main__":
  main()
