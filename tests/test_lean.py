"""The ``torch`` backend (fastft/ops/lean.py): lean cuBLAS / BLAS compositions, the CUDA default for
``lora_linear`` and ``quant_matmul`` (measured faster than the fused Triton GEMMs on an H200).

The code is device-agnostic, so its semantics are checked here against the float64 reference (2x
PyTorch's own error in the dtype, tests/utils.py) on the ``device`` of the run: CPU tensors in CI,
and with ``--device cuda`` (benchmarks/gpu_check.sh) the CUDA default path itself -- cuBLAS, the
Triton NF4 / int4 dequantize, the CUDA generator's dropout regeneration -- in fp32 and bf16; plus
what it saves for backward. The dispatcher's per-op CUDA choice is checked without a GPU (it only
reads the device type).
"""
import pytest
import torch

from fastft.ops import dispatch
from fastft.quant import Int4Weight, NF4Weight
from utils import assert_close_to_gold

lean_lora = dispatch.impl("lora_linear", "torch")
lean_qmm = dispatch.impl("quant_matmul", "torch")
ref_lora = dispatch.impl("lora_linear", "reference")
ref_qmm = dispatch.impl("quant_matmul", "reference")


def test_cuda_auto_choice(monkeypatch):
    monkeypatch.delenv("FASTFT_BACKEND", raising=False)
    cuda = torch.device("cuda")
    assert dispatch.backend_for("lora_linear", cuda) == "torch"
    assert dispatch.backend_for("quant_matmul", cuda) == "torch"
    assert dispatch.backend_for("quant_matmul_grad_x", cuda) == "torch"  # device dequantize, not the reference's
    for op in ("attention", "attention_varlen", "nf4_dequantize", "nf4_quantize"):
        assert dispatch.backend_for(op, cuda) == "triton", op
    monkeypatch.setenv("FASTFT_BACKEND", "triton")  # the fused kernels stay one switch away
    assert dispatch.backend_for("lora_linear", cuda) == "triton"
    monkeypatch.setenv("FASTFT_BACKEND", "torch")
    assert dispatch.backend_for("quant_matmul", torch.device("cpu")) == "torch"
    assert dispatch.backend_for("attention", torch.device("cpu")) == "reference"  # no torch impl: falls back


def _grads(fn, x, A, B, bias, g):
    x, A, B = (t.detach().clone().requires_grad_(True) for t in (x, A, B))
    bias = None if bias is None else bias.detach().clone().requires_grad_(True)
    out = fn(x, A, B, bias)
    out.backward(g.to(out.dtype))
    return [out, x.grad, A.grad, B.grad] + ([] if bias is None else [bias.grad])


def _weight(kind, W):
    if kind == "dense":
        return W
    if kind == "nf4":
        return NF4Weight.from_float(W, blocksize=64, double_quant=True)
    return Int4Weight.from_float(W, group_size=32)


def _dtypes(device):
    """fp32 everywhere; bf16 (the CUDA training dtype) on CUDA, where it is not emulated."""
    return [torch.float32] + ([torch.bfloat16] if device == "cuda" else [])


@pytest.mark.parametrize("kind", ["dense", "nf4", "int4"])
@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
@pytest.mark.parametrize("with_bias", [False, True])
def test_lora_linear_matches_gold(kind, dropout_p, with_bias, device):
    M, K, N, r, s = 37, 96, 40, 8, 1.75
    x = torch.randn(3, M, K, device=device)
    W = torch.randn(N, K, device=device) / K ** 0.5
    A, B = torch.randn(r, K, device=device) / K ** 0.5, torch.randn(N, r, device=device) * 0.1
    bias = torch.randn(N, device=device) if with_bias else None
    g = torch.randn(3, M, N, dtype=torch.float64, device=device)
    for dt in _dtypes(device):
        wl = W.to(dt)
        wq = wl if kind == "dense" else _weight(kind, wl)
        w64 = wl.double() if kind == "dense" else wq.dequantize(torch.float64)

        def run(fn, w, dt):
            def f(x, A, B, b):
                gen = torch.Generator(device=device).manual_seed(11)  # the same mask for every implementation
                return fn(x.to(dt), w, A.to(dt), B.to(dt), s, bias=None if b is None else b.to(dt),
                          dropout_p=dropout_p, generator=gen)
            return f

        got = _grads(run(lean_lora, wq, dt), x, A, B, bias, g)
        gold = _grads(run(ref_lora, w64, torch.float64), x, A, B, bias, g)
        lowp = _grads(run(ref_lora, wq, dt), x, A, B, bias, g)
        for name, a, b, c in zip(["out", "dx", "dA", "dB", "dbias"], got, gold, lowp):
            assert_close_to_gold(a, b, c, name=f"{name} {dt}")


def _saved(fn, params=()):
    """Shapes of the tensors autograd saves while ``fn`` runs, parameters (by storage) excluded."""
    ptrs = {p.untyped_storage().data_ptr() for p in params}
    shapes = []

    def pack(t):
        if t.untyped_storage().data_ptr() not in ptrs:
            shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return shapes


def test_lora_saves_x_and_u_only():
    M, K, N, r = 64, 48, 80, 4
    x = torch.randn(M, K, requires_grad=True)
    W = torch.randn(N, K)
    A = torch.randn(r, K, requires_grad=True)
    B = torch.randn(N, r, requires_grad=True)
    for p in (0.0, 0.3):
        shapes = _saved(lambda: lean_lora(x, W, A, B, 2.0, dropout_p=p, generator=torch.Generator().manual_seed(0)),
                        params=(W, A, B))
        assert sorted(shapes) == sorted([(M, K), (M, r)]), (p, shapes)  # x and u: no mask, no dropped copy


@pytest.mark.parametrize("kind", ["nf4", "int4"])
def test_quant_matmul_matches_gold_and_saves_nothing_dense(kind, device):
    M, K, N = 29, 128, 72
    W = torch.randn(N, K, device=device) / K ** 0.5
    x = torch.randn(2, M, K, device=device)
    bias = torch.randn(N, device=device)
    g = torch.randn(2, M, N, dtype=torch.float64, device=device)

    def run(fn, w, dt):
        xs = x.detach().to(dt).clone().requires_grad_(True)
        bs = bias.detach().to(dt).clone().requires_grad_(True)
        y = fn(xs, w, bs)
        y.backward(g.to(y.dtype))
        return [y, xs.grad, bs.grad]

    for dt in _dtypes(device):
        wq = _weight(kind, W.to(dt))
        got = run(lean_qmm, wq, dt)
        gold = run(torch.nn.functional.linear, wq.dequantize(torch.float64), torch.float64)
        lowp = run(ref_qmm, wq, dt)
        for name, a, b, c in zip(["out", "dx", "dbias"], got, gold, lowp):
            assert_close_to_gold(a, b, c, name=f"{name} {dt}")
        xs = x.to(dt).requires_grad_(True)
        assert (N, K) not in _saved(lambda: lean_qmm(xs, wq, None))


def test_fallbacks_to_the_reference():
    x = torch.randn(5, 16, dtype=torch.float64, requires_grad=True)
    W, A, B = torch.randn(8, 16, dtype=torch.float64), torch.randn(2, 16, dtype=torch.float64), torch.randn(8, 2,
                                                                                                           dtype=torch.float64)
    torch.testing.assert_close(lean_lora(x, W, A, B, 0.5), ref_lora(x, W, A, B, 0.5), rtol=0, atol=0)
    wq = NF4Weight.from_float(torch.randn(8, 64), blocksize=64, double_quant=False)
    x64 = torch.randn(3, 64, dtype=torch.float64)
    torch.testing.assert_close(lean_qmm(x64, wq), ref_qmm(x64, wq), rtol=0, atol=0)
    with pytest.raises(ValueError, match="in_features"):
        lean_qmm(torch.randn(3, 63), wq)


def test_fp32_adapters_under_bf16_activations_stay_lean():
    """PEFT's default layout (fp32 adapters, bf16 activations and base): the lean path computes the
    branch in bf16 like the reference (within 2x its error against float64), returns fp32 adapter
    gradients, saves x and u only."""
    M, K, N, r = 37, 48, 40, 4
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(M, K, generator=gen).bfloat16()
    W = torch.randn(N, K, generator=gen).bfloat16()
    A = torch.randn(r, K, generator=gen) * 0.1
    B = torch.randn(N, r, generator=gen) * 0.1
    g = torch.randn(M, N, generator=gen).bfloat16()

    def run(fn, dt=None):
        xs, As, Bs = (t.clone().to(dt or t.dtype).requires_grad_(True) for t in (x, A, B))
        y = fn(xs, W.to(dt or W.dtype), As, Bs, 2.0)
        y.backward(g.to(y.dtype))
        return [y, xs.grad, As.grad, Bs.grad]

    got, lowp, gold = run(lean_lora), run(ref_lora), run(ref_lora, torch.float64)
    assert got[2].dtype == got[3].dtype == torch.float32 and got[0].dtype == torch.bfloat16
    for name, a, b, c in zip(["out", "dx", "dA", "dB"], got, gold, lowp):
        assert_close_to_gold(a, b, c, name=name)
    xs, As, Bs = (t.clone().requires_grad_(True) for t in (x, A, B))
    shapes = _saved(lambda: lean_lora(xs, W, As, Bs, 2.0), params=(W, As, Bs))
    assert sorted(shapes) == sorted([(M, K), (M, r), (r, K), (N, r)]), shapes


@pytest.mark.parametrize("kind", ["dense", "nf4"])
def test_lora_under_autocast_takes_the_lean_path(kind):
    """bf16 autocast over an fp32 model (the Trainer's bf16=True): lean casts x, the frozen base and
    the bias to bf16 as autocast would for F.linear, runs the fused node, and matches the
    reference's autocast result within 2x its error against float64."""
    from fastft.ops.lean import LeanLoraLinearFunction

    M, K, N, r = 37, 64, 40, 4
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(M, K, generator=gen)
    W = torch.randn(N, K, generator=gen) / K ** 0.5
    wq = W if kind == "dense" else _weight(kind, W)
    A = torch.randn(r, K, generator=gen) * 0.1
    B = torch.randn(N, r, generator=gen) * 0.1
    bias = torch.randn(N, generator=gen)
    g = torch.randn(M, N, generator=gen, dtype=torch.float64)

    def run(fn, w, autocast, dt=torch.float32):
        xs, As, Bs, bs = (t.clone().to(dt).requires_grad_(True) for t in (x, A, B, bias))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = fn(xs, w, As, Bs, 2.0, bias=bs)
        y.backward(g.to(y.dtype))
        return [y, xs.grad, As.grad, Bs.grad, bs.grad], y

    nodes = []
    orig = LeanLoraLinearFunction.apply
    LeanLoraLinearFunction.apply = lambda *a: nodes.append(1) or orig(*a)
    try:
        got, y = run(lean_lora, wq, True)
    finally:
        LeanLoraLinearFunction.apply = orig
    assert nodes and y.dtype == torch.bfloat16
    lowp, _ = run(ref_lora, wq, True)
    w64 = W.double() if kind == "dense" else wq.dequantize(torch.float64)
    gold, _ = run(ref_lora, w64, False, torch.float64)
    for name, a, b, c in zip(["out", "dx", "dA", "dB", "dbias"], got, gold, lowp):
        assert a.dtype == c.dtype, name
        assert_close_to_gold(a, b, c, name=name)
    if kind == "dense":  # the bf16 cast of the base is transient: nothing (N, K) besides W itself is saved
        xs = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            shapes = _saved(lambda: lean_lora(xs, W, A.clone().requires_grad_(True), B.clone().requires_grad_(True),
                                              2.0), params=(W,))
        assert (N, K) not in shapes, shapes
