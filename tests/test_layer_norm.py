"""The Triton LayerNorm (``kernels/layer_norm.py``, ``fastft.ops.layer_norm`` on CUDA) against the
float64 gold, forward and the x, weight and bias gradients, within 2x PyTorch's own error in the
same dtype (``F.layer_norm``), fp32 and fp16 under the interpreter (bf16 too on a GPU). Awkward
widths: one column, widths that are not a power of two, row counts that do not fill the last
program, one row, strided inputs; the persistent backward with more row tiles than programs."""
import pytest
import torch
import torch.nn.functional as F

from fastft import ops
from fastft.kernels import _common
from fastft.kernels import layer_norm as kln
from fastft.ops import dispatch
from tests.utils import assert_close_to_gold, output_and_grads

pytestmark = pytest.mark.usefixtures("triton_usable")


def _dtypes(device):
    return [torch.float32, torch.float16] + ([torch.bfloat16] if device == "cuda" else [])


def _torch_ln(x, w, b, eps=1e-5):
    return F.layer_norm(x, (x.shape[-1],), w, b, eps)


SHAPES = [  # x shape (last dim normalised)
    (1, 1),         # one row, one column: y = b, dx = 0
    (5, 37),        # odd width, rows not a multiple of the program's rows
    (2, 3, 100),    # 3-D
    (33, 768),      # BERT-base width; 33 rows over several backward programs
    (3, 1000 + 7),  # awkward wide row (padded to 1024)
]


@pytest.mark.parametrize("shape", SHAPES)
def test_matches_float64_gold(device, shape):
    triton_ln = dispatch.impl("layer_norm", "triton")
    for dtype in _dtypes(device):
        gen = torch.Generator().manual_seed(sum(shape))
        N = shape[-1]
        x = torch.randn(*shape, generator=gen) * 2 + 0.5
        w = 1 + 0.3 * torch.randn(N, generator=gen)
        b = 0.2 * torch.randn(N, generator=gen)
        inputs = [t.to(device) for t in (x, w, b)]
        got = output_and_grads(lambda *a: triton_ln(*a, 1e-5), [t.to(dtype) for t in inputs])
        gold = output_and_grads(_torch_ln, [t.double() for t in inputs])
        lowp = output_and_grads(_torch_ln, [t.to(dtype) for t in inputs])
        for name, g, r, lp in zip(["y", "dx", "dw", "db"], got, gold, lowp):
            assert g.dtype == dtype, name
            assert_close_to_gold(g, r, lp, name=f"{name} {dtype}")


def test_strided_input_eps_and_frozen_affine(device):
    """A transposed (non-contiguous) x, a large eps, weight and bias without gradients (LoRA)."""
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(24, 6, generator=gen).to(device).t()  # (6, 24), column stride 6
    w, b = torch.randn(24, generator=gen).to(device), torch.randn(24, generator=gen).to(device)
    got = output_and_grads(lambda x: dispatch.impl("layer_norm", "triton")(x, w, b, 0.1), [x])
    gold = output_and_grads(lambda x: _torch_ln(x, w.double(), b.double(), 0.1), [x.double()])
    lowp = output_and_grads(lambda x: _torch_ln(x, w, b, 0.1), [x])
    for name, g, r, lp in zip(["y", "dx"], got, gold, lowp):
        assert_close_to_gold(g, r, lp, name=name)


def test_autocast_output_dtype_follows_torch(device):
    """torch's CUDA autocast runs layer_norm in fp32 (fp32 output from half x); CPU autocast leaves
    it in x's dtype. The op follows whichever applies; dx keeps x's dtype."""
    dt = torch.float16
    x = torch.randn(4, 16, device=device, dtype=dt, requires_grad=True)
    w, b = torch.ones(16, device=device), torch.zeros(16, device=device)
    with torch.autocast(device, dtype=dt):
        ref = _torch_ln(x, w, b)
        y = dispatch.impl("layer_norm", "triton")(x, w, b, 1e-5)
    assert y.dtype == ref.dtype
    y.float().sum().backward()
    assert x.grad.dtype == dt


def test_backward_programs_and_launches():
    """Forward and backward are one launch each (plus the partials' sum), the backward grid is
    persistent: at most 4 programs per SM, each walking several row tiles."""
    x, w, b = torch.randn(200, 700), torch.randn(700), torch.randn(700)
    ROWS = kln.settings(700)[0]
    n_tiles = -(-200 // ROWS)
    assert kln.bwd_programs(n_tiles, x.device) < n_tiles  # several tiles per program
    if _common.interpreting():
        with _common.count_launches() as c:
            got = output_and_grads(lambda *a: dispatch.impl("layer_norm", "triton")(*a, 1e-5), [x, w, b])
        assert c == {"_ln_fwd_kernel": 1, "_ln_bwd_kernel": 1}
        gold = output_and_grads(_torch_ln, [x.double(), w.double(), b.double()])
        lowp = output_and_grads(_torch_ln, [x, w, b])
        for name, g, r, lp in zip(["y", "dx", "dw", "db"], got, gold, lowp):
            assert_close_to_gold(g, r, lp, name=name)


def test_cuda_default_predicates_and_fake():
    cuda = torch.device("cuda")
    assert ops.backend_for("layer_norm", cuda) == "triton"
    x, w, b = torch.randn(2, 8), torch.randn(8), torch.randn(8)
    assert ops.backend_for("layer_norm", cuda, x, w, b, 1e-5) == "triton"
    assert ops.backend_for("layer_norm", cuda, x.double(), w.double(), b.double(), 1e-5) == "reference"
    assert ops.backend_for("layer_norm", cuda, x, w, None, 1e-5) == "reference"
    assert ops.backend_for("layer_norm", torch.device("cpu")) == "reference"
    # the launches are custom ops with fakes: a traced step on meta / fake tensors runs no kernel
    xm = torch.empty(3, 5, 64, device="meta", dtype=torch.bfloat16, requires_grad=True)
    wm = torch.empty(64, device="meta", requires_grad=True)
    bm = torch.empty(64, device="meta", requires_grad=True)
    y = dispatch.impl("layer_norm", "triton")(xm, wm, bm, 1e-5)
    assert y.shape == xm.shape and y.dtype == torch.bfloat16
    y.sum().backward()
    assert xm.grad.shape == xm.shape and wm.grad.dtype == torch.float32 and bm.grad.shape == (64,)


def test_half_activations_with_fp32_weight_and_bias(device):
    """Mixed precision BERT: half x, fp32 LayerNorm parameters (torch accepts the mix): y and dx in
    x's dtype, dw and db in fp32, each within 2x torch's own error."""
    gen = torch.Generator().manual_seed(11)
    x = (torch.randn(9, 200, generator=gen) * 3).to(device=device, dtype=torch.float16)
    w = (1 + 0.2 * torch.randn(200, generator=gen)).to(device)
    b = (0.1 * torch.randn(200, generator=gen)).to(device)
    got = output_and_grads(lambda *a: dispatch.impl("layer_norm", "triton")(*a, 1e-5), [x, w, b])
    gold = output_and_grads(_torch_ln, [t.double() for t in (x, w, b)])
    lowp = output_and_grads(_torch_ln, [x, w, b])
    for name, g, r, lp, dt in zip(["y", "dx", "dw", "db"], got, gold, lowp,
                                  [torch.float16, torch.float16, torch.float32, torch.float32]):
        assert g.dtype == dt == lp.dtype, name
        assert_close_to_gold(g, r, lp, name=name)


def test_custom_op_only_where_tracing_needs_it():
    """Real tensors launch the kernels directly (a Python custom op's dispatch costs more than a
    BERT-sized LayerNorm on a GPU); meta / fake tensors go through the ``fastft::triton_layer_norm_*``
    custom ops and their fakes."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(str(func))
            return func(*args, **(kwargs or {}))

    for device, custom in (("meta", True),) + ((("cpu", False),) if _common.interpreting() else ()):
        x = torch.randn(3, 16, device=device, requires_grad=True)
        w = torch.ones(16, device=device, requires_grad=True)
        b = torch.zeros(16, device=device, requires_grad=True)
        with Record() as rec:
            dispatch.impl("layer_norm", "triton")(x, w, b, 1e-5).sum().backward()
        used = [n for n in rec.names if "triton_layer_norm" in n]
        assert bool(used) == custom, (device, used)
        if custom:
            assert any("fwd" in n for n in used) and any("bwd" in n for n in used)


def test_compiles_as_one_graph(device):
    """torch.compile (fullgraph) traces forward and backward through the custom ops."""
    f = dispatch.impl("layer_norm", "triton")
    cf = torch.compile(lambda x, w, b: f(x, w, b, 1e-5), backend="aot_eager", fullgraph=True)
    x = torch.randn(4, 32, device=device, requires_grad=True)
    w, b = torch.randn(32, device=device, requires_grad=True), torch.randn(32, device=device, requires_grad=True)
    got = output_and_grads(cf, [x, w, b])
    want = output_and_grads(lambda *a: f(*a, 1e-5), [x, w, b])
    for g, r in zip(got, want):
        assert torch.equal(g, r)
