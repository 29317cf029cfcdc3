"""What an adversarial user meets: bad values, bad files, hostile templates, damaged checkpoints,
killed and concurrent runs, full disks. Each case must end in one clear error (exit status 2 at
the command line) or be survived, and must never lose or silently corrupt data."""

import json
import logging
import os
import shutil
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import ROOT, run_cli, tiny_config
from jaxft import export, session, trainer, workdir as workdir_lib
from jaxft.data import pipeline, sources
from jaxft.data.tokenize import Encoder
from jaxft.errors import CheckpointError, ConfigError, DataError

TINY = ["--config=configs/quickstart.py", "--config.model.preset=tiny",
        "--config.train.progress=False", "--config.train.log_every=1"]


def metric_rows(wd):
  with open(os.path.join(wd, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def snapshot(path):
  """{file: (size, mtime_ns)} of everything under path."""
  out = {}
  for d, _, names in os.walk(path):
    for n in names:
      st = os.stat(os.path.join(d, n))
      out[os.path.relpath(os.path.join(d, n), path)] = (st.st_size, st.st_mtime_ns)
  return out


def one_error_line(r):
  assert r.returncode == 2, r.stderr[-3000:]
  assert "Traceback" not in r.stderr, r.stderr[-3000:]
  last = r.stderr.strip().splitlines()[-1]
  assert last.startswith("jaxft: error:"), last
  return last


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A tiny LoRA run with checkpoints at steps 2 and 4."""
  wd = str(tmp_path_factory.mktemp("bad") / "run")
  trainer.train(tiny_config(**{"train.steps": 4, "checkpoint.every": 2}), wd)
  return wd


def copy_of(trained, tmp_path):
  wd = str(tmp_path / "copy")
  shutil.copytree(trained, wd)
  return wd


def flip_bytes(step_dir):
  """Bit rot: flips bytes in the middle of the largest array data file (its size is kept)."""
  biggest = max((os.path.join(d, f) for d, _, fs in os.walk(os.path.join(step_dir, "state"))
                 for f in fs if os.sep + "d" + os.sep in os.path.join(d, f)), key=os.path.getsize)
  with open(biggest, "r+b") as f:
    f.seek(os.path.getsize(biggest) // 2)
    chunk = bytearray(f.read(64))
    f.seek(os.path.getsize(biggest) // 2)
    f.write(bytes(b ^ 0xFF for b in chunk))
  return os.path.relpath(biggest, step_dir)


# ------------------------------------------------------------------------------------------------
# Data lost


@pytest.mark.slow
def test_export_never_replaces_a_workdir_or_the_model(trained, tmp_path):
  before = snapshot(trained)
  for out in (trained, os.path.join(trained, "checkpoints"), os.path.join(trained, "exported"),
              os.path.dirname(trained)):
    with pytest.raises(ConfigError, match="workdir|--workdir"):
      export.export(trained, "peft", out, overwrite=True, base_model="tiny-base")
  other = tmp_path / "model"
  other.mkdir()
  c = tiny_config()
  c.model.tokenizer = str(other)
  with pytest.raises(ConfigError, match="model.tokenizer"):
    export.check_out(str(other / "sub"), True, trained, c)
  assert snapshot(trained) == before


@pytest.mark.slow
def test_a_killed_exports_leftovers_are_cleared(trained, tmp_path):
  out = tmp_path / "adapter"
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  stale = tmp_path / f"adapter.tmp-{dead.pid}"
  stale.mkdir()
  (stale / "adapter_model.safetensors").write_bytes(b"partial")
  export.export(trained, "peft", str(out), base_model="tiny-base")
  assert not stale.exists()
  assert sorted(os.listdir(out)) == ["adapter_config.json", "adapter_model.safetensors"]


# ------------------------------------------------------------------------------------------------
# Silently wrong


@pytest.mark.slow
def test_bit_rot_is_found_and_every_reader_falls_back(trained, tmp_path, caplog):
  wd = copy_of(trained, tmp_path)
  good = session.restore_trained(wd, step=2)
  damaged = flip_bytes(os.path.join(wd, "checkpoints", "4"))
  with pytest.raises(CheckpointError, match="step 4: damaged files .*checksum mismatch"):
    session.restore_trained(wd, step=4)
  with caplog.at_level(logging.WARNING):
    t = session.restore_trained(wd)
  assert t.step == 2
  assert damaged in caplog.text and "step 4" in caplog.text
  jax.tree.map(np.testing.assert_array_equal, t.trainable, good.trainable)
  # export (and generate/evaluate, which restore the same way) write step 2's weights.
  out = export.export(wd, "peft", str(tmp_path / "adapter"), base_model="tiny-base")
  from safetensors.numpy import load_file
  assert all(np.isfinite(v).all() for v in load_file(os.path.join(out, "adapter_model.safetensors"))
             .values())
  assert os.path.isdir(os.path.join(wd, "checkpoints", "4")), "a reader must not move anything"


@pytest.mark.slow
def test_training_resumes_from_the_newest_intact_checkpoint_after_bit_rot(trained, tmp_path,
                                                                           caplog):
  wd = copy_of(trained, tmp_path)
  flip_bytes(os.path.join(wd, "checkpoints", "4"))
  with caplog.at_level(logging.WARNING):
    out = trainer.train(tiny_config(**{"train.steps": 5, "checkpoint.every": 2}), wd)
  assert "step 4: damaged files" in caplog.text
  assert out["step"] == 5 and np.isfinite(out["loss"])
  assert os.listdir(os.path.join(wd, "damaged_checkpoints"))
  assert [r["step"] for r in metric_rows(wd) if "loss" in r] == [1, 2, 3, 4, 5]


@pytest.mark.slow
@pytest.mark.parametrize("key,value,needle", [
    ("data.batch_size", 0, "data.batch_size=0: must be >= 1"),
    ("data.batch_size", -4, "data.batch_size=-4: must be >= 1"),
    ("train.seed", 2**63, "train.seed"),
    ("optim.lr", -1e-3, "optim.lr=-0.001"),
    ("optim.lr", float("nan"), "optim.lr=nan"),
    ("optim.warmup_steps", -1, "optim.warmup_steps=-1"),
    ("optim.b2", 1.5, "optim.b2=1.5: must be in [0, 1)"),
    ("optim.b1", -0.1, "optim.b1"),
    ("peft.lora.alpha", 0.0, "peft.lora.alpha=0.0"),
    ("peft.lora.rank", 0, "peft.lora.rank=0"),
    ("peft.lora.dropout", 1.0, "peft.lora.dropout"),
    ("checkpoint.keep", 0, "checkpoint.keep=0"),
])
def test_bad_values_fail_before_anything_is_read(tmp_path, key, value, needle):
  # data.train does not exist: the config error must come first (nothing loaded, nothing written).
  c = tiny_config(**{key: value, "data.train": str(tmp_path / "absent.jsonl")})
  with pytest.raises(ConfigError, match=None) as e:
    trainer.train(c, str(tmp_path / "wd"))
  assert needle in str(e.value)
  assert not (tmp_path / "wd").exists()


def test_token_rows_of_booleans_and_bad_masks_are_refused(tmp_path, quickstart_tokenizer):
  enc = Encoder(quickstart_tokenizer)
  for row, needle in [({"input_ids": [True, False, True]}, "non-empty list of integers"),
                      ({"input_ids": [5, 6, 7], "loss_mask": [2, 0, 1]}, "only 0/1")]:
    p = tmp_path / "t.jsonl"
    p.write_text(json.dumps(row) + "\n")
    with pytest.raises(DataError, match=needle):
      pipeline.load_examples(str(p), enc, "auto", 32, 32000)


def test_a_starting_loss_far_above_a_uniform_guess_is_warned(tmp_path, caplog):
  """Damage no reader can see (a GGUF's quantized codes changed within range) shows as a step-1
  loss far above log(vocab): 22.3 against 10.8 for a corrupted SmolLM2 file. A warning names it;
  an intact start (5.2) passes quietly."""
  import math
  from jaxft import hooks
  from jaxft.metrics import MetricsWriter

  class NoFlops:
    def metrics(self, tokens_per_sec):
      return {}

  c = tiny_config(**{"train.steps": 5, "model.path": "damaged.gguf"})
  writer = MetricsWriter(str(tmp_path), 5, 0, False)
  loop = hooks.Loop(c, 1, {}, {}, None, writer)
  step = lambda loss: {"finite": True, "loss": loss, "lr": 1e-4, "grad_norm": 1.0, "skipped": 0,
                       "objective": {}, "tokens": 64}
  with caplog.at_level(logging.WARNING):
    hooks.MetricsRecorder(c, NoFlops(), math.log(49152))._record(loop, 1, step(5.2))
    assert "far above a uniform guess" not in caplog.text
    hooks.MetricsRecorder(c, NoFlops(), math.log(49152))._record(loop, 1, step(22.3))
  writer.close()
  assert "loss 22.30 is far above a uniform guess" in caplog.text
  assert "log(vocab) = 10.80" in caplog.text and "damaged.gguf" in caplog.text


@pytest.mark.slow
def test_rerunning_a_finished_run_says_it_was_complete_and_how_to_go_on(trained, tmp_path):
  """It printed "resuming from step 4", then "done", with no word that nothing was trained."""
  wd = copy_of(trained, tmp_path)
  before = metric_rows(wd)
  config = tiny_config(**{"train.steps": 4, "checkpoint.every": 2})
  result = trainer.train(config, wd)
  assert result["step"] == 4 and result["already_complete"]
  assert metric_rows(wd) == before
  text = trainer.summary(result, config, wd)
  assert text.startswith(f"{wd}: already complete at step 4 (train.steps=4); nothing was trained")
  assert "--config.train.steps=8" in text and f"python -m jaxft.evaluate --workdir={wd}" in text


@pytest.mark.slow
def test_resume_with_a_changed_alpha_warns_and_records_it(tmp_path, caplog):
  wd = str(tmp_path / "wd")
  trainer.train(tiny_config(**{"train.steps": 2}), wd)
  with caplog.at_level(logging.WARNING):
    trainer.train(tiny_config(**{"train.steps": 3, "peft.lora.alpha": 7.0}), wd)
  assert "peft.lora.alpha (32.0 -> 7.0)" in caplog.text
  notes = [r for r in metric_rows(wd) if "resumed_with_changes" in r]
  assert len(notes) == 1 and notes[0]["step"] == 2
  assert "peft.lora.alpha" in notes[0]["resumed_with_changes"]
  assert "train.steps" in notes[0]["resumed_with_changes"]


# ------------------------------------------------------------------------------------------------
# Templates


def test_a_looping_chat_template_is_stopped_and_named(tmp_path, quickstart_tokenizer, monkeypatch):
  from jaxft.data import tokenize
  monkeypatch.setattr(tokenize, "RENDER_SECONDS", 1)
  loop = ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
          "{{ messages[0]['content'] }}")
  tok_dir = tmp_path / "tok"
  shutil.copytree(quickstart_tokenizer.name_or_path, tok_dir)
  (tok_dir / "chat_template.jinja").write_text(loop)
  c = tiny_config(**{"model.tokenizer": str(tok_dir)})
  enc = session.encoder(c, str(tmp_path / "wd"))
  data = tmp_path / "chat.jsonl"
  data.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                           {"role": "assistant", "content": "yo"}]}) + "\n")
  t0 = time.time()
  with pytest.raises(ConfigError) as e:
    pipeline.load_examples(str(data), enc, "auto", 32, 32000)
  assert time.time() - t0 < 30
  assert str(tok_dir / "chat_template.jinja") in str(e.value)
  assert "did not finish within 1 s" in str(e.value) and "chat.jsonl:1" in str(e.value)


@pytest.mark.parametrize("template,needle", [
    ("{% for m in messages %}{{ m['content'] }", "TemplateSyntaxError"),
    ("{{ raise_exception('no system role') }}", "no system role"),
    ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "SecurityError"),
])
def test_broken_and_hostile_templates_are_one_line(tmp_path, quickstart_tokenizer, template,
                                                    needle):
  enc = Encoder(quickstart_tokenizer, template)
  with pytest.raises(ConfigError) as e:
    enc.chat("rows.jsonl:3", [{"role": "user", "content": "a"},
                              {"role": "assistant", "content": "b"}])
  msg = str(e.value)
  assert msg.startswith("data.chat_template:") and needle in msg and "rows.jsonl:3" in msg
  assert "\n" not in msg


# ------------------------------------------------------------------------------------------------
# Workdirs: torn metrics, read-only readers, locks, runs killed before a checkpoint


@pytest.mark.slow
def test_a_torn_metrics_row_does_not_block_resume(trained, tmp_path):
  wd = copy_of(trained, tmp_path)
  with open(os.path.join(wd, "metrics.jsonl"), "a") as f:
    f.write('{"step": 5, "loss": 1.2')  # the crash came mid-write
  out = trainer.train(tiny_config(**{"train.steps": 5, "checkpoint.every": 2}), wd)
  assert out["step"] == 5
  assert [r["step"] for r in metric_rows(wd) if "loss" in r] == [1, 2, 3, 4, 5]


@pytest.mark.slow
def test_reading_commands_write_nothing_into_the_workdir(trained, tmp_path):
  before = snapshot(trained)
  r = run_cli("jaxft.generate", f"--workdir={trained}", "--prompt=Capital of France?",
              "--max_new_tokens=3")
  assert r.returncode == 0, r.stderr[-3000:]
  from jaxft import eval as evaluation
  res = evaluation.evaluate(session.load_workdir_config(trained), trained, max_examples=2,
                            compare_base=False, output_dir=str(tmp_path / "eval"))
  assert res["step"] == 4 and os.path.isfile(tmp_path / "eval" / "eval.json")
  assert snapshot(trained) == before


@pytest.mark.slow
def test_a_second_trainer_on_the_same_workdir_is_refused(tmp_path):
  wd = str(tmp_path / "wd")
  with workdir_lib.Lock(wd):
    with pytest.raises(ConfigError, match=f"in use by another jaxft run \\(pid {os.getpid()} on "
                                          "host"):
      trainer.train(tiny_config(**{"train.steps": 1}), wd)
  assert not os.path.exists(os.path.join(wd, "metrics.jsonl"))


@pytest.mark.slow
def test_rows_of_a_run_killed_before_its_first_checkpoint_are_dropped(tmp_path):
  wd = tmp_path / "wd"
  wd.mkdir()
  (wd / "metrics.jsonl").write_text('{"step": 0, "eval_loss": 11.0}\n{"step": 1, "loss": 10.9}\n'
                                    '{"step": 2, "loss": 10.8}\n')
  trainer.train(tiny_config(**{"train.steps": 2}), str(wd))
  assert [r["step"] for r in metric_rows(str(wd)) if "loss" in r] == [1, 2]
  assert [r["step"] for r in metric_rows(str(wd)) if "eval_loss" in r] == [0, 2]


@pytest.mark.slow
def test_export_of_a_missing_step_names_the_steps_before_loading(trained, tmp_path):
  t0 = time.time()
  with pytest.raises(CheckpointError, match=r"no checkpoint of step 999 \(steps: 2, 4\)"):
    export.export(trained, "peft", str(tmp_path / "o"), step=999, base_model="tiny-base")
  assert time.time() - t0 < 10


@pytest.mark.slow
def test_a_failed_save_stops_the_run_and_keeps_the_previous_checkpoint(trained, tmp_path):
  """A full disk, played by RLIMIT_FSIZE: writes past 100 kB fail (EFBIG) as they would with
  ENOSPC; the checkpoint's array file is larger, metrics rows are not."""
  wd = copy_of(trained, tmp_path)

  cmd = [sys.executable, "-m", "jaxft.train", *TINY, f"--workdir={wd}",
         "--config.train.steps=20", "--config.checkpoint.every=2"]
  # ulimit -f counts 1024-byte blocks; set by the shell, so that no JAX process has to fork.
  r = subprocess.run(["bash", "-c", 'ulimit -f 98 && exec "$@"', "bash", *cmd], cwd=ROOT,
                     capture_output=True, text=True, timeout=600)
  # Orbax's and TensorStore's background threads may print their own errors of the failed write
  # (asyncio "Event loop is closed"); jaxft's part is the last line, and no traceback through
  # jaxft's code.
  assert r.returncode == 2, r.stderr[-3000:]
  assert "jaxft/" not in "".join(l for l in r.stderr.splitlines(True) if l.startswith("  File"))
  # jaxft's line is usually the last; TensorStore's writer thread may still print its own error
  # of the failed write after it (seen once in 2 runs with 2 pytest workers).
  ours = [l for l in r.stderr.strip().splitlines() if l.startswith("jaxft: error:")]
  assert len(ours) == 1, r.stderr[-3000:]
  last = ours[0]
  assert "saving the checkpoint of step 6 failed" in last
  assert "the checkpoint of step 4 is intact" in last
  assert sorted(os.listdir(os.path.join(wd, "checkpoints")), key=int) == ["2", "4"]
  assert max(r["step"] for r in metric_rows(wd) if "loss" in r) < 20  # stopped at once
  assert not [n for n in os.listdir(os.path.join(wd, "checkpoints")) if "tmp" in n]
  t = session.restore_trained(wd)
  assert t.step == 4


# ------------------------------------------------------------------------------------------------
# Data files and values that used to crash


@pytest.mark.parametrize("name,content,needle", [
    ("rows.jsonl", '[{"text": "a"}, {"text": "b"}]\n', "rows.jsonl:1: a JSON array"),
    ("deep.jsonl", "[" * 100000 + "]" * 100000 + "\n", "deep.jsonl:1: JSON nested too deeply"),
    ("fake.parquet", "not parquet at all", "fake.parquet: cannot read as Parquet"),
])
def test_bad_files_are_one_error(tmp_path, name, content, needle):
  p = tmp_path / name
  p.write_text(content)
  with pytest.raises(DataError, match=None) as e:
    sources.read_rows(str(p))
  assert needle in str(e.value)


@pytest.mark.parametrize("case,needle", [
    ("missing", "absent.jsonl: no such file"), ("directory", "dir.jsonl: is a directory"),
    ("empty", "empty.jsonl: the dataset is empty"),
    ("garbage", "garbage.jsonl:1: malformed JSON"), ("eval", "absent_eval.jsonl: no such file"),
])
def test_a_missing_or_invalid_data_file_is_named_before_the_workdir_is_made(tmp_path, case,
                                                                            needle):
  """The workdir used to be created and filled (jaxft.lock, compile_cache/, tokenizer/) before
  the data file was found missing."""
  good = tmp_path / "good.jsonl"
  good.write_text('{"text": "a"}\n')
  (tmp_path / "dir.jsonl").mkdir()
  (tmp_path / "empty.jsonl").write_text("\n")
  (tmp_path / "garbage.jsonl").write_bytes(b"PK\x03\x04 zip bytes\n")
  train = {"missing": "absent.jsonl", "directory": "dir.jsonl", "empty": "empty.jsonl",
           "garbage": "garbage.jsonl"}.get(case, "good.jsonl")
  c = tiny_config(**{"data.train": str(tmp_path / train), "data.eval": str(
      tmp_path / ("absent_eval.jsonl" if case == "eval" else "good.jsonl"))})
  with pytest.raises(DataError, match=needle):
    trainer.train(c, str(tmp_path / "wd"))
  assert not (tmp_path / "wd").exists()


def test_a_json_array_file_is_read_as_rows(tmp_path):
  p = tmp_path / "rows.json"
  p.write_text(json.dumps([{"text": "a"}, {"text": "b"}]))
  assert [r for _, r in sources.read_rows(str(p))] == [{"text": "a"}, {"text": "b"}]


def test_a_directory_named_jsonl_and_tfds_without_the_package(tmp_path, monkeypatch):
  (tmp_path / "data.jsonl").mkdir()
  with pytest.raises(DataError, match="data.jsonl: is a directory"):
    sources.read_rows(str(tmp_path / "data.jsonl"))
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
  with pytest.raises(DataError, match=r"pip install 'jaxft\[tfds\]'"):
    sources.read_rows("tfds:mnist:train")


def test_truncation_that_removes_every_target_says_so(tmp_path, quickstart_tokenizer):
  p = tmp_path / "long.jsonl"
  p.write_text(json.dumps({"prompt": "word " * 100, "completion": "answer"}) + "\n")
  with pytest.raises(DataError, match="truncation to data.max_len=16 tokens removed every target"):
    pipeline.load_examples(str(p), Encoder(quickstart_tokenizer), "auto", 16, 32000)


def test_token_ids_beyond_the_models_vocabulary(tmp_path, quickstart_tokenizer):
  p = tmp_path / "chat.jsonl"
  p.write_text(json.dumps({"text": "zebra quantum xylophone"}) + "\n")
  with pytest.raises(DataError, match=r"chat.jsonl:1: token id \d+ is outside the model's "
                                      r"vocabulary \(vocab_size 300\)"):
    pipeline.load_examples(str(p), Encoder(quickstart_tokenizer), "auto", 32, 300)


def test_a_huge_row_is_cut_before_tokenizing(tmp_path, quickstart_tokenizer):
  p = tmp_path / "huge.jsonl"
  p.write_text(json.dumps({"text": "lorem ipsum dolor " * 1_000_000}) + "\n")  # 18 MB
  enc = Encoder(quickstart_tokenizer)
  seen = []
  real = enc.tok

  class Spy:
    def __getattr__(self, name):
      return getattr(real, name)

    def __call__(self, text, **kw):
      seen.append(len(text))
      return real(text, **kw)

  enc.tok = Spy()
  ds = pipeline.load_examples(str(p), enc, "auto", 64, 32000)
  assert ds.truncated == 1 and len(ds.examples[0].ids) == 65
  assert max(seen) < 100_000  # not 18 MB
  whole = Encoder(quickstart_tokenizer).text("lorem ipsum dolor " * 200).ids[:65]
  np.testing.assert_array_equal(ds.examples[0].ids, whole)


def test_safetensors_index_may_not_leave_the_model_directory(tmp_path):
  from jaxft.models import safetensors_io
  model = tmp_path / "model"
  model.mkdir()
  (tmp_path / "other").mkdir()
  (tmp_path / "other" / "model.safetensors").write_bytes(b"")
  (model / "model.safetensors.index.json").write_text(json.dumps(
      {"weight_map": {"lm_head.weight": "../other/model.safetensors"}}))
  with pytest.raises(CheckpointError, match="outside the model directory"):
    safetensors_io.tensor_files(str(model))


# ------------------------------------------------------------------------------------------------
# Command-line options checked before any weights load


@pytest.mark.slow
@pytest.mark.parametrize("flags_,needle", [
    (["--temperature=nan"], "temperature=nan"),
    (["--stop="], "--stop: an empty stop string"),
    (["--max_new_tokens=0"], "--max_new_tokens=0: must be >= 1"),
    (["--seed=99999999999999999999"], "--seed=99999999999999999999: must be in [0, 2**63)"),
    (["--output=/nonexistent-dir/answers.jsonl"], "does not exist"),
])
def test_generate_options_fail_fast(trained, flags_, needle):
  t0 = time.time()
  r = run_cli("jaxft.generate", f"--workdir={trained}", "--prompt=hi", *flags_)
  assert needle in one_error_line(r)
  assert time.time() - t0 < 60  # seconds of start-up, no model load


@pytest.mark.slow
def test_evaluate_batch_zero_and_missing_config_fail_fast(trained, tmp_path):
  from jaxft import eval as evaluation
  with pytest.raises(ConfigError, match="--batch_size=0"):
    evaluation.evaluate(session.load_workdir_config(trained), trained, batch_size=0)
  r = run_cli("jaxft.train", f"--config={tmp_path / 'nope.py'}", f"--workdir={tmp_path / 'w'}")
  assert "--config: cannot load the config file" in one_error_line(r)


def test_overwrite_never_removes_a_workdir_at_any_depth(tmp_path):
  """--out=DIR --overwrite where DIR holds another run three (or more) levels down: refused, the
  run kept (the guard once looked two levels deep and deleted it)."""
  from jaxft.export import output
  out = tmp_path / "out"
  for depth in ("a/b/otherrun", "a/b/c/d/e/otherrun"):
    run = out / depth
    (run / "checkpoints" / "2").mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"step": 2, "loss": 1.0}\n')
    with pytest.raises(ConfigError, match=f"contains the jaxft workdir .*{depth}"):
      output.check_out(str(out), True, str(tmp_path / "wd"))
    assert (run / "metrics.jsonl").exists()
    shutil.rmtree(out / "a")
  (out / "a").mkdir()  # a directory without a run is replaced under --overwrite
  output.check_out(str(out), True, str(tmp_path / "wd"))


_FULL_DISK = """
import errno, os, sys
import gguf
from jaxft.models import safetensors_io

def full(path, *a, **k):
  with open(path, "wb") as f:  # a partial file, as a disk that fills up mid-write leaves
    f.write(b"partial")
  raise OSError(errno.ENOSPC, "No space left on device", path)

safetensors_io.write_safetensors = full
def tensor_data(self, *a, **k):  # the disk fills up at the first tensor
  raise OSError(errno.ENOSPC, "No space left on device", str(self.path))

gguf.GGUFWriter.write_tensor_data = tensor_data
sys.argv = ["jaxft.export"] + sys.argv[1:]
from jaxft.export.__main__ import main
main()
"""


@pytest.mark.slow
@pytest.mark.parametrize("fmt,out", [("hf", "merged"), ("gguf", "model.gguf")])
def test_a_full_disk_during_export_is_one_line_and_leaves_nothing(trained, tmp_path, fmt, out):
  r = subprocess.run([sys.executable, "-c", _FULL_DISK, f"--workdir={trained}", f"--format={fmt}",
                      f"--out={tmp_path / 'x' / out}", "--quant=f32"], cwd=ROOT,
                     capture_output=True, text=True, timeout=600)
  assert "No space left on device" in one_error_line(r)
  assert not (tmp_path / "x" / out).exists()
  assert not [n for n in os.listdir(tmp_path / "x") if ".tmp-" in n]


def test_a_read_only_workdir_is_one_clear_error(tmp_path, monkeypatch):
  """Resuming on a read-only (or full) workdir: the lock file cannot be written; ConfigError naming
  the workdir, not an OSError traceback."""
  import errno

  def read_only(path, *a, **k):
    raise OSError(errno.EROFS, "Read-only file system", path)

  monkeypatch.setattr(workdir_lib.os, "open", read_only)
  with pytest.raises(ConfigError, match=r"--workdir=.*cannot write the run's lock file "
                                        r"\(Read-only file system\)"):
    with workdir_lib.Lock(str(tmp_path)):
      pass
