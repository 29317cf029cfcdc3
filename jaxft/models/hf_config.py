"""HF config.json <-> `ModelConfig`, for LlamaForCausalLM, MistralForCausalLM and Qwen2ForCausalLM in
both the transformers 4 spelling (rope_theta + rope_scaling, torch_dtype) and 5's (rope_parameters,
dtype)."""

from __future__ import annotations

import json
import os

from jaxft.errors import CheckpointError, ConfigError
from jaxft.models.config import ModelConfig
from jaxft.models.rope import inverse_frequencies

# architecture -> model_type
ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral",
                 "Qwen2ForCausalLM": "qwen2"}
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
    raise ConfigError(f"{file}: rope_parameters per layer type are not supported")
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


def _sliding_window(file: str, arch: str, c: dict, num_layers: int) -> int | None:
  window = c.get("sliding_window")
  if arch == "MistralForCausalLM":
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


def read_config(path: str) -> ModelConfig:
  """The ModelConfig of an HF checkpoint directory (its config.json).

  Reads LlamaForCausalLM, MistralForCausalLM and Qwen2ForCausalLM configs in both transformers 4
  and 5 spellings. dtype/param_dtype/remat keep their defaults (the caller sets them). Raises
  CheckpointError when there is no readable config.json, ConfigError (naming the file and key)
  for an architecture or setting jaxft does not implement.
  """
  file, c = _config_json(path)
  archs = c.get("architectures") or []
  arch = next((a for a in archs if a in ARCHITECTURES), None)
  if arch is None and not archs:
    arch = {v: k for k, v in ARCHITECTURES.items()}.get(c.get("model_type"))
  if arch is None:
    raise ConfigError(f"{file}: architecture {archs or c.get('model_type')!r} is not supported; "
                      f"expected one of {', '.join(ARCHITECTURES)}")
  if c.get("hidden_act", "silu") != "silu":
    raise ConfigError(f"{file}: hidden_act={c['hidden_act']!r} is not supported (silu)")
  for key in ("attention_bias", "mlp_bias"):  # Llama's attention_bias also biases o_proj
    if arch == "LlamaForCausalLM" and c.get(key):
      raise ConfigError(f"{file}: {key}=true is not supported for {arch}")
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
        qkv_bias=arch == "Qwen2ForCausalLM",
        sliding_window=_sliding_window(file, arch, c, layers),
        tie_embeddings=bool(c.get("tie_word_embeddings", False)), architecture=arch,
        bos_token_id=c.get("bos_token_id"),
        eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
        pad_token_id=c.get("pad_token_id"),
        initializer_range=float(c.get("initializer_range", 0.02)))
  except KeyError as e:
    raise ConfigError(f"{file}: missing key {e.args[0]!r}") from None
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


def hf_config(cfg: ModelConfig, dtype: str) -> dict:
  """config.json for `cfg` in transformers 5's spelling, plus the transformers 4 keys
  (rope_theta, rope_scaling, torch_dtype) that older readers (vLLM, TGI, llama.cpp) look for."""
  arch = cfg.architecture
  if arch not in ARCHITECTURES:
    raise ConfigError(f"architecture {arch!r} cannot be exported; expected one of {', '.join(ARCHITECTURES)}")
  if cfg.qkv_bias != (arch == "Qwen2ForCausalLM"):
    raise ConfigError(f"{arch} cannot express qkv_bias={cfg.qkv_bias}")
  if cfg.sliding_window and arch == "LlamaForCausalLM":
    raise ConfigError(f"{arch} cannot express sliding_window={cfg.sliding_window}")
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
  elif arch == "MistralForCausalLM":
    out["sliding_window"] = cfg.sliding_window
  else:
    w = cfg.sliding_window
    out.update(use_sliding_window=bool(w), sliding_window=w,
               max_window_layers=0 if w else cfg.num_layers,
               layer_types=["sliding_attention" if w else "full_attention"] * cfg.num_layers)
  return out
