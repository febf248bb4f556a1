"""Ahead-of-time compilation of the split-KV decode attention kernels (fastft/kernels/attention_decode.py)
for sm_80 and sm_90 (tests/aot.py: no GPU needed): the decode and combine kernels compile without
spills at the launcher's tile.
"""
import os

import pytest

from fastft.kernels import _common
from fastft.kernels import attention_decode
from tests.aot import compile_kernel
from tests.test_aot_attention import signature


@pytest.mark.parametrize("arch", [90, 80])
@pytest.mark.parametrize("head_dim,group", [(128, 8)])
def test_decode_kernels_compile_without_spills(head_dim, group, arch):
    block_d = max(16, 1 << (head_dim - 1).bit_length())
    cx = dict(GROUP=group, HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=16, BLOCK_N=64, IS_CAUSAL=False,
              HAS_KPM=True, UPCAST=False, PRECISION="ieee")
    k = attention_decode._attn_decode_kernel
    r = compile_kernel(k, signature(k, "bf16", cx, head_dim), cx, arch, num_warps=4, num_stages=3)
    print(f"decode D={head_dim} sm_{arch}: shared={r['shared']} regs={r['registers']} spills={r['spills']}")
    assert r["spills"] == 0
    cx = dict(GROUP=group, HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=16)
    c = attention_decode._attn_combine_kernel
    r = compile_kernel(c, signature(c, "bf16", cx, head_dim), cx, arch, num_warps=4, num_stages=1)
    assert r["spills"] == 0


def test_compile_after_interpreter_runs():
    """Interpreter runs that call tl.rand leave triton.language.core patched (Triton 3.9); tests/aot.py
    must still compile afterwards, and leave the interpreter working."""
    import torch

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("only meaningful when kernels were decorated for the interpreter")
    keep = _common.keep_mask(5, 8, 8, 0.5, "cpu")  # runs tl.rand under the interpreter
    cx = dict(GROUP=1, HEAD_DIM=64, BLOCK_D=64, BLOCK_M=16)
    r = compile_kernel(attention_decode._attn_combine_kernel, signature(attention_decode._attn_combine_kernel, "fp16", cx, 64), cx, 90)
    assert r["ptx"] and r["registers"]
    assert torch.equal(keep, _common.keep_mask(5, 8, 8, 0.5, "cpu"))
