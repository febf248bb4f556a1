"""Ahead-of-time compilation of the fused LoRA kernels (fastft/kernels/lora.py, lora_fused.py) for
sm_80 (A100) and sm_90 (H100), no GPU needed.

Every config the autotuner can pick must compile; the hot configs (the large-M training tiles,
``lora.HOT_CONFIGS``) and the fixed launch configs must not spill registers; on sm_90 the hot
GEMM tiles must use wgmma. Uses tests/aot.py (ptxas + cuobjdump shipped inside Triton).
"""
import pytest

from fastft.kernels import _common, lora_fused
from fastft.kernels import lora as triton_lora
from tests.aot import compile_kernel, cuobjdump_path, sass_ops
ARCHS = [80, 90]


def _ptrs(names, dt="*fp16:16"):
    # ":16": 16-byte aligned pointers / multiples of 16, as the JIT specializes aligned training shapes
    return {n: dt for n in names}


def _fwd_spec(cfg_kwargs, *, bias=True, base_in=False):
    sig = {**_ptrs(["X", "W", "U", "B", "BIAS", "Y"]), "M": "i32", "N": "i32:16", "K": "i32:16", "R": "i32:16",
           "stride_xm": "i32:16", "scaling": "fp32", "M_KEY": "i32:16"}
    ce = dict(HAS_BIAS=bias, BASE_IN=base_in, EVEN_K=True, EVEN_R=True, UPCAST=False, PRECISION="ieee", BLOCK_R=16,
              TMA_OK=bool(cfg_kwargs.get("USE_TMA")), **{"USE_TMA": False, **cfg_kwargs})
    return triton_lora._lora_fwd_kernel, sig, ce


def _dx_spec(cfg_kwargs, *, num_seg=1, dropout=False, has_w=True):
    names = [f"{p}{i}" for p in ("DY", "W", "DU", "A") for i in range(3)] + ["DX"]
    sig = {**_ptrs(names), "M": "i32", "K": "i32:16", "N0": "i32:16", "N1": "i32:16", "N2": "i32:16",
           "R0": "i32:16", "R1": "i32:16", "R2": "i32:16", "seed0": "i64", "seed1": "i64", "seed2": "i64", "p": "fp32",
           "keep_scale": "fp32", "M_KEY": "i32:16"}
    ce = dict(NUM_SEG=num_seg, HAS_W=has_w, HAS_DROPOUT=dropout, EVEN_K=True, EVEN_OUT=True, UPCAST=False, PRECISION="ieee",
              BLOCK_R=16, TMA_OK=bool(cfg_kwargs.get("USE_TMA")), **{"USE_TMA": False, **cfg_kwargs})
    return triton_lora._lora_dx_kernel, sig, ce


def _mm_spec(cfg_kwargs, layout):
    """du = s·dY B: P row-major (stride_pk = 1); dW = dYᵀ x: P transposed (stride_pm = 1). A stride of 1 is
    a compile-time constant at run time (Triton specializes integer arguments equal to 1)."""
    sig = {**_ptrs(["P", "Q", "C"]), "M": "i32", "N": "i32:16", "K": "i32", "stride_qk": "i32:16",
           "alpha": "fp32", "M_KEY": "i32:16"}
    ones = {"stride_pk": 1, "stride_qn": 1} if layout == "du" else {"stride_pm": 1, "stride_qn": 1}
    other = "stride_pm" if layout == "du" else "stride_pk"
    sig[other] = "i32:16"
    return triton_lora._matmul_kernel, sig, dict(EVEN_K=True, EVEN_M=True, EVEN_N=True, UPCAST=False, PRECISION="ieee", **ones,
                                       **cfg_kwargs)


def _swiglu_spec(cfg_kwargs):
    sig = {**_ptrs(["X", "WG", "WU", "UG", "UU", "BG", "BU", "BIASG", "BIASU", "G", "UP", "H"]),
           "M": "i32", "N": "i32:16", "K": "i32:16", "RG": "i32:16", "RU": "i32:16", "stride_xm": "i32:16",
           "sg": "fp32", "su": "fp32", "M_KEY": "i32:16"}
    ce = dict(HAS_BIAS=False, STORE_GU=True, EVEN_K=True, UPCAST=False, PRECISION="ieee", BLOCK_R=16, **cfg_kwargs)
    return lora_fused._lora_swiglu_fwd_kernel, sig, ce


def _down_spec(num_seg, dropout, block_r, bm, bk):
    sig = {**_ptrs(["X", "A0", "A1", "A2", "U0", "U1", "U2"]), "M": "i32", "K": "i32:16", "R0": "i32:16",
           "R1": "i32:16", "R2": "i32:16", "stride_xm": "i32:16", "seed0": "i64", "seed1": "i64", "seed2": "i64",
           "p": "fp32", "keep_scale": "fp32"}
    ce = dict(NUM_SEG=num_seg, HAS_DROPOUT=dropout, UPCAST=False, PRECISION="ieee", BLOCK_M=bm, BLOCK_R=block_r,
              BLOCK_K=bk)
    return triton_lora._lora_down_kernel, sig, ce


def _dA_spec(num_seg, dropout, block_r, bm, bk):
    sig = {**_ptrs(["X", "DU0", "DU1", "DU2", "DA0", "DA1", "DA2"]), "M": "i32", "K": "i32:16", "R0": "i32:16",
           "R1": "i32:16", "R2": "i32:16", "stride_xm": "i32:16", "seed0": "i64", "seed1": "i64", "seed2": "i64",
           "p": "fp32", "keep_scale": "fp32"}
    ce = dict(NUM_SEG=num_seg, HAS_DROPOUT=dropout, UPCAST=False, PRECISION="ieee", BLOCK_M=bm, BLOCK_R=block_r,
              BLOCK_K=bk)
    return triton_lora._lora_dA_kernel, sig, ce


def _compile(spec, arch, num_warps=4, num_stages=3):
    kernel, sig, ce = spec
    return compile_kernel(kernel, sig, ce, arch, num_warps, num_stages)


def _no_spills(r, what):
    if r["spills"] is None:
        pytest.fail(f"{what}: cannot read register use ({r['cuobjdump']})")
    assert r["spills"] == 0, f"{what}: {r['spills']} bytes spilled, {r['registers']} registers"


def _cfg_id(c):
    k = c.kwargs
    return f"{k['BLOCK_M']}x{k['BLOCK_N']}x{k['BLOCK_K']}w{c.num_warps}s{c.num_stages}"


def test_cuobjdump_available():
    assert cuobjdump_path() is not None, "Triton's cuobjdump is missing: spill checks would be vacuous"


_CACHE = {}


def _result(key, spec, arch, cfg=None, warps=4, stages=3):
    """Compile once per test session (several tests inspect the same binaries)."""
    if cfg is not None:
        warps, stages = cfg.num_warps, cfg.num_stages
    k = (key, arch, warps, stages)
    if k not in _CACHE:
        _CACHE[k] = _compile(spec, arch, warps, stages)
    return _CACHE[k]


@pytest.mark.parametrize("idx", range(len(triton_lora.gemm_configs())), ids=[_cfg_id(c) for c in triton_lora.gemm_configs()])
def test_every_fwd_config_compiles_sm90(idx):
    """Every autotune config of the fused forward compiles (sm_90); hot ones don't spill, use wgmma."""
    cfg = triton_lora.gemm_configs()[idx]
    r = _result(("fwd", _cfg_id(cfg)), _fwd_spec(cfg.kwargs), 90, cfg)
    assert r["ptx"]
    if idx < triton_lora.HOT_CONFIGS:
        _no_spills(r, f"fwd {_cfg_id(cfg)} sm_90")
        assert r["wgmma"], f"fwd {_cfg_id(cfg)}: no wgmma on sm_90"


@pytest.mark.parametrize("idx", range(len(triton_lora.gemm_configs(dropout=True))),
                         ids=[_cfg_id(c) for c in triton_lora.gemm_configs(dropout=True)])
def test_every_dx_dropout_config_compiles_sm90(idx):
    """The dX kernel with dropout (second accumulator + Philox) has its own configs: none may spill."""
    cfg = triton_lora.gemm_configs(dropout=True)[idx]
    r = _result(("dxd", _cfg_id(cfg)), _dx_spec(cfg.kwargs, dropout=True), 90, cfg)
    _no_spills(r, f"dx+dropout {_cfg_id(cfg)} sm_90")


@pytest.mark.parametrize("arch", ARCHS)
def test_hot_configs_no_spills(arch):
    """Hot tiles of every GEMM-shaped kernel: forward, dX (1 and 3 segments, with/without dropout), the
    backward matmul in its du (row-major P) and dW (transposed P) layouts, the quantized-base epilogue,
    and the SwiGLU forward."""
    for i, cfg in enumerate(triton_lora.gemm_configs()[:triton_lora.HOT_CONFIGS]):
        r = _result(("fwd", _cfg_id(cfg)), _fwd_spec(cfg.kwargs), arch, cfg)
        _no_spills(r, f"fwd {_cfg_id(cfg)} sm_{arch}")
        if arch == 90:
            assert r["wgmma"]
    hot = triton_lora.gemm_configs()[0]
    checks = [
        ("dx", _dx_spec(hot.kwargs), hot),
        ("dx qkv", _dx_spec(hot.kwargs, num_seg=3), hot),
        ("fwd base_in", _fwd_spec(hot.kwargs, base_in=True), hot),
        ("mm du", _mm_spec(hot.kwargs, layout="du"), hot),
        ("mm dW", _mm_spec(hot.kwargs, layout="dW"), hot),
        ("swiglu", _swiglu_spec(triton_lora.gemm_configs(2)[0].kwargs), triton_lora.gemm_configs(2)[0]),
        ("dx+dropout qkv", _dx_spec(triton_lora.gemm_configs(dropout=True)[2].kwargs, num_seg=3, dropout=True),
         triton_lora.gemm_configs(dropout=True)[2]),
    ]
    for name, spec, cfg in checks:
        r = _result((name, _cfg_id(cfg)), spec, arch, cfg)
        _no_spills(r, f"{name} {_cfg_id(cfg)} sm_{arch}")
        if arch == 90 and name.startswith(("dx", "mm", "swiglu")):
            assert r["wgmma"], f"{name}: no wgmma on sm_90"


def test_tma_variants_compile_sm90():
    """The TMA twins of the big tiles (forward and dX K-loops through tensor descriptors) compile for
    sm_90 without spills, with wgmma, and load through the TMA (UTMALDG); their pointer-load twins
    have cp.async (LDGSTS) copies where these have TMA ones (the rank-r loop keeps pointer loads)."""
    for cfg in (c for c in triton_lora.gemm_configs(tma=True) if c.kwargs.get("USE_TMA")):
        plain = {k: v for k, v in cfg.kwargs.items() if k != "USE_TMA"}
        for name, spec, spec_plain in (("fwd", _fwd_spec(cfg.kwargs), _fwd_spec(plain)),
                                       ("dx", _dx_spec(cfg.kwargs), _dx_spec(plain)),
                                       ("dx qkv", _dx_spec(cfg.kwargs, num_seg=3), _dx_spec(plain, num_seg=3))):
            r = _result((name + " tma", _cfg_id(cfg)), spec, 90, cfg)
            _no_spills(r, f"{name} {_cfg_id(cfg)} TMA sm_90")
            assert r["wgmma"], f"{name} {_cfg_id(cfg)} TMA: no wgmma"
            ops = sass_ops(r)
            ops_plain = sass_ops(_result((name, _cfg_id(cfg)), spec_plain, 90, cfg))
            assert any(op.startswith("UTMALDG") for op in ops), f"{name}: no TMA load"
            ldgsts = sum(op.startswith("LDGSTS") for op in ops)
            assert ldgsts < sum(op.startswith("LDGSTS") for op in ops_plain), f"{name}: as many cp.async as without TMA"


@pytest.mark.parametrize("arch", ARCHS)
def test_rank_kernels_no_spills(arch):
    """Down projection and dA at the launcher's tiles, worst case (3 segments, dropout, BLOCK_R 64)."""
    for name, mk, seg, drop, br in [("down", _down_spec, 3, True, 64), ("dA", _dA_spec, 3, True, 64),
                                    ("down 1", _down_spec, 1, True, 64), ("dA 1", _dA_spec, 1, False, 64)]:
        bm, bk, warps = (64, 32, 8) if drop and seg > 1 else (64, 64, 8)  # lora._rank_tiles on a GPU
        _no_spills(_result((name,), mk(seg, drop, br, bm, bk), arch, warps=warps), f"{name} sm_{arch}")


@pytest.mark.parametrize("arch", ARCHS)
def test_elementwise_kernels_no_spills(arch):
    r = compile_kernel(lora_fused._swiglu_bwd_kernel, _ptrs(["DH", "G", "UP", "DG", "DUP"]) | {"n": "i64"},
                       {"BLOCK": 1024}, arch, 4, 3)
    _no_spills(r, "swiglu bwd")
    r = compile_kernel(_common._keep_mask_kernel, {"OUT": "*i8:16", "seed": "i64", "p": "fp32", "ROWS": "i32",
                                                   "COLS": "i32"}, {"BLOCK_R": 64, "BLOCK_C": 64}, arch, 4, 3)
    _no_spills(r, "dropout mask")
