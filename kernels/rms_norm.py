"""RMSNorm and fused residual-add + RMSNorm in Triton, forward and backward (HF Llama semantics).

Math (Zhang & Sennrich 2019, "Root Mean Square Layer Normalization"; transformers' LlamaRMSNorm):

    h     = x + r                                  (add_rms_norm only; rounded to h's dtype)
    rstd  = 1 / sqrt(mean(h²) + eps)               in fp32
    n     = cast(h · rstd, dtype(h))               normalised in fp32, cast back before the weight
    y     = cast(w · n, promote(dtype(h), dtype(w)))

Backward, per row, in fp32 (ĥ = h · rstd unrounded; the cast is the identity for gradients, as in
autograd; dh_in is the gradient reaching ``h`` from the residual stream in add_rms_norm):

    dn = dy · w
    dh = rstd · (dn − ĥ · mean(dn · ĥ)) (+ dh_in)
    dw = Σ_rows dy · n                             (per-program fp32 partials, summed by torch)

Layout: the rows of ``x`` (..., N) are flattened to (M, N) with a row stride (unit column stride).
Forward: one program per ``ROWS`` rows holding whole rows in registers (``_common.row_settings``,
``rows_per_program``: about 4K elements per program, so narrow rows pack several to a program).
Backward: a persistent grid (one wave, ~16 warps per SM) walking row tiles, each program keeping its
own fp32 partial of dw; the partials are summed afterwards (deterministic, no atomics). Saved for
backward: the normalised input (x, or h for add_rms_norm, which the caller keeps anyway as the
residual stream) and rstd (M fp32).

dtypes: x, r, w in fp16 / bf16 / fp32 (each its own); outputs as torch's type promotion gives them.
Limits: N up to 65536 (one row per register tile). Under the interpreter (Triton 3.9) fp32 -> bf16
casts truncate; ``_common.cast`` rounds them (UPCAST).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (FLOAT_DTYPES, cast, check_device, launch, num_sms, row_param, row_settings, rows_per_program,
                      upcast)

__all__ = ["RMSNormFunction", "AddRMSNormFunction", "rms_norm", "add_rms_norm", "rms_norm_fwd", "rms_norm_bwd",
           "rms_norm_fwd_fake", "rms_norm_bwd_fake", "supported"]


# ========================================================================================= kernels
@triton.jit
def _rms_norm_fwd_kernel(X, R, W, Y, H, RSTD, M, N, stride_x, stride_r, stride_y, stride_h, eps,
                         ROWS: tl.constexpr, BLOCK: tl.constexpr, HAS_RES: tl.constexpr, UPCAST: tl.constexpr):
    """y = w · cast(h · rstd) for ROWS rows; h = x (+ r, stored to H when HAS_RES; without a residual H
    is X, whose dtype is the normalised value's); rstd stored (fp32)."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK)
    row_ok = rows < M
    mask = row_ok[:, None] & (cols[None, :] < N)
    r64 = rows.to(tl.int64)[:, None]
    h = tl.load(X + r64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        h += tl.load(R + r64 * stride_r + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        hq = cast(h, H.dtype.element_ty, UPCAST=UPCAST)
        tl.store(H + r64 * stride_h + cols[None, :], hq, mask=mask)
        h = hq.to(tl.float32)
    # IEEE sqrt and division: rstd enters every element of the row (and fp32 outputs are compared
    # against torch's correctly rounded rsqrt path).
    rstd = tl.div_rn(1.0, tl.sqrt_rn(tl.sum(h * h, axis=1) / N + eps))
    n = cast(h * rstd[:, None], H.dtype.element_ty, UPCAST=UPCAST).to(tl.float32)
    w = tl.load(W + cols, mask=cols < N, other=0.0).to(tl.float32)
    y = cast(w[None, :] * n, Y.dtype.element_ty, UPCAST=UPCAST)
    tl.store(Y + r64 * stride_y + cols[None, :], y, mask=mask)
    tl.store(RSTD + rows, rstd, mask=row_ok)


@triton.jit
def _rms_norm_bwd_kernel(DY, H, W, RSTD, DHI, DX, DR, DWP, M, N, stride_dy, stride_h, stride_dhi, stride_dx,
                         stride_dr, ROWS: tl.constexpr, BLOCK: tl.constexpr, HAS_DHI: tl.constexpr,
                         HAS_DR: tl.constexpr, HAS_DW: tl.constexpr, UPCAST: tl.constexpr):
    """dh = rstd · (dy·w − ĥ · mean(dy·w·ĥ)) (+ dh_in) -> DX (and DR in another dtype); program p's
    fp32 partial of dw = Σ dy · cast(ĥ) over its row tiles -> DWP[p]."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    cols, col_ok, w = row_param(W, N, BLOCK=BLOCK)
    dw = tl.zeros((BLOCK,), dtype=tl.float32)
    for tile in range(pid, tl.cdiv(M, ROWS), nprog):
        rows = tile * ROWS + tl.arange(0, ROWS)
        row_ok = rows < M
        mask = row_ok[:, None] & col_ok[None, :]
        r64 = rows.to(tl.int64)[:, None]
        dy = tl.load(DY + r64 * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        h = tl.load(H + r64 * stride_h + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
        hn = h * rstd[:, None]
        if HAS_DW:
            dw += tl.sum(dy * cast(hn, H.dtype.element_ty, UPCAST=UPCAST).to(tl.float32), axis=0)
        dn = dy * w[None, :]
        dh = rstd[:, None] * (dn - hn * (tl.sum(dn * hn, axis=1) / N)[:, None])
        if HAS_DHI:
            dh += tl.load(DHI + r64 * stride_dhi + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + r64 * stride_dx + cols[None, :], cast(dh, DX.dtype.element_ty, UPCAST=UPCAST), mask=mask)
        if HAS_DR:
            tl.store(DR + r64 * stride_dr + cols[None, :], cast(dh, DR.dtype.element_ty, UPCAST=UPCAST), mask=mask)
    if HAS_DW:
        tl.store(DWP + pid.to(tl.int64) * N + cols, dw, mask=col_ok)


# ======================================================================================== launchers
def supported(x, weight, residual=None) -> bool:
    """Whether the kernels take these operands: fp16 / bf16 / fp32 tensors on a Triton device, a
    1-D weight of the rows' length, a residual of x's shape."""
    ts = (x, weight) if residual is None else (x, weight, residual)
    if not all(isinstance(t, torch.Tensor) and t.dtype in FLOAT_DTYPES for t in ts):
        return False
    if x.dim() < 1 or weight.dim() != 1 or weight.shape[0] != x.shape[-1] or x.shape[-1] > 65536:
        return False
    if residual is not None and residual.shape != x.shape:
        return False
    return all(t.device == x.device for t in ts)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(M, N) view (or copy) with unit column stride."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 or t2.shape[-1] == 1 else t2.contiguous()


def _settings(N: int, backward: bool = False) -> tuple[int, int, int]:
    """(BLOCK, ROWS, num_warps): whole rows, ~4K elements per program; the backward (four row-sized
    fp32 values live per element) ~2K, which keeps narrow rows under ~100 registers per thread."""
    block, warps = row_settings(N)
    return block, rows_per_program(block, 2048 if backward else 4096), warps


def rms_norm_fwd_fake(x, weight, residual, eps):
    M, N = x.numel() // max(x.shape[-1], 1), x.shape[-1]
    hdt = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    y = x.new_empty((M, N), dtype=torch.promote_types(hdt, weight.dtype))
    h = x.new_empty((M, N) if residual is not None else (0,), dtype=hdt)
    return y, h, x.new_empty((M,), dtype=torch.float32)


def rms_norm_fwd(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y (M, N), h (M, N) or empty, rstd (M,) fp32) of rows x (..., N) (+ residual)."""
    check_device(x.device, "rms_norm")
    x2 = _rows(x)
    M, N = x2.shape
    r2 = _rows(residual) if residual is not None else None
    y, h, rstd = rms_norm_fwd_fake(x, weight, residual, eps)
    if M == 0:
        return y, h, rstd
    block, rows, warps = _settings(N)
    hh = h if residual is not None else x2
    launch(_rms_norm_fwd_kernel, (triton.cdiv(M, rows),), x2, r2 if r2 is not None else x2, weight.contiguous(), y,
           hh, rstd, M, N, x2.stride(0), r2.stride(0) if r2 is not None else 0, y.stride(0), hh.stride(0), float(eps),
           ROWS=rows, BLOCK=block, HAS_RES=residual is not None, UPCAST=upcast(y.dtype) or upcast(hh.dtype),
           num_warps=warps)
    return y, h, rstd


def rms_norm_bwd_fake(dy, h, weight, rstd, dh_in, x_dtype, r_dtype, need_dw):
    M, N = h.shape
    dx = h.new_empty((M, N), dtype=x_dtype)
    dr = h.new_empty((M, N) if r_dtype is not None and r_dtype != x_dtype else (0,),
                     dtype=r_dtype if r_dtype is not None else x_dtype)
    dw = weight.new_empty((N,) if need_dw else (0,))
    return dx, dr, dw


def rms_norm_bwd(dy: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
                 dh_in: torch.Tensor | None, x_dtype: torch.dtype, r_dtype: torch.dtype | None,
                 need_dw: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx (M, N) in ``x_dtype``, dr (M, N) in ``r_dtype`` when that differs (else empty: dr = dx),
    dw (N,) in w's dtype or empty) from dy and the saved h (M, N) / rstd; ``dh_in``: the gradient
    reaching h directly (add_rms_norm's residual output), or None."""
    dy2 = _rows(dy)
    M, N = h.shape
    dx, dr, dw = rms_norm_bwd_fake(dy, h, weight, rstd, dh_in, x_dtype, r_dtype, need_dw)
    if M == 0:
        return dx, dr, dw.zero_()
    dhi = _rows(dh_in) if dh_in is not None else None
    block, rows, warps = _settings(N, backward=True)
    # Persistent: about 16 warps per SM in one wave (the backward holds ~80-130 registers per thread
    # at these tiles, tests/test_aot_rms_norm.py), each program keeping one fp32 dw partial.
    progs = max(1, min(triton.cdiv(M, rows), num_sms(h.device) * max(1, 16 // warps)))
    dwp = torch.empty((progs, N) if need_dw else (1,), dtype=torch.float32, device=h.device)
    has_dr = dr.numel() > 0
    launch(_rms_norm_bwd_kernel, (progs,), dy2, h, weight, rstd, dhi if dhi is not None else dy2, dx,
           dr if has_dr else dx, dwp, M, N, dy2.stride(0), h.stride(0), dhi.stride(0) if dhi is not None else 0,
           dx.stride(0), dr.stride(0) if has_dr else 0, ROWS=rows, BLOCK=block, HAS_DHI=dhi is not None,
           HAS_DR=has_dr, HAS_DW=need_dw, UPCAST=upcast(dx.dtype) or upcast(dr.dtype) or upcast(h.dtype),
           num_warps=warps)
    if need_dw:
        dw = dwp.sum(0).to(weight.dtype)
    return dx, dr, dw


# ================================================================================ autograd Functions
class RMSNormFunction(torch.autograd.Function):
    """y = rms_norm(x, w); saves x and rstd. ``fwd`` / ``bwd`` are the launchers (the Triton adapter
    swaps in their ``torch.library`` custom ops, which have fake implementations)."""

    fwd = staticmethod(rms_norm_fwd)
    bwd = staticmethod(rms_norm_bwd)

    @staticmethod
    def forward(ctx, x, weight, eps):
        y, _, rstd = RMSNormFunction.fwd(x, weight, None, float(eps))
        ctx.save_for_backward(_rows(x), weight, rstd)
        ctx.x_shape = x.shape
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        dx, _, dw = RMSNormFunction.bwd(dy, x2, weight, rstd, None, x2.dtype, None, ctx.needs_input_grad[1])
        return dx.view(ctx.x_shape) if ctx.needs_input_grad[0] else None, dw if ctx.needs_input_grad[1] else None, None


class AddRMSNormFunction(torch.autograd.Function):
    """(y, h) = (rms_norm(x + r, w), x + r) in one pass; saves h (the residual stream, which the
    caller keeps anyway) and rstd. Backward: dh = norm backward + the gradient reaching h."""

    fwd = staticmethod(rms_norm_fwd)
    bwd = staticmethod(rms_norm_bwd)

    @staticmethod
    def forward(ctx, x, residual, weight, eps):
        y, h, rstd = AddRMSNormFunction.fwd(x, weight, residual, float(eps))
        ctx.save_for_backward(h, weight, rstd)
        ctx.shape, ctx.dtypes = x.shape, (x.dtype, residual.dtype)
        return y.view(*x.shape[:-1], y.shape[-1]), h.view(x.shape)

    @staticmethod
    def backward(ctx, dy, dh):
        h, weight, rstd = ctx.saved_tensors
        xdt, rdt = ctx.dtypes
        dx, dr, dw = AddRMSNormFunction.bwd(dy, h, weight, rstd, dh, xdt, rdt, ctx.needs_input_grad[2])
        dx = dx.view(ctx.shape)
        dr = dr.view(ctx.shape) if dr.numel() else dx  # one dtype: the same gradient, as autograd's add
        return (dx if ctx.needs_input_grad[0] else None, dr if ctx.needs_input_grad[1] else None,
                dw if ctx.needs_input_grad[2] else None, None)


# ========================================================================================== public
def rms_norm(x, weight, eps):
    """HF Llama RMSNorm of the rows of x (..., N) with weight (N,); see the module docstring."""
    return RMSNormFunction.apply(x, weight, eps)


def add_rms_norm(x, residual, weight, eps):
    """(rms_norm(x + residual, weight, eps), x + residual) in one pass over the rows."""
    return AddRMSNormFunction.apply(x, residual, weight, eps)
