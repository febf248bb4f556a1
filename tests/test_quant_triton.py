"""Triton 4-bit kernels (fastft/kernels/quant.py) against the reference ops and bitsandbytes.

Three layers (STYLE.md): quantize bytes / dequantize values exactly equal to the reference
(fastft/ops/reference_quant.py) and to bitsandbytes' NF4; fused quant-matmul forward, dX and dbias
against float64 ``x @ W_deqᵀ`` (W_deq from the reference dequantizer) with tolerances derived from
PyTorch's own error in the same dtype; then the decode split-K path, errors, and the dispatcher.

On CPU everything runs under TRITON_INTERPRET=1 (tests/conftest.py) on small shapes. bf16 runs on
CPU too: the kernels upcast bf16 dots and round bf16 casts themselves when interpreting.
"""
import importlib
import os

import pytest
import torch

from fastft import ops
from fastft.ops import dispatch
from fastft.ops import reference_quant as R
from fastft.quant import Int4Weight, NF4Weight
from fastft.quant.codebooks import dynamic_map
from tests.utils import assert_close_to_gold

pytestmark = pytest.mark.interpreter

Q = importlib.import_module("fastft.kernels.quant")
@pytest.fixture(autouse=True)
def _triton_usable(device):
    if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.fail("CPU kernel tests need TRITON_INTERPRET=1 (set by tests/conftest.py)")
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("--device cuda given but no CUDA device")


def _bnb():
    return importlib.import_module("bitsandbytes.functional")
def _nf4_fields_equal(a: NF4Weight, b: NF4Weight):
    assert torch.equal(a.data, b.data), "packed 4-bit codes differ"
    assert a.absmax.dtype == b.absmax.dtype
    assert torch.equal(a.absmax, b.absmax), "absmax differs"
    assert a.double_quant == b.double_quant
    if a.double_quant:
        assert a.offset == b.offset
        assert torch.equal(a.nested_absmax, b.nested_absmax)
        assert torch.equal(a.nested_quant_map, b.nested_quant_map)
    assert torch.equal(a.quant_map, b.quant_map)
    assert tuple(a.shape) == tuple(b.shape) and a.blocksize == b.blocksize and a.dtype == b.dtype


# ============================================================================= NF4 quantize
NF4_SHAPES = [(7, 9), (40, 200), (3, 1025), (96, 64), (1, 1)]  # (300, 301): in the bitsandbytes tests


@pytest.mark.parametrize("shape", NF4_SHAPES)
@pytest.mark.parametrize("blocksize", [32, 64, 256])
@pytest.mark.parametrize("double_quant", [False, True])
def test_nf4_quantize_equals_reference(shape, blocksize, double_quant, device):
    w = torch.randn(shape, device=device) * 0.02
    _nf4_fields_equal(Q.nf4_quantize(w, blocksize, double_quant), R.nf4_quantize(w, blocksize, double_quant))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_nf4_quantize_input_dtypes(dtype, device):
    w = torch.randn(33, 70, device=device).to(dtype)
    _nf4_fields_equal(Q.nf4_quantize(w, 64, True), R.nf4_quantize(w, 64, True))


def _edge_weight(device):
    """All-zero blocks, huge and tiny magnitudes, subnormals, and values exactly on midpoints."""
    from fastft.quant.codebooks import nf4_midpoints

    w = torch.randn(12, 64)
    w[0] = 0.0  # an all-zero block
    w[1] *= 1e30  # huge
    w[2] = torch.full((64,), 3.0e38) * torch.sign(torch.randn(64))  # near fp32 max
    w[3] *= 1e-30  # tiny
    w[4] = torch.randn(64) * 1e-40  # subnormal block (1e-38 floor of the reciprocal)
    w[5, :] = 0.0
    w[5, 0] = 1.0  # absmax 1: the other values hit midpoints exactly -> ties go low
    w[5, 1:16] = nf4_midpoints()
    w[5, 16:31] = -nf4_midpoints()
    w[6, :32] = 0.0  # half-zero block (blocksize 32 gives a zero block)
    w[7] = torch.linspace(-1, 1, 64)  # every code
    w[8, :] = -2.5  # constant negative block
    return w.to(device)


@pytest.mark.parametrize("blocksize", [32, 64])
@pytest.mark.parametrize("double_quant", [False, True])
def test_nf4_quantize_edge_values(blocksize, double_quant, device):
    w = _edge_weight(device)
    a = Q.nf4_quantize(w, blocksize, double_quant)
    _nf4_fields_equal(a, R.nf4_quantize(w, blocksize, double_quant))
    # Exact zero blocks stay exact zeros after the round trip.
    assert torch.equal(Q.nf4_dequantize(a, torch.float32)[0], torch.zeros(64, device=device))


@pytest.mark.parametrize("shape", [(7, 9), (40, 200), (300, 301), (12, 64)])
def test_nf4_codes_and_absmax_equal_bitsandbytes(shape):
    """4-bit codes and fp32 absmax are bitsandbytes' (CPU) bytes, odd sizes and edge values too."""
    F = _bnb()
    w = _edge_weight("cpu") if shape == (12, 64) else torch.randn(shape)
    ours = Q.nf4_quantize(w, 64, False)
    packed, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4")
    assert torch.equal(ours.data, packed)
    assert torch.equal(ours.absmax, state.absmax)


@pytest.mark.parametrize("shape", [(40, 200), (300, 301)])
def test_nf4_double_quant_vs_bitsandbytes(shape):
    """Double quant: same 4-bit codes, offset and nested absmax as bitsandbytes; the 8-bit codes are
    exactly nearest, so they differ from bitsandbytes' CPU lookup table only where the table misses
    the nearest code (DESIGN.md), and there ours is strictly nearer."""
    F = _bnb()
    w = torch.randn(shape)
    ours = Q.nf4_quantize(w, 64, True)
    packed, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    assert torch.equal(ours.data, packed)
    assert ours.offset == state.offset.item()
    assert torch.equal(ours.nested_absmax, state.state2.absmax)
    assert torch.equal(ours.nested_quant_map, state.state2.code)
    assert torch.equal(ours.nested_quant_map, dynamic_map(True))
    raw = Q.nf4_quantize_raw(w, 64, False)["absmax"]
    centered = (raw - ours.offset).double()
    g = torch.arange(raw.numel()) // 256
    scaled = (centered.float() * (1.0 / ours.nested_absmax[g])).clamp(-1, 1).double()
    code = ours.nested_quant_map.double()
    diff = ours.absmax != state.absmax
    assert diff.float().mean() < 0.02, f"{int(diff.sum())} of {diff.numel()} 8-bit codes differ"
    err_ours = (code[ours.absmax.long()] - scaled).abs()
    err_bnb = (code[state.absmax.long()] - scaled).abs()
    assert (err_ours <= err_bnb).all(), "an 8-bit code is farther from the value than bitsandbytes'"
    if shape != (300, 301):
        return  # bitsandbytes compiles its CPU dequantizer per shape (seconds): check one shape
    # Given bitsandbytes' own (LUT) codes, our fused dequantization reproduces bitsandbytes'.
    theirs = NF4Weight(packed, w.shape, 64, torch.float32, state.code.float(), state.absmax,
                       nested_absmax=state.state2.absmax, nested_quant_map=state.state2.code,
                       offset=state.offset.item())
    assert torch.equal(Q.nf4_dequantize(theirs, torch.float32), F.dequantize_4bit(packed, state))


# =========================================================================== NF4 dequantize
@pytest.mark.parametrize("shape", [(7, 9), (40, 200), (3, 1025), (64, 128)])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_nf4_dequantize_equals_reference(shape, double_quant, dtype, device):
    q = R.nf4_quantize(torch.randn(shape, device=device), 64, double_quant)
    out = Q.nf4_dequantize(q, dtype)
    assert out.dtype == dtype and tuple(out.shape) == shape
    assert torch.equal(out, R.nf4_dequantize(q, dtype))


def test_nf4_dequantize_large_blocksize_and_many_nested_groups(device):
    # 1100 blocks of 32: five nested groups of 256, the last one partial.
    q = R.nf4_quantize(torch.randn(110, 320, device=device), 32, True)
    assert q.nested_absmax.numel() == 5
    assert torch.equal(Q.nf4_dequantize(q, torch.float32), R.nf4_dequantize(q, torch.float32))
    q = R.nf4_quantize(torch.randn(5, 4096 + 3, device=device), 4096, True)
    assert torch.equal(Q.nf4_dequantize(q, torch.bfloat16), R.nf4_dequantize(q, torch.bfloat16))


# ==================================================================================== int4
INT4_CASES = [((3, 128), 32), ((40, 256), 64), ((17, 384), 128), ((96, 96), 32)]


def _int4_weight(shape, group, device):
    w = torch.randn(shape)
    w[0, :group] = 0.0  # all-zero group: scale 0, exact zeros back
    w[1, :group] = torch.rand(group) + 0.1  # all-positive group: lo clamps to 0
    w[-1, -group:] = -(torch.rand(group) + 0.1)  # all-negative group
    w[2, 5] = 40.0  # outlier
    w[2, group:2 * group] *= 1e-20  # tiny magnitudes
    return w.to(device)


@pytest.mark.parametrize("shape,group", INT4_CASES)
@pytest.mark.parametrize("symmetric", [False, True])
def test_int4_quantize_equals_reference(shape, group, symmetric, device):
    w = _int4_weight(shape, group, device)
    a, b = Q.int4_quantize(w, group, symmetric), R.int4_quantize(w, group, symmetric)
    assert isinstance(a, Int4Weight) and a.symmetric == symmetric
    assert torch.equal(a.data, b.data)
    assert torch.equal(a.scales, b.scales)
    assert (a.zeros is None) == symmetric
    if not symmetric:
        assert torch.equal(a.zeros, b.zeros)
    # Round trip of the packing: the 4-bit codes unpack to round(w / scale + zero).
    codes = torch.stack((a.data >> 4, a.data & 0xF), -1).reshape(shape)
    assert int(codes.max()) <= 15
    deq = Q.int4_dequantize(a, torch.float32)
    assert torch.equal(deq[0, :group], torch.zeros(group, device=device))
    # Quantization error bound of the format: half a step per element (+ fp32 rounding).
    step = a.scales.repeat_interleave(group, dim=1)
    assert ((deq - w.float()).abs() <= 0.5 * step * (1 + 1e-5) + 1e-30).all()


@pytest.mark.parametrize("shape,group", INT4_CASES[:2])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_int4_dequantize_equals_reference(shape, group, symmetric, dtype, device):
    q = R.int4_quantize(_int4_weight(shape, group, device), group, symmetric)
    assert torch.equal(Q.int4_dequantize(q, dtype), R.int4_dequantize(q, dtype))


def test_int4_unsupported_group_size_falls_back_to_reference(device):
    w = torch.randn(4, 48, device=device)
    a, b = Q.int4_quantize(w, 16), R.int4_quantize(w, 16)
    assert torch.equal(a.data, b.data) and torch.equal(a.scales, b.scales)
    assert torch.equal(Q.int4_dequantize(a), R.int4_dequantize(b))


# ============================================================================ quant-matmul
# (name, (out, in), maker): aligned and general NF4 paths, both int4 flavours.
WEIGHTS = {
    "nf4dq-40x200": ((40, 200), lambda w: R.nf4_quantize(w, 64, True)),  # general path (200 % 64)
    "nf4-96x96-bs32": ((96, 96), lambda w: R.nf4_quantize(w, 32, False)),  # aligned
    "nf4dq-200x40": ((200, 40), lambda w: R.nf4_quantize(w, 64, True)),  # in < blocksize
    "nf4dq-40x128": ((40, 128), lambda w: R.nf4_quantize(w, 64, True)),  # aligned, double quant
    "int4-40x96-g32": ((40, 96), lambda w: R.int4_quantize(w, 32, False)),
    "int4sym-200x128-g64": ((200, 128), lambda w: R.int4_quantize(w, 64, True)),
}
# M and the leading shape of x: 1 and 3 (decode, split-K), 17 and 118 (tile edges).
LEADS = {1: (1,), 3: (3, 1), 17: (17,), 118: (2, 59)}


def _gold_check(x, qw, bias, dtype, y, dx, db, dy):
    w_deq = R.nf4_dequantize(qw, torch.float32) if isinstance(qw, NF4Weight) else R.int4_dequantize(qw, torch.float32)
    K = w_deq.shape[1]
    x2, dy2 = x.reshape(-1, K), dy.reshape(-1, w_deq.shape[0])
    gold = x2.double() @ w_deq.double().T + (bias.double() if bias is not None else 0)
    lowp = x2 @ w_deq.to(dtype).T + (bias if bias is not None else 0)
    assert y.dtype == dtype
    assert_close_to_gold(y.reshape(gold.shape), gold, lowp, name="y")
    gold_dx = dy2.double() @ w_deq.double()
    assert dx.dtype == dtype
    assert_close_to_gold(dx.reshape(gold_dx.shape), gold_dx, dy2 @ w_deq.to(dtype), name="dX")
    if bias is not None:
        assert_close_to_gold(db, dy2.double().sum(0), dy2.sum(0), name="dbias")


# bf16 at the two extremes of M only: the interpreter is slow, and bf16 shares every code path
# with fp16 except the dtype itself.
MM_CASES = [(M, dt) for M in LEADS for dt in (torch.float32, torch.float16)] + [(1, torch.bfloat16),
                                                                               (118, torch.bfloat16)]


@pytest.mark.parametrize("wname", list(WEIGHTS))
@pytest.mark.parametrize("M,dtype", MM_CASES)
def test_quant_matmul_fwd_bwd_vs_float64(wname, M, dtype, device):
    (N, K), make = WEIGHTS[wname]
    qw = make(torch.randn(N, K, device=device) * 0.05)
    x = torch.randn(*LEADS[M], K, device=device, dtype=dtype, requires_grad=True)
    bias = (torch.randn(N, device=device) * 0.1).to(dtype).requires_grad_() if M != 3 else None
    y = Q.quant_matmul(x, qw, bias)
    assert tuple(y.shape) == (*LEADS[M], N)
    dy = torch.randn_like(y)
    y.backward(dy)
    _gold_check(x.detach(), qw, None if bias is None else bias.detach(), dtype, y.detach(), x.grad,
                None if bias is None else bias.grad, dy)


LORA_CASES = [("nf4dq-40x128", 1, torch.float16, 16), ("nf4dq-40x128", 3, torch.bfloat16, 40),
              ("int4sym-200x128-g64", 16, torch.float16, 1), ("int4-40x96-g32", 2, torch.float32, 8),
              ("nf4dq-40x200", 3, torch.float16, 16), ("nf4-96x96-bs32", 118, torch.float16, 40),
              ("int4-40x96-g32", 17, torch.bfloat16, 16)]


@pytest.mark.parametrize("wname,M,dtype,r", LORA_CASES)
def test_quant_matmul_lora_epilogue_vs_float64(wname, M, dtype, r, device):
    """y = x W_deqᵀ + b + s·u Bᵀ in one kernel (decode and tiled kernels, split or not, r over
    several BLOCK_R chunks) against float64, within 2x torch's error for the same composition."""
    (N, K), make = WEIGHTS[wname]
    qw = make(torch.randn(N, K, device=device) * 0.05)
    x = torch.randn(M, K, device=device, dtype=dtype)
    u = torch.randn(M, r, device=device, dtype=dtype)
    B = (torch.randn(N, r, device=device) * 0.1).to(dtype)
    bias = (torch.randn(N, device=device) * 0.1).to(dtype)
    s = 0.75
    y = Q.quant_matmul_lora(x, qw, bias, u, B, s)
    w = R.nf4_dequantize(qw, torch.float32) if isinstance(qw, NF4Weight) else R.int4_dequantize(qw, torch.float32)
    gold = x.double() @ w.double().T + bias.double() + s * (u.double() @ B.double().T)
    lowp = x @ w.to(dtype).T + bias + s * (u @ B.T)
    assert y.dtype == dtype
    assert_close_to_gold(y, gold, lowp, name="y")


@pytest.mark.parametrize("wname", ["nf4dq-40x128", "int4sym-200x128-g64"])
def test_torch_backend_lora_decode_is_one_kernel_on_cuda(wname, monkeypatch, device):
    """The CUDA default LoRA node (torch backend) over a 4-bit base at decode shapes adds the
    low-rank term in the quant kernel's epilogue (on CUDA; elsewhere it keeps its GEMM + addmm);
    forward and all gradients against float64 either way."""
    (N, K), make = WEIGHTS[wname]
    qw = make(torch.randn(N, K, device=device) * 0.05)
    fused = []
    real = Q.quant_matmul_lora
    monkeypatch.setattr(Q, "quant_matmul_lora", lambda *a, **k: fused.append(1) or real(*a, **k))
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


def test_quant_matmul_lora_empty_batch(device):
    qw = R.nf4_quantize(torch.randn(40, 128, device=device), 64, True)
    y = Q.quant_matmul_lora(torch.randn(0, 128, device=device).half(), qw, None,
                            torch.randn(0, 8, device=device).half(), torch.randn(40, 8, device=device).half(), 1.0)
    assert tuple(y.shape) == (0, 40) and y.dtype == torch.float16


def test_quant_matmul_lora_rejects_mismatched_adapters(device):
    qw = R.nf4_quantize(torch.randn(40, 128, device=device), 64, True)
    x = torch.randn(3, 128, device=device, dtype=torch.float16)
    with pytest.raises(ValueError, match="do not fit"):
        Q.quant_matmul_lora(x, qw, None, torch.randn(2, 8, device=device).half(), torch.randn(40, 8, device=device).half(), 1.0)
    with pytest.raises(ValueError, match="do not fit"):
        Q.quant_matmul_lora(x, qw, None, torch.randn(3, 8, device=device).half(), torch.randn(41, 8, device=device).half(), 1.0)


def test_quant_matmul_saves_only_the_packed_weight(device):
    qw = R.nf4_quantize(torch.randn(96, 128, device=device), 64, True)
    x = torch.randn(40, 128, device=device, requires_grad=True)
    y = Q.quant_matmul(x, qw)
    saved = [t for t in y.grad_fn.saved_tensors if t is not None]
    # Nothing dequantized and no activation: only the weight's own packed tensors.
    assert sum(t.numel() * t.element_size() for t in saved) <= qw.nbytes
    for t in saved:
        assert any(t.data_ptr() == q.data_ptr() for q in (qw.data, qw.absmax, qw.nested_absmax,
                                                         qw.nested_quant_map, qw.quant_map))


def test_quant_matmul_output_can_be_updated_in_place(device):
    """The fused LoRA op adds its low-rank term onto quant_matmul's output in place."""
    qw = R.nf4_quantize(torch.randn(40, 64, device=device), 64, True)
    x = torch.randn(2, 3, 64, device=device, requires_grad=True)
    y = Q.quant_matmul(x, qw)
    y.add_(1.0)
    y.sum().backward()
    w = R.nf4_dequantize(qw, torch.float32)
    assert_close_to_gold(x.grad, w.double().sum(0).expand(2, 3, -1), torch.ones(2, 3, 40, device=device) @ w)


def test_quant_matmul_weight_gets_no_grad_and_x_noncontiguous(device):
    qw = R.int4_quantize(torch.randn(64, 96, device=device), 32)
    base = torch.randn(96, 30, device=device)
    x = base.t()  # (30, 96), non-contiguous
    y = Q.quant_matmul(x, qw)
    ref = x.double() @ R.int4_dequantize(qw, torch.float64).T
    assert_close_to_gold(y, ref, x @ R.int4_dequantize(qw, torch.float32).T)
    assert not y.requires_grad  # neither x nor any weight tensor requires grad


@pytest.mark.parametrize("M", [1, 16])
@pytest.mark.parametrize("split_k", [1, 2, 3, 8])
def test_decode_split_k(M, split_k, device):
    """The decode path splits K across programs; every split count gives the same-quality result,
    and the automatic choice does split for a small-M, long-K problem."""
    N, K = 40, 384
    qw = R.nf4_quantize(torch.randn(N, K, device=device), 64, True)
    x = torch.randn(M, K, device=device, dtype=torch.float16)
    bias = torch.randn(N, device=device, dtype=torch.float16)
    y = Q.quant_matmul_triton(x, qw, bias, split_k=split_k)
    w = R.nf4_dequantize(qw, torch.float32)
    assert_close_to_gold(y, x.double() @ w.double().T + bias.double(), x @ w.half().T + bias)
    # Deterministic: the partial sums are reduced in split order (the counter only elects which
    # program reduces).
    assert torch.equal(y, Q.quant_matmul_triton(x, qw, bias, split_k=split_k))


def test_decode_path_splits_automatically(device):
    assert Q.decode_split_k(1, 40, 384, torch.device(device)) > 1
    assert Q.decode_split_k(64, 40, 384, torch.device(device)) == 1
    assert Q.decode_split_k(1, 40, 64, torch.device(device)) == 1


def test_decode_plan_covers_k(device):
    dev = torch.device(device)
    for N, K, qblock in [(40, 384, 64), (4096, 4096, 64), (40, 64, 64), (14336, 4096, 32), (8, 14336, 128)]:
        bn, bk, split, k_split = Q.decode_plan(1, N, K, qblock, dev)
        assert qblock % bk == 0 and k_split % bk == 0
        assert (split - 1) * k_split < K <= split * k_split  # every split has work, together all of K
    assert Q.decode_plan(1, 40, 384, 64, dev)[2] > 1  # few N tiles: K is split
    # one wave of resident programs where one suffices (a half-empty second wave costs a full one)
    slots = Q.DECODE_PROGRAMS_PER_SM * Q._num_sms(dev)
    for N, K in [(40, 384), (200, 1024), (96, 4096)]:
        bn, bk, split, _ = Q.decode_plan(1, N, K, 64, dev)
        tiles = -(-N // bn)
        if tiles <= slots:
            assert tiles * split <= slots, (N, K, split)
    assert Q.decode_plan(1, 40, 64, 64, dev, split_k=8)[2] == 64 // Q.decode_plan(1, 40, 64, 64, dev)[1]


def test_decode_kernel_serves_aligned_half_precision(monkeypatch, device):
    """M <= 16 with fp16 / bf16 activations on the aligned layout runs ``_quant_decode_kernel``;
    fp32 activations, the general layout and M > 16 run the tiled kernel."""
    calls = []
    launch = Q._decode_launch
    monkeypatch.setattr(Q, "_decode_launch", lambda *a, **k: calls.append(a[0].shape) or launch(*a, **k))
    aligned = R.nf4_quantize(torch.randn(40, 128, device=device), 64, True)
    general = R.nf4_quantize(torch.randn(40, 200, device=device), 64, True)
    Q.quant_matmul(torch.randn(3, 128, device=device, dtype=torch.bfloat16), aligned)
    Q.quant_matmul(torch.randn(16, 128, device=device, dtype=torch.float16), aligned)
    assert calls == [(3, 128), (16, 128)]
    Q.quant_matmul(torch.randn(3, 128, device=device), aligned)
    Q.quant_matmul(torch.randn(3, 200, device=device, dtype=torch.float16), general)
    Q.quant_matmul(torch.randn(17, 128, device=device, dtype=torch.float16), aligned)
    assert len(calls) == 2


def test_decode_eligible_and_cuda_default_routes_decode(monkeypatch, device):
    aligned = R.nf4_quantize(torch.randn(40, 128, device=device), 64, True)
    general = R.nf4_quantize(torch.randn(40, 200, device=device), 64, True)
    h = torch.randn(2, 3, 128, device=device, dtype=torch.bfloat16)
    assert Q.decode_eligible(h, aligned)
    assert not Q.decode_eligible(h.float(), aligned)
    assert not Q.decode_eligible(torch.randn(17, 128, device=device, dtype=torch.half), aligned)
    assert not Q.decode_eligible(torch.randn(2, 200, device=device, dtype=torch.half), general)
    assert not Q.decode_eligible(torch.randn(0, 128, device=device, dtype=torch.half), aligned)
    # The torch backend (the CUDA default of quant_matmul) hands CUDA decode shapes to the kernel.
    calls = []
    launch = Q._decode_launch
    monkeypatch.setattr(Q, "_decode_launch", lambda *a, **k: calls.append(1) or launch(*a, **k))
    y = dispatch.impl("quant_matmul", "torch")(h, aligned)
    assert len(calls) == (1 if device == "cuda" else 0)
    w = R.nf4_dequantize(aligned, torch.float32)
    h2 = h.reshape(-1, 128)
    assert_close_to_gold(y.reshape(6, 40), h2.double() @ w.double().T, h2 @ w.to(torch.bfloat16).T)


def test_decode_split_counters_return_to_zero(device):
    """The in-kernel split-K reduction leaves its counters at 0, so the next launch starts clean."""
    qw = R.int4_quantize(torch.randn(200, 256, device=device), 32, False)
    x = torch.randn(2, 256, device=device, dtype=torch.float16)
    y = Q.quant_matmul_triton(x, qw, split_k=4)
    assert Q.decode_plan(2, 200, 256, 32, torch.device(device), 4)[2] == 4
    cnt = Q._split_counters(torch.device(device), 1)
    assert int(cnt.abs().sum()) == 0
    assert torch.equal(y, Q.quant_matmul_triton(x, qw, split_k=4))
    w = R.int4_dequantize(qw, torch.float32)
    assert_close_to_gold(y, x.double() @ w.double().T, x @ w.half().T)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_nf4_pair_table(dtype, device):
    """Entry b packs the codebook values of b's two nibbles (high nibble in the low half), each as
    the bits of its rounding to ``dtype``; cached per quant_map tensor, rebuilt after an in-place
    change."""
    qmap = R.nf4_quantize(torch.randn(8, 64, device=device), 64, False).quant_map.clone()
    t = Q.nf4_pair_table(qmap, dtype)
    assert t.dtype == torch.int32 and t.numel() == 256
    bits = qmap.to(dtype).view(torch.int16).to(torch.int32) & 0xFFFF
    for b in (0, 7, 0x7F, 0x80, 0xA5, 0xFF):
        assert int(t[b]) & 0xFFFF == int(bits[b >> 4])
        assert (int(t[b]) >> 16) & 0xFFFF == int(bits[b & 15])
    assert Q.nf4_pair_table(qmap, dtype) is t  # cached
    qmap[3] = 0.5
    t2 = Q.nf4_pair_table(qmap, dtype)
    assert t2 is not t and (int(t2[0x30]) & 0xFFFF) == int(torch.tensor(0.5, dtype=dtype).view(torch.int16)) & 0xFFFF


def test_quant_matmul_empty_and_fp64(device):
    qw = R.nf4_quantize(torch.randn(40, 200, device=device), 64, True)
    y = Q.quant_matmul(torch.randn(0, 200, device=device), qw)
    assert tuple(y.shape) == (0, 40)
    # float64 activations: no fp64 kernel; the registered op routes them to the reference.
    x = torch.randn(3, 200, device=device, dtype=torch.float64)
    assert torch.equal(Q.quant_matmul(x, qw), R.quant_matmul(x, qw))


def test_quant_matmul_errors_name_the_dimension(device):
    qw = R.nf4_quantize(torch.randn(40, 200, device=device), 64, True)
    with pytest.raises(ValueError, match="in_features"):
        Q.quant_matmul(torch.randn(3, 199, device=device), qw)
    with pytest.raises(ValueError, match="in_features"):
        Q.quant_matmul_triton(torch.randn(3, 199, device=device), qw)
    with pytest.raises(ValueError, match="out_features"):
        Q.quant_matmul(torch.randn(3, 200, device=device), qw, torch.zeros(41, device=device))
    with pytest.raises(ValueError, match="out_features"):
        Q.quant_matmul_triton(torch.randn(3, 200, device=device), qw, torch.zeros(41, device=device))
    with pytest.raises(TypeError, match="fp32/fp16/bf16"):
        Q.quant_matmul_triton(torch.randn(3, 200, device=device, dtype=torch.float64), qw)
    with pytest.raises(TypeError):
        Q.quant_matmul_triton(torch.randn(3, 200, device=device), torch.randn(40, 200))
    q16 = R.int4_quantize(torch.randn(8, 48, device=device), 16)
    with pytest.raises(ValueError, match="group_size"):
        Q.quant_matmul(torch.randn(2, 48, device=device), q16)
    with pytest.raises(ValueError, match="blocksize"):
        Q.nf4_quantize_raw(torch.randn(4, 4, device=device), 48)


def test_quant_matmul_under_autocast(device):
    qw = R.nf4_quantize(torch.randn(40, 128, device=device), 64, True)
    x = torch.randn(5, 128, device=device, requires_grad=True)
    with torch.autocast(device, dtype=torch.bfloat16):
        y = Q.quant_matmul(x, qw)
        y_ref = R.quant_matmul(x, qw)
    assert y.dtype == y_ref.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32
    w = R.nf4_dequantize(qw, torch.float32)
    xb = x.detach().bfloat16()
    assert_close_to_gold(y, xb.double() @ w.double().T, xb @ w.bfloat16().T)


# ============================================================================== dispatcher
def test_dispatcher_runs_triton_kernels(monkeypatch, device):
    monkeypatch.setenv("FASTFT_BACKEND", "triton")
    dev = torch.device(device)
    for op in ("nf4_quantize", "nf4_dequantize", "int4_quantize", "int4_dequantize", "quant_matmul"):
        assert dispatch.backend_for(op, dev) == "triton"
        assert dispatch.get_impl(op, dev) is getattr(Q, op)
    w = torch.randn(40, 200, device=device)
    qw = NF4Weight.from_float(w)  # through ops.nf4_quantize -> triton
    _nf4_fields_equal(qw, R.nf4_quantize(w, 64, True))
    assert torch.equal(qw.dequantize(torch.float16), R.nf4_dequantize(qw, torch.float16))
    x = torch.randn(3, 200, device=device, requires_grad=True)
    y = ops.quant_matmul(x, qw)
    y.sum().backward()
    wd = R.nf4_dequantize(qw, torch.float32)
    assert_close_to_gold(y, x.double() @ wd.double().T, x @ wd.T)
    assert_close_to_gold(x.grad, wd.double().sum(0).expand(3, -1), torch.ones(3, 40, device=device) @ wd)
    q4 = Int4Weight.from_float(torch.randn(8, 128, device=device), group_size=64)
    assert torch.equal(q4.dequantize(torch.float32), R.int4_dequantize(q4, torch.float32))
