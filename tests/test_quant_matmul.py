"""Triton 4-bit matmul (fastft/kernels/quant_matmul.py): forward, dX and dbias against float64.

``x @ W_deqᵀ`` with W_deq from the reference dequantizer, tolerances derived from PyTorch's own
error in the same dtype (tests/utils.py), on the aligned and general NF4 paths and both int4
flavours, M at decode sizes and tile edges; the LoRA epilogue (``quant_matmul_lora``), what is
saved for backward, errors, autocast, and the dispatcher. Decode-shaped calls on the aligned layout
run the decode kernel (tests/test_quant_decode.py checks that routing); results are judged the same
way here.

On CPU everything runs under TRITON_INTERPRET=1 (tests/conftest.py) on small shapes. bf16 runs on
CPU too: the kernels upcast bf16 dots and round bf16 casts themselves when interpreting.
"""
import pytest
import torch

from fastft import ops
from fastft.kernels import quant_matmul as qmm
from fastft.ops import dispatch
from fastft.ops import reference_quant as R
from fastft.ops import triton_backend as tb
from fastft.quant import NF4Weight
from tests.utils import assert_close_to_gold

pytestmark = [pytest.mark.interpreter, pytest.mark.usefixtures("triton_usable")]


# ============================================================================ quant-matmul
# (name, (out, in), maker): aligned and general NF4 paths, both int4 flavours.
WEIGHTS = {
    "nf4dq-40x200": ((40, 200), lambda w: R.nf4_quantize(w, 64, True)),  # general path (200 % 64)
    "nf4-96x96-bs32": ((96, 96), lambda w: R.nf4_quantize(w, 32, False)),  # aligned
    "nf4dq-200x40": ((200, 40), lambda w: R.nf4_quantize(w, 64, True)),  # in < blocksize
    "nf4dq-40x128": ((40, 128), lambda w: R.nf4_quantize(w, 64, True)),  # aligned, double quant
    "int4-40x96-g32": ((40, 96), lambda w: R.int4_quantize(w, 32, False)),
    "int4sym-200x128-g64": ((200, 128), lambda w: R.int4_quantize(w, 64, True)),
}
# M and the leading shape of x: 1 and 3 (decode, split-K), 17 and 118 (tile edges).
LEADS = {1: (1,), 3: (3, 1), 17: (17,), 118: (2, 59)}


def _gold_check(x, qw, bias, dtype, y, dx, db, dy):
    w_deq = R.nf4_dequantize(qw, torch.float32) if isinstance(qw, NF4Weight) else R.int4_dequantize(qw, torch.float32)
    K = w_deq.shape[1]
    x2, dy2 = x.reshape(-1, K), dy.reshape(-1, w_deq.shape[0])
    gold = x2.double() @ w_deq.double().T + (bias.double() if bias is not None else 0)
    lowp = x2 @ w_deq.to(dtype).T + (bias if bias is not None else 0)
    assert y.dtype == dtype
    assert_close_to_gold(y.reshape(gold.shape), gold, lowp, name="y")
    gold_dx = dy2.double() @ w_deq.double()
    assert dx.dtype == dtype
    assert_close_to_gold(dx.reshape(gold_dx.shape), gold_dx, dy2 @ w_deq.to(dtype), name="dX")
    if bias is not None:
        assert_close_to_gold(db, dy2.double().sum(0), dy2.sum(0), name="dbias")


# bf16 at the two extremes of M only: the interpreter is slow, and bf16 shares every code path
# with fp16 except the dtype itself.
MM_CASES = [(M, dt) for M in LEADS for dt in (torch.float32, torch.float16)] + [(1, torch.bfloat16),
                                                                               (118, torch.bfloat16)]


@pytest.mark.parametrize("wname", list(WEIGHTS))
@pytest.mark.parametrize("M,dtype", MM_CASES)
def test_quant_matmul_fwd_bwd_vs_float64(wname, M, dtype, device):
    (N, K), make = WEIGHTS[wname]
    qw = make(torch.randn(N, K, device=device) * 0.05)
    x = torch.randn(*LEADS[M], K, device=device, dtype=dtype, requires_grad=True)
    bias = (torch.randn(N, device=device) * 0.1).to(dtype).requires_grad_() if M != 3 else None
    y = tb.quant_matmul(x, qw, bias)
    assert tuple(y.shape) == (*LEADS[M], N)
    dy = torch.randn_like(y)
    y.backward(dy)
    _gold_check(x.detach(), qw, None if bias is None else bias.detach(), dtype, y.detach(), x.grad,
                None if bias is None else bias.grad, dy)


LORA_CASES = [("nf4dq-40x128", 1, torch.float16, 16), ("nf4dq-40x128", 3, torch.bfloat16, 40),
              ("int4sym-200x128-g64", 16, torch.float16, 1), ("int4-40x96-g32", 2, torch.float32, 8),
              ("nf4dq-40x200", 3, torch.float16, 16), ("nf4-96x96-bs32", 118, torch.float16, 40),
              ("int4-40x96-g32", 17, torch.bfloat16, 16)]


@pytest.mark.parametrize("wname,M,dtype,r", LORA_CASES)
def test_quant_matmul_lora_epilogue_vs_float64(wname, M, dtype, r, device):
    """y = x W_deqᵀ + b + s·u Bᵀ in one kernel (decode and tiled kernels, split or not, r over
    several BLOCK_R chunks) against float64, within 2x torch's error for the same composition."""
    (N, K), make = WEIGHTS[wname]
    qw = make(torch.randn(N, K, device=device) * 0.05)
    x = torch.randn(M, K, device=device, dtype=dtype)
    u = torch.randn(M, r, device=device, dtype=dtype)
    B = (torch.randn(N, r, device=device) * 0.1).to(dtype)
    bias = (torch.randn(N, device=device) * 0.1).to(dtype)
    s = 0.75
    y = tb.quant_matmul_lora(x, qw, bias, u, B, s)
    w = R.nf4_dequantize(qw, torch.float32) if isinstance(qw, NF4Weight) else R.int4_dequantize(qw, torch.float32)
    gold = x.double() @ w.double().T + bias.double() + s * (u.double() @ B.double().T)
    lowp = x @ w.to(dtype).T + bias + s * (u @ B.T)
    assert y.dtype == dtype
    assert_close_to_gold(y, gold, lowp, name="y")


def test_quant_matmul_lora_empty_batch(device):
    qw = R.nf4_quantize(torch.randn(40, 128, device=device), 64, True)
    y = tb.quant_matmul_lora(torch.randn(0, 128, device=device).half(), qw, None,
                            torch.randn(0, 8, device=device).half(), torch.randn(40, 8, device=device).half(), 1.0)
    assert tuple(y.shape) == (0, 40) and y.dtype == torch.float16


def test_quant_matmul_lora_rejects_mismatched_adapters(device):
    qw = R.nf4_quantize(torch.randn(40, 128, device=device), 64, True)
    x = torch.randn(3, 128, device=device, dtype=torch.float16)
    with pytest.raises(ValueError, match="do not fit"):
        tb.quant_matmul_lora(x, qw, None, torch.randn(2, 8, device=device).half(), torch.randn(40, 8, device=device).half(), 1.0)
    with pytest.raises(ValueError, match="do not fit"):
        tb.quant_matmul_lora(x, qw, None, torch.randn(3, 8, device=device).half(), torch.randn(41, 8, device=device).half(), 1.0)


def test_quant_matmul_saves_only_the_packed_weight(device):
    qw = R.nf4_quantize(torch.randn(96, 128, device=device), 64, True)
    x = torch.randn(40, 128, device=device, requires_grad=True)
    y = tb.quant_matmul(x, qw)
    saved = [t for t in y.grad_fn.saved_tensors if t is not None]
    # Nothing dequantized and no activation: only the weight's own packed tensors.
    assert sum(t.numel() * t.element_size() for t in saved) <= qw.nbytes
    for t in saved:
        assert any(t.data_ptr() == q.data_ptr() for q in (qw.data, qw.absmax, qw.nested_absmax,
                                                         qw.nested_quant_map, qw.quant_map))


def test_quant_matmul_output_can_be_updated_in_place(device):
    """The fused LoRA op adds its low-rank term onto quant_matmul's output in place."""
    qw = R.nf4_quantize(torch.randn(40, 64, device=device), 64, True)
    x = torch.randn(2, 3, 64, device=device, requires_grad=True)
    y = tb.quant_matmul(x, qw)
    y.add_(1.0)
    y.sum().backward()
    w = R.nf4_dequantize(qw, torch.float32)
    assert_close_to_gold(x.grad, w.double().sum(0).expand(2, 3, -1), torch.ones(2, 3, 40, device=device) @ w)


def test_quant_matmul_weight_gets_no_grad_and_x_noncontiguous(device):
    qw = R.int4_quantize(torch.randn(64, 96, device=device), 32)
    base = torch.randn(96, 30, device=device)
    x = base.t()  # (30, 96), non-contiguous
    y = tb.quant_matmul(x, qw)
    ref = x.double() @ R.int4_dequantize(qw, torch.float64).T
    assert_close_to_gold(y, ref, x @ R.int4_dequantize(qw, torch.float32).T)
    assert not y.requires_grad  # neither x nor any weight tensor requires grad


def test_decode_path_splits_automatically(device):
    assert qmm.decode_split_k(1, 40, 384, torch.device(device)) > 1
    assert qmm.decode_split_k(64, 40, 384, torch.device(device)) == 1
    assert qmm.decode_split_k(1, 40, 64, torch.device(device)) == 1


def test_quant_matmul_empty_and_fp64(device):
    qw = R.nf4_quantize(torch.randn(40, 200, device=device), 64, True)
    y = tb.quant_matmul(torch.randn(0, 200, device=device), qw)
    assert tuple(y.shape) == (0, 40)
    # float64 activations: no fp64 kernel; the registered op routes them to the reference.
    x = torch.randn(3, 200, device=device, dtype=torch.float64)
    assert torch.equal(tb.quant_matmul(x, qw), R.quant_matmul(x, qw))


def test_quant_matmul_errors_name_the_dimension(device):
    qw = R.nf4_quantize(torch.randn(40, 200, device=device), 64, True)
    with pytest.raises(ValueError, match="in_features"):
        tb.quant_matmul(torch.randn(3, 199, device=device), qw)
    with pytest.raises(ValueError, match="in_features"):
        qmm.quant_matmul(torch.randn(3, 199, device=device), *tb.raw(qw))
    with pytest.raises(ValueError, match="out_features"):
        tb.quant_matmul(torch.randn(3, 200, device=device), qw, torch.zeros(41, device=device))
    with pytest.raises(ValueError, match="out_features"):
        qmm.quant_matmul(torch.randn(3, 200, device=device), *tb.raw(qw), torch.zeros(41, device=device))
    with pytest.raises(TypeError, match="fp32/fp16/bf16"):
        qmm.quant_matmul(torch.randn(3, 200, device=device, dtype=torch.float64), *tb.raw(qw))
    with pytest.raises(TypeError):
        qmm.quant_matmul(torch.randn(3, 200, device=device), *tb.raw(torch.randn(40, 200)))
    q16 = R.int4_quantize(torch.randn(8, 48, device=device), 16)
    with pytest.raises(ValueError, match="group_size"):
        tb.quant_matmul(torch.randn(2, 48, device=device), q16)


def test_quant_matmul_under_autocast(device):
    qw = R.nf4_quantize(torch.randn(40, 128, device=device), 64, True)
    x = torch.randn(5, 128, device=device, requires_grad=True)
    with torch.autocast(device, dtype=torch.bfloat16):
        y = tb.quant_matmul(x, qw)
        y_ref = R.quant_matmul(x, qw)
    assert y.dtype == y_ref.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32
    w = R.nf4_dequantize(qw, torch.float32)
    xb = x.detach().bfloat16()
    assert_close_to_gold(y, xb.double() @ w.double().T, xb @ w.bfloat16().T)


# ============================================================================== dispatcher
def test_dispatcher_runs_triton_kernels(monkeypatch, device):
    monkeypatch.setenv("FASTFT_BACKEND", "triton")
    dev = torch.device(device)
    assert dispatch.backend_for("quant_matmul", dev) == "triton"
    assert dispatch.get_impl("quant_matmul", dev) is tb.quant_matmul
    qw = NF4Weight.from_float(torch.randn(40, 200, device=device))
    x = torch.randn(3, 200, device=device, requires_grad=True)
    y = ops.quant_matmul(x, qw)
    y.sum().backward()
    wd = R.nf4_dequantize(qw, torch.float32)
    assert_close_to_gold(y, x.double() @ wd.double().T, x @ wd.T)
    assert_close_to_gold(x.grad, wd.double().sum(0).expand(3, -1), torch.ones(3, 40, device=device) @ wd)
