"""The Triton cross-entropy rows (``kernels/cross_entropy.py``, ``fastft.ops.cross_entropy_grad_`` on
CUDA) against the float64 gold: per-row losses and the in-place gradient softmax − onehot, within
2x PyTorch's own error in the logits' dtype (F.cross_entropy and its autograd gradient), fp32 and
fp16 under the interpreter (bf16 too on a GPU). Awkward widths: one column, vocabularies that are
not a multiple of the column block (several blocks forced small, so the online softmax rescales),
one row, rows with ignored targets, every target ignored, strided rows."""
import pytest
import torch
import torch.nn.functional as F

from fastft import ops
from fastft.kernels import _common
from fastft.kernels import cross_entropy as kce
from fastft.ops import dispatch
from tests.utils import assert_close_to_gold

pytestmark = pytest.mark.usefixtures("triton_usable")


def _dtypes(device):
    return [torch.float32, torch.float16] + ([torch.bfloat16] if device == "cuda" else [])


def _torch_rows(z, t, ignore_index):
    """PyTorch in z's dtype: per-row losses and d(Σ losses)/dz through autograd."""
    z = z.detach().clone().requires_grad_(True)
    loss = F.cross_entropy(z, t.long(), ignore_index=ignore_index, reduction="none")
    loss.sum().backward()
    return loss.detach(), z.grad


def _check(z0, t, ignore_index=-100, block=None, programs=None):
    """Run the kernel on a copy of z0 (any dtype) and compare with the gold and torch."""
    g = z0.clone()
    loss = torch.empty(z0.shape[0], dtype=torch.float32, device=z0.device)
    if block is None and programs is None:
        loss = dispatch.impl("cross_entropy_grad_", "triton")(g, t, ignore_index)
    else:
        kce.cross_entropy_grad_(g, t, ignore_index, loss, block=block, programs=programs)
    gold_loss, gold_grad = _torch_rows(z0.double(), t, ignore_index)
    lp_loss, lp_grad = _torch_rows(z0, t, ignore_index)
    assert loss.dtype == torch.float32 and g.dtype == z0.dtype
    assert_close_to_gold(loss, gold_loss, lp_loss, name="loss")
    assert_close_to_gold(g, gold_grad, lp_grad, name="grad")
    ignored = t == ignore_index
    assert (loss[ignored] == 0).all() and (g[ignored] == 0).all()
    return loss, g


CASES = [  # rows, vocab, forced column block (None: the launcher's), fraction of ignored rows
    (1, 1, None, 0.0),         # one row, one class
    (4, 7, None, 0.25),        # tiny vocab (one masked block)
    (3, 1007, 128, 0.34),      # 1000 + 7: eight blocks, a ragged last one -- online softmax rescales
    (5, 1007, None, 0.2),      # one 1024 block
    (2, 4099, None, 0.0),      # fp32: two blocks of 4096 (the default cap), a 3-column tail
    (6, 300, 64, 1.0),         # every target ignored
]


@pytest.mark.parametrize("n,V,block,frac", CASES)
def test_rows_match_float64_gold(device, n, V, block, frac):
    for dtype in _dtypes(device):
        gen = torch.Generator().manual_seed(n * 131 + V)
        z = (torch.randn(n, V, generator=gen) * 4).to(device=device, dtype=dtype)
        t = torch.randint(0, V, (n,), generator=gen).to(device)
        t[torch.rand(n, generator=gen).to(device) < frac] = -100
        if frac == 1.0:
            t.fill_(-100)
        _check(z, t, block=block)


def test_persistent_grid(device):
    """A grid of fewer programs than rows (each program walks rows pid, pid + P, ...), with ignored
    rows among them: the same results."""
    gen = torch.Generator().manual_seed(9)
    z = (torch.randn(7, 300, generator=gen) * 3).to(device)
    t = torch.tensor([3, -100, 299, 0, -100, 150, 7], device=device)
    _check(z, t, block=128, programs=3)


def test_large_logits_int32_targets_custom_ignore_index_and_strided_rows(device):
    """Logits of size 60 (exp would overflow without the max shift), int32 targets, ignore_index
    that is a valid class (rows with that target are skipped), and rows of a wider buffer (row
    stride > V): only the (n, V) window changes."""
    gen = torch.Generator().manual_seed(3)
    buf = (torch.randn(5, 300, generator=gen) * 60).to(device)
    z = buf[:, :263]
    t = torch.tensor([0, 262, 17, 5, 17], dtype=torch.int32, device=device)
    tail = buf[:, 263:].clone()
    gold_loss, gold_grad = _torch_rows(z.double(), t, 17)
    lp_loss, lp_grad = _torch_rows(z, t, 17)
    loss = ops.cross_entropy_grad_(z, t, 17) if device == "cuda" else dispatch.impl("cross_entropy_grad_", "triton")(
        z, t, 17)
    assert torch.equal(buf[:, 263:], tail)
    assert_close_to_gold(loss, gold_loss, lp_loss, name="loss")
    assert_close_to_gold(z, gold_grad, lp_grad, name="grad")
    assert (loss[t == 17] == 0).all() and (z[t == 17] == 0).all()


def test_launch_settings_cover_the_large_vocabularies():
    """One launch per call, column blocks capped at 16 KiB of logits, so 49152, 128256 and odd
    vocabularies run as several blocks with at most 64 bytes of logits per thread."""
    for V in (49152, 128256, 1007, 32000):
        for dt in (torch.float32, torch.bfloat16):
            block, warps = kce.ce_settings(V, dt)
            assert block * (4 if dt == torch.float32 else 2) <= 16384 and block <= triton_next_pow2(V)
            assert block // (32 * warps) * (4 if dt == torch.float32 else 2) <= 64
    z, t = torch.randn(3, 40), torch.tensor([1, -100, 39])
    if _common.interpreting():
        with _common.count_launches() as c:
            dispatch.impl("cross_entropy_grad_", "triton")(z, t, -100)
        assert c == {"_ce_grad_kernel": 1}


def triton_next_pow2(v):
    import triton

    return triton.next_power_of_2(v)


def test_cuda_default_and_predicates():
    """On CUDA the op runs the Triton kernel (without a GPU: the dispatcher's answer per device);
    float64 logits and bad shapes go to the reference, which raises the argument error."""
    cuda = torch.device("cuda")
    assert ops.backend_for("cross_entropy_grad_", cuda) == "triton"
    z, t = torch.randn(2, 5), torch.tensor([0, 4])
    assert ops.backend_for("cross_entropy_grad_", cuda, z, t) == "triton"
    assert ops.backend_for("cross_entropy_grad_", cuda, z.double(), t) == "reference"
    assert ops.backend_for("cross_entropy_grad_", cuda, z[:, None], t) == "reference"
    with pytest.raises(ValueError, match="outside"):
        dispatch.impl("cross_entropy_grad_", "triton")(z, torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="must be"):
        dispatch.impl("cross_entropy_grad_", "triton")(z[:, None], t)


def test_fake_implementation_traces_on_meta_tensors():
    """The kernel launch is a ``torch.library`` custom op with a fake: on meta tensors (as in a
    traced step on fake CUDA tensors) it gives the (n,) fp32 losses without running anything."""
    z = torch.empty(7, 50, device="meta", dtype=torch.bfloat16)
    t = torch.empty(7, device="meta", dtype=torch.long)
    loss = dispatch.impl("cross_entropy_grad_", "triton")(z, t, -100)
    assert loss.shape == (7,) and loss.dtype == torch.float32 and loss.device.type == "meta"


def test_compiles_as_one_graph(device):
    """torch.compile (fullgraph) traces the op: the target check and the in-place custom op."""
    f = dispatch.impl("cross_entropy_grad_", "triton")
    cf = torch.compile(lambda z, t: f(z, t, -100), backend="aot_eager", fullgraph=True)
    z, t = torch.randn(3, 10, device=device), torch.tensor([1, -100, 9], device=device)
    za, zb = z.clone(), z.clone()
    assert torch.equal(cf(za, t), f(zb, t)) and torch.equal(za, zb)
