"""Training objectives: what is learned from what data. Each owns its loss (inside the one jitted
step), its data, its batches and the work around the loop (base.py lists the methods); the
trainer, evaluation and jaxft.plan run whichever objective `from_config` builds, and never ask its
name.

  base.py        `Objective`: the methods an objective defines, with their defaults; token_logps
  sft.py         `SFT`: cross-entropy on target tokens (and train.base_kl's replay toward the base)
  preference.py  `Preference`: DPO (sigmoid, IPO), ORPO and SimPO over chosen/rejected pairs
  grpo.py        `GRPO`: the policy trained on rewards of its own rollouts (jaxft/rl/)

A new objective is a module with an `Objective` subclass and a builder `(config, trains_base) ->
objective`, added to the registry with `register(name, build)`; train.objective names it.
"""

from __future__ import annotations

from typing import Callable

from jaxft.errors import ConfigError
from jaxft.objectives import grpo, preference, sft
from jaxft.objectives.base import TOKEN_FIELDS, Objective, PlanPhase, finite, token_logps
from jaxft.objectives.preference import (DPO_LOSSES, PREFERENCE_METRICS, Preference, pair_losses,
                                         per_sequence)
from jaxft.objectives.grpo import GRPO
from jaxft.objectives.sft import SFT

# train.objective -> its builder (config, trains_base) -> Objective; raises ConfigError.
_BUILDERS: dict[str, Callable] = {"sft": sft.from_config}
_BUILDERS.update({name: preference.from_config for name in preference.NAMES})
_BUILDERS["grpo"] = grpo.from_config
OBJECTIVES = tuple(_BUILDERS)  # the built-in names


def register(name: str, build: Callable) -> None:
  """Makes train.objective=`name` build its objective with `build(config, trains_base)` (a name
  registered again is replaced)."""
  _BUILDERS[name] = build


def names() -> tuple[str, ...]:
  """The names train.objective accepts."""
  return tuple(_BUILDERS)


def from_config(config, trains_base: bool) -> Objective:
  """The objective named by train.objective, with its settings (train.base_kl, pref.*, ...).
  trains_base: the method trains the base weights (full fine-tuning keeps no frozen copy of the
  starting model). Raises ConfigError naming the key on bad values or combinations."""
  t = config.train
  if t.objective not in _BUILDERS:
    raise ConfigError(f"train.objective={t.objective!r}: expected one of {', '.join(_BUILDERS)}")
  if not (finite(t.base_kl) and t.base_kl >= 0):
    raise ConfigError(f"train.base_kl={t.base_kl}: must be a finite number >= 0")
  return _BUILDERS[t.objective](config, trains_base)


__all__ = ["Objective", "PlanPhase", "SFT", "Preference", "GRPO", "from_config", "register",
           "names", "OBJECTIVES", "DPO_LOSSES", "PREFERENCE_METRICS", "TOKEN_FIELDS", "pair_losses",
           "per_sequence", "token_logps"]
