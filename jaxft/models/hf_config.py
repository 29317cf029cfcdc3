"""HF config.json <-> `ModelConfig`, for LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM,
Qwen3ForCausalLM, Gemma2ForCausalLM, Gemma3ForCausalLM (text), MixtralForCausalLM and
Qwen3MoeForCausalLM in both the transformers 4 spelling (rope_theta + rope_scaling, torch_dtype) and 5's (rope_parameters,
dtype)."""

from __future__ import annotations

import json
import os

from jaxft.errors import CheckpointError, ConfigError
from jaxft.models.config import MOE_ARCHITECTURES, ModelConfig, family_features
from jaxft.models.rope import inverse_frequencies

# architecture -> model_type
ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral",
                 "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3",
                 "Gemma2ForCausalLM": "gemma2", "Gemma3ForCausalLM": "gemma3_text",
                 "MixtralForCausalLM": "mixtral", "Qwen3MoeForCausalLM": "qwen3_moe"}
_GEMMAS = ("Gemma2ForCausalLM", "Gemma3ForCausalLM")
_QWENS = ("Qwen2ForCausalLM", "Qwen3ForCausalLM", "Qwen3MoeForCausalLM")
_ACTS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh"}
_DTYPE_NAMES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16",
                "fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "float": "float32",
                "half": "float16"}


def read_json(path: str) -> dict:
  try:
    with open(path, encoding="utf-8") as f:
      out = json.load(f)
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{path}: not valid JSON ({e})") from None
  if not isinstance(out, dict):
    raise CheckpointError(f"{path}: expected a JSON object")
  return out


def _config_json(path: str) -> tuple[str, dict]:
  if not os.path.isdir(path):
    raise CheckpointError(f"model.path={path!r}: not a directory (expected an HF checkpoint "
                          "directory with config.json and *.safetensors)")
  file = os.path.join(path, "config.json")
  if not os.path.isfile(file):
    raise CheckpointError(f"{path}: no config.json (expected an HF checkpoint directory, as "
                          "save_pretrained writes it)")
  return file, read_json(file)


def _rope(file: str, c: dict) -> tuple[float, tuple | None]:
  """(rope_theta, rope_scaling pairs) from transformers 5's rope_parameters or 4's rope_theta +
  rope_scaling."""
  params = c.get("rope_parameters")
  if isinstance(params, dict) and params and all(isinstance(v, dict) for v in params.values()):
    if set(params) != {"full_attention", "sliding_attention"}:
      raise ConfigError(f"{file}: rope_parameters per layer type {sorted(params)}: expected "
                        "full_attention and sliding_attention")
    params = params["full_attention"]
  params = dict(params or {})
  theta = params.pop("rope_theta", None)
  if theta is None:
    theta = c.get("rope_theta", 10000.0)
  scaling = params or dict(c.get("rope_scaling") or {})
  scaling.pop("rope_theta", None)
  if "type" in scaling and "rope_type" not in scaling:
    scaling["rope_type"] = scaling.pop("type")
  kind = scaling.get("rope_type", "default")
  if scaling.get("partial_rotary_factor", 1.0) != 1.0:
    raise ConfigError(f"{file}: partial_rotary_factor is not supported")
  if kind == "default":
    return float(theta), None
  scaling = {k: v for k, v in scaling.items() if not isinstance(v, (list, dict)) and v is not None}
  return float(theta), tuple(sorted(scaling.items()))


def _local_theta(file: str, arch: str, c: dict) -> float | None:
  """Gemma 3's RoPE base of the sliding layers: rope_parameters.sliding_attention (transformers
  5) or rope_local_base_freq (4); it must be unscaled."""
  if arch != "Gemma3ForCausalLM":
    return None
  params = c.get("rope_parameters")
  if isinstance(params, dict) and isinstance(params.get("sliding_attention"), dict):
    local = params["sliding_attention"]
    if local.get("rope_type", "default") != "default":
      raise ConfigError(f"{file}: rope_parameters.sliding_attention.rope_type="
                        f"{local['rope_type']!r} is not supported (default)")
    return float(local.get("rope_theta", 10000.0))
  return float(c.get("rope_local_base_freq", 10000.0))


def _gemma_layers(arch: str, c: dict, num_layers: int) -> tuple[int | None, tuple[str, ...]]:
  """(sliding_window, layer_types) of Gemma 2 (alternating, from layer 0 sliding) and 3 (every
  sliding_window_pattern-th layer global) when config.json has no layer_types."""
  types = c.get("layer_types")
  if types is None:
    every = 2 if arch == "Gemma2ForCausalLM" else int(c.get("sliding_window_pattern", 6))
    types = ["full_attention" if (i + 1) % every == 0 else "sliding_attention"
             for i in range(num_layers)]
  window = c.get("sliding_window")
  return (int(window) if window else None), tuple(types)


def _sliding_window(file: str, arch: str, c: dict, num_layers: int) -> int | None:
  window = c.get("sliding_window")
  if arch in ("MistralForCausalLM", "MixtralForCausalLM"):
    return int(window) if window else None
  if arch == "LlamaForCausalLM":
    return None
  # Qwen2: use_sliding_window switches it on, for the layers from max_window_layers on.
  types = c.get("layer_types")
  if types is None:
    on = bool(c.get("use_sliding_window")) and window
    first = int(c.get("max_window_layers", 0)) if on else num_layers
    types = ["sliding_attention" if on and i >= first else "full_attention"
             for i in range(num_layers)]
  kinds = set(types)
  if kinds == {"full_attention"}:
    return None
  if kinds == {"sliding_attention"} and window:
    return int(window)
  raise ConfigError(f"{file}: layer_types mixes sliding and full attention across layers "
                    f"({sorted(kinds)}); jaxft needs one kind for every layer")


def _architecture(file: str, c: dict) -> str:
  archs = c.get("architectures") or []
  arch = next((a for a in archs if a in ARCHITECTURES), None)
  if arch is None and not archs:
    arch = {v: k for k, v in ARCHITECTURES.items()}.get(c.get("model_type"))
  if arch is None:
    raise ConfigError(f"{file}: architecture {archs or c.get('model_type')!r} is not supported; "
                      f"expected one of {', '.join(ARCHITECTURES)}")
  act = c.get("hidden_activation") or c.get("hidden_act") or "silu"
  want = "gelu_tanh" if arch in _GEMMAS else "silu"
  if _ACTS.get(act) != want:
    raise ConfigError(f"{file}: hidden_act={act!r} is not supported for {arch} "
                      f"({'gelu_pytorch_tanh' if want == 'gelu_tanh' else 'silu'})")
  for key in ("attention_bias", "mlp_bias"):  # Llama's attention_bias also biases o_proj
    if arch not in ("MistralForCausalLM", "Qwen2ForCausalLM", "MixtralForCausalLM") and c.get(key):
      raise ConfigError(f"{file}: {key}=true is not supported for {arch}")
  return arch


def _moe_fields(file: str, arch: str, c: dict, layers: int) -> dict:
  """The mixture-of-experts fields of Mixtral (num_local_experts; experts as wide as
  intermediate_size; top-k always renormalised) and Qwen3-MoE (num_experts,
  moe_intermediate_size, norm_topk_prob). Qwen3-MoE checkpoints with dense MLP layers
  (decoder_sparse_step > 1, mlp_only_layers) are refused: jaxft stacks one layer kind."""
  if arch == "MixtralForCausalLM":
    experts, width, norm = c.get("num_local_experts", 8), c["intermediate_size"], True
    if c.get("router_jitter_noise"):
      raise ConfigError(f"{file}: router_jitter_noise={c['router_jitter_noise']} is not supported")
  else:
    # (transformers 4 wrote num_experts; 5 writes num_local_experts, its attribute_map's name)
    experts = c.get("num_local_experts") or c.get("num_experts") or 128
    width = c.get("moe_intermediate_size", 768)
    norm = bool(c.get("norm_topk_prob", False))
    step, dense = int(c.get("decoder_sparse_step", 1)), list(c.get("mlp_only_layers") or [])
    if dense or (step != 1 and layers > 1):
      raise ConfigError(f"{file}: decoder_sparse_step={step}, mlp_only_layers={dense}: dense MLP "
                        "layers among the expert layers are not supported (every layer sparse: "
                        "decoder_sparse_step=1, mlp_only_layers=[])")
  return dict(num_experts=int(experts), experts_per_token=int(c.get("num_experts_per_tok", 2)),
              moe_intermediate_size=int(width), norm_topk_prob=norm,
              router_aux_coef=float(c.get("router_aux_loss_coef", 0.001)))


def _family_fields(file: str, arch: str, c: dict, layers: int) -> dict:
  """The ModelConfig fields of the architecture's own layer features."""
  out = family_features(arch)
  if arch in MOE_ARCHITECTURES:
    out.update(_moe_fields(file, arch, c, layers))
  if arch not in _GEMMAS:
    return dict(out, sliding_window=_sliding_window(file, arch, c, layers))
  window, types = _gemma_layers(arch, c, layers)
  scalar = c.get("query_pre_attn_scalar")
  caps = {k: (float(c[k]) if c.get(k) else None)
          for k in ("attn_logit_softcapping", "final_logit_softcapping")}
  return dict(out, sliding_window=window, layer_types=types,
              query_pre_attn_scalar=float(scalar) if scalar else None,
              attn_softcap=caps["attn_logit_softcapping"],
              final_softcap=caps["final_logit_softcapping"],
              rope_local_theta=_local_theta(file, arch, c))


def read_config(path: str) -> ModelConfig:
  """The ModelConfig of an HF checkpoint directory (its config.json).

  Reads the configs of every architecture in ARCHITECTURES in both transformers 4 and 5
  spellings. dtype/param_dtype/remat keep their defaults (the caller sets them). Raises
  CheckpointError when there is no readable config.json, ConfigError (naming the file and key)
  for an architecture or setting jaxft does not implement.
  """
  file, c = _config_json(path)
  arch = _architecture(file, c)
  try:
    hidden, heads, layers = int(c["hidden_size"]), int(c["num_attention_heads"]), int(c["num_hidden_layers"])
    theta, scaling = _rope(file, c)
    eos = c.get("eos_token_id")
    cfg = ModelConfig(
        vocab_size=int(c["vocab_size"]), hidden_size=hidden,
        intermediate_size=int(c["intermediate_size"]), num_layers=layers, num_heads=heads,
        num_kv_heads=int(c.get("num_key_value_heads") or heads),
        head_dim=int(c.get("head_dim") or hidden // heads),
        rope_theta=theta, rope_scaling=scaling, rms_norm_eps=float(c.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=int(c.get("max_position_embeddings", 4096)),
        tie_embeddings=bool(c.get("tie_word_embeddings", arch in _GEMMAS)), architecture=arch,
        bos_token_id=c.get("bos_token_id"),
        eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
        pad_token_id=c.get("pad_token_id"),
        initializer_range=float(c.get("initializer_range", 0.02)),
        **_family_fields(file, arch, c, layers))
  except KeyError as e:
    raise ConfigError(f"{file}: missing key {e.args[0]!r}") from None
  except ConfigError as e:  # ModelConfig's own checks (layer_types, heads) name the file too
    raise (e if str(e).startswith(file) else ConfigError(f"{file}: {e}")) from None
  except (TypeError, ValueError) as e:
    raise ConfigError(f"{file}: {e}") from None
  try:
    inverse_frequencies(cfg)
  except (ConfigError, KeyError) as e:
    raise ConfigError(f"{file}: rope scaling {dict(scaling or ())}: {e}") from None
  return cfg


def checkpoint_dtype(path: str) -> str | None:
  """The dtype config.json records for the weights (`dtype` or `torch_dtype`), or None (also for
  a GGUF file, whose tensors are quantized or float32)."""
  if path.lower().endswith(".gguf"):
    return None
  file, c = _config_json(path)
  del file
  name = c.get("dtype") or c.get("torch_dtype")
  return _DTYPE_NAMES.get(str(name).replace("torch.", "")) if name else None


def _check_expressible(cfg: ModelConfig) -> None:
  arch = cfg.architecture
  if arch not in ARCHITECTURES:
    raise ConfigError(f"architecture {arch!r} cannot be exported; expected one of {', '.join(ARCHITECTURES)}")
  for key, want in family_features(arch).items():
    if getattr(cfg, key) != want:
      raise ConfigError(f"{arch} cannot express {key}={getattr(cfg, key)!r}")
  moe = arch in MOE_ARCHITECTURES
  if bool(cfg.num_experts) != moe:
    raise ConfigError(f"{arch} cannot express num_experts={cfg.num_experts}")
  if arch == "MixtralForCausalLM" and (cfg.moe_intermediate_size != cfg.intermediate_size
                                       or not cfg.norm_topk_prob):
    raise ConfigError(f"{arch} cannot express moe_intermediate_size={cfg.moe_intermediate_size} "
                      f"beside intermediate_size={cfg.intermediate_size}, or norm_topk_prob=False")
  if cfg.sliding_window and arch == "LlamaForCausalLM":
    raise ConfigError(f"{arch} cannot express sliding_window={cfg.sliding_window}")
  gemma = {"layer_types": cfg.layer_types, "attn_softcap": cfg.attn_softcap,
           "final_softcap": cfg.final_softcap, "query_pre_attn_scalar": cfg.query_pre_attn_scalar,
           "rope_local_theta": cfg.rope_local_theta}
  allowed = {"Gemma2ForCausalLM": set(gemma) - {"rope_local_theta"}, "Gemma3ForCausalLM": set(gemma)}
  for key, value in gemma.items():
    if value is not None and key not in allowed.get(arch, ()):
      raise ConfigError(f"{arch} cannot express {key}={value!r}")


def _int_if_whole(x: float) -> float | int:
  """transformers' Gemma configs type query_pre_attn_scalar as int (a float is refused)."""
  return int(x) if float(x).is_integer() else x


def _gemma_keys(cfg: ModelConfig, rope: dict) -> dict:
  out = {"hidden_activation": "gelu_pytorch_tanh", "hidden_act": "gelu_pytorch_tanh",
         "query_pre_attn_scalar": _int_if_whole(cfg.query_pre_attn_scalar or cfg.head_dim),
         "sliding_window": cfg.sliding_window,
         "layer_types": list(cfg.layer_types or [
             "sliding_attention" if cfg.sliding_window else "full_attention"] * cfg.num_layers),
         "attn_logit_softcapping": cfg.attn_softcap,
         "final_logit_softcapping": cfg.final_softcap, "attention_bias": False}
  if cfg.architecture == "Gemma3ForCausalLM":  # per layer type (5); rope_local_base_freq (4)
    local = cfg.rope_theta if cfg.rope_local_theta is None else cfg.rope_local_theta
    out.update(rope_parameters={"full_attention": rope, "sliding_attention": {
        "rope_type": "default", "rope_theta": local}}, rope_local_base_freq=local)
  return out


def hf_config(cfg: ModelConfig, dtype: str) -> dict:
  """config.json for `cfg` in transformers 5's spelling, plus the transformers 4 keys
  (rope_theta, rope_scaling, torch_dtype) that older readers (vLLM, TGI, llama.cpp) look for.
  Raises ConfigError for a feature the architecture cannot express."""
  _check_expressible(cfg)
  arch = cfg.architecture
  scaling = dict(cfg.rope_scaling or ())
  rope = {"rope_theta": cfg.rope_theta, "rope_type": "default", **scaling}
  eos = list(cfg.eos_token_id) if isinstance(cfg.eos_token_id, tuple) else cfg.eos_token_id
  out = {
      "architectures": [arch], "model_type": ARCHITECTURES[arch],
      "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
      "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_layers,
      "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
      "head_dim": cfg.head_dim, "hidden_act": "silu",
      "max_position_embeddings": cfg.max_position_embeddings, "rms_norm_eps": cfg.rms_norm_eps,
      "rope_parameters": rope, "rope_theta": cfg.rope_theta,
      "tie_word_embeddings": cfg.tie_embeddings, "bos_token_id": cfg.bos_token_id,
      "eos_token_id": eos, "pad_token_id": cfg.pad_token_id,
      "initializer_range": cfg.initializer_range, "attention_dropout": 0.0, "use_cache": True,
      "dtype": dtype, "torch_dtype": dtype,
  }
  if scaling:
    out["rope_scaling"] = scaling
  if arch == "LlamaForCausalLM":
    out.update(attention_bias=False, mlp_bias=False)
  elif arch in ("MistralForCausalLM", "MixtralForCausalLM"):
    out["sliding_window"] = cfg.sliding_window
  elif arch in _QWENS:
    w = cfg.sliding_window
    out.update(use_sliding_window=bool(w), sliding_window=w,
               max_window_layers=0 if w else cfg.num_layers,
               layer_types=["sliding_attention" if w else "full_attention"] * cfg.num_layers)
    if arch in ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM"):
      out["attention_bias"] = False
  else:
    out.update(_gemma_keys(cfg, rope))
  if arch == "MixtralForCausalLM":
    out.update(num_local_experts=cfg.num_experts, num_experts_per_tok=cfg.experts_per_token,
               router_aux_loss_coef=cfg.router_aux_coef, router_jitter_noise=0.0,
               output_router_logits=False)
  elif arch == "Qwen3MoeForCausalLM":
    out.update(num_experts=cfg.num_experts, num_local_experts=cfg.num_experts,
               num_experts_per_tok=cfg.experts_per_token,
               moe_intermediate_size=cfg.moe_intermediate_size,
               norm_topk_prob=cfg.norm_topk_prob, decoder_sparse_step=1, mlp_only_layers=[],
               router_aux_loss_coef=cfg.router_aux_coef, output_router_logits=False)
  return out
