"""Qwen3-MoE 30B-A3B: `configs/qwen3_moe.py:method=qlora` (lora | qlora | int8 | full).

size: 30b-a3b (the preset shape: 48 layers, 128 experts of width 768, top-8 renormalised, q/k
norms, GQA 32/4). LoRA on every linear, the experts included (one A, B per expert); the
load-balancing loss enters the objective at model.router_aux_coef (-1: the checkpoint's
router_aux_loss_coef, 0.001). mesh.expert splits the experts over devices. Set model.path to a
Qwen3MoeForCausalLM checkpoint directory for real weights and its tokenizer.
"""

from jaxft import configlib


def get_config(arg=None):
  a = configlib.parse_arg(arg, size="30b-a3b", method="lora")
  c = configlib.sibling(__file__, "base").get_config()
  configlib.real_model_defaults(c, f"qwen3-{a.size}", a.method)
  c.peft.targets = "all-linear"
  return c
