r"""The embedded default: LoRA on a tiny random Llama with the Mistral v1 tokenizer and the bundled
capitals dataset. Runs on a laptop CPU in a couple of minutes, with no download.

`configs/quickstart.py:method=NAME` trains the same task with another method: lora (default), full,
dora, adapter, prefix, qlora (LoRA on an NF4 base), int8 (LoRA on an int8 base); each gets the
learning rate it needs (bench/methods.py compares them).

`configs/quickstart.py:objective=dpo` (or orpo, simpo) tunes the SFT quickstart's adapter on the
bundled preference pairs (tools/make_capital_prefs.py: a full correct sentence preferred over the
bare name, a wrong capital or a rambling answer). DPO's reference is the SFT model itself
(train.precompute_reference). After the SFT quickstart, export its adapter (outside the workdir:
export never writes into one; a preset base is named by its own export) and train:

  python -m jaxft.export --workdir=workdirs/quickstart --format=hf --base --out=exported/base
  python -m jaxft.export --workdir=workdirs/quickstart --format=peft --out=exported/quickstart-peft \
      --base_model=exported/base
  python -m jaxft.train --config=configs/quickstart.py:objective=dpo --workdir=workdirs/quickstart-dpo

`configs/quickstart.py:objective=grpo` trains by reward (docs/grpo.md) on the bundled capital
questions as prompt rows (capital_prompts_train.jsonl, each with its `answer`): 8 completions of
2 prompts a step, paid for the right city (match:contains) and for stopping within 4 words
(length:4); jaxft.evaluate scores it on the SFT quickstart's held-out questions. It starts from
the random quickstart model, so the length reward moves first
(--config.peft.init_from=exported/quickstart-peft continues from the SFT quickstart's adapter):

  python -m jaxft.train --config=configs/quickstart.py:objective=grpo \
      --workdir=workdirs/quickstart-grpo
"""

from jaxft import configlib
from jaxft.data import bundled

# Learning rates (default 3e-3) measured to train each method on this task; prefixes start at
# N(0, 1), as PEFT's, and need far larger steps to move. LoRA (the default, and qlora/int8):
# 8e-3, which generalises to the held-out phrasings: exact match 0.9875 / 0.9875 / 1.000 for seeds
# 0 / 1 / 2 (eval loss 0.30 at seed 0), where 3e-3 gave 0.90 / 0.95 / 0.9875 (0.77) and, at seed
# 0, 5e-3 0.975 (0.47) and 5e-3 with LoRA dropout 0.1 0.975 (0.41); all 150 steps.
_LR = {"lora": 8e-3, "adapter": 1e-2, "prefix": 3e-1}


def get_config(arg=None):
  a = configlib.parse_arg(arg, method="lora", objective="sft")
  c = configlib.sibling(__file__, "base").get_config()
  configlib.apply_method(c, a.method)
  c.peft.targets = "all-linear"
  c.peft.lora.rank = 16
  c.peft.lora.alpha = 32.0
  c.data.train = bundled.path("capitals_train.jsonl")
  c.data.eval = bundled.path("capitals_eval.jsonl")
  c.data.max_len = 128
  c.data.batch_size = 16
  c.optim.lr = _LR.get(c.peft.method, 3e-3)
  c.train.steps = 150
  c.train.log_every = 10
  c.train.eval_every = 50
  # The answers are a city name and a period ("Paris.", "Mexico City.").
  c.eval.style.max_words = 4
  c.eval.style.must_match = r"^[A-Z][^.!?]*\.$"  # one sentence, capitalised, ending with a period
  c.eval.style.must_not_contain = ("capital", "I think")
  c.eval.confident = 0.5  # its tuned answers average ~0.7 per token: 0.9 would flag none
  if a.objective == "grpo":
    _grpo(c)
  elif a.objective != "sft":
    _preference(c, a.objective)
  return c


def _grpo(c):
  c.train.objective = "grpo"
  c.data.train = bundled.path("capital_prompts_train.jsonl")
  # The SFT quickstart's held-out rows: checked as prompts while training (GRPO evaluates no loss
  # then), and what jaxft.evaluate scores the trained workdir on.
  c.data.eval = bundled.path("capitals_eval.jsonl")
  c.data.max_len = 64
  c.data.batch_size = 16  # completions per step: 2 prompts x 8 generations
  c.rl.generations = 8
  c.rl.rewards = "match:contains,length:4"
  c.rl.max_completion_tokens = 16
  c.train.steps = 30


def _preference(c, objective):
  c.train.objective = objective
  c.peft.init_from = "exported/quickstart-peft"  # the SFT quickstart's adapter, exported
  c.train.precompute_reference = objective == "dpo"
  c.data.train = bundled.path("capital_prefs_train.jsonl")
  c.data.eval = bundled.path("capital_prefs_eval.jsonl")
  c.data.batch_size = 8  # pairs per row (packed): about 3 per row
  c.optim.lr = 1e-3
  c.train.steps = 200
  c.train.eval_every = 50
