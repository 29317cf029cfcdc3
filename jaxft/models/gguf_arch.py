"""The GGUF architectures of the families jaxft trains, as llama.cpp loads them: tensor names,
metadata keys and the layout of the weights in the file. The writer (export/gguf.py) and the
reader (models/gguf.py) share these tables, so a file read back is the model written.

  family (HF architecture)            general.architecture   what the file does differently
  Llama 3, Mistral                    llama      Q/K rows permuted to llama.cpp's RoPE pairs;
                                                 Llama 3.1's RoPE scaling as rope_freqs
  Mixtral                             llama      + router ffn_gate_inp, experts stacked [E, out, in]
  Qwen2                               qwen2      q/k/v biases; HF's rotate-half (NEOX) RoPE kept
  Qwen3                               qwen3      attn_q_norm / attn_k_norm per head
  Qwen3-MoE                           qwen3moe   q/k norms + router + stacked experts
  Gemma 2                             gemma2     norms stored as 1 + w; soft-caps; sliding pattern
  Gemma 3 (text)                      gemma3     as Gemma 2 with q/k norms, local RoPE base, no caps

Two things llama.cpp fixes that a checkpoint may not: Gemma's query scale is 1/sqrt(head_dim)
(1/sqrt(hidden/heads) for the 27B sizes, which llama.cpp knows by their layer count), so another
`query_pre_attn_scalar` is folded into the weights that make the queries (attn_q for Gemma 2,
the (1 + w) of attn_q_norm for Gemma 3, after RoPE the same product); and the llama, qwen2, qwen3
and qwen3moe graphs attend to every earlier token, so a sliding window is dropped with a warning
(the model is unchanged for contexts up to the window). What llama.cpp cannot express at all is
refused by `check` with the reason: Gemma 2 without both soft-caps or with an untied output
head, Gemma 3 with attention soft-capping, Qwen3-MoE without renormalised top-k weights, q/k/v
biases outside Qwen2, a Qwen2 whose heads do not span the hidden size, RoPE scaling other than
linear (and, for the llama architecture, Llama 3.1's llama3 scaling: the `rope_freqs` tensor of
gguf_rope.py).
"""

from __future__ import annotations

import math

import jax
import numpy as np
from absl import logging

from jaxft.errors import CheckpointError, ConfigError
from jaxft.models import gguf_rope, llama, moe
from jaxft.models.config import FAMILIES

__all__ = ["ARCHS", "READS", "check", "gguf_name", "tensors", "to_file", "from_file",
           "add_metadata", "arch_fields", "permute_qk", "unpermute_qk", "llama_cpp_query_scalar"]

# HF architecture -> general.architecture
ARCHS = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama", "MixtralForCausalLM": "llama",
         "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3",
         "Qwen3MoeForCausalLM": "qwen3moe", "Gemma2ForCausalLM": "gemma2",
         "Gemma3ForCausalLM": "gemma3"}
READS = ("llama", "qwen2", "qwen3", "qwen3moe", "gemma2", "gemma3")

_TOP = {("embed", "embedding"): "token_embd.weight", ("final_norm", "scale"): "output_norm.weight",
        ("lm_head", "kernel"): "output.weight"}
_LAYER = {("attn_norm", "scale"): "attn_norm.weight", ("mlp_norm", "scale"): "ffn_norm.weight",
          ("o_proj", "kernel"): "attn_output.weight", ("router", "kernel"): "ffn_gate_inp.weight",
          ("q_norm", "scale"): "attn_q_norm.weight", ("k_norm", "scale"): "attn_k_norm.weight",
          ("attn_post_norm", "scale"): "post_attention_norm.weight",
          ("mlp_post_norm", "scale"): "post_ffw_norm.weight"}
for _p in ("q", "k", "v"):
  _LAYER[(f"{_p}_proj", "kernel")] = f"attn_{_p}.weight"
  _LAYER[(f"{_p}_proj", "bias")] = f"attn_{_p}.bias"
for _p in ("gate", "up", "down"):
  _LAYER[(f"{_p}_proj", "kernel")] = f"ffn_{_p}.weight"
_EXPERTS = {"gate_proj": "ffn_gate_exps.weight", "up_proj": "ffn_up_exps.weight",
            "down_proj": "ffn_down_exps.weight"}
# llama.cpp's Gemma sizes whose query scale is 1/sqrt(hidden/heads) (27B), by layer count.
_WIDE_QUERY_LAYERS = {"gemma2": 46, "gemma3": 62}


def _refuse(cfg, why: str) -> None:
  raise ConfigError(f"--format=gguf: {cfg.architecture} {why}; llama.cpp's "
                    f"{ARCHS.get(cfg.architecture)} architecture cannot express it (export "
                    "--format=hf for other servers)")


def check(cfg) -> None:
  """Raises ConfigError naming the reason for what llama.cpp cannot load as `cfg` describes;
  warns where it drops a sliding window (see the module docstring)."""
  arch = ARCHS.get(cfg.architecture)
  if arch is None:
    raise ConfigError(f"--format=gguf: architecture {cfg.architecture} has no GGUF mapping "
                      f"(supported: {', '.join(ARCHS)})")
  scaling = dict(cfg.rope_scaling or {}).get("rope_type", "default")
  written = ("default", "linear", "llama3") if arch == "llama" else ("default", "linear")
  if scaling not in written:
    _refuse(cfg, f"with rope_scaling {dict(cfg.rope_scaling)} (only {', '.join(written)} "
            "are written)")
  if scaling == "llama3":
    gguf_rope.factors(cfg)  # (names a missing key before anything is written)
  if cfg.qkv_bias and arch != "qwen2":
    _refuse(cfg, "with q/k/v biases")
  if arch == "qwen2" and cfg.num_heads * cfg.head_dim != cfg.hidden_size:
    _refuse(cfg, f"with {cfg.num_heads} heads of {cfg.head_dim} != hidden size "
            f"{cfg.hidden_size} (llama.cpp's qwen2 sizes the attention by the hidden size)")
  if arch == "gemma2" and not (cfg.attn_softcap and cfg.final_softcap):
    _refuse(cfg, "without attention and final-logit soft-capping (llama.cpp always caps Gemma 2)")
  if arch == "gemma2" and not cfg.tie_embeddings:
    _refuse(cfg, "with an output head untied from the embeddings (llama.cpp's Gemma 2 always "
            "reuses token_embd)")
  if arch == "gemma3" and cfg.attn_softcap:
    _refuse(cfg, "with attention soft-capping (llama.cpp's Gemma 3 has none)")
  if arch == "gemma3" and any(_sliding(cfg)) and _local_theta(cfg) is None and scaling != "default":
    _refuse(cfg, "with scaled RoPE on its sliding layers (llama.cpp leaves them unscaled)")
  if arch == "gemma2" and cfg.rope_local_theta not in (None, cfg.rope_theta):
    _refuse(cfg, "with a RoPE base of its own on the sliding layers")
  if cfg.num_experts and not cfg.norm_topk_prob:
    _refuse(cfg, "with norm_topk_prob=false (llama.cpp renormalises the top-k expert weights)")
  if cfg.sliding_window and arch not in ("gemma2", "gemma3"):
    logging.warning("--format=gguf: llama.cpp's %s architecture has no sliding window: the "
                    "exported model attends to every earlier token and equals this one for "
                    "contexts up to sliding_window=%d tokens", arch, cfg.sliding_window)


# -- tensors ---------------------------------------------------------------------------------------

def _experts(cfg, path) -> bool:
  return bool(cfg.num_experts) and path[0] == "layers" and path[1] in moe.EXPERT_LINEARS


def gguf_name(cfg, path: tuple[str, ...], layer: int | None) -> str:
  """The GGUF name of our leaf `path` (one layer's slice of it, experts all together)."""
  if path[0] != "layers":
    return _TOP[path]
  return f"blk.{layer}.{_EXPERTS[path[1]] if _experts(cfg, path) else _LAYER[path[1:]]}"


def tensors(cfg) -> list[tuple[str, tuple[str, ...], int | None, tuple[int, ...]]]:
  """(GGUF name, our path, layer or None, shape) of every tensor of the file, in file order.
  Shapes are HF's ([out, in] matrices; experts stacked [E, out, in]); GGUF lists them reversed."""
  leaves = jax.tree_util.tree_flatten_with_path(llama.param_specs(cfg), is_leaf=llama.is_spec)[0]
  out = []
  for kp, spec in leaves:
    path = tuple(k.key for k in kp)
    kernel = path[-1] == "kernel"
    if path[0] != "layers":
      out.append((gguf_name(cfg, path, None), path, None,
                  tuple(spec.shape[::-1] if kernel else spec.shape)))
      continue
    inner = spec.shape[1:]
    if _experts(cfg, path):
      shape = (inner[0], *inner[1:][::-1])
    else:
      shape = inner[::-1] if kernel else inner
    out += [(gguf_name(cfg, path, i), path, i, tuple(shape)) for i in range(cfg.num_layers)]
  rank = {"embed": 0, "layers": 1, "final_norm": 2, "lm_head": 3}
  return sorted(out, key=lambda e: (rank[e[1][0]], -1 if e[2] is None else e[2], e[0]))


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
  """HF's q/k rows (per head: the first halves of the rotary pairs, then the second halves) in
  llama.cpp's order for the llama architecture (per head: pairs side by side)."""
  return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
          .swapaxes(1, 2).reshape(w.shape))


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
  """Undoes `permute_qk`."""
  rows = w.shape[0]
  return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama_cpp_query_scalar(arch: str, hidden: int, heads: int, head_dim: int, layers: int) -> int:
  """The query_pre_attn_scalar llama.cpp's Gemma 2/3 graph uses (it has no key for it)."""
  return hidden // heads if layers == _WIDE_QUERY_LAYERS[arch] else head_dim


def _query_fold(cfg) -> float:
  """The factor Gemma's queries are multiplied by in the file so that llama.cpp's fixed query
  scale gives this model's (1 when they agree)."""
  arch = ARCHS[cfg.architecture]
  ours = cfg.query_pre_attn_scalar or cfg.head_dim
  theirs = llama_cpp_query_scalar(arch, cfg.hidden_size, cfg.num_heads, cfg.head_dim,
                                  cfg.num_layers)
  return 1.0 if ours == theirs else math.sqrt(theirs / ours)


def to_file(cfg, path: tuple[str, ...], x: np.ndarray) -> np.ndarray:
  """One tensor (float32, HF layout) as the file holds it: llama's Q/K rows permuted, Gemma's
  norms as 1 + w and its query scale folded in."""
  arch = ARCHS[cfg.architecture]
  name = path[1:] if path[0] == "layers" else path
  if arch == "llama" and name == ("q_proj", "kernel"):
    x = permute_qk(x, cfg.num_heads)
  elif arch == "llama" and name == ("k_proj", "kernel"):
    x = permute_qk(x, cfg.num_kv_heads)
  if cfg.norm_plus_one and path[-1] == "scale":
    x = x + np.float32(1.0)
  if arch in ("gemma2", "gemma3") and _query_fold(cfg) != 1.0:
    target = ("q_norm", "scale") if cfg.qk_norm else ("q_proj", "kernel")
    if name == target:
      x = x * np.float32(_query_fold(cfg))
  return x.astype(np.float32)


def from_file(cfg, path: tuple[str, ...], x: np.ndarray) -> np.ndarray:
  """Undoes `to_file` for a config read from the file (whose query scale is llama.cpp's)."""
  arch = ARCHS[cfg.architecture]
  name = path[1:] if path[0] == "layers" else path
  if arch == "llama" and name == ("q_proj", "kernel"):
    x = unpermute_qk(x, cfg.num_heads)
  elif arch == "llama" and name == ("k_proj", "kernel"):
    x = unpermute_qk(x, cfg.num_kv_heads)
  if cfg.norm_plus_one and path[-1] == "scale":
    x = x - np.float32(1.0)
  return x


# -- metadata ------------------------------------------------------------------------------------

def _sliding(cfg) -> list[bool]:
  if cfg.layer_types is not None:
    return [t == "sliding_attention" for t in cfg.layer_types]
  return [bool(cfg.sliding_window)] * cfg.num_layers


def _local_theta(cfg) -> float | None:
  """The sliding layers' own RoPE base as jaxft applies it (only with per-layer layer_types:
  models/families.layer_variants), else None (they use the global RoPE)."""
  return cfg.rope_local_theta if cfg.layer_types is not None else None


def add_metadata(w, cfg) -> None:
  """The `{arch}.*` keys of cfg's architecture beyond the shape every one has: experts,
  soft-caps, the sliding window and which layers use it, the sliding layers' RoPE base; and
  jaxft's own keys of llama3 RoPE scaling (gguf_rope: llama.cpp reads its `rope_freqs` tensor)."""
  arch = ARCHS[cfg.architecture]
  if gguf_rope.is_llama3(cfg):
    gguf_rope.add_keys(w, cfg)
  if cfg.num_experts:
    w.add_expert_count(cfg.num_experts)
    w.add_expert_used_count(cfg.experts_per_token)
    if arch == "qwen3moe":
      w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
  if arch == "gemma2":
    w.add_attn_logit_softcapping(float(cfg.attn_softcap))
    w.add_final_logit_softcapping(float(cfg.final_softcap))
  if arch == "gemma3" and cfg.final_softcap:
    w.add_final_logit_softcapping(float(cfg.final_softcap))
  if arch in ("gemma2", "gemma3") and cfg.sliding_window and any(_sliding(cfg)):
    w.add_sliding_window(int(cfg.sliding_window))
    w.add_sliding_window_pattern(_sliding(cfg))  # one bool per layer: llama.cpp reads the array
    if arch == "gemma3":
      w.add_rope_freq_base_swa(float(_local_theta(cfg) or cfg.rope_theta))
  elif arch == "gemma2":  # (llama.cpp's Gemma 2 slides every other layer unless told otherwise)
    w.add_sliding_window_pattern([False] * cfg.num_layers)


def _pattern(value, layers: int) -> list[bool]:
  """A sliding_window_pattern key (one bool per layer, or llama.cpp's period n: layer i slides
  when i % n < n - 1) as one bool per layer."""
  if isinstance(value, (list, tuple)):
    return [bool(v) for v in value][:layers]
  n = int(value)
  return [n == 0 or i % n < n - 1 for i in range(layers)]


def arch_fields(path: str, arch: str, opt, shape: dict) -> dict:
  """The ModelConfig fields of a file's architecture beyond the common shape: `opt(key, default)`
  reads `{arch}.key`; shape holds hidden, heads, head_dim, layers, ff, rope_theta.
  Raises ConfigError (naming the file and key) for what jaxft does not implement,
  CheckpointError for a key the architecture needs that is missing."""
  def need(key):
    v = opt(key)
    if v is None:
      raise CheckpointError(f"{path}: metadata key {arch}.{key} is missing")
    return v
  experts = int(opt("expert_count", 0) or 0)
  if arch == "llama":
    if not experts:
      return dict(architecture="LlamaForCausalLM")
    return dict(architecture="MixtralForCausalLM", num_experts=experts,
                experts_per_token=int(need("expert_used_count")), moe_intermediate_size=shape["ff"])
  if arch in ("qwen2", "qwen3"):
    name = "Qwen2ForCausalLM" if arch == "qwen2" else "Qwen3ForCausalLM"
    return dict(architecture=name, **FAMILIES[name])
  if arch == "qwen3moe":
    used = int(need("expert_used_count"))
    return dict(architecture="Qwen3MoeForCausalLM", num_experts=int(need("expert_count")),
                experts_per_token=used,
                moe_intermediate_size=int(opt("expert_feed_forward_length") or shape["ff"] // used),
                **FAMILIES["Qwen3MoeForCausalLM"])
  return _gemma_fields(path, arch, opt, shape)


def _gemma_fields(path: str, arch: str, opt, shape: dict) -> dict:
  name = "Gemma2ForCausalLM" if arch == "gemma2" else "Gemma3ForCausalLM"
  layers = shape["layers"]
  window = int(opt("attention.sliding_window", 4096 if arch == "gemma2" else 0) or 0)
  out = dict(architecture=name, **FAMILIES[name],
             query_pre_attn_scalar=float(llama_cpp_query_scalar(
                 arch, shape["hidden"], shape["heads"], shape["head_dim"], layers)))
  if arch == "gemma2":
    swa_base = opt("rope.freq_base_swa")
    if swa_base is not None and float(swa_base) != shape["rope_theta"]:
      raise ConfigError(f"{path}: gemma2.rope.freq_base_swa={swa_base} (a RoPE base of the "
                        "sliding layers' own) is not supported for Gemma 2")
    out.update(attn_softcap=float(opt("attn_logit_softcapping", 50.0)),
               final_softcap=float(opt("final_logit_softcapping", 30.0)))
  else:
    cap = opt("final_logit_softcapping")
    out.update(final_softcap=float(cap) if cap else None)
  if window > 0:
    flags = _pattern(opt("attention.sliding_window_pattern", 2 if arch == "gemma2" else 6), layers)
    if any(flags):
      out.update(sliding_window=window, layer_types=tuple(
          "sliding_attention" if f else "full_attention" for f in flags))
      if arch == "gemma3":
        out.update(rope_local_theta=float(opt("rope.freq_base_swa", 10000.0)))
  return out
