"""Gemma 3 (text): `configs/gemma3.py:size=12b,method=qlora` (lora | qlora | int8 | full).

size: 12b (the preset shape of its language model: q/k norms, 5 sliding-window layers (1024,
RoPE base 10k) per global layer (RoPE base 1M, linear scaling x8), 128k context). Set model.path
to a Gemma3ForCausalLM checkpoint directory for real weights and its tokenizer.
"""

from jaxft import configlib


def get_config(arg=None):
  a = configlib.parse_arg(arg, size="12b", method="lora")
  c = configlib.sibling(__file__, "base").get_config()
  configlib.real_model_defaults(c, f"gemma3-{a.size}", a.method)
  c.peft.targets = "all-linear"
  return c
