"""Gold helpers of the LoRA kernel tests (tests/test_lora.py, tests/test_lora_fused.py).

Every output and gradient must be within 2x PyTorch's own error at the kernel's dtype (plus a small
floor) of the float64 gold (tests/utils.py). With dropout the kernels regenerate their mask from a
Philox seed; ``lora.dropout_mask`` materialises that mask and the gold is the reference given it.
"""
import torch
import torch.nn.functional as F

from fastft.kernels import _common
from fastft.kernels import lora as triton_lora
from tests.utils import assert_close_to_gold

def lora_given_mask(x, W, A, B, s, b, keep, p):
    """y = x Wᵀ + b + s·((x ⊙ keep / (1 - p)) Aᵀ) Bᵀ in x's dtype (keep None: no dropout)."""
    xd = x if keep is None else x * keep.to(x.dtype) / (1.0 - p)
    y = F.linear(x, W, b)
    return y + F.linear(F.linear(xd, A), B) * s


def _leaves(ts, dtype, grads):
    return [None if t is None else t.detach().to(dtype).requires_grad_(g) for t, g in zip(ts, grads)]


def run_three(fn, inputs, grads, dtype, dev, dy_seed=1):
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


def check_all(results, names):
    (k_outs, k_grads), (g_outs, g_grads), (t_outs, t_grads) = results
    for i, (k, g, t) in enumerate(zip(k_outs, g_outs, t_outs)):
        assert_close_to_gold(k.cpu(), g.cpu(), t.cpu(), name=f"out{i}")
    for name, k, g, t in zip(names, k_grads, g_grads, t_grads):
        if g is None:
            continue
        assert k is not None, f"{name}: no gradient from the kernel"
        assert_close_to_gold(k.cpu(), g.cpu(), t.cpu(), name=name)


def f32(t, device):
    return None if t is None else t.float().to(device)


def make(M, K, N, r, bias, lead=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shape = (*lead, K) if lead else (M, K)
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    W = torch.randn(N, K, generator=gen, dtype=torch.float64) / K**0.5
    A = torch.randn(r, K, generator=gen, dtype=torch.float64) / K**0.5
    B = torch.randn(N, r, generator=gen, dtype=torch.float64) / r**0.5
    b = torch.randn(N, generator=gen, dtype=torch.float64) if bias else None
    return x, W, A, B, b


def lora_case(device, dtype, x, W, A, B, b, s, p, full_ft=False):
    """Kernel vs gold vs torch-in-dtype for y, dX, dA, dB (dW, db) with the kernel's dropout mask."""
    seed = 1234
    keep = triton_lora.dropout_mask(_common.draw_seed(torch.Generator().manual_seed(seed)), x.shape, p, device).cpu() if p else None

    def fn(impl, x, W, A, B, b):
        if impl == "kernel":
            gen = torch.Generator().manual_seed(seed)
            return triton_lora.lora_linear(x, W, A, B, s, bias=b, dropout_p=p, generator=gen)
        return lora_given_mask(x, W, A, B, s, b, None if keep is None else keep.to(x.device), p)

    grads = [True, full_ft, True, True, b is not None]
    check_all(run_three(fn, [x, W, A, B, b], grads, dtype, device), ["dX", "dW", "dA", "dB", "db"])
