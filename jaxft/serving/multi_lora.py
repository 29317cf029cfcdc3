"""Several LoRA fine-tunes of one base in one batch: each row of the batch picks its adapter.

The adapters' A and B are stacked on a new axis (ranks zero-padded to the largest, which leaves
every product unchanged; each adapter's alpha / r folded into its B; a target an adapter lacks
is zeros), and index 0 is the base alone (all zeros). At each step the engine binds a one-hot
row -> adapter selector into the tree (`bind_rows`), and every targeted linear adds
sum_k select[b, k] * (x_b A_k) B_k: all adapters' low-rank products for every row, which costs K
times one LoRA's (small) work, and no row ever sees another's weights.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxft.peft.base import Method, Params, base_linear
from jaxft.peft.lora import LoRA


@dataclasses.dataclass(frozen=True)
class MultiLoRA(Method):
  name: str = "multi-lora"
  targets: tuple[str, ...] = ()
  count: int = 1  # adapters, the base (index 0) included

  def bind_rows(self, params: Params, rows: jnp.ndarray) -> Params:
    """params with the per-row selector [L, B, K] beside each target's stacked A and B."""
    layers = dict(params["layers"])
    for n in self.targets:
      num_layers = layers[n]["lora_a"].shape[0]
      sel = jax.nn.one_hot(rows, self.count, dtype=jnp.float32)
      layers[n] = dict(layers[n], select=jnp.broadcast_to(sel, (num_layers,) + sel.shape))
    return {**params, "layers": layers}

  def linear(self, name, p, x, dtype, rng):
    del rng
    y = base_linear(p, x, dtype)
    if "lora_a" not in p:
      return y
    h = jnp.einsum("bti,kir->bktr", x.astype(dtype), p["lora_a"].astype(dtype))
    d = jnp.einsum("bktr,kro,bk->bto", h, p["lora_b"].astype(dtype), p["select"].astype(dtype))
    return y + d.astype(y.dtype)


def stack(base: Params, adapters: list[tuple[LoRA, Params]]) -> tuple[MultiLoRA, Params]:
  """(method, params): the frozen base with the adapters' trainable LoRA trees stacked, adapter
  i + 1 at index i + 1 (0 = the base alone)."""
  targets = tuple(sorted({t for m, _ in adapters for t in m.targets}))
  rank = max(m.rank for m, _ in adapters)
  layers = {k: dict(v) if isinstance(v, dict) else v for k, v in base["layers"].items()}
  for t in targets:
    a_list, b_list = [], []
    for m, tree in [(None, None)] + adapters:
      if m is not None and t in m.targets:
        a = np.asarray(tree["layers"][t]["lora_a"], np.float32)
        b = np.asarray(tree["layers"][t]["lora_b"], np.float32) * m.scale
      else:
        ref = next(tr["layers"][t] for mm, tr in adapters if t in mm.targets)
        a = np.zeros(ref["lora_a"].shape[:2] + (rank,), np.float32)
        b = np.zeros((ref["lora_b"].shape[0], rank, ref["lora_b"].shape[2]), np.float32)
      pad = rank - a.shape[2]
      a_list.append(np.pad(a, ((0, 0), (0, 0), (0, pad))))
      b_list.append(np.pad(b, ((0, 0), (0, pad), (0, 0))))
    layers[t] = dict(layers[t], lora_a=jnp.asarray(np.stack(a_list, 1)),
                     lora_b=jnp.asarray(np.stack(b_list, 1)))
  return MultiLoRA(targets=targets, count=len(adapters) + 1), {**base, "layers": layers}
