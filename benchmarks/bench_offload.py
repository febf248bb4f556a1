"""The frozen LM head and embedding in host memory (fastft/nn/offload.py, docs/offload.md) on CUDA:
what streaming the head through the loss costs against the head on the device.

GPU suite, Llama-3.1-8B's head (V = 128256, H = 4096, bf16 weight), tokens N in {2048, 8192}
(quick: 2048), bf16 hidden states, ~10 % ignored targets. Rows:

* ``h2d_pinned``        -- a pinned 32 MiB host -> device copy (one vocabulary chunk): the host link's
                           bandwidth, which bounds the streamed loss (``gbps``);
* ``device``            -- ``fastft.ops.linear_cross_entropy`` forward + backward (dh) with the head
                           on the device (the default path);
* ``host_streamed``     -- the same with the head in pinned host memory: vocabulary chunks copied
                           on a side stream while the previous chunk's GEMMs run; ``speedup`` is over
                           ``device`` (< 1: the price of the 0.98 GiB saved), ``peak_mib`` the
                           allocator's peak during the call for both;
* ``embedding_device`` / ``embedding_host`` -- the lookup of N ids already on the device
                           (``HostEmbedding``: ids to the host, gather there, rows back).

Predictions (docs/offload.md, no GPU has run this): ~50 GB/s pinned H2D; the streamed loss copy-bound
below ~12k tokens: ~42 ms against ~11 ms on the device at N = 2048, ~50 ms against ~43 ms at N = 8192.
The CPU suite has nothing to time (``_rows`` runs its code on CPU tensors in tests/test_offload.py).
"""
from __future__ import annotations

import torch

from . import common

SHAPES = ((2048, 128256, 4096), (8192, 128256, 4096))


def _rows(dev: torch.device, shapes, bench=None) -> list[dict]:
    from torch import nn

    from fastft import ops
    from fastft.nn.offload import HostEmbedding

    bench = bench or (lambda fn: common.bench(fn, device=dev))
    cuda = dev.type == "cuda"
    rows = []
    for N, V, H in shapes:
        gen = torch.Generator().manual_seed(0)
        W = (torch.randn(V, H, generator=gen) * H ** -0.5).to(torch.bfloat16)
        Wh = W.pin_memory() if cuda else W
        Wd = W.to(dev)
        h = torch.randn(N, H, generator=gen).to(dev, torch.bfloat16).requires_grad_(True)
        labels = torch.randint(0, V, (N,), generator=gen)
        labels[::10] = -100
        labels = labels.to(dev)
        case = f"lm head fwd+bwd bf16 N={N} V={V} H={H}"

        def step(weight, stream):
            loss = ops.linear_cross_entropy(h, weight, labels, stream_weight=stream)
            return torch.autograd.grad(loss, h)

        # correctness at the benchmark shape, once: the streamed loss and dh against the device path
        (ga,), (gb,) = step(Wd, None), step(Wh, True)
        la, lb = (ops.linear_cross_entropy(h, w, labels, stream_weight=s).detach() for w, s in ((Wd, None), (Wh, True)))
        if not (torch.allclose(la, lb, rtol=1e-3, atol=1e-3) and torch.allclose(ga.float(), gb.float(), rtol=0.05,
                                                                                  atol=1e-4)):
            raise RuntimeError(f"bench_offload {case}: the streamed loss disagrees with the device path")
        peaks = {}
        for impl, weight, stream in (("device", Wd, None), ("host_streamed", Wh, True)):
            if cuda:
                torch.cuda.synchronize(dev)
                torch.cuda.reset_peak_memory_stats(dev)
                base = torch.cuda.memory_allocated(dev)
                step(weight, stream)
                torch.cuda.synchronize(dev)
                peaks[impl] = round((torch.cuda.max_memory_allocated(dev) - base) / 2 ** 20, 1)
        t_dev = bench(lambda: step(Wd, None))
        t_host = bench(lambda: step(Wh, True))
        flops = 3 * 2 * N * V * H  # forward GEMM, backward recompute + dh
        rows.append(common.row(case, "device", t_dev, flops=flops, device=dev.type,
                               **({"peak_mib": peaks["device"]} if peaks else {})))
        rows.append(common.row(case, "host_streamed", t_host, flops=flops, device=dev.type, baseline="device",
                               baseline_s=t_dev, pcie_bytes=2 * V * H * 2,
                               **({"peak_mib": peaks["host_streamed"]} if peaks else {})))
        chunk = Wh[: (32 << 20) // (H * 2)]
        dst = torch.empty(chunk.shape, dtype=chunk.dtype, device=dev)
        rows.append(common.row(f"h2d pinned {chunk.numel() * 2 >> 20} MiB", "h2d_pinned",
                               bench(lambda: dst.copy_(chunk, non_blocking=True)), bytes=chunk.numel() * 2,
                               device=dev.type))
        emb = nn.Embedding(V, H, device=dev, dtype=torch.bfloat16).requires_grad_(False)
        hemb = HostEmbedding.from_embedding(emb)
        ids = torch.randint(0, V, (1, N), generator=gen).to(dev)
        if not torch.equal(hemb(ids), emb(ids)):
            raise RuntimeError("bench_offload: HostEmbedding disagrees with nn.Embedding")
        ecase = f"embedding lookup bf16 N={N} H={H}"
        t_e = bench(lambda: emb(ids))
        rows.append(common.row(ecase, "embedding_device", t_e, bytes=N * H * 2, device=dev.type))
        rows.append(common.row(ecase, "embedding_host", bench(lambda: hemb(ids)), bytes=N * H * 2, device=dev.type,
                               baseline="embedding_device", baseline_s=t_e))
        W = Wh = Wd = emb = hemb = None  # (freed before the next shape)
        if cuda:
            torch.cuda.empty_cache()
    return rows


def run(suite: str) -> list[dict]:
    if suite == "cpu" or not torch.cuda.is_available():
        print("bench_offload: needs CUDA (host-to-device streaming); no rows")
        return []
    dev = common.device_for(suite)
    return _rows(dev, SHAPES[:1] if common.quick() else SHAPES)


if __name__ == "__main__":  # python -m benchmarks.bench_offload [cpu|gpu]
    import sys

    for r in run(sys.argv[1] if len(sys.argv) > 1 else "gpu"):
        print(r)
