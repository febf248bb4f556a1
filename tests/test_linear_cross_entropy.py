"""fastft.ops.linear_cross_entropy: the LM head and its cross-entropy without the (tokens x vocab)
logits, against the float64 gold (F.cross_entropy on F.linear), forward and every gradient, within 2x
PyTorch's own error in the same dtype. The "torch" backend (chunked, gradient formed in the forward)
runs on every device; chunks are forced small here so the chunking itself is exercised."""
import pytest
import torch
import torch.nn.functional as F

from fastft import ops
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
    # CPU: ~32 MiB of fp32 logits per chunk, equal chunks (no one-row tail)
    rows = chunk_rows_for(10_000, 50_000, torch.device("cpu"))
    assert rows * 50_000 * 4 <= 1 << 25 and -(-10_000 // rows) * rows - 10_000 < -(-10_000 // rows)
    assert chunk_rows_for(5, 10, torch.device("cpu")) == 5
