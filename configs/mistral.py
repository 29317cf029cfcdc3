"""Mistral 7B: `configs/mistral.py:method=lora` (lora | qlora | int8 | full).

Set model.path to a Mistral checkpoint directory for real weights and its tokenizer.
"""

from jaxft import configlib


def get_config(arg=None):
  a = configlib.parse_arg(arg, size="7b", method="lora")
  c = configlib.sibling(__file__, "base").get_config()
  c.model.preset = f"mistral-{a.size}"
  c.model.dtype = "bfloat16"
  c.model.param_dtype = "bfloat16"
  c.model.remat = "dots"
  configlib.apply_method(c, a.method)
  c.peft.targets = "q_proj,k_proj,v_proj,o_proj"
  c.data.max_len = 2048
  c.data.batch_size = 16
  c.optim.lr = 2e-4
  c.optim.warmup_steps = 50
  c.train.steps = 1000
  c.train.eval_every = 200
  c.checkpoint.every = 200
  return c
