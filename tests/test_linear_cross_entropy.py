"""fastft.ops.linear_cross_entropy: the LM head and its cross-entropy without the (tokens x vocab)
logits, against the float64 gold (F.cross_entropy on F.linear), forward and every gradient, within 2x
PyTorch's own error in the same dtype. The "torch" backend (chunked, gradient formed in the forward)
runs on every device; chunks are forced small here so the chunking itself is exercised."""
import pytest
import torch
import torch.nn.functional as F

from fastft import ops
from fastft.kernels import _common
from fastft.ops import dispatch
from fastft.ops.loss import chunk_rows_for
from utils import assert_close_to_gold, output_and_grads


def _torch_loss(h, W, b, labels, reduction, ignore_index=-100):
    """PyTorch's own composition in the inputs' dtype (float64 for the gold)."""
    z = F.linear(h, W, b).reshape(-1, W.shape[0])
    return F.cross_entropy(z.to(torch.promote_types(z.dtype, torch.float32)), labels.reshape(-1),
                           ignore_index=ignore_index, reduction=reduction)


CASES = [  # N rows (leading shape), H, V, chunk rows, bias
    ((1,), 8, 5, 1, False),          # one row
    ((3, 33), 24, 97, 7, True),      # awkward vocab, chunks that do not divide the rows
    ((97,), 40, 1025, 32, False),    # vocab past 1024
    ((2, 5), 16, 50, 1000, True),    # one chunk
]


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lead,H,V,rows,bias", CASES)
def test_matches_float64_gold(lead, H, V, rows, bias, dtype, reduction):
    gen = torch.Generator().manual_seed(sum(lead) * 7 + V)
    h = torch.randn(*lead, H, generator=gen)
    W = torch.randn(V, H, generator=gen) * H ** -0.5
    b = torch.randn(V, generator=gen) if bias else None
    labels = torch.randint(0, V, lead, generator=gen)
    labels.view(-1)[1::4] = -100
    inputs = [h, W] + ([b] if bias else [])

    def ours(h, W, *b):
        return ops.linear_cross_entropy(h, W, labels, reduction=reduction, bias=b[0] if b else None, chunk_rows=rows)

    def theirs(h, W, *b):
        return _torch_loss(h, W, b[0] if b else None, labels, reduction)

    got = output_and_grads(ours, [t.to(dtype) for t in inputs])
    gold = output_and_grads(theirs, [t.double() for t in inputs])
    lowp = output_and_grads(theirs, [t.to(dtype) for t in inputs])
    for name, g, r, l in zip(["loss", "dh", "dW", "db"], got, gold, lowp):
        assert g.dtype == (torch.float32 if name == "loss" else dtype)
        assert_close_to_gold(g, r, l, name=name)


def test_autocast_runs_logits_in_bf16_and_returns_fp32_grads():
    gen = torch.Generator().manual_seed(1)
    h, W = torch.randn(2, 9, 16, generator=gen), torch.randn(30, 16, generator=gen) * 0.25
    labels = torch.randint(0, 30, (2, 9), generator=gen)

    def autocast(fn):
        def run(h, W):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return fn(h, W)
        return run

    ours = autocast(lambda h, W: ops.linear_cross_entropy(h, W, labels, chunk_rows=4))
    theirs = autocast(lambda h, W: _torch_loss(h, W, None, labels, "mean"))
    got, lowp = output_and_grads(ours, [h, W]), output_and_grads(theirs, [h, W])
    gold = output_and_grads(lambda h, W: _torch_loss(h, W, None, labels, "mean"), [h.double(), W.double()])
    assert all(t.dtype == torch.float32 for t in got)
    for name, g, r, l in zip(["loss", "dh", "dW"], got, gold, lowp):
        assert_close_to_gold(g, r, l, name=name)


def test_frozen_weight_gets_no_gradient_and_nothing_vocab_sized_is_saved():
    """LoRA / QLoRA: the LM head is frozen. The autograd node then saves dh only (N x H), never a
    (N x V) tensor -- checked through saved-tensor hooks."""
    N, H, V = 64, 8, 512
    h = torch.randn(N, H, requires_grad=True)
    W = torch.randn(V, H)
    labels = torch.randint(0, V, (N,))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        loss = ops.linear_cross_entropy(h, W, labels, chunk_rows=16)
    loss.backward()
    assert W.grad is None and h.grad is not None
    assert all(V not in s for s in saved), saved


def test_edges_match_torch():
    h, W = torch.randn(4, 8), torch.randn(6, 8)
    ignored = torch.full((4,), -100)
    assert torch.isnan(ops.linear_cross_entropy(h, W, ignored))  # torch's mean over zero targets
    assert ops.linear_cross_entropy(h, W, ignored, reduction="sum").item() == 0.0
    empty = ops.linear_cross_entropy(h[:0], W, ignored[:0], reduction="sum")
    assert empty.item() == 0.0 and empty.dtype == torch.float32
    labels = torch.tensor([0, 5, -100, 2])
    got = ops.linear_cross_entropy(h, W, labels, ignore_index=-100)
    assert torch.allclose(got, F.cross_entropy(F.linear(h, W), labels), rtol=1e-6, atol=0)


@pytest.mark.parametrize("bad,match", [
    (dict(reduction="none"), "reduction"),
    (dict(W=torch.randn(6, 7)), "agree on H"),
    (dict(labels=torch.zeros(3, dtype=torch.long)), "leading shape"),
    (dict(labels=torch.zeros(4)), "int64 or int32"),
    (dict(bias=torch.randn(5)), "bias must be"),
    (dict(labels=torch.tensor([0, 1, 6, 2])), "outside"),
])
def test_bad_input_raises(bad, match):
    h, W, labels = torch.randn(4, 8), torch.randn(6, 8), torch.tensor([0, 1, 2, 3])
    kw = {"W": W, "labels": labels, **bad}
    with pytest.raises(ValueError, match=match):
        ops.linear_cross_entropy(h, kw.pop("W"), kw.pop("labels"), **kw)


def test_backends_and_chunk_sizing():
    assert dispatch.backend_for("linear_cross_entropy", torch.device("cpu")) == "torch"
    assert dispatch.backend_for("linear_cross_entropy", torch.device("cuda")) == "torch"
    # ... whose chunks' cross-entropy rows run the Triton kernel on CUDA
    assert dispatch.backend_for("cross_entropy_grad_", torch.device("cuda")) == "triton"
    # CUDA without a driver to ask (fake tensors, no GPU): the 1 GiB cap, ~2k rows at a 128k vocabulary
    rows = chunk_rows_for(8192, 128256, torch.device("cuda"))
    assert 1024 <= rows and rows * 128256 * 4 <= 1 << 30
    # CPU: ~32 MiB of fp32 logits per chunk, equal chunks (no one-row tail)
    rows = chunk_rows_for(10_000, 50_000, torch.device("cpu"))
    assert rows * 50_000 * 4 <= 1 << 25 and -(-10_000 // rows) * rows - 10_000 < -(-10_000 // rows)
    assert chunk_rows_for(5, 10, torch.device("cpu")) == 5


class _NoSync(torch.utils._python_dispatch.TorchDispatchMode):
    """Fails on every aten op that needs the host to see a tensor's value: ``.item()``, ``bool()``,
    ``int()``, ``.tolist()`` (all ``_local_scalar_dense``), ``nonzero`` / boolean-mask indexing
    (data-dependent shapes), ``masked_select``, ``unique``. On a GPU each is a host synchronisation."""

    BANNED = ("_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique", "item")

    def __enter__(self):  # .tolist() / .numpy() read CPU memory without an aten op
        self._saved = {n: getattr(torch.Tensor, n) for n in ("tolist", "numpy")}
        for n in self._saved:
            setattr(torch.Tensor, n, self._banned(n))
        return super().__enter__()

    def __exit__(self, *exc):
        for n, f in self._saved.items():
            setattr(torch.Tensor, n, f)
        return super().__exit__(*exc)

    @staticmethod
    def _banned(name):
        def f(*a, **k):
            raise AssertionError(f"host synchronisation inside the loss: Tensor.{name}()")
        return f

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in self.BANNED or name.startswith("_unique"):
            raise AssertionError(f"host synchronisation inside the loss: aten.{name}")
        if name == "index" and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] or ()):
            raise AssertionError("host synchronisation inside the loss: boolean-mask indexing")
        return func(*args, **(kwargs or {}))


def test_no_sync_mode_catches_the_patterns():
    x = torch.tensor([1.0, -2.0])
    for bad in (lambda: x.sum().item(), lambda: bool(x.all()), lambda: x[x > 0], lambda: x.tolist(),
                lambda: x.nonzero()):
        with pytest.raises(AssertionError, match="host synchronisation"), _NoSync():
            bad()


@pytest.mark.parametrize("ce_backend", ["auto", "reference", "triton"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_no_host_synchronisation_inside(monkeypatch, ce_backend, reduction):
    """Forward and backward of the op (the target check, the chunk loop, the cross-entropy rows of
    each backend CUDA could run, the mean's count, bias and weight gradients) and the causal-LM
    losses on it make no host synchronisation: the CPU path runs the same Python as the CUDA one,
    checked op by op."""
    if ce_backend == "triton" and not _common.interpreting():
        pytest.skip("CPU tensors reach the Triton kernels only under TRITON_INTERPRET=1")
    if ce_backend != "auto":
        monkeypatch.setitem(dispatch._IMPLS["cpp"], "cross_entropy_grad_", dispatch.impl("cross_entropy_grad_",
                                                                                        ce_backend))
    gen = torch.Generator().manual_seed(5)
    h = torch.randn(2, 7, 16, generator=gen, requires_grad=True)
    W = (torch.randn(53, 16, generator=gen) * 0.25).requires_grad_(True)
    b = torch.randn(53, generator=gen, requires_grad=True)
    labels = torch.randint(0, 53, (2, 7), generator=gen)
    labels[0, :3] = -100
    with _NoSync():
        loss = ops.linear_cross_entropy(h, W, labels, reduction=reduction, bias=b, chunk_rows=4)
        loss.backward()
    assert h.grad is not None and W.grad is not None and b.grad is not None and torch.isfinite(loss)
    if ce_backend != "auto":
        return
    from fastft.ops.loss import chunked_causal_lm_loss, hf_linear_causal_lm_loss

    cu = torch.tensor([0, 0, 3, 7], dtype=torch.int32)  # an empty first document, then 3 + 4 tokens
    with _NoSync():
        a = chunked_causal_lm_loss(h[:1], W, labels[:1], cu_seqlens=cu, chunk_rows=3)
        c = hf_linear_causal_lm_loss(h, W, labels, bias=b)
        (a + c).backward()
    assert torch.isfinite(a) and torch.isfinite(c)
