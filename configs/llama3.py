"""Llama 3 family: `configs/llama3.py:size=8b,method=qlora`.

size: 1b | 8b | 70b (the preset shapes; set model.path to load real weights and tokenizer).
method: lora | qlora (LoRA on an NF4 base) | int8 (LoRA on an int8 base) | full.
"""

from jaxft import configlib


def get_config(arg=None):
  a = configlib.parse_arg(arg, size="8b", method="lora")
  c = configlib.sibling(__file__, "base").get_config()
  c.model.preset = f"llama3-{a.size}"
  c.model.dtype = "bfloat16"
  c.model.param_dtype = "bfloat16"
  c.model.remat = "dots"
  configlib.apply_method(c, a.method)
  c.peft.targets = "all-linear"
  c.data.max_len = 2048
  c.data.batch_size = 16
  c.optim.lr = 2e-4
  c.optim.warmup_steps = 50
  c.train.steps = 1000
  c.train.eval_every = 200
  c.checkpoint.every = 200
  return c
