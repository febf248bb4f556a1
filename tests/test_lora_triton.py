"""Triton fused LoRA linear (fastft.kernels.lora) against the float64 reference.

Every output and gradient must be within 2x PyTorch's own error at the kernel's dtype (plus a small
floor) of the float64 gold (tests/utils.py). With dropout, the kernels regenerate their mask from a
Philox seed; ``dropout_mask`` materialises that mask and the gold is the reference given it. On CPU
these run under TRITON_INTERPRET=1 (set by conftest) on small shapes: fp32 and fp16 (the
interpreter's bf16 dot is wrong, see the kernel module).
"""
import importlib
import pytest
import torch
import torch.nn.functional as F

from fastft import ops
from fastft.ops import reference
from tests.utils import assert_close_to_gold, rel_err

pytestmark = pytest.mark.interpreter

L = importlib.import_module("fastft.kernels.lora")
TMA = importlib.import_module("fastft.kernels._tma")
DTYPES = [torch.float32, torch.float16]


# --------------------------------------------------------------------------------- gold helpers
def _lora_given_mask(x, W, A, B, s, b, keep, p):
    """y = x Wᵀ + b + s·((x ⊙ keep / (1 - p)) Aᵀ) Bᵀ in x's dtype (keep None: no dropout)."""
    xd = x if keep is None else x * keep.to(x.dtype) / (1.0 - p)
    y = F.linear(x, W, b)
    return y + F.linear(F.linear(xd, A), B) * s


def _leaves(ts, dtype, grads):
    return [None if t is None else t.detach().to(dtype).requires_grad_(g) for t, g in zip(ts, grads)]


def _run_three(fn, inputs, grads, dtype, dev, dy_seed=1):
    """Run ``fn`` on (kernel dtype, float64, kernel dtype through torch) copies of inputs.

    ``fn(impl, *tensors)`` -> output; impl is "kernel" or "torch". Returns [(out, [grads...])] x 3.
    """
    results = []
    for impl, dt in (("kernel", dtype), ("torch", torch.float64), ("torch", dtype)):
        ts = _leaves(inputs, dt, grads)
        ts = [None if t is None else t.to(dev) for t in ts]
        ts = [None if t is None else (t.detach().requires_grad_(g)) for t, g in zip(ts, grads)]
        out = fn(impl, *ts)
        outs = out if isinstance(out, (list, tuple)) else [out]
        gen = torch.Generator().manual_seed(dy_seed)
        dys = [torch.randn(o.shape, generator=gen, dtype=torch.float64).to(dt).to(dev) for o in outs]
        torch.autograd.backward(outs, dys)
        grads_out = [None if t is None or not g else t.grad for t, g in zip(ts, grads)]
        results.append(([o.detach() for o in outs], grads_out))
    return results


def _check_all(results, names):
    (k_outs, k_grads), (g_outs, g_grads), (t_outs, t_grads) = results
    for i, (k, g, t) in enumerate(zip(k_outs, g_outs, t_outs)):
        assert_close_to_gold(k.cpu(), g.cpu(), t.cpu(), name=f"out{i}")
    for name, k, g, t in zip(names, k_grads, g_grads, t_grads):
        if g is None:
            continue
        assert k is not None, f"{name}: no gradient from the kernel"
        assert_close_to_gold(k.cpu(), g.cpu(), t.cpu(), name=name)


def _f32(t, device):
    return None if t is None else t.float().to(device)


def _make(M, K, N, r, bias, lead=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shape = (*lead, K) if lead else (M, K)
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    W = torch.randn(N, K, generator=gen, dtype=torch.float64) / K**0.5
    A = torch.randn(r, K, generator=gen, dtype=torch.float64) / K**0.5
    B = torch.randn(N, r, generator=gen, dtype=torch.float64) / r**0.5
    b = torch.randn(N, generator=gen, dtype=torch.float64) if bias else None
    return x, W, A, B, b


def _lora_case(device, dtype, x, W, A, B, b, s, p, full_ft=False):
    """Kernel vs gold vs torch-in-dtype for y, dX, dA, dB (dW, db) with the kernel's dropout mask."""
    seed = 1234
    keep = L.dropout_mask(L.draw_seed(torch.Generator().manual_seed(seed)), x.shape, p, device).cpu() if p else None

    def fn(impl, x, W, A, B, b):
        if impl == "kernel":
            gen = torch.Generator().manual_seed(seed)
            return L.lora_linear(x, W, A, B, s, bias=b, dropout_p=p, generator=gen)
        return _lora_given_mask(x, W, A, B, s, b, None if keep is None else keep.to(x.device), p)

    grads = [True, full_ft, True, True, b is not None]
    _check_all(_run_three(fn, [x, W, A, B, b], grads, dtype, device), ["dX", "dW", "dA", "dB", "db"])


# --------------------------------------------------------------------------------- lora_linear
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("p", [0.0, 0.25])
def test_lora_linear_options(device, dtype, bias, p):
    x, W, A, B, b = _make(118, 96, 40, 16, bias)
    _lora_case(device, dtype, x, W, A, B, b, 0.5, p)


@pytest.mark.parametrize("M,K,N,r", [
    (1, 40, 96, 8), (3, 96, 200, 1), (118, 200, 40, 64), (3, 40, 40, 256), (118, 40, 96, 8),
])
@pytest.mark.parametrize("dtype", DTYPES)
def test_lora_linear_shapes(device, dtype, M, K, N, r):
    x, W, A, B, b = _make(M, K, N, r, bias=True, seed=M + K + N + r)
    _lora_case(device, dtype, x, W, A, B, b, 2.0, 0.1 if r == 8 else 0.0)


@pytest.mark.parametrize("M,K,N,r,p", [(118, 200, 40, 64, 0.0), (3, 96, 200, 8, 0.1), (118, 40, 96, 16, 0.3)])
def test_lora_linear_tma_variant(device, M, K, N, r, p, monkeypatch):
    """The forward's and dX's K-loops through TMA tensor descriptors (``USE_TMA``; zero fill past
    every edge instead of masks): same results as the pointer loads, forward and all gradients.
    K and N are multiples of 8 (16-byte fp16 rows, which TMA needs)."""
    monkeypatch.setattr(L, "INTERPRET_TMA", True)
    x, W, A, B, b = _make(M, K, N, r, bias=True, seed=M + K + N + r + 1)
    assert TMA.addressable(x.to(torch.float16).to(device), W.to(torch.float16).to(device)) == (device == "cpu" or
                                                                                        torch.cuda.get_device_capability()[0] >= 9)
    _lora_case(device, torch.float16, x, W, A, B, b, 0.5, p)


def test_tma_addressable_rules(device):
    a = torch.zeros(8, 40, dtype=torch.float16, device=device)
    if device == "cuda" and torch.cuda.get_device_capability()[0] < 9:
        assert not TMA.addressable(a)
        return
    assert TMA.addressable(a)
    assert not TMA.addressable(torch.zeros(8, 36, dtype=torch.float16, device=device))  # 72-byte rows
    assert not TMA.addressable(a[:, 1:])  # base not 16-byte aligned
    assert not TMA.addressable(a.t())  # columns not unit-stride
    assert TMA.addressable(torch.zeros(2, 3, 8, 40, dtype=torch.float16, device=device))  # any rank
    assert not TMA.addressable(torch.zeros(2, 3, 8, 40, dtype=torch.float16, device=device)[:, 1:2, :, 4:36])


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_lora_linear_full_finetune_dW(device, p):
    x, W, A, B, b = _make(118, 40, 96, 8, bias=True, seed=3)
    _lora_case(device, torch.float32, x, W, A, B, b, 0.75, p, full_ft=True)


def test_lora_linear_leading_shape(device):
    x, W, A, B, b = _make(None, 40, 96, 16, bias=True, lead=(2, 3, 5), seed=5)
    _lora_case(device, torch.float16, x, W, A, B, b, 0.5, 0.2)


def test_lora_linear_noncontiguous_x(device):
    x, W, A, B, b = _make(None, 80, 40, 8, bias=False, lead=(7,), seed=6)
    xt = x[:, ::2]  # every other column: a strided view
    _lora_case(device, torch.float32, xt, W[:, :40].contiguous(), A[:, :40].contiguous(), B, b, 1.0, 0.0)


def test_lora_linear_noncontiguous_params(device):
    """W, A, B given as transposed views (column-major storage) must give the same answer."""
    x, W, A, B, b = _make(37, 40, 96, 8, bias=True, seed=7)
    Wt, At, Bt = (t.t().contiguous().t() for t in (W, A, B))
    assert not Wt.is_contiguous() and not At.is_contiguous()
    _lora_case(device, torch.float32, x, Wt, At, Bt, b, 0.5, 0.1)


def test_lora_linear_bf16(device):
    """bf16 goes through the interpreter's upcast (its bf16 dot is wrong); on a GPU, native bf16 MMA."""
    x, W, A, B, b = _make(118, 96, 40, 16, bias=True, seed=9)
    _lora_case(device, torch.bfloat16, x, W, A, B, b, 0.5, 0.25)


def test_lora_linear_under_autocast(device):
    """fp32 parameters under bf16 autocast: computed in bf16 like F.linear, grads land in fp32."""
    x, W, A, B, b = (_f32(t, device) for t in _make(37, 40, 96, 8, bias=True, seed=12))
    A.requires_grad_()
    B.requires_grad_()
    with torch.autocast(device, dtype=torch.bfloat16):
        y = L.lora_linear(x, W, A, B, 0.5, bias=b)
        y_torch = reference.lora_linear(x, W, A, B, 0.5, bias=b)
    assert y.dtype == torch.bfloat16
    gold = reference.lora_linear(*(t.double() for t in (x, W, A, B)), 0.5, bias=b.double())
    assert_close_to_gold(y.cpu(), gold.cpu(), y_torch.cpu())
    y.float().sum().backward()
    assert A.grad.dtype == torch.float32 and B.grad.dtype == torch.float32 and B.grad.abs().sum() > 0


def test_dispatch_through_ops(device, monkeypatch):
    monkeypatch.setenv("FASTFT_BACKEND", "triton")
    x, W, A, B, b = _make(5, 40, 40, 4, bias=True)
    x, W, A, B, b = (t.float().to(device) for t in (x, W, A, B, b))
    assert ops.backend_for("lora_linear", x.device) == "triton"
    y = ops.lora_linear(x, W, A, B, 0.5, bias=b)
    gold = reference.lora_linear(*(t.double() for t in (x, W, A, B)), 0.5, bias=b.double())
    assert_close_to_gold(y.cpu(), gold.cpu(), reference.lora_linear(x, W, A, B, 0.5, bias=b).cpu())


# --------------------------------------------------------------------------------- dropout
def test_dropout_mask_regenerated_not_stored(device):
    p = 0.3
    m1 = L.dropout_mask(11, (300, 333), p, device)
    m2 = L.dropout_mask(11, (300, 333), p, device)
    m3 = L.dropout_mask(12, (300, 333), p, device)
    assert torch.equal(m1, m2)
    assert not torch.equal(m1, m3)
    frac = m1.float().mean().item()
    # binomial: n = 99900, sd of the kept fraction = sqrt(p(1-p)/n) ~ 1.45e-3; allow 5 sd
    assert abs(frac - (1 - p)) < 5 * (p * (1 - p) / m1.numel()) ** 0.5
    # rows and columns are not correlated copies of each other (offsets are m·K + k)
    assert not torch.equal(m1[0], m1[1]) and not torch.equal(m1[:, 0], m1[:, 1])


def test_dropout_same_seed_same_result(device):
    x, W, A, B, b = (_f32(t, device) for t in _make(17, 40, 40, 8, bias=False))
    y1 = L.lora_linear(x, W, A, B, 1.0, dropout_p=0.5, generator=torch.Generator().manual_seed(3))
    y2 = L.lora_linear(x, W, A, B, 1.0, dropout_p=0.5, generator=torch.Generator().manual_seed(3))
    y3 = L.lora_linear(x, W, A, B, 1.0, dropout_p=0.5, generator=torch.Generator().manual_seed(4))
    assert torch.equal(y1, y2)
    assert not torch.allclose(y1, y3)
    # without a generator, torch's default generator decides: reseeding reproduces
    torch.manual_seed(9)
    y4 = L.lora_linear(x, W, A, B, 1.0, dropout_p=0.5)
    torch.manual_seed(9)
    assert torch.equal(y4, L.lora_linear(x, W, A, B, 1.0, dropout_p=0.5))


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
    x, W, A, B, b = (_f32(t, device) for t in _make(M, K, N, r, bias=True))
    A.requires_grad_()
    B.requires_grad_()
    b.requires_grad_()
    x = x.view(4, 16, K).requires_grad_()
    y, saved = _saved_during(lambda: L.lora_linear(x, W, A, B, 0.5, bias=b, dropout_p=p,
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
    x, W, A, B, _ = (_f32(t, device) for t in _make(M, K, N, r, bias=False))
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

    _, fused = _saved_during(lambda: L.lora_linear(x, W, A, B, 0.5, dropout_p=0.1))
    _, unfused = _saved_during(lambda: reference.lora_linear(x, W, A, B, 0.5, dropout_p=0.1))
    assert act_bytes(fused) < act_bytes(unfused)


# --------------------------------------------------------------------------------- fused variants
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p,bias", [(0.0, False), (0.2, True)])
def test_lora_qkv(device, dtype, p, bias):
    K, M = 96, 37
    gen = torch.Generator().manual_seed(2)
    shapes = [(96, 8), (40, 16), (40, 1)]  # q, k, v with GQA-like narrower k/v and different ranks
    x = torch.randn(M, K, generator=gen, dtype=torch.float64)
    Ws = [torch.randn(n, K, generator=gen, dtype=torch.float64) / K**0.5 for n, _ in shapes]
    As = [torch.randn(r, K, generator=gen, dtype=torch.float64) / K**0.5 for _, r in shapes]
    Bs = [torch.randn(n, r, generator=gen, dtype=torch.float64) for n, r in shapes]
    bs = [torch.randn(n, generator=gen, dtype=torch.float64) if bias else None for n, _ in shapes]
    ss = [0.5, 2.0, 1.0]
    g2 = torch.Generator().manual_seed(77)
    keeps = [L.dropout_mask(L.draw_seed(g2), x.shape, p, device).cpu() if p else None for _ in shapes]

    def fn(impl, x, *ts):
        W3, A3, B3, b3 = ts[0:3], ts[3:6], ts[6:9], ts[9:12]
        if impl == "kernel":
            return L.lora_qkv(x, W3, A3, B3, ss, biases=b3, dropout_p=p, generator=torch.Generator().manual_seed(77))
        return [_lora_given_mask(x, W, A, B, s, b, None if k is None else k.to(x.device), p)
                for W, A, B, s, b, k in zip(W3, A3, B3, ss, b3, keeps)]

    inputs = [x, *Ws, *As, *Bs, *bs]
    grads = [True, False, False, False] + [True] * 6 + [bias] * 3
    names = ["dX", "dWq", "dWk", "dWv", "dAq", "dAk", "dAv", "dBq", "dBk", "dBv", "dbq", "dbk", "dbv"]
    _check_all(_run_three(fn, inputs, grads, dtype, device), names)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p,bias,full_ft", [(0.0, False, False), (0.25, True, False), (0.0, True, True)])
def test_lora_gate_up_swiglu(device, dtype, p, bias, full_ft):
    K, N, M = 40, 96, 53
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(3, M, K, generator=gen, dtype=torch.float64)
    Ws = [torch.randn(N, K, generator=gen, dtype=torch.float64) / K**0.5 for _ in range(2)]
    As = [torch.randn(r, K, generator=gen, dtype=torch.float64) / K**0.5 for r in (8, 16)]
    Bs = [torch.randn(N, r, generator=gen, dtype=torch.float64) / r**0.5 for r in (8, 16)]
    bs = [torch.randn(N, generator=gen, dtype=torch.float64) if bias else None for _ in range(2)]
    ss = [0.5, 1.5]
    g2 = torch.Generator().manual_seed(5)
    keeps = [L.dropout_mask(L.draw_seed(g2), x.shape, p, device).cpu() if p else None for _ in range(2)]

    def fn(impl, x, Wg, Wu, Ag, Au, Bg, Bu, bg, bu):
        if impl == "kernel":
            return L.lora_gate_up_swiglu(x, [Wg, Wu], [Ag, Au], [Bg, Bu], ss, biases=[bg, bu], dropout_p=p,
                                         generator=torch.Generator().manual_seed(5))
        kd = [None if k is None else k.to(x.device) for k in keeps]
        g = _lora_given_mask(x, Wg, Ag, Bg, ss[0], bg, kd[0], p)
        up = _lora_given_mask(x, Wu, Au, Bu, ss[1], bu, kd[1], p)
        return F.silu(g) * up

    grads = [True, full_ft, full_ft, True, True, True, True, bias, bias]
    _check_all(_run_three(fn, [x, *Ws, *As, *Bs, *bs], grads, dtype, device),
               ["dX", "dWg", "dWu", "dAg", "dAu", "dBg", "dBu", "dbg", "dbu"])


# --------------------------------------------------------------------------------- quantized base
@pytest.mark.parametrize("M,dtype", [(37, torch.float32), (3, torch.float16)], ids=["M37-fp32", "M3-fp16-decode"])
@pytest.mark.parametrize("qtype", ["nf4", "int4"])
def test_lora_linear_quantized_base(device, qtype, M, dtype, monkeypatch):
    """Base from ops.quant_matmul, rank-r part fused onto it (M = 3, fp16: base and rank-r part in
    one quant decode kernel, LoraQuantDecodeFunction); gold uses the dequantized weight."""
    quant = importlib.import_module("fastft.quant")
    Q = importlib.import_module("fastft.kernels.quant")
    x, W, A, B, b = _make(M, 128, 64, 8, bias=True, seed=8)
    fused = []
    real = Q.quant_matmul_lora
    monkeypatch.setattr(Q, "quant_matmul_lora", lambda *a, **k: fused.append(1) or real(*a, **k))
    if qtype == "nf4":
        qW = quant.NF4Weight.from_float(W.float().to(device), blocksize=64)
    else:
        qW = quant.Int4Weight.from_float(W.float().to(device), group_size=128)
    Wd = qW.dequantize(torch.float32).double().cpu()  # the base the kernel must reproduce
    p, seed = 0.2, 99
    keep = L.dropout_mask(L.draw_seed(torch.Generator().manual_seed(seed)), x.shape, p, device).cpu()

    def fn(impl, x, A, B, b):
        if impl == "kernel":
            return L.lora_linear(x, qW, A, B, 0.5, bias=b, dropout_p=p, generator=torch.Generator().manual_seed(seed))
        return _lora_given_mask(x, Wd.to(x.dtype).to(x.device), A, B, 0.5, b, keep.to(x.device), p)

    _check_all(_run_three(fn, [x, A, B, b], [True, True, True, True], dtype, device),
               ["dX", "dA", "dB", "db"])
    assert bool(fused) == (M <= 16), "decode shapes take the one-kernel path, training shapes do not"


# --------------------------------------------------------------------------------- bad input
def test_bad_inputs_raise(device):
    x, W, A, B, b = (_f32(t, device) for t in _make(4, 40, 24, 8, bias=True))
    with pytest.raises(ValueError, match="lora_A"):
        L.lora_linear(x, W, A[:, :30], B, 1.0)
    with pytest.raises(ValueError, match="rank"):
        L.lora_linear(x, W, A, B[:, :4], 1.0)
    with pytest.raises(ValueError, match="weight"):
        L.lora_linear(x, W[:20], A, B, 1.0)
    with pytest.raises(ValueError, match="bias"):
        L.lora_linear(x, W, A, B, 1.0, bias=b[:3])
    with pytest.raises(ValueError, match="dropout_p"):
        L.lora_linear(x, W, A, B, 1.0, dropout_p=1.0)
    with pytest.raises(TypeError, match="float64"):
        L.lora_linear(x.double(), W.double(), A.double(), B.double(), 1.0)
    with pytest.raises(TypeError, match="weight dtype"):
        L.lora_linear(x.half(), W, A, B, 1.0)
    with pytest.raises(ValueError, match="1-3 projections"):
        L.lora_qkv(x, [W] * 4, [A] * 4, [B] * 4, 1.0)


def test_empty_batch(device):
    x, W, A, B, b = (_f32(t, device) for t in _make(1, 40, 24, 8, bias=True))
    y = L.lora_linear(x[:0], W, A, B, 1.0, bias=b)
    assert y.shape == (0, 24)
    ys = L.lora_qkv(x[:0], [W, W], [A, A], [B, B], 1.0)
    assert [t.shape for t in ys] == [(0, 24), (0, 24)]
    h = L.lora_gate_up_swiglu(x[:0], [W, W], [A, A], [B, B], 1.0)
    assert h.shape == (0, 24)


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
    launches = []
    real_down = L._down
    monkeypatch.setattr(L, "_down", lambda *a: launches.append(1) or real_down(*a))
    fused = _train_tiny_llama(ckpt, "triton", monkeypatch, device)
    assert len(launches) == 20 * 3, "the fused kernels were not on the model's path"
    assert ref[-1] < ref[0] - 0.3, "the reference run did not learn: the comparison would be vacuous"
    for step, (a, b) in enumerate(zip(fused, ref)):
        assert abs(a - b) / abs(b) <= 1e-4, f"step {step}: fused loss {a} vs reference {b}"


# --------------------------------------------------------------------------------- autotuning
def test_autotune_configs_pruned_per_shape():
    """The GPU path's config pruning (runs without a GPU: pruning is pure Python on the call's args)."""
    x = torch.empty(1, dtype=torch.float16)
    prune = L._prune_factory("M", "N", "X")
    big = prune(L.gemm_configs(), {}, M=4096, N=4096, X=x)
    assert [c.kwargs["BLOCK_M"] for c in big][:2] == [128, 128]
    small = prune(L.gemm_configs(), {}, M=3, N=4096, X=x)
    assert small and all(c.kwargs["BLOCK_M"] <= 16 for c in small)
    dprune = L._prune_factory("M", "K", "DX")
    qkv = dprune(L.gemm_configs(dropout=True), {}, M=4096, K=4096, DX=x, HAS_DROPOUT=True, NUM_SEG=3)
    assert qkv and all(c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 16 * 32 * c.num_warps for c in qkv)
    one = dprune(L.gemm_configs(dropout=True), {}, M=4096, K=4096, DX=x, HAS_DROPOUT=True, NUM_SEG=1)
    assert len(one) > len(qkv)
    sw = L._prune_factory("M", "N", "X", 3)(L.gemm_configs(2), {}, M=8192, N=14336, X=x)
    assert all((c.kwargs["BLOCK_M"] + 2 * c.kwargs["BLOCK_N"]) * c.kwargs["BLOCK_K"] * 2 * c.num_stages
               <= 160 * 1024 for c in sw)
    for name in ("fwd", "dx", "dx_dropout", "mm", "swiglu"):
        assert L._tuned(name) is not None  # the autotuned wrappers build lazily, without a device


def test_gpu_launch_path_autotuned(device, monkeypatch):
    """The GPU launch path (autotuner + EVEN_K heuristics + pruning on keyword args + restore_value),
    run with interpreted kernels: the launcher believes it is not interpreting, benchmarking is faked
    (one call per config), and the configs are cut to two so the interpreter finishes quickly."""
    orig_configs = L.gemm_configs
    monkeypatch.setattr(L, "_interpreting", lambda: False)
    monkeypatch.setattr(L, "_device_supported", lambda dev: True)
    monkeypatch.setattr(L, "gemm_configs", lambda *a, **k: [c for c in orig_configs(*a, **k)
                                                            if max(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) <= 64][:2])
    benched = []

    def fake_bench(fn, *a, **k):
        fn()
        benched.append(1)
        return 1.0

    L._tuned.cache_clear()
    try:
        for name in ("fwd", "dx", "dx_dropout", "mm", "swiglu"):
            monkeypatch.setattr(L._tuned(name), "_do_bench", fake_bench)
        x, W, A, B, b = _make(70, 64, 96, 8, bias=True, seed=11)
        _lora_case(device, torch.float32, x, W, A, B, b, 0.5, 0.2)
        _lora_case(device, torch.float32, x, W, A, B, b, 0.5, 0.0, full_ft=True)
    finally:
        L._tuned.cache_clear()  # drop wrappers holding the patched benchmark
    assert benched, "the autotuner never benchmarked: the GPU path was not taken"
