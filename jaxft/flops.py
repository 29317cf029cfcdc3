"""Model FLOPs of training and the MFU estimate (model FLOPs utilisation) the trainer logs.

What is counted (per trained token; a multiply-add is 2 FLOPs; matmuls only, since norms, RoPE,
softmax and activations are a few percent at most):

  N        the parameters that enter matmuls: every decoder linear (q, k, v, o, gate, up, down;
           L layers) and the output projection (lm_head, or the tied embedding used as one). The
           embedding lookup is a gather, not a matmul, and is not counted.
  forward  2 N + attention, attention = 4 L (heads * head_dim) c: QK^T and PV each cost
           2 (heads * head_dim) per attended key, and c is the number of keys a token attends to:
           causal within its packed example (a token at position i sees i + 1 keys, or the
           sliding window), measured from the segment ids of the batches actually trained on.
  full fine-tuning (every weight trains): backward = 2 x forward (gradients with respect to the
           inputs and to the weights), so 6 N + 3 attention.
  frozen base (LoRA, DoRA, adapters, prefix tuning; int8/NF4 bases too): the base weights get no
           weight gradient, only the input gradient that flows through them, so 4 N for the base
           (2 N forward + 2 N backward) + 6 N_added for the method's trainable parameters (all
           counted as matmul weights) + 3 attention (attention has no weights; its backward is twice
           its forward either way).

Not counted: recomputation under model.remat (that is hardware, not model, FLOPs),
dequantization of quantized kernels, optimizer updates.

MFU = (model FLOPs per second) / (peak FLOPs per second of all devices). Peaks are the dense
bfloat16 tensor-core / MXU figures of the device's datasheet (`PEAK_TFLOPS`), or
config.train.peak_tflops (per device) when set; with float32 compute the figure understates
what the hardware could do in float32. On CPUs and unknown devices only `tflops_per_sec` is logged.
"""

from __future__ import annotations

import jax
import numpy as np

from jaxft.models.config import ModelConfig

# Dense bfloat16 peak TFLOP/s per device, matched as substrings of `device.device_kind` in order.
PEAK_TFLOPS = (
    ("H100 PCIe", 756.0), ("H200", 989.0), ("H100", 989.0), ("A100", 312.0), ("L40S", 362.0),
    ("L4", 121.0), ("V100", 125.0),
    ("TPU v6 lite", 918.0), ("TPU v6e", 918.0), ("TPU v5 lite", 197.0), ("TPU v5e", 197.0),
    ("TPU v5p", 459.0), ("TPU v5", 459.0), ("TPU v4", 275.0), ("TPU v3", 123.0),
)


def peak_flops(device_kind: str) -> float | None:
  """Dense bf16 peak FLOP/s of one device of this kind, or None when unknown (CPUs included)."""
  for name, tflops in PEAK_TFLOPS:
    if name.lower() in device_kind.lower():
      return tflops * 1e12
  return None


def matmul_params(cfg: ModelConfig) -> int:
  """N: the base parameters that enter matmuls per token (decoder linears and the output
  projection; of a mixture of experts, the router and the k experts each token runs)."""
  D, F = cfg.hidden_size, cfg.intermediate_size
  if cfg.num_experts:
    F = cfg.experts_per_token * cfg.moe_intermediate_size
  per_layer = D * cfg.q_size + 2 * D * cfg.kv_size + cfg.q_size * D + 3 * D * F
  per_layer += D * cfg.num_experts
  return cfg.num_layers * per_layer + D * cfg.vocab_size


def attended_keys(segment_ids: np.ndarray, window: int | None = None) -> int:
  """Sum over the real tokens of a batch of the keys each attends to (causal, within its segment,
  at most `window`). segment_ids: [..., T], 0 = padding."""
  seg = np.asarray(segment_ids).reshape(-1, np.shape(segment_ids)[-1])
  flat = seg.ravel()
  rows = np.repeat(np.arange(seg.shape[0]), seg.shape[1])
  real = flat > 0
  key = rows[real] * (int(flat.max(initial=0)) + 1) + flat[real]
  n = np.bincount(key).astype(np.int64)
  n = n[n > 0]
  if window:
    w = np.minimum(n, window)
    return int((w * (w + 1) // 2 + (n - w) * window).sum())
  return int((n * (n + 1) // 2).sum())


def train_flops_per_token(cfg: ModelConfig, trains_base: bool, n_added: int,
                          mean_keys: float) -> float:
  """Model FLOPs of one trained token (see the module doc); mean_keys = attended keys per token."""
  n = matmul_params(cfg)
  dense = 6.0 * n if trains_base else 4.0 * n + 6.0 * n_added
  return dense + attention_flops_per_token(cfg, mean_keys)


def attention_flops_per_token(cfg: ModelConfig, mean_keys: float) -> float:
  """The attention part of train_flops_per_token: QK^T and PV, forward and backward."""
  return 3.0 * 4.0 * cfg.num_layers * cfg.q_size * mean_keys


class FlopCounter:
  """Turns the trainer's tokens/s into TFLOP/s and MFU, with the attended-context length measured
  from the batches it is shown (`observe`)."""

  def __init__(self, cfg: ModelConfig, trains_base: bool, n_added: int, peak_tflops: float = 0.0,
               devices=None):
    self.cfg, self.trains_base, self.n_added = cfg, trains_base, n_added
    devices = list(devices if devices is not None else jax.devices())
    one = peak_tflops * 1e12 if peak_tflops > 0 else peak_flops(devices[0].device_kind)
    self.peak = None if one is None else one * len(devices)
    self._keys, self._tokens = 0, 0

  def observe(self, segment_ids: np.ndarray) -> None:
    """Counts the tokens and attended keys of a (local) batch."""
    cfg = self.cfg
    if cfg.layer_types is None:
      self._keys += attended_keys(segment_ids, cfg.sliding_window)
    else:  # Gemma 2/3: the window holds only on the sliding layers (mean over the layers)
      n = sum(t == "sliding_attention" for t in cfg.layer_types)
      self._keys += (n * attended_keys(segment_ids, cfg.sliding_window)
                     + (cfg.num_layers - n) * attended_keys(segment_ids)) / cfg.num_layers
    self._tokens += int((np.asarray(segment_ids) > 0).sum())

  def per_token(self) -> float:
    mean_keys = self._keys / self._tokens if self._tokens else 0.0
    return train_flops_per_token(self.cfg, self.trains_base, self.n_added, mean_keys)

  def metrics(self, tokens_per_sec: float) -> dict:
    """{"tflops_per_sec"} and, when the peak is known, {"mfu"} (a fraction, 0..1)."""
    achieved = tokens_per_sec * self.per_token()
    out = {"tflops_per_sec": achieved / 1e12}
    if self.peak:
      out["mfu"] = achieved / self.peak
    return out
