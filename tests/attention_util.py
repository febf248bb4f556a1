"""Oracles of the attention kernel tests (tests/test_attention.py, tests/test_attention_decode.py).

Tolerances are derived (tests/utils.py): the kernel's error must be at most 2x the error PyTorch
makes doing the same math entirely in the kernel's dtype (scores, softmax, P @ V and their
autograd, as flash-attention's tests do with ``upcast=False``), plus a small floor.
"""
import math

import torch

from fastft.ops import reference
from tests.utils import FLOOR, assert_close_to_gold


def attn_math(q, k, v, *, causal, scale=None, kpm=None, keep=None, dropout_p=0.0):
    """Attention done by PyTorch entirely in q's dtype (float64 = gold; fp16/fp32 = torch's own
    low-precision error). ``keep`` (B, Hq, T, S) bool applies dropout with a given mask."""
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    g = Hq // Hkv
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    allowed = reference.attention_mask_bias(T, S, causal=causal, key_padding_mask=kpm, device=q.device)
    # finfo.min, not -inf: fully masked rows then give a finite softmax (zeroed below) and finite grads
    s = s.masked_fill(~allowed, torch.finfo(s.dtype).min)
    p = torch.softmax(s, dim=-1)
    p = torch.where(allowed, p, torch.zeros((), dtype=p.dtype, device=p.device))
    if keep is not None:
        p = p * keep.to(p.dtype) / (1.0 - dropout_p)
    return torch.matmul(p, v)


def _grads(fn, inputs, dout):
    inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*inputs)
    out.backward(dout.to(out.dtype))
    return [out.detach()] + [t.grad for t in inputs]


def check_against_gold(run, math_fn, inputs, dout, names=("out", "dq", "dk", "dv")):
    """run(*inputs) -> kernel output; math_fn(*inputs) -> torch math in inputs' dtype."""
    got = _grads(run, inputs, dout)
    gold = _grads(math_fn, [t.double() for t in inputs], dout.double())
    lowp = _grads(math_fn, inputs, dout)
    errs = {}
    for name, a, b, c in zip(names, got, gold, lowp):
        floor = None
        if name != "out" and b.numel() and b.abs().max() == 0:
            # A gradient that is exactly 0 by cancellation (e.g. S = 1: softmax is identically 1, so
            # dS = P (dP - Delta) = dP - dO.O): the floor's scale is that of the cancelled terms.
            terms = max(dout.abs().max().item() * max(t.abs().max().item() for t in inputs) ** 2, 1.0)
            floor = FLOOR[a.dtype] * terms
        errs[name] = assert_close_to_gold(a, b, c, name=name, floor=floor)
    return got, errs


def make_kpm(B, S, kind, device):
    m = torch.ones(B, S, dtype=torch.bool, device=device)
    if kind is None:
        return None
    n = max(S // 3, 1)
    if kind in ("left", "both"):
        m[0, :n] = False
    if kind in ("right", "both"):
        m[-1, S - n:] = False
    if kind == "empty":  # one batch row with no real key at all
        m[-1, :] = False
        m[0, :n] = False
    return m


def make_qkv(B, Hq, Hkv, T, S, D, dtype, device):
    q = torch.randn(B, Hq, T, D, device=device).to(dtype)
    k = torch.randn(B, Hkv, S, D, device=device).to(dtype)
    v = torch.randn(B, Hkv, S, D, device=device).to(dtype)
    return q, k, v


def parametrize_dtype(metafunc):
    """The attention tests' ``dtype``: fp16 and fp32, and bf16 only where it can actually be checked
    (on a GPU: the interpreter upcasts bf16 dots), so no skipped parametrizations on CPU."""
    if "dtype" in metafunc.fixturenames:
        dts = [torch.float16, torch.float32]
        if metafunc.config.getoption("--device") == "cuda":
            dts.insert(1, torch.bfloat16)
        metafunc.parametrize("dtype", dts, ids=lambda d: str(d).replace("torch.", ""))
