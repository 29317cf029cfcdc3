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

from jaxft import cli, decode, files
from jaxft.errors import ConfigError, DataError
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
  _check_options()
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
    model = "base" if _BASE.value else f"step {decoder.step}"
    files.write_lines(_OUTPUT.value, [json.dumps(dict(r, model=model)) + "\n" for r in results])
  if len(results) == 1:
    print(results[0]["answer"], flush=True)
    return
  for i, r in enumerate(results, 1):
    print(f"[{i}] {r['prompt']}\n=> {r['answer']}\n", flush=True)


def _check_options() -> None:
  """The options' values, before any weights load (ConfigError names the flag)."""
  if _MAX_NEW.value < 1:
    raise ConfigError(f"--max_new_tokens={_MAX_NEW.value}: must be >= 1")
  if _BATCH.value < 1:
    raise ConfigError(f"--batch_size={_BATCH.value}: must be >= 1")
  if not 0 <= _SEED.value < 2**63:  # jax.random.key takes a 64-bit seed; say so before loading
    raise ConfigError(f"--seed={_SEED.value}: must be in [0, 2**63)")
  if any(not s for s in _STOP.value):
    raise ConfigError("--stop: an empty stop string would end every answer at once; drop it")
  if _OUTPUT.value:
    parent = os.path.dirname(os.path.abspath(_OUTPUT.value))
    if os.path.isdir(_OUTPUT.value):
      raise ConfigError(f"--output={_OUTPUT.value}: is a directory; expected a file name")
    if not os.path.isdir(parent):
      raise ConfigError(f"--output={_OUTPUT.value}: the directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
      raise ConfigError(f"--output={_OUTPUT.value}: the directory {parent} is not writable")


def main():
  flags.mark_flags_as_required(["workdir"])
  cli.run(_main)


if __name__ == "__main__":
  main()
