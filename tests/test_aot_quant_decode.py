"""Ahead-of-time compilation of the 4-bit decode kernel (fastft/kernels/quant_decode.py) for sm_80
and sm_90: every format variant at the launcher's tile compiles without spills in few registers, and
the K loop stays within its instruction budget (SASS, sm_90).
"""
import pytest

from fastft.kernels import quant_decode
from tests.aot import assert_no_spills, compile_kernel, pristine_triton_language, report, sass_loop  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("pristine_triton_language")
ARCHS = [80, 90]


# The aligned fp16 / bf16 decode kernel (M <= 16): NF4 (double quant or not), int4 both flavours,
# with and without the in-kernel split-K reduction, at the tile the launcher uses.
DECODE_VARIANTS = {
    "nf4dq-bf16-split": dict(act="*bf16", qtype=0, double_quant=True, symmetric=False, split=8),
    "nf4dq-bf16-nosplit": dict(act="*bf16", qtype=0, double_quant=True, symmetric=False, split=1),
    "nf4-fp16-split": dict(act="*fp16", qtype=0, double_quant=False, symmetric=False, split=8),
    "int4-bf16-split": dict(act="*bf16", qtype=1, double_quant=False, symmetric=False, split=8),
    "int4sym-fp16-split": dict(act="*fp16", qtype=1, double_quant=False, symmetric=True, split=8),
    "nf4dq-bf16-split-lora": dict(act="*bf16", qtype=0, double_quant=True, symmetric=False, split=8, has_lora=True),
    "nf4dq-bf16-nosplit-lora": dict(act="*bf16", qtype=0, double_quant=True, symmetric=False, split=1, has_lora=True),
    "nf4-bf16-bs32": dict(act="*bf16", qtype=0, double_quant=False, symmetric=False, split=8, qblock=32),
    "int4-fp16-g128": dict(act="*fp16", qtype=1, double_quant=False, symmetric=False, split=8, qblock=128),
}


def _decode_compile(arch, act, qtype, double_quant, symmetric, split, qblock=64, has_lora=False):
    sig = {"x_ptr": act + ":16", "data_ptr": "*u8:16",
           "scale_ptr": "*u8:16" if (qtype == 0 and double_quant) else "*fp32:16",
           "aux_ptr": "*fp32:16", "auxmap_ptr": "*fp32:16", "qmap_ptr": "*i32:16" if qtype == 0 else "*fp32:16",
           "bias_ptr": act + ":16", "out_ptr": act + ":16", "ws_ptr": "*fp32:16", "cnt_ptr": "*i32:16",
           "u_ptr": act + ":16", "lb_ptr": act + ":16",
           "M": "i32", "N": "i32:16", "K": "i32:16", "stride_xm": "i32:16", "offset": "fp32", "K_SPLIT": "i32:16",
           "R": "i32", "scaling": "fp32"}
    ce = dict(QTYPE=qtype, DOUBLE_QUANT=double_quant, SYMMETRIC=symmetric, QBLOCK=qblock, NBS=256, HAS_BIAS=True,
              SPLIT_K=split, HAS_LORA=has_lora, BLOCK_R=32, UPCAST=False, BLOCK_M=quant_decode.DECODE_MAX_M,
              BLOCK_N=quant_decode.DECODE_BLOCK_N, BLOCK_K=min(quant_decode.DECODE_BLOCK_K, qblock))
    return compile_kernel(quant_decode._quant_decode_kernel, sig, ce, arch, quant_decode.DECODE_WARPS, 2)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("variant", list(DECODE_VARIANTS))
def test_decode_kernel_compiles(variant, arch):
    r = _decode_compile(arch, **DECODE_VARIANTS[variant])
    what = f"quant_decode {variant}"
    report(what, r)
    assert_no_spills(r, what)
    # Small enough for several programs per SM (benchmarks/NOTES.md: the training tile at M = 1 took 233).
    assert r["registers"] <= 128, f"{what}: {r['registers']} registers"


def test_decode_kernel_instruction_budget():
    """sm_90, NF4 + double quant, bf16: the K loop's instructions per weight element per thread.

    The budget keeps the kernel near its bytes: at most 10 (8.8 with Triton 3.9), where the training
    kernel with a 16-row tile spends 24 (benchmarks/NOTES.md has the measured times)."""
    r = _decode_compile(90, "*bf16", 0, True, False, 8)
    body = sass_loop(r)
    per_thread = quant_decode.DECODE_BLOCK_N * quant_decode.DECODE_BLOCK_K / (32 * quant_decode.DECODE_WARPS)
    assert body, "no loop found in the SASS"
    assert len(body) / per_thread <= 10.0, f"{len(body)} loop instructions for {per_thread:.0f} weights per thread"
    assert not any(op.startswith("SEL") for op in body) or sum(op.startswith("SEL") for op in body) < 8, \
        "the select-tree lookup is back in the decode loop"
