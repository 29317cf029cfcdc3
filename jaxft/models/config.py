"""`ModelConfig`: the architecture of a Llama-family decoder, and the embedded quickstart preset."""

from __future__ import annotations

import dataclasses
from typing import Any

from jaxft.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Static description of a decoder. Hashable, so it can be a static jit argument.

  `rope_scaling` is a tuple of (key, value) pairs (hashable) in HF's spelling, e.g.
  (("rope_type", "llama3"), ("factor", 8.0), ...), or None.
  """
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rope_theta: float = 10000.0
  rope_scaling: tuple[tuple[str, Any], ...] | None = None
  rms_norm_eps: float = 1e-5
  max_position_embeddings: int = 4096
  qkv_bias: bool = False
  sliding_window: int | None = None
  tie_embeddings: bool = False
  architecture: str = "LlamaForCausalLM"
  bos_token_id: int | None = 1
  eos_token_id: int | tuple[int, ...] | None = 2
  pad_token_id: int | None = None
  initializer_range: float = 0.02
  # Numerics: parameters are stored in `param_dtype`, matmuls run in `dtype`.
  dtype: str = "float32"
  param_dtype: str = "float32"
  remat: str = "none"  # none | full | dots | auto (see llama._remat)
  attention: str = "auto"  # auto | einsum | xla | cudnn | splash (see llama.attention_impl)

  def __post_init__(self):
    if self.num_heads % self.num_kv_heads:
      raise ConfigError(f"num_heads={self.num_heads} is not a multiple of "
                        f"num_kv_heads={self.num_kv_heads}")
    if self.remat not in ("none", "full", "dots", "auto"):
      raise ConfigError(f"model.remat={self.remat!r}: expected none, full, dots or auto")
    if self.attention not in ("auto", "einsum", "xla", "cudnn", "splash"):
      raise ConfigError(f"model.attention={self.attention!r}: expected auto, einsum, xla, cudnn "
                        "or splash")

  @property
  def q_size(self) -> int:
    return self.num_heads * self.head_dim

  @property
  def kv_size(self) -> int:
    return self.num_kv_heads * self.head_dim

  def replace(self, **kw) -> "ModelConfig":
    return dataclasses.replace(self, **kw)


# The embedded demo base: a tiny Llama-architecture model sized for the Mistral v1 tokenizer that
# mistral-common ships. It is initialised at random; real work points model.path at a checkpoint.
PRESETS = {
    "quickstart": ModelConfig(
        vocab_size=32000, hidden_size=128, intermediate_size=352, num_layers=4, num_heads=4,
        num_kv_heads=2, head_dim=32, max_position_embeddings=2048, tie_embeddings=False,
        initializer_range=0.1,
        bos_token_id=1, eos_token_id=2),
    # For tests: as small as the Mistral v1 vocabulary allows.
    "tiny": ModelConfig(
        vocab_size=32000, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
        num_kv_heads=2, head_dim=16, max_position_embeddings=2048, initializer_range=0.1,
        bos_token_id=1, eos_token_id=2),
    # Shapes of the published models (random weights unless model.path is set).
    "llama3-1b": ModelConfig(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16, num_heads=32,
        num_kv_heads=8, head_dim=64, rope_theta=500000.0, tie_embeddings=True,
        rope_scaling=(("rope_type", "llama3"), ("factor", 32.0), ("low_freq_factor", 1.0),
                      ("high_freq_factor", 4.0), ("original_max_position_embeddings", 8192)),
        max_position_embeddings=131072, bos_token_id=128000, eos_token_id=128001),
    "llama3-8b": ModelConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
        num_kv_heads=8, head_dim=128, rope_theta=500000.0,
        rope_scaling=(("rope_type", "llama3"), ("factor", 8.0), ("low_freq_factor", 1.0),
                      ("high_freq_factor", 4.0), ("original_max_position_embeddings", 8192)),
        max_position_embeddings=131072, bos_token_id=128000, eos_token_id=128001),
    "llama3-70b": ModelConfig(
        vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_layers=80, num_heads=64,
        num_kv_heads=8, head_dim=128, rope_theta=500000.0,
        rope_scaling=(("rope_type", "llama3"), ("factor", 8.0), ("low_freq_factor", 1.0),
                      ("high_freq_factor", 4.0), ("original_max_position_embeddings", 8192)),
        max_position_embeddings=131072, bos_token_id=128000, eos_token_id=128001),
    "mistral-7b": ModelConfig(
        vocab_size=32768, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
        num_kv_heads=8, head_dim=128, rope_theta=1000000.0, max_position_embeddings=32768,
        architecture="MistralForCausalLM", bos_token_id=1, eos_token_id=2),
}


def preset(name: str) -> ModelConfig:
  """Returns the named preset; raises ConfigError naming the choices."""
  if name not in PRESETS:
    raise ConfigError(f"model.preset={name!r}: expected one of {sorted(PRESETS)}")
  return PRESETS[name]
