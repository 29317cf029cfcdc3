"""DoRA (weight-decomposed LoRA): y = x W' * m / ||W'||_c (+ bias), with W' = W + scale * A B.

LoRA's A [L, in, r] and B [L, r, out] plus a magnitude vector `magnitude` [L, out] per targeted
kernel (layers/q_proj/magnitude). Our kernels are [in, out], so the column norm ||W'||_c runs over
the input axis (-2); PEFT's [out, in] weights take it over dim 1: the same numbers. The magnitude
starts at ||W||_c (B = 0, so step 0 is the base model); it needs the base weights, so it is filled
in by `init_from_base`, not `init`. As in the DoRA paper (section 4.3) and PEFT, the norm is treated
as a constant in the backward pass (stop_gradient): only the direction through W' and m get
gradients. A quantized base is dequantized (`jaxft.models.ops.weight`) inside the computation.
PEFT exports it as a LoRA adapter with use_dora=true and `...q_proj.lora_magnitude_vector` [out].
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxft.models import llama, ops
from jaxft.peft.base import Params, base_linear, linear_dims
from jaxft.peft.lora import ADAPTER_DTYPE, LoRA


def _column_norms(w: jnp.ndarray) -> jnp.ndarray:
  """||w||_c of a float [in, out] matrix: the L2 norm of each output column, in float32."""
  w = w.astype(jnp.float32)
  return jnp.sqrt(jnp.sum(w * w, axis=-2))


@dataclasses.dataclass(frozen=True)
class DoRA(LoRA):
  name: str = "dora"

  def trainable_specs(self, cfg):
    out = super().trainable_specs(cfg)
    for n in self.targets:
      _, o, _, ao = linear_dims(cfg, n)
      out["layers"][n]["magnitude"] = llama.ParamSpec((cfg.num_layers, o), ("layers", ao), "ones")
    return out

  def init(self, cfg, rng):
    # Placeholder ones: the magnitudes are the base's column norms, set by init_from_base.
    # Float32 master weights, as LoRA's A and B.
    out = super().init(cfg, rng)
    for n in self.targets:
      _, o, _, _ = linear_dims(cfg, n)
      out["layers"][n]["magnitude"] = jnp.ones((cfg.num_layers, o), ADAPTER_DTYPE)
    return out

  def init_from_base(self, cfg, base: Params, added: Params) -> Params:
    """Sets each magnitude to the column norms of W + scale * A B (= ||W||_c while B = 0)."""
    layers = dict(added["layers"])
    for n in self.targets:
      p = dict(layers[n])

      def one(xs):  # one layer at a time: a quantized kernel is never dequantized whole
        w, a, b = xs
        w = ops.weight(w, jnp.float32)
        return _column_norms(w + self.scale * (a.astype(jnp.float32) @ b.astype(jnp.float32)))

      norms = jax.lax.map(one, (base["layers"][n]["kernel"], p["lora_a"], p["lora_b"]))
      p["magnitude"] = norms.astype(p["magnitude"].dtype)
      layers[n] = p
    return {**added, "layers": layers}

  def linear(self, name, p, x, dtype, rng):
    if "lora_a" not in p:
      return super().linear(name, p, x, dtype, rng)
    # ||W + scale * A B||_c as a constant of the backward pass (DoRA section 4.3): nothing of it
    # is kept for the backward, and the base term below goes through the usual linear.
    w = ops.weight(p["kernel"], jnp.float32)  # as init_from_base: step 0 has factor 1
    a32, b32 = p["lora_a"].astype(jnp.float32), p["lora_b"].astype(jnp.float32)
    norm = jax.lax.stop_gradient(_column_norms(w + self.scale * (a32 @ b32)))
    factor = (p["magnitude"].astype(jnp.float32) / norm).astype(dtype)
    y = base_linear({"kernel": p["kernel"]}, x, dtype) + self.delta(name, p, x, dtype, rng)
    y = y * factor
    if "bias" in p:
      y = y + p["bias"].astype(dtype)
    return y

  def merge(self, cfg, params):
    def rescale(w, p):  # W' scaled to the magnitudes: m * W' / ||W'||_c
      return w * (p.pop("magnitude").astype(jnp.float32) / _column_norms(w))[:, None, :]
    return self._merge_each(cfg, params, rescale)
