"""GRPO's data: prompt rows, read and checked, and the resumable stream of prompt groups.

A row is chat messages ending with (at least) one user turn, or a plain prompt string:

  {"messages": [{"role": "user", "content": "Capital of Peru?"}], "answer": "Lima"}
  {"prompt": "Capital of Peru?", "answer": "Lima", "answerable": true}

Turns after the last user turn (an SFT row's answer) are dropped. Every other field of the row
(answer, answerable, ...) reaches the reward functions as a column, TRL's convention.
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
from absl import logging

from jaxft import inference
from jaxft.data import formats, show, sources
from jaxft.data.formats import Example
from jaxft.data.pipeline import Position
from jaxft.errors import DataError

PROMPT_KEYS = ("messages", "prompt")


@dataclasses.dataclass
class PromptRow:
  """One prompt: where it came from (file:line), its messages, token ids and reward fields."""
  origin: str
  messages: list
  ids: np.ndarray
  fields: dict


@dataclasses.dataclass
class PromptSet:
  """The prompts of a file (`examples`, as the trainer calls a dataset's rows)."""
  examples: list[PromptRow]


def _messages(origin: str, row) -> list:
  if not isinstance(row, dict):
    raise DataError(f"{origin}: expected a JSON object with 'messages' or 'prompt'")
  if "messages" in row:
    msgs = formats.field(origin, row, "messages", list)
    for i, m in enumerate(msgs):
      if not (isinstance(m, dict) and m.get("role") in formats.ROLES
              and isinstance(m.get("content"), str)):
        raise DataError(f"{origin}: messages[{i}] must be an object with a role (one of "
                        f"{', '.join(formats.ROLES)}) and a string content")
    users = [i for i, m in enumerate(msgs) if m["role"] == "user"]
    if not users:
      raise DataError(f"{origin}: 'messages' has no user message: a GRPO prompt row needs the "
                      "question as a user turn")
    return [{"role": m["role"], "content": m["content"]} for m in msgs[:users[-1] + 1]]
  if "prompt" in row:
    text = formats.field(origin, row, "prompt", str)
    if not text.strip():
      raise DataError(f"{origin}: 'prompt' is empty")
    return [{"role": "user", "content": text}]
  raise DataError(f"{origin}: a GRPO prompt row needs 'messages' (with a user message) or "
                  f"'prompt'; got keys {sorted(row)}")


def prompt_row(origin: str, row, encoder, max_len: int, completion_tokens: int) -> PromptRow:
  """One row as a PromptRow. Raises DataError naming file:line for a row without a user message,
  or whose prompt leaves fewer than `completion_tokens` of data.max_len."""
  msgs = _messages(origin, row)
  ids = inference.prompt_ids(encoder, inference.Prompt(origin, msgs))
  if len(ids) + completion_tokens > max_len:
    raise DataError(f"{origin}: the prompt has {len(ids)} tokens; with "
                    f"rl.max_completion_tokens={completion_tokens} it needs data.max_len >= "
                    f"{len(ids) + completion_tokens} (data.max_len={max_len})")
  return PromptRow(origin, msgs, ids, {k: v for k, v in row.items() if k not in PROMPT_KEYS})


def load_prompts(spec: str, encoder, max_len: int, completion_tokens: int) -> PromptSet:
  """Every row of `spec` as a PromptRow (prompt_row's checks)."""
  out = [prompt_row(origin, row, encoder, max_len, completion_tokens)
         for origin, row in sources.read_rows(spec)]
  logging.info("%s: %d prompts (longest %d tokens)", spec, len(out),
               max(len(r.ids) for r in out))
  return PromptSet(out)


class Preview:
  """What `python -m jaxft.data` shows of prompt rows (Objective.preview): each prompt as the
  policy reads it before sampling (the chat template with the generation prompt), with the
  fields the rewards get. No token of a prompt carries loss: GRPO's loss is on the completions it
  samples."""

  def __init__(self, config, encoder, split: str = "train"):
    self.path = show.split_spec(config, split)
    self._enc, self._max_len = encoder, config.data.max_len
    self._completion = config.rl.max_completion_tokens

  def rows(self, n: int) -> list[show.Shown]:
    show.check_rows(n)
    out = []
    for origin, row in itertools.islice(sources.read_rows(self.path), n):
      p = prompt_row(origin, row, self._enc, self._max_len, self._completion)
      text = self._enc.render(p.messages, add_generation_prompt=True, origin=origin)
      out.append(show.Shown(origin, "prompt", text, Example(p.ids, np.zeros(len(p.ids), bool)),
                            len(p.ids), fields=p.fields))
    return out

  def counts(self) -> show.Counts:
    ps = load_prompts(self.path, self._enc, self._max_len, self._completion).examples
    return show.Counts({"prompt": len(ps)}, sum(len(p.ids) for p in ps), 0, 0, len(ps),
                       note="no prompt token carries loss: the loss is on sampled completions")


class PromptStream:
  """Deterministic, resumable groups of `prompts` prompt rows, each served `iterations` times in a
  row (rl.iterations: the same rollouts for that many steps).

  Position(epoch, index): index = (prompts of the epoch taken) x iterations + the repeat, so with
  iterations=1 it is jaxft.data.pipeline's position and a checkpoint resumes the same prompts.
  batch_at returns {"rows": [PromptRow], "repeat": r} (r = 0: fresh rollouts are due)."""

  def __init__(self, examples: list[PromptRow], *, prompts: int, iterations: int, seed: int,
               shuffle: bool = True):
    self.examples, self.prompts, self.iterations = examples, prompts, iterations
    self.seed, self.shuffle = seed, shuffle
    self._order: dict[int, np.ndarray] = {}

  def _order_of(self, epoch: int) -> np.ndarray:
    if epoch not in self._order:
      n = len(self.examples)
      self._order = {epoch: np.random.default_rng([self.seed, epoch]).permutation(n)
                     if self.shuffle else np.arange(n)}
    return self._order[epoch]

  def batch_at(self, pos: Position, select=None) -> tuple[dict, Position]:
    """The prompt group at `pos` and the position after it. `select` (rows of the train batch a
    process builds) is unused: rollouts run on one process (the objective refuses more)."""
    del select
    taken, epoch = [], pos.epoch
    index, repeat = divmod(pos.index, self.iterations)
    while len(taken) < self.prompts:
      order = self._order_of(epoch)
      if index >= len(order):
        epoch, index = epoch + 1, 0
        continue
      k = min(self.prompts - len(taken), len(order) - index)
      taken.extend(self.examples[i] for i in order[index:index + k])
      index += k
    if repeat + 1 < self.iterations:
      nxt = Position(pos.epoch, pos.index + 1)
    else:
      nxt = Position(epoch, index * self.iterations)
    return {"rows": taken, "repeat": repeat}, nxt
