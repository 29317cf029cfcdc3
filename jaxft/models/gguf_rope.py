"""Llama 3.1 / 3.2 RoPE scaling (`rope_type: llama3`) in GGUF, out and in.

llama.cpp has no metadata for it: its converter writes the tensor `rope_freqs.weight` (float32,
head_dim / 2 entries) and no `rope.scaling.*` key, and its llama graph divides each rotation
angle by that frequency's entry. The entries are transformers' llama3 rope init as factors: 1 for
the high frequencies (wavelength below original_max_position_embeddings / high_freq_factor),
`factor` for the low ones (wavelength above original / low_freq_factor), and between them
1 / ((1 - s) / factor + s) with s = (original / wavelength - low) / (high - low).

The tensor fixes the two cut-off wavelengths and the factor, not the four numbers of the config
(scaling original, low and high together changes nothing), so the writer also stores the
config's own numbers as `jaxft.rope.scaling.*` keys (llama.cpp ignores them). A file without
them (llama.cpp's converter's) is read with Llama 3.1/3.2's published low_freq_factor 1,
high_freq_factor 4 and original_max_position_embeddings 8192, the factor its largest entry; in
either case the config read must reproduce the tensor within 1e-6 (relative), or the file is
refused naming what differs.
"""

from __future__ import annotations

import math

import numpy as np

from jaxft.errors import CheckpointError, ConfigError

__all__ = ["TENSOR", "KEYS", "PUBLISHED", "is_llama3", "factors", "add_keys", "scaling_from_file"]

TENSOR = "rope_freqs.weight"
_NAMES = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
KEYS = {n: f"jaxft.rope.scaling.{n}" for n in _NAMES}
# Llama 3.1 and 3.2's values (their factor, 8 or 32, is the tensor's largest entry)
PUBLISHED = {"low_freq_factor": 1.0, "high_freq_factor": 4.0,
             "original_max_position_embeddings": 8192}
_RTOL = 1e-6


def is_llama3(cfg) -> bool:
  """Whether cfg's RoPE is scaled the Llama 3.1 way (rope_type llama3)."""
  return dict(cfg.rope_scaling or ()).get("rope_type") == "llama3"


def _factors(theta: float, head_dim: int, s: dict) -> np.ndarray:
  """The float64 factors of llama3 scaling `s` (HF's keys) for RoPE base theta."""
  inv = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
  wavelen = 2 * math.pi / inv
  factor, low, high = float(s["factor"]), float(s["low_freq_factor"]), float(s["high_freq_factor"])
  old = float(s["original_max_position_embeddings"])
  with np.errstate(divide="ignore", invalid="ignore"):  # (low == high: no medium band)
    smooth = (old / wavelen - low) / (high - low)
    medium = 1.0 / ((1 - smooth) / factor + smooth)
  return np.where(wavelen < old / high, 1.0, np.where(wavelen > old / low, factor, medium))


def factors(cfg) -> np.ndarray:
  """The `rope_freqs.weight` of a config with llama3 RoPE scaling: float32 [head_dim // 2], the
  factor each frequency's rotation angle is divided by (the ratio of jaxft's unscaled to scaled
  inverse frequencies, models/rope.py). Raises ConfigError naming a missing rope_scaling key."""
  s = dict(cfg.rope_scaling)
  missing = [n for n in _NAMES if n not in s]
  if missing:
    raise ConfigError(f"rope_scaling {s}: llama3 scaling needs {', '.join(missing)}")
  return _factors(cfg.rope_theta, cfg.head_dim, s).astype(np.float32)


def add_keys(w, cfg) -> None:
  """Writes cfg's llama3 numbers as the `jaxft.rope.scaling.*` keys (read back exactly)."""
  s = dict(cfg.rope_scaling)
  for n in _NAMES[:3]:
    w.add_float32(KEYS[n], float(s[n]))
  w.add_uint32(KEYS[_NAMES[3]], int(s[_NAMES[3]]))


def scaling_from_file(path: str, got: np.ndarray, theta: float, head_dim: int, opt) -> tuple | None:
  """The rope_scaling pairs (HF's spelling, sorted, as models/hf_config reads config.json) that
  reproduce a file's `rope_freqs.weight` `got` within 1e-6 relative: from its jaxft.rope.scaling.*
  keys (`opt(key)`, None when absent), each missing one Llama 3.1/3.2's published value (the
  factor: the largest entry). None when every entry is 1 (no scaling). Raises ConfigError naming
  the file, the tensor and the first entry that differs when no such config reproduces it."""
  got = np.asarray(got, np.float64).reshape(-1)
  if got.shape != (head_dim // 2,):
    raise CheckpointError(f"{path}: tensor {TENSOR} has {got.size} entries; expected "
                          f"head_dim / 2 = {head_dim // 2}")
  if np.all(got == 1.0):
    return None
  s = {"factor": float(got.max()), **PUBLISHED}
  for n in _NAMES:
    v = opt(KEYS[n])
    if v is not None:
      s[n] = int(v) if n == _NAMES[3] else float(v)
  want = _factors(theta, head_dim, s)
  bad = np.flatnonzero(~(np.abs(want - got) <= _RTOL * np.abs(want)))
  if bad.size:
    i = int(bad[0])
    raise ConfigError(
        f"{path}: tensor {TENSOR} (per-frequency RoPE factors) is not llama3 RoPE scaling "
        f"{s} (from the file's {', '.join(KEYS.values())} keys, or Llama 3.1/3.2's published "
        f"values where absent): entry {i} is {got[i]:.7g} where that gives {want[i]:.7g}; "
        "jaxft reads Llama 3 scaling only")
  return tuple(sorted(dict(s, rope_type="llama3").items()))
