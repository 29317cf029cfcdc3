"""Quantized frozen base weights (int8, NF4 with double quantization) for QLoRA and int8-LoRA.

A quantized kernel is a registered pytree node over plain arrays (see qtensor.py), so it passes
through jit, lax.scan (sliced per layer), sharding, donation and Orbax. Linear layers call
`jaxft.models.ops.weight(w, dtype)`: a cast for float arrays, dequantization inside the jitted computation for
quantized ones, so no float copy of the base is stored.
"""

from __future__ import annotations

from jaxft.quant.blockwise8 import DYNAMIC_CODE, Blockwise8, quantize_blockwise8
from jaxft.quant.int8 import Int8Tensor, quantize_int8
from jaxft.quant.nf4 import NF4_CODE, NF4Tensor, quantize_nf4
from jaxft.quant.params import (KINDS, bits_per_param, dequantize, dequantize_tree, leaf_shardings,
                                quantize, shardings_for, stack)
from jaxft.quant.qtensor import QTensor, is_quantized, materialize

__all__ = [
    "KINDS", "QTensor", "NF4Tensor", "Int8Tensor", "Blockwise8", "NF4_CODE", "DYNAMIC_CODE",
    "quantize", "dequantize", "materialize", "is_quantized", "quantize_nf4", "quantize_int8",
    "quantize_blockwise8", "stack", "shardings_for", "leaf_shardings", "dequantize_tree", "bits_per_param",
]
