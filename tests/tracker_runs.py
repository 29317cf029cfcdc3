"""Reading back what train.loggers=wandb,mlflow left in a workdir, with each library's own reader
(tests/test_train_cli.py's three-step run; tests/test_trackers.py)."""

import importlib.util
import json
import os
import subprocess
import sys

from jaxft import trackers


def installed() -> bool:
  """Whether wandb and mlflow can be imported (the test extra has them)."""
  return all(importlib.util.find_spec(m) is not None for m in ("wandb", "mlflow"))


def offline_env(scratch: str) -> dict:
  """Variables for an offline W&B run whose caches stay in `scratch`, and no MLflow server."""
  env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "MLFLOW_TRACKING_URI": ""}
  for var in ("WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_ARTIFACT_DIR"):
    env[var] = os.path.join(scratch, var.lower())
  return env


def metrics_by_step(workdir: str) -> dict[int, dict]:
  """metrics.jsonl's finite numbers merged per step (the train and eval rows of one step are one
  step to a tracker)."""
  out = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      r = json.loads(line)
      out.setdefault(r["step"], {}).update(
          trackers.scalars({k: v for k, v in r.items() if k != "step"}))
  return out


def _config(workdir: str) -> dict:
  with open(os.path.join(workdir, "config.json")) as f:
    return json.load(f)


def _ids(workdir: str) -> dict:
  with open(os.path.join(workdir, trackers.IDS_FILE)) as f:
    return json.load(f)


def wandb_run_dirs(workdir: str) -> list[str]:
  """The offline W&B run directories of the workdir (a resumed run adds one), oldest first."""
  base = os.path.join(workdir, "wandb")
  return [os.path.join(base, d) for d in sorted(os.listdir(base)) if d.startswith("offline-run-")]


def wandb_log(run_dir: str) -> list[dict]:
  """The records of an offline W&B run's .wandb log, as wandb's own reader prints them
  (`wandb leet inspect --json`)."""
  r = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", run_dir],
                     capture_output=True, text=True, timeout=120)
  assert r.returncode == 0, r.stderr[-2000:]
  return [json.loads(line) for line in r.stdout.splitlines() if line.strip()]


def wandb_records(workdir: str) -> list[dict]:
  """The records of the workdir's one offline W&B run."""
  runs = wandb_run_dirs(workdir)
  assert len(runs) == 1, runs
  return wandb_log(runs[0])


def check_wandb(workdir: str) -> None:
  """The offline W&B run holds metrics.jsonl's numbers at their steps, the config, and the loss
  curve and config.json as an artifact; it finished."""
  records = wandb_records(workdir)
  history = {h["history"]["step"].get("num", 0): {k: v for k, v in h["history"]["item"].items()
                                                  if not k.startswith("_")}
             for h in records if h["type"] == "history"}
  assert history == metrics_by_step(workdir)
  run = next(r["run"] for r in records if r["type"] == "run")
  assert run["project"] == "jaxft" and run["display_name"] == os.path.basename(workdir)
  assert run["run_id"] == _ids(workdir)["wandb"]
  assert {k: v for k, v in run["config"]["update"].items() if k != "_wandb"} == _config(workdir)
  art = next(r["artifact"] for r in records if r["type"] == "artifact")
  assert {"loss_curve.png", "config.json"} <= {m["path"] for m in art["manifest"]["contents"]}
  assert next(r for r in records if r["type"] == "exit")["exit"].get("exit_code", 0) == 0


def check_mlflow(workdir: str) -> None:
  """The MLflow run in WORKDIR/mlruns holds metrics.jsonl's numbers (get_metric_history), the
  config as params, and the loss curve and config.json as artifacts; it finished."""
  from mlflow.tracking import MlflowClient
  before = os.environ.get("MLFLOW_ALLOW_FILE_STORE")
  os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"  # (as README says: MLflow 3 asks for it)
  try:
    _check_mlflow(MlflowClient(
        tracking_uri="file://" + os.path.abspath(os.path.join(workdir, "mlruns"))), workdir)
  finally:
    if before is None:
      del os.environ["MLFLOW_ALLOW_FILE_STORE"]
    else:
      os.environ["MLFLOW_ALLOW_FILE_STORE"] = before


def _check_mlflow(client, workdir: str) -> None:
  run_id = _ids(workdir)["mlflow"]
  run = client.get_run(run_id)
  assert run.info.status == "FINISHED" and run.info.run_name == os.path.basename(workdir)
  assert client.get_experiment(run.info.experiment_id).name == "jaxft"
  want = metrics_by_step(workdir)
  keys = {k for m in want.values() for k in m}
  assert {"loss", "lr", "tokens_per_sec", "eval_loss"} <= keys and set(run.data.metrics) == keys
  for key in keys:
    got = sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
    assert got == sorted((s, m[key]) for s, m in want.items() if key in m), key
  assert run.data.params == trackers.flat_config(_config(workdir))
  assert {"loss_curve.png", "config.json"} <= {a.path for a in client.list_artifacts(run_id)}
