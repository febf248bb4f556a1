"""The lean CPU training step (issue 6, item 4).

* The ``cpp`` backend's ``attention`` / ``attention_varlen`` (fastft's CPU kernel -- fp32, and bf16
  on both its AVX512-BF16 and fp32 GEMM paths -- or torch's fused CPU SDPA for padded batches; GQA
  without repeating K/V) and ``lora_linear`` (rank-side autograd Function saving x and u only) against the
  float64 reference: forward and gradients within 2x PyTorch's own fp32 error (tests/utils.py).
* The chunked cross-entropy of the native Llama loss equals the unchunked loss and its gradients.
* A 20-step QLoRA run on a tiny Llama with the cpp path tracks the reference path
  (``FASTFT_BACKEND=reference``): relative loss difference <= 1e-4 at every step.
"""
import pytest
import torch
import torch.nn.functional as F

import fastft
from fastft.ops import cpp, dispatch
from fastft.quant import Int4Weight, NF4Weight
from models_util import one_thread, save_tiny_checkpoint  # noqa: F401  (one_thread: autouse fixture)
from utils import assert_close_to_gold, output_and_grads

pytestmark = pytest.mark.skipif(not cpp.AVAILABLE, reason="fastft._C (the cpp backend) is not built")


_run = output_and_grads


def _check_vs_gold(fn_cpp, fn_ref, inputs, names):
    got = _run(fn_cpp, inputs)
    gold = _run(fn_ref, [t.double() for t in inputs])
    lowp = _run(fn_ref, inputs)
    for n, a, g, r in zip(["out"] + names, got, gold, lowp):
        assert_close_to_gold(a, g, r, name=n)


# ----------------------------------------------------------------------------------------------
# attention
# ----------------------------------------------------------------------------------------------
ATT_CASES = [  # B, Hq, Hkv, T, S, D, causal, padding
    (2, 4, 4, 1, 1, 40, True, False),
    (2, 6, 2, 97, 97, 64, True, False),
    (2, 6, 2, 97, 97, 80, False, False),
    (2, 4, 2, 5, 33, 40, True, True),    # T < S (decoding against a cache), padding
    (2, 4, 1, 33, 5, 40, True, False),   # T > S: the first rows see no key -> 0
    (3, 4, 2, 17, 17, 64, True, True),   # a fully padded sequence
    (2, 4, 2, 17, 17, 64, False, True),
]


@pytest.mark.parametrize("B,Hq,Hkv,T,S,D,causal,padding", ATT_CASES)
def test_cpp_attention_vs_float64(B, Hq, Hkv, T, S, D, causal, padding):
    torch.manual_seed(0)
    q, k, v = torch.randn(B, Hq, T, D), torch.randn(B, Hkv, S, D), torch.randn(B, Hkv, S, D)
    kpm = None
    if padding:
        kpm = torch.rand(B, S) > 0.3
        kpm[0] = False  # no key at all
        kpm[1, :2] = False  # left padding
    ref, ours = dispatch.impl("attention", "reference"), dispatch.impl("attention", "cpp")
    assert ours is not ref
    fc = lambda q, k, v: ours(q, k, v, causal=causal, key_padding_mask=kpm)  # noqa: E731
    fr = lambda q, k, v: ref(q, k, v, causal=causal, key_padding_mask=kpm)  # noqa: E731
    _check_vs_gold(fc, fr, [q, k, v], ["dq", "dk", "dv"])
    out, dq, dk, dv = _run(fc, [q, k, v])
    if padding:  # the fully padded sequence: 0 output, 0 grads
        assert torch.equal(out[0], torch.zeros_like(out[0])) and torch.equal(dq[0], torch.zeros_like(dq[0]))
        assert torch.equal(dk[0], torch.zeros_like(dk[0])) and torch.equal(dv[0], torch.zeros_like(dv[0]))


BF16_ATT_CASES = [  # B, Hq, Hkv, T, S, D, causal, padding
    (2, 4, 4, 1, 1, 40, True, False),
    (2, 6, 2, 97, 97, 64, True, False),    # two query blocks of the kernel, odd T
    (1, 3, 1, 130, 130, 80, True, False),  # three blocks, GQA 3
    (2, 4, 2, 5, 33, 40, True, False),     # T < S (against a cache)
    (2, 4, 1, 33, 5, 40, True, False),     # T > S: the first rows see no key -> 0
    (1, 2, 2, 17, 17, 33, True, False),    # odd head dim: the fp32-GEMM path
    (3, 4, 2, 70, 70, 64, True, True),     # padding both sides, one sequence fully padded
    (3, 6, 3, 33, 33, 64, False, True),    # bidirectional (BERT) with padding
    (3, 4, 2, 5, 33, 40, False, True),     # bidirectional, T < S, padding
    (3, 4, 1, 40, 12, 40, True, True),     # T > S with padding: blind rows and masked keys together
]


@pytest.fixture(params=[True, False], ids=["bf16-gemms", "fp32-gemms"])
def attn_bf16(request):
    """Both bf16 paths of the kernel: AVX512-BF16 GEMMs (where the CPU has them) and fp32 GEMMs."""
    from fastft import _C

    _C.set_attn_bf16(request.param)
    if request.param and not _C.attn_bf16():
        _C.set_attn_bf16(True)
        import reliability_figures

        reliability_figures.skipped(request.node.nodeid, "this CPU has no AVX512-BF16: the bf16-GEMM path is not run")
        pytest.skip("ISA coverage missing: no AVX512-BF16 on this CPU (the bf16-GEMM attention path)")
    yield request.param
    _C.set_attn_bf16(True)


@pytest.mark.parametrize("B,Hq,Hkv,T,S,D,causal,padding", BF16_ATT_CASES)
def test_cpp_attention_bf16_vs_float64(attn_bf16, B, Hq, Hkv, T, S, D, causal, padding):
    from fastft import _C

    if not attn_bf16:
        assert not _C.attn_bf16()
    gen = torch.Generator().manual_seed(T * 31 + D)
    q, k, v = (torch.randn(*s, generator=gen).bfloat16() for s in ((B, Hq, T, D), (B, Hkv, S, D), (B, Hkv, S, D)))
    kpm = None
    if padding:
        kpm = torch.ones(B, S, dtype=torch.bool)
        kpm[0] = False       # no key at all: 0 output, 0 gradients
        kpm[1, :5] = False   # left padding
        kpm[2, -9:] = False  # right padding
    ref, ours = dispatch.impl("attention", "reference"), dispatch.impl("attention", "cpp")
    fc = lambda q, k, v: ours(q, k, v, causal=causal, key_padding_mask=kpm)  # noqa: E731
    fr = lambda q, k, v: ref(q, k, v, causal=causal, key_padding_mask=kpm)  # noqa: E731
    _check_vs_gold(fc, fr, [q, k, v], ["dq", "dk", "dv"])
    out, dq, dk, dv = _run(fc, [q, k, v])
    again = _run(fc, [q, k, v])  # deterministic: no atomics, fixed reduction order
    for a, b in zip((out, dq, dk, dv), again):
        assert torch.equal(a, b)
    if padding:
        for t in (out, dq, dk, dv):
            assert torch.equal(t[0], torch.zeros_like(t[0]))
    if causal and T > S:  # rows that see no key: 0 output and 0 query gradient
        blind = T - S
        assert torch.equal(out[:, :, :blind], torch.zeros_like(out[:, :, :blind]))
        assert torch.equal(dq[:, :, :blind], torch.zeros_like(dq[:, :, :blind]))


def test_cpp_attention_same_under_autocast(attn_bf16):
    """CPU autocast stays set while the C++ op runs: the kernel's own ATen GEMMs (the fp32-GEMM path
    for bf16 inputs) must not be autocast to bf16 -- the result equals the call without autocast, bit
    for bit, forward and backward."""
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(*s, generator=gen).bfloat16() for s in ((2, 4, 70, 16), (2, 2, 70, 16), (2, 2, 70, 16)))
    ours = dispatch.impl("attention", "cpp")
    f = lambda q, k, v: ours(q, k, v, causal=True)  # noqa: E731
    plain = _run(f, [q, k, v])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = _run(f, [q, k, v])
    for a, b in zip(plain, auto):
        assert torch.equal(a, b)


def test_cpp_attention_kernel_rejects_bad_inputs():
    o = torch.ops.fastft
    q = torch.randn(1, 4, 8, 16)
    with pytest.raises(RuntimeError, match="share one dtype"):
        o.attn_fwd(q, torch.randn(1, 2, 8, 16).bfloat16(), torch.randn(1, 2, 8, 16), 0.25, True)
    with pytest.raises(RuntimeError, match="multiple of the key/value heads"):
        o.attn_fwd(q, torch.randn(1, 3, 8, 16), torch.randn(1, 3, 8, 16), 0.25, True)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        o.attn_fwd(q.half(), torch.randn(1, 2, 8, 16).half(), torch.randn(1, 2, 8, 16).half(), 0.25, True)
    with pytest.raises(RuntimeError, match="same shape"):
        o.attn_fwd(q, torch.randn(1, 2, 8, 16), torch.randn(1, 2, 9, 16), 0.25, True)


def test_cpp_attention_varlen_vs_float64():
    torch.manual_seed(0)
    lens = [5, 0, 31, 1, 12]
    total = sum(lens)
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32)
    q, k, v = torch.randn(total, 6, 40), torch.randn(total, 2, 40), torch.randn(total, 2, 40)
    ref, ours = dispatch.impl("attention_varlen", "reference"), dispatch.impl("attention_varlen", "cpp")
    fc = lambda q, k, v: ours(q, k, v, cu, max(lens), causal=True)  # noqa: E731
    fr = lambda q, k, v: ref(q, k, v, cu, max(lens), causal=True)  # noqa: E731
    _check_vs_gold(fc, fr, [q, k, v], ["dq", "dk", "dv"])


def test_cpp_attention_rejects_bad_shapes():
    ours = dispatch.impl("attention", "cpp")
    with pytest.raises(ValueError, match="multiple"):
        ours(torch.randn(1, 3, 4, 8), torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8), causal=True)


# ----------------------------------------------------------------------------------------------
# lora_linear
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("base", ["dense", "dense_trainable", "nf4", "int4"])
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_cpp_lora_linear_vs_float64(base, dropout_p):
    torch.manual_seed(0)
    out_f, in_f, r = 96, 128, 8
    W = torch.randn(out_f, in_f) / in_f ** 0.5
    x, A, Bm, b = torch.randn(3, 37, in_f), torch.randn(r, in_f) * 0.1, torch.randn(out_f, r) * 0.1, torch.randn(out_f)
    ours, ref = dispatch.impl("lora_linear", "cpp"), dispatch.impl("lora_linear", "reference")
    if base in ("nf4", "int4"):
        qw = NF4Weight.from_float(W) if base == "nf4" else Int4Weight.from_float(W, group_size=64)
        wdeq = qw.dequantize(torch.float32)

        def mk(fn):
            def f(x, A, Bm, b):  # the float64 gold runs on the dequantized weight
                w = wdeq.double() if x.dtype == torch.float64 else qw
                return fn(x, w, A, Bm, 2.0, bias=b, dropout_p=dropout_p, generator=torch.Generator().manual_seed(7))
            return f

        _check_vs_gold(mk(ours), mk(ref), [x, A, Bm, b], ["dx", "dA", "dB", "dbias"])
        return

    def mk(fn):
        def f(x, W, A, Bm, b):
            return fn(x, W, A, Bm, 2.0, bias=b, dropout_p=dropout_p, generator=torch.Generator().manual_seed(7))
        return f

    if base == "dense":  # frozen W: no grad flows to it
        _check_vs_gold(lambda x, A, Bm, b: mk(ours)(x, W, A, Bm, b),
                       lambda x, A, Bm, b: mk(ref)(x, W.to(x.dtype), A, Bm, b), [x, A, Bm, b],
                       ["dx", "dA", "dB", "dbias"])
    else:
        _check_vs_gold(mk(ours), mk(ref), [x, W, A, Bm, b], ["dx", "dW", "dA", "dB", "dbias"])


def test_cpp_lora_linear_dropout_without_generator():
    """Without a generator the mask is drawn from the device's default generator (the global RNG: no
    seed read on the host) and regenerated in backward (never stored): the result equals the
    reference given that generator."""
    ours, ref = dispatch.impl("lora_linear", "cpp"), dispatch.impl("lora_linear", "reference")
    torch.manual_seed(0)
    x, W, A, Bm = torch.randn(16, 32), torch.randn(24, 32), torch.randn(4, 32), torch.randn(24, 4)
    torch.manual_seed(3)
    got = _run(lambda x, A, Bm: ours(x, W, A, Bm, 0.5, dropout_p=0.5), [x, A, Bm])

    def ref_run(dtype):
        torch.manual_seed(3)
        gen = torch.default_generator
        return _run(lambda x, A, Bm: ref(x, W.to(dtype), A, Bm, 0.5, dropout_p=0.5, generator=gen),
                    [t.to(dtype) for t in (x, A, Bm)])

    for n, a, g, r in zip(["out", "dx", "dA", "dB"], got, ref_run(torch.float64), ref_run(torch.float32)):
        assert_close_to_gold(a, g, r, name=n)
    assert not torch.equal(got[0], _run(lambda x, A, Bm: ours(x, W, A, Bm, 0.5), [x, A, Bm])[0])


# ----------------------------------------------------------------------------------------------
# chunked cross-entropy
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("packed", [False, True])
def test_chunked_loss_equals_unchunked(packed, dtype):
    from fastft.ops.loss import causal_lm_loss, chunked_causal_lm_loss

    torch.manual_seed(0)
    B, T, H, V = (1, 45, 24, 50) if packed else (3, 17, 24, 50)
    h, W = torch.randn(B, T, H).to(dtype), (torch.randn(V, H) * 0.3).to(dtype)
    labels = torch.randint(0, V, (B, T))
    labels[0, :4] = -100
    cu = torch.tensor([0, 10, 30, 45], dtype=torch.int32) if packed else None
    n_items = 40 if packed else None

    def chunked(h, W):
        return chunked_causal_lm_loss(h, W, labels, n_items, cu, chunk_rows=7)

    def full(h, W):  # the reference loss, computed in h's dtype (float64 for the gold)
        logits = F.linear(h, W)
        if h.dtype == torch.float64:
            from fastft.ops.loss import normalise_loss as _normalise, shifted_targets as _shifted_targets

            t = _shifted_targets(labels, logits.shape[:2], cu)
            tot = F.cross_entropy(logits.reshape(-1, V), t.reshape(-1), ignore_index=-100, reduction="sum")
            return _normalise(tot, t, n_items)
        return causal_lm_loss(logits, labels, n_items, cu)

    _check_vs_gold(chunked, full, [h, W], ["dh", "dW"])


def test_chunked_loss_under_autocast():
    """bf16 autocast over fp32 h / W (the Trainer's bf16=True): the chunked loss runs the logits in
    bf16 like lm_head under autocast and stays within 2x the full-logits path's error."""
    from fastft.ops.loss import causal_lm_loss, chunked_causal_lm_loss

    torch.manual_seed(0)
    B, T, H, V = 3, 17, 24, 50
    h, W = torch.randn(B, T, H), torch.randn(V, H) * 0.3
    labels = torch.randint(0, V, (B, T))
    labels[0, :4] = -100

    def autocast(fn):
        def run(h, W):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return fn(h, W)
        return run

    def full(h, W):
        if h.dtype == torch.float64:  # the gold: plain float64, no autocast
            return causal_lm_loss(F.linear(h, W), labels)
        return autocast(lambda h, W: causal_lm_loss(F.linear(h, W), labels))(h, W)

    chunked = autocast(lambda h, W: chunked_causal_lm_loss(h, W, labels, chunk_rows=7))
    got = _run(chunked, [h, W])
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.float32 and got[2].dtype == torch.float32
    _check_vs_gold(chunked, full, [h, W], ["dh", "dW"])


def _lora_model(path, quantization, dtype=torch.float32):
    m = fastft.from_pretrained(path, quantization=quantization, dtype=dtype)
    return fastft.get_peft_model(m, fastft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                      lora_dropout=0.0))


def test_training_forward_uses_chunked_loss(tmp_path):
    """model.train() + labels: loss without logits, same value and LoRA grads as the logits path."""
    path = save_tiny_checkpoint(tmp_path, "llama")
    torch.manual_seed(0)
    model = _lora_model(path, None)
    ids = torch.randint(3, 128, (2, 24))
    labels = ids.clone()
    labels[1, :5] = -100
    params = [p for p in model.parameters() if p.requires_grad]
    with torch.no_grad():  # non-zero B so every LoRA grad is non-trivial
        for p in params:
            p.add_(torch.randn_like(p) * 0.05)
    model.train()
    out = model(input_ids=ids, labels=labels)
    assert out.logits is None
    g_chunk = torch.autograd.grad(out.loss, params)
    from fastft.ops.loss import causal_lm_loss

    model.eval()  # same computation (no dropout), logits path
    out_eval = model(input_ids=ids, labels=labels)
    assert out_eval.logits is not None and out_eval.logits.shape == (2, 24, 128)
    loss_full = causal_lm_loss(out_eval.logits, labels)
    g_full = torch.autograd.grad(loss_full, params)
    assert abs(out.loss.item() - loss_full.item()) <= 1e-5 * abs(loss_full.item())
    for a, b in zip(g_chunk, g_full):
        assert (a - b).abs().max() <= 1e-5 * max(b.abs().max().item(), 1e-3)


# ----------------------------------------------------------------------------------------------
# 20 QLoRA steps: cpp path vs reference path
# ----------------------------------------------------------------------------------------------
def _qlora_losses(path, backend, monkeypatch, steps=20, dtype=torch.float32):
    monkeypatch.setenv("FASTFT_BACKEND", backend)
    torch.manual_seed(0)
    model = _lora_model(path, "nf4", dtype)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    g = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        ids = torch.randint(3, 128, (2, 32), generator=g)
        mask = torch.ones_like(ids)
        mask[1, :6] = 0  # left padding in one row
        labels = ids.masked_fill(mask == 0, -100)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def test_qlora_20_steps_cpp_tracks_reference(tmp_path, monkeypatch):
    path = save_tiny_checkpoint(tmp_path, "llama")
    assert dispatch.backend_for("lora_linear", torch.device("cpu")) == "cpp"
    ours = _qlora_losses(path, "cpp", monkeypatch)
    ref = _qlora_losses(path, "reference", monkeypatch)
    assert ref[-1] < ref[0]  # it trains
    for i, (a, b) in enumerate(zip(ours, ref)):
        assert abs(a - b) <= 1e-4 * abs(b), f"step {i}: cpp loss {a} vs reference {b}"


def test_qlora_20_steps_bf16_cpp_tracks_fp32():
    """bf16 weights and activations (fp32 adapters): every fused CPU kernel of the step (attention
    on AVX512-BF16 GEMMs, CE rows, RMSNorm / RoPE / SwiGLU rows, the LoRA node, the NF4
    quant-matmul) stays as close to the fp32 run as torch's own bf16 composition does."""
    import _pytest.monkeypatch

    mp = _pytest.monkeypatch.MonkeyPatch()
    try:
        import tempfile

        with tempfile.TemporaryDirectory() as d:
            path = save_tiny_checkpoint(d, "llama")
            gold = _qlora_losses(path, "reference", mp, dtype=torch.float32)
            ours = _qlora_losses(path, "cpp", mp, dtype=torch.bfloat16)
            ref = _qlora_losses(path, "reference", mp, dtype=torch.bfloat16)
    finally:
        mp.undo()
    # torch's own bf16 error against the fp32 run, over the 20 steps, sets the scale.
    bound = 2 * max(abs(r - g) for r, g in zip(ref, gold))
    for i, (a, g) in enumerate(zip(ours, gold)):
        assert abs(a - g) <= bound, f"step {i}: cpp bf16 {a} vs fp32 {g} (bound {bound:.3g})"

