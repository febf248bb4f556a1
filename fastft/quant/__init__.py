"""Quantized weight formats: NF4 (bitsandbytes-compatible, with double quantization) and int4.

Quantized weights are frozen objects (not Parameters) with a small interface: ``from_float``,
``dequantize(dtype)``, ``to(device)``, ``device``, ``nbytes`` and (de)serialization. The arithmetic
runs through ``fastft.ops`` (``nf4_quantize``, ``nf4_dequantize``, ``int4_quantize``,
``int4_dequantize``), so kernel backends plug in without this package knowing about them.
"""
from .codebooks import NF4_VALUES, dynamic_map, nf4_code
from .base import QuantizedWeight
from .int4 import Int4Weight
from .nf4 import NF4Weight, double_quantize_absmax


def quantize(w, quantization: str = "nf4", *, blocksize: int = 64, double_quant: bool = True,
             group_size: int = 128, symmetric: bool = False):
    """Quantize a float (out, in) weight to ``"nf4"`` or ``"int4"``."""
    if quantization == "nf4":
        return NF4Weight.from_float(w, blocksize=blocksize, double_quant=double_quant)
    if quantization == "int4":
        return Int4Weight.from_float(w, group_size=group_size, symmetric=symmetric)
    raise ValueError(f"quantization must be 'nf4' or 'int4', got {quantization!r}")


__all__ = ["QuantizedWeight", "NF4Weight", "Int4Weight", "quantize", "double_quantize_absmax", "NF4_VALUES", "nf4_code",
           "dynamic_map"]
