"""Group-wise int4 weights (fastft's own format, for kernels and checkpoints that are not NF4).

Each row of the (out, in) weight is cut into ``in // group_size`` groups of ``group_size``
consecutive input columns (``in % group_size`` must be 0). Arithmetic is fp32 (the input is cast
first); rounding is ``torch.round``, i.e. half to even.

* Asymmetric (default): per group, ``lo = min(min(x), 0)``, ``hi = max(max(x), 0)`` (the range
  always contains 0), ``scale = (hi - lo) / 15``, ``zero = -lo / scale`` -- a *float* zero point in
  [0, 15], stored unrounded -- and ``q = clamp(round(x / scale + zero), 0, 15)``.
  Dequant: ``(q - zero) * scale``. Error: |x - deq| <= scale / 2 (+ fp32 rounding).
* Symmetric: ``scale = max|x| / 7``, ``q = clamp(round(x / scale), -8, 7)`` stored as ``q + 8``
  (offset binary, 0..15). Dequant: ``(code - 8) * scale``. Error: |x - deq| <= scale / 2.
* A group of zeros gets scale 0 (and zero 0) and dequantizes to exact zeros.
* Packing: ``data`` uint8 (out, ceil(in/2)), two codes per byte along ``in``, the even column in
  the HIGH nibble (same nibble order as NF4). ``scales`` fp32 (out, G); ``zeros`` fp32 (out, G), or
  None when symmetric.

Serialized keys (``to_state_dict(prefix)``, used by ``fastft.nn.QuantLinear``):
``weight`` (uint8 packed), ``weight.scales``, ``weight.zeros`` (asymmetric only) and
``weight.quant_state.fastft__int4`` -- UTF-8 JSON in a uint8 tensor with quant_type ("int4"),
group_size, symmetric, dtype, shape [out, in] -- mirroring bitsandbytes' packed quant state.
"""
from __future__ import annotations

import torch

from .base import QuantizedWeight
from .nf4 import FLOAT_DTYPES, dtype_from_name, dtype_name, pack_json, unpack_json

INT4_QS_KEY = "quant_state.fastft__int4"


def check_int4_args(w, group_size) -> None:
    """Shared argument checks for every int4_quantize backend."""
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"int4_quantize: weight must be a torch.Tensor, got {type(w).__name__}")
    if w.dtype not in FLOAT_DTYPES:
        raise TypeError(f"int4_quantize: weight dtype must be one of {FLOAT_DTYPES}, got {w.dtype}")
    if w.dim() != 2:
        raise ValueError(f"int4_quantize: weight must be 2-D (out_features, in_features), got shape {tuple(w.shape)}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0:
        raise ValueError(f"int4_quantize: group_size must be a positive int, got {group_size!r}")
    if w.numel() == 0:
        raise ValueError(f"int4_quantize: weight is empty (shape {tuple(w.shape)})")
    if w.shape[1] % group_size:
        raise ValueError(f"int4_quantize: in_features ({w.shape[1]}) must be a multiple of group_size ({group_size})")


class Int4Weight(QuantizedWeight):
    """A frozen group-wise int4 (out, in) weight (see module docstring for the exact convention)."""

    quant_type = "int4"
    _dequantize_op = "int4_dequantize"

    def __init__(self, data, scales, zeros, group_size, shape, dtype):
        shape = torch.Size(shape)
        if len(shape) != 2:
            raise ValueError(f"Int4Weight: shape must be (out_features, in_features), got {tuple(shape)}")
        out_f, in_f = shape
        if group_size <= 0 or in_f % group_size:
            raise ValueError(f"Int4Weight: in_features ({in_f}) must be a multiple of group_size ({group_size})")
        if dtype not in FLOAT_DTYPES:
            raise TypeError(f"Int4Weight: dtype must be one of {FLOAT_DTYPES}, got {dtype}")
        G = in_f // group_size
        if data.dtype != torch.uint8 or tuple(data.shape) != (out_f, (in_f + 1) // 2):
            raise ValueError(f"Int4Weight: data must be uint8 ({out_f}, {(in_f + 1) // 2}), got {data.dtype} "
                             f"{tuple(data.shape)}")
        for name, t in (("scales", scales), ("zeros", zeros)):
            if t is not None and (t.dtype != torch.float32 or tuple(t.shape) != (out_f, G)):
                raise ValueError(f"Int4Weight: {name} must be fp32 ({out_f}, {G}), got {t.dtype} {tuple(t.shape)}")
        self.data = data
        self.scales = scales
        self.zeros = zeros
        self.group_size = int(group_size)
        self.shape = shape
        self.dtype = dtype

    @classmethod
    def from_float(cls, w: torch.Tensor, group_size: int = 128, symmetric: bool = False) -> "Int4Weight":
        from fastft import ops

        check_int4_args(w, group_size)
        return ops.int4_quantize(w.detach(), group_size=group_size, symmetric=symmetric)

    @classmethod
    def empty(cls, shape, group_size: int = 128, symmetric: bool = False, dtype=torch.float32,
              device=None) -> "Int4Weight":
        """An uninitialized weight of the right layout (e.g. on the meta device)."""
        out_f, in_f = shape
        if group_size <= 0 or in_f % group_size:
            raise ValueError(f"Int4Weight: in_features ({in_f}) must be a multiple of group_size ({group_size})")
        G = in_f // group_size
        data = torch.empty((out_f, (in_f + 1) // 2), dtype=torch.uint8, device=device)
        scales = torch.empty((out_f, G), dtype=torch.float32, device=device)
        zeros = None if symmetric else torch.empty((out_f, G), dtype=torch.float32, device=device)
        return cls(data, scales, zeros, group_size, shape, dtype)

    @property
    def symmetric(self) -> bool:
        return self.zeros is None

    def _tensors(self) -> dict:
        t = {"data": self.data, "scales": self.scales}
        if self.zeros is not None:
            t["zeros"] = self.zeros
        return t

    def _with_tensors(self, t: dict) -> "Int4Weight":
        return Int4Weight(t["data"], t["scales"], t.get("zeros"), self.group_size, self.shape, self.dtype)

    def to_state_dict(self, prefix: str = "") -> dict:
        p = prefix + "weight"
        sd = {p: self.data, p + ".scales": self.scales}
        if self.zeros is not None:
            sd[p + ".zeros"] = self.zeros
        sd[p + "." + INT4_QS_KEY] = pack_json({"quant_type": "int4", "group_size": self.group_size,
                                               "symmetric": self.symmetric, "dtype": dtype_name(self.dtype),
                                               "shape": list(self.shape)})
        return sd

    @staticmethod
    def is_state_dict(sd: dict, prefix: str = "") -> bool:
        return (prefix + "weight." + INT4_QS_KEY) in sd

    @classmethod
    def from_state_dict(cls, sd: dict, prefix: str = "") -> "Int4Weight":
        p = prefix + "weight"
        qs_key = p + "." + INT4_QS_KEY
        if qs_key not in sd:
            raise KeyError(f"missing key {qs_key!r}: not a fastft int4 state dict")
        meta = unpack_json(sd[qs_key], qs_key)
        for k in ("quant_type", "group_size", "symmetric", "dtype", "shape"):
            if k not in meta:
                raise ValueError(f"{qs_key}: JSON lacks {k!r}")
        if meta["quant_type"] != "int4":
            raise ValueError(f"{qs_key}: quant_type {meta['quant_type']!r} is not 'int4'")

        def need(key):
            if key not in sd:
                raise KeyError(f"missing key {key!r} for the int4 weight {p!r}")
            return sd[key]

        zeros = None if meta["symmetric"] else need(p + ".zeros")
        return cls(need(p), need(p + ".scales"), zeros, int(meta["group_size"]), meta["shape"],
                   dtype_from_name(meta["dtype"], qs_key))

    def __repr__(self) -> str:
        return (f"Int4Weight(shape={tuple(self.shape)}, group_size={self.group_size}, "
                f"symmetric={self.symmetric}, dtype={self.dtype}, device={self.device})")


__all__ = ["Int4Weight", "check_int4_args", "INT4_QS_KEY"]
