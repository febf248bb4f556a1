"""NF4 dequantize (fastft/kernels/quant_pack.py) against bitsandbytes.

GPU suite, NF4 with double quantization (blocksize 64), the QLoRA default: (K, N) weights to bf16,
GB/s (packed bytes + scales read, bf16 written) and % of the measured copy bandwidth; baseline
bitsandbytes ``dequantize_4bit``. Targets: >= 85% of copy bandwidth, >= 1.5x bitsandbytes.

The helpers here (the weights of a (K, N) case, NF4 byte counts, bitsandbytes) are shared with
benchmarks/bench_quant_matmul.py and bench_quant_decode.py. The CPU suite returns no rows: the
kernels are CUDA-only (the interpreter is a correctness tool, not something to time); so does the
GPU suite without a GPU.
"""
from __future__ import annotations

import torch

from . import common

KN_SHAPES = ((4096, 4096), (4096, 14336), (14336, 4096))
BLOCKSIZE = 64


def bnb():
    """(bitsandbytes, bitsandbytes.functional), or (None, None) where it is absent or has no CUDA."""
    try:
        import bitsandbytes
        import bitsandbytes.functional as F
    except Exception:  # baselines are skipped
        return None, None
    return bitsandbytes, F


def nf4_bytes(N, K):
    """Bytes of an NF4 double-quantized weight: 4 bits/element + 1 byte/block + 4 bytes/256 blocks."""
    n = N * K
    nb = -(-n // BLOCKSIZE)
    return n // 2 + nb + 4 * -(-nb // 256)


def shapes():
    return KN_SHAPES[:2] if common.quick() else KN_SHAPES


def nf4_case(K, N, dev):
    """(bf16 weight w (N, K), its NF4Weight through the Triton kernels, the dense bf16 weight with the
    same values, bitsandbytes' (packed, state) or None)."""
    from fastft.ops import triton_backend

    w = (torch.randn(N, K, device=dev) * 0.02).to(torch.bfloat16)
    qw = triton_backend.nf4_quantize(w, BLOCKSIZE, True)
    w_deq = triton_backend.nf4_dequantize(qw, torch.bfloat16)  # the dense baseline uses the same values
    _, F = bnb()
    bnb_q = None
    if F is not None:
        try:
            bnb_q = F.quantize_4bit(w, blocksize=BLOCKSIZE, quant_type="nf4", compress_statistics=True)
        except Exception:
            bnb_q = None
    return w, qw, w_deq, bnb_q


def run(suite: str) -> list[dict]:
    if suite == "cpu" or not torch.cuda.is_available():
        return []
    from fastft.ops import triton_backend

    dev = common.device_for(suite)
    _, F = bnb()
    rows = []
    torch.manual_seed(0)
    for K, N in shapes():
        w, qw, w_deq, bnb_q = nf4_case(K, N, dev)
        shape = f"K={K} N={N}"
        dq_bytes = nf4_bytes(N, K) + 2 * N * K
        t = common.bench(lambda: triton_backend.nf4_dequantize(qw, torch.bfloat16), device=dev)
        tb = common.bench(lambda: F.dequantize_4bit(*bnb_q), device=dev) if bnb_q else None
        rows.append(common.row(f"dequantize nf4 {shape}", "fastft", t, bytes=dq_bytes, ceiling="copy", device="cuda",
                               baseline="bitsandbytes" if tb else None, baseline_s=tb))
        if tb:
            rows.append(common.row(f"dequantize nf4 {shape}", "bitsandbytes", tb, bytes=dq_bytes, ceiling="copy",
                                   device="cuda"))
        w = w_deq = qw = bnb_q = None  # noqa: F841 (free before the next shape)
        torch.cuda.empty_cache()
    return rows


if __name__ == "__main__":  # python -m benchmarks.bench_quant_pack [cpu|gpu]
    import sys

    for r in run(sys.argv[1] if len(sys.argv) > 1 else "gpu"):
        print(r)
