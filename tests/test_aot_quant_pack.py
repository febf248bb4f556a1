"""Ahead-of-time compilation of the 4-bit packing kernels (fastft/kernels/quant_pack.py) for sm_80 and
sm_90: the fixed-heuristic row kernels (quantize / dequantize) compile for every block size they
accept without spills, and the NF4 dequantizer's stores are vector stores.
"""
import pytest

from fastft.kernels import _common, quant_pack
from tests.aot import assert_no_spills, compile_kernel, pristine_triton_language, report, sass_ops  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("pristine_triton_language")
ARCHS = [80, 90]


NF4_BLOCKSIZES = [32, 64, 128, 256, 512, 1024, 2048, 4096]


@pytest.mark.parametrize("arch", ARCHS)
def test_nf4_row_kernels_compile(arch):
    """Quantize (+ double quant) and dequantize, for every blocksize (the launcher's ROWS heuristic
    gives one variant per blocksize); single-quant dequantize (a subset of the double-quant code)
    at the default blocksize."""
    for bs in NF4_BLOCKSIZES:
        rows = _common.rows_per_program(bs)
        r = compile_kernel(quant_pack._nf4_quantize_kernel, {"w_ptr": "*bf16", "out_ptr": "*u8", "absmax_ptr": "*fp32",
                                                    "mids_ptr": "*fp32", "n": "i64", "nblocks": "i32"},
                           {"BS": bs, "ROWS": rows}, arch)
        report(f"nf4_quantize bs={bs} rows={rows}", r)
        assert_no_spills(r, f"nf4_quantize bs={bs}")
        for dq in ((True, False) if bs == 64 else (True,)):  # dq=False only removes loads: one bs
            for out, word in ((2, "*i32:16"), (0, "*i64:16"), (3, "*fp64:16")):  # bf16, fp32, fp64
                for masked in ((False, True) if out == 2 else (False,)):
                    # ":16": aligned pointers and sizes, as Triton's launcher specializes them
                    r = compile_kernel(
                        quant_pack._nf4_dequantize_kernel,
                        {"data_ptr": "*u8:16", "scale_ptr": "*u8:16" if dq else "*fp32:16", "aux_ptr": "*fp32:16",
                         "auxmap_ptr": "*fp32:16", "qmap_ptr": "*fp32:16", "out_ptr": word, "n": "i64:16",
                         "nblocks": "i32:16", "offset": "fp32", "first_blk": "i32:16"},
                        {"BS": bs, "NBS": 256, "DOUBLE_QUANT": dq, "ROWS": rows, "MASKED": masked, "OUT": out,
                         "UPCAST": False}, arch, num_warps=quant_pack.DEQUANT_WARPS)
                    what = f"nf4_dequantize bs={bs} dq={dq} out={out} masked={masked}"
                    report(what, r)
                    assert_no_spills(r, what)
                    if out == 2 and not masked and bs == 64:
                        # The codes are one vector load and the outputs vector stores per thread
                        # (an element-order tile stores 2-byte values one at a time).
                        ops = sass_ops(r)
                        stores = [o for o in ops if o.startswith("STG")]
                        assert stores and all(o == "STG.E.128" for o in stores), f"{what}: stores {stores}"
                        assert "LDG.E.64" in ops, f"{what}: the 8 code bytes of a thread are not one load"
    r = compile_kernel(quant_pack._dq8_quantize_kernel, {"absmax_ptr": "*fp32", "code_ptr": "*u8", "nested_ptr": "*fp32",
                                                "mids_ptr": "*fp64", "nblocks": "i32", "offset": "fp32"},
                       {"NBS": 256}, arch)
    report("dq8_quantize", r)
    assert_no_spills(r, "dq8_quantize")


@pytest.mark.parametrize("arch", ARCHS)
def test_int4_row_kernels_compile(arch):
    for g in (32, 64, 128):
        rows = _common.rows_per_program(g)
        for sym in (False, True):
            r = compile_kernel(quant_pack._int4_quantize_kernel, {"w_ptr": "*bf16", "data_ptr": "*u8", "scale_ptr": "*fp32",
                                                         "zero_ptr": "*fp32", "N": "i32", "K": "i32"},
                               {"G": g, "SYMMETRIC": sym, "ROWS": rows}, arch, num_warps=quant_pack.QUANTIZE_WARPS)
            report(f"int4_quantize g={g} sym={sym}", r)
            assert_no_spills(r, f"int4_quantize g={g} sym={sym}")
            if sym and g != 128:
                continue  # symmetric dequantize = asymmetric minus one load: one group size
            r = compile_kernel(quant_pack._int4_dequantize_kernel, {"data_ptr": "*u8", "scale_ptr": "*fp32",
                                                           "zero_ptr": "*fp32", "out_ptr": "*fp16", "N": "i32",
                                                           "K": "i32"},
                               {"G": g, "SYMMETRIC": sym, "ROWS": rows, "UPCAST": False}, arch)
            report(f"int4_dequantize g={g} sym={sym}", r)
            assert_no_spills(r, f"int4_dequantize g={g} sym={sym}")
