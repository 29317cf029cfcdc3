"""Fine-tuning methods over the trainable/frozen partition. `from_config` builds one from config.peft."""

from __future__ import annotations

from jaxft.errors import ConfigError
from jaxft.models.config import ModelConfig
from jaxft.peft.base import (Method, count_params, flatten, is_expert, match_targets, merge_trees,
                             unflatten)
from jaxft.peft.adapter import BottleneckAdapter, check as _check_adapter
from jaxft.peft.dora import DoRA
from jaxft.peft.lora import LoRA
from jaxft.peft.prefix import Prefix

METHODS = ("full", "lora", "dora", "adapter", "prefix")
_CLASSES = {"full": Method, "lora": LoRA, "dora": DoRA, "adapter": BottleneckAdapter,
            "prefix": Prefix}


def export_format(name: str) -> str:
  """The adapter format (--format) the method `name` exports to: "peft", "adapter" or "" (only
  the merged model). Each method class declares its own (`Method.export_format`)."""
  return _CLASSES[name].export_format if name in _CLASSES else ""


def methods_exporting(fmt: str) -> list[str]:
  return [n for n, cls in _CLASSES.items() if cls.export_format == fmt]


def from_config(peft_cfg, model_cfg: ModelConfig) -> Method:
  """Builds the method named by `peft.method` with its settings; raises ConfigError on bad values."""
  name = peft_cfg.method
  if name == "full":
    return Method()
  if name in ("lora", "dora"):
    lc = peft_cfg.lora
    if lc.rank < 1:
      raise ConfigError(f"peft.lora.rank={lc.rank}: must be >= 1")
    if not 0.0 <= lc.dropout < 1.0:
      raise ConfigError(f"peft.lora.dropout={lc.dropout}: must be in [0, 1)")
    cls = LoRA if name == "lora" else DoRA
    targets = match_targets(peft_cfg.targets, model_cfg)
    if name == "dora" and any(is_expert(model_cfg, n) for n in targets):
      raise ConfigError(f"peft.targets={peft_cfg.targets!r} reaches the experts of a mixture of "
                        "experts, which DoRA does not implement; use peft.method=lora, or "
                        "attention targets (q_proj,k_proj,v_proj,o_proj)")
    return cls(targets=targets, rank=int(lc.rank),
               alpha=float(lc.alpha), dropout=float(lc.dropout), rslora=bool(lc.rslora))
  if name == "adapter":
    ac = peft_cfg.adapter
    _check_adapter(ac.size, ac.placement, ac.activation)
    return BottleneckAdapter(size=int(ac.size), placement=ac.placement, activation=ac.activation)
  if name == "prefix":
    pc = peft_cfg.prefix
    if pc.length < 1:
      raise ConfigError(f"peft.prefix.length={pc.length}: must be >= 1")
    if pc.mlp_hidden < 0:
      raise ConfigError(f"peft.prefix.mlp_hidden={pc.mlp_hidden}: must be >= 0 (0 = no MLP)")
    if pc.length >= model_cfg.max_position_embeddings:
      raise ConfigError(f"peft.prefix.length={pc.length}: takes every position of the model's "
                        f"{model_cfg.max_position_embeddings}-token context")
    return Prefix(length=int(pc.length), mlp_hidden=int(pc.mlp_hidden))
  raise ConfigError(f"peft.method={name!r}: expected one of {', '.join(METHODS)}")


__all__ = ["Method", "LoRA", "DoRA", "BottleneckAdapter", "Prefix", "from_config", "merge_trees",
           "flatten", "unflatten", "count_params", "match_targets", "METHODS", "export_format",
           "methods_exporting"]
