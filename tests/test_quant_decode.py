"""Triton 4-bit decode GEMM (fastft/kernels/quant_decode.py): the split plan, the in-kernel split-K
reduction and its counters, the NF4 pair table, which calls take the kernel, and the LoRA layer
over a 4-bit base at decode shapes (one kernel on CUDA), against float64 with derived tolerances.

On CPU everything runs under TRITON_INTERPRET=1 (tests/conftest.py) on small shapes.
"""
import pytest
import torch

from fastft.kernels import _common, quant_decode
from fastft.kernels import quant_matmul as qmm
from fastft.ops import dispatch
from fastft.ops import reference_quant as R
from fastft.ops import triton_backend as tb
from fastft.quant import NF4Weight
from tests.utils import assert_close_to_gold

pytestmark = [pytest.mark.interpreter, pytest.mark.usefixtures("triton_usable")]


WEIGHTS = {
    "nf4dq-40x128": ((40, 128), lambda w: R.nf4_quantize(w, 64, True)),  # aligned, double quant
    "int4sym-200x128-g64": ((200, 128), lambda w: R.int4_quantize(w, 64, True)),
}


@pytest.mark.parametrize("M", [1, 16])
@pytest.mark.parametrize("split_k", [1, 2, 3, 8])
def test_decode_split_k(M, split_k, device):
    """The decode path splits K across programs; every split count gives the same-quality result,
    and the automatic choice does split for a small-M, long-K problem."""
    N, K = 40, 384
    qw = R.nf4_quantize(torch.randn(N, K, device=device), 64, True)
    x = torch.randn(M, K, device=device, dtype=torch.float16)
    bias = torch.randn(N, device=device, dtype=torch.float16)
    y = qmm.quant_matmul(x, *tb.raw(qw), bias, split_k=split_k)
    w = R.nf4_dequantize(qw, torch.float32)
    assert_close_to_gold(y, x.double() @ w.double().T + bias.double(), x @ w.half().T + bias)
    # Deterministic: the partial sums are reduced in split order (the counter only elects which
    # program reduces).
    assert torch.equal(y, qmm.quant_matmul(x, *tb.raw(qw), bias, split_k=split_k))


def test_decode_plan_covers_k(device):
    dev = torch.device(device)
    for N, K, qblock in [(40, 384, 64), (4096, 4096, 64), (40, 64, 64), (14336, 4096, 32), (8, 14336, 128)]:
        bn, bk, split, k_split = quant_decode.decode_plan(1, N, K, qblock, dev)
        assert qblock % bk == 0 and k_split % bk == 0
        assert (split - 1) * k_split < K <= split * k_split  # every split has work, together all of K
    assert quant_decode.decode_plan(1, 40, 384, 64, dev)[2] > 1  # few N tiles: K is split
    # one wave of resident programs where one suffices (a half-empty second wave costs a full one)
    slots = quant_decode.DECODE_PROGRAMS_PER_SM * _common.num_sms(dev)
    for N, K in [(40, 384), (200, 1024), (96, 4096)]:
        bn, bk, split, _ = quant_decode.decode_plan(1, N, K, 64, dev)
        tiles = -(-N // bn)
        if tiles <= slots:
            assert tiles * split <= slots, (N, K, split)
    assert quant_decode.decode_plan(1, 40, 64, 64, dev, split_k=8)[2] == 64 // quant_decode.decode_plan(1, 40, 64, 64, dev)[1]


def test_decode_kernel_serves_aligned_half_precision(device):
    """M <= 16 with fp16 / bf16 activations on the aligned layout runs ``_quant_decode_kernel``;
    fp32 activations, the general layout and M > 16 run the tiled kernel."""
    aligned = R.nf4_quantize(torch.randn(40, 128, device=device), 64, True)
    general = R.nf4_quantize(torch.randn(40, 200, device=device), 64, True)
    for x, w, decode in [(torch.randn(3, 128, device=device, dtype=torch.bfloat16), aligned, True),
                         (torch.randn(16, 128, device=device, dtype=torch.float16), aligned, True),
                         (torch.randn(3, 128, device=device), aligned, False),
                         (torch.randn(3, 200, device=device, dtype=torch.float16), general, False),
                         (torch.randn(17, 128, device=device, dtype=torch.float16), aligned, False)]:
        with _common.count_launches() as launches:
            tb.quant_matmul(x, w)
        assert launches["_quant_decode_kernel"] == int(decode), (tuple(x.shape), x.dtype)
        assert launches["_quant_matmul_fwd_kernel"] == int(not decode), (tuple(x.shape), x.dtype)


def test_decode_eligible_and_cuda_default_routes_decode(device):
    aligned = R.nf4_quantize(torch.randn(40, 128, device=device), 64, True)
    general = R.nf4_quantize(torch.randn(40, 200, device=device), 64, True)
    h = torch.randn(2, 3, 128, device=device, dtype=torch.bfloat16)
    assert tb.decode_eligible(h, aligned)
    assert not tb.decode_eligible(h.float(), aligned)
    assert not tb.decode_eligible(torch.randn(17, 128, device=device, dtype=torch.half), aligned)
    assert not tb.decode_eligible(torch.randn(2, 200, device=device, dtype=torch.half), general)
    assert not tb.decode_eligible(torch.randn(0, 128, device=device, dtype=torch.half), aligned)
    # The torch backend (the CUDA default of quant_matmul) hands CUDA decode shapes to the kernel.
    with _common.count_launches() as launches:
        y = dispatch.impl("quant_matmul", "torch")(h, aligned)
    assert launches["_quant_decode_kernel"] == (1 if device == "cuda" else 0)
    w = R.nf4_dequantize(aligned, torch.float32)
    h2 = h.reshape(-1, 128)
    assert_close_to_gold(y.reshape(6, 40), h2.double() @ w.double().T, h2 @ w.to(torch.bfloat16).T)


def test_decode_split_counters_return_to_zero(device):
    """The in-kernel split-K reduction leaves its counters at 0, so the next launch starts clean."""
    qw = R.int4_quantize(torch.randn(200, 256, device=device), 32, False)
    x = torch.randn(2, 256, device=device, dtype=torch.float16)
    y = qmm.quant_matmul(x, *tb.raw(qw), split_k=4)
    assert quant_decode.decode_plan(2, 200, 256, 32, torch.device(device), 4)[2] == 4
    cnt = quant_decode.split_counters(torch.device(device), 1)
    assert int(cnt.abs().sum()) == 0
    assert torch.equal(y, qmm.quant_matmul(x, *tb.raw(qw), split_k=4))
    w = R.int4_dequantize(qw, torch.float32)
    assert_close_to_gold(y, x.double() @ w.double().T, x @ w.half().T)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_nf4_pair_table(dtype, device):
    """Entry b packs the codebook values of b's two nibbles (high nibble in the low half), each as
    the bits of its rounding to ``dtype``; cached per quant_map tensor, rebuilt after an in-place
    change."""
    qmap = R.nf4_quantize(torch.randn(8, 64, device=device), 64, False).quant_map.clone()
    t = quant_decode.nf4_pair_table(qmap, dtype)
    assert t.dtype == torch.int32 and t.numel() == 256
    bits = qmap.to(dtype).view(torch.int16).to(torch.int32) & 0xFFFF
    for b in (0, 7, 0x7F, 0x80, 0xA5, 0xFF):
        assert int(t[b]) & 0xFFFF == int(bits[b >> 4])
        assert (int(t[b]) >> 16) & 0xFFFF == int(bits[b & 15])
    assert quant_decode.nf4_pair_table(qmap, dtype) is t  # cached
    qmap[3] = 0.5
    t2 = quant_decode.nf4_pair_table(qmap, dtype)
    assert t2 is not t and (int(t2[0x30]) & 0xFFFF) == int(torch.tensor(0.5, dtype=dtype).view(torch.int16)) & 0xFFFF


@pytest.mark.parametrize("wname", ["nf4dq-40x128", "int4sym-200x128-g64"])
def test_torch_backend_lora_decode_is_one_kernel_on_cuda(wname, monkeypatch, device):
    """The CUDA default LoRA node (torch backend) over a 4-bit base at decode shapes adds the
    low-rank term in the quant kernel's epilogue (on CUDA; elsewhere it keeps its GEMM + addmm);
    forward and all gradients against float64 either way."""
    (N, K), make = WEIGHTS[wname]
    qw = make(torch.randn(N, K, device=device) * 0.05)
    fused = []
    real = tb.quant_matmul_lora  # what the torch backend calls for the fused decode step
    monkeypatch.setattr(tb, "quant_matmul_lora", lambda *a, **k: fused.append(1) or real(*a, **k))
    x = torch.randn(2, K, device=device, dtype=torch.float16, requires_grad=True)
    A = (torch.randn(8, K, device=device) * 0.1).requires_grad_()  # fp32 adapters, PEFT's default
    B = (torch.randn(N, 8, device=device) * 0.1).requires_grad_()
    y = dispatch.impl("lora_linear", "torch")(x, qw, A, B, 0.5)
    dy = torch.randn_like(y)
    y.backward(dy)
    assert bool(fused) == (device == "cuda")
    w = R.nf4_dequantize(qw, torch.float32) if isinstance(qw, NF4Weight) else R.int4_dequantize(qw, torch.float32)
    xd, Ad, Bd, dyd = x.detach().double(), A.detach().double(), B.detach().double(), dy.double()
    gold = xd @ w.double().T + 0.5 * (xd @ Ad.T) @ Bd.T
    xh, Ah, Bh = x.detach(), A.detach().half(), B.detach().half()
    assert_close_to_gold(y, gold, xh @ w.half().T + 0.5 * (xh @ Ah.T) @ Bh.T, name="y")
    gold_dx = dyd @ w.double() + 0.5 * (dyd @ Bd) @ Ad
    assert_close_to_gold(x.grad, gold_dx, dy @ w.half() + 0.5 * (dy @ Bh) @ Ah, name="dX")
    gold_dA = 0.5 * (dyd @ Bd).T @ xd
    assert_close_to_gold(A.grad, gold_dA, (0.5 * (dy @ Bh).T @ xh).float(), name="dA")
