"""KV-cache decoding (jaxft/decode.py) and the generate entry point.

The central check: greedy decoding with the cache (left-padded batch, prefill, single-token steps)
gives the same tokens as recomputing the whole sequence for each new token, one prompt at a time,
for the plain model and every PEFT method and quantized base that exists.
"""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import ROOT, make_config, run_cli
import ml_collections

from jaxft import decode, peft, quant, session, sharding
from jaxft.errors import ConfigError, DataError
from jaxft.models import llama, quantized
from jaxft.models.config import preset

# The tiny preset with a small vocabulary: these tests need no tokenizer, and compile faster.
CFG = preset("tiny").replace(vocab_size=256)
_REF_LEN = 32  # the recompute reference runs every prefix right-padded to this many tokens


@functools.lru_cache(maxsize=None)
def _base(cfg):
  return llama.init_params(cfg, jax.random.key(0))


def _prompts(lengths=(3, 9, 17), seed=1):
  rng = np.random.default_rng(seed)
  return [rng.integers(3, CFG.vocab_size, n).astype(np.int32) for n in lengths]


@functools.partial(jax.jit, static_argnums=(0, 1))
def _last_logits(cfg, adapter, params, tokens, n):
  # The whole sequence, right-padded to a fixed length (causal attention ignores the padding).
  segs = (jnp.arange(tokens.shape[1]) < n).astype(jnp.int32)[None]
  h, _ = llama.hidden_states(cfg, params, tokens, adapter=adapter, segment_ids=segs)
  return llama.logits(cfg, params, h[0, n - 1])


def _recompute_greedy(cfg, adapter, params, prompt, steps):
  """Greedy tokens, and their log-probabilities, by running the full prefix through the model for
  every new token."""
  seq = np.zeros((1, _REF_LEN), np.int32)
  seq[0, :len(prompt)] = prompt
  out, logprobs = [], []
  for i in range(steps):
    n = len(prompt) + i
    logits = _last_logits(cfg, adapter, params, jnp.asarray(seq), n)
    tok = int(jnp.argmax(logits))
    seq[0, n] = tok
    out.append(tok)
    logprobs.append(float(jax.nn.log_softmax(logits.astype(jnp.float32))[tok]))
  return out, logprobs


def _check_parity(cfg, adapter, params, steps=6):
  prompts = _prompts()
  got = decode.generate(cfg, adapter, params, prompts, max_new_tokens=steps, batch_size=3)
  for p, g in zip(prompts, got):
    assert g.finish == "length" and g.end_logprob is None
    tokens, logprobs = _recompute_greedy(cfg, adapter, params, p, steps)
    assert g.tokens.tolist() == tokens
    # The log-probabilities of the chosen tokens (what evaluate's calibration reads).
    np.testing.assert_allclose(g.logprobs, logprobs, atol=2e-4, rtol=1e-4)


def _perturbed(tree, seed):
  # Methods start as the identity (LoRA B = 0, ...); noise makes them change the output.
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(treedef, [x + 0.05 * jax.random.normal(k, x.shape, x.dtype)
                                      for x, k in zip(leaves, keys)])


@pytest.mark.slow
@pytest.mark.parametrize("window", [None, 5])
def test_cache_matches_recompute_plain(window):
  cfg = CFG.replace(sliding_window=window)
  _check_parity(cfg, peft.Method(), _base(cfg))


def _peft_config(name):
  c = make_config("base")
  c.peft.method = name
  c.peft.targets = "all-linear"
  return c


@pytest.mark.slow
@pytest.mark.parametrize("name", ["lora", "dora", "adapter", "prefix"])
def test_cache_matches_recompute_peft(name):
  if name not in peft.METHODS:
    pytest.skip(f"peft.method={name} is not built yet")
  c = _peft_config(name)
  method = peft.from_config(c.peft, CFG)
  added = _perturbed(method.init(CFG, jax.random.key(2)), 3)
  params = peft.merge_trees(_base(CFG), added)
  _check_parity(CFG, method, params)
  # The method changes what is generated (else parity would be vacuous).
  plain = decode.generate(CFG, peft.Method(), _base(CFG), _prompts(), max_new_tokens=6)
  tuned = decode.generate(CFG, method, params, _prompts(), max_new_tokens=6)
  assert [g.tokens.tolist() for g in plain] != [g.tokens.tolist() for g in tuned]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["int8", "nf4"])
def test_cache_matches_recompute_quantized_lora(kind):
  mesh = sharding.make_mesh(ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1}))
  shardings = sharding.tree_shardings(llama.param_specs(CFG), mesh)
  base = quantized.quantize_base(_base(CFG), kind, shardings)
  assert quant.is_quantized(base["layers"]["q_proj"]["kernel"])
  method = peft.from_config(_peft_config("lora").peft, CFG)
  params = peft.merge_trees(base, _perturbed(method.init(CFG, jax.random.key(2)), 3))
  _check_parity(CFG, method, params)


@pytest.mark.slow
def test_sampling_is_reproducible_and_batch_independent():
  base = _base(CFG)
  prompts = _prompts()
  s = decode.Sampling(temperature=1.0, top_k=50, top_p=0.95)
  run = lambda seed, bs: [g.tokens.tolist() for g in decode.generate(
      CFG, peft.Method(), base, prompts, max_new_tokens=8, sampling=s, seed=seed, batch_size=bs)]
  first = run(7, 3)
  assert run(7, 3) == first
  assert run(7, 1) == first  # a prompt samples the same tokens in any batch
  assert run(8, 3) != first


@pytest.mark.slow
def test_top_k_one_and_tiny_top_p_equal_greedy():
  base = _base(CFG)
  prompts = _prompts()
  toks = lambda s: [g.tokens.tolist() for g in decode.generate(
      CFG, peft.Method(), base, prompts, max_new_tokens=8, sampling=s, seed=5)]
  greedy = toks(decode.Sampling())
  assert toks(decode.Sampling(temperature=1.5, top_k=1)) == greedy
  assert toks(decode.Sampling(temperature=1.5, top_p=1e-6)) == greedy


def test_top_p_keeps_the_smallest_set_reaching_p():
  logits = jnp.log(jnp.asarray([[0.05, 0.5, 0.15, 0.3]]))
  kept = lambda p: np.isfinite(decode.filter_logits(logits, decode.Sampling(1.0, 0, p)))[0].tolist()
  assert kept(0.5) == [False, True, False, False]
  assert kept(0.7) == [False, True, False, True]
  assert kept(0.81) == [False, True, True, True]
  k2 = decode.filter_logits(logits, decode.Sampling(1.0, 2, 1.0))
  assert np.isfinite(k2)[0].tolist() == [False, True, False, True]


@pytest.mark.slow
def test_stops_at_eos_and_stop_strings():
  base = _base(CFG)
  prompts = _prompts()
  free = decode.generate(CFG, peft.Method(), base, prompts, max_new_tokens=8)
  # Make row 1's third token an end token: that row stops there, the others run on.
  eos = int(free[1].tokens[2])
  got = decode.generate(CFG, peft.Method(), base, prompts, max_new_tokens=8, eos_ids=(eos,))
  assert got[1].finish == "eos" and got[1].tokens.tolist() == free[1].tokens[:2].tolist()
  # The end token's log-probability is the one the free run gave that same token there.
  np.testing.assert_allclose(got[1].logprobs, free[1].logprobs[:2], rtol=1e-6)
  assert got[1].end_logprob == pytest.approx(float(free[1].logprobs[2]), rel=1e-5)
  assert got[1].end_logprob < 0 and np.all(free[1].logprobs <= 0)
  for g, f in zip(got, free):
    if eos not in f.tokens.tolist():
      assert g.finish == "length" and g.tokens.tolist() == f.tokens.tolist()
  # Stop strings, on a toy detokenizer that spells ids.
  detok = lambda ids: " ".join(f"t{i}" for i in ids)
  stop = f"t{int(free[0].tokens[1])}"
  got = decode.generate(CFG, peft.Method(), base, prompts[:1], max_new_tokens=40, stop=[stop],
                        detokenize=detok)
  assert got[0].finish == "stop"
  assert decode.cut_at_stop(detok(got[0].tokens), [stop]) == f"t{int(free[0].tokens[0])} "


def test_bad_prompts_are_clear_errors():
  base = _base(CFG)
  with pytest.raises(DataError, match="prompt 2: the prompt is empty"):
    decode.generate(CFG, peft.Method(), base, [np.array([5, 6]), np.array([], np.int32)],
                    max_new_tokens=4)
  small = CFG.replace(max_position_embeddings=16)
  with pytest.raises(DataError, match="20 tokens but the model's context is 16"):
    decode.generate(small, peft.Method(), base, [np.arange(3, 23)], max_new_tokens=4)
  with pytest.raises(ConfigError, match="top_p"):
    decode.Sampling(top_p=0.0)


@pytest.mark.slow
def test_cli_bad_input_exits_2(tmp_path):
  empty = tmp_path / "empty.txt"
  empty.write_text("\n\n")
  r = run_cli("jaxft.generate", "--config=configs/quickstart.py", f"--workdir={tmp_path}",
              f"--prompts_file={empty}")
  assert r.returncode == 2 and "the prompts file is empty" in r.stderr
  assert "Traceback" not in r.stderr
  r = run_cli("jaxft.generate", "--config=configs/quickstart.py", "--config.model.preset=tiny",
              f"--workdir={tmp_path / 'never_trained'}", "--prompt=hi")
  assert r.returncode == 2 and "no checkpoint" in r.stderr and "Traceback" not in r.stderr


def test_bad_workdir_and_prompt_errors_name_the_problem(tmp_path):
  from jaxft import eval as evaluation, inference
  from jaxft.errors import CheckpointError
  c = make_config("quickstart")
  c.model.preset = "tiny"
  enc = session.encoder(c, str(tmp_path))
  long = inference.Prompt("prompts.txt:3", text="word " * 2100)
  with pytest.raises(DataError, match=r"prompts.txt:3: the prompt has 210\d tokens but the "
                                      r"model's context is 2048"):
    inference.check_lengths(c, enc, [inference.Prompt("prompts.txt:1", text="hi"), long])
  with pytest.raises(CheckpointError, match="no checkpoint"):
    evaluation.evaluate(c, str(tmp_path / "never_trained"), max_examples=1)
  with pytest.raises(DataError, match="no such prompts file"):
    inference.read_prompts(str(tmp_path / "missing.txt"))
  bad = tmp_path / "bad.jsonl"
  bad.write_text('"ok"\n{"messages": [{"role": "robot", "content": "x"}]}\n')
  with pytest.raises(DataError, match=r"bad.jsonl:2: messages\[0\]"):
    inference.read_prompts(str(bad))


_SHARDED = r"""
import json, os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4 " + os.environ.get("XLA_FLAGS", "")
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, os.getcwd())
import jax, ml_collections, numpy as np
from jaxft import decode, peft, sharding
from jaxft.models import llama
from jaxft.models.config import preset
cfg = preset("tiny").replace(vocab_size=256)
params = llama.init_params(cfg, jax.random.key(0))
mesh = sharding.make_mesh(ml_collections.ConfigDict({"data": 1, "fsdp": 2, "tensor": 2}))
sharded = jax.device_put(params, sharding.tree_shardings(llama.param_specs(cfg), mesh))
assert len(sharded["layers"]["q_proj"]["kernel"].sharding.device_set) == 4
prompts = [np.arange(3, 3 + n, dtype=np.int32) for n in (4, 11, 7)]
run = lambda p, s: [g.tokens.tolist() for g in decode.generate(
    cfg, peft.Method(), p, prompts, max_new_tokens=6, sampling=s, seed=3, batch_size=2)]
s = decode.Sampling(temperature=1.0, top_k=20)
one = jax.device_put(params, jax.devices()[0])
print(json.dumps({"sharded": [run(sharded, decode.Sampling()), run(sharded, s)],
                  "single": [run(one, decode.Sampling()), run(one, s)]}))
"""


@pytest.mark.slow
def test_decoding_with_params_sharded_over_a_mesh():
  import subprocess
  import sys
  r = subprocess.run([sys.executable, "-c", _SHARDED], cwd=ROOT, capture_output=True, text=True,
                     timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  out = json.loads(r.stdout.strip().splitlines()[-1])
  assert out["sharded"] == out["single"]
