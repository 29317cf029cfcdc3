"""Shared fixtures. Tests run on one CPU device; multi-device tests start subprocesses with
XLA_FLAGS=--xla_force_host_platform_device_count=8.

What is expensive is shared: one persistent JAX compilation cache for the whole session (every test,
every pytest worker and every `python -m jaxft...` subprocess a test starts: a tiny step compiled
once is loaded by the next run that builds the same program), and session- or module-scoped tiny
models and trained workdirs (the fixtures below)."""

import os
import sys
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# Set before jax is imported (by pytest's first process; its workers and subprocesses inherit it).
# A fresh directory per session, so a run's time does not depend on an earlier one's cache.
_OWN_CACHE = "JAXFT_TEST_SESSION" not in os.environ
if _OWN_CACHE:
  os.environ["JAXFT_TEST_SESSION"] = "1"
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jaxft-test-jit-")
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  # jaxft's own cache (the quickstart tokenizer.json, converted once instead of per workdir).
  os.environ["JAXFT_CACHE_DIR"] = tempfile.mkdtemp(prefix="jaxft-test-cache-")
  # A command re-executes itself once for huge-page malloc (jaxft.cli): a second Python start-up
  # (~1 s) per command that tiny models do not gain from; test_train_cli checks it with it on.
  os.environ.setdefault("JAXFT_HUGE_PAGES", "0")
  # Lowering attaches each operation's whole Python call stack to the program as its location
  # (debug metadata, no effect on the numbers); the innermost frame alone makes tracing and
  # lowering ~11% cheaper in CPU (tests/test_fast_paths.py alone: 88 -> 78 s of CPU).
  os.environ.setdefault("JAX_INCLUDE_FULL_TRACEBACKS_IN_LOCATIONS", "0")
  # Tiny programs compile ~40% faster with LLVM's lighter optimisation (no fast-math either way,
  # so the same numbers); a 20-step quickstart run measured ~15% shorter in all. Tests that set
  # XLA_FLAGS for a subprocess (forced device counts) replace these.
  os.environ["XLA_FLAGS"] = ("--xla_backend_optimization_level=1 "
                             "--xla_llvm_disable_expensive_passes=true " +
                             os.environ.get("XLA_FLAGS", "")).strip()
  # Where PYTHONDONTWRITEBYTECODE is set (some CI images set it), each of the suite's
  # Python subprocesses would compile jaxft's and the tests' sources again (~0.2 s of CPU each);
  # the session writes bytecode and removes the __pycache__ folders it made at the end.
  _NO_BYTECODE = bool(os.environ.pop("PYTHONDONTWRITEBYTECODE", None))
  if _NO_BYTECODE:
    sys.dont_write_bytecode = False


def _source_pycaches() -> set[str]:
  return {os.path.join(d, "__pycache__") for folder in ("jaxft", "tests", "configs")
          for d, subdirs, _ in os.walk(os.path.join(ROOT, folder)) if "__pycache__" in subdirs}


_PYCACHES_BEFORE = _source_pycaches() if _OWN_CACHE else set()


# Every GGUF read and write in the tests (transformers' `gguf_file=` loads, the helpers that copy
# and build files) goes through jaxft's bulk reader and writer (jaxft/models/gguf_bulk.py), as
# jaxft's own do: gguf.GGUFReader spends 2-3 s on each read of SmolLM2's vocabulary, and the
# suite reads it dozens of times. They give the same fields and the same bytes: test_gguf.py
# compares them with the originals, kept here as GGUF_READER and GGUF_WRITER.
try:
  import gguf as _gguf
  from jaxft.models import gguf_bulk as _gguf_bulk
  GGUF_READER, GGUF_WRITER = _gguf.GGUFReader, _gguf.GGUFWriter
  _gguf.GGUFReader = _gguf_bulk.reader_class(GGUF_READER)
  _gguf.GGUFWriter = _gguf_bulk.writer_class(GGUF_WRITER)
except ImportError:  # (the gguf tests skip)
  GGUF_READER = GGUF_WRITER = None


# The files that take longest (module fixtures, subprocess runs, TPU compiles, llama.cpp), longest
# first: the workers take files in this order (pyproject: --no-loadscope-reorder), so the long ones
# overlap and the short ones fill in at the end, instead of one worker running a long file alone
# while the other waits. Measured with `--durations=0`; the rest keep their collection order.
_LONG_FIRST = ("test_preference.py", "test_checkpoint.py", "test_gguf.py", "test_sharding.py",
               "test_peft_methods.py", "test_gguf_families.py", "test_plan.py", "test_families.py",
               "test_configs.py", "test_evaluate.py", "test_docs.py", "test_train_cli.py",
               "test_bad_inputs.py", "test_serve.py", "test_quant.py", "test_deploy.py",
               "test_fast_paths.py", "test_long_context.py", "test_moe.py", "test_generate.py",
               "test_base_kl.py", "test_grpo.py")


def pytest_collection_modifyitems(config, items):
  rank = {name: i for i, name in enumerate(_LONG_FIRST)}
  items.sort(key=lambda item: rank.get(os.path.basename(str(item.path)), len(rank)))


def pytest_unconfigure(config):
  if _OWN_CACHE:
    import shutil
    shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
    shutil.rmtree(os.environ["JAXFT_CACHE_DIR"], ignore_errors=True)
    if _NO_BYTECODE:
      for path in _source_pycaches() - _PYCACHES_BEFORE:
        shutil.rmtree(path, ignore_errors=True)


def forced_devices_flags(n: int = 8) -> str:
  """XLA_FLAGS for a subprocess with `n` forced CPU devices, keeping the suite's cheaper compile
  flags (above)."""
  return f"--xla_force_host_platform_device_count={n} {os.environ.get('XLA_FLAGS', '')}".strip()


@pytest.fixture(scope="session")
def root():
  return ROOT


@pytest.fixture(scope="session")
def quickstart_tokenizer(tmp_path_factory):
  """The Mistral v1 tokenizer the quickstart uses, as an HF tokenizer."""
  from jaxft.data.tokenize import load_tokenizer, write_quickstart_tokenizer
  return load_tokenizer(write_quickstart_tokenizer(str(tmp_path_factory.mktemp("tok"))))


def run_cli(module, *args, env=None, timeout=600, cwd=ROOT):
  """Runs `python -m module args` from the repo root (or `cwd`); returns the CompletedProcess."""
  import subprocess
  e = dict(os.environ, **(env or {}))
  return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=e, capture_output=True,
                        text=True, timeout=timeout)


def metric_rows(workdir, key="loss"):
  """{step: row[key]} of WORKDIR/metrics.jsonl's rows that have `key`."""
  import json
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  return {r["step"]: r[key] for r in rows if key in r}


def start_and_signal(args, workdir, at_step, sig, timeout=300):
  """Starts `python -m jaxft.train ARGS --workdir=WORKDIR` and sends `sig` once it has logged a
  loss at a step >= at_step; returns (exit status, stdout, stderr)."""
  import json
  import subprocess
  import time
  proc = subprocess.Popen([sys.executable, "-m", "jaxft.train", *args, f"--workdir={workdir}"],
                          cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  metrics = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + timeout
  while time.time() < deadline and proc.poll() is None:
    try:
      if os.path.exists(metrics) and any(s >= at_step for s in metric_rows(workdir)):
        proc.send_signal(sig)
        break
    except json.JSONDecodeError:  # a row being written
      pass
    time.sleep(0.02)
  out, err = proc.communicate(timeout=timeout)
  return proc.returncode, out, err


def set_keys(c, over: dict):
  """Sets dotted keys of ConfigDict `c` in place ({"peft.lora.rank": 4}); returns `c`."""
  for key, value in over.items():
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def make_config(name: str = "quickstart", arg: str | None = None, **over):
  """The one way tests make a config: the shipped configs/NAME.py (get_config(arg)), with dotted
  keys set from keyword arguments: make_config("base", **{"peft.lora.rank": 4})."""
  from jaxft import configlib
  return set_keys(configlib.load(name, arg), over)


def tiny_config(**over):
  """configs/quickstart.py on the tiny preset, quiet, logging every step; keyword arguments set
  dotted keys: tiny_config(**{"train.steps": 3, "peft.lora.rank": 4})."""
  c = make_config("quickstart", **{"model.preset": "tiny", "train.progress": False,
                                   "train.log_every": 1})
  return set_keys(c, over)
