"""Triton SwiGLU gate silu(g) · u (fastft/kernels/silu_mul.py) against float64 gold, forward and both
gradients; only g and u are saved for backward.

Tolerances are derived (tests/utils.py): at most 2x the error of PyTorch's own composition
(``F.silu(g) * u`` in the kernel's dtype) plus a small floor. Elementwise, so bf16 is checked under
the interpreter too.
"""
import pytest
import torch
import torch.nn.functional as F

from fastft import ops
from fastft.kernels import _common
from fastft.ops import dispatch
from tests.utils import assert_close_to_gold

pytestmark = pytest.mark.interpreter

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(1, 1), (3, 7, 37), (2, 2500), (5, 4100)]  # one element, odd widths, a row over the 2K tile


def _torch(g, u):
    return F.silu(g) * u


def _run(fn, g, u, dy):
    g = g.detach().clone().requires_grad_(True)
    u = u.detach().clone().requires_grad_(True)
    y = fn(g, u)
    y.backward(dy.to(y.dtype))
    return y, g.grad, u.grad


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_silu_mul_matches_gold(shape, dtype, device, triton_usable):
    g = (torch.randn(shape, device=device) * 4).to(dtype)  # both tails of the sigmoid
    u = torch.randn(shape, device=device).to(dtype)
    dy = torch.randn(shape, device=device, dtype=torch.float64)
    got = _run(dispatch.impl("silu_mul", "triton"), g, u, dy)
    lowp = _run(_torch, g, u, dy)
    gold = _run(_torch, g.double(), u.double(), dy)
    for a, b, c, name in zip(got, gold, lowp, ("y", "dg", "du")):
        assert a.dtype == dtype
        assert_close_to_gold(a, b, c, name=name)


def test_halves_of_a_fused_projection_and_saved_tensors(device, triton_usable):
    """g and u as the two halves of one (M, 2F) gate/up output (row-strided views, no copy), and the
    autograd node keeps exactly g and u."""
    gu = torch.randn(6, 2 * 40, device=device, requires_grad=True)
    g, u = gu[:, :40], gu[:, 40:]
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = dispatch.impl("silu_mul", "triton")(g, u)
    assert len(saved) == 2 and {s.data_ptr() for s in saved} == {g.data_ptr(), u.data_ptr()}
    y.sum().backward()
    gu2 = gu.detach().clone().requires_grad_(True)
    _torch(gu2[:, :40], gu2[:, 40:]).sum().backward()
    assert torch.allclose(y, _torch(g, u), atol=1e-6) and torch.allclose(gu.grad, gu2.grad, atol=1e-6)


def test_predicates_and_cuda_default(monkeypatch, device, triton_usable):
    assert ops.backend_for("silu_mul", torch.device("cuda")) == "triton"
    monkeypatch.setenv("FASTFT_BACKEND", "triton")
    g = torch.randn(3, 8, device=device)
    assert ops.backend_for("silu_mul", g.device, g, g) == "triton"
    assert ops.backend_for("silu_mul", g.device, g.double(), g.double()) == "reference"
    assert ops.backend_for("silu_mul", g.device, g, g.half()) == "reference"
    with _common.count_launches() as launches:
        ops.silu_mul(g, g)
    assert launches["_silu_mul_fwd_kernel"] == 1


def test_kernel_ops_trace_on_fake_tensors():
    from torch._subclasses.fake_tensor import FakeTensorMode

    impl = dispatch.impl("silu_mul", "triton")
    with FakeTensorMode(), _common.count_launches() as launches:
        g = torch.empty(4, 9, 300, dtype=torch.bfloat16, requires_grad=True)
        u = torch.empty(4, 9, 300, dtype=torch.bfloat16, requires_grad=True)
        y = impl(g, u)
        y.sum().backward()
        assert y.shape == g.shape and g.grad.shape == u.grad.shape == g.shape
    assert not launches


def test_custom_ops_pass_opcheck(device, triton_usable):
    from fastft.ops.library import registered

    dispatch.impl("silu_mul", "triton")
    ops_ = registered()
    g, u, dy = (torch.randn(3, 7, device=device) for _ in range(3))
    torch.library.opcheck(ops_["triton_silu_mul_fwd"], (g, u))
    torch.library.opcheck(ops_["triton_silu_mul_bwd"], (dy, g, u))


def test_benchmark_needs_cuda_and_its_gpu_path_runs(monkeypatch, capsys, triton_usable):
    from benchmarks import bench_silu_mul
    from tests.utils import smoke_gpu_bench

    assert bench_silu_mul.run("cpu") == [] and "needs CUDA" in capsys.readouterr().out
    rows = smoke_gpu_bench(monkeypatch, bench_silu_mul, TOKENS=(3,), INTERMEDIATE=(37,))
    assert {r["impl"] for r in rows} >= {"fastft", "torch"} and len(rows) >= 4
