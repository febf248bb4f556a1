"""Rotary position embedding in Triton, forward and backward (Su et al. 2021, "RoFormer"; the
rotate-half form of transformers' ``apply_rotary_pos_emb``), partial rotary included.

x (B, T, H, D), cos / sin (B or 1, T, d) with d even and d <= D: the first d features of every head
are rotated, the tail x[..., d:] passes through. With x = (x1, x2, tail), c = (c1, c2), s = (s1, s2)
split at d/2, in fp32 (one rounding per output):

    forward:   y1 = x1·c1 − x2·s1      y2 = x2·c2 + x1·s2          (y = x·cos + rotate_half(x)·sin)
    backward:  dx1 = dy1·c1 + dy2·s2   dx2 = dy2·c2 − dy1·s1       (the transpose)

cos and sin get no gradient (they are functions of the positions). The output dtype is torch's
promotion of x, cos and sin (bf16 q against fp32 cos under autocast gives fp32, as the composition).
In place: ``rope_`` overwrites x (its tail untouched); the autograd Function does that when asked and
autograd allows (``inplace_ok``), else it writes a new tensor. Backward always writes a new tensor.

Layout: x and the output with any strides of unit last stride (a (B, H, T, D) tensor transposed to
(B, T, H, D) works without a copy); one program per (token, block of heads) holding the token's
cos / sin halves once for all its heads.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import FLOAT_DTYPES, cast, check_device, launch, upcast

__all__ = ["RopeFunction", "rope", "rope_fwd", "rope_", "rope_fwd_fake", "rope_inplace_fake", "inplace_ok",
           "out_dtype", "supported"]

TILE = 4096  # (heads × half) elements per program
WARPS = 4


# ========================================================================================= kernels
@triton.jit
def _rope_kernel(X, COS, SIN, OUT, T, H, stride_xb, stride_xt, stride_xh, stride_cb, stride_ct, stride_sb,
                 stride_st, stride_ob, stride_ot, stride_oh, HALF: tl.constexpr, TAIL: tl.constexpr,
                 BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_TAIL: tl.constexpr,
                 BACKWARD: tl.constexpr, COPY_TAIL: tl.constexpr, UPCAST: tl.constexpr):
    """The rotation (or its transpose, BACKWARD) of BLOCK_H heads of one token; the tail copied when
    COPY_TAIL (out of place). OUT may be X (in place: every element is read before it is written,
    by the program that writes it)."""
    tok = tl.program_id(0)
    b = (tok // T).to(tl.int64)
    t = (tok % T).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    k = tl.arange(0, BLOCK_HALF)
    k_ok = k < HALF
    mask = (heads < H)[:, None] & k_ok[None, :]
    c_row = COS + b * stride_cb + t * stride_ct
    s_row = SIN + b * stride_sb + t * stride_st
    c1 = tl.load(c_row + k, mask=k_ok, other=0.0).to(tl.float32)[None, :]
    c2 = tl.load(c_row + HALF + k, mask=k_ok, other=0.0).to(tl.float32)[None, :]
    s1 = tl.load(s_row + k, mask=k_ok, other=0.0).to(tl.float32)[None, :]
    s2 = tl.load(s_row + HALF + k, mask=k_ok, other=0.0).to(tl.float32)[None, :]
    h64 = heads.to(tl.int64)[:, None]
    x_ptr = X + b * stride_xb + t * stride_xt + h64 * stride_xh
    o_ptr = OUT + b * stride_ob + t * stride_ot + h64 * stride_oh
    x1 = tl.load(x_ptr + k[None, :], mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + HALF + k[None, :], mask=mask, other=0.0).to(tl.float32)
    if BACKWARD:
        o1 = x1 * c1 + x2 * s2
        o2 = x2 * c2 - x1 * s1
    else:
        o1 = x1 * c1 - x2 * s1
        o2 = x2 * c2 + x1 * s2
    tl.store(o_ptr + k[None, :], cast(o1, OUT.dtype.element_ty, UPCAST=UPCAST), mask=mask)
    tl.store(o_ptr + HALF + k[None, :], cast(o2, OUT.dtype.element_ty, UPCAST=UPCAST), mask=mask)
    if COPY_TAIL:
        j = tl.arange(0, BLOCK_TAIL)
        tmask = (heads < H)[:, None] & (j < TAIL)[None, :]
        tail = tl.load(x_ptr + 2 * HALF + j[None, :], mask=tmask, other=0.0)
        tl.store(o_ptr + 2 * HALF + j[None, :], tail.to(OUT.dtype.element_ty), mask=tmask)


# ======================================================================================== launchers
def out_dtype(x, cos, sin) -> torch.dtype:
    return torch.promote_types(torch.promote_types(x.dtype, cos.dtype), sin.dtype)


def supported(x, cos, sin) -> bool:
    """x (B, T, H, D), cos / sin (B or 1, T, d) of one shape, d even and <= D, fp16 / bf16 / fp32, one
    device, no gradient for cos / sin."""
    if not all(isinstance(t, torch.Tensor) and t.dtype in FLOAT_DTYPES for t in (x, cos, sin)):
        return False
    if x.dim() != 4 or cos.dim() != 3 or cos.shape != sin.shape or cos.requires_grad or sin.requires_grad:
        return False
    B, T, H, D = x.shape
    d = cos.shape[-1]
    return cos.shape[0] in (1, B) and cos.shape[1] == T and d % 2 == 0 and 0 < d <= D and \
        x.device == cos.device == sin.device


def inplace_ok(x) -> bool:
    """Whether autograd allows overwriting x: not a leaf that requires grad, and not a view of a
    custom Function's output (its base then does not require grad; autograd forbids in-place there)."""
    if not (torch.is_grad_enabled() and x.requires_grad):
        return True
    return not x.is_leaf and (x._base is None or x._base.requires_grad)


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def _launch(x, cos, sin, out, backward: bool, copy_tail: bool) -> None:
    B, T, H, D = x.shape
    if x.numel() == 0:
        return
    cos, sin = _unit_last(cos), _unit_last(sin)
    d = cos.shape[-1]
    half, tail = d // 2, D - d
    block_half = triton.next_power_of_2(half)
    block_h = min(triton.next_power_of_2(H), max(1, TILE // block_half))
    launch(_rope_kernel, (B * T, triton.cdiv(H, block_h)), x, cos, sin, out, T, H, x.stride(0), x.stride(1),
           x.stride(2), cos.stride(0) if cos.shape[0] > 1 else 0, cos.stride(1),
           sin.stride(0) if sin.shape[0] > 1 else 0, sin.stride(1), out.stride(0), out.stride(1), out.stride(2),
           HALF=half, TAIL=tail, BLOCK_H=block_h, BLOCK_HALF=block_half,
           BLOCK_TAIL=triton.next_power_of_2(max(tail, 1)), BACKWARD=backward, COPY_TAIL=copy_tail and tail > 0,
           UPCAST=upcast(out.dtype), num_warps=WARPS)


def rope_fwd_fake(x, cos, sin, backward, dtype):
    return x.new_empty(x.shape, dtype=dtype)


def rope_fwd(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool,
             dtype: torch.dtype) -> torch.Tensor:
    """A new contiguous (B, T, H, D) tensor of ``dtype``: the rotation of x (its transpose when
    ``backward``: dx from dy)."""
    check_device(x.device, "rope")
    x = _unit_last(x)
    out = rope_fwd_fake(x, cos, sin, backward, dtype)
    _launch(x, cos, sin, out, backward, True)
    return out


def rope_inplace_fake(x, cos, sin):
    return None


def rope_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Rotate x (unit last stride, already of the output dtype) in place."""
    check_device(x.device, "rope")
    if x.stride(-1) != 1 and x.shape[-1] != 1:
        raise ValueError("rope_: x needs a unit last stride to be rotated in place")
    _launch(x, cos, sin, x, False, False)


# ================================================================================ autograd Function
class RopeFunction(torch.autograd.Function):
    """y = rope(x, cos, sin), in place into x when ``inplace`` (the caller checked ``inplace_ok``);
    saves cos and sin only. ``fwd`` / ``fwd_`` are the launchers (the Triton adapter swaps in their
    ``torch.library`` custom ops, which have fake implementations)."""

    fwd = staticmethod(rope_fwd)
    fwd_ = staticmethod(rope_)

    @staticmethod
    def forward(ctx, x, cos, sin, inplace):
        ctx.save_for_backward(cos, sin)
        ctx.x_dtype = x.dtype
        dt = out_dtype(x, cos, sin)
        if inplace and dt == x.dtype and (x.stride(-1) == 1 or x.shape[-1] == 1):
            RopeFunction.fwd_(x, cos, sin)
            ctx.mark_dirty(x)
            return x
        return RopeFunction.fwd(x, cos, sin, False, dt)

    @staticmethod
    def backward(ctx, dy):
        cos, sin = ctx.saved_tensors
        return RopeFunction.fwd(dy, cos, sin, True, ctx.x_dtype), None, None, None


# ========================================================================================== public
def rope(x, cos, sin, inplace=False):
    """The rotary embedding of x (B, T, H, D) by cos / sin (B or 1, T, d); ``inplace``: overwrite x
    when autograd allows it (``inplace_ok``), else a new tensor either way."""
    return RopeFunction.apply(x, cos, sin, bool(inplace) and inplace_ok(x))
