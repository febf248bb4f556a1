"""Triton 4-bit packing kernels (fastft/kernels/quant_pack.py) against the reference ops and bitsandbytes.

Quantize bytes and dequantize values exactly equal to the reference (fastft/ops/reference_quant.py)
and to bitsandbytes' NF4, through the triton backend's ops (``fastft.ops.triton_backend``: the
kernels behind ``NF4Weight`` / ``Int4Weight``), including the group sizes whose calls its predicate
hands to the reference. The quant-matmul kernels are tests/test_quant_matmul.py and
tests/test_quant_decode.py (STYLE.md's three layers: exact packing here, the matmul against
float64 there, quantization error against bitsandbytes in tests/test_quant_formats.py).

On CPU everything runs under TRITON_INTERPRET=1 (tests/conftest.py) on small shapes. bf16 runs on
CPU too: the kernels round bf16 casts themselves when interpreting.
"""
import importlib

import pytest
import torch

from fastft.kernels import quant_pack
from fastft.ops import dispatch
from fastft.ops import reference_quant as R
from fastft.ops import triton_backend as tb
from fastft.quant import Int4Weight, NF4Weight
from fastft.quant.codebooks import dynamic_map, nf4_midpoints
from fastft.quant.nf4 import NESTED_BLOCKSIZE

pytestmark = [pytest.mark.interpreter, pytest.mark.usefixtures("triton_usable")]


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
    _nf4_fields_equal(tb.nf4_quantize(w, blocksize, double_quant), R.nf4_quantize(w, blocksize, double_quant))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_nf4_quantize_input_dtypes(dtype, device):
    w = torch.randn(33, 70, device=device).to(dtype)
    _nf4_fields_equal(tb.nf4_quantize(w, 64, True), R.nf4_quantize(w, 64, True))


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
    a = tb.nf4_quantize(w, blocksize, double_quant)
    _nf4_fields_equal(a, R.nf4_quantize(w, blocksize, double_quant))
    # Exact zero blocks stay exact zeros after the round trip.
    assert torch.equal(tb.nf4_dequantize(a, torch.float32)[0], torch.zeros(64, device=device))


@pytest.mark.parametrize("shape", [(7, 9), (40, 200), (300, 301), (12, 64)])
def test_nf4_codes_and_absmax_equal_bitsandbytes(shape):
    """4-bit codes and fp32 absmax are bitsandbytes' (CPU) bytes, odd sizes and edge values too."""
    F = _bnb()
    w = _edge_weight("cpu") if shape == (12, 64) else torch.randn(shape)
    ours = tb.nf4_quantize(w, 64, False)
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
    ours = tb.nf4_quantize(w, 64, True)
    packed, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    assert torch.equal(ours.data, packed)
    assert ours.offset == state.offset.item()
    assert torch.equal(ours.nested_absmax, state.state2.absmax)
    assert torch.equal(ours.nested_quant_map, state.state2.code)
    assert torch.equal(ours.nested_quant_map, dynamic_map(True))
    raw = quant_pack.nf4_quantize_raw(w, 64, nf4_midpoints())[1]
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
    assert torch.equal(tb.nf4_dequantize(theirs, torch.float32), F.dequantize_4bit(packed, state))


# =========================================================================== NF4 dequantize
@pytest.mark.parametrize("shape", [(7, 9), (40, 200), (3, 1025), (64, 128)])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_nf4_dequantize_equals_reference(shape, double_quant, dtype, device):
    q = R.nf4_quantize(torch.randn(shape, device=device), 64, double_quant)
    out = tb.nf4_dequantize(q, dtype)
    assert out.dtype == dtype and tuple(out.shape) == shape
    assert torch.equal(out, R.nf4_dequantize(q, dtype))


def test_nf4_dequantize_large_blocksize_and_many_nested_groups(device):
    # 1100 blocks of 32: five nested groups of 256, the last one partial.
    q = R.nf4_quantize(torch.randn(110, 320, device=device), 32, True)
    assert q.nested_absmax.numel() == 5
    assert torch.equal(tb.nf4_dequantize(q, torch.float32), R.nf4_dequantize(q, torch.float32))
    q = R.nf4_quantize(torch.randn(5, 4096 + 3, device=device), 4096, True)
    assert torch.equal(tb.nf4_dequantize(q, torch.bfloat16), R.nf4_dequantize(q, torch.bfloat16))


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
    a, b = tb.int4_quantize(w, group, symmetric), R.int4_quantize(w, group, symmetric)
    assert isinstance(a, Int4Weight) and a.symmetric == symmetric
    assert torch.equal(a.data, b.data)
    assert torch.equal(a.scales, b.scales)
    assert (a.zeros is None) == symmetric
    if not symmetric:
        assert torch.equal(a.zeros, b.zeros)
    # Round trip of the packing: the 4-bit codes unpack to round(w / scale + zero).
    codes = torch.stack((a.data >> 4, a.data & 0xF), -1).reshape(shape)
    assert int(codes.max()) <= 15
    deq = tb.int4_dequantize(a, torch.float32)
    assert torch.equal(deq[0, :group], torch.zeros(group, device=device))
    # Quantization error bound of the format: half a step per element (+ fp32 rounding).
    step = a.scales.repeat_interleave(group, dim=1)
    assert ((deq - w.float()).abs() <= 0.5 * step * (1 + 1e-5) + 1e-30).all()


@pytest.mark.parametrize("shape,group", INT4_CASES[:2])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_int4_dequantize_equals_reference(shape, group, symmetric, dtype, device):
    q = R.int4_quantize(_int4_weight(shape, group, device), group, symmetric)
    assert torch.equal(tb.int4_dequantize(q, dtype), R.int4_dequantize(q, dtype))


def test_int4_unsupported_group_size_falls_back_to_reference(device):
    w = torch.randn(4, 48, device=device)
    a, b = tb.int4_quantize(w, 16), R.int4_quantize(w, 16)
    assert torch.equal(a.data, b.data) and torch.equal(a.scales, b.scales)
    assert torch.equal(tb.int4_dequantize(a), R.int4_dequantize(b))


def test_nf4_raw_rejects_blocksize(device):
    with pytest.raises(ValueError, match="blocksize"):
        quant_pack.nf4_quantize_raw(torch.randn(4, 4, device=device), 48, nf4_midpoints(device))


def test_format_constants_match_fastft_quant():
    """The kernels keep the double-quantization block size as a plain constant (they import nothing
    from fastft): it must be fastft.quant's."""
    assert quant_pack.NESTED_BLOCK == NESTED_BLOCKSIZE


# ============================================================================== dispatcher
def test_dispatcher_runs_triton_kernels(monkeypatch, device):
    monkeypatch.setenv("FASTFT_BACKEND", "triton")
    dev = torch.device(device)
    for op in ("nf4_quantize", "nf4_dequantize", "int4_quantize", "int4_dequantize"):
        assert dispatch.backend_for(op, dev) == "triton"
        assert dispatch.get_impl(op, dev) is getattr(tb, op)
    w = torch.randn(40, 200, device=device)
    qw = NF4Weight.from_float(w)  # through ops.nf4_quantize -> triton
    _nf4_fields_equal(qw, R.nf4_quantize(w, 64, True))
    assert torch.equal(qw.dequantize(torch.float16), R.nf4_dequantize(qw, torch.float16))
    q4 = Int4Weight.from_float(torch.randn(8, 128, device=device), group_size=64)
    assert torch.equal(q4.dequantize(torch.float32), R.int4_dequantize(q4, torch.float32))
