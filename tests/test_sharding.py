"""Sharding across devices and processes.

In this process (one CPU device): the rules table and its config overrides, mesh and distributed
settings errors, the launch scripts. On 8 forced CPU devices (tests/multidevice_helper.py, one
subprocess per method) and with 2 processes x 4 devices (launch/local.sh): losses of sharded runs
against one device, where parameters and optimizer state live, bytes per device, bad meshes.
The three subprocesses start together and the tests read their results.
"""

import json
import os
import shlex
import subprocess
import sys

import numpy as np
import pytest
from jax.sharding import AbstractMesh, PartitionSpec as P

from conftest import ROOT
from jaxft import distributed, sharding
from jaxft.errors import ConfigError

RTOL = 1e-5
PARITY_MESHES = ("data=8", "fsdp=8", "data=2,fsdp=4", "fsdp=4,tensor=2")


# -- in this process ----------------------------------------------------------------------------

def test_rules_override_from_config_string():
  rules = sharding.parse_rules("embed=data+fsdp, vocab=none,mlp=fsdp")
  assert rules["embed"] == ("data", "fsdp") and rules["vocab"] is None and rules["mlp"] == "fsdp"
  assert rules["heads"] == sharding.RULES["heads"]  # untouched entries keep the default
  mesh = AbstractMesh((2, 4, 1, 1, 1), sharding.AXES)
  assert sharding.spec_for(("vocab", "embed"), (32000, 64), mesh, rules) == P(None, ("data", "fsdp"))
  # mlp and embed both ask for fsdp: the second use is replicated rather than an invalid spec
  assert sharding.spec_for(("layers", "embed", "mlp"), (2, 64, 128), mesh, rules) == \
      P(None, ("data", "fsdp"), None)
  # a dim the mesh axes do not divide stays whole
  assert sharding.spec_for(("layers", "embed"), (2, 62), mesh) == P(None, None)
  assert sharding.spec_for(("layers", "embed"), (2, 64), mesh) == P(None, "fsdp")


@pytest.mark.parametrize("text,needle", [
    ("embd=fsdp", "unknown logical axis 'embd'"),
    ("embed=model", "'model' is not a mesh axis"),
    ("embed", "expected LOGICAL=AXIS"),
    ("embed=fsdp+fsdp", "not a mesh axis"),
])
def test_bad_rules_are_config_errors(text, needle):
  with pytest.raises(ConfigError, match="config.mesh.rules") as e:
    sharding.parse_rules(text)
  assert needle in str(e.value)


@pytest.mark.parametrize("sizes,devices,needle", [
    ((3, 1, 1), 8, "uses 3 devices, but there are 8"),
    ((-1, 3, 1), 8, "does not divide the 8 devices"),
    ((-1, -1, 1), 8, "only one axis may be -1"),
    ((0, 1, 1), 8, "positive or -1"),
])
def test_mesh_sizes_that_do_not_fit_are_config_errors(sizes, devices, needle):
  class Cfg:
    data, fsdp, tensor = sizes
  with pytest.raises(ConfigError, match="config.mesh") as e:
    sharding.mesh_sizes(Cfg, devices)
  assert needle in str(e.value)


def test_mesh_sizes_fill_the_free_axis():
  class Cfg:
    data, fsdp, tensor = -1, 2, 2
  assert sharding.mesh_sizes(Cfg, 16) == {"data": 4, "fsdp": 2, "tensor": 2, "expert": 1,
                                            "context": 1}


def test_distributed_settings(monkeypatch):
  for k in ("JAXFT_DISTRIBUTED", "JAXFT_COORDINATOR", "JAXFT_NUM_PROCESSES", "JAXFT_PROCESS_ID",
            "SLURM_JOB_ID"):
    monkeypatch.delenv(k, raising=False)
  assert distributed.initialize() is False  # nothing asks for several processes: stay alone
  assert distributed.initialize("off", coordinator="localhost:1") is False
  with pytest.raises(ConfigError, match="--num_processes, --process_id not set"):
    distributed.initialize(coordinator="localhost:1")
  monkeypatch.setenv("JAXFT_NUM_PROCESSES", "2")
  monkeypatch.setenv("JAXFT_PROCESS_ID", "2")
  with pytest.raises(ConfigError, match=r"--process_id=2: must be in \[0, 2\)"):
    distributed.initialize(coordinator="localhost:1")
  monkeypatch.setenv("JAXFT_PROCESS_ID", "one")
  with pytest.raises(ConfigError, match="JAXFT_PROCESS_ID='one'"):
    distributed.initialize()
  with pytest.raises(ConfigError, match="expected one of auto, on, off"):
    distributed.initialize("yes")


def test_batch_rows_must_split_over_data_and_fsdp():
  mesh = sharding.make_mesh(type("Cfg", (), {"data": -1, "fsdp": 1, "tensor": 1}))
  sharding.check_batch(mesh, 8, 2)
  assert list(sharding.local_rows(mesh, 8, 2)) == list(range(8))  # one process builds every row
  big = AbstractMesh((2, 2, 1, 1, 1), sharding.AXES)
  with pytest.raises(ConfigError, match="data.batch_size=6 .* data\\*fsdp=4"):
    sharding.check_batch(big, 6, 1)


@pytest.mark.slow
def test_launch_scripts_parse_and_tpu_runs_on_all_workers():
  for name in ("local.sh", "gpu_host.sh", "slurm.sbatch", "tpu_vm.sh"):
    path = os.path.join(ROOT, "launch", name)
    assert os.access(path, os.X_OK), name
    subprocess.run(["bash", "-n", path], check=True)
  env = dict(os.environ, JAXFT_DRY_RUN="1")
  out = subprocess.run([os.path.join(ROOT, "launch", "tpu_vm.sh"), "my-tpu", "us-central2-b", "--",
                        "--config=configs/quickstart.py", "--workdir=/mnt/run one"],
                       env=env, capture_output=True, text=True, check=True).stdout.splitlines()
  ssh = [shlex.split(line) for line in out if " ssh " in line]
  assert len(ssh) == 2 and all("--worker=all" in cmd for cmd in ssh)  # install, then run
  assert "pip install" in ssh[0][-1] and "jaxft.train --distributed=on" in ssh[1][-1]
  # the command each worker runs keeps every argument whole
  assert shlex.split(ssh[1][-1])[-2:] == ["--config=configs/quickstart.py", "--workdir=/mnt/run one"]
  out = subprocess.run([os.path.join(ROOT, "launch", "slurm.sbatch"), "--config=c.py", "--workdir=w"],
                       env=env, capture_output=True, text=True, check=True).stdout
  assert out.startswith("srun ") and "jaxft.train --distributed=on --config=c.py --workdir=w" in out


# -- on 8 devices and 2 processes (subprocesses) --------------------------------------------------

def _helper(part, workdir):
  return subprocess.Popen([sys.executable, os.path.join(ROOT, "tests", "multidevice_helper.py"),
                           part, workdir], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """Starts the two helpers and the 2-process run together; returns their results."""
  sys.path.insert(0, os.path.join(ROOT, "tests"))
  from multidevice_helper import FAST_XLA, MULTIHOST
  tmp = tmp_path_factory.mktemp("sharding")
  mp_dir = str(tmp / "two-processes")
  env = dict(os.environ, XLA_FLAGS=FAST_XLA, PYTHON=sys.executable)
  local = subprocess.Popen(
      [os.path.join(ROOT, "launch", "local.sh"), "-n", "2", "-d", "4", "--",
       "--config=configs/quickstart.py", f"--workdir={mp_dir}",
       *[f"--config.{k}={v}" for k, v in MULTIHOST.items()]],
      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  procs = {"full": _helper("full", str(tmp)), "lora": _helper("lora", str(tmp))}
  out = {}
  for name, p in procs.items():
    stdout, stderr = p.communicate(timeout=900)
    assert p.returncode == 0, stderr[-4000:]
    out[name] = json.loads(stdout.strip().splitlines()[-1])
  stdout, stderr = local.communicate(timeout=900)
  out["local"] = {"returncode": local.returncode, "stdout": stdout, "stderr": stderr,
                  "workdir": mp_dir}
  return out


@pytest.mark.slow
@pytest.mark.parametrize("method", ["full", "lora"])
def test_sharded_losses_match_one_device(runs, method):
  losses = runs[method]["losses"]
  ref = np.array(losses["1"])
  assert len(ref) == 5 and ref[-1] < ref[0]  # it trains
  for name in PARITY_MESHES:
    np.testing.assert_allclose(losses[name], ref, rtol=RTOL, err_msg=f"{method} on mesh {name}")


@pytest.mark.slow
def test_grpo_samples_and_trains_the_same_on_a_sharded_mesh(runs):
  """GRPO (LoRA, top-p sampling, rl.iterations=2, KL to the base) through trainer.train on
  fsdp=4 x tensor=2 against one device: the same completions token for token (sampling reads
  the whole logits on every device: decode's `replicate`), so the same rewards and advantages;
  losses, gradient norms, KL and the trained weights within float32 reduction-order noise."""
  grpo = runs["lora"]["grpo"]
  one, sharded = grpo["1"], grpo["fsdp=4,tensor=2"]
  assert len(one["tokens"]) == 16 and sharded["tokens"] == one["tokens"]
  by = lambda run, key: [r[key] for r in run["rows"] if key in r]
  for key in ("reward", "reward_std", "completions/mean_length", "advantages/std",
              "clip_ratio/region_mean"):
    assert by(sharded, key) == by(one, key), key
  assert len(by(one, "loss")) == 4 and by(one, "kl")[-1] > 0
  for key in ("loss", "grad_norm", "kl"):  # (step 1's loss is ~1e-8: rounding around zero)
    np.testing.assert_allclose(by(sharded, key), by(one, key), rtol=RTOL, atol=1e-6, err_msg=key)
  leaves = sorted(one["params"])
  np.testing.assert_allclose([sharded["params"][k] for k in leaves],
                             [one["params"][k] for k in leaves], rtol=RTOL)


@pytest.mark.slow
def test_lora_and_adam_state_are_sharded_like_their_kernels(runs):
  layout = runs["lora"]["layout"]  # mesh fsdp=4 x tensor=2
  frozen = layout["frozen"]
  assert frozen["layers/q_proj/kernel"] == [None, "fsdp", "tensor"]
  assert frozen["layers/o_proj/kernel"] == [None, "tensor", "fsdp"]
  for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
    kernel = frozen[f"layers/{name}/kernel"]
    a, b = layout["trainable"][f"layers/{name}/lora_a"], layout["trainable"][f"layers/{name}/lora_b"]
    # A [L, in, r] and B [L, r, out] follow the kernel's axes; the one that fsdp does not split
    # that way has its rank split over fsdp (sharding.spread_over_fsdp), so none is whole per chip
    a_rank = None if kernel[1] == "fsdp" else "fsdp"
    b_rank = None if kernel[2] == "fsdp" else "fsdp"
    assert a == [None, kernel[1], a_rank] and b == [None, b_rank, kernel[2]], name
  assert layout["mu"] == layout["trainable"]  # Adam's moments live with their params


@pytest.mark.slow
def test_full_finetuning_state_is_sharded(runs):
  layout = runs["full"]["layout"]
  assert layout["trainable"]["embed/embedding"] == ["tensor", "fsdp"]
  assert layout["mu"] == layout["trainable"] and not layout["frozen"]


@pytest.mark.slow
def test_fsdp8_puts_an_eighth_of_the_model_on_each_device(runs):
  b = runs["full"]["bytes"]["fsdp=8"]
  assert b["devices"] == 8
  # norms (a few KiB) stay replicated; everything else is split eight ways
  assert max(b["per_device"]) <= b["total"] / 8 * 1.01
  assert sum(b["per_device"]) <= b["total"] * 1.06
  # the sharded init never builds the whole model on one device
  assert b["init_peak"] < b["total"] / 2
  # replicating `embed` through mesh.rules puts the whole model on every device
  assert min(runs["full"]["bytes"]["fsdp=8,embed=none"]["per_device"]) == b["total"]


@pytest.mark.slow
def test_bad_meshes_are_config_errors_before_anything_is_written(runs):
  bad = runs["full"]["bad"]
  assert "config.mesh.tensor=8 does not divide num_heads=4" in bad["tensor=8"]
  assert "uses 3 devices, but there are 8" in bad["data=3"]
  assert "does not divide the 8 devices" in bad["fsdp=3,data=-1"]
  assert "data.batch_size=4" in bad["rows"] and "data*fsdp=8" in bad["rows"]
  assert "config.mesh.rules" in bad["rules"] and "'model' is not a mesh axis" in bad["rules"]
  assert not any(bad[k + ":written"] for k in ("tensor=8", "data=3", "fsdp=3,data=-1"))


@pytest.mark.slow
def test_params_placed_elsewhere_are_moved_onto_the_rules(runs):
  before, after, untouched = runs["full"]["place"]
  assert before == [] and after == ["fsdp", "tensor"] and untouched


@pytest.mark.slow
def test_quantized_base_is_sharded_consistently(runs):
  nf4 = runs["full"]["nf4"]
  np.testing.assert_allclose(nf4["fsdp=4,tensor=2"], nf4["1"], rtol=RTOL)
  q = nf4["layout"]["layers/q_proj/kernel"]  # codes and scales of one column on one device
  assert isinstance(q, dict) and len(q) >= 2
  assert all(spec[0] is None for spec in q.values())  # the layer axis is scanned, never split
  assert any("tensor" in json.dumps(spec) for spec in q.values())


@pytest.mark.slow
def test_two_processes_match_one_process(runs):
  local = runs["local"]
  assert local["returncode"] == 0, local["stderr"][-4000:]
  for i in (0, 1):
    assert f"local.sh: process {i} exited with status 0" in local["stderr"]
  with open(os.path.join(local["workdir"], "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  losses = [r["loss"] for r in rows if "loss" in r]
  assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]  # written once, by process 0
  np.testing.assert_allclose(losses, runs["full"]["multihost"], rtol=RTOL)
  assert "in 2 processes" in local["stderr"]
  for i in (0, 1):  # each process builds only the rows of its own devices
    assert f"[p{i}] " in local["stderr"] and f"process {i} builds 8 of the 16 rows" in local["stderr"]
  assert len(os.listdir(os.path.join(local["workdir"], "tensorboard"))) == 1  # process 0 only
  assert os.listdir(os.path.join(local["workdir"], "checkpoints")) == ["5"]
