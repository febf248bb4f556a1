"""Per-kernel CUDA time of fastft's fused paths, for finding where a slow op spends it.

``python -m benchmarks.profile_gpu`` runs each case a few times under ``torch.profiler`` and prints
the CUDA kernels sorted by total time, with the FLOP rate the case's dominant GEMM work implies. It
times nothing for the results files (benchmarks/bench_*.py do that); it answers "which kernel" when
a benchmark row is far under its ceiling (benchmarks/NOTES.md has what it found).
"""
from __future__ import annotations

import sys

import torch
from torch.profiler import ProfilerActivity, profile


def _table(name, fn, flops, reps=5):
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    total = sum(e.self_device_time_total for e in events) / reps  # us per call
    print(f"\n## {name}: {total / 1e3:.3f} ms of kernels per call"
          + (f", {flops / (total * 1e-6) / 1e12:.0f} TFLOP/s overall" if flops else ""))
    for e in sorted(events, key=lambda e: -e.self_device_time_total)[:8]:
        t = e.self_device_time_total / reps
        print(f"  {t / 1e3:8.3f} ms  {e.count // reps:3d}x  {e.key[:110]}")


def main() -> int:
    if not torch.cuda.is_available():
        print("profile_gpu: no CUDA device")
        return 0
    from fastft.kernels import attention as triton_attention
    from fastft.kernels import lora as triton_lora
    from fastft.kernels import quant_matmul
    from fastft.ops import triton_backend
    from fastft.quant import NF4Weight

    dev, dt = torch.device("cuda"), torch.bfloat16
    torch.manual_seed(0)
    M, K, N, r = 8192, 4096, 4096, 16
    W = torch.randn(N, K, device=dev, dtype=dt) / K ** 0.5
    x = torch.randn(M, K, device=dev, dtype=dt, requires_grad=True)
    dy = torch.randn(M, N, device=dev, dtype=dt)
    A_ = (torch.randn(r, K, device=dev, dtype=dt) / K ** 0.5).requires_grad_()
    B_ = (torch.randn(N, r, device=dev, dtype=dt) * 0.02).requires_grad_()
    gemm = 4.0 * M * N * K
    cases = [
        ("cuBLAS base fwd + dX", lambda: (torch.nn.functional.linear(x, W), dy @ W), gemm),
        ("fused LoRA fwd + bwd (dense bf16 base)", lambda: triton_lora.lora_linear(x, W, A_, B_, 2.0).backward(dy),
         gemm),
        ("fused LoRA fwd only", lambda: triton_lora.lora_linear(x.detach(), W, A_.detach(), B_.detach(), 2.0),
         gemm / 2),
    ]
    qw = NF4Weight.from_float(W, blocksize=64, double_quant=True)
    meta, tensors = triton_backend.raw(qw)
    cases += [
        ("quant-matmul fwd (NF4)", lambda: quant_matmul.quant_matmul(x.detach(), meta, tensors), gemm / 2),
        ("quant-matmul bwd dX (NF4)", lambda: quant_matmul.matmul_bwd(dy, meta, tensors), gemm / 2),
        ("quant-matmul decode M=1 (NF4)", lambda: quant_matmul.quant_matmul(x.detach()[:1], meta, tensors), 0),
        ("NF4 dequantize", lambda: triton_backend.nf4_dequantize(qw, dt), 0),
    ]
    for causal in (True, False):
        q, k, v = (torch.randn(4, 16, 4096, 128, device=dev, dtype=dt, requires_grad=True) for _ in range(3))
        f = 4.0 * 4 * 16 * 4096 * 4096 * 128 * (0.5 if causal else 1.0)

        def att(q=q, k=k, v=v, causal=causal):
            o = triton_attention.attention(q, k, v, causal=causal)
            o.backward(torch.ones_like(o))

        cases.append((f"attention fwd + bwd B4 H16 T4096 D128 {'causal' if causal else 'full'}", att, 3.5 * f))
    failed = 0
    for name, fn, flops in cases:
        try:
            _table(name, fn, flops)
        except Exception as e:  # keep profiling the other cases; a CUDA error ends the process anyway
            failed += 1
            print(f"\n## {name}: FAILED {type(e).__name__}: {str(e).splitlines()[0][:200]}")
            if "CUDA error" in str(e):
                break
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
