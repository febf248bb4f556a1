"""The reference ops against independent formulations (torch SDPA, explicit loops) in float64."""

import pytest
import torch
import torch.nn.functional as F

from fastft import ops


def _sdpa_gold(q, k, v, causal, kpm=None):
    B, Hq, T, D = q.shape
    S = k.shape[2]
    g = Hq // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    mask = torch.ones(B, 1, T, S, dtype=torch.bool)
    if causal:
        mask &= torch.ones(T, S, dtype=torch.bool).tril(S - T)
    if kpm is not None:
        mask &= kpm[:, None, None, :]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return torch.where(mask.any(-1, keepdim=True), out, torch.zeros_like(out))


@pytest.mark.parametrize("T,S", [(1, 1), (5, 7), (17, 17), (1, 9)])
@pytest.mark.parametrize("Hq,Hkv", [(2, 2), (6, 2), (8, 1)])
@pytest.mark.parametrize("causal", [True, False])
def test_attention_matches_sdpa(T, S, Hq, Hkv, causal):
    q = torch.randn(2, Hq, T, 40, dtype=torch.float64)
    k = torch.randn(2, Hkv, S, 40, dtype=torch.float64)
    v = torch.randn(2, Hkv, S, 40, dtype=torch.float64)
    kpm = torch.ones(2, S, dtype=torch.bool)
    kpm[0, : S // 3] = False  # left padding in one row
    kpm[1, S - S // 3 :] = False  # right padding in the other
    out = ops.attention(q, k, v, causal=causal, key_padding_mask=kpm)
    torch.testing.assert_close(out, _sdpa_gold(q, k, v, causal, kpm), rtol=1e-12, atol=1e-12)


def test_attention_varlen_equals_per_document():
    lens = [3, 0, 5, 1]
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32)
    total = sum(lens)
    q = torch.randn(total, 4, 16, dtype=torch.float64)
    k = torch.randn(total, 2, 16, dtype=torch.float64)
    v = torch.randn(total, 2, 16, dtype=torch.float64)
    out = ops.attention_varlen(q, k, v, cu, max(lens), causal=True)
    for a, b in zip(cu.tolist(), cu.tolist()[1:]):
        if b > a:
            exp = _sdpa_gold(*(t[a:b].transpose(0, 1)[None] for t in (q, k, v)), True)[0].transpose(0, 1)
            torch.testing.assert_close(out[a:b], exp, rtol=1e-12, atol=1e-12)


def test_attention_bad_inputs():
    q = torch.randn(1, 3, 4, 8)
    k = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match="multiple"):
        ops.attention(q, k, k, causal=False)
    with pytest.raises(ValueError, match="key_padding_mask"):
        ops.attention(q, q, q, causal=False, key_padding_mask=torch.ones(1, 5, dtype=torch.bool))


@pytest.mark.parametrize("M,K,N,r", [(1, 3, 5, 1), (7, 40, 33, 8)])
def test_lora_linear_reference_formula(M, K, N, r):
    x = torch.randn(M, K, dtype=torch.float64, requires_grad=True)
    W = torch.randn(N, K, dtype=torch.float64)
    A = torch.randn(r, K, dtype=torch.float64, requires_grad=True)
    B = torch.randn(N, r, dtype=torch.float64, requires_grad=True)
    b = torch.randn(N, dtype=torch.float64)
    y = ops.lora_linear(x, W, A, B, 0.5, bias=b)
    exp = x @ (W + 0.5 * B @ A).T + b
    torch.testing.assert_close(y, exp, rtol=1e-12, atol=1e-12)


def test_backend_env(monkeypatch):
    monkeypatch.setenv("FASTFT_BACKEND", "reference")
    assert ops.backend_for("attention", torch.device("cpu")) == "reference"
    monkeypatch.setenv("FASTFT_BACKEND", "bogus")
    with pytest.raises(ValueError, match="FASTFT_BACKEND"):
        ops.backend_for("attention", torch.device("cpu"))
