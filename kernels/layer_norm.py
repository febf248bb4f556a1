"""LayerNorm in Triton, forward and backward, with the weight and bias gradients (BERT family).

y = (x − mean) · rstd · w + b over the last dimension, rstd = 1 / sqrt(var + eps) with the biased
variance, all in fp32 from x's dtype, y rounded once to the output dtype (x's dtype; fp32 under
autocast, as torch's autocast runs ``layer_norm`` in fp32) -- the semantics of ``nn.LayerNorm``
(HF BERT's). The forward saves x, the per-row mean and rstd (fp32), as torch does.

* ``_ln_fwd_kernel``: ``ROWS`` whole rows per program (``_common.rows_per_program``), the row padded
  to a power of two (``_common.row_settings``: up to 65536 columns), two reductions per row.
* ``_ln_bwd_kernel``: a persistent grid (a few programs per SM); each program walks row tiles
  ``pid, pid + P, ...``, writes dx = rstd · (w·dy − mean(w·dy) − x̂ · mean(x̂ · w·dy)) and
  accumulates its partial dw = Σ dy · x̂ and db = Σ dy in registers, stored once per program as a
  (P, N) fp32 row; the P partials are summed on the host side of the launch (one small reduction).

``LAUNCHERS`` holds the two launchers the autograd Function calls; the Triton adapter
(``fastft/ops/triton_backend.py``) replaces them with ``torch.library`` custom ops of the same
signature that carry fake implementations (this package imports nothing from fastft).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import FLOAT_DTYPES, check_device, launch, num_sms, row_param, row_settings, rows_per_program

__all__ = ["LAUNCHERS", "LayerNormFunction", "layer_norm", "layer_norm_bwd", "layer_norm_fwd", "supported"]


# ========================================================================================= kernels
@triton.jit
def _ln_fwd_kernel(X, W, B, Y, MEAN, RSTD, stride_x, stride_y, M, N, eps,
                   ROWS: tl.constexpr, BLOCK: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK)
    rmask = rows < M
    cmask = cols < N
    mask = rmask[:, None] & cmask[None, :]
    r64 = rows.to(tl.int64)
    x = tl.load(X + r64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=1) / N
    xc = tl.where(mask, x - mean[:, None], 0.0)
    var = tl.sum(xc * xc, axis=1) / N
    rstd = 1.0 / tl.sqrt_rn(var + eps)
    w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
    b = tl.load(B + cols, mask=cmask, other=0.0).to(tl.float32)
    y = xc * rstd[:, None] * w[None, :] + b[None, :]
    tl.store(Y + r64[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    tl.store(MEAN + rows, mean, mask=rmask)
    tl.store(RSTD + rows, rstd, mask=rmask)


@triton.jit
def _ln_bwd_kernel(DY, X, W, MEAN, RSTD, DX, DWP, DBP, stride_dy, stride_x, stride_dx, M, N, n_tiles,
                   ROWS: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    cols, cmask, w = row_param(W, N, BLOCK=BLOCK)
    dw = tl.zeros((BLOCK,), dtype=tl.float32)
    db = tl.zeros((BLOCK,), dtype=tl.float32)
    for tile in range(pid, n_tiles, nprog):
        rows = tile * ROWS + tl.arange(0, ROWS)
        rmask = rows < M
        mask = rmask[:, None] & cmask[None, :]
        r64 = rows.to(tl.int64)
        x = tl.load(X + r64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + r64[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(MEAN + rows, mask=rmask, other=0.0)
        rstd = tl.load(RSTD + rows, mask=rmask, other=0.0)
        xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        wdy = dy * w[None, :]
        c1 = tl.sum(xhat * wdy, axis=1) / N
        c2 = tl.sum(wdy, axis=1) / N
        dx = (wdy - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
        tl.store(DX + r64[:, None] * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        dw += tl.sum(dy * xhat, axis=0)
        db += tl.sum(dy, axis=0)
    tl.store(DWP + pid.to(tl.int64) * N + cols, dw, mask=cmask)
    tl.store(DBP + pid.to(tl.int64) * N + cols, db, mask=cmask)


# ======================================================================================= launchers
def settings(N: int) -> tuple[int, int, int]:
    """(ROWS, BLOCK, num_warps) of both kernels: whole rows padded to a power of two, about 4096
    elements per program, at least 8 warps for such a tile (16 fp32 values per thread: the backward
    holds x, dy and x̂ of each; at 4 warps it needs ~168 registers, a third of the SM's warps)."""
    block, warps = row_settings(N)
    rows = rows_per_program(block)
    return rows, block, max(warps, min(8, rows * block // 512))


def bwd_programs(n_tiles: int, device: torch.device) -> int:
    """Programs of the persistent backward: 4 per SM (bounded by the row tiles)."""
    return max(1, min(n_tiles, 4 * num_sms(device)))


def layer_norm_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                   out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (M, N) with unit column stride -> y (M, N) of ``out_dtype``, mean (M,), rstd (M,) fp32."""
    check_device(x.device, "layer_norm")
    M, N = x.shape
    y = torch.empty((M, N), dtype=out_dtype, device=x.device)
    mean = torch.empty(M, dtype=torch.float32, device=x.device)
    rstd = torch.empty(M, dtype=torch.float32, device=x.device)
    if M:
        ROWS, BLOCK, warps = settings(N)
        launch(_ln_fwd_kernel, (triton.cdiv(M, ROWS),), x, weight, bias, y, mean, rstd, x.stride(0), y.stride(0),
               M, N, float(eps), ROWS=ROWS, BLOCK=BLOCK, num_warps=warps)
    return y, mean, rstd


def layer_norm_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor,
                   rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dx (M, N) in x's dtype, dw and db (N,) fp32 (Σ over rows, cast by the caller)."""
    M, N = x.shape
    dx = torch.empty_like(x)
    if M == 0:
        z = torch.zeros(N, dtype=torch.float32, device=x.device)
        return dx, z, z.clone()
    ROWS, BLOCK, warps = settings(N)
    n_tiles = triton.cdiv(M, ROWS)
    P = bwd_programs(n_tiles, x.device)
    dwp = torch.empty((P, N), dtype=torch.float32, device=x.device)
    dbp = torch.empty((P, N), dtype=torch.float32, device=x.device)
    launch(_ln_bwd_kernel, (P,), dy, x, weight, mean, rstd, dx, dwp, dbp, dy.stride(0), x.stride(0), dx.stride(0),
           M, N, n_tiles, ROWS=ROWS, BLOCK=BLOCK, num_warps=warps)
    return dx, dwp.sum(0), dbp.sum(0)


LAUNCHERS = {"fwd": layer_norm_fwd, "bwd": layer_norm_bwd}


# ======================================================================================== autograd
def _rows(t: torch.Tensor) -> torch.Tensor:
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


class LayerNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps, out_dtype):
        x2 = _rows(x)
        y, mean, rstd = LAUNCHERS["fwd"](x2, weight, bias, float(eps), out_dtype)
        ctx.save_for_backward(x2, weight, mean, rstd)
        ctx.shape, ctx.dtypes = x.shape, (weight.dtype, bias.dtype)
        return y.view(x.shape)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x2, weight, mean, rstd = ctx.saved_tensors
        dx, dw, db = LAUNCHERS["bwd"](_rows(dy), x2, weight, mean, rstd)
        return (dx.view(ctx.shape) if ctx.needs_input_grad[0] else None,
                dw.to(ctx.dtypes[0]) if ctx.needs_input_grad[1] else None,
                db.to(ctx.dtypes[1]) if ctx.needs_input_grad[2] else None, None, None)


def supported(x, weight, bias, eps=1e-5) -> bool:
    """fp16 / bf16 / fp32 x with a 1-D weight and bias of its last dimension (at most 65536 wide)."""
    return (isinstance(x, torch.Tensor) and isinstance(weight, torch.Tensor) and isinstance(bias, torch.Tensor)
            and x.dim() >= 1 and x.dtype in FLOAT_DTYPES and weight.dtype in FLOAT_DTYPES
            and bias.dtype in FLOAT_DTYPES and weight.shape == (x.shape[-1],) and bias.shape == weight.shape
            and 0 < x.shape[-1] <= 65536 and weight.device == x.device == bias.device)


def layer_norm(x, weight, bias, eps, out_dtype=None):
    """``F.layer_norm(x, (N,), weight, bias, eps)`` (see the module docstring); y in ``out_dtype``
    (default x's dtype)."""
    return LayerNormFunction.apply(x, weight, bias, eps, x.dtype if out_dtype is None else out_dtype)
