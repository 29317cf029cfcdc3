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


@pytest.fixture
def offline(tmp_path, monkeypatch):
  for k, v in tracker_runs.offline_env(str(tmp_path / "home")).items():
    monkeypatch.setenv(k, v)
  monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)  # (restored after: jaxft sets it)


def test_a_resumed_run_continues_the_same_tracker_runs(offline, tmp_path):
  """WORKDIR/trackers.json keeps the runs' ids: a resumed train (which opens the trackers again
  on its workdir) logs into the same W&B and MLflow runs, and marks a failed end."""
  wd = str(tmp_path / "run")
  os.makedirs(wd)
  c = tiny_config(**RUN)
  first = trackers.open_all(c, wd)
  trackers.Trackers(first).close(wd, ok=True)
  ids = json.load(open(os.path.join(wd, trackers.IDS_FILE)))
  assert set(ids) == {"wandb", "mlflow"}
  again = trackers.open_all(c, wd)
  assert {t.name: t.run_id for t in again} == ids
  trackers.Trackers(again).close(wd, ok=False)
  from mlflow.tracking import MlflowClient
  client = MlflowClient(tracking_uri=trackers.mlflow_uri(c, wd))
  assert client.get_run(ids["mlflow"]).info.status == "FAILED"


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
  t.close("/nonexistent", ok=True)
  assert good.ended is True
