"""Mixtral 8x7B: `configs/mixtral.py:method=qlora` (lora | qlora | int8 | full).

size: 8x7b (the preset shape: 8 experts of width 14336, top-2, 32 layers, GQA 32/8). LoRA on
every linear, the experts included (one A, B per expert); the load-balancing loss enters the
objective at model.router_aux_coef (-1: the checkpoint's router_aux_loss_coef, 0.02 for
Mixtral). mesh.expert splits the experts over devices. Set model.path to a MixtralForCausalLM
checkpoint directory for real weights and its tokenizer.
"""

from jaxft import configlib


def get_config(arg=None):
  a = configlib.parse_arg(arg, size="8x7b", method="lora")
  c = configlib.sibling(__file__, "base").get_config()
  configlib.real_model_defaults(c, f"mixtral-{a.size}", a.method)
  c.peft.targets = "all-linear"
  return c
