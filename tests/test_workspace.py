"""The reused dequantize workspace of the lean 4-bit matmuls (fastft/ops/workspace.py): repeated calls
write the dense weight into the same storage (no allocation per call), grow only, and give the same
results as the allocating path; the Triton dequantize writes into a caller's workspace (interpreter on
CPU); one cast copy of an activation is saved for all projections reading it under autocast."""
import pytest
import torch

from fastft import ops
from fastft.ops import dispatch, lean
from fastft.ops import workspace as ws
from fastft.ops.reference_quant import DequantMatmulFunction
from fastft.quant import Int4Weight, NF4Weight


@pytest.fixture(autouse=True)
def _fresh():
    ws.clear()
    yield
    ws.clear()


def _nf4(shape, seed=0, dq=True):
    g = torch.Generator().manual_seed(seed)
    return NF4Weight.from_float(torch.randn(shape, generator=g), blocksize=64, double_quant=dq)


def test_workspace_grows_only():
    dev = torch.device("cpu")
    a = ws.workspace(dev, torch.float32, 100)
    assert ws.workspace(dev, torch.float32, 60).data_ptr() == a.data_ptr()  # smaller: the same buffer
    b = ws.workspace(dev, torch.float32, 300)
    assert b.numel() == 300
    assert ws.workspace(dev, torch.float32, 100).data_ptr() == b.data_ptr()  # never shrinks
    assert ws.workspace(dev, torch.bfloat16, 10).dtype == torch.bfloat16  # one buffer per dtype


@pytest.mark.skipif(dispatch.backend_for("nf4_dequantize", torch.device("cpu")) != "cpp",
                    reason="the C++ extension is not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lean_quant_matmul_reuses_the_workspace_and_matches(dtype):
    lean_qmm = dispatch.impl("quant_matmul", "torch")
    weights = [_nf4((48, 64), 0), _nf4((96, 64), 1), _nf4((48, 64), 2, dq=False)]
    x = torch.randn(5, 64, dtype=dtype, requires_grad=True)
    ptrs = set()
    orig = ws.dequantize_transient

    def spy(qw, dt):
        w = orig(qw, dt)
        ptrs.add(w.untyped_storage().data_ptr())
        return w

    for rounds in range(2):
        for qw in weights:
            got = lean_qmm(x, qw)
            ref = DequantMatmulFunction.apply(x, qw, None, lambda q, d: ops.nf4_dequantize(q, d),
                                              torch.nn.functional.linear)
            torch.testing.assert_close(got, ref, rtol=0, atol=0) if dtype == torch.float32 else \
                torch.testing.assert_close(got, ref)
            dense = ws.dequantize_transient(qw, dtype)
            assert torch.equal(dense, ops.nf4_dequantize(qw, dtype))  # the workspace holds the same values
            ptrs.add(dense.untyped_storage().data_ptr())
            (gx,) = torch.autograd.grad(got.sum(), x)
            (rx,) = torch.autograd.grad(ref.sum(), x)
            torch.testing.assert_close(gx, rx, rtol=0, atol=0) if dtype == torch.float32 else \
                torch.testing.assert_close(gx, rx)
    # the (96, 64) weight grew the buffer once; every later dense weight lives in that one buffer
    big = ws.workspace(torch.device("cpu"), dtype, 96 * 64)
    assert big.data_ptr() in ptrs and len(ptrs) <= 2
    lean.quant_matmul_grad_x(torch.randn(5, 48, dtype=dtype), weights[0])
    assert ws.dequantize_transient(weights[0], dtype).untyped_storage().data_ptr() == big.data_ptr()


@pytest.mark.skipif(dispatch.backend_for("nf4_dequantize", torch.device("cpu")) != "cpp",
                    reason="the C++ extension is not built")
def test_cpp_quant_matmul_at_training_rows_dequantizes_into_the_workspace(monkeypatch):
    """fp32 with more rows than the fused kernel takes (the oneDNN path of a training step): forward
    and dX dequantize into the one reused buffer -- no dense weight allocated per call -- and give
    the freshly dequantized weight's results."""
    from fastft.ops import cpp

    cpp_qmm, cpp_gx = dispatch.impl("quant_matmul", "cpp"), dispatch.impl("quant_matmul_grad_x", "cpp")
    seen = []
    orig = ws.dequantize_transient

    def spy(qw, dt):
        w = orig(qw, dt)
        seen.append(w.untyped_storage().data_ptr())
        return w

    monkeypatch.setattr(ws, "dequantize_transient", spy)
    rows = cpp._C.fused_max_m() + 7
    for i, shape in enumerate([(96, 64), (48, 64)]):
        qw = _nf4(shape, i)
        x = torch.randn(rows, 64, requires_grad=True)
        got = cpp_qmm(x, qw)
        ref = x.detach() @ ops.nf4_dequantize(qw, torch.float32).t()
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
        g = torch.randn(rows, shape[0])
        (gx,) = torch.autograd.grad(got, x, g)
        torch.testing.assert_close(gx, g @ ops.nf4_dequantize(qw, torch.float32), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(cpp_gx(g, qw), gx, rtol=0, atol=0)
    big = ws.workspace(torch.device("cpu"), torch.float32, 96 * 64)
    assert len(seen) == 6 and set(seen) == {big.data_ptr()}, seen


@pytest.mark.parametrize("kind", ["nf4", "nf4-odd", "nf4-nodq", "int4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_dequantize_into_a_workspace(kind, dtype, device, triton_usable):
    from fastft.ops import reference_quant, triton_backend

    g = torch.Generator().manual_seed(3)
    if kind == "int4":
        qw = Int4Weight.from_float(torch.randn(8, 64, generator=g).to(device), group_size=32)
    else:
        shape = (7, 9 * 7) if kind == "nf4-odd" else (8, 128)  # 441 elements: an odd count
        qw = NF4Weight.from_float(torch.randn(shape, generator=g).to(device), blocksize=64,
                                  double_quant=kind != "nf4-nodq")
    assert triton_backend.dequantize_into_supported(qw, dtype)
    n = triton_backend.workspace_numel(qw, dtype)
    buf = torch.full((n + 5,), float("nan"), dtype=dtype, device=device)
    for _ in range(2):
        got = triton_backend.dequantize_into(qw, dtype, buf)
        assert got.data_ptr() == buf.data_ptr() and tuple(got.shape) == tuple(qw.shape)
        ref = (reference_quant.nf4_dequantize if kind != "int4" else reference_quant.int4_dequantize)(qw, dtype)
        assert torch.equal(got, ref)
    with pytest.raises(ValueError, match="workspace must be a contiguous 1-D"):
        triton_backend.dequantize_into(qw, dtype, buf[: qw.shape[0]])


def test_autocast_projections_save_one_cast_copy_of_their_input():
    """Under autocast over fp32 activations, q/k/v (or gate/up) reading one x save one bf16 copy of it
    between them, and the gradient reaching x is unchanged (summed in x's dtype)."""
    torch.manual_seed(0)
    x = torch.randn(6, 32, requires_grad=True)
    Ws = [torch.randn(24, 32) for _ in range(3)]
    As = [torch.randn(4, 32, requires_grad=True) for _ in range(3)]
    Bs = [torch.randn(24, 4, requires_grad=True) for _ in range(3)]
    saved = []

    def pack(t):
        saved.append(t)
        return t

    def run():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ys = [lean.lora_linear(x, W, A, B, 0.5) for W, A, B in zip(Ws, As, Bs)]
        return sum(y.float().square().sum() for y in ys)

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = run()
    casts = {t.untyped_storage().data_ptr() for t in saved if t.dtype == torch.bfloat16 and t.shape == x.shape}
    assert len(casts) == 1
    (gx,) = torch.autograd.grad(loss, x)
    # the same products through three separate casts (the previous behaviour): the gradient agrees
    xb = x.detach().to(torch.bfloat16)
    ref = torch.zeros_like(x)
    for W, A, B in zip(Ws, As, Bs):
        xi = xb.clone().float().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = lean.lora_linear(xi, W, A, B, 0.5)
        ref += torch.autograd.grad(y.float().square().sum(), xi)[0]
    torch.testing.assert_close(gx, ref)  # fp32 sums of the same bf16 branch gradients (order may differ)
    assert gx.dtype == torch.float32


def test_cuda_lean_quant_matmul_reuses_the_workspace(device):
    """On CUDA (the GPU check runs this with --device cuda): the Triton dequantize writes into the one
    workspace, and the lean quant-matmul (forward and dX) equals the allocating path bit for bit."""
    if device != "cuda" or not torch.cuda.is_available():
        pytest.skip("needs --device cuda")
    lean_qmm = dispatch.impl("quant_matmul", "torch")
    dt = torch.bfloat16
    weights = [NF4Weight.from_float(torch.randn(s, device="cuda"), blocksize=64, double_quant=True)
               for s in ((256, 512), (1024, 512), (256, 512))]
    x = torch.randn(64, 512, device="cuda", dtype=dt, requires_grad=True)
    ptrs = set()
    for qw in weights:
        got = lean_qmm(x, qw)
        ref = DequantMatmulFunction.apply(x, qw, None, lambda q, d: ops.nf4_dequantize(q, d),
                                          torch.nn.functional.linear)
        assert torch.equal(got, ref)
        gx, = torch.autograd.grad(got.float().sum(), x)
        rx, = torch.autograd.grad(ref.float().sum(), x)
        assert torch.equal(gx, rx)
        ptrs.add(ws.dequantize_transient(qw, dt).untyped_storage().data_ptr())
    assert len(ptrs) <= 2  # the first buffer, then the grown one
    assert ws.dequantize_transient(weights[0], dt).data_ptr() == ws.workspace(x.device, dt, 1).data_ptr()


def test_qlora_model_keeps_nothing_frozen_in_fp32():
    """A bf16 QLoRA model: every frozen parameter is bf16; the only fp32 tensors are the rotary
    frequencies and the NF4 format's own statistics (16 + 256-entry codebooks and one scale per 256
    blocks per layer), never a weight-sized or activation-sized tensor."""
    import fastft
    from fastft.nn.quant_linear import QuantLinear

    m = fastft.from_config("tiny-llama", quantization="nf4", dtype="bfloat16", seed=1)
    m = fastft.get_peft_model(m, fastft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    frozen = [(n, p) for n, p in m.named_parameters() if not p.requires_grad]
    assert frozen and all(p.dtype == torch.bfloat16 for _, p in frozen), \
        [n for n, p in frozen if p.dtype != torch.bfloat16]
    assert {n.rsplit(".", 1)[-1] for n, b in m.named_buffers() if b.dtype == torch.float32} <= {"inv_freq"}
    layers = [mod for mod in m.modules() if isinstance(mod, QuantLinear)]
    assert layers
    for mod in layers:
        fp32 = {k: t for k, t in mod.weight._tensors().items()
                if isinstance(t, torch.Tensor) and t.dtype == torch.float32}
        assert set(fp32) <= {"quant_map", "nested_quant_map", "nested_absmax"}, set(fp32)
        n = mod.in_features * mod.out_features
        assert sum(t.numel() * 4 for t in fp32.values()) <= (16 + 256) * 4 + 4 * -(-n // (64 * 256))
