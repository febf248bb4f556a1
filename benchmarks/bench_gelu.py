"""GELU, erf form (``fastft.ops.gelu``, BERT's intermediate activation) on CUDA: the Triton kernels
(kernels/gelu.py) against ``F.gelu``.

GPU suite, bf16, (rows, width) in {(16384, 3072), (16384, 4096)} (BERT-base / -large intermediate;
quick: the first): forward alone and forward + backward (``torch.autograd.grad``) of ``fastft`` (the
Triton backend's op) and ``torch`` (F.gelu). Liger-Kernel has no standalone erf GELU (only the gated
GeGLU, a different op), so there is no Liger row; the script says so when liger_kernel imports.

``gbps``: forward reads x and writes y (2 · n · 2 bytes), backward reads x and dy and writes dx
(3 ·); ``pct_of_ceiling`` against the measured copy bandwidth, ``speedup`` over torch. Target
(issue 15): ≥ 85 % of copy. The CPU suite has nothing to time (tests/test_gelu.py).

Predictions (offline reasoning; no GPU has run these kernels yet): 100 MB per forward at 16384 x
3072, 16-byte accesses: ~85-90 % of copy, about torch's vectorised elementwise kernel (~1.0x); the
backward reads x and dy and writes dx in one pass, as torch's does.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import common

SHAPES = ((16384, 3072), (16384, 4096))


def run(suite: str) -> list[dict]:
    if suite == "cpu" or not torch.cuda.is_available():
        print("bench_gelu: needs CUDA (the Triton kernels run on GPUs only); no rows")
        return []
    from fastft.ops import triton_backend

    try:
        import liger_kernel  # noqa: F401

        print("bench_gelu: liger_kernel has no standalone erf GELU kernel (GeGLU only): no liger row")
    except Exception:
        pass
    dev = common.device_for(suite)
    impls = {"fastft": triton_backend.gelu, "torch": F.gelu}
    rows = []
    for M, N in (SHAPES[:1] if common.quick() else SHAPES):
        x = torch.randn(M, N, device=dev, dtype=torch.bfloat16, requires_grad=True)
        g = torch.randn(M, N, device=dev, dtype=torch.bfloat16)
        if not torch.allclose(impls["fastft"](x).float(), F.gelu(x).float(), rtol=1e-2, atol=1e-2):
            raise RuntimeError(f"gelu {M}x{N}: fastft disagrees with F.gelu")
        times = {}
        for name, fn in impls.items():
            with torch.no_grad():
                tf = common.bench(lambda: fn(x), device=dev)
            times[name] = (tf, common.bench(lambda: torch.autograd.grad(fn(x), x, g), device=dev))
        e = x.element_size()
        for k, (what, nbytes) in enumerate((("fwd", 2 * M * N * e), ("fwd+bwd", 5 * M * N * e))):
            case = f"gelu bf16 {what} {M}x{N}"
            rows.append(common.row(case, "fastft", times["fastft"][k], bytes=nbytes, ceiling="copy", device="cuda",
                                   baseline="torch", baseline_s=times["torch"][k]))
            rows.append(common.row(case, "torch", times["torch"][k], bytes=nbytes, ceiling="copy", device="cuda"))
        torch.cuda.empty_cache()
    return rows


if __name__ == "__main__":  # python -m benchmarks.bench_gelu [cpu|gpu]
    import sys

    for r in run(sys.argv[1] if len(sys.argv) > 1 else "gpu"):
        print(r)
