"""Triton rotary embedding (fastft/kernels/rope.py) against float64 gold, forward and gradient, in
place and out of place, full and partial rotary.

Tolerances are derived (tests/utils.py): at most 2x the error of PyTorch's own composition (the
reference, HF's ``q * cos + rotate_half(q) * sin``) in the kernel's dtype, plus a small floor. The
kernel multiplies no matrices, so bf16 is checked under the interpreter too.
"""
import pytest
import torch

from fastft import ops
from fastft.kernels import _common
from fastft.kernels import rope as krope
from fastft.ops import dispatch, reference
from tests.utils import assert_close_to_gold

pytestmark = pytest.mark.interpreter

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# B, T, H, D, d (rotated features), cos batch (1 = broadcast over the batch)
CASES = [
    (2, 5, 3, 16, 16, 2),
    (1, 1, 1, 40, 40, 1),  # one token, odd head count, head dim off a power of two
    (2, 3, 5, 80, 64, 1),  # partial rotary (tail of 16), broadcast cos / sin
    (1, 7, 2, 96, 32, 1),  # a third of the head rotated (Phi-style partial_rotary_factor)
    (3, 2, 9, 24, 12, 3),  # half = 6 off a power of two
]


def _tables(B, T, d, dtype, device, cb):
    pos = torch.arange(T, device=device, dtype=torch.float64)[None, :].expand(cb, T) + \
        torch.arange(cb, device=device, dtype=torch.float64)[:, None] * 3
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, device=device, dtype=torch.float64) / d))
    ang = pos[..., None] * inv
    ang = torch.cat((ang, ang), dim=-1)
    return ang.cos().to(dtype), ang.sin().to(dtype)


def _run(fn, x, cos, sin, dy):
    x = x.detach().clone().requires_grad_(True)
    y = fn(x * 1, cos, sin)  # x * 1: a non-leaf, which the in-place path may overwrite
    y.backward(dy.to(y.dtype))
    return y, x.grad


@pytest.mark.parametrize("inplace", [False, True], ids=["out", "inplace"])
@pytest.mark.parametrize("B,T,H,D,d,cb", CASES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_rope_matches_gold(B, T, H, D, d, cb, dtype, inplace, device, triton_usable):
    x = torch.randn(B, T, H, D, device=device).to(dtype)
    cos, sin = _tables(B, T, d, dtype, device, cb)
    dy = torch.randn(B, T, H, D, device=device, dtype=torch.float64)
    impl = dispatch.impl("rope", "triton")
    y, dx = _run(lambda x, c, s: impl(x, c, s, inplace=inplace), x, cos, sin, dy)
    y_l, dx_l = _run(reference.rope, x, cos, sin, dy)
    y_g, dx_g = _run(reference.rope, x.double(), cos.double(), sin.double(), dy)
    assert_close_to_gold(y, y_g, y_l, name="y")
    assert_close_to_gold(dx, dx_g, dx_l, name="dx")
    assert torch.equal(y[..., d:], x[..., d:])  # the tail passes through exactly


def test_inplace_writes_into_x_when_autograd_allows(device, triton_usable):
    impl = dispatch.impl("rope", "triton")
    cos, sin = _tables(1, 4, 16, torch.float32, device, 1)
    # a (B, H, T, D) projection viewed as (B, T, H, D), as the HF attention path passes it
    w = torch.randn(32, 32, device=device, requires_grad=True)
    q = (torch.randn(1, 4, 32, device=device) @ w).view(1, 4, 2, 16).transpose(1, 2).transpose(1, 2)
    ptr = q.data_ptr()
    ref = reference.rope(q.detach().clone(), cos, sin)
    y = impl(q, cos, sin, inplace=True)
    assert y.data_ptr() == ptr and torch.allclose(y, ref, atol=1e-6)
    y.sum().backward()
    assert w.grad is not None
    # a leaf that requires grad, or a view of a custom Function's output: a new tensor instead
    leaf = torch.randn(1, 4, 2, 16, device=device, requires_grad=True)
    assert impl(leaf, cos, sin, inplace=True).data_ptr() != leaf.data_ptr()

    class Twice(torch.autograd.Function):
        @staticmethod
        def forward(ctx, a):
            return (a.reshape(-1, 32) * 2).view(a.shape)

        @staticmethod
        def backward(ctx, g):
            return g * 2

    a = torch.randn(1, 4, 32, device=device, requires_grad=True)
    v = Twice.apply(a).view(1, 4, 2, 16)
    assert not krope.inplace_ok(v)
    out = impl(v, cos, sin, inplace=True)
    assert out.data_ptr() != v.data_ptr()
    out.sum().backward()
    # without inplace, x is never written
    x = torch.randn(1, 4, 2, 16, device=device)
    x0 = x.clone()
    impl(x, cos, sin)
    assert torch.equal(x, x0)


def test_mixed_dtypes_follow_torch_promotion(device, triton_usable):
    """fp16 q against fp32 cos / sin (autocast): the output is fp32, dx fp16, never in place."""
    x = torch.randn(2, 3, 2, 32, device=device).to(torch.float16)
    cos, sin = _tables(2, 3, 32, torch.float32, device, 2)
    dy = torch.randn(2, 3, 2, 32, device=device, dtype=torch.float64)
    impl = dispatch.impl("rope", "triton")
    y, dx = _run(lambda x, c, s: impl(x, c, s, inplace=True), x, cos, sin, dy)
    y_l, dx_l = _run(reference.rope, x, cos, sin, dy)
    assert y.dtype == y_l.dtype == torch.float32 and dx.dtype == torch.float16
    y_g, dx_g = _run(reference.rope, x.double(), cos.double(), sin.double(), dy)
    assert_close_to_gold(y, y_g, y_l, name="y")
    assert_close_to_gold(dx, dx_g, dx_l, name="dx")


def test_predicates_and_cuda_default(monkeypatch, device, triton_usable):
    assert ops.backend_for("rope", torch.device("cuda")) == "triton"
    monkeypatch.setenv("FASTFT_BACKEND", "triton")
    x = torch.randn(1, 3, 2, 16, device=device)
    cos, sin = _tables(1, 3, 16, torch.float32, device, 1)
    assert ops.backend_for("rope", x.device, x, cos, sin) == "triton"
    assert ops.backend_for("rope", x.device, x.double(), cos.double(), sin.double()) == "reference"
    assert ops.backend_for("rope", x.device, x, cos.requires_grad_(), sin) == "reference"
    cos.requires_grad_(False)
    for d in (5, 18):  # an odd rotary width, one wider than the head
        t = torch.randn(1, 3, d, device=device)
        assert ops.backend_for("rope", x.device, x, t, t) == "reference"
    with _common.count_launches() as launches:
        ops.rope(x, cos, sin, inplace=True)
    assert launches["_rope_kernel"] == 1


def test_kernel_ops_trace_on_fake_tensors():
    from torch._subclasses.fake_tensor import FakeTensorMode

    impl = dispatch.impl("rope", "triton")
    with FakeTensorMode(), _common.count_launches() as launches:
        x = torch.empty(2, 8, 4, 64, dtype=torch.float16, requires_grad=True)
        c = torch.empty(2, 8, 32, dtype=torch.float16)
        y = impl(x * 1, c, c, inplace=True)
        y.sum().backward()
        assert y.shape == x.shape and x.grad.dtype == torch.float16
    assert not launches


# --------------------------------------------------------------------------- model integration
def _hf_loss_and_grads(model, ids, am, labels):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, attention_mask=am, labels=labels)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def test_patched_hf_attention_rotates_with_the_triton_kernel(monkeypatch, device, triton_usable):
    """fastft.patch routes transformers' apply_rotary_pos_emb to ops.rope (per instance, no global
    patch): fp32 loss and every gradient of the patched model on the Triton backend (rope in place
    into the q / k projections, RMSNorm, silu_mul, attention kernels) match the unpatched model."""
    from fastft.patching import patch
    from tests.hf_tiny import tiny_batch, tiny_model
    from tests.utils import rel_err

    model = tiny_model("llama").to(device).train()
    other = tiny_model("llama").to(device)  # an unpatched model of the same class stays untouched
    ids, am, labels = (t.to(device) for t in tiny_batch("right", batch=3, length=11))
    ref_loss, ref_grads = _hf_loss_and_grads(model, ids, am, labels)
    other_logits = other(input_ids=ids).logits.detach()
    monkeypatch.setenv("FASTFT_BACKEND", "triton")
    patch(model)
    calls = []
    real = ops.rope
    monkeypatch.setattr(ops, "rope", lambda *a, **kw: calls.append(kw.get("inplace")) or real(*a, **kw))
    with _common.count_launches() as launches:
        loss, grads = _hf_loss_and_grads(model, ids, am, labels)
    assert calls == [True, True] * model.config.num_hidden_layers
    assert launches["_rope_kernel"] == 4 * model.config.num_hidden_layers  # q and k, forward and backward
    assert launches["_rms_norm_fwd_kernel"] and launches["_silu_mul_bwd_kernel"]
    assert abs(loss.item() - ref_loss.item()) <= 1e-5 * abs(ref_loss.item())
    assert grads.keys() == ref_grads.keys()
    for n in ref_grads:
        assert rel_err(grads[n], ref_grads[n]) <= 1e-4, n
    monkeypatch.setenv("FASTFT_BACKEND", "reference")
    assert torch.equal(other(input_ids=ids).logits.detach(), other_logits) and not calls[4:]


def test_custom_ops_pass_opcheck(device, triton_usable):
    """``fastft::triton_rope`` (out of place) and ``triton_rope_`` (declares its mutation of x)
    under torch.library.opcheck."""
    from fastft.ops.library import registered

    dispatch.impl("rope", "triton")
    ops_ = registered()
    x, cs = torch.randn(1, 3, 2, 16, device=device), torch.randn(1, 3, 16, device=device)
    torch.library.opcheck(ops_["triton_rope"], (x, cs, cs, False, torch.float32))
    torch.library.opcheck(ops_["triton_rope_"], (x, cs, cs))


def test_benchmark_needs_cuda_and_its_gpu_path_runs(monkeypatch, capsys, triton_usable):
    from benchmarks import bench_rope
    from tests.utils import smoke_gpu_bench

    assert bench_rope.run("cpu") == [] and "needs CUDA" in capsys.readouterr().out
    rows = smoke_gpu_bench(monkeypatch, bench_rope, SHAPES=((2, 3),), HQ=4, HKV=2, D=16)
    assert {r["impl"] for r in rows} >= {"fastft", "torch"} and len(rows) >= 4
