"""Ahead-of-time compilation of the cross-entropy rows kernel (kernels/cross_entropy.py) for sm_80
and sm_90 at the launcher's settings for the large vocabularies (Llama-3 128256, SmolLM 49152) and
a small odd one, in each logits dtype: no spills."""
import pytest
import torch

from fastft.kernels import cross_entropy as kce
from tests.aot import assert_no_spills, compile_kernel, pristine_triton_language, report  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("pristine_triton_language")
TYPES = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32"}


@pytest.mark.parametrize("arch", [80, 90])
def test_ce_rows_compile_without_spills(arch):
    for V, dt in ((128256, torch.bfloat16), (128256, torch.float32), (49152, torch.float16), (1007, torch.float32)):
        block, warps = kce.ce_settings(V, dt)
        r = compile_kernel(kce._ce_grad_kernel, {"Z": TYPES[dt] + ":16", "T": "*i64", "LOSS": "*fp32",
                                                 "stride_z": "i32:16", "n_rows": "i32", "V": "i32",
                                                 "ignore_index": "i32"},
                           {"BLOCK": block}, arch, num_warps=warps)
        what = f"ce_grad V={V} {dt} BLOCK={block} warps={warps}"
        report(what, r)
        assert_no_spills(r, what)
