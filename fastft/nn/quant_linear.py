"""QuantLinear: a linear layer whose weight is a frozen NF4Weight or Int4Weight.

``forward(x) = fastft.ops.quant_matmul(x, self.weight, self.bias)``: the weight is dequantized
inside the op (in x's dtype, or the autocast dtype), never stored dense, and gets no gradient.

* ``.weight`` is the quantized object (not a Parameter); ``.bias`` a Parameter (frozen unless
  ``train_bias=True``) or None.
* Module casts: ``.to(device)`` / ``.cuda()`` / ``.cpu()`` move the quantized tensors;
  ``.to(dtype)`` / ``.half()`` / ``.double()`` cast only the bias -- 4-bit data and its fp32
  scales are never touched (see ``_apply``).
* state_dict, NF4: bitsandbytes ``Linear4bit``'s layout -- ``weight`` (uint8 ((n+1)//2, 1)),
  ``weight.absmax``, ``weight.quant_map``, [``weight.nested_absmax``, ``weight.nested_quant_map``],
  ``weight.quant_state.bitsandbytes__nf4`` (JSON), ``bias`` -- so transformers/bitsandbytes read it.
  int4: ``weight`` (uint8 (out, ceil(in/2))), ``weight.scales``, [``weight.zeros``],
  ``weight.quant_state.fastft__int4`` (JSON), ``bias`` (see ``fastft/quant/int4.py``).
  ``load_state_dict`` also accepts a plain float ``weight`` (an nn.Linear state dict) and
  quantizes it with this layer's settings.
"""
from __future__ import annotations

import torch
from torch import nn

from fastft import ops
from fastft.quant import Int4Weight, NF4Weight
from fastft.quant.int4 import INT4_QS_KEY
from fastft.quant.nf4 import BNB_QS_KEY


class QuantLinear(nn.Module):
    """y = x · deq(W)ᵀ + b with W stored as NF4 (bitsandbytes layout) or group-wise int4."""

    def __init__(self, weight, bias: torch.Tensor | None = None, *, train_bias: bool = False):
        super().__init__()
        if not isinstance(weight, (NF4Weight, Int4Weight)):
            raise TypeError(f"QuantLinear: weight must be an NF4Weight or Int4Weight, got {type(weight).__name__}")
        out_f, in_f = weight.shape
        if bias is not None:
            if not isinstance(bias, torch.Tensor) or not bias.is_floating_point():
                raise TypeError("QuantLinear: bias must be a floating-point tensor")
            if tuple(bias.shape) != (out_f,):
                raise ValueError(f"QuantLinear: bias shape {tuple(bias.shape)} must be (out_features,) = ({out_f},)")
            bias = nn.Parameter(bias.detach().to(weight.device), requires_grad=train_bias)
        self.weight = weight
        if bias is None:
            self.register_parameter("bias", None)
        else:
            self.bias = bias
        self.in_features = in_f
        self.out_features = out_f

    @classmethod
    def from_linear(cls, linear: nn.Linear, quantization: str = "nf4", *, blocksize: int = 64,
                    double_quant: bool = True, group_size: int = 128, symmetric: bool = False,
                    train_bias: bool = False) -> "QuantLinear":
        """Quantize an ``nn.Linear`` (weight fp16/bf16/fp32/fp64). The input layer is left unchanged."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"QuantLinear.from_linear: expected nn.Linear, got {type(linear).__name__}")
        w = linear.weight.detach()
        if not w.is_floating_point():
            raise TypeError(f"QuantLinear.from_linear: weight must be floating point, got {w.dtype}")
        if quantization == "nf4":
            qw = NF4Weight.from_float(w, blocksize=blocksize, double_quant=double_quant)
        elif quantization == "int4":
            qw = Int4Weight.from_float(w, group_size=group_size, symmetric=symmetric)
        else:
            raise ValueError(f"QuantLinear: quantization must be 'nf4' or 'int4', got {quantization!r}")
        return cls(qw, linear.bias, train_bias=train_bias)

    @classmethod
    def empty(cls, in_features: int, out_features: int, bias: bool = True, quantization: str = "nf4", *,
              blocksize: int = 64, double_quant: bool = True, group_size: int = 128, symmetric: bool = False,
              dtype: torch.dtype = torch.float32, device=None, train_bias: bool = False) -> "QuantLinear":
        """An uninitialized layer (e.g. ``device="meta"``) to be filled by ``load_state_dict``,
        which then takes the checkpoint's quantization settings."""
        shape = (out_features, in_features)
        if quantization == "nf4":
            qw = NF4Weight.empty(shape, blocksize, double_quant, dtype, device)
        elif quantization == "int4":
            qw = Int4Weight.empty(shape, group_size, symmetric, dtype, device)
        else:
            raise ValueError(f"QuantLinear: quantization must be 'nf4' or 'int4', got {quantization!r}")
        b = torch.empty(out_features, dtype=dtype, device=device) if bias else None
        return cls(qw, b, train_bias=train_bias)

    @property
    def quantization(self) -> str:
        return self.weight.quant_type

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.quant_matmul(x, self.weight, self.bias)

    def dequantize_to_linear(self, dtype: torch.dtype | None = None) -> nn.Linear:
        """A dense nn.Linear with the dequantized weight (default: the original dtype), for merging."""
        dtype = self.weight.dtype if dtype is None else dtype
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device="meta", dtype=dtype)
        lin.weight = nn.Parameter(self.weight.dequantize(dtype))
        if self.bias is not None:
            lin.bias = nn.Parameter(self.bias.detach().to(dtype).clone())
        return lin

    # -- device moves without dtype casts of the 4-bit data ------------------------------------
    def _apply(self, fn, recurse=True):
        # Module.to/cuda/half/... hand every tensor to ``fn``. Probing ``fn`` with an empty uint8
        # tensor on the weight's device tells where the weight should go: device moves apply,
        # and Module.to leaves integer tensors' dtype alone, so dtype casts are no-ops here. The
        # fp32 scales must not be cast either, hence no fn on the weight's own tensors.
        probe = fn(torch.empty(0, dtype=torch.uint8, device=self.weight.device))
        if isinstance(probe, torch.Tensor) and probe.device != self.weight.device:
            self.weight = self.weight.to(probe.device)
        return super()._apply(fn, recurse)

    # -- state dict ----------------------------------------------------------------------------
    def _weight_state(self, prefix: str) -> dict:
        if isinstance(self.weight, NF4Weight):
            return self.weight.to_bnb_state_dict(prefix)
        return self.weight.to_state_dict(prefix)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        ws = self._weight_state(prefix)
        destination[prefix + "weight"] = ws.pop(prefix + "weight")
        super()._save_to_state_dict(destination, prefix, keep_vars)  # the bias
        destination.update(ws)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        wkey = prefix + "weight"
        weight_keys = [k for k in state_dict if k == wkey or k.startswith(wkey + ".")]
        rest = {k: v for k, v in state_dict.items() if k not in weight_keys}
        if wkey not in state_dict:
            missing_keys.append(wkey)
        else:
            try:
                new = self._weight_from_state(state_dict, prefix)
            except (KeyError, ValueError, TypeError) as e:
                error_msgs.append(f"While loading {wkey}: {e}")
            else:
                if tuple(new.shape) != (self.out_features, self.in_features):
                    error_msgs.append(f"size mismatch for {wkey}: checkpoint shape {tuple(new.shape)}, "
                                      f"layer shape {(self.out_features, self.in_features)}")
                elif self.weight.device.type == "meta" or local_metadata.get("assign_to_params_buffers", False):
                    self.weight = new  # a layer built on meta takes the checkpoint's tensors as they are
                else:
                    self.weight = new.to(self.weight.device)
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def _weight_from_state(self, sd, prefix):
        wkey = prefix + "weight"
        if (wkey + "." + BNB_QS_KEY) in sd:
            return NF4Weight.from_bnb_state_dict(sd, prefix)
        if (wkey + "." + INT4_QS_KEY) in sd:
            return Int4Weight.from_state_dict(sd, prefix)
        w = sd[wkey]
        if isinstance(w, torch.Tensor) and w.is_floating_point() and w.dim() == 2:
            # A dense checkpoint (e.g. an nn.Linear state dict): quantize with this layer's settings.
            qw = self.weight
            if isinstance(qw, NF4Weight):
                return NF4Weight.from_float(w.to(qw.device), blocksize=qw.blocksize, double_quant=qw.double_quant)
            return Int4Weight.from_float(w.to(qw.device), group_size=qw.group_size, symmetric=qw.symmetric)
        raise ValueError(f"{wkey}: no quant_state key ({BNB_QS_KEY} or {INT4_QS_KEY}) and not a 2-D float tensor")

    def extra_repr(self) -> str:
        w = self.weight
        if isinstance(w, NF4Weight):
            q = f"quantization=nf4, blocksize={w.blocksize}, double_quant={w.double_quant}"
        else:
            q = f"quantization=int4, group_size={w.group_size}, symmetric={w.symmetric}"
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, {q}"


__all__ = ["QuantLinear"]
