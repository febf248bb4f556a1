"""Split-KV decode attention (fastft/kernels/attention_decode.py) against torch SDPA.

GPU suite (bf16): one new token per sequence against a 4k / 16k KV cache with GQA 32/8, D = 128, in
GB/s of K/V read against the copy bandwidth; per call (``common.bench``) and from CUDA graphs
(``common.bench_graph``, L2 flushed per call: a decode step's few microseconds are otherwise the
host's launch overhead). Baselines: SDPA on K/V expanded to the query heads, and SDPA's own GQA
(``enable_gqa``) where torch has it. No rows on CPU or without a GPU.
"""
from __future__ import annotations

import torch

from . import common
from .bench_attention import setup


def decode_rows(device, timer, row, dtype=torch.bfloat16):
    """One new token per sequence against a KV cache (GQA 32/8, D = 128): bytes of K/V read."""
    from fastft.kernels import attention_decode

    rows = []
    for B, S in ((8, 4096), (1, 16384)):
        Hq, Hkv, D = 32, 8, 128
        q = torch.randn(B, Hq, 1, D, device=device, dtype=dtype)
        k, v = (torch.randn(B, Hkv, S, D, device=device, dtype=dtype) for _ in range(2))
        nbytes = 2 * k.numel() * k.element_size()
        with torch.no_grad():
            t = timer(lambda: attention_decode.attention_decode(q, k, v, causal=True))
            kk, vv = k.repeat_interleave(Hq // Hkv, 1), v.repeat_interleave(Hq // Hkv, 1)
            tb = timer(lambda: torch.nn.functional.scaled_dot_product_attention(q, kk, vv))
        case = f"decode B{B} Hq{Hq} Hkv{Hkv} S{S} D{D}"
        rows.append(row(case, "fastft", t, bytes=nbytes, baseline="torch_sdpa", baseline_s=tb))
        rows.append(row(case, "torch_sdpa", tb, bytes=nbytes, note="K/V expanded to Hq heads beforehand"))
        # Kernel time as generation runs it (CUDA graphs, L2 flushed per call, common.bench_graph):
        # a decode step's few microseconds are otherwise the host's launch overhead. SDPA reads the
        # cache through enable_gqa (no expanded copy) where torch has it.
        times = {}
        with torch.no_grad():
            times["fastft"] = common.bench_graph(lambda: attention_decode.attention_decode(q, k, v, causal=True))
            try:
                times["torch_sdpa_gqa"] = common.bench_graph(
                    lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True))
            except (TypeError, RuntimeError) as e:  # an older torch, or a backend that refuses the graph
                print(f"[bench_attention_decode] torch_sdpa_gqa {case}: {type(e).__name__}: {e}")
        case_g = case + " (cuda graph)"
        base = times.get("torch_sdpa_gqa")
        rows.append(row(case_g, "fastft", times["fastft"], bytes=nbytes,
                        **({"baseline": "torch_sdpa_gqa", "baseline_s": base} if base else {})))
        if base:
            rows.append(row(case_g, "torch_sdpa_gqa", base, bytes=nbytes))
    return rows


def run(suite: str) -> list[dict]:
    if suite == "cpu" or not torch.cuda.is_available():
        return []
    dev, timer, row = setup(suite)
    return decode_rows(dev, timer, row)


if __name__ == "__main__":  # python -m benchmarks.bench_attention_decode
    for r in run("gpu" if torch.cuda.is_available() else "cpu"):
        print(r)
