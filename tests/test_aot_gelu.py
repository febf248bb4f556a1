"""Ahead-of-time compilation of the GELU kernels (kernels/gelu.py) for sm_80 and sm_90 at the
launcher's fixed block, 16-bit and fp32: no spills."""
import pytest

from fastft.kernels import gelu as kgelu
from tests.aot import assert_no_spills, compile_kernel, pristine_triton_language, report  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("pristine_triton_language")


@pytest.mark.parametrize("arch", [80, 90])
def test_gelu_kernels_compile_without_spills(arch):
    for t in ("*bf16", "*fp32"):
        r = compile_kernel(kgelu._gelu_fwd_kernel, {"X": t + ":16", "Y": t + ":16", "n": "i32"},
                           {"BLOCK": kgelu.BLOCK}, arch, num_warps=kgelu.WARPS)
        report(f"gelu_fwd {t}", r)
        assert_no_spills(r, f"gelu_fwd {t}")
        r = compile_kernel(kgelu._gelu_bwd_kernel, {"DY": t + ":16", "X": t + ":16", "DX": t + ":16", "n": "i32"},
                           {"BLOCK": kgelu.BLOCK}, arch, num_warps=kgelu.WARPS)
        report(f"gelu_bwd {t}", r)
        assert_no_spills(r, f"gelu_bwd {t}")
