"""Qwen3 (dense): `configs/qwen3.py:size=8b,method=qlora` (lora | qlora | int8 | full).

size: 8b (the preset shape: per-head q/k norms, head_dim 128, untied). Set model.path to a
Qwen3ForCausalLM checkpoint directory for real weights and its tokenizer.
"""

from jaxft import configlib


def get_config(arg=None):
  a = configlib.parse_arg(arg, size="8b", method="lora")
  c = configlib.sibling(__file__, "base").get_config()
  configlib.real_model_defaults(c, f"qwen3-{a.size}", a.method)
  c.peft.targets = "all-linear"
  return c
