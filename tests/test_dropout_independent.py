"""Dropout masks checked against a generator written here from the published algorithm (issue 19,
item 8), not the kernels' own helper: Philox-4x32-10 (Salmon et al., SC'11, "Parallel random numbers:
as easy as 1, 2, 3"; multipliers 0xD2511F53 / 0xCD9E8D57, Weyl key bumps 0x9E3779B9 / 0xBB67AE85),
keyed by the 64-bit seed (low word k0, high word k1), counter (offset_lo, offset_hi, 0, 0), first
output word mapped to [0, 1) as Triton's ``tl.rand`` documents (int32 view, negatives folded with
``~x``, times 4.6566127342e-10). An element is kept when that uniform is >= p; the counter of element
(m, k) of an (M, K) matrix is m·K + k (the kernels' documented layout). The fused LoRA and attention
kernels (Triton under the interpreter) must then equal the float64 gold given *this* mask.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

M32 = np.uint64(0xFFFFFFFF)


def philox4x32_10(seed: int, counters: np.ndarray) -> np.ndarray:
    """First 32-bit output word of Philox-4x32-10 for 64-bit counters (vectorised, numpy uint64)."""
    c0 = counters & M32
    c1 = counters >> np.uint64(32)
    c2 = np.zeros_like(c0)
    c3 = np.zeros_like(c0)
    k0, k1 = np.uint64(seed & 0xFFFFFFFF), np.uint64((seed >> 32) & 0xFFFFFFFF)
    A, B = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
    for _ in range(10):
        pa, pb = A * c0, B * c2  # exact: 32x32 -> 64 bits
        c0, c1, c2, c3 = ((pb >> np.uint64(32)) ^ c1 ^ k0) & M32, pb & M32, ((pa >> np.uint64(32)) ^ c3 ^ k1) & M32, pa & M32
        k0, k1 = (k0 + np.uint64(0x9E3779B9)) & M32, (k1 + np.uint64(0xBB67AE85)) & M32
    return c0


def uniform(seed: int, counters: np.ndarray) -> np.ndarray:
    x = philox4x32_10(seed, counters).astype(np.uint32).view(np.int32).astype(np.int64)
    x = np.where(x < 0, ~x, x)
    return (x.astype(np.float32) * np.float32(4.6566127342e-10)).astype(np.float32)


def keep_mask(seed: int, rows: int, cols: int, p: float) -> torch.Tensor:
    counters = (np.arange(rows, dtype=np.uint64)[:, None] * np.uint64(cols) + np.arange(cols, dtype=np.uint64)[None])
    return torch.from_numpy(uniform(seed, counters) >= np.float32(p))


def test_philox_known_answer():
    # Random123's published known-answer vector for philox4x32-10 (kat_vectors): counter and key all
    # zero -> first word 0x6627e8d5. Checks this generator before it judges the kernels'.
    assert int(philox4x32_10(0, np.zeros(1, dtype=np.uint64))[0]) == 0x6627E8D5


@pytest.mark.parametrize("seed", [0, 1, 12345, 2**31 - 2, 2**40 + 7])
@pytest.mark.parametrize("shape,p", [((3, 37), 0.1), ((1, 130), 0.5), ((70, 9), 0.9)])
def test_lora_and_attention_mask_helpers_match_independent_philox(seed, shape, p):
    from fastft.kernels import _common

    got = _common.keep_mask(seed, shape[0], shape[1], p, "cpu")
    want = keep_mask(seed, *shape, p)
    assert torch.equal(got, want), f"{(got != want).sum().item()} of {got.numel()} flags differ"
    assert 0 < want.float().mean().item() < 1 or min(shape) == 1


def test_lora_kernel_dropout_equals_gold_with_independent_mask():
    from fastft.kernels import _common
    from fastft.kernels import lora as triton_lora

    torch.manual_seed(0)
    x, W = torch.randn(5, 33), torch.randn(20, 33) * 0.2
    A, Bm, b = torch.randn(4, 33) * 0.2, torch.randn(20, 4) * 0.2, torch.randn(20)
    p, s = 0.3, 2.0
    out = triton_lora.lora_linear(x, W, A, Bm, s, bias=b, dropout_p=p, generator=torch.Generator().manual_seed(7))
    seed = _common.draw_seed(torch.Generator().manual_seed(7))
    keep = keep_mask(seed, 5, 33, p).double()
    xd = x.double()
    gold = xd @ W.double().T + b.double() + s * ((xd * keep / (1 - p)) @ A.double().T) @ Bm.double().T
    assert (out.double() - gold).abs().max().item() <= 1e-5 * max(1.0, gold.abs().max().item())
    nodrop = xd @ W.double().T + b.double() + s * (xd @ A.double().T) @ Bm.double().T
    assert (out.double() - nodrop).abs().max().item() > 1e-3  # dropout really applied


def test_attention_kernel_dropout_equals_gold_with_independent_mask():
    from fastft.kernels import _common
    from fastft.kernels import attention as A

    torch.manual_seed(0)
    B, H, T, S, D, p = 1, 2, 5, 7, 16, 0.25
    q, k, v = torch.randn(B, H, T, D), torch.randn(B, H, S, D), torch.randn(B, H, S, D)
    out = A.attention(q, k, v, causal=False, dropout_p=p, generator=torch.Generator().manual_seed(3))
    seed = _common.draw_seed(torch.Generator().manual_seed(3))
    keep = keep_mask(seed, B * H * T, S, p).reshape(B, H, T, S).double()
    prob = torch.softmax(q.double() @ k.double().transpose(-1, -2) / math.sqrt(D), -1)
    gold = (prob * keep / (1 - p)) @ v.double()
    assert (out.double() - gold).abs().max().item() <= 1e-5 * max(1.0, gold.abs().max().item())
