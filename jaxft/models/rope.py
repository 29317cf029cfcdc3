"""Rotary position embeddings: HF's `rotate_half` layout, default and Llama 3 / linear scaling."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from jaxft.errors import ConfigError
from jaxft.models.config import ModelConfig


def inverse_frequencies(cfg: ModelConfig) -> np.ndarray:
  """Returns the [head_dim // 2] inverse frequencies, scaled as `cfg.rope_scaling` says."""
  dim = cfg.head_dim
  inv = 1.0 / (cfg.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
  scaling = dict(cfg.rope_scaling or ())
  kind = scaling.get("rope_type", scaling.get("type", "default"))
  if kind == "default":
    return inv.astype(np.float32)
  if kind == "linear":
    return (inv / float(scaling["factor"])).astype(np.float32)
  if kind == "llama3":
    factor = float(scaling["factor"])
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_len = float(scaling["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > old_len / low, inv / factor, inv)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return np.where(medium, smoothed, scaled).astype(np.float32)
  raise ConfigError(f"rope_scaling type {kind!r} is not supported (default, linear, llama3)")


def apply_rope(x: jnp.ndarray, positions: jnp.ndarray, inv_freq: np.ndarray) -> jnp.ndarray:
  """Rotates x [B, T, heads, head_dim] by integer positions [B, T]; math in float32."""
  angles = positions[..., None].astype(jnp.float32) * jnp.asarray(inv_freq)  # [B, T, hd/2]
  cos = jnp.cos(angles)[:, :, None, :]
  sin = jnp.sin(angles)[:, :, None, :]
  x32 = x.astype(jnp.float32)
  x1, x2 = jnp.split(x32, 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)
