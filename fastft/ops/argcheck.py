"""Argument checks shared by the public ops and their backends (imports torch and fastft.errors only).

Every public op in ``fastft.ops`` checks its arguments here before dispatching, whatever backend
runs it: shapes, dtypes, devices and ranges (dropout probabilities in [0, 1), eps >= 0, block sizes,
token ids against the vocabulary). A bad argument is a ``fastft.errors.UsageError`` (a ValueError)
or ``ArgumentTypeError`` (a TypeError) naming the op and the argument. Only Python-level metadata is
read, plus values of small CPU tensors (targets, cu_seqlens); nothing synchronises a GPU.
"""
from __future__ import annotations

import math

import torch

from ..errors import ArgumentTypeError, UsageError


def _tensor(op, name, t, *, floating=False, dim=None):
    if not isinstance(t, torch.Tensor):
        raise ArgumentTypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if floating and not t.is_floating_point():
        raise ArgumentTypeError(f"{op}: {name} must be floating point, got {t.dtype}")
    if dim is not None and t.dim() not in ((dim,) if isinstance(dim, int) else dim):
        raise UsageError(f"{op}: {name} must be {dim}-D, got shape {tuple(t.shape)}")


def _same_device(op, **ts):
    devs = {n: t.device for n, t in ts.items() if isinstance(t, torch.Tensor)}
    if len(set(devs.values())) > 1:
        raise UsageError(f"{op}: tensors are on different devices ({', '.join(f'{n} {d}' for n, d in devs.items())})")


def check_probability(op, p):
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= float(p) < 1.0:
        raise UsageError(f"{op}: dropout_p must be in [0, 1), got {p!r}")


def _scale(op, scale):
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                              or not math.isfinite(scale)):
        raise UsageError(f"{op}: scale must be a finite number or None, got {scale!r}")


def check_attention_args(q, k, v, causal, scale, key_padding_mask, dropout_p) -> None:
    op = "attention"
    for n, t in (("q", q), ("k", k), ("v", v)):
        _tensor(op, n, t, floating=True, dim=4)
    if not (q.dtype == k.dtype == v.dtype):
        raise ArgumentTypeError(f"{op}: q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})")
    _same_device(op, q=q, k=k, v=v, key_padding_mask=key_padding_mask)
    if k.shape != v.shape or k.shape[0] != q.shape[0] or k.shape[3] != q.shape[3]:
        raise UsageError(f"{op}: q (B, Hq, T, D) and k, v (B, Hkv, S, D) disagree: q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        raise UsageError(f"{op}: query heads ({q.shape[1]}) must be a multiple of key/value heads ({k.shape[1]})")
    if not isinstance(causal, bool):
        raise ArgumentTypeError(f"{op}: causal must be a bool, got {causal!r}")
    if key_padding_mask is not None:
        _tensor(op, "key_padding_mask", key_padding_mask)
        if key_padding_mask.dtype != torch.bool or tuple(key_padding_mask.shape) != (q.shape[0], k.shape[2]):
            raise UsageError(f"{op}: key_padding_mask must be bool (B, S) = ({q.shape[0]}, {k.shape[2]}), got "
                             f"{key_padding_mask.dtype} {tuple(key_padding_mask.shape)}")
    _scale(op, scale)
    check_probability(op, dropout_p)


def check_attention_varlen_args(q, k, v, cu_seqlens, max_seqlen, causal, scale, dropout_p) -> None:
    op = "attention_varlen"
    for n, t in (("q", q), ("k", k), ("v", v)):
        _tensor(op, n, t, floating=True, dim=3)
    if not (q.dtype == k.dtype == v.dtype):
        raise ArgumentTypeError(f"{op}: q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})")
    _same_device(op, q=q, k=k, v=v, cu_seqlens=cu_seqlens)
    if k.shape != v.shape or k.shape[0] != q.shape[0] or k.shape[2] != q.shape[2]:
        raise UsageError(f"{op}: q (total, Hq, D) and k, v (total, Hkv, D) disagree: {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        raise UsageError(f"{op}: query heads ({q.shape[1]}) must be a multiple of key/value heads ({k.shape[1]})")
    _tensor(op, "cu_seqlens", cu_seqlens, dim=1)
    if cu_seqlens.dtype not in (torch.int32, torch.int64) or cu_seqlens.numel() < 2:
        raise UsageError(f"{op}: cu_seqlens must be int32/int64 with at least 2 entries, got {cu_seqlens.dtype} "
                         f"{tuple(cu_seqlens.shape)}")
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int) or max_seqlen < 0:
        raise UsageError(f"{op}: max_seqlen must be an int >= 0, got {max_seqlen!r}")
    cu = cu_seqlens
    lens = cu[1:] - cu[:-1]
    check_async((cu[0] == 0) & (cu[-1] == q.shape[0]) & (lens >= 0).all(),
                f"{op}: cu_seqlens must start at 0, be non-decreasing and end at total={q.shape[0]}")
    check_async((lens <= max_seqlen).all(), f"{op}: a document is longer than max_seqlen={max_seqlen}")
    if not isinstance(causal, bool):
        raise ArgumentTypeError(f"{op}: causal must be a bool, got {causal!r}")
    _scale(op, scale)
    check_probability(op, dropout_p)


def _weight_shape(weight):
    return tuple(weight.shape) if hasattr(weight, "shape") else None


def check_lora_linear_args(x, weight, lora_A, lora_B, scaling, bias, dropout_p) -> None:
    op = "lora_linear"
    _tensor(op, "x", x, floating=True)
    _tensor(op, "lora_A", lora_A, floating=True, dim=2)
    _tensor(op, "lora_B", lora_B, floating=True, dim=2)
    ws = _weight_shape(weight)
    if ws is None or len(ws) != 2:
        raise UsageError(f"{op}: weight must be (out, in) (a tensor or a quantized weight), got {ws}")
    out_f, in_f = ws
    if x.dim() < 1 or x.shape[-1] != in_f:
        raise UsageError(f"{op}: x's last dim ({x.shape[-1] if x.dim() else None}) must equal in_features {in_f}")
    r = lora_A.shape[0]
    if tuple(lora_A.shape) != (r, in_f) or tuple(lora_B.shape) != (out_f, r):
        raise UsageError(f"{op}: lora_A must be (r, {in_f}) and lora_B ({out_f}, r), got {tuple(lora_A.shape)} and "
                         f"{tuple(lora_B.shape)}")
    if bias is not None:
        _tensor(op, "bias", bias, floating=True)
        if tuple(bias.shape) != (out_f,):
            raise UsageError(f"{op}: bias must be ({out_f},), got {tuple(bias.shape)}")
    if isinstance(scaling, torch.Tensor):
        if scaling.numel() != 1:
            raise UsageError(f"{op}: scaling must be a number, got a tensor of shape {tuple(scaling.shape)}")
    elif isinstance(scaling, bool) or not isinstance(scaling, (int, float)) or not math.isfinite(scaling):
        raise UsageError(f"{op}: scaling must be a finite number, got {scaling!r}")
    _same_device(op, x=x, lora_A=lora_A, lora_B=lora_B, bias=bias,
                 weight=weight if isinstance(weight, torch.Tensor) else None)
    check_probability(op, dropout_p)


def _eps(op, eps):
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (eps >= 0 and math.isfinite(eps)):
        raise UsageError(f"{op}: eps must be a finite number >= 0, got {eps!r}")


def _row_params(op, x, **params):
    """Each given parameter (None allowed) is a floating (x.shape[-1],) tensor on x's device."""
    for name, p in params.items():
        if p is None:
            continue
        _tensor(op, name, p, floating=True)
        if x.dim() < 1 or tuple(p.shape) != (x.shape[-1],):
            raise UsageError(f"{op}: {name} must be ({x.shape[-1] if x.dim() else '?'},) (x's last dim), got "
                             f"{tuple(p.shape)}")
    _same_device(op, x=x, **params)


def check_rms_norm_args(x, weight, eps, residual=None, op="rms_norm") -> None:
    _tensor(op, "x", x, floating=True)
    _tensor(op, "weight", weight, floating=True)
    if residual is not None:
        _tensor(op, "residual", residual, floating=True)
        if residual.shape != x.shape:
            raise UsageError(f"{op}: residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
        _same_device(op, x=x, residual=residual)
    _row_params(op, x, weight=weight)
    _eps(op, eps)


def check_layer_norm_args(x, weight, bias, eps) -> None:
    op = "layer_norm"
    _tensor(op, "x", x, floating=True)
    _row_params(op, x, weight=weight, bias=bias)
    _eps(op, eps)


def check_gelu_args(x) -> None:
    _tensor("gelu", "x", x, floating=True)


def check_rope_args(x, cos, sin) -> None:
    op = "rope"
    _tensor(op, "x", x, floating=True, dim=4)
    _tensor(op, "cos", cos, floating=True, dim=3)
    _tensor(op, "sin", sin, floating=True, dim=3)
    B, T, _H, D = x.shape
    if cos.shape != sin.shape or cos.shape[0] not in (1, B) or cos.shape[1] != T:
        raise UsageError(f"{op}: cos and sin must be (B, T, d) = ({B}, {T}, d), got {tuple(cos.shape)} and "
                         f"{tuple(sin.shape)}")
    d = cos.shape[-1]
    if d > D or d % 2:
        raise UsageError(f"{op}: the rotary dim d={d} must be even and <= head dim {D}")
    _same_device(op, x=x, cos=cos, sin=sin)


def check_silu_mul_args(g, u) -> None:
    op = "silu_mul"
    _tensor(op, "g", g, floating=True)
    _tensor(op, "u", u, floating=True)
    if g.shape != u.shape:
        raise UsageError(f"{op}: g and u must have the same shape, got {tuple(g.shape)} and {tuple(u.shape)}")
    _same_device(op, g=g, u=u)


def check_cross_entropy_grad_args(logits, targets, ignore_index) -> None:
    op = "cross_entropy_grad_"
    _tensor(op, "logits", logits, floating=True, dim=2)
    _tensor(op, "targets", targets, dim=1)
    if targets.dtype not in (torch.int64, torch.int32) or targets.shape[0] != logits.shape[0]:
        raise UsageError(f"{op}: targets must be int64/int32 ({logits.shape[0]},), got {targets.dtype} "
                         f"{tuple(targets.shape)}")
    _same_device(op, logits=logits, targets=targets)
    check_targets(targets, logits.shape[1], ignore_index, op)


def check_quant_args(op, w, size_name, size) -> None:
    _tensor(op, "w", w, floating=True)
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise UsageError(f"{op}: {size_name} must be a positive int, got {size!r}")


def check_dequant_dtype(op, dtype) -> None:
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ArgumentTypeError(f"{op}: dtype must be a floating-point torch.dtype, got {dtype!r}")


def check_linear_cross_entropy_args(hidden, weight, labels, ignore_index, reduction, bias, *,
                                    weight_on_host: bool = False) -> None:
    """``weight_on_host``: the weight (and bias) may live on another device than hidden (the streamed
    LM head, ``fastft.ops.loss.streamed_linear_cross_entropy``); they must agree with each other."""
    op = "linear_cross_entropy"
    _tensor(op, "hidden", hidden)
    _tensor(op, "weight", weight)
    _tensor(op, "labels", labels)
    if reduction not in ("mean", "sum"):
        raise UsageError(f"linear_cross_entropy: reduction must be 'mean' or 'sum', got {reduction!r}")
    if weight.dim() != 2 or hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise UsageError(f"linear_cross_entropy: hidden (..., H) and weight (V, H) must agree on H, got "
                         f"{tuple(hidden.shape)} and {tuple(weight.shape)}")
    if labels.shape != hidden.shape[:-1]:
        raise UsageError(f"linear_cross_entropy: labels {tuple(labels.shape)} must have hidden's leading shape "
                         f"{tuple(hidden.shape[:-1])}")
    if labels.dtype not in (torch.int64, torch.int32):
        raise UsageError(f"linear_cross_entropy: labels must be int64 or int32, got {labels.dtype}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise UsageError(f"linear_cross_entropy: bias must be ({weight.shape[0]},), got {tuple(bias.shape)}")
    if not hidden.is_floating_point() or not weight.is_floating_point():
        raise ArgumentTypeError(f"linear_cross_entropy: hidden and weight must be floating point, got {hidden.dtype} "
                                f"and {weight.dtype}")
    if weight_on_host:
        _same_device(op, hidden=hidden, labels=labels)
        _same_device(op, weight=weight, bias=bias)
    else:
        _same_device(op, hidden=hidden, weight=weight, labels=labels, bias=bias)
    check_targets(labels, weight.shape[0], ignore_index, op)


def check_async(ok: torch.Tensor, msg: str, exc: type = UsageError) -> None:
    """Raise ``exc(msg)`` unless the 0-d bool tensor ``ok`` is true, without reading it on the host:
    on the CPU ``torch._assert_async`` checks at once (the RuntimeError becomes ``exc``); on a device
    it queues the check there (a device-side assert), so a training step never waits for it. The same
    code runs on every device, so the CPU tests of "no synchronisation" cover the CUDA path."""
    if ok.device.type == "cpu":
        try:
            torch._assert_async(ok, msg)
        except RuntimeError:
            raise exc(msg) from None
    else:
        torch._assert_async(ok, msg)


def host_value(t: torch.Tensor):
    """The Python value of a 0-d / one-element CPU tensor; None for a tensor on another device, whose
    value reading would synchronise the host with the device (callers then take the device path)."""
    if t.device.type != "cpu":
        return None
    return t.item()


def check_targets(targets: torch.Tensor, vocab: int, ignore_index: int, op: str) -> None:
    """Every target is ``ignore_index`` or in [0, vocab): a UsageError on CPU, an asynchronous device
    assert elsewhere (no host synchronisation in a GPU training step)."""
    ok = ((targets == ignore_index) | ((targets >= 0) & (targets < vocab))).all()
    check_async(ok, f"{op}: a target is outside [0, {vocab}) and is not ignore_index {ignore_index}")


__all__ = ["check_async", "check_linear_cross_entropy_args", "check_targets", "host_value", "check_attention_args",
           "check_attention_varlen_args", "check_lora_linear_args", "check_rms_norm_args", "check_layer_norm_args",
           "check_gelu_args", "check_rope_args", "check_silu_mul_args", "check_cross_entropy_grad_args",
           "check_quant_args", "check_dequant_dtype", "check_probability"]
