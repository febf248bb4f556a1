"""SwiGLU's gate, silu(g) · u, in Triton, forward and backward (Shazeer 2020, "GLU Variants Improve
Transformer"; the Llama MLP's ``act_fn(gate_proj(x)) * up_proj(x)``).

Math, elementwise in fp32 (one rounding per output, where torch's composition rounds silu(g) first):

    s  = sigmoid(g)
    y  = g · s · u
    du = dy · g · s
    dg = dy · u · s · (1 + g · (1 − s))

Only g and u are saved for backward (autograd on the plain expression also keeps silu(g)).
Layout: g and u (..., F) flattened to (M, F) with row strides (unit column stride), so the two
halves of one fused gate/up output work without a copy; tiles of ROWS × BLOCK (about 2K elements
per program, narrow rows pack several to a program), rows on the first grid axis (no 65535 limit).
dtypes: fp16 / bf16 / fp32, g and u alike; outputs in that dtype.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import FLOAT_DTYPES, cast, check_device, launch, rows_per_program, upcast

__all__ = ["SiluMulFunction", "silu_mul", "silu_mul_fwd", "silu_mul_bwd", "silu_mul_fwd_fake", "silu_mul_bwd_fake",
           "supported"]

TILE = 2048  # elements per program
WARPS = 4


# ========================================================================================= kernels
@triton.jit
def _silu_mul_fwd_kernel(G, U, Y, M, F, stride_g, stride_u, ROWS: tl.constexpr, BLOCK: tl.constexpr,
                         UPCAST: tl.constexpr):
    """y = silu(g) · u over a ROWS × BLOCK tile (Y contiguous (M, F))."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = (rows < M)[:, None] & (cols < F)[None, :]
    r64 = rows.to(tl.int64)[:, None]
    g = tl.load(G + r64 * stride_g + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + r64 * stride_u + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    y = g * tl.sigmoid(g) * u
    tl.store(Y + r64 * F + cols[None, :], cast(y, Y.dtype.element_ty, UPCAST=UPCAST), mask=mask)


@triton.jit
def _silu_mul_bwd_kernel(DY, G, U, DG, DU, M, F, stride_dy, stride_g, stride_u, ROWS: tl.constexpr,
                         BLOCK: tl.constexpr, UPCAST: tl.constexpr):
    """du = dy · silu(g), dg = dy · u · s · (1 + g · (1 − s)), s = sigmoid(g) (DG, DU contiguous)."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = (rows < M)[:, None] & (cols < F)[None, :]
    r64 = rows.to(tl.int64)[:, None]
    dy = tl.load(DY + r64 * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + r64 * stride_g + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + r64 * stride_u + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(g)
    gs = g * s
    du = dy * gs
    dg = dy * u * (s + gs * (1.0 - s))
    tl.store(DG + r64 * F + cols[None, :], cast(dg, DG.dtype.element_ty, UPCAST=UPCAST), mask=mask)
    tl.store(DU + r64 * F + cols[None, :], cast(du, DU.dtype.element_ty, UPCAST=UPCAST), mask=mask)


# ======================================================================================== launchers
def supported(g, u) -> bool:
    """fp16 / bf16 / fp32 g and u of one shape and dtype, on one device, at least 1-D."""
    return (isinstance(g, torch.Tensor) and isinstance(u, torch.Tensor) and g.dtype in FLOAT_DTYPES
            and u.dtype == g.dtype and g.shape == u.shape and g.dim() >= 1 and g.device == u.device)


def _rows(t: torch.Tensor) -> torch.Tensor:
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 or t2.shape[-1] == 1 else t2.contiguous()


def _grid(M: int, F: int) -> tuple[tuple[int, int], int, int]:
    block = min(TILE, triton.next_power_of_2(max(F, 1)))
    rows = rows_per_program(block, TILE)
    return (triton.cdiv(M, rows), triton.cdiv(F, block)), rows, block


def silu_mul_fwd_fake(g, u):
    return g.new_empty((g.numel() // max(g.shape[-1], 1), g.shape[-1]))


def silu_mul_fwd(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """silu(g) · u as a contiguous (M, F) tensor of g (..., F)."""
    check_device(g.device, "silu_mul")
    g2, u2 = _rows(g), _rows(u)
    M, F = g2.shape
    y = silu_mul_fwd_fake(g, u)
    if y.numel():
        grid, rows, block = _grid(M, F)
        launch(_silu_mul_fwd_kernel, grid, g2, u2, y, M, F, g2.stride(0), u2.stride(0), ROWS=rows, BLOCK=block,
               UPCAST=upcast(y.dtype), num_warps=WARPS)
    return y


def silu_mul_bwd_fake(dy, g, u):
    M, F = g.numel() // max(g.shape[-1], 1), g.shape[-1]
    return g.new_empty((M, F)), u.new_empty((M, F))


def silu_mul_bwd(dy: torch.Tensor, g: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dg, du), contiguous (M, F), from dy and the saved g, u (..., F)."""
    dy2, g2, u2 = _rows(dy), _rows(g), _rows(u)
    M, F = g2.shape
    dg, du = silu_mul_bwd_fake(dy, g, u)
    if dg.numel():
        grid, rows, block = _grid(M, F)
        launch(_silu_mul_bwd_kernel, grid, dy2, g2, u2, dg, du, M, F, dy2.stride(0), g2.stride(0), u2.stride(0),
               ROWS=rows, BLOCK=block, UPCAST=upcast(dg.dtype), num_warps=WARPS)
    return dg, du


# ================================================================================ autograd Function
class SiluMulFunction(torch.autograd.Function):
    """silu(g) · u saving only g and u. ``fwd`` / ``bwd`` are the launchers (the Triton adapter swaps
    in their ``torch.library`` custom ops, which have fake implementations)."""

    fwd = staticmethod(silu_mul_fwd)
    bwd = staticmethod(silu_mul_bwd)

    @staticmethod
    def forward(ctx, g, u):
        ctx.save_for_backward(g, u)
        return SiluMulFunction.fwd(g, u).view(g.shape)

    @staticmethod
    def backward(ctx, dy):
        g, u = ctx.saved_tensors
        dg, du = SiluMulFunction.bwd(dy, g, u)
        return (dg.view(g.shape) if ctx.needs_input_grad[0] else None,
                du.view(u.shape) if ctx.needs_input_grad[1] else None)


# ========================================================================================== public
def silu_mul(g, u):
    """silu(g) · u (SwiGLU); under autograd saves only g and u."""
    return SiluMulFunction.apply(g, u)
