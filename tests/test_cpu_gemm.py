"""fastft.ops.cpu_gemm: fp32 CPU matmuls through oneDNN, checked against float64 gold within 2x
torch's own fp32 error (the BLAS's), on awkward shapes and strides; the fallbacks; and that the
LoRA / QLoRA / chunked-loss paths that use it still match gold."""
import importlib

import pytest
import torch
import torch.nn.functional as F

from fastft.ops import cpu_gemm
from utils import assert_close_to_gold

SHAPES = [(1, 1, 1), (1, 7, 3), (5, 576, 16), (17, 16, 577), (33, 65, 129), (256, 300, 70)]


@pytest.mark.parametrize("M,K,N", SHAPES)
@pytest.mark.parametrize("layout", ["contiguous", "a transposed view", "w transposed view"])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("route", ["default", "onednn always"])
def test_linear_matches_gold(M, K, N, layout, with_bias, route, monkeypatch):
    if route == "onednn always":  # the small shapes too, which by default go to BLAS
        monkeypatch.setattr(cpu_gemm, "MIN_MACS", 0)
    g = torch.Generator().manual_seed(M * 1000 + K * 10 + N)
    a = torch.randn(M, K, generator=g)
    w = torch.randn(N, K, generator=g)
    b = torch.randn(N, generator=g) if with_bias else None
    if layout == "a transposed view":
        a = a.t().contiguous().t()
    elif layout == "w transposed view":
        w = w.t().contiguous().t()
    gold = F.linear(a.double(), w.double(), None if b is None else b.double())
    out = cpu_gemm.linear(a, w, b)
    assert out.dtype == torch.float32
    assert_close_to_gold(out, gold, F.linear(a, w, b), name="linear")
    gold_mm = a.double() @ w.double().t()
    assert_close_to_gold(cpu_gemm.mm(a, w.t()), gold_mm, a @ w.t(), name="mm")


def test_onednn_is_used_here():
    # This machine's torch has oneDNN: the reroute must be live, not silently off.
    assert torch.backends.mkldnn.is_available()
    assert cpu_gemm.uses_onednn()


def test_small_problems_go_to_blas(monkeypatch):
    assert cpu_gemm.uses_onednn()
    calls = []
    real = cpu_gemm._LP
    monkeypatch.setattr(cpu_gemm, "_LP", lambda *a: calls.append(a[0].shape) or real(*a))
    cpu_gemm.linear(torch.randn(8, 64), torch.randn(64, 64))  # 32K multiply-adds: oneDNN's set-up dominates
    assert calls == []
    cpu_gemm.linear(torch.randn(16, 576), torch.randn(576, 576))
    assert calls == [(16, 576)]


def test_fallbacks(monkeypatch):
    a, w = torch.randn(4, 8, dtype=torch.float64), torch.randn(3, 8, dtype=torch.float64)
    torch.testing.assert_close(cpu_gemm.linear(a, w), F.linear(a, w), rtol=0, atol=0)  # float64: torch
    e = torch.empty(0, 8)
    assert cpu_gemm.linear(e, torch.randn(3, 8)).shape == (0, 3)
    assert cpu_gemm.linear(torch.randn(2, 0), torch.randn(3, 0)).abs().sum() == 0
    # With a graph being recorded the oneDNN op (no autograd formula) is not taken: grads flow.
    x = torch.randn(5, 8, requires_grad=True)
    w = torch.randn(3, 8)
    cpu_gemm.linear(x, w).sum().backward()
    torch.testing.assert_close(x.grad, w.sum(0).expand(5, 8))


def test_env_turns_it_off(monkeypatch):
    monkeypatch.setenv("FASTFT_CPU_GEMM", "blas")
    mod = importlib.reload(cpu_gemm)
    try:
        assert not mod.uses_onednn()
        a, w = torch.randn(6, 9), torch.randn(4, 9)
        torch.testing.assert_close(mod.linear(a, w), F.linear(a, w), rtol=0, atol=0)
    finally:
        monkeypatch.delenv("FASTFT_CPU_GEMM")
        importlib.reload(cpu_gemm)
    assert cpu_gemm.uses_onednn()


@pytest.mark.parametrize("kind", ["dense", "nf4", "int4"])
def test_lora_fp32_paths_use_it_and_match_gold(kind, monkeypatch):
    """The fused LoRA node (forward base GEMM, backward dX) and the cpp quant-matmul at training
    sizes go through cpu_gemm in fp32; results match the float64 gold of the same composition."""
    from fastft import ops
    from fastft.ops import dispatch

    calls = []
    real = cpu_gemm.linear
    monkeypatch.setattr(cpu_gemm, "linear", lambda *a, **k: calls.append(1) or real(*a, **k))
    g = torch.Generator().manual_seed(3)
    M, K, N, r = 40, 96, 90, 4  # K: a multiple of the int4 group (32), not of the NF4 block (64)
    x = torch.randn(M, K, generator=g)
    W = torch.randn(N, K, generator=g) * 0.1
    A, B = torch.randn(r, K, generator=g) * 0.1, torch.randn(N, r, generator=g) * 0.1
    weight = {"dense": lambda: W, "nf4": lambda: ops.nf4_quantize(W, 64, True),
              "int4": lambda: ops.int4_quantize(W, 32, False)}[kind]()
    Wd = W if kind == "dense" else weight.dequantize(torch.float32)
    gy = torch.randn(M, N, generator=g)

    def run(dt, fn):
        xs, As, Bs = (t.to(dt).clone().requires_grad_(True) for t in (x, A, B))
        y = fn(xs, As, Bs)
        y.backward(gy.to(dt))
        return [y, xs.grad, As.grad, Bs.grad]

    def gold(xs, As, Bs):
        return F.linear(xs, Wd.double()) + F.linear(F.linear(xs, As), Bs) * 2.0

    ours = run(torch.float32, lambda xs, As, Bs: dispatch.get_impl("lora_linear", xs.device)(
        xs, weight, As, Bs, 2.0))
    assert calls, "the fp32 LoRA path did not reach cpu_gemm"
    ref = run(torch.float64, gold)
    lowp = run(torch.float32, lambda xs, As, Bs: F.linear(xs, Wd) + F.linear(F.linear(xs, As), Bs) * 2.0)
    for name, o, gd, lp in zip(["y", "dx", "dA", "dB"], ours, ref, lowp):
        assert_close_to_gold(o, gd, lp, name=name)


def test_chunked_lm_loss_fp32_matches_gold():
    from fastft.ops.loss import chunked_causal_lm_loss

    g = torch.Generator().manual_seed(5)
    B, T, H, V = 2, 9, 24, 37
    h = torch.randn(B, T, H, generator=g)
    w = torch.randn(V, H, generator=g) * 0.3
    labels = torch.randint(0, V, (B, T), generator=g)

    def run(dt, fn):
        hs = h.to(dt).clone().requires_grad_(True)
        loss = fn(hs)
        loss.backward()
        return [loss.detach(), hs.grad]

    def plain(hs):
        z = F.linear(hs, w.to(hs.dtype))[:, :-1].reshape(-1, V)
        return F.cross_entropy(z, labels[:, 1:].reshape(-1))

    ours = run(torch.float32, lambda hs: chunked_causal_lm_loss(hs, w, labels, chunk_rows=5))
    ref, lowp = run(torch.float64, plain), run(torch.float32, plain)
    for name, o, gd, lp in zip(["loss", "dh"], ours, ref, lowp):
        assert_close_to_gold(o, gd, lp, name=name)


@pytest.mark.parametrize("with_bias", [False, True])
def test_frozen_linear_matches_gold_and_falls_back(with_bias):
    from fastft.ops.lean import FrozenLinearFunction, frozen_linear

    g = torch.Generator().manual_seed(11)
    x = torch.randn(2, 13, 37, generator=g)
    w = torch.randn(29, 37, generator=g)
    b = torch.randn(29, generator=g).requires_grad_(True) if with_bias else None
    gy = torch.randn(2, 13, 29, generator=g)

    def run(fn, dt):
        xs = x.to(dt).clone().requires_grad_(True)
        bs = None if b is None else b.detach().to(dt).clone().requires_grad_(True)
        y = fn(xs, w.to(dt), bs)
        y.backward(gy.to(dt))
        return [y, xs.grad] + ([bs.grad] if bs is not None else [])

    ours, gold, lowp = run(frozen_linear, torch.float32), run(F.linear, torch.float64), run(F.linear, torch.float32)
    for name, o, gd, lp in zip(["y", "dx", "db"], ours, gold, lowp):
        assert_close_to_gold(o, gd, lp, name=name)
    # The node is the fastft one for a frozen fp32 weight; a trainable weight or autocast: F.linear.
    assert type(frozen_linear(x.requires_grad_(True), w).grad_fn).__name__ == FrozenLinearFunction.__name__ + "Backward"
    wt = w.clone().requires_grad_(True)
    frozen_linear(x, wt).sum().backward()
    torch.testing.assert_close(wt.grad, x.detach().reshape(-1, 37).sum(0).expand(29, 37))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert frozen_linear(x, w).dtype == torch.bfloat16
