"""What every quantized weight shares: frozen, device moves without dtype casts, byte accounting.

A subclass holds its tensors (``_tensors()``: name -> tensor), rebuilds itself from moved tensors
(``_with_tensors(t)``) and names its dequantize op (``_dequantize_op``, a ``fastft.ops`` function).
"""
from __future__ import annotations

import torch


class QuantizedWeight:
    quant_type = ""
    requires_grad = False
    _dequantize_op = ""

    def requires_grad_(self, requires_grad: bool = True):
        """Freezing is a no-op (quantized weights never train); asking for gradients is an error."""
        if requires_grad:
            raise ValueError(f"{type(self).__name__} is frozen: quantized weights get no gradient "
                             "(train LoRA adapters on top, or dequantize first)")
        return self

    # -- subclass interface ----------------------------------------------------------------------
    def _tensors(self) -> dict:
        raise NotImplementedError

    def _with_tensors(self, t: dict) -> "QuantizedWeight":
        raise NotImplementedError

    # -- shared ------------------------------------------------------------------------------------
    @property
    def in_features(self) -> int:
        return self.shape[1]

    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def nbytes(self) -> int:
        """Bytes held by the quantized tensors (codes, scales and any codebooks)."""
        return sum(t.numel() * t.element_size() for t in self._tensors().values())

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Dense (out, in) tensor of ``dtype`` (default: the original dtype)."""
        from fastft import ops

        return getattr(ops, self._dequantize_op)(self, self.dtype if dtype is None else dtype)

    def to(self, device=None, *, non_blocking: bool = False):
        """A copy on ``device`` (self if already there). Dtype casts do not apply to 4-bit data."""
        if isinstance(device, torch.dtype):
            raise TypeError(f"{type(self).__name__}.to moves devices only; 4-bit data has no float dtype to "
                            "cast (use dequantize(dtype))")
        if device is None:
            return self
        device = torch.device(device)
        if device == self.device or (device.index is None and device.type == self.device.type):
            return self
        return self._with_tensors({k: v.to(device, non_blocking=non_blocking) for k, v in self._tensors().items()})

    def cpu(self):
        return self.to("cpu")
