"""python -m jaxft.serve --workdir=W [--adapter NAME=W2 ...] [--host=127.0.0.1 --port=8000]

An OpenAI-compatible server for a trained workdir (FastAPI + uvicorn; `pip install 'jaxft[serve]'`):
`GET /v1/models`, `POST /v1/completions`, `POST /v1/chat/completions` (with `stream: true`),
`GET /health`. Model names: the workdir's directory name for the tuned model, `base` for the base
alone, and NAME for each `--adapter NAME=WORKDIR` (trained on the same base). Each model decodes
its concurrent requests together (jaxft/serving/engine.py: continuous batching over `--slots` KV
cache rows). SIGTERM lets in-flight requests finish, then exits. See docs/serve.md.
"""


import os

from absl import flags, logging

from jaxft import cli
from jaxft.errors import ConfigError
from jaxft.eval.votes import VOTES
from jaxft.serving import compare
from jaxft.serving.server import SERVER_OPTIONS, eval_prompts, load_models, make_app

_WORKDIR = flags.DEFINE_string("workdir", None, "A training workdir (its newest intact checkpoint).")
_ADAPTER = flags.DEFINE_multi_string("adapter", [], "NAME=WORKDIR: another run on the same base.")
_HOST = flags.DEFINE_string("host", "127.0.0.1", "Address to listen on.")
_PORT = flags.DEFINE_integer("port", 8000, "Port to listen on.")
_SLOTS = flags.DEFINE_integer("slots", 8, "Requests decoded together per model (KV-cache rows).")
_MAX_QUEUE = flags.DEFINE_integer("max_queue", 256, "Choices (prompts x n) waiting beyond the "
                                  "slots before new requests get 429.")
_MAX_REQUEST_MB = flags.DEFINE_float("max_request_mb", 4.0, "Largest request body, in MiB; a "
                                     "larger one gets 413 before it is read.")
_CONTEXT = flags.DEFINE_integer("context", 0, "Tokens per request, prompt and answer (0 = the "
                                "model's, at most 4096).")
_BASE = flags.DEFINE_bool("base", True, "Also serve the base model alone as `base`.")
_VOTES = flags.DEFINE_string("votes", "", "Where /compare appends votes (default "
                             "WORKDIR/votes.jsonl; jaxft.evaluate reports the win rate).")


def _parse_adapters(values) -> dict[str, str]:
  out = {}
  for v in values:
    name, sep, wd = v.partition("=")
    if not sep or not name or not wd:
      raise ConfigError(f"--adapter={v!r}: expected NAME=WORKDIR")
    if name in out or name == "base":
      raise ConfigError(f"--adapter={v!r}: the name {name!r} is taken")
    out[name] = wd
  return out


def _main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  if _SLOTS.value < 1 or _MAX_QUEUE.value < 0 or _CONTEXT.value < 0:
    raise ConfigError("--slots must be >= 1, --max_queue and --context >= 0")
  if not 0 < _MAX_REQUEST_MB.value < float("inf"):
    raise ConfigError(f"--max_request_mb={_MAX_REQUEST_MB.value}: expected a size in MiB > 0")
  try:
    import fastapi  # noqa: F401
    import uvicorn
  except ImportError:
    raise ConfigError("serving needs FastAPI and uvicorn: pip install 'jaxft[serve]'") from None
  adapters = _parse_adapters(_ADAPTER.value)
  models = load_models(_WORKDIR.value, adapters, with_base=_BASE.value, slots=_SLOTS.value,
                       context=_CONTEXT.value)
  ballots = compare.Ballots(_VOTES.value or os.path.join(_WORKDIR.value, VOTES))
  print(f"serving {', '.join(models)} on http://{_HOST.value}:{_PORT.value}/v1 (blind "
        f"comparison: http://{_HOST.value}:{_PORT.value}/compare)", flush=True)
  uvicorn.run(make_app(models, _MAX_QUEUE.value, ballots, eval_prompts(_WORKDIR.value),
                       max_body=int(_MAX_REQUEST_MB.value * 2**20)),
              host=_HOST.value, port=_PORT.value, **SERVER_OPTIONS)


def main():
  flags.mark_flags_as_required(["workdir"])
  cli.run(_main)


if __name__ == "__main__":
  main()
