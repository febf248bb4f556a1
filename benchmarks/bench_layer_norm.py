"""LayerNorm (``fastft.ops.layer_norm``, BERT family) on CUDA: the Triton kernels
(kernels/layer_norm.py) against ``F.layer_norm`` and Liger-Kernel's LayerNorm.

GPU suite, bf16 activations, fp32 weight and bias (as a bf16-autocast BERT keeps them), (rows,
width) in {(16384, 768), (16384, 1024), (8192, 4096)} (quick: the first). Each shape times the
forward alone and forward + backward (dx, dw, db through ``torch.autograd.grad``, so nothing
accumulates between calls) of ``fastft`` (the Triton backend's op), ``torch`` (F.layer_norm) and
``liger`` (``LigerLayerNormFunction``, when ``liger_kernel`` imports).

``gbps`` counts the activation bytes every implementation moves: forward reads x and writes y
(2 · rows · width · 2 bytes), backward reads x and dy and writes dx (3 ·); the weight, bias and the
per-row statistics are small. ``pct_of_ceiling`` is against the measured copy bandwidth, ``speedup``
over torch, ``vs_liger`` = Liger's time / fastft's. Target (issue 15): ≥ 85 % of copy, ≥ 1.0x Liger.
The CPU suite has nothing to time (Triton on CUDA only; tests/test_layer_norm.py).

Predictions (offline reasoning; no GPU has run these kernels yet): the forward moves 50 MB at
16384 x 768 (~15 µs), so launch latency and the last wave weigh: ~65-80 % of copy; forward +
backward (the backward's per-program partials and their sum are a few hundred KB) ~60-75 %. torch's
LayerNorm is a tuned CUDA kernel: ~1.0-1.3x it, ~1.0x Liger.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import common

SHAPES = ((16384, 768), (16384, 1024), (8192, 4096))


def _liger():
    try:
        from liger_kernel.ops.layer_norm import LigerLayerNormFunction
    except Exception:
        return None
    return LigerLayerNormFunction


def _fwd_bwd(fn, x, w, b, g):
    def step():
        return torch.autograd.grad(fn(x, w, b), (x, w, b), g)
    return step


def run(suite: str) -> list[dict]:
    if suite == "cpu" or not torch.cuda.is_available():
        print("bench_layer_norm: needs CUDA (the Triton kernels run on GPUs only); no rows")
        return []
    from fastft.ops import triton_backend

    dev = common.device_for(suite)
    liger = _liger()
    eps = 1e-12  # BERT's
    impls = {"fastft": lambda x, w, b: triton_backend.layer_norm(x, w, b, eps),
             "torch": lambda x, w, b: F.layer_norm(x, (x.shape[-1],), w, b, eps)}
    if liger is not None:
        impls["liger"] = lambda x, w, b: liger.apply(x, w, b, eps)
    rows = []
    for M, N in (SHAPES[:1] if common.quick() else SHAPES):
        x = torch.randn(M, N, device=dev, dtype=torch.bfloat16, requires_grad=True)
        w = (1 + 0.1 * torch.randn(N, device=dev, dtype=torch.bfloat16)).requires_grad_(True)
        b = (0.1 * torch.randn(N, device=dev, dtype=torch.bfloat16)).requires_grad_(True)
        g = torch.randn(M, N, device=dev, dtype=torch.bfloat16)
        y = impls["fastft"](x, w, b)
        if not torch.allclose(y.float(), impls["torch"](x, w, b).float(), rtol=2e-2, atol=2e-2):
            raise RuntimeError(f"layer_norm {M}x{N}: fastft disagrees with F.layer_norm")
        times = {}
        for name, fn in impls.items():
            try:
                with torch.no_grad():
                    tf = common.bench(lambda: fn(x, w, b), device=dev)
                times[name] = (tf, common.bench(_fwd_bwd(fn, x, w, b, g), device=dev))
            except Exception as e:  # Liger API drift: report, keep the others
                print(f"bench_layer_norm: {name} failed ({type(e).__name__}: {e})")
        e = x.element_size()
        for k, (what, nbytes) in enumerate((("fwd", 2 * M * N * e), ("fwd+bwd", 5 * M * N * e))):
            case = f"layer_norm bf16 {what} M={M} N={N}"
            ff = times["fastft"][k]
            extra = {"vs_liger": round(times["liger"][k] / ff, 3)} if "liger" in times else {}
            rows.append(common.row(case, "fastft", ff, bytes=nbytes, ceiling="copy", device="cuda", baseline="torch",
                                   baseline_s=times["torch"][k], **extra))
            for name in ("torch", "liger"):
                if name in times:
                    rows.append(common.row(case, name, times[name][k], bytes=nbytes, ceiling="copy", device="cuda"))
        torch.cuda.empty_cache()
    return rows


if __name__ == "__main__":  # python -m benchmarks.bench_layer_norm [cpu|gpu]
    import sys

    for r in run(sys.argv[1] if len(sys.argv) > 1 else "gpu"):
        print(r)
