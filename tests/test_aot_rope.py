"""Ahead-of-time compilation of the rotary-embedding kernel (fastft/kernels/rope.py) for sm_80 and
sm_90 (tests/aot.py): forward, backward and the partial-rotary tail copy compile without spills at
the launcher's tile for Llama's head dim.
"""
import pytest

from fastft.kernels import rope
from tests.aot import assert_no_spills, compile_kernel, pristine_triton_language, report, sass_ops  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("pristine_triton_language")


def _sig(kernel, cx):
    sig = {}
    for name in kernel.arg_names:
        if name in cx:
            continue
        if name.startswith("stride_"):
            sig[name] = "i32:16"
        elif name in ("T", "H"):
            sig[name] = "i32"
        else:
            sig[name] = "*bf16:16"
    return sig


@pytest.mark.parametrize("arch", [80, 90])
def test_rope_kernel_compiles_without_spills(arch):
    # Llama's full rotary forward in place (32 heads); partial rotary backward with the tail copy
    for D, d, H, backward, copy_tail in ((128, 128, 32, False, False), (128, 64, 8, True, True)):
        half, tail = d // 2, D - d
        block_half = 1 << (half - 1).bit_length()
        block_h = min(1 << (H - 1).bit_length(), max(1, rope.TILE // block_half))
        cx = dict(HALF=half, TAIL=tail, BLOCK_H=block_h, BLOCK_HALF=block_half,
                  BLOCK_TAIL=1 << (max(tail, 1) - 1).bit_length(), BACKWARD=backward, COPY_TAIL=copy_tail,
                  UPCAST=False)
        r = compile_kernel(rope._rope_kernel, _sig(rope._rope_kernel, cx), cx, arch, num_warps=rope.WARPS,
                           num_stages=1)
        what = f"rope D={D} d={d} backward={backward} tail={copy_tail}"
        report(what, r)
        assert_no_spills(r, what)
        if d == D:  # each head's halves are 128-byte runs: 128-bit loads and stores
            ops = sass_ops(r)
            assert "LDG.E.128" in ops and "STG.E.128" in ops, f"{what}: not 128-bit accesses"
