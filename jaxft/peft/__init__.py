"""Fine-tuning methods over the trainable/frozen partition. `from_config` builds one from config.peft."""

from __future__ import annotations

from jaxft.errors import ConfigError
from jaxft.models.config import ModelConfig
from jaxft.peft.base import (Method, count_params, flatten, match_targets, merge_trees,
                             unflatten)
from jaxft.peft.lora import LoRA

METHODS = ("full", "lora")


def from_config(peft_cfg, model_cfg: ModelConfig) -> Method:
  """Builds the method named by `peft.method` with its settings; raises ConfigError on bad values."""
  name = peft_cfg.method
  if name == "full":
    return Method()
  if name == "lora":
    lc = peft_cfg.lora
    if lc.rank < 1:
      raise ConfigError(f"peft.lora.rank={lc.rank}: must be >= 1")
    if not 0.0 <= lc.dropout < 1.0:
      raise ConfigError(f"peft.lora.dropout={lc.dropout}: must be in [0, 1)")
    return LoRA(targets=match_targets(peft_cfg.targets, model_cfg), rank=int(lc.rank),
                alpha=float(lc.alpha), dropout=float(lc.dropout), rslora=bool(lc.rslora))
  raise ConfigError(f"peft.method={name!r}: expected one of {', '.join(METHODS)}")


__all__ = ["Method", "LoRA", "from_config", "merge_trees", "flatten", "unflatten", "count_params",
           "match_targets", "METHODS"]
