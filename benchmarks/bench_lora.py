"""Fused LoRA linear (fastft/kernels/lora.py) against the base matmul, PEFT and the three-matmul composition.

GPU suite, bf16: M in {512, 4096, 8192} x (in, out) in {(4096, 4096), (4096, 14336),
(14336, 4096)} x r in {16, 64}. Every case times forward + backward (dX, dA, dB; W frozen) of:

* ``base``     -- the floor: cuBLAS x Wᵀ and dY W alone, no LoRA (no autograd overhead);
* ``fastft``   -- the triton backend's ``lora_linear`` (``fastft.kernels.lora``: u = x Aᵀ first, s·u Bᵀ
                  in the GEMM epilogue, dX = dY W + du A fused the same way);
* ``compose``  -- F.linear(x, W) + s·F.linear(F.linear(x, A), B) under autograd;
* ``peft``     -- PEFT's ``lora.Linear`` around an ``nn.Linear`` (when peft is importable);
* ``fastft_dropout`` / ``peft_dropout`` -- the same with lora_dropout = 0.1;
* ``fastft_nf4`` -- the fused path over an NF4 (double-quant, blocksize 64) base weight;
* ``fastft_lean`` / ``fastft_lean_dropout`` / ``fastft_lean_nf4`` -- the ``torch`` backend's
  composition (fastft/ops/lean.py), the CUDA default of ``fastft.ops.lora_linear``
  (benchmarks/NOTES.md has the measurements behind that choice).

Targets: at r = 16, fastft ≤ 1.10x the base time and ≥ 1.3x faster than PEFT; NF4 ≤ 1.15x the
dense base; activation memory saved for backward ≤ 0.5x PEFT's (``saved_mb`` / ``saved_vs_peft``, counted
with ``torch.autograd.graph.saved_tensors_hooks``, parameters excluded). Each fastft row carries
``vs_base`` (time / base time) and ``speedup`` over PEFT. The CPU suite times nothing (the kernels
are CUDA-only; the interpreter checks semantics); it records ``saved_activation_rows``, the bytes a
Llama-shaped block's seven LoRA projections save for backward, fastft vs PEFT, which are the same
on every device.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import common

M_VALUES = (8192, 4096, 512)  # the training sizes first: a run cut by its time box keeps them
KN_SHAPES = ((4096, 4096), (4096, 14336), (14336, 4096))
RANKS = (16, 64)


def _flops(M, K, N, r):
    """fwd x Wᵀ + dX = dY W (4MNK) plus the rank-r work: u, s·u Bᵀ, du, dB, dA, du A."""
    return 4 * M * N * K + 2 * M * r * (K + N) + 4 * M * N * r + 4 * M * K * r


def _saved_bytes(fn, params):
    """Bytes of activations autograd saves for backward while ``fn`` runs (parameters excluded)."""
    ptrs = {p.data_ptr() for p in params}
    seen = {}

    def pack(t):
        if t.data_ptr() not in ptrs:
            seen[(t.data_ptr(), t.numel())] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def _peft_layer(W, r, alpha, dropout):
    try:
        from peft.tuners.lora import Linear as PeftLinear
    except Exception:  # peft absent: its rows are skipped
        return None
    N, K = W.shape
    base = torch.nn.Linear(K, N, bias=False, device=W.device, dtype=W.dtype)
    base.weight.data.copy_(W)
    base.weight.requires_grad_(False)
    try:  # peft >= 0.18 takes the LoraConfig; older releases take the options as keywords
        from peft import LoraConfig

        layer = PeftLinear(base, "default", LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout), r=r,
                           lora_alpha=alpha, lora_dropout=dropout)
    except TypeError:
        layer = PeftLinear(base, "default", r=r, lora_alpha=alpha, lora_dropout=dropout)
    layer.to(device=W.device, dtype=W.dtype)
    torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.02)
    return layer


def block_projections(d: int = 4096, kv: int = 1024, ffn: int = 14336):
    """A Llama-shaped block's seven LoRA projections (name, input, in, out); defaults are Llama-3-8B's
    widths. q / k / v read the same normed hidden state, gate / up the second one."""
    return (("q", "x", d, d), ("k", "x", d, kv), ("v", "x", d, kv), ("o", "attn", d, d),
            ("gate", "h", d, ffn), ("up", "h", d, ffn), ("down", "act", ffn, d))


def saved_activation_rows(device, M: int = 256, r: int = 16, dims=(4096, 1024, 14336)) -> list[dict]:
    """Activation bytes saved for backward by a Llama-shaped block's LoRA projections: fastft's
    dispatched ``lora_linear`` vs PEFT's ``lora.Linear``, lora_dropout 0 and 0.1, bf16. A count, not
    a timing, and the same on every device (both keep the same tensors on CPU and CUDA), so the CPU
    suite records it. Shared inputs count once (storage identity): fastft saves x and u = x Aᵀ per
    projection and regenerates dropout masks; PEFT saves x (no dropout) or its dropout output and
    mask per projection. The ratio does not depend on M."""
    from fastft import ops

    BLOCK_PROJ = block_projections(*dims)
    dt = torch.bfloat16
    g = torch.Generator().manual_seed(0)
    d, _, ffn = dims
    widths = {"x": d, "attn": d, "h": d, "act": ffn}
    inputs = {k: torch.randn(M, w, generator=g).to(device=device, dtype=dt).requires_grad_() for k, w in widths.items()}
    weights = {name: (torch.randn(n, k, generator=g) / k**0.5).to(device=device, dtype=dt)
               for name, _, k, n in BLOCK_PROJ}
    rows = []
    for p in (0.0, 0.1):
        adapters = {name: ((torch.randn(r, k, generator=g) / k**0.5).to(device=device, dtype=dt).requires_grad_(),
                           (torch.randn(n, r, generator=g) * 0.02).to(device=device, dtype=dt).requires_grad_())
                    for name, _, k, n in BLOCK_PROJ}
        peft = {name: _peft_layer(weights[name], r, 2 * r, p) for name, *_ in BLOCK_PROJ}

        def fastft_block():
            return sum(ops.lora_linear(inputs[src], weights[name], *adapters[name], 2.0, dropout_p=p).float().sum()
                       for name, src, _, _ in BLOCK_PROJ)

        def peft_block():
            return sum(peft[name](inputs[src]).float().sum() for name, src, _, _ in BLOCK_PROJ)

        params = list(weights.values()) + [t for ab in adapters.values() for t in ab]
        params += [q for layer in peft.values() if layer is not None for q in layer.parameters()]
        # A block input a projection saves counts (once): in a LoRA model with frozen norms no other
        # node keeps the normed hidden states alive for backward.
        fast = _saved_bytes(fastft_block, params)
        case = f"saved activations llama block d={d} ffn={ffn} M={M} r={r} dropout={p}"
        extra = {}
        if peft["q"] is not None:
            theirs = _saved_bytes(peft_block, params)
            rows.append(common.row(case, "peft", None, saved_mb=round(theirs / 2**20, 2)))
            extra["saved_vs_peft"] = round(fast / max(theirs, 1), 3)
        rows.append(common.row(case, "fastft", None, saved_mb=round(fast / 2**20, 2), **extra))
    return rows


def run(suite: str) -> list[dict]:
    if suite == "cpu":  # the kernels are CUDA-only; the saved-activation count is device-independent
        return saved_activation_rows(torch.device("cpu"))
    if not torch.cuda.is_available():
        return []
    from fastft.ops import dispatch
    from fastft.quant import NF4Weight

    fused_lora = dispatch.impl("lora_linear", "triton")  # the fused kernels (a 4-bit base through QuantBase)
    lean_lora = dispatch.impl("lora_linear", "torch")

    dev = common.device_for(suite)
    dt = torch.bfloat16
    rows = []
    quick = common.quick()
    for M in (M_VALUES[:1] if quick else M_VALUES):
        for K, N in (KN_SHAPES[:2] if quick else KN_SHAPES):
            W = torch.randn(N, K, device=dev, dtype=dt) / K**0.5
            x = torch.randn(M, K, device=dev, dtype=dt, requires_grad=True)
            dy = torch.randn(M, N, device=dev, dtype=dt)
            t_base = common.bench(lambda: (F.linear(x, W), dy @ W), device=dev)
            case0 = f"lora M={M} in={K} out={N}"
            flops_base = 4 * M * N * K
            rows.append(common.row(f"{case0} base", "torch", t_base, flops=flops_base, ceiling="matmul_bf16",
                                   device="cuda"))
            nf4 = NF4Weight.from_float(W, blocksize=64, double_quant=True)
            for r in (RANKS[:1] if quick else RANKS):
                case = f"{case0} r={r}"
                s = 2.0
                A = (torch.randn(r, K, device=dev, dtype=dt) / K**0.5).requires_grad_()
                B = (torch.randn(N, r, device=dev, dtype=dt) * 0.02).requires_grad_()
                params = [W, A, B]
                flops = _flops(M, K, N, r)

                def fused(p=0.0, weight=W):
                    y = fused_lora(x, weight, A, B, s, dropout_p=p)
                    y.backward(dy)

                def compose():
                    y = F.linear(x, W) + F.linear(F.linear(x, A), B) * s
                    y.backward(dy)

                def lean(p=0.0, weight=W):  # the CUDA default of fastft.ops.lora_linear (fastft/ops/lean.py)
                    y = lean_lora(x, weight, A, B, s, dropout_p=p)
                    y.backward(dy)

                impls = {"fastft": fused, "compose": compose, "fastft_dropout": lambda: fused(0.1),
                         "fastft_lean": lean, "fastft_lean_dropout": lambda: lean(0.1)}
                peft = {p: _peft_layer(W, r, s * r, p) for p in (0.0, 0.1)}
                if peft[0.0] is not None:
                    impls["peft"] = lambda: peft[0.0](x).backward(dy)
                    impls["peft_dropout"] = lambda: peft[0.1](x).backward(dy)
                impls["fastft_nf4"] = lambda: fused(0.0, nf4)
                impls["fastft_lean_nf4"] = lambda: lean(0.0, nf4)
                times = {name: common.bench(fn, device=dev) for name, fn in impls.items()}
                peft_params = [q for layer in peft.values() if layer is not None for q in layer.parameters()]
                # the packed base weight is a parameter too, not an activation
                peft_params += [t for t in nf4._tensors().values() if isinstance(t, torch.Tensor)]
                saved = {name: _saved_bytes(fn, params + peft_params) for name, fn in impls.items()}
                for name, t in times.items():
                    extra = {"vs_base": round(t / t_base, 3), "saved_mb": round(saved[name] / 2**20, 2)}
                    peer = "peft_dropout" if name.endswith("dropout") else "peft"
                    if name.startswith("fastft") and peer in times:
                        extra["saved_vs_peft"] = round(saved[name] / max(saved[peer], 1), 3)
                    baseline = peer if name.startswith("fastft") and peer in times else None
                    rows.append(common.row(case, name, t, flops=flops, ceiling="matmul_bf16", device="cuda",
                                           baseline=baseline, baseline_s=times.get(peer), **extra))
                x.grad = A.grad = B.grad = None
    return rows + saved_activation_rows(dev)
