"""GELU (the exact erf form, ``F.gelu(x)`` / HF's "gelu") in Triton, forward and backward.

y = x · Φ(x) = ½ x (1 + erf(x / √2)); dy/dx = Φ(x) + x φ(x), φ(x) = exp(−x²/2) / √(2π). Both in fp32
from x's dtype, rounded once to x's dtype, as torch's kernels do. Backward saves x only (as torch).
Elementwise over the flattened tensor: ``BLOCK`` elements per program, 8 per thread.

``LAUNCHERS`` holds the launchers the autograd Function calls; the Triton adapter
(``fastft/ops/triton_backend.py``) replaces them with ``torch.library`` custom ops carrying fake
implementations (this package imports nothing from fastft).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import FLOAT_DTYPES, check_device, launch

__all__ = ["LAUNCHERS", "GeluFunction", "gelu", "gelu_bwd", "gelu_fwd", "supported"]

BLOCK = 2048
WARPS = 8
_SQRT1_2 = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)


# ========================================================================================= kernels
@triton.jit
def _gelu_fwd_kernel(X, Y, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    y = 0.5 * x * (1.0 + tl.math.erf(x * _SQRT1_2))
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _gelu_bwd_kernel(DY, X, DX, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
    cdf = 0.5 * (1.0 + tl.math.erf(x * _SQRT1_2))
    pdf = tl.exp(-0.5 * x * x) * _INV_SQRT_2PI
    tl.store(DX + offs, (dy * (cdf + x * pdf)).to(DX.dtype.element_ty), mask=mask)


# ======================================================================================= launchers
def gelu_fwd(x: torch.Tensor) -> torch.Tensor:
    """y = gelu(x) for a contiguous x."""
    check_device(x.device, "gelu")
    y = torch.empty_like(x)
    n = x.numel()
    if n:
        launch(_gelu_fwd_kernel, (triton.cdiv(n, BLOCK),), x, y, n, BLOCK=BLOCK, num_warps=WARPS)
    return y


def gelu_bwd(dy: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """dx = dy · gelu'(x) for contiguous dy, x of one shape."""
    dx = torch.empty_like(x)
    n = x.numel()
    if n:
        launch(_gelu_bwd_kernel, (triton.cdiv(n, BLOCK),), dy, x, dx, n, BLOCK=BLOCK, num_warps=WARPS)
    return dx


LAUNCHERS = {"fwd": gelu_fwd, "bwd": gelu_bwd}


# ======================================================================================== autograd
class GeluFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        xc = x.contiguous()
        ctx.save_for_backward(xc)
        return LAUNCHERS["fwd"](xc)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        return LAUNCHERS["bwd"](dy.contiguous(), x)


def supported(x) -> bool:
    return isinstance(x, torch.Tensor) and x.dtype in FLOAT_DTYPES


def gelu(x):
    """``F.gelu(x)`` (erf form) with the Triton kernels."""
    if torch.is_grad_enabled() and x.requires_grad:
        return GeluFunction.apply(x)
    return LAUNCHERS["fwd"](x.contiguous())
