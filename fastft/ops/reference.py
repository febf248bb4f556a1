"""Pure-PyTorch reference implementations of every fastft op.

These are the test oracle (run them in float64) and the last-resort fallback on any device. They
favour clarity over speed, but keep the op contracts exactly (shapes, masking conventions, dtypes).
Quantization references live in ``reference_quant.py`` and are re-exported here.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .dispatch import register


def _check_attention_inputs(q, k, v, key_padding_mask=None):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"attention expects q (B, Hq, T, D) and k, v (B, Hkv, S, D); got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    B, Hq, T, D = q.shape
    if k.shape != v.shape:
        raise ValueError(f"attention: k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape")
    if k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"attention: k/v batch or head dim {tuple(k.shape)} does not match q {tuple(q.shape)}")
    Hkv = k.shape[1]
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"attention: query heads ({Hq}) must be a multiple of key/value heads ({Hkv})")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"attention: q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})")
    if not (q.device == k.device == v.device):
        raise ValueError(f"attention: q, k, v are on different devices ({q.device}, {k.device}, {v.device})")
    if key_padding_mask is not None:
        S = k.shape[2]
        if key_padding_mask.shape != (B, S):
            raise ValueError(
                f"attention: key_padding_mask must be (B, S) = ({B}, {S}), got {tuple(key_padding_mask.shape)}"
            )


def attention_mask_bias(T: int, S: int, *, causal: bool, key_padding_mask=None, device=None):
    """Boolean (B or 1, 1, T, S) mask, True where query i may attend key j.

    Causal masking is aligned bottom-right: query i sees keys j <= i + (S - T), as when decoding
    against a KV cache. ``key_padding_mask`` is (B, S) with True for real tokens.
    """
    allowed = torch.ones(1, 1, T, S, dtype=torch.bool, device=device)
    if causal:
        i = torch.arange(T, device=device)[:, None]
        j = torch.arange(S, device=device)[None, :]
        allowed = allowed & (j <= i + (S - T))[None, None]
    if key_padding_mask is not None:
        allowed = allowed & key_padding_mask.to(torch.bool)[:, None, None, :]
    return allowed


@register("attention", "reference")
def attention(q, k, v, *, causal, scale=None, key_padding_mask=None, dropout_p=0.0, generator=None):
    """softmax(q kᵀ · scale + mask) v, GQA by head-group mapping; rows with no visible key give 0.

    q (B, Hq, T, D), k/v (B, Hkv, S, D) -> (B, Hq, T, D) in q's dtype. Half inputs are computed in
    fp32; float64 stays float64.
    """
    _check_attention_inputs(q, k, v, key_padding_mask)
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    g = Hq // Hkv
    qf = q.to(cdt).view(B, Hkv, g, T, D)
    kf, vf = k.to(cdt)[:, :, None], v.to(cdt)[:, :, None]  # (B, Hkv, 1, S, D)
    scores = torch.matmul(qf, kf.transpose(-1, -2)) * scale  # (B, Hkv, g, T, S)
    allowed = attention_mask_bias(T, S, causal=causal, key_padding_mask=key_padding_mask, device=q.device)
    allowed = allowed[:, :, None]  # (B|1, 1, 1, T, S)
    scores = scores.masked_fill(~allowed, float("-inf"))
    p = torch.softmax(scores, dim=-1)
    p = torch.where(allowed, p, torch.zeros((), dtype=cdt, device=q.device))  # fully-masked rows -> 0
    if dropout_p > 0.0:
        keep = torch.rand(p.shape, generator=generator, device=p.device, dtype=cdt) >= dropout_p
        p = p * keep / (1.0 - dropout_p)
    out = torch.matmul(p, vf)  # (B, Hkv, g, T, D)
    return out.reshape(B, Hq, T, D).to(q.dtype)


@register("attention_varlen", "reference")
def attention_varlen(q, k, v, cu_seqlens, max_seqlen, *, causal, scale=None, dropout_p=0.0, generator=None):
    """Attention over packed documents: q (total, Hq, D), k/v (total, Hkv, D).

    ``cu_seqlens`` (n_docs + 1,) int32/int64 holds cumulative document lengths starting at 0;
    documents never attend to each other; zero-length documents are allowed.
    """
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(
            f"attention_varlen expects q (total, Hq, D), k/v (total, Hkv, D); got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"attention_varlen: cu_seqlens must be 1-D with at least 2 entries, got {tuple(cu_seqlens.shape)}")
    cu = cu_seqlens.tolist()
    if cu[0] != 0 or cu[-1] != q.shape[0] or any(b < a for a, b in zip(cu, cu[1:])):
        raise ValueError(f"attention_varlen: cu_seqlens {cu} must start at 0, be non-decreasing and end at total={q.shape[0]}")
    if max(b - a for a, b in zip(cu, cu[1:])) > max_seqlen:
        raise ValueError(f"attention_varlen: a document is longer than max_seqlen={max_seqlen}")
    pieces = []
    for a, b in zip(cu, cu[1:]):  # documents are contiguous and cover [0, total)
        if b == a:
            continue
        qi, ki, vi = (t[a:b].transpose(0, 1)[None] for t in (q, k, v))  # (1, H, L, D)
        oi = attention(qi, ki, vi, causal=causal, scale=scale, dropout_p=dropout_p, generator=generator)
        pieces.append(oi[0].transpose(0, 1))
    return torch.cat(pieces, dim=0) if pieces else torch.zeros_like(q)


@register("lora_linear", "reference")
def lora_linear(x, weight, lora_A, lora_B, scaling, bias=None, dropout_p=0.0, generator=None):
    """y = x Wᵀ + b + s · (drop(x) Aᵀ) Bᵀ, W dense or quantized, A (r, in), B (out, r).

    The low-rank product goes through the rank-r side, never forming W + s·BA. Dropout (PEFT's
    semantics) applies to the LoRA input only. Under autocast F.linear chooses the compute dtype.
    """
    if isinstance(weight, torch.Tensor):
        base = F.linear(x, weight, bias)
    else:
        from fastft import ops

        base = ops.quant_matmul(x, weight, bias)
    xd = x
    if dropout_p > 0.0:
        if generator is None:
            xd = F.dropout(x, dropout_p, training=True)
        else:
            keep = torch.rand(x.shape, generator=generator, device=x.device) >= dropout_p
            xd = x * keep.to(x.dtype) / (1.0 - dropout_p)
    dt = x.dtype if not torch.is_autocast_enabled(x.device.type) else None
    A = lora_A if dt is None else lora_A.to(dt)
    B = lora_B if dt is None else lora_B.to(dt)
    low = F.linear(F.linear(xd, A), B)
    return base + low * scaling


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


@register("rope", "reference")
def rope(x, cos, sin):
    """Rotary embedding (HF's rotate_half form): x (B, T, H, D); cos / sin (B, T, d) with d <= D
    (partial rotary leaves the tail unrotated)."""
    cos, sin = cos[:, :, None], sin[:, :, None]
    d = cos.shape[-1]
    if d == x.shape[-1]:
        return x * cos + _rotate_half(x) * sin
    xr, xp = x[..., :d], x[..., d:]
    return torch.cat((xr * cos + _rotate_half(xr) * sin, xp), dim=-1)


@register("rms_norm", "reference")
def rms_norm(x, weight, eps):
    """y = w · x / sqrt(mean(x²) + eps), normalised in fp32 and cast back before the weight (as HF)."""
    dt = x.dtype
    xf = x.to(torch.float32)
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(dt)


class SiluMul(torch.autograd.Function):
    """silu(g) · u saving only g and u (autograd on the plain expression also keeps silu(g)).

    Backward: du = dy · silu(g), dg = silu'(g) · (dy · u), through the same aten ops autograd uses
    (``silu_backward``), so the gradients round identically.
    """

    @staticmethod
    def forward(ctx, g, u):
        ctx.save_for_backward(g, u)
        return F.silu(g) * u

    @staticmethod
    def backward(ctx, dy):
        g, u = ctx.saved_tensors
        dg = torch.ops.aten.silu_backward(dy * u, g) if ctx.needs_input_grad[0] else None
        du = dy * F.silu(g) if ctx.needs_input_grad[1] else None
        return dg, du


@register("silu_mul", "reference")
def silu_mul(g, u):
    """SwiGLU's silu(g) · u; under autograd saves only g and u (``SiluMul``)."""
    if torch.is_grad_enabled() and (g.requires_grad or u.requires_grad) and g.dtype == u.dtype:
        return SiluMul.apply(g, u)
    return F.silu(g) * u


@register("linear_cross_entropy", "reference")
def linear_cross_entropy(hidden, weight, labels, *, ignore_index=-100, reduction="mean", bias=None, chunk_rows=None):
    """F.cross_entropy(F.linear(hidden, weight, bias)) in at least fp32, the full logits under autograd."""
    logits = F.linear(hidden, weight, bias)
    logits = logits.reshape(-1, logits.shape[-1]).to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits, labels.reshape(-1).to(device=logits.device, dtype=torch.int64),
                           ignore_index=ignore_index, reduction=reduction)


@register("cross_entropy_grad_", "reference")
def cross_entropy_grad_(logits, targets, ignore_index=-100):
    """Per-row cross-entropy of ``logits`` (n, V) against ``targets`` (n,), gradient in place.

    Returns the (n,) losses lse(z) − z[target] (0 where target == ignore_index), computed in at
    least fp32 (float64 stays float64), and overwrites ``logits`` with d(Σ losses)/d logits =
    softmax(z) − onehot(target) (zero rows where ignored), rounded once to the logits' dtype.
    """
    if logits.dim() != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(f"cross_entropy_grad_: logits must be (n, V) and targets (n,), got {tuple(logits.shape)} "
                         f"and {tuple(targets.shape)}")
    cdt = torch.promote_types(logits.dtype, torch.float32)
    z = logits.to(cdt)
    valid = targets != ignore_index
    tsafe = torch.where(valid, targets, torch.zeros_like(targets))
    in_range = ((tsafe >= 0) & (tsafe < logits.shape[1])).all()
    msg = f"cross_entropy_grad_: a target is outside [0, {logits.shape[1]}) and is not ignore_index {ignore_index}"
    if logits.device.type == "cpu" and not torch._subclasses.fake_tensor.is_fake(logits):
        if not in_range:
            raise ValueError(msg)
    else:  # checked on the device, without a host synchronisation (fake tensors: no values to read)
        torch._assert_async(in_range, msg)
    lse = torch.logsumexp(z, dim=-1)
    zt = z.gather(1, tsafe[:, None])[:, 0]
    loss = torch.where(valid, lse - zt, torch.zeros_like(lse))
    z.sub_(lse[:, None]).exp_()  # softmax (in place on logits when they are already cdt)
    z.scatter_add_(1, tsafe[:, None], -valid[:, None].to(z.dtype))
    z.mul_(valid[:, None].to(z.dtype))
    if z.data_ptr() != logits.data_ptr():
        logits.copy_(z)
    return loss
