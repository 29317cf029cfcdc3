"""train.loggers (jaxft/trackers.py): resumed runs continue the same tracker runs; a missing package
or an unknown name is one line naming what to do; a failing tracker never stops a run. (A real run
logged to offline W&B and a local MLflow store, read back with each library's reader and compared
with metrics.jsonl: test_train_cli.py's three-step run, tracker_runs.py.)"""

import json
import logging
import os
import sys

import pytest

import tracker_runs
from conftest import tiny_config
from jaxft import trackers
from jaxft.errors import ConfigError

RUN = {"train.steps": 3, "train.loggers": "wandb,mlflow"}
needs_trackers = pytest.mark.skipif(not tracker_runs.installed(),
                                    reason="wandb and mlflow (the test extra) are not installed")


@pytest.fixture
def offline(tmp_path, monkeypatch):
  for k, v in tracker_runs.offline_env(str(tmp_path / "home")).items():
    monkeypatch.setenv(k, v)
  monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)  # (restored after: jaxft sets it)


@needs_trackers
def test_resumed_runs_and_evaluations_log_into_the_training_runs(offline, tmp_path):
  """WORKDIR/trackers.json keeps the runs' ids: a resumed train (which opens the trackers again
  on its workdir) logs into the same W&B and MLflow runs, and so does jaxft.evaluate
  (report_eval): its figures and files."""
  from mlflow.tracking import MlflowClient
  wd = str(tmp_path / "run")
  os.makedirs(wd)
  c = tiny_config(**RUN)
  trackers.Trackers(trackers.open_all(c, wd)).close(ok=True)
  ids = trackers.run_ids(wd)
  assert set(ids) == {"wandb", "mlflow"}
  files = [os.path.join(wd, n) for n in ("eval.json", "eval_report.md", "reliability.png")]
  for f in files[:2]:
    open(f, "w").write("{}")
  result = {"step": 3, "tuned": {"loss": 1.5, "exact_match": 0.75, "note": "x"},
            "base": {"loss": 2.5, "exact_match": 0.25}}
  assert trackers.report_eval(c, wd, result, files) == ["wandb", "mlflow"]
  client = MlflowClient(tracking_uri=trackers.mlflow_uri(c, wd))
  history = client.get_metric_history(ids["mlflow"], "evaluate/tuned/exact_match")
  assert [(m.step, m.value) for m in history] == [(3, 0.75)]
  assert set(client.get_run(ids["mlflow"]).data.metrics) == {
      "evaluate/tuned/loss", "evaluate/tuned/exact_match", "evaluate/base/loss",
      "evaluate/base/exact_match"}
  assert {a.path for a in client.list_artifacts(ids["mlflow"])} == {"eval.json", "eval_report.md"}
  records = [r for d in tracker_runs.wandb_run_dirs(wd) for r in tracker_runs.wandb_log(d)]
  assert {r["run"]["run_id"] for r in records if r["type"] == "run"} == {ids["wandb"]}
  summary = {k: v for r in records if r["type"] == "summary"
             for k, v in r["summary"].get("update", {}).items()}
  assert summary["evaluate/tuned/exact_match"] == 0.75 and summary["evaluate/base/loss"] == 2.5
  arts = {r["artifact"]["name"]: {m["path"] for m in r["artifact"]["manifest"]["contents"]}
          for r in records if r["type"] == "artifact"}
  assert arts == {f"run-{ids['wandb']}-eval": {"eval.json", "eval_report.md"}}
  # (MLflow alone: W&B's reopening by id is report_eval's above)
  again = trackers.open_all(tiny_config(**{"train.loggers": "mlflow"}), wd)
  assert [(t.name, t.run_id) for t in again] == [("mlflow", ids["mlflow"])]
  trackers.Trackers(again).close(ok=False)
  assert client.get_run(ids["mlflow"]).info.status == "FAILED"


def test_an_evaluation_without_tracker_runs_reports_nowhere(tmp_path):
  assert trackers.report_eval(tiny_config(**RUN), str(tmp_path), {"step": 1}, []) == []


def test_a_missing_tracker_package_is_one_line_naming_the_extra(monkeypatch, tmp_path):
  from jaxft.trainer import train
  monkeypatch.setitem(sys.modules, "mlflow", None)  # `import mlflow` raises ImportError
  wd = str(tmp_path / "run")
  with pytest.raises(trackers.TrackerError) as e:
    train(tiny_config(**{"train.loggers": "tensorboard,mlflow"}), wd)
  assert str(e.value) == ("train.loggers=tensorboard,mlflow: mlflow needs the mlflow package, "
                          "which is not installed: pip install 'jaxft[mlflow]'")
  assert not os.path.exists(wd)  # before anything was written


@pytest.mark.parametrize("spec,want", [
    ("", ()), ("none", ()), ("tensorboard", ("tensorboard",)),
    (" WandB , mlflow,wandb", ("wandb", "mlflow"))])
def test_logger_names(spec, want):
  assert trackers.names(spec) == want


def test_an_empty_project_names_the_key():
  with pytest.raises(ConfigError, match="train.project is empty"):
    trackers.check(tiny_config(**{"train.loggers": "mlflow", "train.project": " "}))


@needs_trackers
def test_mlflow_gets_metric_names_it_accepts(offline, tmp_path):
  """GRPO names a reward's metrics after its spec, regexes included: MLflow refuses most of
  their characters, so they are replaced rather than the tracker failing."""
  from mlflow.tracking import MlflowClient
  c = tiny_config(**{"train.loggers": "mlflow"})
  (t,) = trackers.open_all(c, str(tmp_path))
  key = "rewards/format:^[A-Z][^.]*\\.$/mean"
  t.log(1, {key: 0.5, "loss": 2.0})
  t.close(ok=True)
  got = MlflowClient(trackers.mlflow_uri(c, str(tmp_path))).get_run(t.run_id).data.metrics
  assert got == {"rewards/format:__A-Z___.___._/mean": 0.5, "loss": 2.0}


@needs_trackers
def test_an_mlflow_store_that_cannot_open_names_the_key(tmp_path):
  c = tiny_config(**{"train.loggers": "mlflow", "train.mlflow_uri": "foo://bar"})
  with pytest.raises(trackers.TrackerError, match=r"could not start an MLflow run on foo://bar "
                                                  r"\(train.mlflow_uri\)"):
    trackers.open_all(c, str(tmp_path))
  assert not os.path.exists(tmp_path / trackers.IDS_FILE)


def test_an_unknown_logger_names_the_key():
  with pytest.raises(ConfigError, match=r"train.loggers='tensorboard,comet': unknown logger "
                                        r"'comet'; expected a comma-separated subset of "
                                        r"tensorboard, wandb, mlflow"):
    trackers.names("tensorboard,comet")


def test_a_failing_tracker_warns_once_and_the_others_go_on(caplog):
  class Broken:
    name, run_id = "broken", None

    def log(self, step, values):
      raise OSError("server gone")

  class Good:
    name, run_id, rows, ended = "good", None, [], None

    def log(self, step, values):
      self.rows.append((step, values))

    def log_artifacts(self, paths):
      pass

    def close(self, ok):
      self.ended = ok

  good = Good()
  t = trackers.Trackers([Broken(), good])
  with caplog.at_level(logging.WARNING):
    t.log(1, {"loss": 2.0, "note": "text", "bad": float("nan")})
    t.log(2, {"loss": 1.5})
  assert good.rows == [(1, {"loss": 2.0}), (2, {"loss": 1.5})]
  assert caplog.text.count("server gone") == 1
  t.close(ok=True)
  assert good.ended is True


def test_tensorboard_reads_the_event_files_jaxft_writes(tmp_path, monkeypatch):
  """The TensorBoard tracker's files, read by TensorBoard's own event loader: the config as text,
  every scalar at its step (tags cleaned as TensorBoard spells them, float32 values), a run that
  opens twice (a resume) adding a second file, and the frames' CRC-32C that its reader checks."""
  from tensorboard.backend.event_processing import event_accumulator
  from jaxft import tb_events
  assert tb_events.crc32c(b"123456789") == 0xE3069283  # the Castagnoli check value
  c = tiny_config(**{"train.loggers": "tensorboard"})
  # the 9th and 10th writers of this process (a name count that sorted "10" before "9" once put
  # the resumed run's rows first; seen in the suite)
  monkeypatch.setattr(tb_events.EventWriter, "_opened", 8)
  for steps in ((1, 2), (3,)):
    (t,) = trackers.open_all(c, str(tmp_path))
    for s in steps:
      t.log(s, {"loss": 10.0 / s, "rewards/format:^A.*$/mean": 0.25 * s, "tokens/s": 1e6 + s})
    t.close(ok=True)
  logdir = tmp_path / "tensorboard"
  assert len(os.listdir(logdir)) == 2 and all(".tfevents." in n for n in os.listdir(logdir))
  acc = event_accumulator.EventAccumulator(str(logdir), size_guidance={"scalars": 0, "tensors": 0})
  acc.Reload()
  tags = acc.Tags()
  assert sorted(tags["scalars"]) == ["loss", "rewards/format__A.__/mean", "tokens/s"]
  assert [(e.step, e.value) for e in acc.Scalars("loss")] == [
      (1, 10.0), (2, 5.0), (3, pytest.approx(10 / 3, rel=1e-7))]
  assert [e.value for e in acc.Scalars("tokens/s")] == [1000001.0, 1000002.0, 1000003.0]
  assert acc.SummaryMetadata("config").plugin_data.plugin_name == "text"
  text = acc.Tensors("config")[0]
  assert json.loads(text.tensor_proto.string_val[0].decode()[4:-4])["train"]["loggers"] == \
      "tensorboard"
  # a frame whose data was changed fails TensorBoard's CRC check instead of reading as garbage
  path = os.path.join(logdir, sorted(os.listdir(logdir))[0])
  data = bytearray(open(path, "rb").read())
  data[-6] ^= 0xFF
  open(path, "wb").write(bytes(data))
  bad = event_accumulator.EventAccumulator(str(path), size_guidance={"scalars": 0})
  bad.Reload()
  assert [e.step for e in bad.Scalars("loss")] == [1]  # the damaged last record is dropped
