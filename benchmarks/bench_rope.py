"""Rotary embedding of q and k (fastft/kernels/rope.py) against the PyTorch composition and
Liger-Kernel.

GPU suite, bf16, Llama-3 8B attention (32 query heads, 8 KV heads, head dim 128; full rotary) at
B x T in {4 x 2048, 1 x 8192}, q and k stored (B, H, T, D) as transformers' attention makes them:

* ``fastft``  -- the triton backend's ``rope`` on the (B, T, H, D) views, q then k; forward in
                 place (``inplace=True``, as the models call it), forward + backward out of place
                 (autograd does not let a leaf be overwritten);
* ``torch``   -- the reference composition (transformers' ``q * cos + rotate_half(q) * sin``);
* ``liger``   -- ``LigerRopeFunction`` (q and k in one launch, in place), when ``liger_kernel``
                 imports.

GB/s count the ideal bytes (each of q and k read and written once per direction; cos / sin once),
``pct_of_ceiling`` is against the measured copy bandwidth. Targets: >= 85 % of copy bandwidth,
>= 1.0x Liger. Without CUDA: a 'needs CUDA' line, no rows.
"""
from __future__ import annotations

import torch

from . import common
from .bench_rms_norm import liger, needs_cuda, rows_for, time_fwd_bwd

SHAPES = ((4, 2048), (1, 8192))  # (B, T)
HQ, HKV, D = 32, 8, 128


def _case(rope, liger_rope, B, T, dev):
    from fastft.ops import reference

    dt = torch.bfloat16
    E = 2
    q = torch.randn(B, HQ, T, D, device=dev, dtype=dt, requires_grad=True)
    k = torch.randn(B, HKV, T, D, device=dev, dtype=dt, requires_grad=True)
    ang = torch.arange(T, device=dev, dtype=torch.float32)[:, None] * \
        (1e4 ** (-torch.arange(0, D, 2, device=dev, dtype=torch.float32) / D))
    ang = torch.cat((ang, ang), -1)[None].expand(B, T, D)
    cos, sin = ang.cos().to(dt).contiguous(), ang.sin().to(dt).contiguous()
    dq, dk = torch.randn_like(q), torch.randn_like(k)

    def ours(q, k, inplace):
        return (rope(q.transpose(1, 2), cos, sin, inplace=inplace).transpose(1, 2),
                rope(k.transpose(1, 2), cos, sin, inplace=inplace).transpose(1, 2))

    def theirs(q, k):
        return (reference.rope(q.transpose(1, 2), cos, sin).transpose(1, 2),
                reference.rope(k.transpose(1, 2), cos, sin).transpose(1, 2))

    with torch.no_grad():
        t_in = common.bench(lambda: ours(q, k, True), device=dev)
    t = {"fastft": (t_in, time_fwd_bwd(lambda q, k: ours(q, k, False), [q, k], [dq, dk], dev)[1]),
         "torch": time_fwd_bwd(theirs, [q, k], [dq, dk], dev)}
    if liger_rope is not None:
        t["liger"] = time_fwd_bwd(lambda q, k: liger_rope.apply(q, k, cos, sin), [q, k], [dq, dk], dev)
    n = B * T * (HQ + HKV) * D
    io = 2 * n * E + 2 * B * T * D * E
    return rows_for(f"rope q+k B={B} T={T} Hq={HQ} Hkv={HKV} D={D} bf16", t, io, io)


def run(suite: str) -> list[dict]:
    if needs_cuda(suite, "rope"):
        return []
    from fastft.ops import dispatch

    dev = common.device_for(suite)
    rope = dispatch.impl("rope", "triton")
    liger_rope = liger("rope", "LigerRopeFunction")
    rows = []
    torch.manual_seed(0)
    for B, T in (SHAPES[:1] if common.quick() else SHAPES):
        rows += _case(rope, liger_rope, B, T, dev)
        torch.cuda.empty_cache()
    return rows


if __name__ == "__main__":  # python -m benchmarks.bench_rope [cpu|gpu]
    import sys

    for row in run(sys.argv[1] if len(sys.argv) > 1 else "gpu"):
        print(row)
