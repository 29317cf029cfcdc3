"""The embedded default: LoRA on a tiny random Llama with the Mistral v1 tokenizer and the bundled
capitals dataset. Runs on a laptop CPU in a couple of minutes, with no download."""

from jaxft import configlib
from jaxft.data import bundled


def get_config(arg=None):
  c = configlib.sibling(__file__, "base").get_config(arg)
  c.peft.targets = "all-linear"
  c.peft.lora.rank = 16
  c.peft.lora.alpha = 32.0
  c.data.train = bundled.path("capitals_train.jsonl")
  c.data.eval = bundled.path("capitals_eval.jsonl")
  c.data.max_len = 128
  c.data.batch_size = 16
  c.optim.lr = 3e-3
  c.train.steps = 150
  c.train.log_every = 10
  c.train.eval_every = 50
  return c
