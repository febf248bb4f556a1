"""Ahead-of-time compilation of the 4-bit matmul kernels (fastft/kernels/quant_matmul.py) for sm_80 and sm_90.

No GPU needed (tests/aot.py drives Triton's own ptxas / cuobjdump). Every quant-matmul config the
autotuner can pick (``quant_matmul.matmul_configs``, all kinds) compiles for both archs without
register spills, and the training tiles (BLOCK_M >= 64) use wgmma on sm_90. Each compile prints
shared memory, registers and spills (run with -s to see the table).
"""
import pytest

from fastft.kernels import quant_matmul as qmm
from tests.aot import assert_no_spills, compile_kernel, pristine_triton_language, report  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("pristine_triton_language")
ARCHS = [80, 90]


def _mm_spec(kind, *, act=None, qtype=0, double_quant=True, symmetric=False, has_bias=True, split_k=None,
             has_lora=False):
    bwd = "bwd" in kind
    aligned = not kind.endswith("_general")
    act = act or ("*fp32" if kind.startswith("fp32_") else "*bf16")
    sig = {("dy_ptr" if bwd else "x_ptr"): act, "data_ptr": "*u8",
           "scale_ptr": "*u8" if (qtype == 0 and double_quant) else "*fp32",
           "aux_ptr": "*fp32", "auxmap_ptr": "*fp32", "qmap_ptr": "*fp32"}
    if not bwd:
        sig["bias_ptr"] = act
    sig[("dx_ptr" if bwd else "out_ptr")] = act if (bwd or split_k in (None, 1)) else "*fp32"
    if not bwd:
        sig.update({"u_ptr": act, "lb_ptr": act})
    sig.update({"M": "i32", "N": "i32", "K": "i32", ("stride_dym" if bwd else "stride_xm"): "i32",
                "offset": "fp32", "M_BUCKET": "i32"})
    if not bwd:
        sig.update({"R": "i32", "scaling": "fp32"})
    ce = dict(QTYPE=qtype, DOUBLE_QUANT=double_quant, SYMMETRIC=symmetric, ALIGNED=aligned, QBLOCK=128, NBS=256,
              UPCAST=False, PRECISION="ieee")
    if not bwd:
        ce.update(HAS_BIAS=has_bias and split_k in (None, 1),
                  SPLIT_K=split_k or (4 if "decode" in kind else 1),
                  HAS_LORA=has_lora and split_k in (None, 1), BLOCK_R=32)
    return (qmm._quant_matmul_bwd_kernel if bwd else qmm._quant_matmul_fwd_kernel), sig, ce


# fp32 activations (FMA dots) are no hot path: a few spilled bytes are tolerated there.
FP32_SPILL_LIMIT = 32


def _configs():
    for kind in ("fwd", "bwd", "fwd_general", "decode_general", "bwd_general", "fp32_fwd", "fp32_decode",
                 "fp32_bwd"):
        for cfg in qmm.matmul_configs(kind):
            k = cfg.kwargs
            yield pytest.param(kind, cfg, id=f"{kind}-{k['BLOCK_M']}x{k['BLOCK_N']}x{k['BLOCK_K']}"
                                               f"-w{cfg.num_warps}s{cfg.num_stages}")


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kind,cfg", list(_configs()))
def test_matmul_config_compiles(kind, cfg, arch):
    """NF4 double-quant, bf16 (fp32 for the fp32_* lists), bias: every config in every list."""
    kernel, sig, ce = _mm_spec(kind)
    r = compile_kernel(kernel, sig, {**ce, **cfg.kwargs}, arch, cfg.num_warps, cfg.num_stages)
    what = f"quant_matmul {kind} {cfg.kwargs} w{cfg.num_warps} s{cfg.num_stages}"
    report(what, r)
    if kind.startswith("fp32_"):
        assert r["spills"] is not None and r["spills"] <= FP32_SPILL_LIMIT, f"{what}: {r['spills']} bytes spilled"
        return
    assert_no_spills(r, what)
    if arch == 90 and cfg.kwargs["BLOCK_M"] >= 64:
        assert r["wgmma"], f"{what}: no wgmma on sm_90"


# The other flag combinations share the code paths above (fwd and bwd decode W tiles with the
# same helper); each is compiled once, on the hottest tile, alternating fwd / bwd.
VARIANTS = {
    "int4-asym-fp16": ("fwd", dict(act="*fp16", qtype=1, double_quant=False, symmetric=False)),
    "int4-sym-bf16": ("bwd", dict(qtype=1, double_quant=False, symmetric=True)),
    "int4-sym-bf16-nobias": ("fwd", dict(qtype=1, double_quant=False, symmetric=True, has_bias=False)),
    "nf4-fp16": ("bwd", dict(act="*fp16", double_quant=False)),
    "nf4dq-bf16-lora": ("fwd", dict(has_lora=True)),  # the LoRA epilogue
}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_matmul_variants_compile(variant, arch):
    kind, kw = VARIANTS[variant]
    # the hottest tile the variant may pick (the LoRA epilogue caps the tile: quant_matmul.LORA_MAX_TILE)
    cfg = next(c for c in qmm.matmul_configs(kind)
               if not kw.get("has_lora") or c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= qmm.LORA_MAX_TILE)
    kernel, sig, ce = _mm_spec(kind, **kw)
    r = compile_kernel(kernel, sig, {**ce, **cfg.kwargs}, arch, cfg.num_warps, cfg.num_stages)
    what = f"quant_matmul {kind} {variant} {cfg.kwargs}"
    report(what, r)
    assert_no_spills(r, what)
    if arch == 90:
        assert r["wgmma"], f"{what}: no wgmma on sm_90"
