"""4-bit decode GEMM (fastft/kernels/quant_decode.py) against dense bf16 cuBLAS and bitsandbytes.

GPU suite, bf16 activations, NF4 with double quantization (blocksize 64), M in {1, 16} x (K, N) in
{(4096, 4096), (4096, 14336), (14336, 4096)}:

* timed per call (``common.bench``): fastft's decode kernel, fastft's CUDA default (the ``torch``
  backend, which hands these shapes to the same kernel), dense bf16 ``F.linear``, bitsandbytes
  dequantize + matmul and ``matmul_4bit``; TFLOP/s and % of the bf16 matmul rate;
* from CUDA graphs (``common.bench_graph``, L2 flushed before each call): the kernel time without
  the host path, as engines run decode, in GB/s of weight bytes against the copy bandwidth (decode
  is a weight stream). Target: >= 3x faster than dense bf16.

No rows on CPU (the kernels are CUDA-only) or without a GPU.
"""
from __future__ import annotations

import torch

from . import common
from .bench_quant_matmul import fwd_times, quant_rows
from .bench_quant_pack import bnb, nf4_bytes, nf4_case, shapes

M_VALUES = (1, 16)


def run(suite: str) -> list[dict]:
    if suite == "cpu" or not torch.cuda.is_available():
        return []
    from fastft.ops import dispatch, triton_backend

    lean_qmm = dispatch.impl("quant_matmul", "torch")  # the CUDA default of fastft.ops.quant_matmul
    dev = common.device_for(suite)
    bitsandbytes, _ = bnb()
    rows = []
    torch.manual_seed(0)
    for K, N in shapes():
        w, qw, w_deq, bnb_q = nf4_case(K, N, dev)
        meta, tensors = triton_backend.raw(qw)
        shape = f"K={K} N={N}"
        for M in M_VALUES:
            x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
            times = fwd_times(x, meta, tensors, qw, w_deq, bnb_q, lean_qmm, dev)
            rows += quant_rows(f"quant_matmul fwd M={M} {shape}", times, 2.0 * M * N * K, nf4_bytes(N, K))

            case_g = f"quant_matmul fwd M={M} {shape} (cuda graph)"
            graph_rows = [("dense_bf16", lambda: torch.nn.functional.linear(x, w_deq)),
                          ("fastft", lambda: lean_qmm(x, qw))]  # the CUDA default: the decode kernel
            if bnb_q:
                graph_rows.append(("bnb_matmul_4bit", lambda: bitsandbytes.matmul_4bit(x, bnb_q[0].t(),
                                                                                       quant_state=bnb_q[1])))
            times = {}
            for name, fn in graph_rows:
                try:
                    times[name] = common.bench_graph(fn)
                except Exception as e:  # a baseline that cannot be captured: no row, one line
                    print(f"[bench_quant_decode] {name} {case_g}: not capturable ({type(e).__name__}: {e})")
            for name, tg in times.items():
                extra = {}
                if name == "fastft" and "dense_bf16" in times:
                    extra = dict(baseline="dense_bf16", baseline_s=times["dense_bf16"])
                    if "bnb_matmul_4bit" in times:
                        extra["vs_bnb_matmul_4bit"] = round(times["bnb_matmul_4bit"] / tg, 3)
                wb = nf4_bytes(N, K) if name != "dense_bf16" else 2 * N * K
                rows.append(common.row(case_g, name, tg, bytes=wb, ceiling="copy", device="cuda", weight_bytes=wb,
                                       **extra))
            x = None  # free before the next M
        w = w_deq = qw = bnb_q = None  # noqa: F841 (free before the next shape)
        torch.cuda.empty_cache()
    return rows


if __name__ == "__main__":  # python -m benchmarks.bench_quant_decode [cpu|gpu]
    import sys

    for r in run(sys.argv[1] if len(sys.argv) > 1 else "gpu"):
        print(r)
