"""Llama 3 family: `configs/llama3.py:size=8b,method=qlora`.

size: 1b | 8b | 70b (the preset shapes; set model.path to load real weights and tokenizer).
method: lora | qlora (LoRA on an NF4 base) | int8 (LoRA on an int8 base) | full.
"""

from jaxft import configlib


def get_config(arg=None):
  a = configlib.parse_arg(arg, size="8b", method="lora")
  c = configlib.sibling(__file__, "base").get_config()
  configlib.real_model_defaults(c, f"llama3-{a.size}", a.method)
  c.peft.targets = "all-linear"
  return c
