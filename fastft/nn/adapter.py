"""Bottleneck adapters (Houlsby et al., 2019, arXiv:1902.00751): h ↦ h + s · up(drop(act(down(h)))).

A small down-projection (d → b), a nonlinearity and an up-projection (b → d) added residually to
a sublayer's output. ``up`` starts at zero (weight and bias), so an adapted model computes exactly
what the base model does until training moves it. The adapter is placed on the output of a linear
layer (``LinearWithAdapter``): after the attention output projection and/or the MLP's last
projection, before the block's residual add (Llama) or residual LayerNorm (BERT). Which linears
those are per architecture is a table in ``fastft.peft`` (``ADAPTER_SITES``).

Dropout acts on the bottleneck activations, and only in training. Parameters over a half-precision
model are kept in fp32 (small updates vanish in bf16); the adapter computes in its parameters'
dtype and returns h's dtype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
    "swish": F.silu,
    "tanh": torch.tanh,
}


class BottleneckAdapter(nn.Module):
    def __init__(self, hidden_size: int, bottleneck_size: int, non_linearity: str = "relu", scaling: float = 1.0,
                 dropout: float = 0.0, device=None, dtype=None):
        super().__init__()
        if non_linearity not in ACTIVATIONS:
            raise ValueError(f"unknown non_linearity {non_linearity!r}; expected one of {sorted(ACTIVATIONS)}")
        if isinstance(bottleneck_size, bool) or not isinstance(bottleneck_size, int) or bottleneck_size <= 0:
            raise ValueError(f"bottleneck_size must be a positive integer, got {bottleneck_size!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"adapter dropout must be in [0, 1), got {dropout!r}")
        if dtype is None or dtype in (torch.float16, torch.bfloat16):
            dtype = torch.float32
        self.hidden_size, self.bottleneck_size = hidden_size, bottleneck_size
        self.non_linearity, self.scaling, self.dropout = non_linearity, float(scaling), float(dropout)
        self.down = nn.Linear(hidden_size, bottleneck_size, device=device, dtype=dtype)  # default kaiming init
        self.up = nn.Linear(bottleneck_size, hidden_size, device=device, dtype=dtype)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        z = ACTIVATIONS[self.non_linearity](self.down(h.to(self.down.weight.dtype)))
        z = F.dropout(z, self.dropout, training=self.training)
        return h + (self.scaling * self.up(z)).to(h.dtype)

    def extra_repr(self) -> str:
        return (f"hidden_size={self.hidden_size}, bottleneck_size={self.bottleneck_size}, "
                f"non_linearity={self.non_linearity}, scaling={self.scaling}, dropout={self.dropout}")


class LinearWithAdapter(nn.Module):
    """``base_layer`` (frozen, any linear incl. QuantLinear or LoraLinear) followed by ``adapter``."""

    def __init__(self, base_layer: nn.Module, adapter: BottleneckAdapter):
        super().__init__()
        self.base_layer = base_layer
        self.adapter = adapter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.adapter(self.base_layer(x))
