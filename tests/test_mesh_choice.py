"""The mesh jaxft chooses when config.mesh is left at its defaults (jaxft/mesh_choice.py): data
parallelism for a model whose replica fits a chip, fsdp for one that does not, an explicit mesh
never changed. No TPU compile: the choice comes from shapes (jax.eval_shape) and the chip table."""

import os
import subprocess
import sys
import types

import jax
import ml_collections
import pytest

from conftest import forced_devices_flags, tiny_config
from configs import llama3
from jaxft import mesh_choice, plan as plan_lib, sharding
from jaxft.errors import ConfigError


def _v5e(n):
  """n stand-ins for deviceless v5e chips: what the memory table and the estimate read of them."""
  return [types.SimpleNamespace(platform="tpu", device_kind="TPU v5 lite", process_index=0,
                                memory_stats=lambda: None) for _ in range(n)]


def _llama8b(method, batch=16, **mesh):
  c = llama3.get_config(f"size=8b,method={method}")
  c.data.batch_size = batch
  for k, v in mesh.items():
    c.mesh[k] = v
  return c


def test_an_8b_lora_on_v5e_2x2_is_sharded_over_the_four_chips():
  config, choice = mesh_choice.resolve(_llama8b("lora"), _v5e(4))
  # 8B bf16 weights (15 GiB) cannot be whole on a 15.75 GiB chip beside anything else
  assert (config.mesh.data, config.mesh.fsdp) == (1, 4) and choice.chosen
  assert "fsdp=4 chosen by jaxft" in choice.reason and "15.75 GiB" in choice.reason
  assert sharding.mesh_sizes(config.mesh, 4)["fsdp"] == 4


def test_a_quantized_8b_that_fits_a_chip_keeps_data_parallelism():
  config, choice = mesh_choice.resolve(_llama8b("qlora"), _v5e(4))
  assert (config.mesh.data, config.mesh.fsdp) == (4, 1)  # NF4 base: 5.4 GiB per replica
  assert "data parallelism" in choice.reason


def test_a_tiny_model_gets_data_parallelism_on_eight_chips():
  need = mesh_choice.estimate(tiny_config())
  choice = mesh_choice.choose(tiny_config().mesh, 8, 15.75, need, rows=8)
  assert (choice.data, choice.fsdp, choice.chosen) == (8, 1, True)


@pytest.mark.parametrize("mesh,expected", [
    ({"data": 1, "fsdp": -1}, (1, 4)),   # the flags docs/scale.md used to need
    ({"fsdp": 1}, (4, 1)),               # weights replicated on purpose, even where they do not fit
    ({"fsdp": 2}, (2, 2)),               # data=-1 takes what fsdp leaves
    ({"data": 2}, (2, 2)),               # fsdp=0 with data set: what data leaves
])
def test_a_mesh_the_config_sets_is_never_changed(mesh, expected):
  given = _llama8b("lora", **mesh)
  config, choice = mesh_choice.resolve(given, _v5e(4))
  assert config is given and not choice.chosen and "as config.mesh sets it" in choice.reason
  assert sharding.mesh_sizes(config.mesh, 4)["data"] == expected[0]
  assert sharding.mesh_sizes(config.mesh, 4)["fsdp"] == expected[1]
  choice = mesh_choice.choose(given.mesh, 4, 15.75, mesh_choice.Need(0, 0, 0), rows=16)
  assert (choice.data, choice.fsdp, choice.chosen) == (*expected, False)


def test_a_batch_the_chosen_mesh_cannot_split_names_the_keys():
  with pytest.raises(ConfigError, match="data.batch_size") as e:
    mesh_choice.resolve(_llama8b("lora", batch=6), _v5e(4))
  assert "multiple of 4" in str(e.value) and "config.mesh.fsdp" in str(e.value)


def test_other_axes_set_by_hand_take_their_chips_first():
  # tensor=2 halves each chip's share of the weights (7.6 GiB): the 2 chips left take data
  config, choice = mesh_choice.resolve(_llama8b("lora", batch=4, tensor=2), _v5e(4))
  assert sharding.mesh_sizes(config.mesh, 4) == {
      "data": 2, "fsdp": 1, "tensor": 2, "expert": 1, "context": 1}
  assert "tensor=2" in choice.reason
  config, choice = mesh_choice.resolve(_llama8b("lora", context=-1), _v5e(4))
  assert (config.mesh.data, config.mesh.fsdp, config.mesh.context) == (1, 1, -1)


def test_unresolved_defaults_still_make_todays_data_parallel_mesh():
  # evaluate, generate and serve build the mesh without a choice: weights replicated
  cfg = ml_collections.ConfigDict({"data": -1, "fsdp": 0, "tensor": 1})
  assert sharding.mesh_sizes(cfg, 8) == {"data": 8, "fsdp": 1, "tensor": 1, "expert": 1,
                                         "context": 1}


def test_the_plan_on_one_cpu_says_which_mesh_and_why():
  config = tiny_config(**{"data.batch_size": 2, "data.max_len": 32})
  r = plan_lib.plan(config, "local", time=False)
  assert r["mesh"]["data"] * r["mesh"]["fsdp"] == jax.device_count() == 1
  assert "one device left" in r["mesh_choice"]
  assert r["mesh_choice"] in plan_lib.format_report(r)


def test_eight_forced_cpu_devices_keep_todays_data_parallel_mesh():
  # (a subprocess: the forced device count must be set before jax starts)
  code = ("import jax; from conftest import tiny_config; from jaxft import mesh_choice; "
          "c, ch = mesh_choice.resolve(tiny_config(), jax.devices()); "
          "print(jax.device_count(), c.mesh.data, c.mesh.fsdp, ch.chosen)")
  env = dict(os.environ, XLA_FLAGS=forced_devices_flags(8),
             JAX_PLATFORMS="cpu")
  r = subprocess.run([sys.executable, "-c", code], cwd=os.path.dirname(__file__), env=env,
                     capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
  assert r.stdout.split() == ["8", "8", "1", "True"]
