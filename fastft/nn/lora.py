"""LoRA linear layer: y = x Wᵀ + b + s · (drop(x) Aᵀ) Bᵀ over a frozen dense or quantized base.

LoRA (Hu et al., 2021, arXiv:2106.09685) trains a rank-r update B·A next to a frozen weight W;
QLoRA (Dettmers et al., 2023, arXiv:2305.14314) is the same with W stored in 4-bit NF4, which here
means the base layer is a ``fastft.nn.QuantLinear`` whose ``.weight`` is a quantized object.

Semantics follow PEFT's ``lora.Linear`` so adapters move between the two unchanged:
- lora_A (r, in) kaiming-uniform with a=√5 (nn.Linear's default init), lora_B (out, r) zeros, so
  the layer equals its base at initialisation;
- scaling s = α/r, or α/√r with rsLoRA (Kalajdzievski, 2023, arXiv:2312.03732), which keeps the
  update's magnitude independent of r;
- dropout acts on the LoRA branch's input only, never on the base path, and only in training.
The computation itself is ``fastft.ops.lora_linear`` (which never forms W + s·BA).

Adapters over half-precision bases are kept in fp32 (as PEFT's default ``autocast_adapter_dtype``
does): bf16 has too few mantissa bits for the small optimizer updates LoRA weights receive.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from fastft import ops


def lora_scaling(r: int, lora_alpha: float, use_rslora: bool) -> float:
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r


def is_quant_linear(module: nn.Module) -> bool:
    """True for a ``fastft.nn.QuantLinear`` (imported lazily: the quantization package is optional here)."""
    try:
        from fastft.nn.quant_linear import QuantLinear
    except ModuleNotFoundError as e:
        if e.name not in ("fastft.nn.quant_linear", "fastft.quant"):
            raise
        return False
    return isinstance(module, QuantLinear)


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_quant_linear(module)


class LoraLinear(nn.Module):
    """A frozen ``nn.Linear`` / ``QuantLinear`` (``base_layer``) plus a trainable rank-r update.

    ``init_lora_weights``: True (A kaiming-uniform a=√5, B zeros), "gaussian" (A ~ N(0, 1/r),
    B zeros) or False (both kaiming-uniform, so the layer starts away from its base; for tests).
    """

    def __init__(self, base_layer: nn.Module, r: int, lora_alpha: float, lora_dropout: float = 0.0,
                 use_rslora: bool = False, init_lora_weights: bool | str = True):
        super().__init__()
        if not is_linear(base_layer):
            raise TypeError(f"LoraLinear wraps nn.Linear or fastft.nn.QuantLinear, got {type(base_layer).__name__}")
        if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
            raise ValueError(f"LoRA rank r must be a positive integer, got {r!r}")
        if not lora_alpha > 0:
            raise ValueError(f"lora_alpha must be > 0, got {lora_alpha!r}")
        if not 0.0 <= lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout!r}")
        self.base_layer = base_layer
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.r, self.lora_alpha, self.use_rslora = r, lora_alpha, use_rslora
        self.lora_dropout = float(lora_dropout)
        self.scaling = lora_scaling(r, lora_alpha, use_rslora)

        w = base_layer.weight
        dtype = w.dtype if isinstance(w, torch.Tensor) and w.dtype in (torch.float32, torch.float64) else torch.float32
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=w.device, dtype=dtype)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=w.device, dtype=dtype)
        self.reset_lora_parameters(init_lora_weights)
        for p in base_layer.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def reset_lora_parameters(self, init_lora_weights: bool | str = True) -> None:
        if init_lora_weights is True:
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B.weight)
        elif init_lora_weights == "gaussian":
            nn.init.normal_(self.lora_A.weight, std=1.0 / self.r)
            nn.init.zeros_(self.lora_B.weight)
        elif init_lora_weights is False:
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
            nn.init.kaiming_uniform_(self.lora_B.weight, a=math.sqrt(5))
        else:
            raise ValueError(f"init_lora_weights must be True, False or 'gaussian', got {init_lora_weights!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.lora_dropout if self.training else 0.0
        return ops.lora_linear(x, self.base_layer.weight, self.lora_A.weight, self.lora_B.weight, self.scaling,
                               self.base_layer.bias, p)

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        """s · B A in fp32 (out, in)."""
        return self.scaling * (self.lora_B.weight.float() @ self.lora_A.weight.float())

    @torch.no_grad()
    def merged_linear(self) -> nn.Linear:
        """The base layer with W + s·B·A folded in, computed in fp32 and cast once to W's dtype.

        A dense base is updated in place and returned. A quantized base cannot absorb an arbitrary
        update without requantizing (which would add new rounding error), so it is dequantized and a
        dense ``nn.Linear`` in the weight's original dtype is returned instead.
        """
        base = self.base_layer
        if isinstance(base.weight, torch.Tensor):
            merged = base.weight.float() + self.delta_weight().to(base.weight.device)
            base.weight.data.copy_(merged.to(base.weight.dtype))
            return base
        qw = base.weight
        dense = qw.dequantize(torch.float32) + self.delta_weight().to(qw.device)
        out_dtype = getattr(qw, "dtype", torch.float32)
        lin = nn.Linear(self.in_features, self.out_features, bias=base.bias is not None, device=dense.device,
                        dtype=out_dtype)
        lin.weight.data.copy_(dense.to(out_dtype))
        if base.bias is not None:
            lin.bias.data.copy_(base.bias.detach().to(out_dtype))
        lin.requires_grad_(False)
        return lin

    def extra_repr(self) -> str:
        return (f"r={self.r}, lora_alpha={self.lora_alpha}, scaling={self.scaling:.4g}, "
                f"lora_dropout={self.lora_dropout}")
