"""Triton fused LoRA linear (fastft/kernels/lora.py) against the float64 reference.

Every output and gradient must be within 2x PyTorch's own error at the kernel's dtype (plus a small
floor) of the float64 gold (tests/utils.py). With dropout, the kernels regenerate their mask from a
Philox seed; ``dropout_mask`` materialises that mask and the gold is the reference given it
(tests/lora_util.py). On CPU these run under TRITON_INTERPRET=1 (set by conftest) on small shapes:
fp32 and fp16, and bf16 through the interpreter's upcast. The fused multi-projection blocks are
tests/test_lora_fused.py; PEFT parity of ``fastft.nn.LoraLinear`` is tests/test_peft_lora.py.
"""
import importlib

import pytest
import torch

from fastft import ops
from fastft.kernels import _common, _tma
from fastft.kernels import lora as triton_lora
from fastft.kernels import lora_fused
from fastft.ops import reference
from fastft.ops import triton_backend
from tests.lora_util import check_all, f32, lora_case, lora_given_mask, make, run_three
from tests.utils import assert_close_to_gold

pytestmark = pytest.mark.interpreter

DTYPES = [torch.float32, torch.float16]


# --------------------------------------------------------------------------------- lora_linear
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("p", [0.0, 0.25])
def test_lora_linear_options(device, dtype, bias, p):
    x, W, A, B, b = make(118, 96, 40, 16, bias)
    lora_case(device, dtype, x, W, A, B, b, 0.5, p)


@pytest.mark.parametrize("M,K,N,r", [
    (1, 40, 96, 8), (3, 96, 200, 1), (118, 200, 40, 64), (3, 40, 40, 256), (118, 40, 96, 8),
])
@pytest.mark.parametrize("dtype", DTYPES)
def test_lora_linear_shapes(device, dtype, M, K, N, r):
    x, W, A, B, b = make(M, K, N, r, bias=True, seed=M + K + N + r)
    lora_case(device, dtype, x, W, A, B, b, 2.0, 0.1 if r == 8 else 0.0)


@pytest.mark.unvalidated  # configs never run on a GPU: gpu_check's separate stage
@pytest.mark.parametrize("M,K,N,r,p", [(118, 200, 40, 64, 0.0), (3, 96, 200, 8, 0.1), (118, 40, 96, 16, 0.3)])
def test_lora_linear_tma_variant(device, M, K, N, r, p):
    """The forward's and dX's K-loops through TMA tensor descriptors (``USE_TMA``; zero fill past
    every edge instead of masks): same results as the pointer loads, forward and all gradients.
    K and N are multiples of 8 (16-byte fp16 rows, which TMA needs)."""
    x, W, A, B, b = make(M, K, N, r, bias=True, seed=M + K + N + r + 1)
    assert _tma.addressable(x.to(torch.float16).to(device), W.to(torch.float16).to(device)) == (device == "cpu" or
                                                                                         torch.cuda.get_device_capability()[0] >= 9)
    tma = {triton_lora.TUNED["fwd"]: dict(USE_TMA=True), triton_lora.TUNED["dx"]: dict(USE_TMA=True)}
    with _common.pinned_configs(tma):  # (dx pins the dropout variant too: one kernel, _lora_dx_kernel)
        lora_case(device, torch.float16, x, W, A, B, b, 0.5, p)


def test_tma_addressable_rules(device):
    a = torch.zeros(8, 40, dtype=torch.float16, device=device)
    if device == "cuda" and torch.cuda.get_device_capability()[0] < 9:
        assert not _tma.addressable(a)
        return
    assert _tma.addressable(a)
    assert not _tma.addressable(torch.zeros(8, 36, dtype=torch.float16, device=device))  # 72-byte rows
    assert not _tma.addressable(a[:, 1:])  # base not 16-byte aligned
    assert not _tma.addressable(a.t())  # columns not unit-stride
    assert _tma.addressable(torch.zeros(2, 3, 8, 40, dtype=torch.float16, device=device))  # any rank
    assert not _tma.addressable(torch.zeros(2, 3, 8, 40, dtype=torch.float16, device=device)[:, 1:2, :, 4:36])


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_lora_linear_full_finetune_dW(device, p):
    x, W, A, B, b = make(118, 40, 96, 8, bias=True, seed=3)
    lora_case(device, torch.float32, x, W, A, B, b, 0.75, p, full_ft=True)


def test_lora_linear_leading_shape(device):
    x, W, A, B, b = make(None, 40, 96, 16, bias=True, lead=(2, 3, 5), seed=5)
    lora_case(device, torch.float16, x, W, A, B, b, 0.5, 0.2)


def test_lora_linear_noncontiguous_x(device):
    x, W, A, B, b = make(None, 80, 40, 8, bias=False, lead=(7,), seed=6)
    xt = x[:, ::2]  # every other column: a strided view
    lora_case(device, torch.float32, xt, W[:, :40].contiguous(), A[:, :40].contiguous(), B, b, 1.0, 0.0)


def test_lora_linear_noncontiguous_params(device):
    """W, A, B given as transposed views (column-major storage) must give the same answer."""
    x, W, A, B, b = make(37, 40, 96, 8, bias=True, seed=7)
    Wt, At, Bt = (t.t().contiguous().t() for t in (W, A, B))
    assert not Wt.is_contiguous() and not At.is_contiguous()
    lora_case(device, torch.float32, x, Wt, At, Bt, b, 0.5, 0.1)


def test_lora_linear_bf16(device):
    """bf16 goes through the interpreter's upcast (its bf16 dot is wrong); on a GPU, native bf16 MMA."""
    x, W, A, B, b = make(118, 96, 40, 16, bias=True, seed=9)
    lora_case(device, torch.bfloat16, x, W, A, B, b, 0.5, 0.25)


def test_lora_linear_under_autocast(device):
    """fp32 parameters under bf16 autocast: computed in bf16 like F.linear, grads land in fp32."""
    x, W, A, B, b = (f32(t, device) for t in make(37, 40, 96, 8, bias=True, seed=12))
    A.requires_grad_()
    B.requires_grad_()
    with torch.autocast(device, dtype=torch.bfloat16):
        y = triton_lora.lora_linear(x, W, A, B, 0.5, bias=b)
        y_torch = reference.lora_linear(x, W, A, B, 0.5, bias=b)
    assert y.dtype == torch.bfloat16
    gold = reference.lora_linear(*(t.double() for t in (x, W, A, B)), 0.5, bias=b.double())
    assert_close_to_gold(y.cpu(), gold.cpu(), y_torch.cpu())
    y.float().sum().backward()
    assert A.grad.dtype == torch.float32 and B.grad.dtype == torch.float32 and B.grad.abs().sum() > 0


def test_dispatch_through_ops(device, monkeypatch):
    monkeypatch.setenv("FASTFT_BACKEND", "triton")
    x, W, A, B, b = make(5, 40, 40, 4, bias=True)
    x, W, A, B, b = (t.float().to(device) for t in (x, W, A, B, b))
    assert ops.backend_for("lora_linear", x.device) == "triton"
    y = ops.lora_linear(x, W, A, B, 0.5, bias=b)
    gold = reference.lora_linear(*(t.double() for t in (x, W, A, B)), 0.5, bias=b.double())
    assert_close_to_gold(y.cpu(), gold.cpu(), reference.lora_linear(x, W, A, B, 0.5, bias=b).cpu())


# --------------------------------------------------------------------------------- dropout
def test_dropout_mask_regenerated_not_stored(device):
    p = 0.3
    m1 = triton_lora.dropout_mask(11, (300, 333), p, device)
    m2 = triton_lora.dropout_mask(11, (300, 333), p, device)
    m3 = triton_lora.dropout_mask(12, (300, 333), p, device)
    assert torch.equal(m1, m2)
    assert not torch.equal(m1, m3)
    frac = m1.float().mean().item()
    # binomial: n = 99900, sd of the kept fraction = sqrt(p(1-p)/n) ~ 1.45e-3; allow 5 sd
    assert abs(frac - (1 - p)) < 5 * (p * (1 - p) / m1.numel()) ** 0.5
    # rows and columns are not correlated copies of each other (offsets are m·K + k)
    assert not torch.equal(m1[0], m1[1]) and not torch.equal(m1[:, 0], m1[:, 1])


def test_dropout_same_seed_same_result(device):
    x, W, A, B, b = (f32(t, device) for t in make(17, 40, 40, 8, bias=False))
    y1 = triton_lora.lora_linear(x, W, A, B, 1.0, dropout_p=0.5, generator=torch.Generator().manual_seed(3))
    y2 = triton_lora.lora_linear(x, W, A, B, 1.0, dropout_p=0.5, generator=torch.Generator().manual_seed(3))
    y3 = triton_lora.lora_linear(x, W, A, B, 1.0, dropout_p=0.5, generator=torch.Generator().manual_seed(4))
    assert torch.equal(y1, y2)
    assert not torch.allclose(y1, y3)
    # without a generator, torch's default generator decides: reseeding reproduces
    torch.manual_seed(9)
    y4 = triton_lora.lora_linear(x, W, A, B, 1.0, dropout_p=0.5)
    torch.manual_seed(9)
    assert torch.equal(y4, triton_lora.lora_linear(x, W, A, B, 1.0, dropout_p=0.5))


# --------------------------------------------------------------------------------- memory
def _saved_during(fn):
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, saved


@pytest.mark.parametrize("p", [0.0, 0.5])
def test_saves_only_x_and_u(device, p):
    M, K, N, r = 64, 96, 80, 8
    x, W, A, B, b = (f32(t, device) for t in make(M, K, N, r, bias=True))
    A.requires_grad_()
    B.requires_grad_()
    b.requires_grad_()
    x = x.view(4, 16, K).requires_grad_()
    y, saved = _saved_during(lambda: triton_lora.lora_linear(x, W, A, B, 0.5, bias=b, dropout_p=p,
                                                   generator=torch.Generator().manual_seed(0)))
    params = {W.data_ptr(), A.data_ptr(), B.data_ptr()}
    acts = [t for t in saved if t.data_ptr() not in params]
    # x (as a view of the caller's tensor: no copy) and u = drop(x) Aᵀ, nothing else
    assert len(acts) == 2, [tuple(t.shape) for t in acts]
    xs = [t for t in acts if t.data_ptr() == x.data_ptr()]
    us = [t for t in acts if tuple(t.shape) == (M, r)]
    assert len(xs) == 1 and len(us) == 1
    assert sum(t.numel() for t in acts) == M * K + M * r
    y.sum().backward()  # still differentiable with only these
    assert A.grad is not None and x.grad is not None


def test_saves_less_than_peft_style_composition(device):
    """The unfused composition (dropout copy, u, the products) saves far more activation memory."""
    M, K, N, r = 64, 96, 80, 8
    x, W, A, B, _ = (f32(t, device) for t in make(M, K, N, r, bias=False))
    A.requires_grad_()
    B.requires_grad_()
    x.requires_grad_()
    params = {W.data_ptr(), A.data_ptr(), B.data_ptr()}

    def act_bytes(saved):
        seen = {}
        for t in saved:
            if t.data_ptr() not in params:
                seen[t.data_ptr()] = t.numel() * t.element_size()
        return sum(seen.values())

    _, fused = _saved_during(lambda: triton_lora.lora_linear(x, W, A, B, 0.5, dropout_p=0.1))
    _, unfused = _saved_during(lambda: reference.lora_linear(x, W, A, B, 0.5, dropout_p=0.1))
    assert act_bytes(fused) < act_bytes(unfused)


# --------------------------------------------------------------------------------- quantized base
@pytest.mark.parametrize("M,dtype", [(37, torch.float32), (3, torch.float16)], ids=["M37-fp32", "M3-fp16-decode"])
@pytest.mark.parametrize("qtype", ["nf4", "int4"])
def test_lora_linear_quantized_base(device, qtype, M, dtype, monkeypatch):
    """Through the triton backend: the base from ops.quant_matmul, rank-r part fused onto it (M = 3,
    fp16: base and rank-r part in one quant decode kernel, LoraFusedBaseFunction); gold uses the
    dequantized weight."""
    quant = importlib.import_module("fastft.quant")
    x, W, A, B, b = make(M, 128, 64, 8, bias=True, seed=8)
    fused = []
    real = triton_backend.quant_matmul_lora  # the 4-bit base's one-kernel step (QuantBase.matmul_lora)
    monkeypatch.setattr(triton_backend, "quant_matmul_lora", lambda *a, **k: fused.append(1) or real(*a, **k))
    if qtype == "nf4":
        qW = quant.NF4Weight.from_float(W.float().to(device), blocksize=64)
    else:
        qW = quant.Int4Weight.from_float(W.float().to(device), group_size=128)
    Wd = qW.dequantize(torch.float32).double().cpu()  # the base the kernel must reproduce
    p, seed = 0.2, 99
    keep = triton_lora.dropout_mask(_common.draw_seed(torch.Generator().manual_seed(seed)), x.shape, p, device).cpu()

    def fn(impl, x, A, B, b):
        if impl == "kernel":
            return triton_backend.lora_linear(x, qW, A, B, 0.5, bias=b, dropout_p=p,
                                              generator=torch.Generator().manual_seed(seed))
        return lora_given_mask(x, Wd.to(x.dtype).to(x.device), A, B, 0.5, b, keep.to(x.device), p)

    check_all(run_three(fn, [x, A, B, b], [True, True, True, True], dtype, device),
               ["dX", "dA", "dB", "db"])
    assert bool(fused) == (M <= 16), "decode shapes take the one-kernel path, training shapes do not"


# --------------------------------------------------------------------------------- bad input
def test_bad_inputs_raise(device):
    x, W, A, B, b = (f32(t, device) for t in make(4, 40, 24, 8, bias=True))
    with pytest.raises(ValueError, match="lora_A"):
        triton_lora.lora_linear(x, W, A[:, :30], B, 1.0)
    with pytest.raises(ValueError, match="rank"):
        triton_lora.lora_linear(x, W, A, B[:, :4], 1.0)
    with pytest.raises(ValueError, match="weight"):
        triton_lora.lora_linear(x, W[:20], A, B, 1.0)
    with pytest.raises(ValueError, match="bias"):
        triton_lora.lora_linear(x, W, A, B, 1.0, bias=b[:3])
    with pytest.raises(ValueError, match="dropout_p"):
        triton_lora.lora_linear(x, W, A, B, 1.0, dropout_p=1.0)
    with pytest.raises(TypeError, match="float64"):
        triton_lora.lora_linear(x.double(), W.double(), A.double(), B.double(), 1.0)
    with pytest.raises(TypeError, match="weight dtype"):
        triton_lora.lora_linear(x.half(), W, A, B, 1.0)


def test_empty_batch(device):
    x, W, A, B, b = (f32(t, device) for t in make(1, 40, 24, 8, bias=True))
    y = triton_lora.lora_linear(x[:0], W, A, B, 1.0, bias=b)
    assert y.shape == (0, 24)


# --------------------------------------------------------------------------------- training
def _train_tiny_llama(ckpt, backend, monkeypatch, device, steps=20):
    import fastft

    monkeypatch.setenv("FASTFT_BACKEND", backend)
    torch.manual_seed(0)  # the same LoRA A initialisation in both runs
    model = fastft.from_pretrained(ckpt, dtype=torch.float32, device=device)
    model = fastft.get_peft_model(model, fastft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                           target_modules=["q_proj", "v_proj", "down_proj"]))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(0)).to(device)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_tiny_llama_lora_training_tracks_reference(tmp_path, monkeypatch, device):
    """20 LoRA steps of a tiny native Llama through the fused path track the reference path (fp32)."""
    models_util = importlib.import_module("models_util")
    ckpt = models_util.save_tiny_checkpoint(tmp_path / "llama", "llama", num_hidden_layers=1)
    ref = _train_tiny_llama(ckpt, "reference", monkeypatch, device)
    with _common.count_launches() as launches:
        fused = _train_tiny_llama(ckpt, "triton", monkeypatch, device)
    assert launches["_lora_down_kernel"] == 20 * 3, "the fused kernels were not on the model's path"
    assert ref[-1] < ref[0] - 0.3, "the reference run did not learn: the comparison would be vacuous"
    for step, (a, b) in enumerate(zip(fused, ref)):
        assert abs(a - b) / abs(b) <= 1e-4, f"step {step}: fused loss {a} vs reference {b}"


# --------------------------------------------------------------------------------- autotuning
def test_autotune_configs_pruned_per_shape():
    """The GPU path's config pruning (runs without a GPU: pruning is pure Python on the call's args)."""
    x = torch.empty(1, dtype=torch.float16)
    prune = triton_lora.prune_gemm("M", "N", "X")
    big = prune(triton_lora.gemm_configs(), {}, M=4096, N=4096, X=x)
    assert [c.kwargs["BLOCK_M"] for c in big][:2] == [128, 128]
    small = prune(triton_lora.gemm_configs(), {}, M=3, N=4096, X=x)
    assert small and all(c.kwargs["BLOCK_M"] <= 16 for c in small)
    dprune = triton_lora.prune_gemm("M", "K", "DX")
    qkv = dprune(triton_lora.gemm_configs(dropout=True), {}, M=4096, K=4096, DX=x, HAS_DROPOUT=True, NUM_SEG=3)
    assert qkv and all(c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 16 * 32 * c.num_warps for c in qkv)
    one = dprune(triton_lora.gemm_configs(dropout=True), {}, M=4096, K=4096, DX=x, HAS_DROPOUT=True, NUM_SEG=1)
    assert len(one) > len(qkv)
    sw = triton_lora.prune_gemm("M", "N", "X", 3)(triton_lora.gemm_configs(2), {}, M=8192, N=14336, X=x)
    assert all((c.kwargs["BLOCK_M"] + 2 * c.kwargs["BLOCK_N"]) * c.kwargs["BLOCK_K"] * 2 * c.num_stages
               <= 160 * 1024 for c in sw)
    for tuned in [*triton_lora.TUNED.values(), lora_fused.SWIGLU]:
        assert tuned.autotuner() is not None  # the autotuned wrappers build lazily, without a device


def test_gpu_launch_path_autotuned(device):
    """The GPU launch path (autotuner + EVEN_K heuristics + pruning on keyword args + restore_value),
    run with interpreted kernels (``_common.autotuning``): benchmarking is faked (one call per
    config), and the configs are cut to two so the interpreter finishes quickly."""
    benched = []

    def fake_bench(fn, *a, **k):
        fn()
        benched.append(1)
        return 1.0

    def two_small(configs):
        return [c for c in configs if max(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) <= 64][:2]

    with _common.autotuning(select=two_small, bench=fake_bench):
        x, W, A, B, b = make(70, 64, 96, 8, bias=True, seed=11)
        lora_case(device, torch.float32, x, W, A, B, b, 0.5, 0.2)
        lora_case(device, torch.float32, x, W, A, B, b, 0.5, 0.0, full_ft=True)
    assert benched, "the autotuner never benchmarked: the GPU path was not taken"
