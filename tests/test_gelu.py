"""The Triton GELU (erf form; ``kernels/gelu.py``, ``fastft.ops.gelu`` on CUDA) against the float64
gold, forward and gradient, within 2x PyTorch's own error in the same dtype (``F.gelu``), fp32 and
fp16 under the interpreter (bf16 too on a GPU); sizes that do not fill the last block, one element,
large |x| (the tails of erf), strided inputs, no-grad calls."""
import pytest
import torch
import torch.nn.functional as F

from fastft import ops
from fastft.kernels import _common
from fastft.kernels import gelu as kgelu
from fastft.ops import dispatch
from tests.utils import assert_close_to_gold, output_and_grads

pytestmark = pytest.mark.usefixtures("triton_usable")


def _dtypes(device):
    return [torch.float32, torch.float16] + ([torch.bfloat16] if device == "cuda" else [])


@pytest.mark.parametrize("shape", [(1,), (3, 7), (2, 5, kgelu.BLOCK + 3)])
def test_matches_float64_gold(device, shape):
    f = dispatch.impl("gelu", "triton")
    for dtype in _dtypes(device):
        gen = torch.Generator().manual_seed(sum(shape))
        x = (torch.randn(*shape, generator=gen) * 3).to(device)
        x.view(-1)[:2] = torch.tensor([-9.0, 7.5])[: x.numel()]  # far tails
        got = output_and_grads(f, [x.to(dtype)])
        gold = output_and_grads(F.gelu, [x.double()])
        lowp = output_and_grads(F.gelu, [x.to(dtype)])
        for name, g, r, lp in zip(["y", "dx"], got, gold, lowp):
            assert g.dtype == dtype
            assert_close_to_gold(g, r, lp, name=f"{name} {dtype}")


def test_strided_and_no_grad(device):
    x = torch.randn(16, 6, device=device).t()
    f = dispatch.impl("gelu", "triton")
    got = output_and_grads(f, [x])
    gold = output_and_grads(F.gelu, [x.double()])
    lowp = output_and_grads(F.gelu, [x])
    for name, g, r, lp in zip(["y", "dx"], got, gold, lowp):
        assert_close_to_gold(g, r, lp, name=name)
    with torch.no_grad():
        y = f(x)
    assert y.shape == x.shape and not y.requires_grad
    if _common.interpreting():
        with _common.count_launches() as c:
            f(x.requires_grad_(True)).sum().backward()
        assert c == {"_gelu_fwd_kernel": 1, "_gelu_bwd_kernel": 1}


def test_cuda_default_predicates_and_fake():
    cuda = torch.device("cuda")
    assert ops.backend_for("gelu", cuda) == "triton"
    assert ops.backend_for("gelu", cuda, torch.randn(3)) == "triton"
    assert ops.backend_for("gelu", cuda, torch.randn(3).double()) == "reference"
    assert ops.backend_for("gelu", torch.device("cpu")) == "reference"
    xm = torch.empty(4, 3072, device="meta", dtype=torch.bfloat16, requires_grad=True)
    y = dispatch.impl("gelu", "triton")(xm)
    y.sum().backward()
    assert y.shape == xm.shape and xm.grad.shape == xm.shape and xm.grad.dtype == torch.bfloat16


def test_double_backward_is_refused(device):
    """The backward kernels are not differentiable: a second-order gradient raises instead of being
    silently disconnected."""
    x = torch.randn(5, device=device, requires_grad=True)
    (g,) = torch.autograd.grad(dispatch.impl("gelu", "triton")(x).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError):
        g.sum().backward()
