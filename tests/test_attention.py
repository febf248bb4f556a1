"""Triton fused attention (fastft/kernels/attention.py) against float64 gold, forward and gradients.

Tolerances are derived (tests/attention_util.py, tests/utils.py): the kernel's error must be at
most 2x the error PyTorch makes doing the same math entirely in the kernel's dtype, plus a small
floor. On CPU the kernels run under the Triton interpreter (fp16 and fp32; bf16 only with
``--device cuda``), so shapes are small. The forward-only split-KV kernel is
tests/test_attention_decode.py.
"""
import pytest
import torch

from fastft import ops
from fastft.kernels import _common
from fastft.kernels import attention as triton_attention
from fastft.ops import dispatch, reference, triton_backend
from tests.attention_util import attn_math, check_against_gold, make_kpm, make_qkv, parametrize_dtype
from tests.utils import assert_close_to_gold

pytestmark = pytest.mark.interpreter


pytest_generate_tests = parametrize_dtype  # (tests/attention_util.py)

def _pin(fwd=None, dq=None, dkdv=None, fwd_tma=False, fwd_pipe=False):
    """Run the kernels with these (BLOCK_M, BLOCK_N) tiles instead of the interpreter's (and the
    forward's TMA / software-pipelined variant)."""
    pins = {}
    for tuned, tile in ((triton_attention.ATTN_FWD, fwd), (triton_attention.ATTN_DQ, dq),
                        (triton_attention.ATTN_DKDV, dkdv)):
        if tile is not None:
            extra = dict(USE_TMA=fwd_tma, PIPE=fwd_pipe) if tuned is triton_attention.ATTN_FWD else {}
            pins[tuned] = dict(BLOCK_M=tile[0], BLOCK_N=tile[1], **extra)
    return _common.pinned_configs(pins)


# ------------------------------------------------------------------------------ dense attention
CASES = [
    # T, S, D, Hq, Hkv, causal, padding
    (1, 1, 64, 2, 2, True, None),
    (17, 17, 40, 3, 1, True, "left"),
    (97, 97, 80, 2, 2, False, "right"),
    (128, 128, 64, 8, 1, True, None),
    (97, 128, 40, 3, 1, True, "both"),
    (128, 97, 64, 2, 1, True, "left"),  # T > S: the first 31 rows see no key
    (1, 97, 128, 8, 1, True, None),  # one decoding step against a cache
    (17, 1, 32, 2, 2, False, None),
    (97, 17, 96, 2, 2, False, "empty"),
    (17, 128, 256, 2, 1, False, "right"),
    (128, 17, 80, 3, 1, True, "right"),
    (33, 64, 64, 2, 2, False, "both"),
]


@pytest.mark.parametrize("T,S,D,Hq,Hkv,causal,pad", CASES, ids=lambda x: str(x))
def test_attention_matches_gold(T, S, D, Hq, Hkv, causal, pad, dtype, device):
    B = 2
    q, k, v = make_qkv(B, Hq, Hkv, T, S, D, dtype, device)
    kpm = make_kpm(B, S, pad, device)
    dout = torch.randn(B, Hq, T, D, device=device).to(dtype)
    got, _ = check_against_gold(
        lambda q, k, v: triton_attention.attention(q, k, v, causal=causal, key_padding_mask=kpm),
        lambda q, k, v: attn_math(q, k, v, causal=causal, kpm=kpm),
        [q, k, v], dout,
    )
    out, dq, dk, dv = got
    allowed = reference.attention_mask_bias(T, S, causal=causal, key_padding_mask=kpm, device=device)
    blind = ~allowed.any(-1).expand(B, Hq, T)  # rows that see no key: exactly 0, zero gradient
    assert (out[blind] == 0).all() and (dq[blind] == 0).all()
    if kpm is not None:  # padded keys receive exactly zero gradient
        assert (dk.transpose(1, 2)[~kpm] == 0).all() and (dv.transpose(1, 2)[~kpm] == 0).all()


@pytest.mark.parametrize("tiles", [((16, 64), (16, 64), (64, 16)), ((32, 32), (32, 32), (32, 32))],
                         ids=["rows<cols", "square"])
@pytest.mark.parametrize("T,S,pad", [(97, 128, "both"), (128, 97, "left")])
def test_attention_other_tile_shapes(tiles, T, S, pad, device):
    """The default interpreter tiles have BLOCK_M > BLOCK_N (forward, dQ) and < (dK/dV); the GPU
    configs have both: tile skipping and diagonal masking must not depend on the relation."""
    dtype = torch.float16
    q, k, v = make_qkv(2, 3, 1, T, S, 64, dtype, device)
    kpm = make_kpm(2, S, pad, device)
    dout = torch.randn_like(q)
    with _pin(*tiles):
        check_against_gold(
            lambda q, k, v: triton_attention.attention(q, k, v, causal=True, key_padding_mask=kpm),
            lambda q, k, v: attn_math(q, k, v, causal=True, kpm=kpm),
            [q, k, v], dout,
        )


def test_attention_long_sequence(device):
    """T = S = 1025 (one past a power of two), causal: many tiles, a 1-row ragged tail."""
    dtype = torch.float16
    q, k, v = make_qkv(1, 1, 1, 1025, 1025, 64, dtype, device)
    dout = torch.randn_like(q)
    check_against_gold(
        lambda q, k, v: triton_attention.attention(q, k, v, causal=True),
        lambda q, k, v: attn_math(q, k, v, causal=True),
        [q, k, v], dout,
    )


TMA_CASES = [CASES[2], CASES[4], CASES[5], CASES[9]]  # head dims 80 / 40 / 64 / 256, padding, T != S


@pytest.mark.unvalidated  # configs never run on a GPU: gpu_check's separate stage
@pytest.mark.parametrize("tma,pipe", [(True, False), (False, True), (True, True)], ids=["tma", "pipe", "tma+pipe"])
@pytest.mark.parametrize("T,S,D,Hq,Hkv,causal,pad", TMA_CASES + [CASES[3]], ids=lambda x: str(x))
def test_attention_tma_and_pipelined_variants_match_gold(T, S, D, Hq, Hkv, causal, pad, tma, pipe, device):
    """The forward's TMA variant (tensor-descriptor K / V loads, zero-filled past the sequence and
    the head dim; where the TMA cannot run, before sm_90, the pointer loads) and its software-
    pipelined interior loop (block j+1's scores issued before block j's softmax; S = 128 gives the
    loop body several full blocks): the same results as the plain loop."""
    B = 2
    q, k, v = make_qkv(B, Hq, Hkv, T, S, D, torch.float16, device)
    kpm = make_kpm(B, S, pad, device)
    dout = torch.randn_like(q)
    with _pin(fwd=(64, 32), fwd_tma=tma, fwd_pipe=pipe):
        check_against_gold(lambda q, k, v: triton_attention.attention(q, k, v, causal=causal, key_padding_mask=kpm),
                           lambda q, k, v: attn_math(q, k, v, causal=causal, kpm=kpm), [q, k, v], dout)
    assert triton_attention.tma_eligible(q, k, v) or (device == "cuda" and torch.cuda.get_device_capability()[0] < 9)


@pytest.mark.unvalidated  # configs never run on a GPU: gpu_check's separate stage
def test_attention_pipelined_variant_with_dropout_matches_gold(device):
    """The pipelined interior loop with dropout (the same Philox mask as the plain loop)."""
    B, Hq, Hkv, T, S, D, p = 2, 2, 1, 70, 128, 64, 0.2
    q, k, v = make_qkv(B, Hq, Hkv, T, S, D, torch.float16, device)
    seed = 1234
    with _pin(fwd=(64, 32)):
        plain = triton_attention.attention(q, k, v, causal=False, dropout_p=p, generator=torch.Generator(device).manual_seed(seed))
    with _pin(fwd=(64, 32), fwd_pipe=True):
        piped = triton_attention.attention(q, k, v, causal=False, dropout_p=p, generator=torch.Generator(device).manual_seed(seed))
    keep = triton_attention.dropout_keep_mask(_common.draw_seed(torch.Generator(device).manual_seed(seed)), B, Hq, T, S, p, device)
    gold = attn_math(q.double(), k.double(), v.double(), causal=False, keep=keep, dropout_p=p)
    lowp = attn_math(q, k, v, causal=False, keep=keep, dropout_p=p)
    assert_close_to_gold(piped, gold, lowp, name="pipelined")
    assert_close_to_gold(plain, gold, lowp, name="plain")


@pytest.mark.unvalidated  # configs never run on a GPU: gpu_check's separate stage
@pytest.mark.parametrize("pipe", [False, True], ids=["plain", "pipe"])
def test_attention_tma_variant_varlen_and_unaligned_fallback(device, pipe):
    """Packed documents through the TMA variant (a descriptor per document), and a K / V layout
    whose row stride is not a 16-byte multiple, which must take the pointer loads."""
    lens = [5, 0, 37, 20]
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32, device=device)
    tot, H, D = sum(lens), 2, 64
    q, k, v = (torch.randn(tot, H, D, device=device).half() for _ in range(3))
    with _pin(fwd=(64, 32), fwd_tma=True, fwd_pipe=pipe):
        out = triton_attention.attention_varlen(q, k, v, cu, max(lens), causal=True)
    for b in range(len(lens)):
        s, e = int(cu[b]), int(cu[b + 1])
        if e == s:
            continue
        qb, kb, vb = (t[s:e].transpose(0, 1)[None] for t in (q, k, v))
        gold = attn_math(qb.double(), kb.double(), vb.double(), causal=True)[0].transpose(0, 1)
        lowp = attn_math(qb, kb, vb, causal=True)[0].transpose(0, 1)
        assert_close_to_gold(out[s:e], gold, lowp, name=f"doc {b}")
    # D = 36 fp16: 72-byte rows, not a 16-byte multiple
    q, k, v = make_qkv(1, 2, 2, 17, 33, 36, torch.float16, device)
    assert not triton_attention.tma_eligible(q, k, v)
    with _pin(fwd=(64, 32), fwd_tma=True, fwd_pipe=pipe):  # TMA compiled out (TMA_OK False)
        out = triton_attention.attention(q, k, v, causal=False)
    assert_close_to_gold(out, attn_math(q.double(), k.double(), v.double(), causal=False),
                         attn_math(q, k, v, causal=False))


@pytest.mark.parametrize("scale", [0.3, -0.2], ids=["scale0.3", "negative"])
def test_attention_scale_and_strided_layout(dtype, device, scale):
    """Inputs as transposed views of (B, T, H, D) memory (what HF models hand over), custom scale
    (a negative one takes the forward's unfolded-scale branch): no copies needed, output keeps q's
    layout."""
    B, T, S, Hq, Hkv, D = 2, 33, 40, 4, 2, 64
    qm = torch.randn(B, T, Hq, D, device=device).to(dtype)
    km = torch.randn(B, S, Hkv, D, device=device).to(dtype)
    vm = torch.randn(B, S, Hkv, D, device=device).to(dtype)
    dout = torch.randn(B, Hq, T, D, device=device).to(dtype)

    def run(qm, km, vm):
        o = triton_attention.attention(qm.transpose(1, 2), km.transpose(1, 2), vm.transpose(1, 2), causal=True, scale=scale)
        assert o.transpose(1, 2).is_contiguous()
        return o

    check_against_gold(
        run,
        lambda qm, km, vm: attn_math(qm.transpose(1, 2), km.transpose(1, 2), vm.transpose(1, 2), causal=True,
                                     scale=scale),
        [qm, km, vm], dout,
    )


# ------------------------------------------------------------------------------------- varlen
def _varlen_math(q, k, v, cu, *, causal, keep=None, dropout_p=0.0):
    pieces = []
    cu = cu.tolist()
    for a, b in zip(cu, cu[1:]):
        if b == a:
            continue
        qi, ki, vi = (t[a:b].transpose(0, 1)[None] for t in (q, k, v))
        kp = None if keep is None else keep[:, :, a:b, a:b]
        pieces.append(attn_math(qi, ki, vi, causal=causal, keep=kp, dropout_p=dropout_p)[0].transpose(0, 1))
    return torch.cat(pieces, 0)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("lens,Hq,Hkv,D", [([5, 0, 70, 1, 33], 4, 2, 64), ([0, 97, 0], 3, 1, 40)])
def test_attention_varlen_matches_gold(lens, Hq, Hkv, D, causal, dtype, device):
    total = sum(lens)
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=device)
    q = torch.randn(total, Hq, D, device=device).to(dtype)
    k = torch.randn(total, Hkv, D, device=device).to(dtype)
    v = torch.randn(total, Hkv, D, device=device).to(dtype)
    dout = torch.randn_like(q)
    got, _ = check_against_gold(
        lambda q, k, v: triton_attention.attention_varlen(q, k, v, cu, max(lens), causal=causal),
        lambda q, k, v: _varlen_math(q, k, v, cu, causal=causal),
        [q, k, v], dout,
    )
    # the gold itself is the reference op's semantics
    ref = reference.attention_varlen(q.double(), k.double(), v.double(), cu, max(lens), causal=causal)
    torch.testing.assert_close(_varlen_math(q.double(), k.double(), v.double(), cu, causal=causal), ref)


def test_attention_varlen_all_empty(device):
    q = torch.randn(0, 2, 32, device=device, dtype=torch.float16)
    cu = torch.zeros(3, dtype=torch.int32, device=device)
    assert triton_attention.attention_varlen(q, q, q, cu, 0, causal=True).shape == (0, 2, 32)


# ------------------------------------------------------------------------------------- dropout
def test_dropout_keep_mask_statistics(device):
    keep = triton_attention.dropout_keep_mask(1234, 2, 3, 64, 96, 0.25, device)
    assert keep.shape == (2, 3, 64, 96) and keep.dtype == torch.bool
    frac = 1.0 - keep.float().mean().item()
    assert abs(frac - 0.25) < 0.02, frac  # 36,864 Bernoulli(0.25) draws: sd 0.0023
    assert torch.equal(keep, triton_attention.dropout_keep_mask(1234, 2, 3, 64, 96, 0.25, device))
    assert not torch.equal(keep, triton_attention.dropout_keep_mask(1235, 2, 3, 64, 96, 0.25, device))


@pytest.mark.parametrize("T,S,causal,pad", [(97, 97, True, "left"), (33, 70, False, "right")])
def test_attention_dropout_matches_gold(T, S, causal, pad, dtype, device):
    B, Hq, Hkv, D, p = 2, 2, 1, 64, 0.2
    q, k, v = make_qkv(B, Hq, Hkv, T, S, D, dtype, device)
    kpm = make_kpm(B, S, pad, device)
    dout = torch.randn(B, Hq, T, D, device=device).to(dtype)
    gen = torch.Generator(device=device).manual_seed(7)
    seed = _common.draw_seed(torch.Generator(device=device).manual_seed(7))  # what the op will draw
    keep = triton_attention.dropout_keep_mask(seed, B, Hq, T, S, p, device)
    got, _ = check_against_gold(
        lambda q, k, v: triton_attention.attention(q, k, v, causal=causal, key_padding_mask=kpm, dropout_p=p, generator=gen),
        lambda q, k, v: attn_math(q, k, v, causal=causal, kpm=kpm, keep=keep, dropout_p=p),
        [q, k, v], dout,
    )
    # same generator state -> same output; another seed -> a different mask and output
    again = triton_attention.attention(q, k, v, causal=causal, key_padding_mask=kpm, dropout_p=p,
                        generator=torch.Generator(device=device).manual_seed(7))
    assert torch.equal(again, got[0])
    other = triton_attention.attention(q, k, v, causal=causal, key_padding_mask=kpm, dropout_p=p,
                        generator=torch.Generator(device=device).manual_seed(8))
    assert not torch.equal(other, got[0])


def test_attention_varlen_dropout_matches_gold(dtype, device):
    lens, Hq, Hkv, D, p = [40, 0, 57], 2, 1, 32, 0.3
    total = sum(lens)
    cu = torch.tensor([0, 40, 40, 97], dtype=torch.int32, device=device)
    q = torch.randn(total, Hq, D, device=device).to(dtype)
    k = torch.randn(total, Hkv, D, device=device).to(dtype)
    v = torch.randn(total, Hkv, D, device=device).to(dtype)
    dout = torch.randn_like(q)
    torch.manual_seed(11)
    seed = _common.draw_seed(None)
    keep = triton_attention.dropout_keep_mask(seed, 1, Hq, total, total, p, device)  # varlen: packed token indices

    def run(q, k, v):
        torch.manual_seed(11)  # the op draws its seed from torch's default generator
        return triton_attention.attention_varlen(q, k, v, cu, max(lens), causal=True, dropout_p=p)

    check_against_gold(run, lambda q, k, v: _varlen_math(q, k, v, cu, causal=True, keep=keep, dropout_p=p),
                       [q, k, v], dout)


# ------------------------------------------------------------------------------- determinism
def test_backward_is_deterministic(device):
    """50 backward calls (GQA group sums over 3 query heads, padding) give bit-identical gradients."""
    B, Hq, Hkv, T, S, D = 1, 3, 1, 33, 72, 32
    q, k, v = (t.requires_grad_(True) for t in make_qkv(B, Hq, Hkv, T, S, D, torch.float16, device))
    kpm = make_kpm(B, S, "left", device)
    out = triton_attention.attention(q, k, v, causal=True, key_padding_mask=kpm)
    dout = torch.randn_like(out)
    first = torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)
    for _ in range(49):
        again = torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)
        for a, b in zip(first, again):
            assert torch.equal(a, b)


# ---------------------------------------------------------------------------------- bad inputs
def test_bad_inputs_raise(device):
    q, k, v = make_qkv(2, 4, 2, 8, 8, 32, torch.float16, device)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        triton_attention.attention(q, k[:, :1].expand(2, 3, 8, 32), v[:, :1].expand(2, 3, 8, 32), causal=True)
    with pytest.raises(ValueError, match="expects q"):
        triton_attention.attention(q[0], k, v, causal=True)
    with pytest.raises(TypeError, match="dtypes differ"):
        triton_attention.attention(q, k.float(), v, causal=True)
    with pytest.raises(TypeError, match="not supported"):
        triton_attention.attention(q.double(), k.double(), v.double(), causal=True)
    with pytest.raises(ValueError, match="key_padding_mask must be"):
        triton_attention.attention(q, k, v, causal=True, key_padding_mask=torch.ones(2, 7, dtype=torch.bool, device=device))
    with pytest.raises(ValueError, match="dropout_p"):
        triton_attention.attention(q, k, v, causal=True, dropout_p=1.0)
    with pytest.raises(ValueError, match="head dim"):
        big = torch.zeros(1, 1, 4, 320, dtype=torch.float16, device=device)
        triton_attention.attention(big, big, big, causal=False)
    with pytest.raises(ValueError, match="batch or head dim"):
        triton_attention.attention(q, k[..., :16], v[..., :16], causal=True)
    qv = torch.randn(10, 2, 32, device=device).half()
    with pytest.raises(ValueError, match="cu_seqlens"):
        triton_attention.attention_varlen(qv, qv, qv, torch.tensor([0, 4, 9], dtype=torch.int32, device=device), 5, causal=True)
    with pytest.raises(ValueError, match="max_seqlen"):
        triton_attention.attention_varlen(qv, qv, qv, torch.tensor([0, 4, 10], dtype=torch.int32, device=device), 5, causal=True)
    with pytest.raises(TypeError, match="int32 or int64"):
        triton_attention.attention_varlen(qv, qv, qv, torch.tensor([0.0, 10.0], device=device), 10, causal=True)


def test_cpu_without_interpreter_is_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x = torch.zeros(1, 1, 4, 16, dtype=torch.float16)
    with pytest.raises(ValueError, match="CUDA tensors"):
        triton_attention.attention(x, x, x, causal=True)


# ---------------------------------------------------------------------------------- dispatch
def test_dispatcher_runs_the_kernel(monkeypatch, device):
    monkeypatch.setenv("FASTFT_BACKEND", "triton")
    q, k, v = make_qkv(1, 2, 1, 17, 17, 40, torch.float16, device)
    assert dispatch.backend_for("attention", q.device) == "triton"
    assert dispatch.backend_for("attention_varlen", q.device) == "triton"
    assert dispatch.impl("attention", "triton") is triton_backend.attention
    assert dispatch.impl("attention_varlen", "triton") is triton_attention.attention_varlen
    assert torch.equal(ops.attention(q, k, v, causal=True), triton_backend.attention(q, k, v, causal=True))
