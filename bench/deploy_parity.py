"""The deployment figures of docs/deploy.md: a trained workdir's exact match on its eval file
through jaxft, transformers, SentencePiece and llama.cpp (each tokenizing by itself), and the
logit parity of its GGUF exports in llama.cpp.

  python bench/deploy_parity.py --workdir=workdirs/quickstart --out=/tmp/deploy \\
      [--python4=/path/to/venv-with-transformers-4/bin/python]

Writes OUT/hf (--format=hf), OUT/model-{f32,f16,bf16,q8_0,q4_k_m}.gguf and prints one JSON
object. Exact match is over the answerable rows, as jaxft.evaluate's. --python4 runs
bench/deploy_hf_clients.py under another interpreter as well (transformers 4.x): with torch there
it answers; without (tools/install_test_deps.sh's .venv-tf4) it gives its prompt ids, compared
with this venv's transformers: identical ids on the same weights file mean identical greedy
answers.
"""

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--workdir", required=True)
  ap.add_argument("--out", required=True)
  ap.add_argument("--python4", default="")
  ap.add_argument("--skip_hf", action="store_true", help="only jaxft and llama.cpp")
  a = ap.parse_args()
  import jax.numpy as jnp
  import llama_cpp
  from jaxft import eval as evaluation, export, inference, session
  from jaxft.models import llama
  os.makedirs(a.out, exist_ok=True)
  config = session.load_workdir_config(a.workdir)
  res = {}
  hf_dir = os.path.join(a.out, "hf")
  if not os.path.isdir(hf_dir):
    export.export_hf(a.workdir, hf_dir)
  ggufs = {}
  for q in ("f32", "f16", "bf16", "q8_0", "q4_k_m"):
    ggufs[q] = os.path.join(a.out, f"model-{q}.gguf")
    if not os.path.isfile(ggufs[q]):
      export.export_gguf(a.workdir, ggufs[q], quant=q)

  refs = [r for r in evaluation.references(config.data.eval, config.data.format) if r.answerable]
  trained = session.restore_trained(a.workdir)
  enc = session.encoder(config, a.workdir)
  dec = inference.Decoder(trained.model.cfg, trained.model.method, trained.params, trained.step)
  longest = max(len(enc.tok(r.answer, add_special_tokens=False)["input_ids"]) for r in refs)
  new = longest + 16
  t0 = time.time()
  ours = inference.answer(dec, enc, [r.prompt for r in refs], max_new_tokens=new)
  res["n"] = len(refs)
  res["jaxft"] = float(np.mean([evaluation.exact_match(o["answer"], r.answer)
                                for o, r in zip(ours, refs)]))
  res["jaxft_seconds"] = round(time.time() - t0, 1)

  # logits on fixed sequences: jaxft against llama.cpp (f32 KV cache)
  # two kinds of fixed sequences: random ids (where a small model's logits are nearly flat, so
  # argmax is fragile) and the eval conversations themselves (what the model was tuned for)
  cfg = trained.model.cfg
  seqs = [np.asarray(s) for s in np.random.RandomState(0).randint(3, cfg.vocab_size, (4, 48))]
  kinds = ["random"] * len(seqs)
  for r in refs[:16]:
    msgs = r.prompt.messages + [{"role": "assistant", "content": r.answer}]
    seqs.append(np.asarray(enc.tok(enc.render(msgs, False), add_special_tokens=False)["input_ids"]))
    kinds.append("eval")
  ref = []
  for s in seqs:
    h, _ = llama.hidden_states(cfg, trained.params, jnp.asarray(s[None]),
                               adapter=trained.model.method)
    ref.append(np.asarray(llama.logits(cfg, trained.params, h))[0])
  for q, path in ggufs.items():
    kw = dict(model_path=path, n_ctx=512, n_threads=2, verbose=False, seed=0,
              type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
    llm = llama_cpp.Llama(logits_all=True, **kw)
    diffs, agree = [], {"random": [], "eval": []}
    for i, s in enumerate(seqs):
      llm.reset()
      llm.eval([int(t) for t in s])
      got = np.array(llm.scores[: len(s)], np.float32)
      diffs.append(float(np.abs(got - ref[i]).max()))
      agree[kinds[i]].extend(got.argmax(-1) == ref[i].argmax(-1))
    llm.close()
    llm = llama_cpp.Llama(**kw)
    hits, t0 = 0, time.time()
    for r in refs:
      out = llm.create_chat_completion(messages=r.prompt.messages, temperature=0.0, top_k=1,
                                       max_tokens=new, seed=0)
      hits += evaluation.exact_match(out["choices"][0]["message"]["content"].strip(), r.answer)
    llm.close()
    res[f"llama_cpp_{q}"] = {"exact_match": hits / len(refs), "max_abs_logit_diff": max(diffs),
                             "argmax_agreement_random_ids": float(np.mean(agree["random"])),
                             "argmax_agreement_eval_chats": float(np.mean(agree["eval"])),
                             "seconds": round(time.time() - t0, 1),
                             "bytes": os.path.getsize(path)}
  here = os.path.dirname(os.path.abspath(__file__))
  pythons = [] if a.skip_hf else [("this_venv", sys.executable)]
  pythons += [("python4", a.python4)] if a.python4 else []
  for name, py in pythons:
    r = subprocess.run([py, os.path.join(here, "deploy_hf_clients.py"), hf_dir, config.data.eval,
                        f"--max_new_tokens={new}"], capture_output=True, text=True)
    res[f"hf_clients_{name}"] = (json.loads(r.stdout.strip().splitlines()[-1]) if r.returncode == 0
                                 else {"error": r.stderr[-2000:]})
  if a.python4 and "error" in res.get("hf_clients_python4", {}):  # no torch there: ids only
    res["hf_clients_python4"] = _compare_ids(a.python4, here, hf_dir, config.data.eval)
  print(json.dumps(res, indent=1))


def _compare_ids(python4: str, here: str, hf_dir: str, eval_jsonl: str) -> dict:
  """transformers 4.x's prompt ids (another interpreter, --ids_only) against this venv's."""
  import transformers
  run = lambda py: subprocess.run([py, os.path.join(here, "deploy_hf_clients.py"), hf_dir,
                                   eval_jsonl, "--ids_only"], capture_output=True, text=True)
  r4, r5 = run(python4), run(sys.executable)
  if r4.returncode or r5.returncode:
    return {"error": (r4.stderr or r5.stderr)[-2000:]}
  got4, got5 = (json.loads(r.stdout.strip().splitlines()[-1]) for r in (r4, r5))
  same = sum(x == y for x, y in zip(got4["ids"], got5["ids"]))
  return {"transformers_version": got4["transformers_version"], "n": len(got4["ids"]),
          "same_ids_as": transformers.__version__, "same_ids": same / len(got4["ids"]),
          "first_ids": got4["ids"][0][:4]}


if __name__ == "__main__":
  main()
