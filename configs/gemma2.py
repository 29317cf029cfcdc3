"""Gemma 2: `configs/gemma2.py:size=9b,method=qlora` (lora | qlora | int8 | full).

size: 9b (the preset shape: GeGLU, four norms per layer, sliding window 4096 on alternate layers,
attention and final-logit soft-capping, tied embeddings). Set model.path to a Gemma2ForCausalLM
checkpoint directory for real weights and its tokenizer.
"""

from jaxft import configlib


def get_config(arg=None):
  a = configlib.parse_arg(arg, size="9b", method="lora")
  c = configlib.sibling(__file__, "base").get_config()
  configlib.real_model_defaults(c, f"gemma2-{a.size}", a.method)
  c.peft.targets = "all-linear"
  return c
