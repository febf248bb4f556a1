"""NF4 / int4 formats and the quant ops (fastft.quant, fastft/ops/reference_quant.py).

Three layers (STYLE.md): exact pack/unpack and bit-identity with bitsandbytes' NF4; checkpoints
that bitsandbytes and fastft read from each other; ``quant_matmul`` against a float64 matmul on the
dequantized weight with tolerances derived from PyTorch's own low-precision error.

bitsandbytes 0.50 on CPU, two known deviations this file works around, each checked explicitly:
* its double-quant 8-bit codes come from a lookup table that misses the nearest code for a few
  values per tensor (fastft uses the exact nearest, as the CUDA kernel does);
* its native CPU ``dequantize_4bit`` assumes every block lies inside one row
  (in_features % blocksize == 0); for blocks straddling rows we compare with its pure-PyTorch
  implementation (``backends/default/ops.py``) instead, which agrees with its own quantizer.
"""
import importlib
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from fastft import ops
from fastft.ops import reference_quant as RQ
from fastft.quant import Int4Weight, NF4Weight
from fastft.quant.codebooks import NF4_VALUES, dynamic_map
from tests.utils import FLOOR, assert_close_to_gold

bnb = importlib.import_module("bitsandbytes")
BF = bnb.functional

EPS32 = torch.finfo(torch.float32).eps
QUANT_OPS = ("nf4_quantize", "nf4_dequantize", "int4_quantize", "int4_dequantize", "quant_matmul")


@pytest.fixture(params=["reference", "auto"])
def backend(request, monkeypatch):
    """Run a test on the reference ops, then again on what FASTFT_BACKEND=auto picks for CPU
    tensors (the C++ backend when it is built): every backend must meet the same checks."""
    monkeypatch.setenv("FASTFT_BACKEND", request.param)
    if request.param == "auto":
        picked = {ops.backend_for(op, torch.device("cpu")) for op in QUANT_OPS}
        if picked == {"reference"}:
            pytest.skip("the auto backend for CPU tensors is the reference itself")
    return request.param


def bnb_quant_state(q: NF4Weight):
    """bitsandbytes' QuantState for a fastft weight, built from fastft's serialized keys only."""
    sd = q.to_bnb_state_dict("")
    stats = {k: v for k, v in sd.items() if k != "weight"}
    return BF.QuantState.from_dict(stats, device=torch.device("cpu"))


def bnb_dequant_torch(packed, absmax, blocksize, shape, dtype):
    """bitsandbytes' pure-PyTorch 4-bit dequantizer, run eagerly (it is torch.compile'd)."""
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
    from bitsandbytes.backends.utils import _get_4bit_code

    code = _get_4bit_code("nf4", packed.device)
    with torch.compiler.set_stance("force_eager"):
        return _dequantize_4bit_compute(packed.reshape(-1), absmax, code, blocksize, shape, dtype)


def nested_scaled(q: NF4Weight, absmax_fp32: torch.Tensor) -> torch.Tensor:
    """The fp32 value fastft's docstring says is coded to 8 bits: (absmax - offset) * (1/nested)."""
    g = q.nested_blocksize
    centered = absmax_fp32 - torch.tensor(q.offset, dtype=torch.float32)
    inv = (1.0 / q.nested_absmax.clamp(min=1e-38)).repeat_interleave(g)[: centered.numel()]
    return (centered * inv).clamp(-1, 1)


# ---------------------------------------------------------------------------------------------
# codebooks
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("signed", [True, False])
def test_dynamic_map_equals_bitsandbytes(signed):
    ours = dynamic_map(signed)
    theirs = BF.create_dynamic_map(signed=signed)
    assert ours.dtype == torch.float32 and ours.shape == (256,)
    assert torch.equal(ours, theirs)


def test_nf4_codebook_equals_bitsandbytes():
    theirs = BF.get_4bit_type("nf4", device="cpu")
    assert torch.equal(torch.tensor(NF4_VALUES, dtype=torch.float32), theirs)


# ---------------------------------------------------------------------------------------------
# NF4 bytes vs bitsandbytes
# ---------------------------------------------------------------------------------------------

SHAPES = [(97, 131), (3, 1025), (1, 97), (33, 64), (7, 3)]  # odd n, short last blocks, n < blocksize


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("blocksize", [64, 128, 256])
@pytest.mark.parametrize("shape", SHAPES)
def test_nf4_codes_and_absmax_identical_to_bitsandbytes(shape, blocksize, dtype, backend):
    w = torch.randn(shape, dtype=torch.float32).mul_(0.05).to(dtype)
    q = NF4Weight.from_float(w, blocksize=blocksize, double_quant=False)
    packed, st = BF.quantize_4bit(w, blocksize=blocksize, quant_type="nf4", compress_statistics=False)
    n = w.numel()
    assert q.data.shape == ((n + 1) // 2, 1) and q.data.dtype == torch.uint8
    assert q.absmax.dtype == torch.float32 and q.absmax.shape == (-(-n // blocksize),)
    assert torch.equal(q.data, packed)
    assert torch.equal(q.absmax, st.absmax)
    assert q.shape == w.shape and q.dtype == dtype and q.blocksize == blocksize


@pytest.mark.parametrize("shape,blocksize", [((1000, 777), 64), ((333, 515), 128), ((97, 131), 64)])
def test_nf4_double_quant_vs_bitsandbytes(shape, blocksize, backend):
    w = torch.randn(shape, dtype=torch.bfloat16) * 0.02
    q = NF4Weight.from_float(w, blocksize=blocksize, double_quant=True)
    packed, st = BF.quantize_4bit(w, blocksize=blocksize, quant_type="nf4", compress_statistics=True)
    plain = NF4Weight.from_float(w, blocksize=blocksize, double_quant=False)

    assert torch.equal(q.data, packed)
    assert q.offset == st.offset.item()
    assert torch.equal(q.nested_absmax, st.state2.absmax)
    assert torch.equal(q.nested_quant_map, st.state2.code)
    assert q.absmax.dtype == torch.uint8 and q.nested_blocksize == 256 == st.state2.blocksize

    # Ours is the exact nearest 8-bit code: brute force over all 256 map values, in float64.
    s = nested_scaled(q, plain.absmax).double()
    dist = (s[:, None] - dynamic_map().double()[None, :]).abs()
    best = dist.min(dim=1).values
    d_ours = dist.gather(1, q.absmax.long()[:, None])[:, 0]
    d_theirs = dist.gather(1, st.absmax.long()[:, None])[:, 0]
    assert torch.equal(d_ours, best)
    # Every disagreement is a bitsandbytes LUT miss: there ours is strictly closer.
    differ = q.absmax != st.absmax
    assert torch.all(d_theirs[differ] > d_ours[differ])
    n_miss = int(differ.sum())
    print(f"bitsandbytes CPU LUT misses: {n_miss} of {q.absmax.numel()} nested codes")
    # Bound the misses by a count reported for this LUT ("a few per tensor"), scaled by tensor size.
    assert n_miss <= max(4, q.absmax.numel() // 100)


def test_nf4_odd_count_pads_with_zero_code(backend):
    w = torch.randn(3, 7)  # n = 21: the last byte holds one code and the pad code 7 (value 0.0)
    q = NF4Weight.from_float(w, blocksize=64, double_quant=False)
    assert q.data.shape == (11, 1)
    assert int(q.data[-1, 0]) & 0xF == 7


def test_nf4_first_element_in_high_nibble(backend):
    w = torch.zeros(1, 64)
    w[0, 0], w[0, 1] = -1.0, 1.0  # codes 0 and 15
    q = NF4Weight.from_float(w, double_quant=False)
    assert int(q.data[0, 0]) == (0 << 4) | 15
    assert int(q.data[1, 0]) == (7 << 4) | 7


def test_nf4_ties_go_to_lower_code(backend):
    code = torch.tensor(NF4_VALUES)
    mids = (code[:-1] + code[1:]) / 2  # fp32, as the format defines
    # Each block: [1.0 (sets absmax = 1, scale exactly 1), midpoint_i, next float above it].
    vals = []
    for m in mids.tolist():
        vals += [1.0, m, torch.nextafter(torch.tensor(m), torch.tensor(2.0)).item()] + [0.0] * 61
    w = torch.tensor(vals, dtype=torch.float32).view(-1, 64)
    q = NF4Weight.from_float(w, double_quant=False)
    codes = RQ._unpack_nibbles(q.data.view(-1), w.numel()).view(-1, 64)
    i = torch.arange(15)
    assert torch.equal(codes[:, 1].long(), i)        # exactly on a midpoint -> the lower code
    assert torch.equal(codes[:, 2].long(), i + 1)    # one ulp above -> the upper code


# ---------------------------------------------------------------------------------------------
# edge values
# ---------------------------------------------------------------------------------------------

def test_nf4_zero_tiny_huge_blocks_match_bitsandbytes(backend):
    w = torch.randn(6, 128, dtype=torch.float32)
    w[0] = 0.0                      # all-zero blocks: absmax 0, no NaN
    w[1] *= 1e-30                   # tiny normal
    w[2] = w[2] * 1e-41             # subnormal absmax: the 1e-38 reciprocal floor applies
    w[3] *= 1e30                    # huge
    w[4] = w[4].sign() * 3e38       # close to fp32 max: the reciprocal is subnormal
    w[5, :64] = 0.0
    w[5, 64:] *= 1e-3
    for dq in (False, True):
        q = NF4Weight.from_float(w, blocksize=64, double_quant=dq)
        packed, st = BF.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=dq)
        assert torch.equal(q.data, packed)
        if dq:  # row 4's two 3e38 blocks overflow an fp32 sum: the mean must come out finite
            assert math.isfinite(q.offset), f"double-quant offset {q.offset} (fp32 mean overflow)"
        d = q.dequantize()
        assert torch.isfinite(d).all()
        if not dq:
            assert torch.equal(q.absmax, st.absmax)
            assert torch.equal(d, BF.dequantize_4bit(packed, st))
            assert torch.equal(d[0], torch.zeros(128))
            # Normal-range blocks: error at most half the widest gap between NF4 codes, times absmax
            # (plus the rounding of code * absmax).
            code = torch.tensor(NF4_VALUES)
            half_gap = ((code[1:] - code[:-1]).max() / 2).item()
            for r in (1, 3, 4, 5):
                am = w[r].view(2, 64).abs().amax(1).repeat_interleave(64)
                assert torch.all((d[r] - w[r]).abs() <= (half_gap + 2 * EPS32) * am)


def test_nf4_rejects_bad_input(backend):
    w = torch.randn(8, 64)
    for bs in (0, 16, 100, 8192, 64.0, "64", True):
        with pytest.raises(ValueError, match="blocksize"):
            NF4Weight.from_float(w, blocksize=bs)
    with pytest.raises(TypeError, match="dtype"):
        NF4Weight.from_float(torch.ones(8, 64, dtype=torch.int32))
    with pytest.raises(ValueError, match="2-D"):
        NF4Weight.from_float(torch.randn(64))
    bad = w.clone()
    bad[3, 5] = float("nan")
    with pytest.raises(ValueError, match="inf or NaN"):
        NF4Weight.from_float(bad)
    bad[3, 5] = float("inf")
    with pytest.raises(ValueError, match="inf or NaN"):
        NF4Weight.from_float(bad)
    with pytest.raises(TypeError, match="dtype"):
        NF4Weight.from_float(w).to(torch.float16)
    with pytest.raises(TypeError, match="dtype"):
        NF4Weight.from_float(w).dequantize(torch.int32)
    with pytest.raises(ValueError, match="frozen"):
        NF4Weight.from_float(w).requires_grad_(True)


# ---------------------------------------------------------------------------------------------
# pack / unpack and dequantization
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 2, 3, 97, 1025])
def test_nibble_pack_unpack_roundtrip_exact(n):
    codes = torch.randint(0, 16, (n,), dtype=torch.uint8)
    packed = RQ._pack_nibbles(codes, 7)
    assert packed.shape == ((n + 1) // 2,)
    assert torch.equal(packed >> 4, codes[0::2])
    assert torch.equal(RQ._unpack_nibbles(packed, n), codes)


@pytest.mark.parametrize("blocksize", [64, 256])
def test_nf4_requantize_dequantized_is_identity(blocksize, backend):
    # deq = code * absmax; the block max keeps absmax, and every value re-lands on its own code.
    w = torch.randn(37, 131)
    q = NF4Weight.from_float(w, blocksize=blocksize, double_quant=False)
    q2 = NF4Weight.from_float(q.dequantize(torch.float32), blocksize=blocksize, double_quant=False)
    assert torch.equal(q2.data, q.data) and torch.equal(q2.absmax, q.absmax)


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_nf4_dequantize_equals_bitsandbytes(dtype, double_quant, backend):
    # in_features % blocksize == 0: bitsandbytes' native CPU dequantizer applies.
    w = (torch.randn(33, 512) * 0.03).to(dtype)
    for bs in (64, 128, 256):
        q = NF4Weight.from_float(w, blocksize=bs, double_quant=double_quant)
        st = bnb_quant_state(q)
        ref = BF.dequantize_4bit(q.data, st)
        assert ref.dtype == dtype
        assert torch.equal(q.dequantize(), ref)
        assert torch.equal(q.absmax_fp32(), BF.dequantize_blockwise(st.absmax, st.state2) + st.offset
                           if double_quant else st.absmax)
        # "one cast": dequantizing to another dtype is the fp32 result cast once.
        assert torch.equal(q.dequantize(torch.float16), q.dequantize(torch.float32).half())


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("shape,blocksize", [((13, 97), 64), ((64, 64), 128), ((5, 300), 256)])
def test_nf4_dequantize_blocks_straddling_rows(shape, blocksize, double_quant, backend):
    w = torch.randn(shape, dtype=torch.bfloat16)
    q = NF4Weight.from_float(w, blocksize=blocksize, double_quant=double_quant)
    absmax = bnb_quant_state(q).absmax
    if double_quant:
        st = bnb_quant_state(q)
        absmax = BF.dequantize_blockwise(st.absmax, st.state2) + st.offset
    ref = bnb_dequant_torch(q.data, absmax, blocksize, shape, torch.bfloat16)
    assert torch.equal(q.dequantize(), ref)


@pytest.mark.parametrize("kind", ["nf4", "int4"])
def test_chunked_streaming_equals_single_chunk(kind, monkeypatch):
    monkeypatch.setenv("FASTFT_BACKEND", "reference")  # CHUNK_ELEMS is the reference's
    if kind == "nf4":  # n = 2100: 11 chunks of 3 blocks, the last one ending in a short block
        w = torch.randn(21, 100, dtype=torch.bfloat16)
        make = lambda: NF4Weight.from_float(w, blocksize=64)  # noqa: E731
    else:  # one row per chunk
        w = torch.randn(21, 128, dtype=torch.bfloat16)
        make = lambda: Int4Weight.from_float(w, group_size=64)  # noqa: E731
    whole = make()
    d_whole = whole.dequantize(torch.float32)
    monkeypatch.setattr(RQ, "CHUNK_ELEMS", 200)  # chunks of 3 blocks (nf4) / 1 row (int4)
    small = make()
    for name, t in whole._tensors().items():
        assert torch.equal(t, small._tensors()[name]), name
    assert torch.equal(small.dequantize(torch.float32), d_whole)


_MEM_SCRIPT = r"""
import torch
from fastft.quant import NF4Weight

def status(field):  # kB -> bytes
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024

w = torch.empty(4096, 4096, dtype=torch.bfloat16)
for rows in w.split(256):
    rows.normal_()
NF4Weight.from_float(torch.randn(64, 64))  # warm up imports and dispatch
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak (VmHWM) to the current RSS
before = status("VmRSS")
assert status("VmHWM") - before < 8 << 20, "peak RSS could not be reset; measurement unreliable"
q = NF4Weight.from_float(w, blocksize=64, double_quant=True)
print(status("VmHWM") - before, q.nbytes)
"""


def test_nf4_quantize_big_weight_is_memory_frugal():
    # 4096 x 4096 bf16 (a Llama-7B projection): one full-size fp32 temporary alone is 64 MiB, the
    # output 8.3 MiB; the streaming quantizer adds only a few 1 MiB chunk buffers and allocator
    # slack on top (measured 2-3 MiB, independent of the weight's size). Run in a fresh process:
    # the peak RSS of this one carries other tests' allocations.
    env = dict(os.environ, OMP_NUM_THREADS="1", FASTFT_BACKEND="reference")
    out = subprocess.run([sys.executable, "-c", _MEM_SCRIPT], capture_output=True, text=True, env=env,
                         timeout=120, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert out.returncode == 0, out.stderr
    growth, out_bytes = map(int, out.stdout.split())
    n = 4096 * 4096
    # Allowed: the output plus half of one full-size fp32 temporary; a single full-size fp32 or
    # int32 temporary would exceed it.
    assert growth < out_bytes + 2 * n, f"peak RSS grew by {growth / 2**20:.0f} MiB while quantizing"


# ---------------------------------------------------------------------------------------------
# checkpoints shared with bitsandbytes
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fastft_checkpoint_read_by_bitsandbytes(tmp_path, dtype, double_quant, backend):
    from safetensors.torch import load_file, save_file

    w = (torch.randn(40, 192) * 0.1).to(dtype)
    q = NF4Weight.from_float(w, blocksize=64, double_quant=double_quant)
    sd = q.to_bnb_state_dict("model.layers.0.mlp.up_proj.")
    save_file(sd, str(tmp_path / "w.safetensors"))
    loaded = load_file(str(tmp_path / "w.safetensors"))
    prefix = "model.layers.0.mlp.up_proj.weight"
    stats = {k[len(prefix) + 1:]: v for k, v in loaded.items() if k.startswith(prefix + ".")}
    param = bnb.nn.Params4bit.from_prequantized(loaded[prefix], stats, device="cpu")
    assert param.quant_state.nested == double_quant and param.quant_state.dtype == dtype
    assert tuple(param.quant_state.shape) == (40, 192)
    ref = BF.dequantize_4bit(param.data, param.quant_state)
    assert torch.equal(ref, q.dequantize())


@pytest.mark.parametrize("double_quant", [False, True])
def test_bitsandbytes_linear4bit_checkpoint_read_by_fastft(tmp_path, double_quant, backend):
    from safetensors.torch import load_file, save_file

    w = torch.randn(48, 256, dtype=torch.bfloat16) * 0.05
    lin = bnb.nn.Linear4bit(256, 48, bias=True, compress_statistics=double_quant, quant_type="nf4")
    lin.weight = bnb.nn.Params4bit(w, requires_grad=False, compress_statistics=double_quant,
                                   quant_type="nf4", module=lin)
    lin = lin.to("cpu")  # bitsandbytes quantizes here
    sd = {"encoder.dense." + k: v.contiguous() for k, v in lin.state_dict().items()}
    save_file(sd, str(tmp_path / "bnb.safetensors"))
    loaded = load_file(str(tmp_path / "bnb.safetensors"))
    q = NF4Weight.from_bnb_state_dict(loaded, "encoder.dense.")
    assert q.double_quant == double_quant and q.shape == (48, 256) and q.dtype == torch.bfloat16
    ref = BF.dequantize_4bit(lin.weight.data, lin.weight.quant_state)
    assert torch.equal(q.dequantize(), ref)
    # And back: fastft re-serializes bitsandbytes' tensors unchanged (JSON bytes included).
    again = q.to_bnb_state_dict("encoder.dense.")
    for k, v in again.items():
        assert torch.equal(v, loaded[k]), k


def test_from_bnb_state_dict_errors():
    q = NF4Weight.from_float(torch.randn(8, 64))
    sd = q.to_bnb_state_dict("")
    with pytest.raises(KeyError, match="bitsandbytes__nf4"):
        NF4Weight.from_bnb_state_dict({"weight": sd["weight"]}, "")
    partial = dict(sd)
    del partial["weight.nested_absmax"]
    with pytest.raises(ValueError, match="nested_absmax: missing"):  # a CheckpointError (tests/test_strict_formats.py)
        NF4Weight.from_bnb_state_dict(partial, "")
    fp4 = {k.replace("nf4", "fp4"): v for k, v in sd.items()}
    with pytest.raises(ValueError, match="only NF4"):
        NF4Weight.from_bnb_state_dict(fp4, "")
    wrong = dict(sd)
    wrong["weight.absmax"] = sd["weight.absmax"][:-1]
    with pytest.raises(ValueError, match="absmax"):
        NF4Weight.from_bnb_state_dict(wrong, "")


# ---------------------------------------------------------------------------------------------
# int4
# ---------------------------------------------------------------------------------------------

def _int4_codes(q: Int4Weight) -> torch.Tensor:
    out_f, in_f = q.shape
    return torch.stack((q.data >> 4, q.data & 0xF), dim=-1).reshape(out_f, -1)[:, :in_f].long()


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("shape", [(1, 384), (3, 128), (97, 256)])
def test_int4_roundtrip_error_bound(shape, group_size, symmetric, backend):
    w = torch.randn(shape) * 0.05
    w[0, :group_size] += 0.2  # a group far from symmetric
    q = Int4Weight.from_float(w, group_size=group_size, symmetric=symmetric)
    G = shape[1] // group_size
    assert q.data.shape == (shape[0], shape[1] // 2) and q.data.dtype == torch.uint8
    assert q.scales.shape == (shape[0], G) and q.symmetric == symmetric
    assert (q.zeros is None) == symmetric
    d = q.dequantize(torch.float32)
    scale = q.scales.repeat_interleave(group_size, dim=1)
    # Rounding slack of the fp32 arithmetic (x/scale + zero, (q - zero) * scale): a few ulps of
    # the largest intermediate, 15 * scale, and of w itself.
    slack = 4 * EPS32 * (16 * scale + w.abs())
    assert torch.all((w - d).abs() <= scale / 2 + slack)
    codes = _int4_codes(q)
    if symmetric:
        amax = w.view(shape[0], G, group_size).abs().amax(-1)
        assert torch.equal(q.scales, amax / 7)
        assert codes.min() >= 1  # |x| <= 7 * scale never needs -8
    else:
        assert torch.all((q.zeros >= 0) & (q.zeros <= 15))
        # Both range ends are used: the coding is min-max, not clipped.
        assert torch.all(codes.view(shape[0], G, group_size).amax(-1) == 15)


def test_int4_dequantize_formula_and_nibble_order(backend):
    out_f, in_f, gs = 5, 64, 32
    codes = torch.randint(0, 16, (out_f, in_f), dtype=torch.uint8)
    data = (codes[:, 0::2] << 4) | codes[:, 1::2]
    scales = torch.rand(out_f, 2) + 0.1
    zeros = torch.rand(out_f, 2) * 15
    qa = Int4Weight(data, scales, zeros, gs, (out_f, in_f), torch.float32)
    qs = Int4Weight(data, scales, None, gs, (out_f, in_f), torch.float32)
    s = scales.repeat_interleave(gs, 1)
    z = zeros.repeat_interleave(gs, 1)
    assert torch.equal(qa.dequantize(), (codes.float() - z) * s)
    assert torch.equal(qs.dequantize(), (codes.float() - 8) * s)
    assert torch.equal(qa.dequantize(torch.bfloat16), ((codes.float() - z) * s).bfloat16())


def test_int4_zero_and_constant_groups(backend):
    w = torch.zeros(2, 64)
    w[1, 32:] = 0.37
    for sym in (False, True):
        q = Int4Weight.from_float(w, group_size=32, symmetric=sym)
        d = q.dequantize(torch.float32)
        assert torch.isfinite(d).all()
        assert torch.equal(d[0], torch.zeros(64)) and torch.equal(d[1, :32], torch.zeros(32))
        assert torch.allclose(d[1, 32:], w[1, 32:], rtol=4 * EPS32, atol=0)


def test_int4_rejects_bad_input(backend):
    with pytest.raises(ValueError, match="in_features"):
        Int4Weight.from_float(torch.randn(4, 100), group_size=32)
    with pytest.raises(ValueError, match="group_size"):
        Int4Weight.from_float(torch.randn(4, 64), group_size=0)
    with pytest.raises(TypeError, match="dtype"):
        Int4Weight.from_float(torch.ones(4, 64, dtype=torch.int8), group_size=32)
    with pytest.raises(TypeError, match="dtype"):
        Int4Weight.from_float(torch.randn(4, 64), group_size=32).dequantize(torch.int32)
    bad = torch.randn(4, 64)
    for v in (float("inf"), float("-inf"), float("nan")):
        bad[2, 40] = v
        for sym in (False, True):
            with pytest.raises(ValueError, match="inf or NaN"):
                Int4Weight.from_float(bad, group_size=32, symmetric=sym)


# ---------------------------------------------------------------------------------------------
# quant_matmul
# ---------------------------------------------------------------------------------------------

def _qweight(kind, out_f, in_f):
    w = torch.randn(out_f, in_f) * 0.05
    if kind == "nf4":
        return NF4Weight.from_float(w, blocksize=64, double_quant=True)
    return Int4Weight.from_float(w, group_size=32)


@pytest.mark.parametrize("lead", [(), (1,), (3,), (2, 5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("kind", ["nf4", "int4"])
def test_quant_matmul_vs_float64(kind, dtype, lead, backend):
    out_f, in_f = 33, 96
    q = _qweight(kind, out_f, in_f)
    W64 = RQ._reference_dequantize(q, torch.float64)  # exact: fp32 code * scale, widened
    Wd = RQ._reference_dequantize(q, dtype)
    x = torch.randn(*lead, in_f).to(dtype).requires_grad_()
    b = torch.randn(out_f).to(dtype).requires_grad_()
    y = ops.quant_matmul(x, q, b)
    assert y.dtype == dtype and y.shape == (*lead, out_f)
    gold = x.detach().double() @ W64.T + b.detach().double()
    lowp = F.linear(x.detach(), Wd, b.detach())
    assert_close_to_gold(y.detach(), gold, lowp, name="y")

    dy = torch.randn(*lead, out_f).to(dtype)
    y.backward(dy)
    gold_dx = dy.double() @ W64
    lowp_dx = dy @ Wd
    assert x.grad.dtype == dtype
    assert_close_to_gold(x.grad, gold_dx, lowp_dx, name="dx")
    gold_db = dy.double().reshape(-1, out_f).sum(0)
    lowp_db = dy.reshape(-1, out_f).sum(0)
    assert_close_to_gold(b.grad, gold_db, lowp_db, name="db")


def test_quant_matmul_autocast_bf16(backend):
    q = _qweight("nf4", 40, 128)
    x = torch.randn(4, 128, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ops.quant_matmul(x, q)
        ref_dense = F.linear(x.detach(), q.dequantize(torch.float32))  # autocast F.linear on the dense W
    assert y.dtype == torch.bfloat16 == ref_dense.dtype
    gold = x.detach().double() @ RQ._reference_dequantize(q, torch.float64).T
    assert_close_to_gold(y.detach(), gold, ref_dense, name="y autocast")
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32
    gold_dx = torch.ones(4, 40, dtype=torch.float64) @ RQ._reference_dequantize(q, torch.float64)
    lowp_dx = (torch.ones(4, 40, dtype=torch.bfloat16) @ q.dequantize(torch.bfloat16)).float()
    assert_close_to_gold(x.grad, gold_dx, lowp_dx, floor=FLOOR[torch.bfloat16], name="dx autocast")


@pytest.mark.parametrize("kind", ["nf4", "int4"])
def test_quant_matmul_saves_nothing_weight_sized(kind, backend):
    # Saving the quantized weight's own tensors costs nothing (they exist anyway); anything else
    # saved for backward is extra memory and must stay far below a dense copy of W.
    out_f, in_f = 256, 512
    q = _qweight(kind, out_f, in_f)
    own = {t.untyped_storage().data_ptr() for t in q._tensors().values()}
    x = torch.randn(2, in_f, requires_grad=True)
    b = torch.zeros(out_f, requires_grad=True)
    extra = []

    def pack(t):
        if t.untyped_storage().data_ptr() not in own:
            extra.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = ops.quant_matmul(x, q, b)
    dense_bytes = out_f * in_f * x.element_size()
    assert sum(extra) <= x.numel() * x.element_size() + dense_bytes // 64, extra
    y.sum().backward()
    assert x.grad is not None and b.grad is not None


def test_quant_matmul_rejects_bad_input(backend):
    q = _qweight("nf4", 16, 64)
    with pytest.raises(ValueError, match="in_features"):
        ops.quant_matmul(torch.randn(3, 63), q)
    with pytest.raises(TypeError, match="floating"):
        ops.quant_matmul(torch.ones(3, 64, dtype=torch.int64), q)
    with pytest.raises(ValueError, match="bias"):
        ops.quant_matmul(torch.randn(3, 64), q, torch.zeros(15))
    with pytest.raises(TypeError, match="quantized weight"):
        RQ.quant_matmul(torch.randn(3, 64), torch.randn(16, 64))
