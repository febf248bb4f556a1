"""Ahead-of-time compilation of the SwiGLU gate kernels (fastft/kernels/silu_mul.py) for sm_80 and
sm_90 (tests/aot.py): forward and backward compile without spills at the launcher's tile, with
128-bit bf16 loads and stores.
"""
import pytest

from fastft.kernels import silu_mul
from tests.aot import assert_no_spills, compile_kernel, pristine_triton_language, report, sass_ops  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("pristine_triton_language")


def _sig(kernel):
    sig = {}
    for name in kernel.arg_names:
        if name in ("ROWS", "BLOCK", "UPCAST"):
            continue
        if name.startswith("stride_") or name == "F":
            sig[name] = "i32:16"  # intermediate sizes (and fused gate/up row strides) are multiples of 16
        elif name == "M":
            sig[name] = "i32"
        else:
            sig[name] = "*bf16:16"
    return sig


@pytest.mark.parametrize("arch", [80, 90])
def test_silu_mul_kernels_compile_without_spills(arch):
    _, rows, block = silu_mul._grid(8192, 14336)
    cx = dict(ROWS=rows, BLOCK=block, UPCAST=False)
    for k in (silu_mul._silu_mul_fwd_kernel, silu_mul._silu_mul_bwd_kernel):
        r = compile_kernel(k, _sig(k), cx, arch, num_warps=silu_mul.WARPS, num_stages=1)
        report(k.__name__ if hasattr(k, "__name__") else "silu_mul", r)
        assert_no_spills(r, f"silu_mul sm_{arch}")
        ops = sass_ops(r)
        assert "LDG.E.128" in ops and "STG.E.128" in ops, f"sm_{arch}: not 128-bit accesses"
