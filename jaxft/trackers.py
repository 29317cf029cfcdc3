"""Experiment trackers beside metrics.jsonl: `train.loggers=tensorboard,wandb,mlflow` (any subset).

Each tracker gets the resolved config when the run opens, every row metrics.jsonl gets (its finite
numbers: loss, lr, grad_norm, tokens/s, MFU, eval figures) at that row's step, and when the run
ends the run's files as artifacts: loss_curve.png, config.json, and the eval reports
(`jaxft.evaluate`'s eval*.json, eval_report*.md, reliability*.png) present in the workdir. Only
process 0 opens trackers. A tracker whose package is missing fails before anything is written
with one line naming the extra to install (`pip install 'jaxft[wandb]'`).

- tensorboard: event files under WORKDIR/tensorboard (and the config as text), written by
  jaxft.tb_events: no tensorboardX, TensorFlow or torch import.
- wandb: a W&B run in WORKDIR/wandb (project train.project, name train.run_name or the workdir's
  name; console capture off). With WANDB_MODE=offline it needs no network: `wandb sync
  WORKDIR/wandb/offline-run-*` uploads it later. The run's files go in one W&B artifact,
  `run-ID-files` (an evaluation's in `run-ID-eval`).
- mlflow: a run in experiment train.project on train.mlflow_uri, else $MLFLOW_TRACKING_URI, else a
  local store WORKDIR/mlruns (MLflow's file store, which needs no server or database: jaxft sets
  MLFLOW_ALLOW_FILE_STORE=true for it). The config goes in as flattened params.

A resumed run continues the same W&B and MLflow runs: their ids are kept in WORKDIR/trackers.json,
and `jaxft.evaluate` adds its figures and reports to them (report_eval). A tracker that fails while
logging is warned about once and left out: metrics.jsonl stays whole.
"""

from __future__ import annotations

import glob
import importlib
import json
import os
import re
import time

from absl import logging

from jaxft import files, tb_events
from jaxft.errors import ConfigError, JaxftError

LOGGERS = ("tensorboard", "wandb", "mlflow")
# logger -> (module imported, pip extra that installs it); tensorboard's files jaxft writes itself
_PACKAGES = {"wandb": ("wandb", "jaxft[wandb]"), "mlflow": ("mlflow", "jaxft[mlflow]")}
IDS_FILE = "trackers.json"
# The run's files logged as artifacts when it ends (those present).
ARTIFACT_PATTERNS = ("loss_curve.png", "config.json", "eval*.json", "eval_report*.md",
                     "reliability*.png")


class TrackerError(JaxftError):
  """A tracker could not start (its package, its server, its credentials)."""


def names(spec: str) -> tuple[str, ...]:
  """The loggers named by train.loggers (comma-separated; "" or "none" = none), in order, each
  once. Raises ConfigError naming the key for an unknown name."""
  out = []
  for name in (s.strip().lower() for s in str(spec).split(",")):
    if name in ("", "none"):
      continue
    if name not in LOGGERS:
      raise ConfigError(f"train.loggers={spec!r}: unknown logger {name!r}; expected a "
                        f"comma-separated subset of {', '.join(LOGGERS)} (or none)")
    if name not in out:
      out.append(name)
  return tuple(out)


def check(config) -> tuple[str, ...]:
  """train.loggers' names, each tracker's package imported; raises ConfigError (bad name) or
  TrackerError in one line naming the extra to install. Call before anything is written."""
  loggers = names(config.train.loggers)
  if {"wandb", "mlflow"} & set(loggers) and not str(config.train.project).strip():
    raise ConfigError("train.project is empty: the W&B project / MLflow experiment needs a name")
  for name in loggers:
    check_one(name, config.train.loggers)
  return loggers


def check_one(name: str, spec: str) -> None:
  """Imports the package of tracker `name`; TrackerError naming the extra when it is missing."""
  if name not in _PACKAGES:
    return
  module, extra = _PACKAGES[name]
  try:
    importlib.import_module(module)
  except ImportError:
    raise TrackerError(f"train.loggers={spec}: {name} needs the {module} package, which is not "
                       f"installed: pip install '{extra}'") from None


def run_name(config, workdir: str) -> str:
  """train.run_name, else the workdir's name."""
  return config.train.run_name or os.path.basename(os.path.abspath(workdir).rstrip(os.sep))


def flat_config(d: dict, prefix: str = "") -> dict[str, str]:
  """{"model.path": "...", "peft.lora.rank": "8", ...}: a nested config as dotted keys."""
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(flat_config(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v if isinstance(v, str) else json.dumps(v)
  return out


def scalars(values: dict) -> dict[str, float]:
  """The finite numbers of a metrics row (what trackers get; strings and NaN stay in the file)."""
  out = {}
  for k, v in values.items():
    if isinstance(v, bool) or not isinstance(v, (int, float)):
      continue
    if v == v and abs(v) != float("inf"):
      out[k] = float(v) if isinstance(v, float) else v
  return out


def artifacts(workdir: str) -> list[str]:
  """The run's files logged as artifacts (ARTIFACT_PATTERNS), those present, sorted."""
  found = set()
  for pattern in ARTIFACT_PATTERNS:
    found.update(p for p in glob.glob(os.path.join(workdir, pattern)) if os.path.isfile(p))
  return sorted(found)


class TensorBoard:
  """TensorBoard event files under WORKDIR/tensorboard (jaxft.tb_events: no package needed)."""
  name = "tensorboard"

  def __init__(self, config, workdir: str, run_id: str | None = None):
    del run_id
    self._w = tb_events.EventWriter(os.path.join(workdir, "tensorboard"))
    self.run_id = None
    self._w.text(0, "config", "```\n" + json.dumps(config.to_dict(), indent=1, default=str)
                 + "\n```")

  def log(self, step: int, values: dict) -> None:
    self._w.scalars(step, values)

  def log_summary(self, step: int, values: dict) -> None:
    self.log(step, values)

  def log_artifacts(self, paths: list[str], name: str) -> None:
    del paths, name  # the scalars are TensorBoard's own curves

  def close(self, ok: bool) -> None:
    del ok
    self._w.close()


class WandB:
  """A W&B run in WORKDIR/wandb (offline with WANDB_MODE=offline)."""
  name = "wandb"

  def __init__(self, config, workdir: str, run_id: str | None = None):
    import wandb
    self._wandb = wandb
    try:
      self._run = wandb.init(project=config.train.project, name=run_name(config, workdir),
                             dir=workdir, config=config.to_dict(), id=run_id, resume="allow",
                             settings=wandb.Settings(console="off"))
    except Exception as e:  # pylint: disable=broad-except  (wandb raises its own and others)
      msg = " ".join(str(e).split())[:300]
      raise TrackerError(f"train.loggers=wandb: could not start a W&B run: {type(e).__name__}: "
                         f"{msg} (WANDB_MODE=offline logs without network or login)") from None
    self.run_id = self._run.id

  def log(self, step: int, values: dict) -> None:
    self._run.log(values, step=step)

  def log_summary(self, step: int, values: dict) -> None:
    del step  # a resumed W&B run refuses steps before its last; figures of a run go in its summary
    self._run.summary.update(values)

  def log_artifacts(self, paths: list[str], name: str) -> None:
    art = self._wandb.Artifact(f"run-{self.run_id}-{name}", type="jaxft-run")
    for p in paths:
      art.add_file(p)
    self._run.log_artifact(art)

  def close(self, ok: bool) -> None:
    self._run.finish(exit_code=0 if ok else 1)


def mlflow_uri(config, workdir: str) -> str:
  """train.mlflow_uri, else $MLFLOW_TRACKING_URI, else WORKDIR/mlruns. A local directory (a
  path, or a file: URI) is MLflow's file store, allowed through MLFLOW_ALLOW_FILE_STORE."""
  uri = config.train.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI", "")
  if not uri or uri.startswith(("/", ".", "~")):
    uri = "file://" + os.path.abspath(os.path.expanduser(uri or os.path.join(workdir, "mlruns")))
  if uri.startswith("file:"):
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
  return uri


def mlflow_key(key: str) -> str:
  """`key` as an MLflow metric name: the characters MLflow refuses (a GRPO reward named by its
  regex, rewards/format:^A.*$/mean) become "_", and empty path parts go."""
  key = re.sub(r"[^/\w.\- :]", "_", key)
  return "/".join(p for p in key.split("/") if p not in ("", ".", ".."))


class MLflow:
  """An MLflow run through MlflowClient (no global active run) on mlflow_uri()."""
  name = "mlflow"

  def __init__(self, config, workdir: str, run_id: str | None = None):
    from mlflow.tracking import MlflowClient
    uri = mlflow_uri(config, workdir)
    try:
      self._client = c = MlflowClient(tracking_uri=uri)
      exp = c.get_experiment_by_name(config.train.project)
      exp_id = exp.experiment_id if exp else c.create_experiment(config.train.project)
      if run_id is None:
        run = c.create_run(exp_id, run_name=run_name(config, workdir),
                           tags={"jaxft.workdir": os.path.abspath(workdir)})
        self.run_id = run.info.run_id
        self._params(flat_config(config.to_dict()))
      else:  # a resumed run (its params are the first start's; MLflow never changes a param)
        self.run_id = run_id
        c.update_run(run_id, status="RUNNING")
    except Exception as e:  # pylint: disable=broad-except  (MlflowException, OSError, HTTP)
      msg = " ".join(str(e).split())[:300]
      raise TrackerError(f"train.loggers=mlflow: could not start an MLflow run on {uri} "
                         f"(train.mlflow_uri): {type(e).__name__}: {msg}") from None

  def _params(self, params: dict[str, str]) -> None:
    from mlflow.entities import Param
    items = [Param(k, v[:6000]) for k, v in params.items()]
    for i in range(0, len(items), 100):  # MLflow takes at most 100 params a call
      self._client.log_batch(self.run_id, params=items[i:i + 100])

  def log(self, step: int, values: dict) -> None:
    from mlflow.entities import Metric
    ms = int(time.time() * 1000)
    self._client.log_batch(self.run_id, metrics=[Metric(mlflow_key(k), v, ms, step)
                                                 for k, v in values.items()])

  def log_summary(self, step: int, values: dict) -> None:
    self.log(step, values)

  def log_artifacts(self, paths: list[str], name: str) -> None:
    del name
    for p in paths:
      self._client.log_artifact(self.run_id, p)

  def close(self, ok: bool) -> None:
    self._client.set_terminated(self.run_id, "FINISHED" if ok else "FAILED")


_CLASSES = {"tensorboard": TensorBoard, "wandb": WandB, "mlflow": MLflow}


def run_ids(workdir: str) -> dict[str, str]:
  """{tracker: run id} of WORKDIR/trackers.json ({} when there is none or it is unreadable)."""
  try:
    with open(os.path.join(workdir, IDS_FILE), encoding="utf-8") as f:
      ids = json.load(f)
  except (OSError, ValueError):
    return {}
  return ids if isinstance(ids, dict) else {}


def open_all(config, workdir: str) -> list:
  """Opens train.loggers' trackers for `workdir` (process 0 only), continuing the runs whose ids
  WORKDIR/trackers.json keeps, and records the ids. Raises TrackerError when one cannot start."""
  path = os.path.join(workdir, IDS_FILE)
  ids = run_ids(workdir)
  opened = []
  try:
    for name in check(config):
      opened.append(_CLASSES[name](config, workdir, ids.get(name)))
  except BaseException:
    for t in opened:
      t.close(ok=False)
    raise
  new = {t.name: t.run_id for t in opened if t.run_id}
  if new and new != {k: ids.get(k) for k in new}:
    files.write_json(path, dict(ids, **new))
  return opened


class Trackers:
  """The open trackers as one sink; a tracker that raises is warned about once and dropped."""

  def __init__(self, trackers: list):
    self._open = list(trackers)

  def _each(self, what: str, call) -> None:
    for t in list(self._open):
      try:
        call(t)
      except Exception as e:  # pylint: disable=broad-except  (a tracker never stops training)
        logging.warning("%s: %s failed (%s: %s); it logs nothing more in this run; "
                        "metrics.jsonl has every row", t.name, what, type(e).__name__, e)
        self._open.remove(t)

  def log(self, step: int, values: dict) -> None:
    values = scalars(values)
    if values:
      self._each("logging", lambda t: t.log(step, values))

  def log_summary(self, step: int, values: dict) -> None:
    values = scalars(values)
    if values:
      self._each("logging", lambda t: t.log_summary(step, values))

  def close(self, ok: bool, paths: list[str] = (), name: str = "files") -> None:
    """Logs `paths` as one artifact `name` when `ok`, then ends every tracker's run."""
    paths = list(paths) if ok else []
    if paths:
      self._each("logging the artifacts", lambda t: t.log_artifacts(paths, name))
    for t in self._open:
      try:
        t.close(ok)
      except Exception as e:  # pylint: disable=broad-except
        logging.warning("%s: closing its run failed (%s: %s)", t.name, type(e).__name__, e)
    self._open = []


def eval_figures(result: dict, label: str = "") -> dict[str, float]:
  """The numbers of a jaxft.evaluate result per model: {"evaluate/tuned/exact_match": ...}
  (evaluate_LABEL/... for a labelled evaluation)."""
  prefix = f"evaluate_{label}" if label else "evaluate"
  return {f"{prefix}/{name}/{k}": v for name in ("tuned", "base")
          for k, v in scalars(result.get(name) or {}).items()}


def report_eval(config, workdir: str, result: dict, paths: list[str], label: str = "") -> list:
  """Adds a jaxft.evaluate result to the W&B and MLflow runs of WORKDIR's training (those
  WORKDIR/trackers.json names, of train.loggers): its figures (eval_figures: in the W&B run's
  summary, as MLflow metrics at the evaluated step) and `paths` (eval.json, the report, the
  samples, the plot) as artifacts. Returns the trackers it opened. Never raises: the evaluation
  is written already, so a tracker that fails is a warning."""
  ids = run_ids(workdir)
  try:
    wanted = [n for n in names(config.train.loggers) if n in ids and n != "tensorboard"]
  except ConfigError as e:
    logging.warning("evaluation not reported to any tracker: %s", e)
    return []
  done = []
  for name in wanted:
    try:
      check_one(name, config.train.loggers)
      tracker = _CLASSES[name](config, workdir, ids[name])
    except Exception as e:  # pylint: disable=broad-except
      logging.warning("evaluation not reported to %s: %s", name, e)
      continue
    sink = Trackers([tracker])
    sink.log_summary(int(result.get("step") or 0), eval_figures(result, label))
    sink.close(True, [p for p in paths if os.path.isfile(p)],
               f"eval-{label}" if label else "eval")
    done.append(name)
  return done
