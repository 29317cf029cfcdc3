"""Streamed training data (jaxft.data.stream): shards read lazily, the order a pure function of
seed and position, resume after kill -9 without a row repeated or skipped, disjoint parts on two
processes, and a bad row named when it is reached.

Rows are pre-tokenized (data.format=tokens): row `id` starts with token ID0 + id, so the ids a step
trained on are read back from its batch (the first input token of each packed example)."""

import json
import os
import random
import signal
import subprocess
import sys
import time
import types

import numpy as np
import pytest
from conftest import ROOT, tiny_config

from jaxft import DataError
from jaxft.data import stream
from jaxft.data.pipeline import Position

ID0, SHARDS, PER_SHARD = 10, 3, 300
STREAM_KEYS = {"data.format": "tokens", "data.max_len": 32, "data.batch_size": 4,
               "data.eval": "", "checkpoint.every": 1, "train.steps": 8}


def _write_shards(directory, bad_line=None):
  os.makedirs(directory, exist_ok=True)
  rng = random.Random(0)
  for s in range(SHARDS):
    with open(os.path.join(directory, f"part-{s:05d}.jsonl"), "w") as f:
      for i in range(PER_SHARD):
        row_id = s * PER_SHARD + i
        if (s, i + 1) == bad_line:
          f.write('{"input_ids": [1, 2\n')
          continue
        ids = [ID0 + row_id] + [rng.randrange(3, 9) for _ in range(rng.randrange(2, 12))]
        f.write(json.dumps({"input_ids": ids, "id": row_id}) + "\n")
  return str(directory)


def ids_of(batch) -> list[int]:
  """The row ids of a batch's examples, in order (each example's first input token)."""
  starts = (batch["positions"] == 0) & (batch["segment_ids"] > 0)
  return [int(t) - ID0 for t in batch["inputs"][starts]]


def _config(data, **over):
  return tiny_config(**{"data.train": os.path.join(data, "*.jsonl"), **STREAM_KEYS, **over})


def _stream(config):
  # (tokens rows: the tokenizer is not used; the run's stream is built by the same two calls)
  enc = types.SimpleNamespace(limit_tokens=lambda n: None)
  return stream.StreamData(config.data.train, stream.encoder_of(
      enc, "tokens", config.data.max_len, 32000)).stream(config)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  return _write_shards(tmp_path_factory.mktemp("shards"))


def test_an_epoch_is_every_row_once_shuffled_and_resumable_at_any_position(data):
  s = _stream(_config(data))
  pos, seen, positions, batches = Position(), [], [], []
  while pos.epoch == 0:
    positions.append(pos)
    batch, pos = s.batch_at(pos)
    batches.append(batch)
    seen += ids_of(batch)
  n = SHARDS * PER_SHARD
  assert sorted(seen[:n]) == list(range(n))  # the epoch: every row once
  assert seen[:n] != list(range(n))  # shuffled
  assert seen[n:] and seen[n:] != seen[:len(seen) - n]  # epoch 2 reshuffled
  # A fresh stream opened at any saved position builds the same batch as the straight read.
  fresh = _stream(_config(data))
  for k in (5, 1, len(positions) - 1):
    again, _ = fresh.batch_at(positions[k])
    assert all(np.array_equal(again[f], batches[k][f]) for f in batches[k])
  # Another seed: another order; no shuffle: file order.
  assert ids_of(_stream(_config(data, **{"train.seed": 1})).batch_at(Position())[0]) != seen[:8]
  plain = ids_of(_stream(_config(data, **{"data.shuffle": False})).batch_at(Position())[0])
  assert plain == list(range(len(plain)))


def test_a_bad_row_is_named_when_the_stream_reaches_it(tmp_path):
  data = _write_shards(tmp_path / "bad", bad_line=(1, 40))
  s = _stream(_config(data, **{"data.shuffle": False}))  # opening reads no row
  pos, reached = Position(), []
  with pytest.raises(DataError, match=r"part-00001\.jsonl:40: malformed JSON"):
    while True:
      batch, pos = s.batch_at(pos)
      reached += ids_of(batch)
  # The steps before the batch that holds it ran, on the rows before it (in file order).
  assert PER_SHARD < len(reached) <= PER_SHARD + 39 and reached == list(range(len(reached)))


_RECORD = """
import json, sys
sys.path.insert(0, "tests")
from conftest import tiny_config
from jaxft import hooks, trainer
from test_data_stream import STREAM_KEYS, ids_of
data, workdir, out = sys.argv[1:4]
def record(loop, metrics):
  with open(out, "a") as f:
    f.write(json.dumps([loop.step, ids_of(loop.batch)]) + "\\n")
config = tiny_config(**{"data.train": data + "/*.jsonl", **STREAM_KEYS})
trainer.train(config, workdir, hooks=(hooks.Hook("ids", after_step=record),))
"""


def _recorded(path):
  with open(path) as f:
    return {step: ids for step, ids in map(json.loads, f)}


def test_kill_9_then_resume_sees_the_examples_of_a_straight_run(data, tmp_path):
  wd, first, second = tmp_path / "wd", tmp_path / "first.jsonl", tmp_path / "second.jsonl"
  at = random.Random().randrange(2, 6)
  args = [sys.executable, "-c", _RECORD, data, str(wd)]
  proc = subprocess.Popen(args + [str(first)], cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 300
  while proc.poll() is None and time.time() < deadline:
    saved = [n for n in os.listdir(wd / "checkpoints") if n.isdigit()] if (
        wd / "checkpoints").is_dir() else []  # (a finished save: Orbax renames it so)
    if saved and first.exists() and max(_recorded(first), default=0) >= at:
      proc.send_signal(signal.SIGKILL)
      break
    time.sleep(0.02)
  _, err = proc.communicate(timeout=60)
  assert proc.returncode == -signal.SIGKILL, err[-2000:]
  r = subprocess.run(args + [str(second)], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
  resumed = _recorded(second)
  start = min(resumed) - 1  # the checkpoint it resumed from
  assert 1 <= start and max(resumed) == STREAM_KEYS["train.steps"]
  seen = {k: v for k, v in _recorded(first).items() if k <= start} | resumed
  s, pos, straight = _stream(_config(data)), Position(), {}
  for step in range(1, STREAM_KEYS["train.steps"] + 1):
    batch, pos = s.batch_at(pos)
    straight[step] = ids_of(batch)
  assert seen == straight


_PROCESS = """
import json, sys
sys.path.insert(0, "tests")
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
port, pid, data, out = sys.argv[1:5]
jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=int(pid))
from jaxft.data import stream
from jaxft.data.pipeline import Position
from test_data_stream import _config, _stream, ids_of
s, pos, seen = _stream(_config(data)), Position(), []
while pos.epoch == 0:
  batch, pos = s.batch_at(pos, select=list(range(2)))  # (this process's 2 of the 4 rows)
  seen += ids_of(batch)
with open(out, "w") as f:
  json.dump({"part": s.part, "seen": seen, "record": stream.position_record(pos),
             "back": list(stream.position_from(stream.position_record(pos)).__dict__.values()),
             "pos": [pos.epoch, pos.index]}, f)
"""


def test_two_processes_read_disjoint_parts_whose_union_is_the_epoch(data, tmp_path):
  import portpicker
  port = portpicker.pick_unused_port()
  procs = [subprocess.Popen([sys.executable, "-c", _PROCESS, str(port), str(p), data,
                             str(tmp_path / f"{p}.json")], cwd=ROOT, stderr=subprocess.PIPE,
                            text=True) for p in range(2)]
  for p in procs:
    _, err = p.communicate(timeout=120)
    assert p.returncode == 0, err[-2000:]
  out = [json.loads((tmp_path / f"{p}.json").read_text()) for p in range(2)]
  parts = [o["seen"][:o["part"]] for o in out]  # each process's epoch
  assert not set(parts[0]) & set(parts[1])
  assert sorted(parts[0] + parts[1]) == list(range(SHARDS * PER_SHARD))
  # The checkpoint's record holds both positions; each process resumes its own.
  for p, o in enumerate(out):
    assert o["back"] == o["pos"]
    assert o["record"]["processes"][p] == o["pos"]
