"""fastft.ops.library.kernel_op: a kernel entry point becomes a custom op with a fake implementation,
so a step can run on fake CUDA tensors on a machine without a GPU, and opcheck accepts it."""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from fastft.ops.library import kernel_op, registered


def _fake(x, scale, bias=None):
    return x.new_empty(x.shape), x.new_empty(x.shape[:-1], dtype=torch.float32)


@kernel_op("test_scaled_rowsum", fake=_fake)
def scaled_rowsum(x: torch.Tensor, scale: float, bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    y = x * scale if bias is None else x * scale + bias
    return y, y.float().sum(-1)


def test_runs_on_real_tensors_and_passes_opcheck():
    x = torch.randn(3, 5)
    y, s = scaled_rowsum(x, 2.0)
    assert torch.equal(y, x * 2.0) and torch.allclose(s, (x * 2.0).sum(-1))
    torch.library.opcheck(scaled_rowsum, (x, 0.5, torch.randn(5)))
    assert "test_scaled_rowsum" in registered()


def test_fake_cuda_tensors_without_a_gpu():
    with FakeTensorMode():
        x = torch.empty(4, 7, device="cuda", dtype=torch.bfloat16)
        y, s = scaled_rowsum(x, 1.0)
    assert (y.device.type, y.shape, y.dtype) == ("cuda", (4, 7), torch.bfloat16)
    assert (s.shape, s.dtype) == ((4,), torch.float32)


def test_names_are_unique():
    with pytest.raises(RuntimeError, match="already registered"):
        kernel_op("test_scaled_rowsum", fake=_fake)(lambda x: x)
