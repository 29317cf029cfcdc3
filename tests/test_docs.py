"""The quickstart commands of README.md and docs/*.md, taken from the Markdown itself and run, so
a doc that drifts from the code fails the suite.

The shell blocks (```bash, ```sh, ```shell or unlabelled) are read, backslash continuations
joined, `&&` chains split and `# comments` dropped; every `python -m jaxft.NAME` command that works
on the quickstart (it names `workdirs/quickstart` or `configs/quickstart.py`) is kept, once, in
document order: README.md first (its train command makes the workdir the others read), then
docs/*.md by name. Synopsis lines (`...` or `[optional]` brackets) are not commands and are
skipped. They run in one temporary directory, with only overrides that shorten them appended
(`_SHORTER`): 3 training steps, a few evaluation rows. The README's Serve block runs too: the
server from its own command, then the block's curl and openai lines against it (tests/test_serve.py
checks the answers themselves).

The slow test took 157-170 s on 2 CPU cores shared with other jobs (load average 3-5; about 140 s
of CPU time), with a fresh compilation cache: 11 commands of about 6 s start-up each, the 3-step
training 28 s, the DPO run 22 s, the server and its two clients 17 s. (Since then README's
`python -m jaxft.data` runs too: ~7 s alone.)
"""

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest

from conftest import ROOT, make_config, run_cli

DOCS = ["README.md"] + sorted(os.path.join("docs", f) for f in os.listdir(os.path.join(ROOT, "docs"))
                              if f.endswith(".md"))
_SHELL = {"", "bash", "sh", "shell", "console"}
_FENCE = re.compile(r"^```(\S*)\s*$")
_QUICKSTART = ("workdirs/quickstart", "configs/quickstart.py")
# Appended to a command (never edited into it): what makes the documented run short enough for
# the suite. The commands' own flags and paths are the doc's.
_SHORTER = {
    "jaxft.train": ["--config.train.steps=3", "--config.train.eval_every=0",
                    "--config.train.eval_batches=1", "--config.train.progress=False"],
    "jaxft.evaluate": ["--max_examples=4", "--config.eval.bootstrap=100"],
    "jaxft.generate": ["--max_new_tokens=8"],
    "jaxft.export": [],
    "jaxft.serve": [],
    "jaxft.data": [],
}
_DOC_PORT = "8000"


def shell_blocks(path: str) -> list[str]:
  """The text of each shell code block of the Markdown file `path` (relative to the repo)."""
  blocks, current, lang = [], None, None
  with open(os.path.join(ROOT, path), encoding="utf-8") as f:
    for line in f:
      m = _FENCE.match(line.strip())
      if current is None and m:
        current, lang = [], m.group(1).lower()
      elif current is not None and line.strip() == "```":
        if lang in _SHELL:
          blocks.append("".join(current))
        current = None
      elif current is not None:
        current.append(line)
  return blocks


def _split(line: str) -> list[str]:
  """`line` cut at `&&` and at a `#` comment, both outside quotes."""
  parts, word, quote, i = [], [], None, 0
  while i < len(line):
    ch = line[i]
    if quote:
      quote = None if ch == quote else quote
    elif ch in "'\"":
      quote = ch
    elif ch == "#" and (i == 0 or line[i - 1].isspace()):
      break
    elif line.startswith("&&", i):
      parts.append("".join(word))
      word, i = [], i + 2
      continue
    word.append(ch)
    i += 1
  parts.append("".join(word))
  return [p.strip() for p in parts if p.strip()]


def block_commands(block: str) -> list[str]:
  """The commands of a shell block: continuations joined, chains split, comments dropped."""
  joined = re.sub(r"\\\n", " ", block)
  return [c for line in joined.splitlines() for c in _split(line)]


def quickstart_commands() -> list[tuple[str, int, str]]:
  """(doc, block number, command) of every documented `python -m jaxft.NAME` quickstart command,
  in document order, each distinct command (as argv) once."""
  seen, out = set(), []
  for doc in DOCS:
    for b, block in enumerate(shell_blocks(doc)):
      for cmd in block_commands(block):
        if not cmd.startswith("python -m jaxft.") or not any(q in cmd for q in _QUICKSTART):
          continue
        # A synopsis (`jaxft.generate ... --base`, `[--adapter NAME=WORKDIR]`) shows the
        # options, not a command to run.
        if "..." in cmd or "[" in cmd:
          continue
        argv = tuple(shlex.split(cmd))
        if argv not in seen:
          seen.add(argv)
          out.append((doc, b, cmd))
  return out


def _flag(argv, name):
  """The value of --name=VALUE in argv (None if absent)."""
  vals = [a.split("=", 1)[1] for a in argv if a.startswith(f"--{name}=")]
  return vals[-1] if vals else None


def test_the_documented_quickstart_commands_are_found():
  """The extraction sees what the docs promise; an edit that hides a command from it (a new fence
  language, a reworded path) fails here, not silently in the slow run."""
  found = [(doc, cmd) for doc, _, cmd in quickstart_commands()]
  modules = [shlex.split(cmd)[2] for _, cmd in found]
  assert modules[0] == "jaxft.train" and found[0][0] == "README.md"
  assert set(modules) <= set(_SHORTER), modules  # each has its overrides and its checks below
  outs = {_flag(shlex.split(cmd), "out") for _, cmd in found}
  assert {"exported/merged", "exported/base", "exported/adapter", "exported/model.gguf",
          "exported/quickstart-peft"} <= outs, outs
  docs = {(doc, m) for (doc, _), m in zip(found, modules)}
  assert {("README.md", "jaxft.evaluate"), ("README.md", "jaxft.generate"),
          ("README.md", "jaxft.export"), ("README.md", "jaxft.serve"), ("README.md", "jaxft.data"),
          ("docs/preference.md", "jaxft.train"), ("docs/preference.md", "jaxft.generate")} <= docs
  # The DPO quickstart reads the adapter where docs/preference.md exports it.
  dpo = make_config("quickstart", "objective=dpo")
  assert dpo.peft.init_from in {_flag(shlex.split(c), "out") for d, c in found
                                if d == "docs/preference.md"}
  # Continuations, chains and comments: the README's first block ends in the train command.
  assert block_commands(shell_blocks("README.md")[0])[3] == (
      "python -m jaxft.train --config=configs/quickstart.py --workdir=workdirs/quickstart")


def test_the_dpo_quickstart_before_its_export_says_what_to_run(tmp_path, monkeypatch):
  """Run before the SFT adapter is exported, the DPO quickstart names the command that writes it
  (the one docs/preference.md shows), before its workdir is made."""
  from jaxft import trainer
  from jaxft.errors import CheckpointError
  monkeypatch.chdir(tmp_path)
  config = make_config("quickstart", "objective=dpo")
  with pytest.raises(CheckpointError, match="does not exist") as e:
    trainer.train(config, "workdirs/quickstart-dpo")
  assert not os.path.exists("workdirs")
  documented = [c for d, _, c in quickstart_commands()
                if d == "docs/preference.md" and "--format=peft" in c]
  assert documented and f"--out={config.peft.init_from}" in documented[0]
  assert f"--format=peft --out={config.peft.init_from}" in str(e.value)


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _check(module, argv, cwd, r):
  """The output each command promises."""
  where = lambda flag: os.path.join(cwd, _flag(argv, flag))
  if module == "jaxft.train":
    assert os.path.isfile(os.path.join(where("workdir"), "config.json"))
    assert os.listdir(os.path.join(where("workdir"), "checkpoints"))
    assert "done: step=3" in r.stdout + r.stderr
    if "objective=dpo" in _flag(argv, "config"):  # it started from the exported SFT adapter
      assert "peft.init_from: loaded LORA" in r.stderr
  elif module == "jaxft.evaluate":
    with open(os.path.join(where("workdir"), "eval.json")) as f:
      assert "tuned" in json.dumps(json.load(f))
  elif module == "jaxft.data":  # the rows with their loss tokens marked (not a terminal), counts
    assert r.stdout.count("carry loss") >= 1 + int(_flag(argv, "rows") or 3), r.stdout
    assert "«" in r.stdout and "rows with no target token: 0" in r.stdout, r.stdout
  elif module == "jaxft.generate":
    # The answer, printed (a 3-step model's is often empty: it ends at once, so its text is not
    # checked).
    assert r.stdout.endswith("\n"), r.stdout
  elif module == "jaxft.export":
    out = where("out")
    if _flag(argv, "format") == "gguf":
      assert os.path.getsize(out) > 0
    else:
      want = "adapter_config.json" if _flag(argv, "format") == "peft" else "config.json"
      assert os.path.isfile(os.path.join(out, want)), os.listdir(out)


def _serve(cmd, block, cwd, port):
  """Runs the Serve block: the server in the background from the doc's command, then the block's
  curl and `python -c` lines against it; stops the server."""
  assert f"--port={_DOC_PORT}" in cmd, cmd
  argv = shlex.split(cmd.replace(f"--port={_DOC_PORT}", f"--port={port}"))
  log_path = os.path.join(cwd, "serve.log")  # a file, not a pipe that nobody drains
  with open(log_path, "w") as log:
    proc = subprocess.Popen([sys.executable] + argv[1:], cwd=cwd, stdout=log,
                            stderr=subprocess.STDOUT)
  try:
    deadline = time.time() + 180
    while True:
      assert proc.poll() is None, open(log_path).read()[-4000:]
      try:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
        break
      except OSError:
        assert time.time() < deadline, "the server did not answer /health"
        time.sleep(0.5)
    clients = [c for c in block_commands(block) if c.startswith(("curl ", "python -c "))]
    assert len(clients) == 2, clients
    for c in clients:
      assert f"127.0.0.1:{_DOC_PORT}" in c
      cargv = shlex.split(c.replace(f"127.0.0.1:{_DOC_PORT}", f"127.0.0.1:{port}"))
      if cargv[0] == "python":
        cargv[0] = sys.executable
      r = subprocess.run(cargv, cwd=cwd, capture_output=True, text=True, timeout=120)
      assert r.returncode == 0, (c, r.stdout, r.stderr)
      if cargv[0] == "curl":
        answer = json.loads(r.stdout)
        assert answer["choices"][0]["finish_reason"] in ("stop", "length"), answer
        assert isinstance(answer["choices"][0]["message"]["content"], str)
      else:
        assert r.stdout.endswith("\n"), r.stdout  # the printed answer
  finally:
    proc.send_signal(signal.SIGTERM)
    try:
      proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
      proc.kill()
      proc.wait()


def _moved_adapter_loads(cwd, tmp_path, monkeypatch):
  """The README's PEFT adapter, moved elsewhere and loaded from another directory by
  `base_model_name_or_path` alone, gives the merged export's logits."""
  import torch
  from peft import AutoPeftModelForCausalLM
  from transformers import AutoModelForCausalLM
  with open(os.path.join(cwd, "exported/adapter/adapter_config.json")) as f:
    base = json.load(f)["base_model_name_or_path"]
  assert os.path.isabs(base) and os.path.realpath(base) == os.path.realpath(
      os.path.join(cwd, "exported/base"))
  os.makedirs(tmp_path / "elsewhere")
  moved = str(tmp_path / "elsewhere" / "adapter")
  shutil.move(os.path.join(cwd, "exported/adapter"), moved)
  monkeypatch.chdir(tmp_path / "elsewhere")
  ids = torch.tensor([[1, 1247, 28747, 17053, 302, 6082, 28804]])  # <s> User: Capital of Canada?
  with torch.no_grad():
    tuned = AutoPeftModelForCausalLM.from_pretrained("adapter", dtype=torch.float32).eval()
    merged = AutoModelForCausalLM.from_pretrained(os.path.join(cwd, "exported/merged"),
                                                  dtype=torch.float32).eval()
    a, b = tuned(ids).logits.numpy(), merged(ids).logits.numpy()
  np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_the_documented_quickstart_commands_run(tmp_path, monkeypatch):
  """Each documented quickstart command, shortened by _SHORTER alone, exits 0 and leaves what it
  promises; then the README's PEFT adapter still loads after its folder moves."""
  for package in ("fastapi", "openai", "peft"):
    pytest.importorskip(package)
  cwd = str(tmp_path / "clone")
  os.makedirs(cwd)
  # Another server may hold the doc's port 8000: a free one replaces it in the serve command and
  # in the client lines alike.
  port = _free_port()
  ran = []
  for doc, b, cmd in quickstart_commands():
    argv = shlex.split(cmd)
    module = argv[2]
    if module == "jaxft.serve":
      _serve(cmd, shell_blocks(doc)[b], cwd, port)
      ran.append(module)
      continue
    r = run_cli(module, *argv[3:], *_SHORTER[module], cwd=cwd, timeout=300)
    assert r.returncode == 0, f"{doc}: {cmd}\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
    _check(module, argv, cwd, r)
    ran.append(module)
  assert "jaxft.serve" in ran
  _moved_adapter_loads(cwd, tmp_path, monkeypatch)
