"""Preference losses against TRL: DPO (sigmoid, IPO) end to end against `trl.DPOTrainer` on the
same tiny transformers model, LoRA weights and tokenized batch (loss, every LoRA gradient and the
logged rewards); ORPO and SimPO against TRL's loss functions on the same per-sequence log-probs."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hf_tiny import make_tiny, one_device_shardings
from jaxft import objectives, peft
from jaxft.data import preference
from jaxft.data.formats import Example
from jaxft.models import hf

torch = pytest.importorskip("torch")
trl = pytest.importorskip("trl")

ROWS = [{"prompt": "What is the capital of France?", "chosen": " Paris.",
         "rejected": " Berlin, I think, or maybe it is Lyon."},
        {"prompt": "Capital of Peru?", "chosen": " Lima.", "rejected": " It is Cusco."},
        {"prompt": "Name the capital city of Kenya.", "chosen": " Nairobi is the capital.",
         "rejected": " Mombasa."}]


def rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory, quickstart_tokenizer):
  """A tiny Llama with the quickstart tokenizer's vocabulary, as transformers and as jaxft."""
  d = str(tmp_path_factory.mktemp("dpo_llama"))
  model = make_tiny("llama", d, vocab_size=len(quickstart_tokenizer))
  cfg = hf.read_config(d)
  return d, model, cfg, hf.load_params(d, cfg, one_device_shardings(cfg))


def trl_dpo(tiny_hf, tokenizer, tmp_path, loss_type):
  """TRL's DPO loss, LoRA gradients and metrics on one batch of ROWS; returns them with the
  batch and the LoRA weights (B perturbed, so the policy differs from the reference)."""
  from datasets import Dataset
  from peft import LoraConfig
  d, _, _, _ = tiny_hf
  import transformers
  model = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
  args = trl.DPOConfig(output_dir=str(tmp_path / "trl"), beta=0.1, loss_type=[loss_type],
                       per_device_train_batch_size=len(ROWS), report_to=[], use_cpu=True,
                       max_length=64)
  lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
  tr = trl.DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(ROWS),
                      processing_class=tokenizer, peft_config=lora)
  torch.manual_seed(1)
  with torch.no_grad():
    for n, p in tr.model.named_parameters():
      if "lora_B" in n:
        p.add_(0.1 * torch.randn_like(p))
  batch = next(iter(tr.get_train_dataloader()))
  tr.model.train()
  loss = tr.compute_loss(tr.model, batch)
  loss.backward()
  grads = {n: p.grad.numpy().copy() for n, p in tr.model.named_parameters() if p.requires_grad}
  weights = {n: p.detach().numpy().copy() for n, p in tr.model.named_parameters() if p.requires_grad}
  metrics = {k: v[-1] for k, v in tr._metrics["train"].items()}
  return float(loss), grads, weights, metrics, {k: v.numpy() for k, v in batch.items()}


def jaxft_tree(weights, cfg, leaf):
  """PEFT's per-layer lora_A [r, in] / lora_B [out, r] as jaxft's stacked [L, in, r] / [L, r, out]."""
  out = {}
  for name in ("q_proj", "v_proj"):
    ab = {}
    for mine, theirs in (("lora_a", "lora_A"), ("lora_b", "lora_B")):
      ab[mine] = np.stack([weights[f"base_model.model.model.layers.{i}.self_attn.{name}."
                                   f"{theirs}.{leaf}"].T for i in range(cfg.num_layers)])
    out[name] = ab
  return {"layers": out}


def pairs_of(batch):
  """TRL's padded [chosen; rejected] batch as jaxft pairs (targets: the completion mask)."""
  ids, att, comp = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
  n = ids.shape[0] // 2
  seq = lambda i: Example(ids[i][att[i] == 1].astype(np.int32), comp[i][att[i] == 1].astype(bool))
  return [preference.Pair(seq(i), seq(n + i)) for i in range(n)]


@pytest.mark.slow
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_dpo_loss_and_lora_gradients_match_trl(tiny_hf, quickstart_tokenizer, tmp_path, loss_type):
  loss_t, grads_t, weights_t, metrics_t, batch = trl_dpo(tiny_hf, quickstart_tokenizer, tmp_path,
                                                         loss_type)
  _, _, cfg, base = tiny_hf
  method = peft.LoRA(targets=("q_proj", "v_proj"), rank=4, alpha=8.0)
  trainable = jax.tree.map(jnp.asarray, jaxft_tree(weights_t, cfg, "default.weight"))
  obj = objectives.Preference(name="dpo", loss_type=loss_type, beta=0.1, reference="base")
  # Both packings: one pair per row, and every pair in one row.
  for packing in (False, True):
    rows = preference.rows_of(pairs_of(batch), 64, packing)
    jb = {k: jnp.asarray(v) for k, v in preference.make_batch(rows, 64, len(rows)).items()}
    counts = obj.counts(jb)
    assert float(counts["pairs"]) == len(ROWS)

    def loss_fn(tr):
      terms, stats = obj.sums(cfg, method, tr, base, jb, None)
      return obj.loss(terms, counts), obj.metrics(terms, stats, counts)

    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
    assert rel(loss, loss_t) < 1e-4, (packing, float(loss), loss_t)
    want = jaxft_tree(grads_t, cfg, "default.weight")
    for name in ("q_proj", "v_proj"):
      for leaf in ("lora_a", "lora_b"):
        got = grads["layers"][name][leaf]
        assert rel(got, want["layers"][name][leaf]) < 1e-4, (packing, name, leaf)
    for k in objectives.PREFERENCE_METRICS:
      np.testing.assert_allclose(float(metrics[k]), metrics_t[k], rtol=1e-4, atol=1e-6, err_msg=k)
  # The reference really is the base: with B = 0 (the method a no-op) every reward is zero.
  zero_b = jax.tree.map(lambda x: x, trainable)
  for name in ("q_proj", "v_proj"):
    zero_b["layers"][name]["lora_b"] = jnp.zeros_like(zero_b["layers"][name]["lora_b"])
  terms, stats = obj.sums(cfg, method, zero_b, base, jb, None)
  assert abs(float(stats["rewards/margins"])) < 1e-6


def _trl_fn(cls_path, **attrs):
  """A TRL trainer's loss method bound to a namespace holding just the settings it reads."""
  import importlib
  module, name, fn = cls_path.rsplit(".", 2)
  cls = getattr(importlib.import_module(module), name)
  ns = types.SimpleNamespace(accelerator=types.SimpleNamespace(device="cpu"), **attrs)
  return lambda *a: getattr(cls, fn)(ns, *a)


def _logps(seed, n=6):
  """Per-sequence summed log-probs and lengths, ORPO-safe (averages below 0)."""
  rng = np.random.default_rng(seed)
  nc, nr = rng.integers(2, 9, n).astype(np.float32), rng.integers(2, 9, n).astype(np.float32)
  pc = (-rng.uniform(0.05, 3.0, n) * nc).astype(np.float32)
  pr = (-rng.uniform(0.05, 3.0, n) * nr).astype(np.float32)
  return pc, pr, nc, nr


@pytest.mark.parametrize("gamma,smoothing", [(0.5, 0.0), (1.0, 0.2)])
def test_simpo_loss_and_gradients_match_trl(gamma, smoothing):
  pc, pr, nc, nr = _logps(0)
  beta = 2.0
  trl_loss = _trl_fn("trl.experimental.cpo.CPOTrainer.cpo_loss", beta=beta, loss_type="simpo",
                     simpo_gamma=gamma, label_smoothing=smoothing, alpha=0.0)

  def theirs(pc_, pr_):
    tc, tr_ = torch.tensor(pc_ / nc, requires_grad=True), torch.tensor(pr_ / nr, requires_grad=True)
    losses, rc, rr = trl_loss(tc, tr_)
    losses.mean().backward()
    return losses.detach().numpy(), tc.grad.numpy() / nc, tr_.grad.numpy() / nr, rc.numpy(), rr.numpy()

  def mine(pc_, pr_):
    z = jnp.zeros_like(pc_)
    loss, _, rc, rr, _, _ = objectives.pair_losses("simpo", "sigmoid", beta, smoothing, gamma, 0.1,
                                                   pc_, pr_, z, z, nc, nr)
    return loss, (rc, rr)

  l_t, gc_t, gr_t, rc_t, rr_t = theirs(pc, pr)
  (l_j, (rc_j, rr_j)) = mine(jnp.asarray(pc), jnp.asarray(pr))
  gc_j, gr_j = jax.grad(lambda a, b: jnp.mean(mine(a, b)[0]), argnums=(0, 1))(jnp.asarray(pc),
                                                                             jnp.asarray(pr))
  for got, want in ((l_j, l_t), (gc_j, gc_t), (gr_j, gr_t), (rc_j, rc_t), (rr_j, rr_t)):
    assert rel(got, want) < 1e-4


def test_orpo_loss_and_gradients_match_trl():
  """ORPO's loss (chosen NLL per token minus lambda * mean log-sigmoid(log odds ratio)) as TRL's
  ORPOTrainer forms it from the same log-probs."""
  pc, pr, nc, nr = _logps(1)
  lam = 0.25
  odds = _trl_fn("trl.experimental.orpo.ORPOTrainer.odds_ratio_loss", beta=lam)

  def theirs(pc_, pr_):
    tc, tr_ = torch.tensor(pc_, requires_grad=True), torch.tensor(pr_, requires_grad=True)
    losses, rc, rr, _, _ = odds(tc / torch.tensor(nc), tr_ / torch.tensor(nr))
    nll = -tc.sum() / float(nc.sum())  # TRL: mean cross-entropy over the chosen tokens
    loss = nll - losses.mean()
    loss.backward()
    return float(loss), tc.grad.numpy(), tr_.grad.numpy(), rc.numpy(), rr.numpy()

  def mine(pc_, pr_):
    z = jnp.zeros_like(pc_)
    loss, _, rc, rr, _, _ = objectives.pair_losses("orpo", "sigmoid", 0.1, 0.0, 0.5, lam,
                                                   pc_, pr_, z, z, nc, nr)
    obj = objectives.Preference(name="orpo", lam=lam, reference="none")
    terms = {"pairs": jnp.sum(loss), "chosen_nll": -jnp.sum(pc_)}
    counts = {"pairs": jnp.float32(len(nc)), "chosen_tokens": jnp.float32(nc.sum())}
    return obj.loss(terms, counts), (rc, rr)

  l_t, gc_t, gr_t, rc_t, rr_t = theirs(pc, pr)
  (l_j, (rc_j, rr_j)), (gc_j, gr_j) = jax.value_and_grad(mine, argnums=(0, 1), has_aux=True)(
      jnp.asarray(pc), jnp.asarray(pr))
  for got, want in ((l_j, l_t), (gc_j, gc_t), (gr_j, gr_t), (rc_j, rc_t), (rr_j, rr_t)):
    assert rel(got, want) < 1e-4
