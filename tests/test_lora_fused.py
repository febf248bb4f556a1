"""Triton fused LoRA blocks (fastft/kernels/lora_fused.py): q/k/v projections of one x and the
gate/up projections of a SwiGLU MLP, forward and every gradient against the float64 reference given
the kernels' dropout masks (tests/lora_util.py), on CPU under TRITON_INTERPRET=1.
"""
import pytest
import torch
import torch.nn.functional as F

from fastft.kernels import _common
from fastft.kernels import lora as triton_lora
from fastft.kernels import lora_fused
from tests.lora_util import check_all, f32, lora_given_mask, make, run_three

pytestmark = pytest.mark.interpreter

DTYPES = [torch.float32, torch.float16]


# --------------------------------------------------------------------------------- fused variants
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p,bias", [(0.0, False), (0.2, True)])
def test_lora_qkv(device, dtype, p, bias):
    K, M = 96, 37
    gen = torch.Generator().manual_seed(2)
    shapes = [(96, 8), (40, 16), (40, 1)]  # q, k, v with GQA-like narrower k/v and different ranks
    x = torch.randn(M, K, generator=gen, dtype=torch.float64)
    Ws = [torch.randn(n, K, generator=gen, dtype=torch.float64) / K**0.5 for n, _ in shapes]
    As = [torch.randn(r, K, generator=gen, dtype=torch.float64) / K**0.5 for _, r in shapes]
    Bs = [torch.randn(n, r, generator=gen, dtype=torch.float64) for n, r in shapes]
    bs = [torch.randn(n, generator=gen, dtype=torch.float64) if bias else None for n, _ in shapes]
    ss = [0.5, 2.0, 1.0]
    g2 = torch.Generator().manual_seed(77)
    keeps = [triton_lora.dropout_mask(_common.draw_seed(g2), x.shape, p, device).cpu() if p else None for _ in shapes]

    def fn(impl, x, *ts):
        W3, A3, B3, b3 = ts[0:3], ts[3:6], ts[6:9], ts[9:12]
        if impl == "kernel":
            return lora_fused.lora_qkv(x, W3, A3, B3, ss, biases=b3, dropout_p=p, generator=torch.Generator().manual_seed(77))
        return [lora_given_mask(x, W, A, B, s, b, None if k is None else k.to(x.device), p)
                for W, A, B, s, b, k in zip(W3, A3, B3, ss, b3, keeps)]

    inputs = [x, *Ws, *As, *Bs, *bs]
    grads = [True, False, False, False] + [True] * 6 + [bias] * 3
    names = ["dX", "dWq", "dWk", "dWv", "dAq", "dAk", "dAv", "dBq", "dBk", "dBv", "dbq", "dbk", "dbv"]
    check_all(run_three(fn, inputs, grads, dtype, device), names)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p,bias,full_ft", [(0.0, False, False), (0.25, True, False), (0.0, True, True)])
def test_lora_gate_up_swiglu(device, dtype, p, bias, full_ft):
    K, N, M = 40, 96, 53
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(3, M, K, generator=gen, dtype=torch.float64)
    Ws = [torch.randn(N, K, generator=gen, dtype=torch.float64) / K**0.5 for _ in range(2)]
    As = [torch.randn(r, K, generator=gen, dtype=torch.float64) / K**0.5 for r in (8, 16)]
    Bs = [torch.randn(N, r, generator=gen, dtype=torch.float64) / r**0.5 for r in (8, 16)]
    bs = [torch.randn(N, generator=gen, dtype=torch.float64) if bias else None for _ in range(2)]
    ss = [0.5, 1.5]
    g2 = torch.Generator().manual_seed(5)
    keeps = [triton_lora.dropout_mask(_common.draw_seed(g2), x.shape, p, device).cpu() if p else None for _ in range(2)]

    def fn(impl, x, Wg, Wu, Ag, Au, Bg, Bu, bg, bu):
        if impl == "kernel":
            return lora_fused.lora_gate_up_swiglu(x, [Wg, Wu], [Ag, Au], [Bg, Bu], ss, biases=[bg, bu], dropout_p=p,
                                         generator=torch.Generator().manual_seed(5))
        kd = [None if k is None else k.to(x.device) for k in keeps]
        g = lora_given_mask(x, Wg, Ag, Bg, ss[0], bg, kd[0], p)
        up = lora_given_mask(x, Wu, Au, Bu, ss[1], bu, kd[1], p)
        return F.silu(g) * up

    grads = [True, full_ft, full_ft, True, True, True, True, bias, bias]
    check_all(run_three(fn, [x, *Ws, *As, *Bs, *bs], grads, dtype, device),
               ["dX", "dWg", "dWu", "dAg", "dAu", "dBg", "dBu", "dbg", "dbu"])


def test_lora_qkv_rejects_four_projections(device):
    x, W, A, B, b = (f32(t, device) for t in make(4, 40, 24, 8, bias=True))
    with pytest.raises(ValueError, match="1-3 projections"):
        lora_fused.lora_qkv(x, [W] * 4, [A] * 4, [B] * 4, 1.0)


def test_empty_batch(device):
    x, W, A, B, b = (f32(t, device) for t in make(1, 40, 24, 8, bias=True))
    ys = lora_fused.lora_qkv(x[:0], [W, W], [A, A], [B, B], 1.0)
    assert [t.shape for t in ys] == [(0, 24), (0, 24)]
    h = lora_fused.lora_gate_up_swiglu(x[:0], [W, W], [A, A], [B, B], 1.0)
    assert h.shape == (0, 24)
