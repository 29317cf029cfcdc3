"""Reward specs from the config, and `score`, which runs the rewards and checks what they return.

In the config, `rl.rewards` names the reward functions and `rl.reward_weights` their weights:

  rl.rewards = "match:contains,abstain,length:40,my_rewards:brevity"
  rl.reward_weights = "1,1,0.5,0.2"      # "" or () = 1 each

Either may be a tuple instead (`("match", "format:search:^[0-9]{1,3}$")`, `(1.0, 0.5)`); the string
form splits at every comma, so a spec holding a comma (a regex) needs the tuple form. A spec is
NAME or NAME:ARGS (the built-ins are jaxft/rl/rewards.py's; a built-in's name wins over a module
of the same name):

  match[:MODE[:FIELD]]     MODE normalised (default) | exact | contains; FIELD default `answer`
  format:[full:|search:]REGEX   the whole completion matches REGEX (full, the default) or REGEX
                           is found in it; REGEX is the rest of the spec, colons included
  abstain[:FIELD]          FIELD default `answerable`; what counts as abstaining: `resolve`'s
                           abstain_patterns (default rewards.ABSTAIN_PATTERNS)
  length:N[:UNIT]          UNIT words (default) | chars | tokens
  MODULE:FUNCTION          a user's function, imported from the working directory or sys.path
                           (`pkg.mod:fn` works; FUNCTION may be dotted: `mod:Class.method`)

A reward's name in metrics is its spec as written (rewards/match:contains/mean).

Errors are one line: a spec that cannot be built (unknown name, missing module or function, a bad
argument) and a function that raises or returns other than one finite number per completion are
ConfigErrors naming the spec; a built-in's DataError (a row field it cannot read) passes through.
Unlike TRL, a None reward ("does not apply") is refused too: return 0 where a reward does not apply.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import math
import numbers
import os
import re
import sys
from typing import Callable, Sequence

import numpy as np

from jaxft.errors import ConfigError, JaxftError
from jaxft.rl.rewards import (ABSTAIN_PATTERNS, LENGTH_UNITS, MATCH_MODES, abstain_reward,
                              format_reward, length_reward, match_reward)

BUILTINS = ("match", "format", "abstain", "length")


@dataclasses.dataclass(frozen=True)
class Reward:
  """A reward function and the spec that named it (its name in metrics: rewards/NAME/mean)."""
  name: str
  fn: Callable


# -- specs -> functions --------------------------------------------------------------------------

def _builtin(spec: str, name: str, rest: str, abstain_patterns) -> Callable:
  args = rest.split(":") if rest else []
  bad = lambda want: ConfigError(f"rl.rewards: {spec!r}: {want}")
  if name == "match":
    if len(args) > 2 or not all(args):
      raise bad("expected match[:MODE[:FIELD]]")
    mode = args[0] if args else "normalised"
    if mode not in MATCH_MODES:
      raise bad(f"MODE {mode!r}: expected one of exact, normalised, contains")
    return match_reward(mode, args[1] if len(args) > 1 else "answer")
  if name == "format":
    mode, regex = "full", rest
    head, sep, tail = rest.partition(":")
    if sep and head in ("full", "search"):
      mode, regex = head, tail
    if not regex:
      raise bad("expected format:REGEX or format:search:REGEX")
    try:
      return format_reward(regex, mode)
    except re.error as e:
      raise bad(f"not a valid regular expression ({e})") from None
  if name == "abstain":
    if len(args) > 1 or (args and not args[0]):
      raise bad("expected abstain or abstain:FIELD")
    return abstain_reward(args[0] if args else "answerable", abstain_patterns)
  if not args or len(args) > 2 or not args[0].isdigit() or int(args[0]) < 1:
    raise bad("expected length:N or length:N:UNIT with N a whole number >= 1")
  unit = args[1] if len(args) > 1 else "words"
  if unit not in LENGTH_UNITS:
    raise bad(f"UNIT {unit!r}: expected one of {', '.join(LENGTH_UNITS)}")
  return length_reward(int(args[0]), unit)


@contextlib.contextmanager
def _cwd_on_path():
  """The working directory on sys.path while importing (an installed entry point's sys.path lacks
  it), after what is there, so that it shadows no installed package."""
  cwd = os.getcwd()
  added = cwd not in sys.path and "" not in sys.path
  if added:
    sys.path.append(cwd)
  try:
    yield
  finally:
    if added and cwd in sys.path:
      sys.path.remove(cwd)


def load_function(spec: str) -> Callable:
  """The function `module:function` names (module imported from the working directory or
  sys.path). Raises ConfigError naming the spec when the module or the function is missing,
  or importing the module fails."""
  module_name, _, attr = spec.partition(":")
  if not module_name or not attr:
    raise ConfigError(f"rl.rewards: {spec!r}: expected module:function")
  try:
    with _cwd_on_path():
      module = importlib.import_module(module_name)
  except ModuleNotFoundError as e:
    if e.name and (module_name == e.name or module_name.startswith(e.name + ".")):
      raise ConfigError(f"rl.rewards: {spec!r}: no module named {e.name!r} (looked in the "
                        f"working directory and on sys.path)") from None
    raise ConfigError(f"rl.rewards: {spec!r}: importing {module_name} failed: {e}") from None
  except Exception as e:  # the user's module raised while importing
    raise ConfigError(f"rl.rewards: {spec!r}: importing {module_name} raised "
                      f"{type(e).__name__}: {_line(e)}") from e
  fn = module
  for part in attr.split("."):
    fn = getattr(fn, part, None)
    if fn is None:
      raise ConfigError(f"rl.rewards: {spec!r}: module {module_name} has no {attr!r}")
  if not callable(fn):
    raise ConfigError(f"rl.rewards: {spec!r}: {attr} is not a function ({type(fn).__name__})")
  return fn


def split_specs(specs) -> tuple[str, ...]:
  """rl.rewards as a tuple of specs: a comma-separated string or a sequence of strings."""
  items = specs.split(",") if isinstance(specs, str) else list(specs or ())
  if not all(isinstance(s, str) for s in items):
    raise ConfigError(f"rl.rewards={specs!r}: expected a string of comma-separated reward "
                      "names or a tuple of them")
  items = tuple(s.strip() for s in items)
  if not items or not all(items):
    raise ConfigError(f"rl.rewards={specs!r}: name at least one reward, with none empty "
                      f"({', '.join(BUILTINS)} or module:function)")
  return items


def resolve(specs, abstain_patterns: Sequence[str] = ABSTAIN_PATTERNS) -> tuple[Reward, ...]:
  """The Rewards that `specs` (rl.rewards: a string or tuple, module docstring) name, in order.
  abstain_patterns: what `abstain` counts as abstaining (e.g. config.eval.abstain_patterns).
  Raises ConfigError on an unknown name, a spec named twice or one that cannot be built."""
  out = []
  for spec in split_specs(specs):
    name, _, rest = spec.partition(":")
    if name in BUILTINS:
      fn = _builtin(spec, name, rest, abstain_patterns)
    elif rest:
      fn = load_function(spec)
    else:
      raise ConfigError(f"rl.rewards: unknown reward {spec!r}: expected one of "
                        f"{', '.join(BUILTINS)}, or module:function for your own")
    if any(r.name == spec for r in out):
      raise ConfigError(f"rl.rewards: {spec!r} is named twice")
    out.append(Reward(spec, fn))
  return tuple(out)


def parse_weights(weights, n: int) -> tuple[float, ...]:
  """rl.reward_weights as n floats: "" / None / () give 1.0 each; else a comma-separated string
  or a sequence of n finite numbers. Raises ConfigError otherwise."""
  if weights is None or (isinstance(weights, (str, tuple, list)) and not len(weights)):
    return (1.0,) * n
  items = weights.split(",") if isinstance(weights, str) else list(weights)
  try:
    values = tuple(float(w) for w in items)
  except (TypeError, ValueError):
    values = ()
  if len(values) != len(items) or not all(math.isfinite(v) for v in values):
    raise ConfigError(f"rl.reward_weights={weights!r}: expected finite numbers, e.g. \"1,0.5\"")
  if len(values) != n:
    raise ConfigError(f"rl.reward_weights={weights!r}: {len(values)} weights for {n} rewards "
                      "in rl.rewards")
  return values


# -- scoring -------------------------------------------------------------------------------------

def _line(e: BaseException) -> str:
  """An exception's message on one line (at most 200 characters)."""
  text = " ".join(str(e).split())
  return text if len(text) <= 200 else text[:197] + "..."


def _checked(name: str, out, n: int) -> np.ndarray:
  if isinstance(out, (str, bytes, dict)) or not hasattr(out, "__len__"):
    raise ConfigError(f"rl.rewards: {name} returned a {type(out).__name__}: expected a list of "
                      f"{n} numbers, one per completion")
  out = list(out)
  if len(out) != n:
    raise ConfigError(f"rl.rewards: {name} returned {len(out)} values for {n} completions")
  for i, v in enumerate(out):
    if not isinstance(v, numbers.Real) or not math.isfinite(v):
      raise ConfigError(f"rl.rewards: {name} returned {v!r:.40} for completion {i}: expected a "
                        "finite number")
  return np.asarray(out, np.float64)


def _columns(rows: Sequence[dict]) -> dict[str, list]:
  keys = dict.fromkeys(k for row in rows for k in row if k not in ("prompt", "completion"))
  return {k: [row.get(k) for row in rows] for k in keys}


def score(rewards, weights, prompts: Sequence, completions: Sequence, rows: Sequence[dict],
          **extra):
  """Runs each reward on the completions and adds them up with their weights.

  rewards: rl.rewards (a spec string or tuple) or `resolve`'s Rewards; weights: rl.reward_weights
  (see parse_weights); prompts, completions, rows: one per completion (rows[i] is the prompt row
  completion i answers; its fields other than prompt and completion reach the functions, with
  `extra`, e.g. completion_ids). Returns (total float32 [n], {name: float32 [n]}, unweighted).
  Raises ConfigError naming the function that raises or returns other than n finite numbers;
  a built-in's DataError (a row field it cannot read) passes through."""
  if not (rewards and isinstance(rewards, tuple) and isinstance(rewards[0], Reward)):
    rewards = resolve(rewards)
  w = parse_weights(weights, len(rewards))
  n = len(completions)
  if len(prompts) != n or len(rows) != n:
    raise ValueError(f"{len(prompts)} prompts and {len(rows)} rows for {n} completions")
  fields = {**_columns(rows), **extra}
  total, per = np.zeros(n), {}
  for reward, weight in zip(rewards, w):
    try:
      out = reward.fn(prompts=list(prompts), completions=list(completions), **fields)
    except JaxftError:
      raise
    except Exception as e:
      raise ConfigError(f"rl.rewards: {reward.name} raised {type(e).__name__}: {_line(e)}") from e
    values = _checked(reward.name, out, n)
    per[reward.name] = values.astype(np.float32)
    total += weight * values
  return total.astype(np.float32), per


def reward_metrics(total, per_reward: dict) -> dict[str, float]:
  """What TRL logs of a batch's rewards: reward, reward_std and rewards/NAME/mean, /std (sample
  standard deviations; 0 for one completion)."""
  std = lambda x: float(np.std(x, ddof=1)) if len(x) > 1 else 0.0
  out = {"reward": float(np.mean(total)), "reward_std": std(total)}
  for name, values in per_reward.items():
    out[f"rewards/{name}/mean"], out[f"rewards/{name}/std"] = float(np.mean(values)), std(values)
  return out
