"""Cross-entropy rows (``fastft.ops.cross_entropy_grad_``: per-row losses, logits overwritten with
softmax − onehot) on CUDA: the Triton kernel (kernels/cross_entropy.py) against PyTorch and Liger.

GPU suite, bf16 logits, (rows, vocab) in {(4096, 128256), (8192, 49152), (4096, 32000)} (quick:
the first). Rows:

* ``fastft``          -- the Triton backend's op (one launch, online softmax, gradient in place);
* ``fastft_persistent_{1,2}x`` -- the same kernel on a grid of 1 or 2 programs per SM (fewer rows
                         in flight: their second pass may stay in L2); ``speedup`` is over ``fastft``,
                         to decide the default on a GPU;
* ``torch``           -- the same contract as a PyTorch composition (fastft's reference backend:
                         fp32 copy, logsumexp, gather, exp, scatter_add, copy back);
* ``torch_autograd``  -- what a model's loss usually runs: F.cross_entropy on the fp32-upcast
                         logits, forward and backward (gradient in fp32);
* ``liger``           -- Liger-Kernel's ``LigerCrossEntropyFunction`` forward on logits that require
                         grad (it then also writes the gradient in place), when ``liger_kernel`` imports.

``gbps`` counts the bytes any implementation must move: read the logits once, write the gradient
once (2 · rows · vocab · 2 bytes); fastft reads each row twice (the second pass mostly from L2), so
its DRAM traffic can be up to 1.5x that. ``pct_of_ceiling`` is against the measured copy bandwidth;
``speedup`` is over ``torch`` (fastft) and fastft's time / Liger's is in ``vs_liger``. Target
(issue 15): ≥ 85 % of copy and ≥ 1.0x Liger. The CPU suite has nothing to time (Triton on CUDA only;
tests/test_cross_entropy.py checks the kernel under the interpreter).

Predictions (offline reasoning; no GPU has run this kernel yet): at 8 warps and ~80 registers about
3 rows per SM are in flight, ~400 on an H100/H200; at V = 128256 that is ~100 MB of rows, twice the
L2, so the second pass reads DRAM again: ~55-62 % of copy on this metric (~85-90 % of the real
traffic). At V = 32000 / 49152 the rows in flight fit in L2: ~70-85 %. Liger runs the same two-pass
algorithm: ~0.9-1.1x. The PyTorch composition moves ~8x the bytes: fastft ≥ 4x faster.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import common

SHAPES = ((4096, 128256), (8192, 49152), (4096, 32000))


def _liger():
    try:
        from liger_kernel.ops.cross_entropy import LigerCrossEntropyFunction
    except Exception:  # not installed / incompatible: no liger rows
        return None
    return LigerCrossEntropyFunction


def run(suite: str) -> list[dict]:
    if suite == "cpu" or not torch.cuda.is_available():
        print("bench_cross_entropy: needs CUDA (the Triton kernel runs on GPUs only); no rows")
        return []
    from fastft.kernels import cross_entropy as kce
    from fastft.ops import reference, triton_backend

    dev = common.device_for(suite)
    liger = _liger()
    rows = []
    for n, V in (SHAPES[:1] if common.quick() else SHAPES):
        gen = torch.Generator(device=dev).manual_seed(0)
        z = torch.randn(n, V, device=dev, dtype=torch.bfloat16, generator=gen) * 2
        t = torch.randint(0, V, (n,), device=dev, generator=gen)
        # correctness at the benchmark shape, once: losses against the fp32 composition
        zc = z.clone()
        want = F.cross_entropy(z.float(), t, reduction="none")
        got = triton_backend.cross_entropy_grad_(zc, t)
        if not torch.allclose(got, want, rtol=1e-4, atol=1e-3):
            raise RuntimeError(f"cross_entropy_grad_ {n}x{V}: losses disagree with F.cross_entropy")
        del zc
        case = f"ce rows bf16 n={n} V={V}"
        nbytes = 2 * n * V * z.element_size()
        work = z.clone()
        t_ff = common.bench(lambda: triton_backend.cross_entropy_grad_(work, t), device=dev)
        t_ref = common.bench(lambda: reference.cross_entropy_grad_(work, t), device=dev)

        def autograd_ce():
            zf = z.float().requires_grad_(True)
            return torch.autograd.grad(F.cross_entropy(zf, t), zf)

        t_ag = common.bench(autograd_ce, device=dev)
        # the persistent grid (1 or 2 programs per SM): fewer rows in flight, so that a row's second
        # pass can hit L2 (kernels/cross_entropy.py); the default is one program per row
        sms = torch.cuda.get_device_properties(dev).multi_processor_count
        loss_buf = torch.empty(n, dtype=torch.float32, device=dev)
        t_pers = {k: common.bench(lambda: kce.cross_entropy_grad_(work, t, -100, loss_buf, programs=k * sms),
                                  device=dev) for k in (1, 2)}
        t_lg = None
        if liger is not None:
            try:
                # logits that require grad: Liger then writes the gradient in place (as fastft does)
                wl = z.clone().requires_grad_(True)
                t_lg = common.bench(lambda: liger.apply(wl, t), device=dev)
            except Exception as e:  # an API change: report, keep the other rows
                print(f"bench_cross_entropy: liger failed ({type(e).__name__}: {e})")
        extra = {"vs_liger": round(t_lg / t_ff, 3)} if t_lg else {}
        rows.append(common.row(case, "fastft", t_ff, bytes=nbytes, ceiling="copy", device="cuda", baseline="torch",
                               baseline_s=t_ref, **extra))
        for k, tp in t_pers.items():
            rows.append(common.row(case, f"fastft_persistent_{k}x", tp, bytes=nbytes, ceiling="copy", device="cuda",
                                   baseline="fastft", baseline_s=t_ff))
        rows.append(common.row(case, "torch", t_ref, bytes=nbytes, ceiling="copy", device="cuda"))
        rows.append(common.row(case, "torch_autograd", t_ag, bytes=nbytes, ceiling="copy", device="cuda"))
        if t_lg:
            rows.append(common.row(case, "liger", t_lg, bytes=nbytes, ceiling="copy", device="cuda"))
        torch.cuda.empty_cache()
    return rows


if __name__ == "__main__":  # python -m benchmarks.bench_cross_entropy [cpu|gpu]
    import sys

    for r in run(sys.argv[1] if len(sys.argv) > 1 else "gpu"):
        print(r)
