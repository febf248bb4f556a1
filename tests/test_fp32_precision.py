"""fp32 inputs: which precision each Triton op uses, and the tolerance the CUDA tests hold it to.

The rule (``fastft.kernels._common.matmul_precision``, tested without a GPU in test_common.py): a
``tl.dot`` on fp32 operands runs on TF32 tensor cores exactly when torch's own CUDA fp32 matmuls
would (``torch.backends.cuda.matmul.fp32_precision == "tf32"``, however it was set), IEEE fp32
otherwise -- torch's default. It applies to every fp32 dot: attention (forward and backward), the
fused LoRA GEMMs, the general quant-matmul; the ``torch`` backend (the CUDA default for LoRA /
quant-matmul) is cuBLAS and follows the same setting by construction; the decode kernel takes
fp16 / bf16 activations only.

The tests' fp32 tolerance is 2x the error torch makes in fp32 *under the same setting*
(tests/utils.py), so it is sized to the precision in force: the CUDA run (tests/conftest.py) holds
the default, IEEE, for every test; here each op is also checked with TF32 on, against torch's TF32
error. On the CPU the interpreter computes every dot in IEEE fp32: the IEEE half runs there, the TF32
half on CUDA only (benchmarks/gpu_check.sh).
"""
import pytest
import torch

from fastft.kernels import _common
from tests.utils import assert_close_to_gold

pytestmark = pytest.mark.usefixtures("triton_usable")


@pytest.fixture(params=["ieee", "tf32"])
def precision(request, device):
    """torch's fp32 matmul setting for the test. On the CPU only "ieee" exists (the interpreter
    computes every dot in IEEE fp32): the checks then run there too, as the same-rule baseline."""
    if device != "cuda":
        if request.param == "tf32":
            pytest.skip("TF32 exists on a GPU only (the interpreter computes IEEE fp32): --device cuda")
        assert _common.matmul_precision(torch.float32) == "ieee"
        yield "ieee"
        return
    matmul = torch.backends.cuda.matmul
    saved = matmul.fp32_precision
    matmul.fp32_precision = request.param
    try:
        assert _common.matmul_precision(torch.float32) == request.param
        yield request.param
    finally:
        matmul.fp32_precision = saved


def _attention_ref(q, k, v, causal):
    s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    if causal:
        T = q.shape[-2]
        s = s.masked_fill(torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    return torch.softmax(s, -1) @ v


def test_attention_fp32_follows_torch_precision(precision, device):
    from fastft.kernels import attention as A

    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(1, 2, 97, 64, generator=g, device=device) for _ in range(3))
    out = A.attention(q, k, v, causal=True)
    gold = _attention_ref(q.double(), k.double(), v.double(), True)
    lowp = _attention_ref(q, k, v, True)  # torch in fp32 under the same setting
    assert_close_to_gold(out, gold, lowp, name=f"attention fp32 ({precision})")


def test_quant_matmul_fp32_follows_torch_precision(precision, device):
    from fastft.kernels import quant_matmul as qmm
    from fastft.ops import reference_quant as R
    from fastft.ops import triton_backend as tb

    g = torch.Generator(device=device).manual_seed(1)
    qw = R.nf4_quantize(torch.randn(96, 256, generator=g, device=device), 64, True)
    x = torch.randn(70, 256, generator=g, device=device)
    y = qmm.quant_matmul(x, *tb.raw(qw), None)
    w = R.nf4_dequantize(qw, torch.float32)
    assert_close_to_gold(y, x.double() @ w.double().T, x @ w.T, name=f"quant_matmul fp32 ({precision})")


def test_fused_lora_fp32_follows_torch_precision(precision, device):
    from fastft.ops import dispatch

    fused = dispatch.impl("lora_linear", "triton")
    g = torch.Generator(device=device).manual_seed(2)
    x = torch.randn(70, 256, generator=g, device=device)
    W = torch.randn(96, 256, generator=g, device=device) / 16
    A, B = torch.randn(16, 256, generator=g, device=device) / 16, torch.randn(96, 16, generator=g, device=device)
    y = fused(x, W, A, B, 2.0)
    gold = x.double() @ W.double().T + 2.0 * (x.double() @ A.double().T) @ B.double().T
    lowp = x @ W.T + 2.0 * (x @ A.T) @ B.T
    assert_close_to_gold(y, gold, lowp, name=f"lora_linear fp32 ({precision})")
