"""Fused LoRA blocks (fastft/kernels/lora_fused.py) against today's per-projection default and PEFT.

The decoder-layer blocks ``fastft.nn.fused_blocks`` switches (``FASTFT_FUSED_LORA=1`` /
``TrainingArguments(fused_lora_blocks=True)``; off by default until these rows decide it), timed
forward + backward (dX, dA, dB; W frozen), bf16, Llama-3-8B widths (hidden 4096, kv 1024, ffn 14336):

* ``qkv`` block -- q / k / v of one x: ``unfused`` (three dispatched ``lora_linear`` calls, the lean
  cuBLAS node that is the CUDA default), ``fused`` (``lora_qkv``: one pass over x for the three down
  projections, one dX kernel) and ``peft`` (three PEFT ``lora.Linear``);
* ``gate_up`` block -- silu(gate(x)) · up(x): ``unfused`` (two ``lora_linear`` + ``fastft.ops.silu_mul``),
  ``fused`` (``lora_gate_up_swiglu``: both GEMMs from each x tile, SwiGLU in the epilogue) and
  ``peft`` (two PEFT layers + ``F.silu(g) * u``).

Each at lora_dropout 0 and 0.1 (with dropout the fused blocks keep no dropped copy of x). Rows carry
``speedup`` over the unfused default (``baseline``), ``vs_peft`` and ``saved_mb`` (activations saved
for backward, counted with saved-tensor hooks, parameters excluded). Decision rule for the default
(issue 15): turn the fused blocks on for a device when they are faster than the unfused path on
every shape here, and never slower than PEFT. The CPU suite times nothing (CUDA kernels).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import common
from .bench_lora import _peft_layer, _saved_bytes

M_VALUES = (8192, 4096)
RANKS = (16, 64)
DIMS = (4096, 1024, 14336)


def _flops(M, K, Ns, r):
    """Per projection: x Wᵀ and dY W (4MNK) plus the rank-r work (as bench_lora._flops)."""
    return sum(4 * M * N * K + 2 * M * r * (K + N) + 4 * M * N * r + 4 * M * K * r for N in Ns)


def _block_rows(dev, M, r, p) -> list[dict]:
    from fastft import ops
    from fastft.ops import dispatch, triton_backend

    lean = dispatch.impl("lora_linear", "torch")
    d, kv, ffn = DIMS
    dt = torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)
    rows = []
    s = 2.0
    for block, Ns in (("qkv", (d, kv, kv)), ("gate_up", (ffn, ffn))):
        K = d
        x = torch.randn(M, K, device=dev, dtype=dt, generator=g).requires_grad_()
        Ws = [torch.randn(N, K, device=dev, dtype=dt, generator=g) / K**0.5 for N in Ns]
        As = [(torch.randn(r, K, device=dev, dtype=dt, generator=g) / K**0.5).requires_grad_() for _ in Ns]
        Bs = [(torch.randn(N, r, device=dev, dtype=dt, generator=g) * 0.02).requires_grad_() for N in Ns]
        dys = [torch.randn(M, N, device=dev, dtype=dt, generator=g) for N in Ns[: 3 if block == "qkv" else 1]]
        peft = [_peft_layer(W, r, s * r, p) for W in Ws]

        if block == "qkv":
            def unfused():
                ys = [lean(x, W, A, B, s, dropout_p=p) for W, A, B in zip(Ws, As, Bs)]
                torch.autograd.backward(ys, dys)

            def fused():
                ys = triton_backend.lora_qkv(x, Ws, As, Bs, s, dropout_p=p)
                torch.autograd.backward(ys, dys)

            def peft_fn():
                torch.autograd.backward([layer(x) for layer in peft], dys)
        else:
            def unfused():
                gg, uu = (lean(x, W, A, B, s, dropout_p=p) for W, A, B in zip(Ws, As, Bs))
                ops.silu_mul(gg, uu).backward(dys[0])

            def fused():
                triton_backend.lora_gate_up_swiglu(x, Ws, As, Bs, s, dropout_p=p).backward(dys[0])

            def peft_fn():
                gg, uu = (layer(x) for layer in peft)
                (F.silu(gg) * uu).backward(dys[0])

        impls = {"unfused": unfused, "fused": fused}
        if peft[0] is not None:
            impls["peft"] = peft_fn
        params = Ws + As + Bs + [q for layer in peft if layer is not None for q in layer.parameters()]
        case = f"lora block {block} M={M} in={K} outs={'/'.join(map(str, Ns))} r={r} dropout={p}"
        times, saved = {}, {}
        for name, fn in impls.items():
            try:
                times[name] = common.bench(fn, device=dev)
                saved[name] = _saved_bytes(fn, params)
            except Exception as e:  # a failing variant is a row, not a lost run
                rows.append(common.row(case, name, None, error=f"{type(e).__name__}: {e}"[:300]))
            x.grad = None
            for t in As + Bs:
                t.grad = None
        for name, t in times.items():
            extra = {"saved_mb": round(saved[name] / 2**20, 2)}
            if "peft" in times and name != "peft":
                extra["vs_peft"] = round(times["peft"] / t, 3)
            base = "unfused" if name != "unfused" and "unfused" in times else None
            rows.append(common.row(case, name, t, flops=_flops(M, K, Ns, r), device=dev.type,
                                   ceiling="matmul_bf16" if dev.type == "cuda" else None,
                                   baseline=base, baseline_s=times.get("unfused") if base else None, **extra))
    return rows


def run(suite: str) -> list[dict]:
    if suite == "cpu" or not torch.cuda.is_available():
        return []  # CUDA kernels (their semantics are checked under the interpreter: tests/test_fused_blocks.py)
    dev = common.device_for(suite)
    quick = common.quick()
    rows = []
    for M in (M_VALUES[:1] if quick else M_VALUES):
        for r in (RANKS[:1] if quick else RANKS):
            for p in (0.0, 0.1):
                rows += _block_rows(dev, M, r, p)
    return rows
