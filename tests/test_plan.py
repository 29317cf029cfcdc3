"""jaxft.plan (the train step compiled for a TPU topology without a TPU, or for local devices) and
the persistent compilation cache."""

import importlib.metadata
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.experimental.compilation_cache import compilation_cache as cc

from conftest import ROOT, tiny_config
from jaxft import memory, plan as plan_lib, target, trainer
from jaxft.errors import ConfigError
from jaxft.models.config import ModelConfig

# libtpu lives outside the test venv, in ROOT/.libtpu (tools/install_test_deps.sh puts it there):
# installed into the venv it makes every CPU-only jax process probe for a TPU and print errors.
LIBTPU = os.path.join(ROOT, ".libtpu")


def _libtpu_dir() -> str:
  """The directory holding the libtpu package matching this jax (installed on first use), or a
  skip that says why it cannot be had."""
  if os.path.isdir(os.path.join(LIBTPU, "libtpu")):
    return LIBTPU
  reqs = [r.split(";")[0].strip() for r in importlib.metadata.requires("jax") or []
          if r.startswith("libtpu") and "tpu" in r]
  if not reqs:
    pytest.skip(f"jax {jax.__version__} names no libtpu wheel, so no deviceless TPU compile")
  r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target",
                      LIBTPU, reqs[0]], capture_output=True, text=True)
  if r.returncode:
    pytest.skip(f"the libtpu wheel ({reqs[0]}) cannot be installed here, so the deviceless TPU "
                f"plan cannot run: {r.stderr.strip().splitlines()[-1:]}")
  return LIBTPU


def _plan(args, libtpu=None, timeout=900):
  env = dict(os.environ)
  if libtpu:
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [libtpu, env.get("PYTHONPATH")]))
  return subprocess.run([sys.executable, "-m", "jaxft.plan", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout)


def _config_only_checkpoint(directory, layers=2):
  """An HF model directory with config.json alone: no weights file exists to be read."""
  os.makedirs(directory)
  cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 512,
         "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": layers,
         "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 128,
         "max_position_embeddings": 1024, "rms_norm_eps": 1e-5, "tie_word_embeddings": False}
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(cfg, f)
  return directory


@pytest.mark.slow
def test_plan_for_v5e_2x2_without_a_tpu_or_weights(tmp_path):
  libtpu = _libtpu_dir()
  model = _config_only_checkpoint(str(tmp_path / "model"))
  r = _plan(["--config=configs/quickstart.py", "--topology=v5e:2x2", "--json", "--time=false",
             f"--config.model.path={model}", "--config.model.dtype=bfloat16",
             "--config.model.param_dtype=bfloat16", "--config.data.max_len=256",
             "--config.data.batch_size=8", "--config.mesh.data=1", "--config.mesh.fsdp=-1"], libtpu)
  assert r.returncode == 0, r.stderr[-3000:]
  plan = json.loads(r.stdout[r.stdout.index("{"):])
  assert plan["chips"] == 4 and "v5 lite" in plan["device_kind"].lower()
  assert plan["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1, "expert": 1, "context": 1}
  assert plan["fits"] is True and plan["chip_gib"] == 15.75  # what XLA may use of 16 GiB
  assert 0 < plan["total_gib"] < 1
  g = plan["gib"]
  # the bf16 base: embedding, output projection and 2 x 7 kernels split four ways (fsdp), the
  # norms (1,280 values) whole on every chip; LoRA a little of it
  split = 2 * 512 * 256 + 2 * (2 * 256 * 256 + 2 * 256 * 128 + 3 * 256 * 512)
  assert g["frozen_params"] * 2**30 == pytest.approx(split * 2 / 4 + 1280 * 2, rel=1e-6)
  assert 0 < g["trainable_params"] < g["frozen_params"]
  assert g["optimizer_state"] >= 2 * g["trainable_params"] * 0.99  # Adam's two moments
  assert plan["attention"] == "splash"  # chosen for the TPU target, not this CPU host
  assert plan["largest_buffers"] and plan["flops_per_step"] > 0
  assert os.listdir(model) == ["config.json"]


@pytest.mark.slow
def test_a_plan_that_does_not_fit_exits_1_with_the_knobs():
  r = _plan(["--config=configs/quickstart.py", "--config.model.preset=tiny", "--time=false",
             "--memory_gib=0.0001", "--config.data.batch_size=4", "--config.data.max_len=64"])
  assert r.returncode == 1, r.stderr[-3000:]
  assert "compiling the train step of the tiny preset" in r.stderr  # before minutes of silence
  assert "DOES NOT FIT" in r.stdout
  assert "--config.model.remat=full" in r.stdout and "--config.data.max_len=32" in r.stdout


@pytest.mark.parametrize("value", [-5.0, float("nan"), float("inf")])
def test_a_negative_or_nan_memory_gib_is_refused(value):
  """--memory_gib=-5 (or nan) was ignored: the plan then judged against the chip's own memory."""
  with pytest.raises(ConfigError, match=rf"--memory_gib={value}: must be a finite number"):
    plan_lib.plan(tiny_config(), memory_gib=value)


def test_a_host_without_a_tpu_stays_quiet_with_libtpu_installed():
  """libtpu installed for plans (pip install ".[tpu]") made every jaxft command on a CPU host
  print libtpu's errors ("unexpected worker hostname"); the commands' start-up now keeps it
  quiet, and the deviceless TPU topology still builds."""
  from jaxft import cli
  assert cli.quiet_tpu_env({}, has_libtpu=False, tpu_chips=0, other_accelerator=False) == {}
  assert cli.quiet_tpu_env({}, has_libtpu=True, tpu_chips=4, other_accelerator=False) == {}
  assert cli.quiet_tpu_env({}, True, 0, True).get("JAX_PLATFORMS") is None  # a GPU stays seen
  assert "JAX_PLATFORMS" not in cli.quiet_tpu_env({"JAX_PLATFORMS": "tpu"}, True, 0, False)
  libtpu = _libtpu_dir()
  env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_PLATFORMS", "TPU_"))}
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [libtpu, env.get("PYTHONPATH")]))
  code = ("from jaxft import cli; cli.quiet_without_tpu(); import jax; print(jax.devices()[0].platform);"
          "from jax.experimental import topologies;"
          "print(len(topologies.get_topology_desc(platform='tpu', topology_name='v5e:2x2').devices))")
  r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                     text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  assert r.stdout.split() == ["cpu", "4"]
  assert "TPU" not in r.stderr and "libtpu" not in r.stderr, r.stderr[-3000:]


# XLA's TPU compiler refusing Llama-3-70B QLoRA at batch 8 x 2048 on v5e:2x2 (libtpu 0.0.42)
_XLA_OOM = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
            "temporaries (17.01G) exceeds available HBM (15.75G).")


def test_xla_refusing_a_program_for_memory_reads_as_its_sizes():
  needed, available = plan_lib.refused_for_memory("jax.errors.JaxRuntimeError: " + _XLA_OOM)
  assert needed == pytest.approx(17.01 * 2**30) and available == pytest.approx(15.75 * 2**30)
  assert plan_lib.refused_for_memory("RESOURCE_EXHAUSTED: something else") is None
  assert plan_lib.refused_for_memory("INVALID_ARGUMENT: (17.01G) (15.75G)") is None


def test_compile_refusals_read_as_not_fitting_or_as_a_named_limit():
  """XLA's refusal for HBM is a step that does not fit (its sizes kept); a refusal for another
  limit (the splash kernel's scalar memory at 393,216 tokens on v5p, libtpu 0.0.42) is an error
  that says which limit and what to turn, not a traceback."""
  def refusing(message):
    def compile_fn():
      raise jax.errors.JaxRuntimeError(message)
    return compile_fn

  m = memory.measure(refusing(_XLA_OOM), jax.devices()[0])
  assert m.fits is False and m.refused[0] == pytest.approx(17.01 * 2**30)
  smem = ("RESOURCE_EXHAUSTED: Allocation (size=1179648) would exceed memory (size=1048576) :: "
          "#allocation3 [shape = 'u8[1179648]{0}', space=smem, size = 0x120000, scoped, tag = "
          "'prefetched SMEM operand 0'] :: splash_mqa_fwd_segmented_residuals.16")
  with pytest.raises(ConfigError, match=r"XLA cannot compile this step: .*size=1179648.*scalar "
                     r"memory \(SMEM\).*--config.data.max_len"):
    memory.measure(refusing(smem), jax.devices()[0])
  with pytest.raises(jax.errors.JaxRuntimeError, match="INTERNAL"):
    memory.measure(refusing("INTERNAL: something else"), jax.devices()[0])


def test_time_estimate_counts_the_attention_kernel_and_never_passes_the_peak():
  # The v5p 128k row: XLA's cost model gives the splash kernel (a custom call) no time.
  r = {"xla_step_seconds": 15.6, "peak_tflops": 459.0, "chips": 1, "batch": 1, "seq": 131072,
       "attention": "splash", "flops_per_step": 1.80e16, "attention_flops_per_step": 1.39e16}
  t = plan_lib.timing(r)
  kernel = 1.39e16 / 459e12
  assert t["step_seconds"] == pytest.approx(15.6 + kernel)
  assert t["tokens_per_sec_per_chip"] == pytest.approx(131072 / (15.6 + kernel))
  assert 0.5 < t["mfu"] < 1.0
  # jaxft's einsum attention is inside XLA's program: its time is XLA's alone.
  t = plan_lib.timing(dict(r, attention="einsum", flops_per_step=1.0e15))
  assert t["step_seconds"] == 15.6 and t["mfu"] == pytest.approx(1.0e15 / 15.6 / 459e12)
  # An estimate faster than the chip's peak is broken: unknown, not a figure above 100%.
  t = plan_lib.timing(dict(r, attention="einsum"))
  assert t["tokens_per_sec_per_chip"] is None and t["mfu"] is None
  # No cost-model time, or a kernel with no known peak to cost it at: unknown.
  assert plan_lib.timing(dict(r, xla_step_seconds=None))["tokens_per_sec_per_chip"] is None
  assert plan_lib.timing(dict(r, peak_tflops=None))["step_seconds"] is None


def test_the_knobs_table_names_batch_accum_remat_mesh_and_seq():
  r = {"batch": 8, "accum": 1, "remat": "full", "seq": 2048, "quant": "nf4", "method": "lora",
       "chips": 4, "mesh": {"data": 2, "fsdp": 2, "tensor": 1}}
  rows = {k: (now, try_) for k, now, try_ in plan_lib.knobs(r)}
  assert list(rows)[:5] == ["batch", "accum", "remat", "mesh", "seq"]
  assert rows["batch"] == ("8 rows", "--config.data.batch_size=4")
  assert rows["accum"][1].startswith("--config.optim.accum_steps=2")
  assert rows["remat"][1].startswith("--config.model.remat=offload")
  assert rows["mesh"] == ("data=2, fsdp=2, tensor=1",
                          "--config.mesh.fsdp=-1 --config.mesh.data=1 (shard every weight over "
                          "all chips)")
  assert rows["seq"][1].startswith("--config.data.max_len=1024")
  # one row per chip already: no accumulation left to turn
  assert dict((k, t) for k, _, t in plan_lib.knobs(dict(r, batch=4)))["accum"] == ""


@pytest.mark.slow
def test_a_program_xla_refuses_for_memory_is_reported_as_not_fitting(tmp_path):
  libtpu = _libtpu_dir()
  model = _config_only_checkpoint(str(tmp_path / "model"))
  r = _plan(["--config=configs/quickstart.py", "--topology=v5e:2x2", "--time=false",
             f"--config.model.path={model}", "--config.model.dtype=bfloat16",
             "--config.model.param_dtype=bfloat16", "--config.data.max_len=256",
             "--config.data.batch_size=65536", "--config.mesh.data=1", "--config.mesh.fsdp=-1"],
            libtpu)
  assert r.returncode == 1, r.stderr[-3000:]
  assert "Traceback" not in r.stderr
  assert "DOES NOT FIT (XLA refused the program" in r.stdout
  assert "of the 15.75 GiB it may use" in r.stdout
  for knob in ("batch", "accum", "remat", "mesh", "seq"):
    assert f"\n    {knob} " in r.stdout
  assert "--config.data.batch_size=32768" in r.stdout
  assert "--config.data.max_len=128" in r.stdout


@pytest.mark.slow
def test_remat_auto_offloads_when_full_does_not_fit(tmp_path):
  """model.remat=auto on a TPU: 32 layers at 2,048 rows x 256 tokens per chip do not fit with full
  rematerialisation (the saved layer inputs alone are 8 GiB); auto then compiles remat=offload,
  which fits with those inputs in host memory, and says so. (One chip of a v5e:2x2: the choice
  is per chip, and the two compiles take 85 s of CPU on one against 110 s on four.)"""
  libtpu = _libtpu_dir()
  model = _config_only_checkpoint(str(tmp_path / "model"), layers=32)
  args = ["--config=configs/quickstart.py", "--topology=v5e:2x2", "--chips=1", "--json",
          "--time=false", f"--config.model.path={model}", "--config.model.dtype=bfloat16",
          "--config.model.param_dtype=bfloat16", "--config.data.max_len=256",
          "--config.data.batch_size=2048", "--config.mesh.data=1", "--config.mesh.fsdp=-1"]
  r = _plan(args + ["--config.model.remat=auto"], libtpu)
  assert r.returncode == 0, r.stderr[-3000:]
  plan = json.loads(r.stdout[r.stdout.index("{"):])
  assert plan["remat"] == "offload" and plan["fits"] is True, plan
  assert plan["total_gib"] < 15.75 and plan["host_gib"] == pytest.approx(8.0, rel=0.01)
  # the largest buffer, the 32 layers' saved inputs, is the one in host memory
  assert plan["largest_buffers"][0]["shape"] == "bf16[32,2048,256,256]"
  assert plan["largest_buffers"][0]["memory"] == "host"
  assert all(b["memory"] == "device" for b in plan["largest_buffers"][1:])
  note = plan["remat_note"]
  assert note.startswith("model.remat=auto chose offload") and "with full the step does not fit" in note
  full = float(note.split("does not fit (")[1].split(" GiB")[0])
  assert full > 15.75 and full > plan["total_gib"] + 7.5  # the 8 GiB of inputs moved off the chip


def _measured(gib, refused=False):
  return memory.Measured(None, None if refused else int(gib * memory.GIB),
                         (gib * memory.GIB, 15.75 * memory.GIB) if refused else None, "", 15.75)


_TINY_CFG = ModelConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1,
                        num_heads=1, num_kv_heads=1, head_dim=8)


def _recorded(asked, sizes):
  """A measure_with for fitting_remat: each choice asked is appended to `asked`; its Measured is
  sizes[choice]."""
  def m(choice):
    asked.append(choice)
    return sizes[choice]
  return m


def test_remat_auto_chooses_offload_only_on_accelerators_and_only_when_full_does_not_fit():
  cfg = _TINY_CFG
  asked = []
  measure = lambda sizes: _recorded(asked, sizes)

  # an explicit policy, and auto on CPU (dots): nothing compiled, nothing chosen
  assert trainer.fitting_remat(cfg.replace(remat="full"), measure({})) == ("full", None, "")
  assert trainer.fitting_remat(cfg.replace(remat="auto"), measure({})) == ("auto", None, "")
  assert asked == []
  auto = cfg.replace(remat="auto")
  with target.building_for("tpu"):
    policy, m, note = trainer.fitting_remat(auto, measure({None: _measured(12.0)}))
    assert (policy, m.bytes, note) == ("full", int(12 * memory.GIB), "") and asked == [None]
    policy, m, note = trainer.fitting_remat(
        auto, measure({None: _measured(17.0, refused=True), "offload": _measured(9.0)}))
    assert policy == "offload" and m.fits
    assert "XLA refused it, its temporaries alone needing 17.00 GiB of the 15.75" in note
    assert "with offload it needs 9.00 GiB per chip of 15.75" in note
    policy, m, note = trainer.fitting_remat(
        auto, measure({None: _measured(20.0), "offload": _measured(16.5)}))
    assert policy == "full" and not m.fits and "fits neither with full (20.00 GiB" in note


def test_remat_auto_tiles_the_mlp_of_long_rows_before_offloading():
  """For a chip's part of a row longer than AUTO_MLP_TILE tokens (and no model.mlp_tile set),
  auto tries full with the MLP tiled before offload, and offload with the MLP tiled last; the
  chosen config carries the tile; short rows and a tile set by hand never try one."""
  cfg = _TINY_CFG.replace(remat="auto")
  tile = trainer.AUTO_MLP_TILE
  assert trainer.remat_choices(cfg, 4 * tile) == [None, "full+mlp_tile", "offload",
                                                  "offload+mlp_tile"]
  assert trainer.remat_choices(cfg, tile) == [None, "offload"]
  assert trainer.remat_choices(cfg.replace(mlp_tile=512), 4 * tile) == [None, "offload"]
  assert trainer.with_choice(cfg, "offload+mlp_tile").remat == "offload"
  assert trainer.with_choice(cfg, "offload+mlp_tile").mlp_tile == tile
  assert trainer.with_choice(cfg, "offload").mlp_tile == 0
  asked = []
  measure = lambda sizes: _recorded(asked, sizes)
  with target.building_for("tpu"):
    choice, m, note = trainer.fitting_remat(cfg, measure(
        {None: _measured(40.0, refused=True), "full+mlp_tile": _measured(14.0)}), 4 * tile)
    assert (choice, asked) == ("full+mlp_tile", [None, "full+mlp_tile"])
    assert note.startswith(f"model.remat=auto chose full with model.mlp_tile={tile}")
    asked.clear()
    choice, m, note = trainer.fitting_remat(cfg, measure(
        {None: _measured(90.0, refused=True), "full+mlp_tile": _measured(60.0, refused=True),
         "offload": _measured(12.0), "offload+mlp_tile": _measured(10.0)}), 4 * tile)
    assert choice == "offload" and asked == [None, "full+mlp_tile", "offload"]
    asked.clear()
    choice, m, note = trainer.fitting_remat(cfg, measure(
        {None: _measured(90.0), "full+mlp_tile": _measured(60.0), "offload": _measured(20.0),
         "offload+mlp_tile": _measured(15.0)}), 4 * tile)
    assert choice == "offload+mlp_tile" and "in slices" in note
    choice, m, note = trainer.fitting_remat(cfg, measure(
        {None: _measured(90.0), "full+mlp_tile": _measured(60.0), "offload": _measured(20.0),
         "offload+mlp_tile": _measured(16.0)}), 4 * tile)
    assert choice == "full" and "nor with offload+mlp_tile (16.00 GiB" in note


def test_train_takes_the_offload_step_when_auto_finds_full_too_big(monkeypatch, tmp_path, caplog):
  """jaxft.train with model.remat=auto on a chip where the step with full does not fit: it builds
  the step again with offload, says so, and trains with it (CPU standing in for the accelerator:
  auto resolves to full here, and the measurements are given)."""
  from jaxft.models import llama
  resolve = llama.remat_policy
  monkeypatch.setattr(llama, "remat_policy",
                      lambda cfg: "full" if cfg.remat == "auto" else resolve(cfg))
  sizes = iter([_measured(17.0, refused=True), _measured(9.0)])
  monkeypatch.setattr(memory, "measure", lambda compile_fn, device: next(sizes))
  built = []
  build = trainer.build_step
  monkeypatch.setattr(trainer, "build_step",
                      lambda config, cfg, *a: built.append(cfg.remat) or build(config, cfg, *a))
  config = tiny_config(**{"train.steps": 2, "model.remat": "auto"})
  with caplog.at_level("WARNING"):
    result = trainer.train(config, str(tmp_path / "w"))
  assert built == ["auto", "offload", "offload"]  # the first step, the measured one, the one kept
  assert "model.remat=auto chose offload" in caplog.text
  assert result["step"] == 2 and np.isfinite(result["loss"])


@pytest.fixture
def restore_cache_settings():
  before = (jax.config.jax_compilation_cache_dir,
            jax.config.jax_persistent_cache_min_compile_time_secs)
  yield
  cc.reset_cache()
  jax.config.update("jax_compilation_cache_dir", before[0])
  jax.config.update("jax_persistent_cache_min_compile_time_secs", before[1])


@pytest.mark.slow
def test_a_resumed_run_loads_its_compiled_step_from_the_cache(tmp_path, restore_cache_settings,
                                                               monkeypatch):
  from jaxft import compile_cache, trainer
  # With JAX's own variable set (as the test session sets it), the default is that directory.
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "shared"))
  assert compile_cache.cache_dir("", "w") == str(tmp_path / "shared")
  assert compile_cache.cache_dir("none", "w") is None
  monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR")
  hits = []
  jax.monitoring.register_event_listener(
      lambda event, **kw: hits.append(event) if event == "/jax/compilation_cache/cache_hits" else None)
  workdir = str(tmp_path / "run")
  trainer.train(tiny_config(**{"train.steps": 1, "data.eval": ""}), workdir)
  cache = os.path.join(workdir, "compile_cache")
  assert os.path.isdir(cache) and len(os.listdir(cache)) > 0
  assert not hits
  jax.clear_caches()  # what a new process starts with
  trainer.train(tiny_config(**{"train.steps": 2, "data.eval": ""}), workdir)  # resumes at 1
  assert len(hits) > 0
