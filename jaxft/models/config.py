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
  remat: str = "none"  # none | full | dots | offload | auto (see llama._remat)
  attention: str = "auto"  # auto | einsum | xla | cudnn | splash (see llama.attention_impl)
  # > 0: the MLP runs over slices of this many tokens, each recomputed in the backward, so the
  # [tokens, intermediate] activations never exist whole (long_context.tiled_mlp; docs/long_context.md).
  mlp_tile: int = 0
  # Family features (Qwen3, Gemma 2/3); the defaults are Llama's. Read by the one decoder.
  qk_norm: bool = False  # RMSNorm over head_dim on queries and keys before RoPE (Qwen3, Gemma 3)
  norm_plus_one: bool = False  # norms scale by (1 + weight) and weights start at 0 (Gemma)
  hidden_act: str = "silu"  # silu (SwiGLU) | gelu_tanh (GeGLU, Gemma)
  scale_embeddings: bool = False  # embeddings times sqrt(hidden_size) (Gemma)
  post_norms: bool = False  # extra norms on the attention and MLP outputs (Gemma 2/3)
  attn_softcap: float | None = None  # cap * tanh(scores / cap) (Gemma 2)
  final_softcap: float | None = None  # the same on the logits (Gemma 2)
  query_pre_attn_scalar: float | None = None  # scores scaled by its -1/2 power, not head_dim's
  # Per layer "sliding_attention" | "full_attention" (Gemma 2/3); None: every layer is as
  # `sliding_window` says.
  layer_types: tuple[str, ...] | None = None
  rope_local_theta: float | None = None  # RoPE base of the sliding layers, unscaled (Gemma 3)
  # Mixture of experts (Mixtral, Qwen3-MoE): num_experts > 0 replaces every layer's MLP by a
  # router and `num_experts` SwiGLU experts of width moe_intermediate_size (models/moe.py).
  num_experts: int = 0
  experts_per_token: int = 2  # top-k
  moe_intermediate_size: int = 0
  norm_topk_prob: bool = True  # renormalise the top-k router probabilities (Mixtral: always)
  router_aux_coef: float = 0.0  # weight of the load-balancing loss in the objective

  def __post_init__(self):
    if self.num_heads % self.num_kv_heads:
      raise ConfigError(f"num_heads={self.num_heads} is not a multiple of "
                        f"num_kv_heads={self.num_kv_heads}")
    if self.remat not in ("none", "full", "dots", "offload", "auto"):
      raise ConfigError(f"model.remat={self.remat!r}: expected none, full, dots, offload or auto")
    if self.attention not in ("auto", "einsum", "xla", "cudnn", "splash"):
      raise ConfigError(f"model.attention={self.attention!r}: expected auto, einsum, xla, cudnn "
                        "or splash")
    if self.mlp_tile < 0:
      raise ConfigError(f"model.mlp_tile={self.mlp_tile}: expected 0 (off) or a token count")
    if self.hidden_act not in ("silu", "gelu_tanh"):
      raise ConfigError(f"hidden_act={self.hidden_act!r}: expected silu or gelu_tanh")
    if self.num_experts and not 0 < self.experts_per_token <= self.num_experts:
      raise ConfigError(f"num_experts_per_tok={self.experts_per_token}: expected 1 to "
                        f"num_experts={self.num_experts}")
    if self.num_experts and self.moe_intermediate_size <= 0:
      raise ConfigError("moe_intermediate_size must be positive for a mixture of experts")
    if self.layer_types is not None:
      kinds = set(self.layer_types) - {"sliding_attention", "full_attention"}
      if kinds or len(self.layer_types) != self.num_layers:
        raise ConfigError(f"layer_types={list(self.layer_types)}: expected {self.num_layers} "
                          "entries, each sliding_attention or full_attention")
      if "sliding_attention" in self.layer_types and not self.sliding_window:
        raise ConfigError("layer_types has sliding_attention layers but sliding_window is not set")

  @property
  def sliding_layers(self) -> tuple[bool, ...] | None:
    """Which layers use the sliding window when layers differ (layer_types mixes both), else None:
    then every layer is alike (sliding when `sliding_window` is set)."""
    if self.layer_types is None or len(set(self.layer_types)) < 2:
      return None
    return tuple(t == "sliding_attention" for t in self.layer_types)

  @property
  def q_size(self) -> int:
    return self.num_heads * self.head_dim

  @property
  def kv_size(self) -> int:
    return self.num_kv_heads * self.head_dim

  def replace(self, **kw) -> "ModelConfig":
    return dataclasses.replace(self, **kw)


# The fixed layer features of each architecture beyond Llama's (hf_config reads and writes them).
_GEMMA = dict(norm_plus_one=True, hidden_act="gelu_tanh", scale_embeddings=True, post_norms=True)
FAMILIES: dict[str, dict[str, Any]] = {
    "LlamaForCausalLM": {}, "MistralForCausalLM": {}, "Qwen2ForCausalLM": dict(qkv_bias=True),
    "Qwen3ForCausalLM": dict(qk_norm=True),
    "Gemma2ForCausalLM": _GEMMA,
    "Gemma3ForCausalLM": dict(_GEMMA, qk_norm=True),
    "MixtralForCausalLM": {}, "Qwen3MoeForCausalLM": dict(qk_norm=True),
}
MOE_ARCHITECTURES = ("MixtralForCausalLM", "Qwen3MoeForCausalLM")
_FEATURES = ("qkv_bias", "qk_norm", "norm_plus_one", "hidden_act", "scale_embeddings", "post_norms")


def family_features(arch: str) -> dict[str, Any]:
  """The ModelConfig fields `arch` fixes (qk_norm, norm_plus_one, ...), every one of them."""
  defaults = {f.name: f.default for f in dataclasses.fields(ModelConfig) if f.name in _FEATURES}
  return dict(defaults, **FAMILIES[arch])


def _layer_pattern(n: int, every: int) -> tuple[str, ...]:
  """Gemma's layer_types: every `every`-th layer global, the others sliding."""
  return tuple("full_attention" if (i + 1) % every == 0 else "sliding_attention" for i in range(n))


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
    "qwen3-8b": ModelConfig(
        vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_layers=36, num_heads=32,
        num_kv_heads=8, head_dim=128, rope_theta=1000000.0, rms_norm_eps=1e-6,
        max_position_embeddings=40960, architecture="Qwen3ForCausalLM",
        bos_token_id=151643, eos_token_id=151645, **FAMILIES["Qwen3ForCausalLM"]),
    "gemma2-9b": ModelConfig(
        vocab_size=256000, hidden_size=3584, intermediate_size=14336, num_layers=42, num_heads=16,
        num_kv_heads=8, head_dim=256, rms_norm_eps=1e-6, max_position_embeddings=8192,
        sliding_window=4096, layer_types=_layer_pattern(42, 2), query_pre_attn_scalar=256.0,
        attn_softcap=50.0, final_softcap=30.0, tie_embeddings=True,
        architecture="Gemma2ForCausalLM", bos_token_id=2, eos_token_id=1, pad_token_id=0,
        **FAMILIES["Gemma2ForCausalLM"]),
    "gemma3-12b": ModelConfig(
        vocab_size=262208, hidden_size=3840, intermediate_size=15360, num_layers=48, num_heads=16,
        num_kv_heads=8, head_dim=256, rope_theta=1000000.0, rope_local_theta=10000.0,
        rope_scaling=(("factor", 8.0), ("rope_type", "linear")), rms_norm_eps=1e-6,
        max_position_embeddings=131072, sliding_window=1024, layer_types=_layer_pattern(48, 6),
        query_pre_attn_scalar=256.0, tie_embeddings=True, architecture="Gemma3ForCausalLM",
        bos_token_id=2, eos_token_id=(1, 106), pad_token_id=0, **FAMILIES["Gemma3ForCausalLM"]),
    "mixtral-8x7b": ModelConfig(
        vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
        num_kv_heads=8, head_dim=128, rope_theta=1000000.0, max_position_embeddings=32768,
        num_experts=8, experts_per_token=2, moe_intermediate_size=14336, router_aux_coef=0.02,
        architecture="MixtralForCausalLM", bos_token_id=1, eos_token_id=2),
    "qwen3-30b-a3b": ModelConfig(
        vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_layers=48, num_heads=32,
        num_kv_heads=4, head_dim=128, rope_theta=1000000.0, rms_norm_eps=1e-6,
        max_position_embeddings=40960, num_experts=128, experts_per_token=8,
        moe_intermediate_size=768, norm_topk_prob=True, router_aux_coef=0.001,
        architecture="Qwen3MoeForCausalLM", bos_token_id=151643, eos_token_id=151645,
        **FAMILIES["Qwen3MoeForCausalLM"]),
}


def preset(name: str) -> ModelConfig:
  """Returns the named preset; raises ConfigError naming the choices."""
  if name not in PRESETS:
    raise ConfigError(f"model.preset={name!r}: expected one of {sorted(PRESETS)}")
  return PRESETS[name]
