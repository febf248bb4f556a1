"""Cross-entropy rows in Triton: per-row losses and the gradient written over the logits.

``cross_entropy_grad_(logits, targets, ignore_index, loss)`` (the ``cross_entropy_grad_`` op):
for each row z of the (n, V) logits, loss = lse(z) − z[target] and z ← softmax(z) − onehot(target),
both from fp32 arithmetic, the gradient rounded once to the logits' dtype. Rows whose target is
``ignore_index`` get loss 0 and a zero gradient row, without reading their logits.

One program per row (``_ce_grad_kernel``), two passes over it in column blocks of ``BLOCK``:

1. online softmax: the running maximum m and the running sum s = Σ exp(z − m), rescaled when m
   grows, so any vocabulary size works (49152, 128256, 1000 + 7) with one block in registers;
2. the gradient exp(z − m) / s − [col == target], stored in place.

The target's logit is read before pass 2 overwrites it. Targets are not checked here (the caller
checks them without a host synchronisation, ``fastft.ops``); an out-of-range target reads nothing
(its loads are masked) and gives loss lse(z). Bandwidth: 2 reads + 1 write of the row (the second
read mostly hits L2 for rows up to a few MB); no host synchronisation, one launch.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import FLOAT_DTYPES, check_device, launch

__all__ = ["cross_entropy_grad_", "ce_settings", "supported"]


# ========================================================================================= kernels
@triton.jit
def _ce_grad_kernel(Z, T, LOSS, stride_z, n_rows, V, ignore_index, BLOCK: tl.constexpr):
    """Rows ``program_id``, + ``num_programs``, ...: LOSS[row] = lse(z) − z[t] and z ← softmax(z) −
    onehot(t) (zeros and loss 0 where t == ignore_index). The default grid is one program per row;
    a smaller (persistent) grid bounds the rows in flight, so that their second pass can hit L2."""
    cols = tl.arange(0, BLOCK)
    for r in range(tl.program_id(0), n_rows, tl.num_programs(0)):
        row = tl.cast(r, tl.int64)
        zp = Z + row * stride_z
        t = tl.load(T + row).to(tl.int64)
        if t == ignore_index:
            zero = tl.zeros((BLOCK,), dtype=tl.float32).to(Z.dtype.element_ty)
            for c0 in range(0, V, BLOCK):
                tl.store(zp + c0 + cols, zero, mask=c0 + cols < V)
            tl.store(LOSS + row, 0.0)
        else:
            in_range = (t >= 0) & (t < V)
            zt = tl.load(zp + t, mask=in_range, other=0.0).to(tl.float32)
            m = -float("inf")
            s = 0.0
            for c0 in range(0, V, BLOCK):
                z = tl.load(zp + c0 + cols, mask=c0 + cols < V, other=-float("inf")).to(tl.float32)
                m_new = tl.maximum(m, tl.max(z, axis=0))
                s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
                m = m_new
            # softmax = exp(z − m) / s, not exp(z − lse): z − m is exact near the maximum, where z − lse
            # would carry lse's rounding (an ulp of |lse|) into every probability of large logits.
            inv_s = 1.0 / s
            for c0 in range(0, V, BLOCK):
                c = c0 + cols
                z = tl.load(zp + c, mask=c < V, other=0.0).to(tl.float32)
                g = tl.exp(z - m) * inv_s - tl.where(c == t, 1.0, 0.0)
                tl.store(zp + c, g.to(Z.dtype.element_ty), mask=c < V)
            tl.store(LOSS + row, (m - zt) + tl.log(s))


# ======================================================================================= launchers
def ce_settings(V: int, dtype: torch.dtype) -> tuple[int, int]:
    """(BLOCK, num_warps): a column block of 16 KiB of logits (8192 16-bit / 4096 fp32 values,
    64 bytes per thread at 8 warps: four 16-byte loads), smaller for small vocabularies; fixed, no
    autotune. (16 warps spill on sm_80 at the 16-bit block: tests/test_aot_cross_entropy.py.)"""
    cap = 16384 // (2 if dtype in (torch.float16, torch.bfloat16) else 4)
    block = min(cap, triton.next_power_of_2(max(int(V), 1)))
    return block, min(8, max(4, block // 512))


def supported(logits, targets, ignore_index=-100) -> bool:
    """The calls the kernel takes: 2-D fp16 / bf16 / fp32 logits with unit column stride, targets
    (n,) int32 / int64 on the same device. Others (float64, bad shapes) go to the reference."""
    return (isinstance(logits, torch.Tensor) and logits.dim() == 2 and logits.dtype in FLOAT_DTYPES
            and logits.stride(1) == 1 and isinstance(targets, torch.Tensor) and targets.dim() == 1
            and targets.shape[0] == logits.shape[0] and targets.dtype in (torch.int32, torch.int64)
            and targets.device == logits.device)


def cross_entropy_grad_(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, loss: torch.Tensor,
                        block: int | None = None, programs: int | None = None) -> None:
    """Fill ``loss`` (n,) fp32 with the rows' losses and overwrite ``logits`` (n, V) with
    softmax − onehot (module docstring). ``block`` overrides the column block (tests); ``programs``
    caps the grid (a persistent launch; default one program per row -- benchmarks/bench_cross_entropy.py
    times both on a GPU)."""
    check_device(logits.device, "cross_entropy_grad_")
    n, V = logits.shape
    if n == 0:
        return
    BLOCK, warps = ce_settings(V, logits.dtype)
    if block is not None:
        BLOCK = int(block)
    grid = n if programs is None else max(1, min(n, int(programs)))
    launch(_ce_grad_kernel, (grid,), logits, targets, loss, logits.stride(0), n, V, int(ignore_index), BLOCK=BLOCK,
           num_warps=warps)
