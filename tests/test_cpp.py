"""The C++ CPU kernels (csrc/, ``fastft._C``) behind the ``cpp`` backend.

Oracles: the reference quantizer (``fastft/ops/reference_quant.py``) for bytes and dequantized
values -- compared bit for bit, on every SIMD path this CPU can run (avx512, avx2, scalar) --
bitsandbytes for the 4-bit codes, and float64 matmuls on the dequantized weight for the
quant-matmul with tolerances derived from PyTorch's own error (tests/utils.py).
"""
from __future__ import annotations

import importlib.util
import logging
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from fastft.ops import dispatch
from fastft.quant import NF4Weight
from utils import assert_close_to_gold, output_and_grads

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

if os.environ.get("FASTFT_BUILD_EXT", "1") == "0":
    pytest.skip("FASTFT_BUILD_EXT=0: the C++ extension was deliberately not built", allow_module_level=True)

import fastft.ops.cpp as cpp  # noqa: E402  (after the skip: imports cleanly either way)

ref = dispatch.impl
LOWP = (torch.float32, torch.bfloat16, torch.float16)


ISAS = ("avx512", "avx2", "scalar")


@pytest.fixture(params=ISAS)
def isa(request):
    """Runs a test once per kernel table; a table this CPU cannot execute is a recorded skip (the
    coverage it would have given is missing on this machine, and the summary says so)."""
    if not cpp.AVAILABLE:
        if request.param != "scalar":
            pytest.skip(f"{request.param}: the C++ extension is not built")
        yield request.param
        return
    from fastft import _C

    if not _C.set_isa(request.param):
        _C.set_isa("auto")
        import reliability_figures

        reliability_figures.skipped(request.node.nodeid, f"this CPU cannot run the {request.param} kernels")
        pytest.skip(f"ISA coverage missing: this CPU cannot run the {request.param} kernels")
    yield request.param
    _C.set_isa("auto")


def bits(t: torch.Tensor) -> torch.Tensor:
    """Raw bits, so that equality also covers -0.0 and is exact."""
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def same_nf4(a: NF4Weight, b: NF4Weight):
    assert torch.equal(a.data, b.data), f"packed codes differ in {(a.data != b.data).sum().item()} bytes"
    assert a.absmax.dtype == b.absmax.dtype and torch.equal(bits(a.absmax), bits(b.absmax)), "absmax differs"
    assert a.double_quant == b.double_quant and a.shape == b.shape and a.dtype == b.dtype
    if a.double_quant:
        assert torch.equal(bits(a.nested_absmax), bits(b.nested_absmax)), "nested_absmax differs"
        assert torch.equal(a.nested_quant_map, b.nested_quant_map) and a.offset == b.offset


# --------------------------------------------------------------------------------------------
# Build and registration
# --------------------------------------------------------------------------------------------
def test_extension_builds_and_loads(monkeypatch):
    assert cpp.AVAILABLE, f"fastft._C did not import: {cpp._IMPORT_ERROR}"
    from fastft import _C

    assert _C.isa() in ("avx512", "avx2", "scalar")
    monkeypatch.delenv("FASTFT_BACKEND", raising=False)
    for op in ("nf4_quantize", "nf4_dequantize", "int4_quantize", "int4_dequantize", "quant_matmul"):
        assert dispatch.backend_for(op, torch.device("cpu")) == "cpp", op
    for name in cpp.SCHEMAS:
        assert hasattr(torch.ops.fastft, name), name


def test_build_ext_opt_out(monkeypatch):
    """FASTFT_BUILD_EXT=0 or a missing compiler: no extension, and the install still proceeds."""
    spec = importlib.util.spec_from_file_location("_fastft_build_ext_test", os.path.join(REPO, "csrc", "build_ext.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setenv("FASTFT_BUILD_EXT", "0")
    assert mod.extensions() == ([], {})
    monkeypatch.setenv("FASTFT_BUILD_EXT", "1")
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    assert mod.extensions() == ([], {})
    monkeypatch.delenv("CXX")
    exts, cmd = mod.extensions()
    assert [e.name for e in exts] == ["fastft._C"] and "build_ext" in cmd


FALLBACK_SCRIPT = textwrap.dedent(
    """
    import importlib.abc, logging, sys
    class Block(importlib.abc.MetaPathFinder):  # the extension "was never built"
        def find_spec(self, name, path=None, target=None):
            if name == "fastft._C":
                raise ModuleNotFoundError("No module named 'fastft._C'", name=name)
    sys.meta_path.insert(0, Block())
    records = []
    class H(logging.Handler):
        def emit(self, r): records.append(r.getMessage())
    logging.getLogger("fastft").addHandler(H())
    import torch
    import fastft.ops as ops
    from fastft.quant import NF4Weight
    w = torch.randn(24, 40)
    q = NF4Weight.from_float(w)
    x = torch.randn(3, 40, requires_grad=True)
    ops.quant_matmul(x, q).sum().backward()
    ops.nf4_dequantize(q, torch.bfloat16)
    cpu = torch.device("cpu")
    print("BACKENDS", {op: ops.backend_for(op, cpu) for op in ("quant_matmul", "nf4_quantize", "nf4_dequantize")})
    print("DEFINED", hasattr(torch.ops.fastft, "nf4_matmul"))
    print("LOGS", sum("fastft._C" in m for m in records))
    """
)


def test_fallback_when_extension_missing():
    env = dict(os.environ, FASTFT_BACKEND="auto", PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-c", FALLBACK_SCRIPT], capture_output=True, text=True, env=env, cwd=REPO,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    out = dict(line.split(" ", 1) for line in r.stdout.splitlines() if line.split(" ", 1)[0] in
               ("BACKENDS", "DEFINED", "LOGS"))
    # Without the extension the lean torch compositions take the ops they have, pure torch the rest.
    assert eval(out["BACKENDS"]) == {"quant_matmul": "torch", "nf4_quantize": "reference",
                                     "nf4_dequantize": "reference"}
    assert out["DEFINED"] == "False"
    assert out["LOGS"] == "1", "the fallback must be announced exactly once"


needs_ext = pytest.mark.skipif(not cpp.AVAILABLE, reason="fastft._C not built (test_extension_builds_and_loads fails)")


# --------------------------------------------------------------------------------------------
# NF4 quantize: bytes equal
# --------------------------------------------------------------------------------------------
SHAPES = [(1, 1), (1, 3), (3, 5), (40, 200), (200, 40), (97, 41), (64, 64)]


@needs_ext
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("blocksize", [32, 64, 256])
@pytest.mark.parametrize("double_quant", [False, True])
def test_nf4_quantize_bytes_equal_reference(isa, shape, blocksize, double_quant):
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        w = (torch.randn(shape) * 0.05).to(dtype)
        same_nf4(ref("nf4_quantize", "cpp")(w, blocksize, double_quant),
                 ref("nf4_quantize", "reference")(w, blocksize, double_quant))


@needs_ext
def test_nf4_quantize_edge_values(isa):
    """Ties on fp32 midpoints go low; all-zero blocks; subnormals; a large weight's nested groups."""
    code = NF4Weight.from_float(torch.ones(1, 2)).quant_map
    mids = (code[:-1] + code[1:]) / 2  # fp32, as the quantizers compute them
    tie = torch.cat([torch.ones(1), mids, -mids, torch.zeros(1)])  # absmax 1: scaled == x exactly
    w = torch.cat([tie, torch.zeros(64), torch.full((64,), 1e-41), torch.randn(4096 * 3 + 31) * 1e3])
    w = w[: w.numel() // 7 * 7].view(-1, 7)
    for dq in (False, True):
        same_nf4(ref("nf4_quantize", "cpp")(w, 64, dq), ref("nf4_quantize", "reference")(w, 64, dq))
    with pytest.raises(ValueError, match="inf or NaN"):
        ref("nf4_quantize", "cpp")(torch.tensor([[1.0, float("nan")] * 40]), 64, True)
    with pytest.raises(ValueError, match="inf or NaN"):
        ref("nf4_quantize", "cpp")(torch.tensor([[1.0, float("inf")] * 40]), 64, True)


@needs_ext
@pytest.mark.parametrize("shape", [(40, 200), (97, 41), (3, 5)])
@pytest.mark.parametrize("blocksize", [64, 128])
def test_nf4_codes_equal_bitsandbytes(shape, blocksize):
    bnbf = pytest.importorskip("bitsandbytes.functional")
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        w = torch.randn(shape).to(dtype)
        packed, state = bnbf.quantize_4bit(w, blocksize=blocksize, quant_type="nf4", compress_statistics=False)
        q = ref("nf4_quantize", "cpp")(w, blocksize, False)
        assert torch.equal(q.data, packed) and torch.equal(bits(q.absmax), bits(state.absmax))


# --------------------------------------------------------------------------------------------
# NF4 dequantize: bit-identical, new or preallocated output
# --------------------------------------------------------------------------------------------
@pytest.fixture(params=["cached", "streaming"])
def store_kind(request):
    """Ordinary stores, and the non-temporal stores used for outputs larger than the caches
    (forced here for small outputs, whose start may then be misaligned: the kernel must check)."""
    from fastft import _C

    old = _C.stream_bytes()
    if request.param == "streaming":
        _C.set_stream_bytes(0)
    yield request.param
    _C.set_stream_bytes(old)


@needs_ext
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("blocksize", [32, 64])
def test_nf4_dequantize_bitwise(isa, store_kind, shape, blocksize):
    w = torch.randn(shape)
    for dq in (False, True):
        q = ref("nf4_quantize", "reference")(w, blocksize, dq)
        for dtype in LOWP:
            expect = ref("nf4_dequantize", "reference")(q, dtype)
            got = ref("nf4_dequantize", "cpp")(q, dtype)
            assert got.shape == shape and got.dtype == dtype
            assert torch.equal(bits(got), bits(expect)), f"{dtype}: {(got != expect).sum().item()} values differ"
            out = torch.full(shape, float("nan"), dtype=dtype)
            assert cpp.nf4_dequantize_into(q, out) is out
            assert torch.equal(bits(out), bits(expect))
            # A buffer 4 bytes past a 64-byte boundary: streaming stores must fall back to ordinary ones.
            off = torch.empty(out.numel() + 16, dtype=dtype)[4 // out.element_size():][: out.numel()].view(shape)
            cpp.nf4_dequantize_into(q, off)
            assert torch.equal(bits(off), bits(expect))


@needs_ext
def test_nf4_dequantize_large_output():
    """Outputs of 8 MiB and more are allocated in huge pages (and 16 MiB and more streamed): still
    bit-identical, and an ordinary tensor that autograd and in-place ops accept."""
    q = ref("nf4_quantize", "reference")(torch.randn(1024, 2049), 64, True)
    for dtype in (torch.float32, torch.bfloat16):
        got = ref("nf4_dequantize", "cpp")(q, dtype)
        assert torch.equal(bits(got), bits(ref("nf4_dequantize", "reference")(q, dtype)))
    got.mul_(2).requires_grad_(True).sum().backward()
    assert got.grad is not None and got.grad.shape == got.shape


@needs_ext
def test_large_outputs_reuse_freed_buffers():
    """Freed outputs of >= 8 MiB are handed to the next output of the same size (no fresh pages),
    bounded by the cap; cap 0 holds nothing. Contents are rewritten in full every time."""
    from fastft import _C

    q = ref("nf4_quantize", "reference")(torch.randn(1024, 2304), 64, True)  # 9 MiB fp32 out
    expect = ref("nf4_dequantize", "reference")(q, torch.float32)
    old = _C.reuse_cap()
    try:
        _C.set_reuse_cap(64 << 20)
        _C.clear_reuse_cache()
        a = ref("nf4_dequantize", "cpp")(q, torch.float32)
        ptr = a.data_ptr()
        a.fill_(float("nan"))
        del a
        assert _C.reuse_cached_bytes() == 10 << 20  # rounded up to whole 2 MiB pages
        b = ref("nf4_dequantize", "cpp")(q, torch.float32)
        assert b.data_ptr() == ptr and _C.reuse_cached_bytes() == 0
        assert torch.equal(bits(b), bits(expect))
        c = ref("nf4_dequantize", "cpp")(q, torch.float32)  # b still alive: fresh memory
        assert c.data_ptr() != ptr and torch.equal(bits(c), bits(expect))
        _C.set_reuse_cap(12 << 20)
        del b, c  # only one 10 MiB buffer fits under a 12 MiB cap
        assert _C.reuse_cached_bytes() == 10 << 20
        _C.set_reuse_cap(0)
        assert _C.reuse_cached_bytes() == 0
        d = ref("nf4_dequantize", "cpp")(q, torch.float32)
        del d
        assert _C.reuse_cached_bytes() == 0
    finally:
        _C.set_reuse_cap(old)


@needs_ext
def test_nf4_dequantize_rounding_corners(isa):
    """Output casts round to nearest even like torch, incl. subnormal and overflowing products."""
    n = 64 * 8
    q0 = NF4Weight.from_float(torch.randn(8, 64), blocksize=64, double_quant=False)
    # Scales whose products land in fp16/bf16 subnormals, overflow fp16, or are fp32 subnormals.
    absmax = torch.tensor([1e-39, 3e-6, 7e-8, 1e5, 7e4, 1.0, 3.3e38, 1e-45], dtype=torch.float32)
    data = torch.randint(0, 256, ((n + 1) // 2, 1), dtype=torch.uint8)
    q = NF4Weight(data, (8, 64), 64, torch.float32, q0.quant_map, absmax)
    for dtype in LOWP:
        expect = ref("nf4_dequantize", "reference")(q, dtype)
        assert torch.equal(bits(ref("nf4_dequantize", "cpp")(q, dtype)), bits(expect)), dtype


@needs_ext
def test_nf4_dequantize_out_errors():
    q = NF4Weight.from_float(torch.randn(8, 64))
    with pytest.raises(RuntimeError, match="shape"):
        cpp.nf4_dequantize_into(q, torch.empty(64, 8))
    with pytest.raises(RuntimeError, match="contiguous"):
        cpp.nf4_dequantize_into(q, torch.empty(64, 8).t())
    with pytest.raises(RuntimeError, match="dtype"):
        cpp.nf4_dequantize_into(q, torch.empty(8, 64, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="absmax must hold"):
        torch.ops.fastft.nf4_dequantize(q.data, q.absmax[:-1], q.quant_map, q.nested_absmax, q.nested_quant_map,
                                        q.offset, 64, 256, [8, 64], torch.float32)


# --------------------------------------------------------------------------------------------
# Int4
# --------------------------------------------------------------------------------------------
@needs_ext
@pytest.mark.parametrize("shape,group_size", [((3, 40), 40), ((40, 200), 40), ((97, 64), 32), ((5, 45), 5),
                                              ((64, 256), 128)])
@pytest.mark.parametrize("symmetric", [False, True])
def test_int4_bytes_and_dequant_equal_reference(isa, shape, group_size, symmetric):
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        w = torch.randn(shape).to(dtype)
        w[0, :group_size] = 0  # an all-zero group
        a = ref("int4_quantize", "cpp")(w, group_size, symmetric)
        b = ref("int4_quantize", "reference")(w, group_size, symmetric)
        assert torch.equal(a.data, b.data), f"{(a.data != b.data).sum().item()} bytes differ"
        assert torch.equal(bits(a.scales), bits(b.scales))
        assert (a.zeros is None) == symmetric and (symmetric or torch.equal(bits(a.zeros), bits(b.zeros)))
        for out in LOWP:
            assert torch.equal(bits(ref("int4_dequantize", "cpp")(b, out)), bits(ref("int4_dequantize", "reference")(b, out)))
    with pytest.raises(ValueError, match="inf or NaN"):
        ref("int4_quantize", "cpp")(torch.full((2, group_size), float("inf")), group_size, symmetric)


# --------------------------------------------------------------------------------------------
# Quant-matmul: forward and dX against float64 gold
# --------------------------------------------------------------------------------------------
def _weights(N, K):
    w = torch.randn(N, K) / K ** 0.5
    return [ref("nf4_quantize", "reference")(w, 64, True), ref("nf4_quantize", "reference")(w, 32, False),
            ref("int4_quantize", "reference")(w, 40 if K % 40 == 0 else 8, False)]


@pytest.fixture(params=["default", "tiled-small", "full"])
def strategy(request):
    """default: the fused dequantize-dot kernel for M <= 16, tiles + BLAS above; tiled-small:
    tiles + BLAS for every M, with tiles of a few rows (many tile edges); full: whole-weight scratch."""
    from fastft import _C

    old_tile, old_m = _C.tile_elems(), _C.fused_max_m()
    _C.set_matmul_strategy("full" if request.param == "full" else "tiled")
    if request.param == "tiled-small":
        _C.set_tile_elems(300)
        _C.set_fused_max_m(0)
    yield request.param
    _C.set_matmul_strategy("tiled")
    _C.set_tile_elems(old_tile)
    _C.set_fused_max_m(old_m)


@needs_ext
@pytest.mark.parametrize("M", [1, 3, 97])
@pytest.mark.parametrize("N,K", [(40, 200), (200, 40)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quant_matmul_vs_gold(strategy, M, N, K, dtype):
    for q in _weights(N, K):
        w64 = q.dequantize(torch.float64)  # exact: products of fp32 values widened
        wl = q.dequantize(dtype)
        x = torch.randn(M, K).to(dtype).requires_grad_(True)
        bias = torch.randn(N, dtype=dtype, requires_grad=True)
        y = ref("quant_matmul", "cpp")(x, q, bias)
        assert y.dtype == dtype
        gold = x.detach().double() @ w64.t() + bias.detach().double()
        assert_close_to_gold(y.detach(), gold, F.linear(x.detach(), wl, bias.detach()), name=f"y {type(q).__name__}")
        dy = torch.randn(M, N).to(dtype)
        dx, db = torch.autograd.grad(y, (x, bias), dy)
        assert dx.dtype == dtype and db.dtype == dtype
        assert_close_to_gold(dx, dy.double() @ w64, dy @ wl, name="dx")
        assert_close_to_gold(db, dy.double().sum(0), dy.sum(0), name="dbias")


@needs_ext
def test_quant_matmul_fused_every_isa(isa):
    """The small-M dequantize-dot kernel on each SIMD path (K = 200: vector body and scalar tail)."""
    for q in _weights(40, 200):
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(3, 200).to(dtype)
            bias = torch.randn(40, dtype=dtype)
            y = ref("quant_matmul", "cpp")(x, q, bias)
            gold = x.double() @ q.dequantize(torch.float64).t() + bias.double()
            assert_close_to_gold(y, gold, F.linear(x, q.dequantize(dtype), bias), name=f"{isa} {dtype}")


@needs_ext
def test_quant_matmul_batched_autocast_and_no_bias():
    q = ref("nf4_quantize", "reference")(torch.randn(48, 64), 64, True)
    x = torch.randn(2, 5, 64, requires_grad=True)
    y = ref("quant_matmul", "cpp")(x, q)
    assert y.shape == (2, 5, 48)
    yr = ref("quant_matmul", "reference")(x, q)
    assert_close_to_gold(y, x.double() @ q.dequantize(torch.float64).t(), yr)
    (dx,) = torch.autograd.grad(y.sum(), x)
    assert dx.shape == x.shape and dx.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        yb = ref("quant_matmul", "cpp")(x, q)
        yrb = ref("quant_matmul", "reference")(x, q)
    assert yb.dtype == torch.bfloat16 == yrb.dtype
    assert_close_to_gold(yb, x.double() @ q.dequantize(torch.float64).t(), yrb)
    (dxb,) = torch.autograd.grad(yb.float().sum(), x)
    assert dxb.dtype == torch.float32
    # float64 activations (gold computations) go to the reference, exactly.
    x64 = x.detach().double()
    assert torch.equal(ref("quant_matmul", "cpp")(x64, q), ref("quant_matmul", "reference")(x64, q))


@needs_ext
def test_quant_matmul_saves_nothing_dequantized():
    q = ref("nf4_quantize", "reference")(torch.randn(96, 128), 64, True)
    x = torch.randn(4, 128, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = ref("quant_matmul", "cpp")(x, q, torch.zeros(96, requires_grad=True))
    allowed = {t.data_ptr() for t in (q.data, q.absmax, q.quant_map, q.nested_absmax, q.nested_quant_map)}
    assert saved and all(t.data_ptr() in allowed for t in saved), [tuple(t.shape) for t in saved]
    y.sum().backward()
    assert x.grad is not None


@needs_ext
def test_quant_matmul_errors():
    q = ref("nf4_quantize", "reference")(torch.randn(16, 64), 64, True)
    with pytest.raises(ValueError, match="in_features"):
        ref("quant_matmul", "cpp")(torch.randn(2, 63), q)
    with pytest.raises(TypeError, match="floating-point"):
        ref("quant_matmul", "cpp")(torch.ones(2, 64, dtype=torch.int64), q)
    with pytest.raises(RuntimeError, match="in_features = 64"):
        torch.ops.fastft.nf4_matmul(torch.randn(2, 32), None, *cpp.nf4_args(q), 16, 64)
    qi = ref("int4_quantize", "reference")(torch.randn(16, 64), 32, False)
    with pytest.raises(RuntimeError, match=r"in_features \(64\) must be a multiple of group_size \(48\)"):
        torch.ops.fastft.int4_matmul(torch.randn(2, 64), None, qi.data, qi.scales, qi.zeros, 48, 16, 64)


# --------------------------------------------------------------------------------------------
# fused cross-entropy rows (the chunked LM loss's loss + gradient step)
# --------------------------------------------------------------------------------------------
def _ce_gold(z, t):
    """float64 per-row losses and d(sum)/dz via autograd on F.cross_entropy."""
    zz = z.double().requires_grad_(True)
    loss = F.cross_entropy(zz, t, ignore_index=-100, reduction="none")
    (g,) = torch.autograd.grad(loss.sum(), zz)
    return loss.detach(), g


@needs_ext
@pytest.mark.parametrize("V", [1, 5, 16, 17, 300, 49152])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ce_loss_grad_vs_gold(isa, V, dtype):
    gen = torch.Generator().manual_seed(V)
    n = 6
    z = (torch.randn(n, V, generator=gen) * 4).to(dtype)
    z[1] = z[1] + 60.0  # large logits: the max shift matters
    z[2] = 0.0          # all equal
    t = torch.randint(0, V, (n,), generator=gen)
    t[4] = -100         # an ignored row
    gold_loss, gold_grad = _ce_gold(z, t)
    got = z.clone()
    loss = torch.ops.fastft.ce_loss_grad_(got, t, -100)
    ref_z = z.clone()  # torch's own composition in the same dtype
    ref_loss = dispatch.impl("cross_entropy_grad_", "reference")(ref_z, t, -100)
    assert loss.dtype == torch.float32 and got.dtype == dtype
    assert_close_to_gold(loss, gold_loss, ref_loss, name="loss")
    assert_close_to_gold(got, gold_grad, ref_z, name="dlogits")
    assert loss[4] == 0 and (got[4] == 0).all()


@needs_ext
def test_ce_loss_grad_extremes(isa):
    z = torch.tensor([[1e4, -1e4, 0.0, -1e4] * 5, [-1e30, 3.0, -1e30, 3.0] * 5])
    t = torch.tensor([1, 0])
    gold_loss, gold_grad = _ce_gold(z, t)
    got = z.clone()
    loss = torch.ops.fastft.ce_loss_grad_(got, t, -100)
    assert torch.isfinite(loss).all() and torch.isfinite(got).all()
    torch.testing.assert_close(loss.double(), gold_loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got.double(), gold_grad, rtol=0, atol=1e-6)


@needs_ext
def test_ce_loss_grad_errors():
    o = torch.ops.fastft
    with pytest.raises(RuntimeError, match=r"target 7 at row 1 is outside \[0, 5\)"):
        o.ce_loss_grad_(torch.randn(2, 5), torch.tensor([0, 7]), -100)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        o.ce_loss_grad_(torch.randn(2, 5, dtype=torch.float16), torch.tensor([0, 1]), -100)
    with pytest.raises(RuntimeError, match="contiguous"):
        o.ce_loss_grad_(torch.randn(5, 2).t(), torch.tensor([0, 1]), -100)
    with pytest.raises(RuntimeError, match=r"targets must be \(2,\) int64"):
        o.ce_loss_grad_(torch.randn(2, 5), torch.tensor([0, 1, 2]), -100)
    with pytest.raises(ValueError, match="outside"):
        dispatch.impl("cross_entropy_grad_", "reference")(torch.randn(2, 5), torch.tensor([0, -3]))


@needs_ext
def test_cross_entropy_grad_dispatch(monkeypatch):
    """The public op routes fp32 / bf16 CPU logits to the kernel and everything else to the reference."""
    monkeypatch.delenv("FASTFT_BACKEND", raising=False)
    import fastft.ops as ops

    calls = []
    real = torch.ops.fastft.ce_loss_grad_
    monkeypatch.setattr(cpp.ops, "ce_loss_grad_", lambda *a: calls.append(a[0].dtype) or real(*a), raising=False)
    from fastft import _C

    want = [torch.bfloat16] if _C.isa() == "avx512" else []
    t = torch.tensor([2, -100, 0])
    for dt in (torch.bfloat16, torch.float16, torch.float64):
        z = torch.randn(3, 40, dtype=dt)
        zr = z.clone()
        loss = ops.cross_entropy_grad_(z, t)
        ref_loss = dispatch.impl("cross_entropy_grad_", "reference")(zr, t)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(z, zr, rtol=0, atol=float(torch.finfo(dt).eps))
    assert calls == want


# --------------------------------------------------------------------------------------------
# fused transformer-block rows: RMSNorm and SwiGLU's silu(g)·u
# --------------------------------------------------------------------------------------------
@needs_ext
@pytest.mark.parametrize("H", [1, 16, 37, 576])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_vs_gold(isa, H, dtype):
    gen = torch.Generator().manual_seed(H)
    x = (torch.randn(3, 7, H, generator=gen) * 3).to(dtype)
    x[0, 0] = 0.0  # an all-zero row: rms = sqrt(eps)
    w = (1 + 0.1 * torch.randn(H, generator=gen)).to(dtype)
    ours, ref = dispatch.impl("rms_norm", "cpp"), dispatch.impl("rms_norm", "reference")
    eps = 1e-5
    got = output_and_grads(lambda x, w: ours(x, w, eps), [x, w])
    gold = output_and_grads(lambda x, w: ref(x, w, eps), [x.double(), w.double()])
    lowp = output_and_grads(lambda x, w: ref(x, w, eps), [x, w])
    for name, a, b, c in zip(["y", "dx", "dw"], got, gold, lowp):
        assert a.dtype == c.dtype
        assert_close_to_gold(a, b, c, name=name)


@needs_ext
@pytest.mark.parametrize("n", [1, 15, 16, 4097 * 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_mul_vs_gold(isa, n, dtype):
    gen = torch.Generator().manual_seed(n)
    g = (torch.randn(n, generator=gen) * 4).to(dtype)
    g[0] = -100.0  # sigmoid underflow side
    if n > 1:
        g[1] = 100.0
    u = torch.randn(n, generator=gen).to(dtype)
    ours, ref = dispatch.impl("silu_mul", "cpp"), dispatch.impl("silu_mul", "reference")
    got = output_and_grads(ours, [g, u])
    gold = output_and_grads(ref, [g.double(), u.double()])
    lowp = output_and_grads(ref, [g, u])
    for name, a, b, c in zip(["y", "dg", "du"], got, gold, lowp):
        assert_close_to_gold(a, b, c, name=name)


@needs_ext
@pytest.mark.parametrize("D,d", [(64, 64), (40, 40), (128, 128), (64, 32), (80, 40)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_vs_gold(isa, D, d, dtype):
    gen = torch.Generator().manual_seed(D + d)
    B, T, H = 2, 5, 3
    x = torch.randn(B, T, H, D, generator=gen).to(dtype)
    ang = torch.randn(B, T, d // 2, generator=gen) * 3
    emb = torch.cat((ang, ang), -1)
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    ours, ref = dispatch.impl("rope", "cpp"), dispatch.impl("rope", "reference")
    got = output_and_grads(lambda x: ours(x, cos, sin), [x])
    gold = output_and_grads(lambda x: ref(x, cos.double(), sin.double()), [x.double()])
    lowp = output_and_grads(lambda x: ref(x, cos, sin), [x])
    for name, a, b, c in zip(["y", "dx"], got, gold, lowp):
        assert_close_to_gold(a, b, c, name=name)


@needs_ext
def test_fused_rows_fall_back_and_reject():
    ours = dispatch.impl("rms_norm", "cpp")
    x, w = torch.randn(2, 8, dtype=torch.float16), torch.ones(8, dtype=torch.float16)
    torch.testing.assert_close(ours(x, w, 1e-6), dispatch.impl("rms_norm", "reference")(x, w, 1e-6), rtol=0, atol=0)
    with pytest.raises(RuntimeError, match=r"weight must be \(8,\)"):
        torch.ops.fastft.rmsnorm_fwd(torch.randn(2, 8), torch.ones(7), 1e-6)
    with pytest.raises(RuntimeError, match="share one dtype"):
        torch.ops.fastft.rmsnorm_fwd(torch.randn(2, 8), torch.ones(8).bfloat16(), 1e-6)
    with pytest.raises(RuntimeError, match="same shape"):
        torch.ops.fastft.silu_mul(torch.randn(4), torch.randn(5))


# --------------------------------------------------------------------------------------------
# torch.library.opcheck: schema, fake kernel, autograd registration, AOT dispatch
# --------------------------------------------------------------------------------------------
@needs_ext
def test_opcheck_every_op():
    o = torch.ops.fastft
    w = torch.randn(24, 40)
    q = ref("nf4_quantize", "reference")(w, 32, True)
    qp = ref("nf4_quantize", "reference")(w, 64, False)
    qi = ref("int4_quantize", "reference")(w, 8, False)
    qs = ref("int4_quantize", "reference")(w, 8, True)
    x = torch.randn(3, 40, requires_grad=True)
    xb = torch.randn(2, 3, 40, dtype=torch.bfloat16, requires_grad=True)
    bias = torch.randn(24, requires_grad=True)
    cases = [
        (o.nf4_quantize.default, (w, 64)),
        (o.nf4_quantize.default, (w.bfloat16(), 32)),
        (o.quantize_blockwise_8bit.default, (torch.randn(300), q.nested_quant_map, 256)),
        (o.dequantize_blockwise_8bit.default, (q.absmax, q.nested_absmax, q.nested_quant_map, 256, q.offset)),
        (o.nf4_dequantize.default, (*cpp.nf4_args(q), [24, 40], torch.bfloat16)),
        (o.nf4_dequantize.default, (*cpp.nf4_args(qp), [24, 40], torch.float32)),
        (o.nf4_dequantize_out.default, (*cpp.nf4_args(q), [24, 40], torch.empty(24, 40))),
        (o.nf4_matmul.default, (x, bias, *cpp.nf4_args(q), 24, 40)),
        (o.nf4_matmul.default, (xb, None, *cpp.nf4_args(qp), 24, 40)),
        (o.nf4_matmul_grad_x.default, (torch.randn(3, 24), *cpp.nf4_args(q), 24, 40)),
        (o.int4_quantize.default, (w, 8, False)),
        (o.int4_quantize.default, (w, 8, True)),
        (o.int4_dequantize.default, (*cpp.int4_args(qi), 24, 40, torch.float16)),
        (o.int4_dequantize.default, (*cpp.int4_args(qs), 24, 40, torch.float32)),
        (o.int4_matmul.default, (x, bias, *cpp.int4_args(qi), 24, 40)),
        (o.int4_matmul.default, (xb, None, *cpp.int4_args(qs), 24, 40)),
        (o.int4_matmul_grad_x.default, (torch.randn(3, 24), *cpp.int4_args(qi), 24, 40)),
        (o.ce_loss_grad_.default, (torch.randn(4, 37), torch.tensor([3, -100, 0, 36]), -100)),
        (o.rmsnorm_fwd.default, (torch.randn(3, 5, 24, requires_grad=True), torch.rand(24) + 0.5, 1e-6)),
        (o.rmsnorm_fwd.default, (torch.randn(4, 40).bfloat16(), torch.rand(40).bfloat16(), 1e-5)),
        (o.silu_mul.default, (torch.randn(3, 33, requires_grad=True), torch.randn(3, 33, requires_grad=True))),
        (o.silu_mul.default, (torch.randn(70).bfloat16(), torch.randn(70).bfloat16())),
        (o.rope.default, (torch.randn(2, 3, 4, 32, requires_grad=True), torch.randn(2, 3, 32), torch.randn(2, 3, 32), False)),
        (o.rope.default, (torch.randn(1, 2, 3, 40).bfloat16(), torch.randn(1, 2, 20).bfloat16(), torch.randn(1, 2, 20).bfloat16(),
                          True)),
        (o.rmsnorm_bwd.default, (torch.randn(3, 24), torch.randn(3, 24), torch.rand(24), torch.rand(3) + 0.5)),
        (o.silu_mul_bwd.default, (torch.randn(50).bfloat16(), torch.randn(50).bfloat16(), torch.randn(50).bfloat16())),
        (o.attn_fwd.default, (torch.randn(2, 4, 5, 8, requires_grad=True), torch.randn(2, 2, 7, 8, requires_grad=True),
                              torch.randn(2, 2, 7, 8, requires_grad=True), 0.3, True)),
        (o.attn_fwd.default, (torch.randn(1, 2, 70, 16).bfloat16(), torch.randn(1, 1, 70, 16).bfloat16(),
                              torch.randn(1, 1, 70, 16).bfloat16(), 0.25, False)),
        (o.attn_fwd.default, (torch.randn(2, 2, 9, 16, requires_grad=True), torch.randn(2, 1, 9, 16, requires_grad=True),
                              torch.randn(2, 1, 9, 16, requires_grad=True), 0.25, True,
                              torch.tensor([[True] * 9, [False] * 3 + [True] * 6]))),
        (o.ce_loss_grad_.default, (torch.randn(2, 50, dtype=torch.bfloat16), torch.tensor([1, 2]), -100)),
    ]
    q, k, v = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 7, 8), torch.randn(2, 2, 7, 8)
    out, lse = o.attn_fwd(q, k, v, 0.3, True)
    cases.append((o.attn_bwd.default, (torch.randn(2, 4, 5, 8), q, k, v, out, lse, 0.3, True)))
    for op, args in cases:
        torch.library.opcheck(op, args)


@needs_ext
def test_dispatch_picks_cpp_and_logs_nothing(caplog, monkeypatch):
    monkeypatch.delenv("FASTFT_BACKEND", raising=False)
    import fastft.ops as ops

    with caplog.at_level(logging.INFO, logger="fastft"):
        q = NF4Weight.from_float(torch.randn(16, 64))
        y = ops.quant_matmul(torch.randn(2, 64), q)
    assert y.shape == (2, 16)
    assert not [r for r in caplog.records if "fastft._C" in r.getMessage()]
