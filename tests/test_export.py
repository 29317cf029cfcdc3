"""HF interop out and back: a LoRA run started from a PEFT-made adapter (peft.init_from), exported
as a merged HF checkpoint (transformers loads it) and as a PEFT adapter (PEFT loads it), with the
same logits as jaxft; and the refusals of export and init_from."""

import json
import os
import pickle
import shutil

import numpy as np
import pytest

from conftest import run_cli
from hf_tiny import TEMPLATE, chat_base, chat_config, jaxft_logits, rel_err, torch_logits
from jaxft import export, session
from jaxft.errors import CheckpointError, ConfigError
from jaxft.peft import peft_io

TARGETS = ["q_proj", "v_proj", "down_proj"]


def _base_model(d):
  import transformers
  return transformers.AutoModelForCausalLM.from_pretrained(d, dtype="float32").eval()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A tiny Llama (Mistral v1 vocabulary, tokenizer with a chat template), a LoRA adapter made by
  PEFT (r=4 on q/v/down, random B), and a 3-step jaxft LoRA run started from that adapter."""
  import torch
  from peft import LoraConfig, get_peft_model
  from jaxft.trainer import train
  root = tmp_path_factory.mktemp("export")
  base = str(root / "base")
  model = chat_base(base, "llama")

  peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                lora_dropout=0.0))
  with torch.no_grad():
    for name, p in peft_model.named_parameters():
      if "lora_B" in name:
        p.normal_(0.0, 0.2)
  adapter = str(root / "adapter")
  peft_model.save_pretrained(adapter)
  ids = np.random.RandomState(0).randint(0, 32000, (2, 10))
  peft_ref = torch_logits(peft_model.eval(), ids)

  # r=4 and the targets come from the adapter (config: 8, q,v)
  config = chat_config(root, base, **{"peft.init_from": adapter})
  workdir = str(root / "work")
  train(config, workdir)
  # the run rendered its chats with the checkpoint directory's own chat template
  assert session.encoder(config, workdir).template == TEMPLATE
  trained = session.restore_trained(workdir)
  tuned = jaxft_logits(trained.model.cfg, trained.params, ids, trained.model.method)
  return dict(root=root, base=base, adapter=adapter, workdir=workdir, ids=ids, peft_ref=peft_ref,
              tuned=tuned, config=config, method=trained.model.method)


@pytest.mark.slow
def test_init_from_peft_adapter_gives_peft_logits(run, caplog):
  model = session.load_model(run["config"])
  assert (model.method.rank, model.method.alpha, model.method.targets) == (
      4, 8.0, ("q_proj", "v_proj", "down_proj"))
  assert "taking from the adapter: peft.lora.rank=4 (config: 8)" in caplog.text
  trainable, frozen = model.method.split(model.base, session.init_added(model, 0))
  from jaxft.peft import merge_trees
  got = jaxft_logits(model.cfg, merge_trees(frozen, trainable), run["ids"], model.method)
  assert rel_err(got, run["peft_ref"]) < 1e-4
  # the 3 training steps moved the adapter away from PEFT's
  assert rel_err(run["tuned"], run["peft_ref"]) > 1e-3


@pytest.mark.slow
def test_hf_export_loads_in_transformers(run, capfd):
  import transformers
  out = str(run["root"] / "merged")
  export.export_hf(run["workdir"], out, max_shard_mb=4)
  names = sorted(os.listdir(out))
  assert "model.safetensors.index.json" in names
  assert len([n for n in names if n.endswith(".safetensors")]) > 2  # 16 MB of tensors, 4 MB shards
  assert {"config.json", "generation_config.json", "tokenizer.json", "chat_template.jinja"} <= set(names)
  assert not [n for n in os.listdir(run["root"]) if ".tmp-" in n]
  capfd.readouterr()
  model, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True,
                                                                   dtype="float32")
  err = capfd.readouterr().err
  assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
  assert "MISSING" not in err and "UNEXPECTED" not in err, err
  assert rel_err(torch_logits(model.eval(), run["ids"]), run["tuned"]) < 1e-4
  tok = transformers.AutoTokenizer.from_pretrained(out)
  assert tok.chat_template == TEMPLATE
  gen = transformers.GenerationConfig.from_pretrained(out)
  assert (gen.bos_token_id, gen.eos_token_id) == (1, 2)


@pytest.mark.slow
def test_peft_export_cli_loads_in_peft(run):
  from peft import PeftModel
  out = str(run["root"] / "adapter_out")
  r = run_cli("jaxft.export", f"--workdir={run['workdir']}", "--format=peft", f"--out={out}")
  assert r.returncode == 0, r.stderr[-3000:]
  assert sorted(os.listdir(out)) == ["adapter_config.json", "adapter_model.safetensors"]
  with open(os.path.join(out, "adapter_config.json")) as f:
    c = json.load(f)
  assert (c["r"], c["lora_alpha"], sorted(c["target_modules"]), c["use_rslora"], c["use_dora"]) == (
      4, 8, sorted(TARGETS), False, False)
  model = PeftModel.from_pretrained(_base_model(run["base"]), out).eval()
  assert rel_err(torch_logits(model, run["ids"]), run["tuned"]) < 1e-4
  # exporting over it again is refused, and leaves it whole
  r = run_cli("jaxft.export", f"--workdir={run['workdir']}", "--format=peft", f"--out={out}")
  assert r.returncode == 2 and "already exists" in r.stderr
  assert sorted(os.listdir(out)) == ["adapter_config.json", "adapter_model.safetensors"]


@pytest.mark.slow
def test_failed_export_leaves_nothing(run, monkeypatch):
  from jaxft.models import hf
  calls = []

  def boom(*a, **kw):
    calls.append(1)
    if len(calls) == 5:
      raise RuntimeError("disk full")
    return real(*a, **kw)
  real = hf.host_tensor
  monkeypatch.setattr(hf, "host_tensor", boom)
  out = run["root"] / "broken"
  with pytest.raises(RuntimeError, match="disk full"):
    export.export_hf(run["workdir"], str(out), max_shard_mb=4)
  assert not out.exists()
  assert not [n for n in os.listdir(run["root"]) if n.startswith("broken")]


@pytest.mark.slow
def test_peft_export_of_full_finetune_refused(run, tmp_path):
  work = tmp_path / "full"
  work.mkdir()
  with open(os.path.join(run["workdir"], "config.json")) as f:
    c = json.load(f)
  c["peft"]["method"] = "full"
  (work / "config.json").write_text(json.dumps(c))
  with pytest.raises(ConfigError, match="peft.method='full' has no PEFT adapter format; use --format=hf"):
    export.export_peft(str(work), str(tmp_path / "out"))
  assert not (tmp_path / "out").exists()


# -- init_from refusals ---------------------------------------------------------------------------

def _adapter_copy(run, tmp_path, edit_config=None, edit_tensors=None):
  d = str(tmp_path / "adapter")
  shutil.copytree(run["adapter"], d)
  if edit_config:
    p = os.path.join(d, peft_io.CONFIG)
    c = json.load(open(p))
    edit_config(c)
    json.dump(c, open(p, "w"))
  if edit_tensors:
    from safetensors import safe_open
    from safetensors.numpy import save_file
    p = os.path.join(d, peft_io.WEIGHTS)
    with safe_open(p, framework="numpy") as f:
      t = {k: f.get_tensor(k) for k in f.keys()}
    edit_tensors(t)
    save_file(t, p)
  return d


@pytest.mark.slow
def test_init_from_refusals(run, tmp_path):
  cfg = session.model_config(run["config"])
  key = "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"
  d = _adapter_copy(run, tmp_path / "a", edit_tensors=lambda t: t.pop(key))
  with pytest.raises(CheckpointError, match=f"adapter_model.safetensors: tensor {key} is missing"):
    peft_io.read_lora_config(d, cfg)
  d = _adapter_copy(run, tmp_path / "b", edit_tensors=lambda t: t.update(
      {"base_model.model.lm_head.lora_A.weight": np.zeros((4, 64), np.float32)}))
  with pytest.raises(CheckpointError, match="unexpected tensor base_model.model.lm_head.lora_A"):
    peft_io.read_lora_config(d, cfg)
  d = _adapter_copy(run, tmp_path / "c", edit_config=lambda c: c.update(r=5))
  with pytest.raises(CheckpointError, match=r"lora_A.weight has shape \[4, \d+\], expected \[5, \d+\]"):
    peft_io.read_lora_config(d, cfg)
  d = _adapter_copy(run, tmp_path / "d", edit_config=lambda c: c.update(use_dora=True))
  with pytest.raises(CheckpointError, match=r"q_proj.lora_magnitude_vector is missing"):
    peft_io.read_lora_config(d, cfg)  # a DoRA adapter needs every magnitude vector
  # a pickle adapter is refused, never unpickled
  d = tmp_path / "e"
  d.mkdir()
  shutil.copy(os.path.join(run["adapter"], peft_io.CONFIG), d)
  marker = tmp_path / "unpickled"
  (d / "adapter_model.bin").write_bytes(pickle.dumps(_Trap(str(marker))))
  with pytest.raises(CheckpointError, match="adapter_model.bin: pickle adapters are refused"):
    peft_io.read_lora_config(str(d), cfg)
  assert not marker.exists()
  from jaxft import peft
  with pytest.raises(ConfigError, match="peft.init_from needs peft.method=lora or dora"):
    peft_io.adopt_settings(run["adapter"], peft.Method(), cfg)
  pc = run["config"].peft.copy_and_resolve_references()
  pc.method = "dora"
  with pytest.raises(ConfigError, match=r"a LORA adapter \(use_dora=False\); set peft.method=lora"):
    peft_io.adopt_settings(run["adapter"], peft.from_config(pc, cfg), cfg)


@pytest.mark.slow
def test_init_from_peft_dora_adapter_gives_peft_logits(run, tmp_path):
  import torch
  from peft import LoraConfig, get_peft_model
  peft_model = get_peft_model(_base_model(run["base"]), LoraConfig(
      r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], lora_dropout=0.0, use_dora=True))
  with torch.no_grad():
    for name, p in peft_model.named_parameters():
      if "lora_B" in name:
        p.normal_(0.0, 0.2)
      if "lora_magnitude_vector" in name:
        p.mul_(1.0 + 0.1 * torch.randn_like(p))
  adapter = str(tmp_path / "dora")
  peft_model.save_pretrained(adapter)
  ref = torch_logits(peft_model.eval(), run["ids"])
  config = run["config"].copy_and_resolve_references()
  config.peft.init_from = adapter
  config.peft.method = "dora"
  model = session.load_model(config)
  assert (model.method.name, model.method.rank, model.method.targets) == (
      "dora", 4, ("q_proj", "down_proj"))
  from jaxft.peft import merge_trees
  trainable, frozen = model.method.split(model.base, session.init_added(model, 0))
  got = jaxft_logits(model.cfg, merge_trees(frozen, trainable), run["ids"], model.method)
  assert rel_err(got, ref) < 1e-4
  # the magnitudes came from the adapter, not from the base's column norms
  assert rel_err(jaxft_logits(model.cfg, merge_trees(frozen, dict(
      trainable, layers={n: dict(v, magnitude=v["magnitude"] * 0 + 1) for n, v in
                         trainable["layers"].items()})), run["ids"], model.method), ref) > 1e-3


class _Trap:
  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (open, (self.marker, "w"))
