"""SwiGLU's gate silu(g) · u (fastft/kernels/silu_mul.py) against the PyTorch composition and
Liger-Kernel.

GPU suite, bf16, M tokens x intermediate F in {14336, 28672} (Llama-3 8B / 70B MLPs): forward, and
forward + backward (dg, du), of ``fastft`` (the triton backend's ``silu_mul``, the CUDA default),
``torch`` (``F.silu(g) * u`` under autograd) and ``liger`` (``LigerSiLUMulFunction``, when
``liger_kernel`` imports). GB/s count the ideal bytes (forward: read g, u, write y; backward: read
dy, g, u, write dg, du) and ``pct_of_ceiling`` is against the measured copy bandwidth. Targets:
>= 85 % of copy bandwidth, >= 1.0x Liger. Without CUDA: a 'needs CUDA' line, no rows.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import common
from .bench_rms_norm import liger, needs_cuda, rows_for, time_fwd_bwd

TOKENS = (8192, 16384)
INTERMEDIATE = (14336, 28672)


def run(suite: str) -> list[dict]:
    if needs_cuda(suite, "silu_mul"):
        return []
    from fastft.ops import dispatch

    dev = common.device_for(suite)
    dt = torch.bfloat16
    E = 2
    silu_mul = dispatch.impl("silu_mul", "triton")
    liger_silu = liger("swiglu", "LigerSiLUMulFunction")
    rows = []
    torch.manual_seed(0)
    for M in (TOKENS[:1] if common.quick() else TOKENS):
        for Fd in (INTERMEDIATE[:1] if common.quick() else INTERMEDIATE):
            g = torch.randn(M, Fd, device=dev, dtype=dt, requires_grad=True)
            u = torch.randn(M, Fd, device=dev, dtype=dt, requires_grad=True)
            dy = torch.randn(M, Fd, device=dev, dtype=dt)
            t = {"fastft": time_fwd_bwd(silu_mul, [g, u], [dy], dev),
                 "torch": time_fwd_bwd(lambda g, u: F.silu(g) * u, [g, u], [dy], dev)}
            if liger_silu is not None:
                t["liger"] = time_fwd_bwd(liger_silu.apply, [g, u], [dy], dev)
            rows += rows_for(f"silu_mul M={M} F={Fd} bf16", t, 3 * M * Fd * E, 5 * M * Fd * E)
            del g, u, dy
            torch.cuda.empty_cache()
    return rows


if __name__ == "__main__":  # python -m benchmarks.bench_silu_mul [cpu|gpu]
    import sys

    for row in run(sys.argv[1] if len(sys.argv) > 1 else "gpu"):
        print(row)
