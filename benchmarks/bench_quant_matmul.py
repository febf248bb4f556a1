"""4-bit matmul at training sizes (fastft/kernels/quant_matmul.py) against dense bf16 cuBLAS and
bitsandbytes.

GPU suite, bf16 activations, NF4 with double quantization (blocksize 64), the QLoRA default:

* forward, M in {512, 4096, 8192} x (K, N) in {(4096, 4096), (4096, 14336), (14336, 4096)}:
  TFLOP/s (2·M·N·K) and % of the measured bf16 matmul rate; baselines in the same run: dense bf16
  ``F.linear`` on the unquantized weight (cuBLAS), bitsandbytes dequantize + matmul (the path PEFT /
  Unsloth take), bitsandbytes ``matmul_4bit``. Targets: within 1.10x of dense and >= 1.3x faster
  than dequantize + matmul.
* backward dX = dY @ W: fastft's fused transposed kernel vs dense bf16 and bitsandbytes
  dequantize + matmul.

``fastft_lean`` rows: the ``torch`` backend (Triton dequantize + cuBLAS, nothing dense saved), the
CUDA default of ``fastft.ops.quant_matmul`` (fastft/ops/lean.py, benchmarks/NOTES.md). Each fastft
row carries ``speedup`` over dense bf16 and, in ``vs_bnb_dequant_matmul``, over bitsandbytes'
dequantize + matmul. Decode sizes (M <= 16) are benchmarks/bench_quant_decode.py. No rows on CPU.
"""
from __future__ import annotations

import torch

from . import common
from .bench_quant_pack import bnb, nf4_bytes, nf4_case, shapes

M_VALUES = (512, 4096, 8192)


def fwd_times(x, meta, tensors, qw, w_deq, bnb_q, lean_qmm, dev) -> dict:
    """Seconds per forward call of fastft's kernel, the torch backend, dense bf16 and bitsandbytes."""
    from fastft.kernels import quant_matmul

    bitsandbytes, F = bnb()
    times = {"fastft": common.bench(lambda: quant_matmul.quant_matmul(x, meta, tensors), device=dev),
             "dense_bf16": common.bench(lambda: torch.nn.functional.linear(x, w_deq), device=dev),
             "fastft_lean": common.bench(lambda: lean_qmm(x, qw), device=dev)}
    if bnb_q:
        times["bnb_dequant_matmul"] = common.bench(lambda: x @ F.dequantize_4bit(*bnb_q).t(), device=dev)
        times["bnb_matmul_4bit"] = common.bench(
            lambda: bitsandbytes.matmul_4bit(x, bnb_q[0].t(), quant_state=bnb_q[1]), device=dev)
    return times


def quant_rows(case, times, flops, weight_bytes=None) -> list[dict]:
    """One case's rows: fastft and fastft_lean against dense bf16 (``speedup``) and bitsandbytes
    (``vs_bnb_*``), then the baselines themselves."""
    t_bdq, t_b4 = times.get("bnb_dequant_matmul"), times.get("bnb_matmul_4bit")
    rows = []
    for name in ("fastft", "dense_bf16", "fastft_lean", "bnb_dequant_matmul", "bnb_matmul_4bit"):
        t = times.get(name)
        if t is None:
            continue
        extra = {}
        if name.startswith("fastft"):
            extra = dict(baseline="dense_bf16", baseline_s=times["dense_bf16"])
            if t_bdq:
                extra["vs_bnb_dequant_matmul"] = round(t_bdq / t, 3)
            if name == "fastft" and t_b4:
                extra["vs_bnb_matmul_4bit"] = round(t_b4 / t, 3)
            if name == "fastft" and weight_bytes:
                extra["weight_bytes"] = weight_bytes
        rows.append(common.row(case, name, t, flops=flops, ceiling="matmul_bf16", device="cuda", **extra))
    return rows


def run(suite: str) -> list[dict]:
    if suite == "cpu" or not torch.cuda.is_available():
        return []
    from fastft.kernels import quant_matmul
    from fastft.ops import dispatch, triton_backend
    from fastft.ops.lean import _device_dequantize as lean_dequant

    lean_qmm = dispatch.impl("quant_matmul", "torch")  # the CUDA default of fastft.ops.quant_matmul
    dev = common.device_for(suite)
    _, F = bnb()
    rows = []
    torch.manual_seed(0)
    m_values = (8192,) if common.quick() else M_VALUES
    for K, N in shapes():
        w, qw, w_deq, bnb_q = nf4_case(K, N, dev)
        meta, tensors = triton_backend.raw(qw)
        shape = f"K={K} N={N}"
        for M in m_values:
            x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
            flops = 2.0 * M * N * K
            times = fwd_times(x, meta, tensors, qw, w_deq, bnb_q, lean_qmm, dev)
            rows += quant_rows(f"quant_matmul fwd M={M} {shape}", times, flops, nf4_bytes(N, K))
            dy = torch.randn(M, N, device=dev, dtype=torch.bfloat16)
            times = {"fastft": common.bench(lambda: quant_matmul.matmul_bwd(dy, meta, tensors), device=dev),
                     "dense_bf16": common.bench(lambda: dy @ w_deq, device=dev),
                     "fastft_lean": common.bench(lambda: dy @ lean_dequant(qw, torch.bfloat16), device=dev)}
            if bnb_q:
                times["bnb_dequant_matmul"] = common.bench(lambda: dy @ F.dequantize_4bit(*bnb_q), device=dev)
            rows += quant_rows(f"quant_matmul bwd_dx M={M} {shape}", times, flops)
            dy = x = None  # free before the next M
        w = w_deq = qw = bnb_q = None  # noqa: F841 (free before the next shape)
        torch.cuda.empty_cache()
    return rows


if __name__ == "__main__":  # python -m benchmarks.bench_quant_matmul [cpu|gpu]
    import sys

    for r in run(sys.argv[1] if len(sys.argv) > 1 else "gpu"):
        print(r)
