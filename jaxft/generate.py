"""python -m jaxft.generate --config=configs/NAME.py --workdir=DIR --prompt="..." [--prompt=...]
                          [--prompts_file=FILE] [--base] [--temperature=0.7 --top_p=0.9 ...]

Decodes prompts with the trained model of DIR (its latest checkpoint), or with the base model alone
(`--base`). Prompts go through the chat template as a user turn unless `--raw`. A prompts file holds
one prompt per line, or JSONL rows: a JSON string, {"prompt": ...}, {"messages": [...]} (the
conversation so far) or {"instruction", "input"} (alpaca).

The work happens in jaxft/inference.py (prompts, the decoder of a workdir) and jaxft/decode.py.
"""

from __future__ import annotations

import json
import os

from absl import flags, logging
from ml_collections import config_flags

from jaxft import cli, decode
from jaxft.errors import DataError
from jaxft.inference import (Prompt, answer, check_lengths, load_decoder, read_prompts,
                             require_checkpoint)

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file (configs/NAME.py[:ARG]); default: the workdir's config.json.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "A training workdir.")
_PROMPT = flags.DEFINE_multi_string("prompt", [], "A prompt (repeat for several).")
_PROMPTS_FILE = flags.DEFINE_string("prompts_file", "", "Text file (one prompt per line) or JSONL.")
_BASE = flags.DEFINE_bool("base", False, "Decode with the base model alone (no fine-tuning).")
_RAW = flags.DEFINE_bool("raw", False, "Feed prompts as plain text, without the chat template.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 128, "Most tokens to generate per prompt.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0 = greedy; > 0 samples.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Sample among the k most likely tokens (0 = off).")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass (1 = off).")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed (same seed, same samples).")
_STOP = flags.DEFINE_multi_string("stop", [], "Stop string (repeat for several).")
_BATCH = flags.DEFINE_integer("batch_size", 16, "Prompts decoded together.")
_OUTPUT = flags.DEFINE_string("output", "", "Also write prompts and answers to this JSONL file.")


def _main(argv):
  del argv
  from jaxft import session
  logging.set_verbosity(logging.WARNING)
  workdir = _WORKDIR.value
  config = _CONFIG.value or session.load_workdir_config(workdir)
  raw = _RAW.value
  prompts = [Prompt(f"--prompt {i + 1}", text=t) if raw else
             Prompt(f"--prompt {i + 1}", [{"role": "user", "content": t}])
             for i, t in enumerate(_PROMPT.value)]
  if _PROMPTS_FILE.value:
    prompts += read_prompts(_PROMPTS_FILE.value, raw)
  if not prompts:
    raise DataError("no prompts: pass --prompt=TEXT (repeatable) or --prompts_file=FILE")
  sampling = decode.Sampling(_TEMPERATURE.value, _TOP_K.value, _TOP_P.value)
  if not _BASE.value:
    require_checkpoint(workdir)
  encoder = session.encoder(config, workdir)
  check_lengths(config, encoder, prompts)
  decoder = load_decoder(config, workdir, _BASE.value)
  results = answer(decoder, encoder, prompts, max_new_tokens=_MAX_NEW.value, sampling=sampling,
                seed=_SEED.value, stop=_STOP.value, batch_size=_BATCH.value)
  if _OUTPUT.value:
    tmp = f"{_OUTPUT.value}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
      for r in results:
        f.write(json.dumps(dict(r, model="base" if _BASE.value else f"step {decoder.step}")) + "\n")
    os.replace(tmp, _OUTPUT.value)
  if len(results) == 1:
    print(results[0]["answer"], flush=True)
    return
  for i, r in enumerate(results, 1):
    print(f"[{i}] {r['prompt']}\n=> {r['answer']}\n", flush=True)


def main():
  flags.mark_flags_as_required(["workdir"])
  cli.run(_main)


if __name__ == "__main__":
  main()
