"""Fused attention (fastft/kernels/attention.py) against torch SDPA's flash backend and FlashAttention.

GPU suite (bf16): B·T = 16k tokens, T in {512, 1k, 2k, 4k, 8k, 16k}, D in {64, 128} with
H·D = 2048, causal and not; forward and backward separately. FLOPs: forward 4·B·H·T²·D (x0.5
causal), backward 2.5x forward. Every row carries TFLOP/s and % of the measured bf16 matmul rate
(``ceiling="matmul_bf16"``); fastft rows carry the speedup over SDPA. Also:

* varlen: 16k tokens of mixed-length documents packed (``attention_varlen``) vs the same documents
  padded to the longest (dense kernel with a key padding mask); target >= 1.5x.

Decode (one query token against a KV cache) is benchmarks/bench_attention_decode.py.

CPU suite: fastft's C++ attention kernel (``fastft.ops`` cpp backend, csrc/) against torch's fused
CPU SDPA at the SmolLM2-135M training shape (B 4, 9 query / 3 K/V heads, T 256, D 64, causal),
forward and forward + backward, fp32 and bf16 (the README's "CPU attention" ratio). The Triton
kernels are CUDA-only (the interpreter is a correctness tool). The GPU suite returns no rows
when no GPU is present.
"""
from __future__ import annotations

import torch

from . import common

TOKENS = 16 * 1024
# Ordered so that a run cut by its time box has measured the target's rows (D = 128, T >= 4k) first.
SEQ_LENS = (4096, 8192, 16384, 2048, 1024, 512)
HEAD_DIMS = (128, 64)
MODEL_DIM = 2048  # H = MODEL_DIM // D


def attn_flops(B, H, T, S, D, causal, backward=False):
    f = 4.0 * B * H * T * S * D * (0.5 if causal else 1.0)
    return f * 2.5 if backward else f


def _sdpa_flash(q, k, v, causal):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)


def _flash_attn():
    try:
        import flash_attn  # noqa: F401
        from flash_attn import flash_attn_func, flash_attn_varlen_func
        return flash_attn_func, flash_attn_varlen_func
    except Exception:  # not installed / built for another torch: no baseline
        return None


def _fwd_bwd_times(fn, inputs, timer):
    """(forward seconds, backward seconds) of out = fn(*inputs); backward reuses one graph."""
    t_fwd = timer(lambda: fn(*inputs))
    out = fn(*inputs)
    dout = torch.randn_like(out)
    t_bwd = timer(lambda: out.backward(dout, retain_graph=True))
    for t in inputs:
        t.grad = None
    return t_fwd, t_bwd


def dense_rows(device, timer, row, seq_lens=SEQ_LENS, head_dims=HEAD_DIMS, tokens=TOKENS, model_dim=MODEL_DIM,
               dtype=torch.bfloat16):
    from fastft.kernels import attention as triton_attention

    fa = _flash_attn()
    rows = []
    for D in head_dims:
        H = model_dim // D
        for T in seq_lens:
            B = max(1, tokens // T)
            for causal in (False, True):
                case = f"B{B} H{H} T{T} D{D} {'causal' if causal else 'full'}"
                q, k, v = (torch.randn(B, H, T, D, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
                impls = [("fastft", lambda q, k, v: triton_attention.attention(q, k, v, causal=causal)),
                         ("torch_sdpa_flash", lambda q, k, v: _sdpa_flash(q, k, v, causal))]
                if fa is not None:
                    impls.append(("flash_attn", lambda q, k, v: fa[0](q.transpose(1, 2), k.transpose(1, 2),
                                                                      v.transpose(1, 2), causal=causal)))
                times = {}
                for name, fn in impls:
                    try:
                        times[name] = _fwd_bwd_times(fn, (q, k, v), timer)
                    except Exception as e:  # a baseline that cannot run this shape is reported, not fatal
                        rows.append({"case": case, "impl": name, "error": f"{type(e).__name__}: {e}"[:200]})
                base = times.get("torch_sdpa_flash")
                for name, (tf, tb) in times.items():
                    for d, t, bw in (("fwd", tf, False), ("bwd", tb, True)):
                        kw = {}
                        if name != "torch_sdpa_flash" and base is not None:
                            kw = dict(baseline="torch_sdpa_flash", baseline_s=base[0] if d == "fwd" else base[1])
                        rows.append(row(f"attention {d} {case}", name, t,
                                        flops=attn_flops(B, H, T, T, D, causal, backward=bw), **kw))
                del q, k, v
    return rows


def _doc_lengths(tokens, lo=128, hi=4096, seed=0):
    g = torch.Generator().manual_seed(seed)
    lens, total = [], 0
    while total < tokens:
        n = int(torch.randint(lo, hi + 1, (), generator=g))
        n = min(n, tokens - total)
        lens.append(n)
        total += n
    return lens


def varlen_rows(device, timer, row, tokens=TOKENS, D=128, H=16, dtype=torch.bfloat16):
    """Packed mixed-length documents vs the same documents padded to the longest (right padding)."""
    from fastft.kernels import attention as triton_attention

    lens = _doc_lengths(tokens)
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=device)
    L = max(lens)
    q, k, v = (torch.randn(tokens, H, D, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    qp, kp, vp = (torch.zeros(len(lens), H, L, D, device=device, dtype=dtype) for _ in range(3))
    kpm = torch.zeros(len(lens), L, dtype=torch.bool, device=device)
    for i, (a, b) in enumerate(zip(cu.tolist(), cu.tolist()[1:])):
        for src, dst in ((q, qp), (k, kp), (v, vp)):
            dst[i, :, : b - a] = src[a:b].detach().transpose(0, 1)
        kpm[i, : b - a] = True
    for t in (qp, kp, vp):
        t.requires_grad_(True)
    flops = sum(attn_flops(1, H, n, n, D, True) for n in lens)
    t_var = _fwd_bwd_times(lambda q, k, v: triton_attention.attention_varlen(q, k, v, cu, L, causal=True),
                           (q, k, v), timer)
    t_pad = _fwd_bwd_times(lambda q, k, v: triton_attention.attention(q, k, v, causal=True, key_padding_mask=kpm),
                           (qp, kp, vp), timer)
    case = f"{len(lens)} docs {tokens} tokens (max {L}) H{H} D{D} causal"
    rows = []
    for d, i, bw in (("fwd", 0, False), ("bwd", 1, True)):
        f = flops * (2.5 if bw else 1.0)
        rows.append(row(f"attention_varlen {d} {case}", "fastft_varlen", t_var[i], flops=f,
                        baseline="fastft_padded", baseline_s=t_pad[i]))
        rows.append(row(f"attention_varlen {d} {case}", "fastft_padded", t_pad[i], flops=f))
    return rows


def cpu_rows(B=4, Hq=9, Hkv=3, T=256, D=64) -> list[dict]:
    """fastft's CPU kernel vs torch SDPA (enable_gqa, is_causal) at the SmolLM2 training shape."""
    from fastft.ops import cpp, dispatch

    if not cpp.AVAILABLE:
        return [{"case": "cpu attention", "impl": "-", "skipped": "fastft._C is not built"}]
    mine = dispatch.impl("attention", "cpp")
    sdpa = torch.nn.functional.scaled_dot_product_attention
    rows = []
    for dt in (torch.float32, torch.bfloat16):
        g = torch.Generator().manual_seed(0)
        q = torch.randn(B, Hq, T, D, generator=g).to(dt).requires_grad_()
        k = torch.randn(B, Hkv, T, D, generator=g).to(dt).requires_grad_()
        v = torch.randn(B, Hkv, T, D, generator=g).to(dt).requires_grad_()
        do = torch.randn(B, Hq, T, D, generator=g).to(dt)
        name = str(dt).replace("torch.", "")
        flops = attn_flops(B, Hq, T, T, D, True)

        def fwd(fn):
            with torch.no_grad():
                return fn()

        def fwd_bwd(fn):
            out = fn()
            torch.autograd.grad(out, (q, k, v), do)

        theirs = lambda: sdpa(q, k, v, is_causal=True, enable_gqa=True)  # noqa: E731
        ours = lambda: mine(q, k, v, causal=True)  # noqa: E731
        for label, wrap, fl in (("fwd", fwd, flops), ("fwd+bwd", fwd_bwd, flops * 3.5)):
            case = f"attention CPU B{B} H{Hq}/{Hkv} T{T} D{D} causal {name} {label}"
            tb = common.bench(lambda: wrap(theirs), min_run_time=0.5)
            t = common.bench(lambda: wrap(ours), min_run_time=0.5)
            rows.append(common.row(case, "torch SDPA (fused CPU)", tb, flops=fl))
            rows.append(common.row(case, "fastft (C++ kernel)", t, flops=fl, baseline="torch SDPA (fused CPU)",
                                   baseline_s=tb))
    return rows



def setup(suite: str):
    """(device, timer(fn) -> seconds, row(case, impl, t, **kw) -> dict) of a GPU run."""
    dev = common.device_for(suite)

    def timer(fn):
        return common.bench(fn, device=dev)

    def row(case, impl, t, **kw):
        kw.setdefault("ceiling", "matmul_bf16" if "flops" in kw else ("copy" if "bytes" in kw else None))
        return common.row(case, impl, t, device=str(dev), **kw)

    return dev, timer, row


def run(suite: str) -> list[dict]:
    if suite == "cpu":
        return cpu_rows()
    if not torch.cuda.is_available():
        return []
    dev, timer, row = setup(suite)
    if common.quick():
        return dense_rows(dev, timer, row, seq_lens=(4096, 8192), head_dims=(128,))
    return dense_rows(dev, timer, row) + varlen_rows(dev, timer, row)


if __name__ == "__main__":  # python -m benchmarks.bench_attention
    for r in run("gpu" if torch.cuda.is_available() else "cpu"):
        print(r)

