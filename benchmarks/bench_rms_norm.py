"""RMSNorm and fused residual-add + RMSNorm (fastft/kernels/rms_norm.py) against the PyTorch
composition and Liger-Kernel.

GPU suite, bf16 activations and weight, M tokens x hidden N in {4096, 8192} (Llama-3 8B / 70B rows):
forward, and forward + backward (dx and the weight gradient, as full fine-tuning needs), of

* ``fastft``  -- the triton backend's ``rms_norm`` / ``add_rms_norm`` (the CUDA default);
* ``torch``   -- the reference composition (transformers' LlamaRMSNorm expression under autograd;
                 for add_rms_norm the add first);
* ``liger``   -- Liger-Kernel's ``LigerRMSNormFunction`` (``LigerFusedAddRMSNormFunction`` for the
                 fused add) when ``liger_kernel`` imports.

GB/s count the bytes an ideal kernel moves (forward: read x (+ r), write y (+ h); backward: read dy
(+ dh), x or h, write dx), the same for every implementation, so the rows compare effective
bandwidth; ``pct_of_ceiling`` is against the measured copy bandwidth. Targets (issue 15): >= 85 % of
copy bandwidth and >= 1.0x Liger. Without CUDA the module prints that it needs CUDA and returns no
rows (the kernels' semantics are checked under the interpreter by tests/test_rms_norm.py).

The helpers at the top (``needs_cuda``, ``liger``, ``time_fwd_bwd``, ``rows_for``) are shared with
benchmarks/bench_rope.py and bench_silu_mul.py.
"""
from __future__ import annotations

import importlib

import torch

from . import common

TOKENS = (8192, 16384)
HIDDEN = (4096, 8192)
EPS = 1e-5


# ------------------------------------------------------------------------------ shared helpers
def needs_cuda(suite: str, name: str) -> bool:
    """True (after one clear line) when the suite cannot time Triton kernels: the CPU suite, or no GPU."""
    if suite == "cpu" or not torch.cuda.is_available():
        print(f"bench_{name}: needs CUDA (the Triton kernels are timed on a GPU only; "
              f"tests/test_{name}.py checks them under the interpreter) -- no rows")
        return True
    return False


def liger(module: str, name: str):
    """``liger_kernel.ops.<module>.<name>``, or None where Liger-Kernel is absent or lacks it."""
    try:
        return getattr(importlib.import_module(f"liger_kernel.ops.{module}"), name)
    except Exception:  # the baseline is skipped
        return None


def time_fwd_bwd(fn, inputs, grads, dev):
    """(forward seconds under no_grad, forward + backward seconds) of ``fn(*inputs)``; ``grads``
    are the upstream gradients of its output(s); the inputs that require grad get theirs through
    torch.autograd.grad (no accumulation pass)."""
    with torch.no_grad():
        t_f = common.bench(lambda: fn(*inputs), device=dev)
    wrt = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]

    def step():
        out = fn(*inputs)
        out = out if isinstance(out, tuple) else (out,)
        return torch.autograd.grad(out, wrt, grads)

    return t_f, common.bench(step, device=dev)


def rows_for(case, timings, fwd_bytes, bwd_bytes):
    """Rows for {impl: (t_fwd, t_fwd_bwd)}: GB/s, % of copy bandwidth, speedups over torch and Liger."""
    rows = []
    for impl, (tf, tfb) in timings.items():
        for what, t, b in (("fwd", tf, fwd_bytes), ("fwd+bwd", tfb, fwd_bytes + bwd_bytes)):
            extra = {}
            if impl == "fastft" and "liger" in timings:
                extra["vs_liger"] = round(timings["liger"][0 if what == "fwd" else 1] / t, 3)
            base = timings.get("torch")
            rows.append(common.row(f"{case} {what}", impl, t, bytes=b, ceiling="copy", device="cuda",
                                   baseline="torch" if impl != "torch" and base else None,
                                   baseline_s=(base[0] if what == "fwd" else base[1]) if base else None, **extra))
    return rows


# ------------------------------------------------------------------------------------ benchmark
def run(suite: str) -> list[dict]:
    if needs_cuda(suite, "rms_norm"):
        return []
    from fastft.ops import dispatch, reference

    dev = common.device_for(suite)
    dt = torch.bfloat16
    E = 2
    rms = dispatch.impl("rms_norm", "triton")
    add_rms = dispatch.impl("add_rms_norm", "triton")
    liger_rms = liger("rms_norm", "LigerRMSNormFunction")
    liger_add = liger("fused_add_rms_norm", "LigerFusedAddRMSNormFunction")
    rows = []
    torch.manual_seed(0)
    for M in (TOKENS[:1] if common.quick() else TOKENS):
        for N in HIDDEN:
            x = torch.randn(M, N, device=dev, dtype=dt, requires_grad=True)
            r = torch.randn(M, N, device=dev, dtype=dt, requires_grad=True)
            w = (torch.rand(N, device=dev) + 0.5).to(dt).requires_grad_()
            dy = torch.randn(M, N, device=dev, dtype=dt)
            t = {"fastft": time_fwd_bwd(lambda x, w: rms(x, w, EPS), [x, w], [dy], dev),
                 "torch": time_fwd_bwd(lambda x, w: reference.rms_norm(x, w, EPS), [x, w], [dy], dev)}
            if liger_rms is not None:
                t["liger"] = time_fwd_bwd(lambda x, w: liger_rms.apply(x, w, EPS, 0.0, "llama", False), [x, w],
                                          [dy], dev)
            rows += rows_for(f"rms_norm M={M} N={N} bf16", t, 2 * M * N * E, 3 * M * N * E)
            t = {"fastft": time_fwd_bwd(lambda x, r, w: add_rms(x, r, w, EPS), [x, r, w], [dy, dy], dev),
                 "torch": time_fwd_bwd(lambda x, r, w: reference.add_rms_norm(x, r, w, EPS), [x, r, w], [dy, dy],
                                       dev)}
            if liger_add is not None:
                t["liger"] = time_fwd_bwd(lambda x, r, w: liger_add.apply(x, r, w, EPS, 0.0, "llama", False),
                                          [x, r, w], [dy, dy], dev)
            rows += rows_for(f"add_rms_norm M={M} N={N} bf16", t, 4 * M * N * E, 4 * M * N * E)
            del x, r, w, dy
            torch.cuda.empty_cache()
    return rows


if __name__ == "__main__":  # python -m benchmarks.bench_rms_norm [cpu|gpu]
    import sys

    for row in run(sys.argv[1] if len(sys.argv) > 1 else "gpu"):
        print(row)
