"""Ahead-of-time compilation of the LayerNorm kernels (kernels/layer_norm.py) for sm_80 and sm_90 at
the launcher's settings for BERT widths (384 MiniLM, 768 base, 1024 large) and a 4096-wide row, in
16-bit and fp32 (and the fp32 output of CUDA autocast): no spills."""
import pytest

from fastft.kernels import layer_norm as kln
from tests.aot import assert_no_spills, compile_kernel, pristine_triton_language, report  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("pristine_triton_language")


@pytest.mark.parametrize("arch", [80, 90])
def test_layer_norm_kernels_compile_without_spills(arch):
    for N, t, out in ((384, "*bf16", "*bf16"), (768, "*bf16", "*fp32"), (768, "*fp32", "*fp32"),
                      (1024, "*fp16", "*fp16"), (4096, "*bf16", "*bf16")):
        rows, block, warps = kln.settings(N)
        r = compile_kernel(kln._ln_fwd_kernel, {"X": t, "W": "*fp32", "B": "*fp32", "Y": out, "MEAN": "*fp32",
                                                "RSTD": "*fp32", "stride_x": "i32:16", "stride_y": "i32:16",
                                                "M": "i32", "N": "i32", "eps": "fp32"},
                           {"ROWS": rows, "BLOCK": block}, arch, num_warps=warps)
        report(f"ln_fwd N={N} {t}->{out}", r)
        assert_no_spills(r, f"ln_fwd N={N} {t}->{out}")
        r = compile_kernel(kln._ln_bwd_kernel, {"DY": out, "X": t, "W": "*fp32", "MEAN": "*fp32", "RSTD": "*fp32",
                                                "DX": t, "DWP": "*fp32", "DBP": "*fp32", "stride_dy": "i32:16",
                                                "stride_x": "i32:16", "stride_dx": "i32:16", "M": "i32", "N": "i32",
                                                "n_tiles": "i32"},
                           {"ROWS": rows, "BLOCK": block}, arch, num_warps=warps)
        report(f"ln_bwd N={N} {t}", r)
        assert_no_spills(r, f"ln_bwd N={N} {t}")
