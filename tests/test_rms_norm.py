"""Triton RMSNorm and fused residual-add + RMSNorm (fastft/kernels/rms_norm.py) against float64 gold,
forward and every gradient (x, residual, weight).

Tolerances are derived (tests/utils.py): at most 2x the error of PyTorch's own composition (the
reference, i.e. HF's LlamaRMSNorm expression) run in the kernel's dtype, plus a small floor. On CPU
the kernels run under the Triton interpreter; they multiply no matrices, so bf16 is checked there
too (``_common.cast`` rounds the interpreter's truncating casts).
"""
import pytest
import torch

from fastft import ops
from fastft.kernels import _common
from fastft.ops import dispatch, reference
from tests.utils import assert_close_to_gold

pytestmark = pytest.mark.interpreter

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
EPS = 1e-5
# hidden sizes off the power-of-two block, one row, rows that pack several to a program with a
# partial last tile, and one wide row per program with more rows than backward programs (8 on the
# interpreter's 4 "SMs": a program walks several rows and sums its dw partial over them)
SHAPES = [(1, 40), (3, 5, 96), (2, 7, 1000), (13, 1), (11, 4096)]


def _impl(op):
    return dispatch.impl(op, "triton")


def _run(fn, inputs, grads):
    """fn(*inputs) -> output(s), then the inputs' gradients for the given upstream gradients."""
    ts = [t.detach().clone().requires_grad_(True) for t in inputs]
    outs = fn(*ts)
    outs = outs if isinstance(outs, tuple) else (outs,)
    torch.autograd.backward(outs, [g.to(o.dtype) for o, g in zip(outs, grads)])
    return list(outs) + [t.grad for t in ts]


def _check(fn_triton, fn_ref, inputs, out_shapes, names):
    gen = torch.Generator().manual_seed(1)
    grads = [torch.randn(s, generator=gen, dtype=torch.float64).to(inputs[0].device) for s in out_shapes]
    got = _run(fn_triton, inputs, grads)
    lowp = _run(fn_ref, inputs, grads)
    gold = _run(fn_ref, [t.double() for t in inputs], grads)
    for g, r, lp, name in zip(got, gold, lowp, names):
        assert g.dtype == lp.dtype, f"{name}: dtype {g.dtype}, torch gives {lp.dtype}"
        assert_close_to_gold(g, r.to(torch.float64), lp, name=name)
    return got


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_rms_norm_matches_gold(shape, dtype, device, triton_usable):
    x = torch.randn(shape, device=device).to(dtype) * 3
    w = (torch.rand(shape[-1], device=device) + 0.5).to(dtype)
    _check(lambda x, w: _impl("rms_norm")(x, w, EPS), lambda x, w: reference.rms_norm(x, w, EPS), [x, w],
           [shape], ["y", "dx", "dw"])


@pytest.mark.parametrize("xdt,wdt", [(torch.float16, torch.float32), (torch.bfloat16, torch.float32),
                                     (torch.float32, torch.float16)], ids=str)
def test_rms_norm_mixed_dtypes_follow_torch_promotion(xdt, wdt, device, triton_usable):
    """Half activations with an fp32 weight (autocast training): HF's w · x.to(dtype) is fp32."""
    x = torch.randn(3, 5, 72, device=device).to(xdt)
    w = (torch.rand(72, device=device) + 0.5).to(wdt)
    y, dx, dw = _check(lambda x, w: _impl("rms_norm")(x, w, EPS), lambda x, w: reference.rms_norm(x, w, EPS),
                       [x, w], [(3, 5, 72)], ["y", "dx", "dw"])
    assert y.dtype == torch.promote_types(xdt, wdt) and dx.dtype == xdt and dw.dtype == wdt


@pytest.mark.parametrize("shape", [(1, 40), (3, 5, 96), (2, 7, 1000)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_add_rms_norm_matches_gold(shape, dtype, device, triton_usable):
    x = torch.randn(shape, device=device).to(dtype)
    r = (torch.randn(shape, device=device) * 4).to(dtype)
    w = (torch.rand(shape[-1], device=device) + 0.5).to(dtype)
    y, h, *_ = _check(lambda x, r, w: _impl("add_rms_norm")(x, r, w, EPS),
                      lambda x, r, w: reference.add_rms_norm(x, r, w, EPS), [x, r, w], [shape, shape],
                      ["normed", "sum", "dx", "dresidual", "dw"])
    assert torch.equal(h, x + r)  # the sum is rounded once, as torch's add


def test_add_rms_norm_mixed_residual_dtype(device, triton_usable):
    """A bf16 sublayer output added to an fp32 residual stream: the sum is fp32 and each input gets
    its gradient in its own dtype."""
    x = torch.randn(4, 80, device=device).to(torch.bfloat16)
    r = torch.randn(4, 80, device=device)
    w = torch.rand(80, device=device) + 0.5
    y, h, dx, dr, dw = _check(lambda x, r, w: _impl("add_rms_norm")(x, r, w, EPS),
                              lambda x, r, w: reference.add_rms_norm(x, r, w, EPS), [x, r, w], [(4, 80), (4, 80)],
                              ["normed", "sum", "dx", "dresidual", "dw"])
    assert h.dtype == torch.float32 and dx.dtype == torch.bfloat16 and dr.dtype == torch.float32


def test_frozen_weight_and_strided_rows(device, triton_usable):
    """No weight gradient asked (LoRA: frozen norms): no dw; a row-strided x is read in place."""
    base = torch.randn(6, 2 * 96, device=device, dtype=torch.float16)
    x = base[:, :96].clone().requires_grad_(True)
    w = torch.rand(96, device=device, dtype=torch.float16) + 0.5
    y = _impl("rms_norm")(base[:, :96], w, EPS)
    assert torch.equal(y, _impl("rms_norm")(base[:, :96].contiguous(), w, EPS))
    _impl("rms_norm")(x, w, EPS).sum().backward()
    assert x.grad is not None and w.grad is None


def test_empty_rows(device, triton_usable):
    x = torch.randn(0, 64, device=device, requires_grad=True)
    w = torch.ones(64, device=device, requires_grad=True)
    y = _impl("rms_norm")(x, w, EPS)
    y.sum().backward()
    assert y.shape == (0, 64) and torch.equal(w.grad, torch.zeros(64, device=device))


def test_predicate_routes_float64_to_the_reference(monkeypatch, device, triton_usable):
    monkeypatch.setenv("FASTFT_BACKEND", "triton")
    x64, w64 = torch.randn(3, 16, dtype=torch.float64, device=device), torch.ones(16, dtype=torch.float64,
                                                                                  device=device)
    assert ops.backend_for("rms_norm", x64.device, x64, w64, EPS) == "reference"
    assert ops.backend_for("add_rms_norm", x64.device, x64, x64, w64, EPS) == "reference"
    x = x64.float()
    assert ops.backend_for("rms_norm", x.device, x, w64.float(), EPS) == "triton"
    assert ops.backend_for("rms_norm", x.device, x, torch.ones(8, device=device), EPS) == "reference"
    with _common.count_launches() as launches:
        ops.rms_norm(x64, w64, EPS)
        ops.add_rms_norm(x, x, w64.float(), EPS)
    assert dict(launches) == {"_rms_norm_fwd_kernel": 1}


def test_cuda_default_backend_is_triton():
    """On CUDA the automatic choice is the Triton kernels (asked without a GPU: per device)."""
    for op in ("rms_norm", "add_rms_norm"):
        assert ops.backend_for(op, torch.device("cuda")) == "triton"
        assert op in dispatch._IMPLS["triton"]


def test_kernel_ops_trace_on_fake_tensors():
    """The launches are custom ops with fake implementations: a forward and backward on fake tensors
    gives the shapes and dtypes and launches nothing."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    _impl("rms_norm")
    with FakeTensorMode(), _common.count_launches() as launches:
        x = torch.empty(4, 7, 96, dtype=torch.float16, requires_grad=True)
        r = torch.empty(4, 7, 96, dtype=torch.float16, requires_grad=True)
        w = torch.empty(96, dtype=torch.float32, requires_grad=True)
        y, h = _impl("add_rms_norm")(x, r, w, EPS)
        (y.sum() + h.sum()).backward()
        assert y.dtype == torch.float32 and h.shape == x.shape and r.grad.dtype == torch.float16
        assert w.grad.shape == (96,)
    assert not launches
    with FakeTensorMode():
        x = torch.empty(4, 96, dtype=torch.bfloat16, device="cuda")
        assert _impl("rms_norm")(x, torch.empty(96, dtype=torch.bfloat16, device="cuda"), EPS).device.type == "cuda"


def test_native_llama_step_on_the_triton_row_kernels(monkeypatch, device, triton_usable):
    """The native decoder layer's residual add + post-attention norm runs as one add_rms_norm (and
    the q / k rotation in place): an fp32 loss and every gradient on the Triton backend match the
    reference backend."""
    from fastft.models.llama import LlamaForCausalLM
    from tests.models_util import tiny_config
    from tests.utils import rel_err

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_config("llama", num_hidden_layers=2)).to(device).train()
    for n, p in model.named_parameters():
        if n.endswith("norm.weight"):
            p.data.uniform_(0.5, 1.5)
    ids = torch.randint(3, 128, (2, 9), device=device)

    def step(backend):
        monkeypatch.setenv("FASTFT_BACKEND", backend)
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    ref_loss, ref = step("reference")
    with _common.count_launches() as launches:
        loss, got = step("triton")
    layers = model.config.num_hidden_layers
    assert launches["_rms_norm_fwd_kernel"] == 2 * layers + 1  # input norm, add + norm, final norm
    assert launches["_rope_kernel"] == 4 * layers
    assert abs(loss.item() - ref_loss.item()) <= 1e-5 * abs(ref_loss.item())
    for n in ref:
        assert rel_err(got[n], ref[n]) <= 1e-4, n


def test_custom_ops_pass_opcheck(device, triton_usable):
    """The launches' torch.library registrations (schema, fake implementation, no undeclared
    mutation or aliasing) hold up under torch.library.opcheck."""
    from fastft.ops.library import registered

    _impl("rms_norm")
    ops_ = registered()
    x, r, dy = (torch.randn(3, 40, device=device) for _ in range(3))
    w = torch.rand(40, device=device) + 0.5
    _, h, rstd = ops_["triton_rms_norm_fwd"](x, w, r, EPS)
    for args in ((x, w, None, EPS), (x, w, r, EPS)):
        torch.library.opcheck(ops_["triton_rms_norm_fwd"], args)
    for args in ((dy, h, w, rstd, dy, torch.float32, None, True), (dy, h, w, rstd, None, torch.float32, torch.float16,
                                                                    False)):
        torch.library.opcheck(ops_["triton_rms_norm_bwd"], args)


def test_benchmark_needs_cuda_and_its_gpu_path_runs(monkeypatch, capsys, triton_usable):
    """benchmarks/bench_rms_norm.py: on CPU one 'needs CUDA' line and no rows; its GPU code path
    (fastft, torch; Liger when installed) runs on tiny shapes under the interpreter."""
    from benchmarks import bench_rms_norm
    from tests.utils import smoke_gpu_bench

    assert bench_rms_norm.run("cpu") == [] and "needs CUDA" in capsys.readouterr().out
    rows = smoke_gpu_bench(monkeypatch, bench_rms_norm, TOKENS=(3,), HIDDEN=(40,))
    assert {r["impl"] for r in rows} >= {"fastft", "torch"} and all(r["gbps"] >= 0 for r in rows)
    assert {r["case"] for r in rows} >= {"rms_norm M=3 N=40 bf16 fwd+bwd", "add_rms_norm M=3 N=40 bf16 fwd"}


def test_row_ops_compile_into_one_graph(device, triton_usable):
    """torch.compile(fullgraph=True) traces add_rms_norm, rms_norm, the in-place rope and silu_mul
    (each launch one custom-op node, the autograd Functions included) without a graph break, and the
    compiled step computes what the eager one does."""
    add_rms, rms = _impl("add_rms_norm"), _impl("rms_norm")
    rope, silu = _impl("rope"), _impl("silu_mul")

    def step(x, w, wq, cos, sin):
        n, h = add_rms(x, x * 2, w, EPS)
        q = rope(((rms(h, w, EPS) + n) @ wq).view(2, 3, 2, 8), cos, sin, inplace=True)
        return silu(q, q * 1.5).sum()

    gen = torch.Generator().manual_seed(0)
    x, w, wq = (torch.randn(s, generator=gen).to(device).requires_grad_() for s in ((2, 3, 16), (16,), (16, 16)))
    cos, sin = (torch.randn(2, 3, 8, generator=gen).to(device) for _ in range(2))
    ref = step(x, w, wq, cos, sin)
    ref_grads = torch.autograd.grad(ref, (x, w, wq))
    torch._dynamo.reset()
    out = torch.compile(step, fullgraph=True, backend="aot_eager")(x, w, wq, cos, sin)
    grads = torch.autograd.grad(out, (x, w, wq))
    assert torch.allclose(out, ref, rtol=1e-6, atol=1e-6)
    for g, r in zip(grads, ref_grads):
        assert torch.allclose(g, r, rtol=1e-5, atol=1e-6)
