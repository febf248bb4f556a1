"""4-bit kernels (fastft.kernels.quant) against dense bf16 cuBLAS and bitsandbytes (issue 3).

GPU suite, bf16 activations, NF4 with double quantization (blocksize 64), the QLoRA default:

* dequantize: (K, N) weights to bf16, GB/s (packed bytes + scales read, bf16 written) and % of the
  measured copy bandwidth; baseline bitsandbytes ``dequantize_4bit``. Targets: >= 85% of copy
  bandwidth, >= 1.5x bitsandbytes.
* quant-matmul forward, M in {1, 16, 512, 4096, 8192} x (K, N) in {(4096, 4096), (4096, 14336),
  (14336, 4096)}: TFLOP/s (2·M·N·K) and % of the measured bf16 matmul rate; baselines in the same
  run: dense bf16 ``F.linear`` on the unquantized weight (cuBLAS), bitsandbytes dequantize + matmul
  (the path PEFT / Unsloth take), bitsandbytes ``matmul_4bit``. Targets: M >= 4096 within 1.10x of
  dense and >= 1.3x faster than dequantize + matmul; M <= 16 >= 3x faster than dense.
* decode (M <= 16) also from CUDA graphs (``common.bench_graph``, L2 flushed before each call):
  the kernel time without the host path, for fastft's CUDA default (the decode kernel), dense bf16
  and bitsandbytes ``matmul_4bit``. The first H200 run's decode rows (do_bench) timed ~0.3 ms of
  Python around a 46 us kernel.
* backward dX = dY @ W for M >= 512: fastft's fused transposed kernel vs dense bf16 and
  bitsandbytes dequantize + matmul.

``fastft_lean`` rows: the ``torch`` backend (Triton dequantize + cuBLAS, nothing dense saved), the
CUDA default of ``fastft.ops.quant_matmul`` since the first H200 run (fastft/ops/lean.py).

Each fastft row carries ``speedup`` over dense bf16 and, in ``vs_bnb_dequant_matmul``, over
bitsandbytes' dequantize + matmul. The CPU suite returns no rows: the kernels are CUDA-only (the
interpreter is a correctness tool, not something to time); so does the GPU suite without a GPU.
"""
from __future__ import annotations

import torch

from . import common

M_VALUES = (1, 16, 512, 4096, 8192)
KN_SHAPES = ((4096, 4096), (4096, 14336), (14336, 4096))
BLOCKSIZE = 64


def _bnb():
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as F
    except Exception:  # bitsandbytes absent or without CUDA support: baselines are skipped
        return None, None
    return bnb, F


def _nf4_bytes(N, K):
    """Bytes of an NF4 double-quantized weight: 4 bits/element + 1 byte/block + 4 bytes/256 blocks."""
    n = N * K
    nb = -(-n // BLOCKSIZE)
    return n // 2 + nb + 4 * -(-nb // 256)


def _bench(fn, dev):
    return common.bench(fn, device=dev)


def run(suite: str) -> list[dict]:
    if suite == "cpu" or not torch.cuda.is_available():
        return []
    from fastft.kernels import quant as Q
    from fastft.ops import dispatch
    from fastft.ops.lean import _device_dequantize as lean_dequant
    from fastft.quant import NF4Weight

    lean_qmm = dispatch.impl("quant_matmul", "torch")  # the CUDA default of fastft.ops.quant_matmul

    dev = common.device_for(suite)
    bnb, F = _bnb()
    rows = []
    torch.manual_seed(0)
    shapes, m_values = (KN_SHAPES[:2], (1, 16, 8192)) if common.quick() else (KN_SHAPES, M_VALUES)
    for K, N in shapes:
        w = (torch.randn(N, K, device=dev) * 0.02).to(torch.bfloat16)
        qw = Q.nf4_quantize(w, BLOCKSIZE, True)
        assert isinstance(qw, NF4Weight)
        w_deq = Q.nf4_dequantize(qw, torch.bfloat16)  # the dense baseline uses the same values
        bnb_q = None
        if F is not None:
            try:
                packed, state = F.quantize_4bit(w, blocksize=BLOCKSIZE, quant_type="nf4", compress_statistics=True)
                bnb_q = (packed, state)
            except Exception:
                bnb_q = None
        shape = f"K={K} N={N}"

        # --- dequantize
        dq_bytes = _nf4_bytes(N, K) + 2 * N * K
        t = _bench(lambda: Q.nf4_dequantize(qw, torch.bfloat16), dev)
        tb = _bench(lambda: F.dequantize_4bit(*bnb_q), dev) if bnb_q else None
        rows.append(common.row(f"dequantize nf4 {shape}", "fastft", t, bytes=dq_bytes, ceiling="copy", device="cuda",
                               baseline="bitsandbytes" if tb else None, baseline_s=tb))
        if tb:
            rows.append(common.row(f"dequantize nf4 {shape}", "bitsandbytes", tb, bytes=dq_bytes, ceiling="copy",
                                   device="cuda"))

        for M in m_values:
            x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
            flops = 2.0 * M * N * K
            case = f"quant_matmul fwd M={M} {shape}"
            t_dense = _bench(lambda: torch.nn.functional.linear(x, w_deq), dev)
            t_ours = _bench(lambda: Q.quant_matmul_triton(x, qw), dev)
            t_lean = _bench(lambda: lean_qmm(x, qw), dev)
            t_bdq = _bench(lambda: x @ F.dequantize_4bit(*bnb_q).t(), dev) if bnb_q else None
            t_b4 = _bench(lambda: bnb.matmul_4bit(x, bnb_q[0].t(), quant_state=bnb_q[1]), dev) if bnb_q else None
            extra = {"vs_bnb_dequant_matmul": round(t_bdq / t_ours, 3)} if t_bdq else {}
            if t_b4:
                extra["vs_bnb_matmul_4bit"] = round(t_b4 / t_ours, 3)
            rows.append(common.row(case, "fastft", t_ours, flops=flops, ceiling="matmul_bf16", device="cuda",
                                   baseline="dense_bf16", baseline_s=t_dense, weight_bytes=_nf4_bytes(N, K),
                                   **extra))
            rows.append(common.row(case, "dense_bf16", t_dense, flops=flops, ceiling="matmul_bf16", device="cuda"))
            extra = {"vs_bnb_dequant_matmul": round(t_bdq / t_lean, 3)} if t_bdq else {}
            rows.append(common.row(case, "fastft_lean", t_lean, flops=flops, ceiling="matmul_bf16", device="cuda",
                                   baseline="dense_bf16", baseline_s=t_dense, **extra))
            if t_bdq:
                rows.append(common.row(case, "bnb_dequant_matmul", t_bdq, flops=flops, ceiling="matmul_bf16",
                                       device="cuda"))
            if t_b4:
                rows.append(common.row(case, "bnb_matmul_4bit", t_b4, flops=flops, ceiling="matmul_bf16",
                                       device="cuda"))

            if M <= 16:  # decode: kernel time from CUDA graphs (common.bench_graph), as engines run it
                case_g = f"quant_matmul fwd M={M} {shape} (cuda graph)"
                graph_rows = [("dense_bf16", lambda: torch.nn.functional.linear(x, w_deq)),
                              ("fastft", lambda: lean_qmm(x, qw))]  # the CUDA default: the decode kernel
                if bnb_q:
                    graph_rows.append(("bnb_matmul_4bit", lambda: bnb.matmul_4bit(x, bnb_q[0].t(),
                                                                                 quant_state=bnb_q[1])))
                times = {}
                for name, fn in graph_rows:
                    try:
                        times[name] = common.bench_graph(fn)
                    except Exception as e:  # a baseline that cannot be captured: no row, one line
                        print(f"[bench_quant] {name} {case_g}: not capturable ({type(e).__name__}: {e})")
                for name, tg in times.items():
                    extra = {}
                    if name == "fastft" and "dense_bf16" in times:
                        extra = dict(baseline="dense_bf16", baseline_s=times["dense_bf16"])
                        if "bnb_matmul_4bit" in times:
                            extra["vs_bnb_matmul_4bit"] = round(times["bnb_matmul_4bit"] / tg, 3)
                    wb = _nf4_bytes(N, K) if name != "dense_bf16" else 2 * N * K
                    # GB/s of weight bytes read, against the copy bandwidth: decode is a weight stream
                    rows.append(common.row(case_g, name, tg, bytes=wb, ceiling="copy", device="cuda",
                                           weight_bytes=wb, **extra))

            if M >= 512:  # training shapes: the backward dX
                dy = torch.randn(M, N, device=dev, dtype=torch.bfloat16)
                meta, tensors = Q._unpack(qw)
                case = f"quant_matmul bwd_dx M={M} {shape}"
                t_dense = _bench(lambda: dy @ w_deq, dev)
                t_ours = _bench(lambda: Q._matmul_bwd(dy, meta, tensors), dev)
                t_lean = _bench(lambda: dy @ lean_dequant(qw, torch.bfloat16), dev)
                t_bdq = _bench(lambda: dy @ F.dequantize_4bit(*bnb_q), dev) if bnb_q else None
                extra = {"vs_bnb_dequant_matmul": round(t_bdq / t_ours, 3)} if t_bdq else {}
                rows.append(common.row(case, "fastft", t_ours, flops=flops, ceiling="matmul_bf16", device="cuda",
                                       baseline="dense_bf16", baseline_s=t_dense, **extra))
                rows.append(common.row(case, "dense_bf16", t_dense, flops=flops, ceiling="matmul_bf16",
                                       device="cuda"))
                extra = {"vs_bnb_dequant_matmul": round(t_bdq / t_lean, 3)} if t_bdq else {}
                rows.append(common.row(case, "fastft_lean", t_lean, flops=flops, ceiling="matmul_bf16",
                                       device="cuda", baseline="dense_bf16", baseline_s=t_dense, **extra))
                if t_bdq:
                    rows.append(common.row(case, "bnb_dequant_matmul", t_bdq, flops=flops, ceiling="matmul_bf16",
                                           device="cuda"))
                del dy
            del x
        del w, w_deq, qw, bnb_q
        torch.cuda.empty_cache()
    return rows


if __name__ == "__main__":  # python -m benchmarks.bench_quant [cpu|gpu]
    import sys

    for r in run(sys.argv[1] if len(sys.argv) > 1 else "gpu"):
        print(r)
