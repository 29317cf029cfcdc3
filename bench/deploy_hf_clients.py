"""Exact match of an exported HF directory on a chat eval file, each client tokenizing by itself.

  python bench/deploy_hf_clients.py HF_DIR EVAL.jsonl [--max_new_tokens=24] [--ids_only]

Clients: transformers (AutoTokenizer + apply_chat_template(tokenize=True), whatever version this
interpreter has: run it under transformers 4.x and 5.x) and SentencePiece (the template rendered
with jinja2, the text split at special tokens, each piece encoded by sentencepiece). Both feed
transformers' model, greedy. Rows marked "answerable": false are left out (as jaxft.evaluate's
exact match does). Imports neither jax nor jaxft, so it runs in any venv with torch, transformers,
sentencepiece and jinja2. --ids_only (no torch needed, e.g. tools/install_test_deps.sh's
.venv-tf4) prints transformers' prompt ids instead of answering. Prints one JSON object.
"""

import argparse
import json
import os
import re
import time


def _rows(path):
  with open(path, encoding="utf-8") as f:
    for line in f:
      if line.strip():
        row = json.loads(line)
        if row.get("answerable") is False:
          continue
        msgs = row["messages"]
        last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
        yield msgs[:last], msgs[last]["content"]


def _chat_ids(tok, prompt):
  ids = tok.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True)
  return [int(i) for i in (ids["input_ids"] if hasattr(ids, "keys") else ids)]


def _ids_only(hf_dir, eval_jsonl):
  import transformers
  from transformers import AutoTokenizer
  tok = AutoTokenizer.from_pretrained(hf_dir, local_files_only=True)
  return {"transformers_version": transformers.__version__,
          "ids": [_chat_ids(tok, prompt) for prompt, _ in _rows(eval_jsonl)]}


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("hf_dir")
  ap.add_argument("eval_jsonl")
  ap.add_argument("--max_new_tokens", type=int, default=24)
  ap.add_argument("--ids_only", action="store_true", help="print transformers' prompt ids only")
  a = ap.parse_args()
  if a.ids_only:
    print(json.dumps(_ids_only(a.hf_dir, a.eval_jsonl)))
    return
  import jinja2
  import sentencepiece as spm
  import torch
  import transformers
  from transformers import AutoModelForCausalLM, AutoTokenizer
  tok = AutoTokenizer.from_pretrained(a.hf_dir, local_files_only=True)
  model = AutoModelForCausalLM.from_pretrained(a.hf_dir, torch_dtype=torch.float32).eval()
  sp = spm.SentencePieceProcessor(model_file=os.path.join(a.hf_dir, "tokenizer.model"))
  specials = {sp.id_to_piece(i): i for i in range(sp.vocab_size()) if sp.is_control(i)}
  with open(os.path.join(a.hf_dir, "tokenizer_config.json"), encoding="utf-8") as f:
    tc = json.load(f)
  template = jinja2.Environment(loader=jinja2.BaseLoader()).from_string(tc["chat_template"])
  with open(os.path.join(a.hf_dir, "generation_config.json"), encoding="utf-8") as f:
    gen = json.load(f)

  def sp_ids(text):
    ids = []
    for part in re.split("(" + "|".join(map(re.escape, specials)) + ")", text):
      if part in specials:
        ids.append(specials[part])
      elif part:
        ids.extend(sp.encode(part))
    return ids

  def greedy(ids):
    with torch.no_grad():
      out = model.generate(torch.tensor([ids]), max_new_tokens=a.max_new_tokens, do_sample=False,
                           eos_token_id=gen["eos_token_id"], pad_token_id=gen["pad_token_id"])
    new = out[0, len(ids):].tolist()
    stop = gen["eos_token_id"] if isinstance(gen["eos_token_id"], list) else [gen["eos_token_id"]]
    return [t for t in new if t not in stop]

  res = {"transformers_version": transformers.__version__, "n": 0, "transformers": 0,
         "sentencepiece": 0, "same_ids": 0, "first_ids": None}
  t0 = time.time()
  for prompt, ref in _rows(a.eval_jsonl):
    ids_hf = _chat_ids(tok, prompt)
    text = template.render(messages=prompt, add_generation_prompt=True,
                           bos_token=tc["bos_token"], eos_token=tc["eos_token"])
    ids_sp = sp_ids(text)
    res["first_ids"] = res["first_ids"] or ids_hf[:4]
    res["n"] += 1
    res["same_ids"] += ids_hf == ids_sp
    res["transformers"] += tok.decode(greedy(ids_hf), skip_special_tokens=True).strip() == ref
    res["sentencepiece"] += sp.decode(greedy(ids_sp)).strip() == ref
  for k in ("transformers", "sentencepiece", "same_ids"):
    res[k] = res[k] / res["n"]
  res["seconds"] = round(time.time() - t0, 1)
  print(json.dumps(res))


if __name__ == "__main__":
  main()
