"""Tolerances derived from PyTorch's own low-precision error (DESIGN.md "Tests").

A kernel output passes when its max error against the float64 gold is at most ``factor`` (2) times
the max error PyTorch makes computing the same thing in the kernel's dtype, plus a small floor.
"""
import torch

# Floors: a few ulps of the dtype at unit scale, for outputs where torch happens to be exact.
FLOOR = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_close_to_gold(out, gold, torch_lowp, *, factor=2.0, floor=None, name="output"):
    """out: tested result; gold: float64 reference; torch_lowp: PyTorch's result in out's dtype."""
    assert out.shape == gold.shape, f"{name}: shape {tuple(out.shape)} != {tuple(gold.shape)}"
    assert torch.isfinite(out).all(), f"{name}: non-finite values"
    floor = FLOOR.get(out.dtype, 1e-6) if floor is None else floor
    err, ref_err = max_err(out, gold), max_err(torch_lowp, gold)
    scale = max(gold.abs().max().item(), 1.0) if gold.numel() else 1.0
    assert err <= factor * ref_err + floor * scale, (
        f"{name}: error {err:.3e} > {factor} x torch's {ref_err:.3e} + floor {floor * scale:.1e}"
    )
    return err, ref_err


def rel_err(a, b):
    """Relative error ||a - b|| / ||b|| in float64 (model parity checks)."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


# Parameters whose gradient is zero in exact arithmetic: BERT's attention key bias (softmax is
# invariant to adding the same q·b_k to every score of a query row). Both sides of a parity test
# hold only rounding noise there, which no relative comparison can match; callers check instead
# that the gradient is noise-sized (``is_noise``).
ANALYTICALLY_ZERO = ("attention.self.key.base_layer.bias", "attention.self.key.bias")


def is_noise(grad, scale, rel=1e-6):
    """True when ``grad`` is at rounding-noise level against the largest gradient ``scale``."""
    return float(grad.abs().max()) <= rel * scale


def output_and_grads(fn, inputs, grad_seed=1):
    """fn(*inputs) and the inputs' gradients for a fixed random float64 output gradient (cast to the
    output's dtype), so runs in different dtypes see the same upstream gradient."""
    ts = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*ts)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed), dtype=torch.float64)
    out.backward(g.to(out.dtype))
    return [out] + [t.grad for t in ts]



def smoke_gpu_bench(monkeypatch, module, **shapes):
    """Run a row-op benchmark module's GPU code path on CPU tensors under the Triton interpreter
    (tiny ``shapes`` set as module attributes, each timing a single call, ceilings stubbed), so a
    broken benchmark is caught here rather than on a lent GPU (with --device cuda the benchmark
    itself runs in the GPU check: skipped). Returns its rows."""
    import os

    import pytest

    from benchmarks import bench_rms_norm, common

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the CPU smoke run of a GPU benchmark needs the Triton interpreter")

    for name, value in shapes.items():
        monkeypatch.setattr(module, name, value)
    monkeypatch.setattr(common, "bench", lambda fn, device=None, **kw: (fn(), 1e-3)[1])
    monkeypatch.setattr(common, "device_for", lambda suite: torch.device("cpu"))
    monkeypatch.setattr(common, "ceiling_value", lambda ceiling, device: (1000.0, "gbps"))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(module, "needs_cuda", lambda suite, name: False)
    monkeypatch.setattr(bench_rms_norm, "needs_cuda", lambda suite, name: False)
    return module.run("gpu")
