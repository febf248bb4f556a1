"""Ahead-of-time compilation of the RMSNorm kernels (fastft/kernels/rms_norm.py) for sm_80 and sm_90
(tests/aot.py: no GPU needed): forward (plain and with the residual add) and backward (weight
gradient, the residual's incoming gradient) compile without spills at the launcher's settings for
real hidden sizes, and a bf16 row moves through 128-bit loads and stores.
"""
import pytest

from fastft.kernels import rms_norm
from tests.aot import assert_no_spills, compile_kernel, pristine_triton_language, report, sass_ops  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("pristine_triton_language")


def _sig(kernel, dtype, wdtype="bf16"):
    """Pointers 16-byte aligned, row strides multiples of 16 (hidden sizes are), as the launcher
    specializes them at run time."""
    sig = {}
    for name in kernel.arg_names:
        if name in ("RSTD", "DWP"):
            sig[name] = "*fp32:16"
        elif name == "W":
            sig[name] = f"*{wdtype}:16"
        elif name.startswith("stride_"):
            sig[name] = "i32:16"
        elif name == "N":
            sig[name] = "i32:16"  # hidden sizes are multiples of 16
        elif name == "M":
            sig[name] = "i32"
        elif name == "eps":
            sig[name] = "fp32"
        else:
            sig[name] = f"*{dtype}:16"
    return sig


# (hidden size, residual add): a SmolLM row (several rows per program), Llama-8B's with the SASS
# check, a 70B-wide row (16 warps)
CASES = [(576, True), (4096, False), (8192, True)]


@pytest.mark.parametrize("arch", [80, 90])
def test_rms_norm_kernels_compile_without_spills(arch):
    for N, res in CASES:
        block, rows, warps = rms_norm._settings(N)
        k = rms_norm._rms_norm_fwd_kernel
        cx = dict(ROWS=rows, BLOCK=block, HAS_RES=res, UPCAST=False)
        r = compile_kernel(k, {n: t for n, t in _sig(k, "bf16").items() if n not in cx}, cx, arch, num_warps=warps,
                           num_stages=1)
        report(f"rms_norm_fwd N={N} res={res}", r)
        assert_no_spills(r, f"rms_norm_fwd N={N} res={res}")
        if N == 4096:
            ops = sass_ops(r)
            assert "LDG.E.128" in ops and "STG.E.128" in ops, f"N={N}: the row is not moved in 128-bit accesses"
            continue
        k = rms_norm._rms_norm_bwd_kernel  # the residual's incoming gradient and the weight gradient
        block, rows, warps = rms_norm._settings(N, backward=True)
        cx = dict(ROWS=rows, BLOCK=block, HAS_DHI=res, HAS_DR=False, HAS_DW=True, UPCAST=False)
        r = compile_kernel(k, {n: t for n, t in _sig(k, "bf16").items() if n not in cx}, cx, arch, num_warps=warps,
                           num_stages=1)
        report(f"rms_norm_bwd N={N} res={res}", r)
        assert_no_spills(r, f"rms_norm_bwd N={N} res={res}")
        if N == 8192:
            ops = sass_ops(r)
            assert "LDG.E.128" in ops and "STG.E.128" in ops, f"bwd N={N}: not 128-bit accesses"
