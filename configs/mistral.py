"""Mistral 7B: `configs/mistral.py:method=lora` (lora | qlora | int8 | full).

Set model.path to a Mistral checkpoint directory for real weights and its tokenizer.
"""

from jaxft import configlib


def get_config(arg=None):
  a = configlib.parse_arg(arg, size="7b", method="lora")
  c = configlib.sibling(__file__, "base").get_config()
  configlib.real_model_defaults(c, f"mistral-{a.size}", a.method)
  c.peft.targets = "q_proj,k_proj,v_proj,o_proj"
  return c
