"""End-to-end runs of `python -m jaxft.train`, and the one-line errors a user sees."""

import json
import os
import re
import sys

import pytest

import tracker_runs
from conftest import run_cli
from jaxft import cli

TINY = ["--config=configs/quickstart.py", "--config.model.preset=tiny", "--config.train.progress=False"]


def read_metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def three_steps(tmp_path_factory):
  """python -m jaxft.train, three tiny steps, logged to TensorBoard, an offline W&B run and a
  local MLflow store: (workdir, the finished command)."""
  wd = str(tmp_path_factory.mktemp("three") / "run")
  # (the suite's other commands skip the huge-page re-execution: conftest.py)
  env = {"JAXFT_HUGE_PAGES": "1", **tracker_runs.offline_env(str(tmp_path_factory.mktemp("w")))}
  # (wandb and mlflow are in the test extra; without them the run logs to TensorBoard alone and
  # the trackers' test is skipped)
  loggers = "tensorboard,wandb,mlflow" if tracker_runs.installed() else "tensorboard"
  r = run_cli("jaxft.train", *TINY, f"--workdir={wd}", "--config.train.steps=3",
              "--config.train.log_every=2", f"--config.train.loggers={loggers}", env=env)
  assert r.returncode == 0, r.stderr[-3000:]
  return wd, r


@pytest.mark.slow
def test_three_steps_write_the_workdir(three_steps):
  wd, r = three_steps
  rows = read_metrics(wd)
  train_rows = [m for m in rows if "loss" in m]
  assert [m["step"] for m in train_rows] == [2, 3]  # the last step is always logged
  for m in train_rows:
    assert {"step", "loss", "lr", "tokens_per_sec"} <= m.keys()
  assert [m["step"] for m in rows if "eval_loss" in m] == [0, 3]
  assert os.listdir(os.path.join(wd, "tensorboard"))
  cfg = json.load(open(os.path.join(wd, "config.json")))
  assert cfg["train"]["steps"] == 3 and cfg["model"]["preset"] == "tiny"
  assert sorted(os.listdir(os.path.join(wd, "checkpoints"))) == ["3"]
  # Without a terminal, a line per logged step; last, where the files are and what to run next.
  assert "step 2/3, loss " in r.stderr and "step 3/3, loss " in r.stderr, r.stderr[-3000:]
  out = r.stdout.strip().splitlines()
  assert out[-5].startswith("done: step=3, loss=") and f"the run's files: {wd}" in out[-4]
  assert out[-3:] == [f"  python -m jaxft.evaluate --workdir={wd}",
                      f"  python -m jaxft.export --workdir={wd} --format=hf --out={wd}-hf",
                      f"  python -m jaxft.serve --workdir={wd}"]
  # The command re-executed itself with huge-page malloc where this machine offers it.
  wanted = cli.huge_pages_env({k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"} |
                             {"JAXFT_HUGE_PAGES": "1"})
  assert ("host malloc: huge pages" in r.stderr) == (wanted is not None), r.stderr[:2000]


@pytest.mark.slow
def test_three_steps_logged_to_offline_wandb_and_local_mlflow(three_steps):
  """train.loggers=wandb,mlflow: the W&B run and the MLflow run, read back with each library's
  own reader, hold metrics.jsonl's numbers, the config and the loss curve (tracker_runs.py)."""
  if not tracker_runs.installed():
    pytest.skip("wandb and mlflow are not installed (pip install -e '.[test]')")
  wd, _ = three_steps
  tracker_runs.check_wandb(wd)
  tracker_runs.check_mlflow(wd)


def test_without_a_terminal_each_logged_step_is_a_line(tmp_path, monkeypatch, caplog):
  """nohup, SLURM, CI: no bar, but a line per train.log_every with loss, lr, tokens/s and ETA."""
  import io
  import logging
  from jaxft.metrics import MetricsWriter
  monkeypatch.setattr(sys, "stderr", io.StringIO())  # not a terminal
  writer = MetricsWriter(str(tmp_path), 10, 0, True)
  with caplog.at_level(logging.INFO):
    writer.progress(2, 2.5, 1234.0, None, 1e-4)
    writer.progress(4, 2.25, 1500.0, 0.5, 2e-4)
  writer.close()
  lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
  assert lines[0].startswith("step 2/10, loss 2.5000, lr 0.0001, 1,234 tokens/s, ETA"), lines
  assert re.fullmatch(r"step 4/10, loss 2\.2500, lr 0\.0002, 1,500 tokens/s, MFU 50\.0%, "
                      r"ETA \d+s", lines[1]), lines


def test_under_a_terminal_log_lines_stay_off_the_bar(tmp_path, monkeypatch):
  import io
  from jaxft.metrics import MetricsWriter

  class Terminal(io.StringIO):
    def isatty(self):
      return True

  term = Terminal()
  monkeypatch.setattr(sys, "stderr", term)
  writer = MetricsWriter(str(tmp_path), 10, 0, True)
  writer.progress(1, 2.5, 100.0)
  sys.stderr.write("I0101 a log line\n")  # what absl and warnings write while the bar is shown
  writer.progress(2, 2.4, 100.0)
  writer.close()
  assert sys.stderr is term  # restored
  out = term.getvalue()
  assert "loss=2.4000" in out  # the bar was drawn
  before = out[:out.index("I0101 a log line\n")]
  assert before.endswith("\r"), repr(out)  # the bar's line was cleared first, then redrawn below


def test_huge_pages_env_respects_the_user():
  env = {"PATH": "/bin"}
  made = cli.huge_pages_env(env)
  if made is None:
    pytest.skip("no glibc >= 2.35 with transparent huge pages here")
  assert made["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1" and made["PATH"] == "/bin"
  assert cli.huge_pages_env(dict(env, JAXFT_HUGE_PAGES="0")) is None
  assert cli.huge_pages_env(dict(env, GLIBC_TUNABLES="glibc.malloc.hugetlb=0")) is None
  kept = cli.huge_pages_env(dict(env, GLIBC_TUNABLES="glibc.malloc.arena_max=2"))
  assert kept["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"


@pytest.mark.slow
def test_full_finetuning_runs(tmp_path):
  wd = str(tmp_path / "full")
  r = run_cli("jaxft.train", *TINY, f"--workdir={wd}", "--config.train.steps=4",
              "--config.peft.method=full", "--config.optim.lr=1e-3")
  assert r.returncode == 0, r.stderr[-3000:]
  evals = [m["eval_loss"] for m in read_metrics(wd) if "eval_loss" in m]
  assert evals[-1] < evals[0]


@pytest.mark.slow
@pytest.mark.parametrize("flag,needle", [
    ("--config.optim.lrr=1", "lrr"),
    ("--config.train.steps=many", "--config.train.steps=many"),
    ("--config.peft.method=bitfit", "peft.method='bitfit'"),
    ("--config.mesh.tensor=3", "config.mesh"),
])
def test_bad_config_exits_2_with_one_line(tmp_path, flag, needle):
  wd = tmp_path / "bad"
  r = run_cli("jaxft.train", *TINY, f"--workdir={wd}", flag)
  assert r.returncode == 2, r.stderr[-2000:]
  last = r.stderr.strip().splitlines()[-1]
  assert last.startswith("jaxft: error:") and needle in last
  assert "Traceback" not in r.stderr
  assert not (wd / "checkpoints").exists()


@pytest.mark.slow
@pytest.mark.parametrize("content,needle", [
    ('{"text": "ok"}\n{"text": \n', "bad.jsonl:2: malformed JSON"),
    ('{"prompt": "no completion"}\n', "bad.jsonl:1: missing required field 'completion'"),
    ('{"messages": [{"role": "wizard", "content": "x"}]}\n', "unknown role 'wizard'"),
    ("", "bad.jsonl: the dataset is empty"),
])
def test_bad_data_exits_2_and_writes_no_checkpoint(tmp_path, content, needle):
  data = tmp_path / "bad.jsonl"
  data.write_text(content)
  wd = tmp_path / "wd"
  fmt = ["--config.data.format=completion"] if "completion" in needle else []
  r = run_cli("jaxft.train", *TINY, f"--workdir={wd}", f"--config.data.train={data}", *fmt)
  assert r.returncode == 2, r.stderr[-2000:]
  last = r.stderr.strip().splitlines()[-1]
  assert last.startswith("jaxft: error:") and needle in last, last
  assert not (wd / "checkpoints").exists()


@pytest.mark.slow
def test_eval_accuracy_is_logged_at_eval_points(tmp_path):
  wd = str(tmp_path / "acc")
  r = run_cli("jaxft.train", *TINY, f"--workdir={wd}", "--config.train.steps=2",
              "--config.train.eval_accuracy=True", "--config.train.eval_every=1")
  assert r.returncode == 0, r.stderr[-3000:]
  rows = [m for m in read_metrics(wd) if "eval_exact_match" in m]
  assert [m["step"] for m in rows] == [0, 1, 2]
  assert all(0.0 <= m["eval_exact_match"] <= m["eval_normalized_match"] <= 1.0 for m in rows)
