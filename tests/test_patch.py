"""fastft.patch on transformers models: attention through AttentionInterface + mask function, quantized
linears (incl. GPT-2's transposed Conv1D), PEFT LoRA rerouting; parity with the unpatched model."""
import logging

import pytest
import torch
import transformers

import fastft.ops
from fastft.nn import QuantLinear
from fastft.patching import patch, register_attention
from fastft.quant import Int4Weight, NF4Weight
from hf_tiny import CAUSAL, TABLE, tiny_batch, tiny_config, tiny_model
from utils import ANALYTICALLY_ZERO, is_noise, rel_err


# fp32 parity: ~3x the largest fp32 noise measured on these comparisons (gradients 9e-7, logits 2.8e-7).
TOL = 3e-6


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one intra-op thread is fastest, and it keeps shared CPUs from oversubscription."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

ARCHS = sorted(TABLE)


@pytest.fixture
def attention_calls(monkeypatch):
    """Counts calls of fastft.ops.attention, so a parity test cannot pass with fastft attention unused."""
    calls = []
    orig = fastft.ops.attention

    def spy(*a, **k):
        calls.append(a[0].shape)
        return orig(*a, **k)

    monkeypatch.setattr(fastft.ops, "attention", spy)
    return calls


def _loss_and_grads(model, ids, am, labels):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, attention_mask=am, labels=labels)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), out.loss.detach(), grads


def _assert_grads_match(got, ref, tol):
    assert got.keys() == ref.keys(), sorted(set(got) ^ set(ref))
    assert len(got) > 0
    scale = max(float(g.abs().max()) for g in ref.values())
    for n in ref:
        if n.endswith(ANALYTICALLY_ZERO):  # exactly 0 in exact arithmetic: noise on both sides
            assert is_noise(got[n], scale) and is_noise(ref[n], scale), n
        elif ref[n].norm() > 0:
            assert rel_err(got[n], ref[n]) <= tol, f"{n}: rel err {rel_err(got[n], ref[n]):.2e}"


@pytest.mark.parametrize("arch", ARCHS)
def test_patched_logits_and_grads_match_unpatched(arch, attention_calls):
    """fp32: logits of real tokens (left and right padding) and every gradient within TOL relative."""
    model = tiny_model(arch)
    model.set_attn_implementation("eager")
    ids_l, am_l, _ = tiny_batch("left")
    ids, am, labels = tiny_batch("right")  # training batches: right padding, labels -100 on padding
    if arch not in CAUSAL:
        labels = labels.masked_fill(torch.rand(labels.shape, generator=torch.Generator().manual_seed(3)) > 0.5, -100)
    ref_left = model(input_ids=ids_l, attention_mask=am_l).logits.detach()
    ref_logits, ref_loss, ref_grads = _loss_and_grads(model, ids, am, labels)

    assert patch(model) is model
    assert model.config._attn_implementation == "fastft"
    from fastft.patching import RMSNORM_CLASSES, SWIGLU_MLP_CLASSES

    block = [m for m in model.modules() if type(m).__name__ in RMSNORM_CLASSES + SWIGLU_MLP_CLASSES]
    assert all(hasattr(m, "_fastft_orig_forward") for m in block)  # rerouted through fastft.ops
    assert block or arch not in ("llama", "mistral", "qwen2")
    out_left = model(input_ids=ids_l, attention_mask=am_l).logits.detach()
    assert len(attention_calls) == model.config.num_hidden_layers
    logits, loss, grads = _loss_and_grads(model, ids, am, labels)

    assert rel_err(out_left[am_l.bool()], ref_left[am_l.bool()]) <= TOL
    assert rel_err(logits[am.bool()], ref_logits[am.bool()]) <= TOL
    assert abs(loss.item() - ref_loss.item()) <= TOL * abs(ref_loss.item())
    _assert_grads_match(grads, ref_grads, TOL)


def _dequantized_reference(model, quantization):
    """The unpatched model with every linear weight replaced by its quantize-dequantize round trip."""
    out_emb = model.get_output_embeddings()
    for m in model.modules():
        is_conv1d = type(m).__name__ == "Conv1D"
        if (isinstance(m, torch.nn.Linear) or is_conv1d) and m is not out_emb:
            w = m.weight.detach().t() if is_conv1d else m.weight.detach()
            q = NF4Weight.from_float(w) if quantization == "nf4" else Int4Weight.from_float(w, group_size=32)
            deq = q.dequantize(torch.float32)
            with torch.no_grad():
                m.weight.copy_(deq.t() if is_conv1d else deq)
    return model


@pytest.mark.parametrize("arch,quantization", [("llama", "nf4"), ("gpt2", "nf4"), ("phi3", "nf4"), ("bert", "nf4"),
                                               ("gpt2", "int4"), ("qwen2", "int4")])
def test_patched_quantized_matches_dequantized_reference(arch, quantization, attention_calls):
    """Quantized patching equals the original model run on the dequantized weights (GPT-2's Conv1D
    weight is stored (in, out): quantizing it untransposed would fail this)."""
    ids, am, labels = tiny_batch("right")
    ref_model = _dequantized_reference(tiny_model(arch), quantization)
    ref_model.set_attn_implementation("eager")
    ref_logits, _, ref_grads = _loss_and_grads(ref_model, ids, am, labels)

    model = patch(tiny_model(arch), quantization=quantization, group_size=32)
    linears = [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, transformers.Conv1D))]
    quant = [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    assert quant and linears == [n for n, m in model.named_modules() if m is model.get_output_embeddings()]
    logits, _, grads = _loss_and_grads(model, ids, am, labels)
    assert rel_err(logits[am.bool()], ref_logits[am.bool()]) <= TOL
    # Quantized weights and their (frozen) biases get no gradient; everything else matches.
    ref_grads = {n: g for n, g in ref_grads.items() if n in grads}
    _assert_grads_match(grads, ref_grads, TOL)


class ScaledLinear(torch.nn.Module):
    """A linear layer of a type fastft does not know."""

    def __init__(self, linear):
        super().__init__()
        self.weight = torch.nn.Parameter(linear.weight.detach().clone())
        self.scale = 0.5

    def forward(self, x):
        return torch.nn.functional.linear(x, self.weight) * self.scale


def test_unsupported_module_left_alone_with_one_log_line(caplog):
    model = tiny_model("llama")
    for layer in model.model.layers:
        layer.mlp.down_proj = ScaledLinear(layer.mlp.down_proj)
    custom = [layer.mlp.down_proj for layer in model.model.layers]
    ids, am, labels = tiny_batch("right")
    ref = _dequantized_reference(tiny_model("llama"), "nf4")
    for layer, c in zip(ref.model.layers, custom):
        layer.mlp.down_proj = ScaledLinear(torch.nn.Linear(1, 1))
        layer.mlp.down_proj.weight = torch.nn.Parameter(c.weight.detach().clone())
    ref.set_attn_implementation("eager")
    ref_logits = ref(input_ids=ids, attention_mask=am).logits

    with caplog.at_level(logging.INFO, logger="fastft"):
        patch(model, quantization="nf4")
    lines = [r.getMessage() for r in caplog.records if "unchanged" in r.getMessage()]
    assert len(lines) == 1 and "ScaledLinear" in lines[0], lines
    assert [layer.mlp.down_proj for layer in model.model.layers] == custom
    assert isinstance(model.model.layers[0].mlp.up_proj, QuantLinear)
    logits = model(input_ids=ids, attention_mask=am).logits
    assert rel_err(logits[am.bool()], ref_logits[am.bool()]) <= TOL


def test_softcapped_attention_left_to_transformers(caplog):
    """Gemma-2 style logit softcapping is not in fastft's kernel: attention stays as it was, one log line."""
    cfg = transformers.Gemma2Config(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                    attn_logit_softcapping=50.0, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.Gemma2ForCausalLM(cfg).eval()
    model.set_attn_implementation("eager")
    ids, am, _ = tiny_batch("right")
    ref = model(input_ids=ids, attention_mask=am).logits
    with caplog.at_level(logging.INFO, logger="fastft"):
        patch(model)
    assert model.config._attn_implementation == "eager"
    assert sum("attention left unchanged" in r.getMessage() and "softcapping" in r.getMessage()
               for r in caplog.records) == 1
    assert torch.equal(model(input_ids=ids, attention_mask=am).logits, ref)


def test_patched_generate_matches_eager_greedy():
    model = tiny_model("llama")
    ids, am, _ = tiny_batch("left")
    model.set_attn_implementation("eager")
    ref = model.generate(input_ids=ids, attention_mask=am, max_new_tokens=6, do_sample=False, pad_token_id=0)
    patch(model)
    out = model.generate(input_ids=ids, attention_mask=am, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(out, ref)


def test_attn_implementation_name_in_from_config():
    register_attention()
    model = transformers.AutoModelForCausalLM.from_config(tiny_config("llama"), attn_implementation="fastft")
    assert model.config._attn_implementation == "fastft"
    ids = torch.randint(0, 50, (2, 5))
    ref = model(input_ids=ids).logits
    model.set_attn_implementation("eager")
    assert rel_err(model(input_ids=ids).logits, ref) <= 1e-5


def test_patch_rejects_unknown_quantization():
    with pytest.raises(ValueError, match="quantization"):
        patch(tiny_model("llama"), quantization="nf3")


def test_fastft_patch_is_callable_from_package():
    import fastft

    model = tiny_model("llama")
    assert fastft.patch(model) is model
    assert model.config._attn_implementation == "fastft"


def test_patched_attention_under_bf16_autocast():
    """Under autocast rotary leaves q/k in fp32 while v is bf16: fastft attention runs in the autocast
    dtype like eager's matmuls, and its error against the fp32 model is within 2x eager's own."""
    model = tiny_model("llama")
    model.set_attn_implementation("eager")
    ids, am, _ = tiny_batch("right")
    keep = am.bool()
    with torch.no_grad():
        gold = model(input_ids=ids, attention_mask=am).logits[keep]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            eager = model(input_ids=ids, attention_mask=am).logits[keep].float()
            patch(model)
            ours = model(input_ids=ids, attention_mask=am).logits[keep].float()
    assert rel_err(ours, gold) <= 2 * rel_err(eager, gold) + 1e-6


@pytest.mark.parametrize("case", ["packed", "sliding_window"])
def test_masks_beyond_causal_and_padding_stay_exact(case, caplog, monkeypatch):
    """Packed rows (position_ids restarting, no attention_mask) and a sliding window shorter than the
    sequence keep their structure instead of silently attending across documents or beyond the
    window: packed rows run fastft's varlen kernel, the window goes through SDPA (said once)."""
    if case == "packed":
        model = tiny_model("llama")
        ids = torch.randint(3, 101, (1, 11), generator=torch.Generator().manual_seed(2))
        # use_cache=False (training): transformers detects the packing from position_ids
        kw = dict(input_ids=ids, position_ids=torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5]]), use_cache=False)
        keep = torch.ones(1, 11, dtype=torch.bool)
    else:
        model = tiny_model("mistral", sliding_window=4)
        ids, am, _ = tiny_batch("right")
        kw = dict(input_ids=ids, attention_mask=am)
        keep = am.bool()
    model.set_attn_implementation("eager")
    ref = model(**kw).logits
    # What dropping the extra structure would give: no document boundaries / no window.
    if case == "packed":
        plain = model(**{**kw, "use_cache": True}).logits  # same positions, packing not detected
    else:
        model.config.sliding_window = None
        plain = model(**kw).logits
        model.config.sliding_window = 4
    assert rel_err(plain[keep], ref[keep]) > 1e-3
    varlen_calls = []
    orig_varlen = fastft.ops.attention_varlen
    monkeypatch.setattr(fastft.ops, "attention_varlen", lambda *a, **k: varlen_calls.append(1) or orig_varlen(*a, **k))
    fastft.patching._logged_fallback.clear()
    with caplog.at_level(logging.INFO, logger="fastft"):
        patch(model)
        out = model(**kw).logits
    assert rel_err(out[keep], ref[keep]) <= 1e-5
    sdpa_logs = sum("through torch SDPA" in r.getMessage() for r in caplog.records)
    if case == "packed":  # documents found from position_ids: fastft's varlen kernel runs
        assert len(varlen_calls) == model.config.num_hidden_layers and sdpa_logs == 0
    else:  # a window fastft's kernels lack: the full mask through SDPA, said once
        assert not varlen_calls and sdpa_logs == 1
    # Within the window / a single document, the same models run fastft's kernel with no full mask.
    assert rel_err(model(input_ids=kw["input_ids"][:, :4]).logits, ref[:, :4]) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["mean", "num_items", "shift_labels"])
def test_causal_lm_loss_matches_transformers(dtype, mode):
    """fastft.ops.loss.hf_causal_lm_loss against float64 gold, within 2x the error of transformers' own
    ForCausalLMLoss in the same dtype (loss and logits gradient); odd vocab, ignored targets."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    from fastft.ops.loss import hf_causal_lm_loss as causal_lm_loss
    from utils import assert_close_to_gold

    g = torch.Generator().manual_seed(7)
    B, T, V = 3, 11, 203
    logits = (torch.randn(B, T, V, generator=g, dtype=torch.float64) * 3)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :4] = -100
    kw = {}
    if mode == "num_items":
        kw["num_items_in_batch"] = torch.tensor(17)
    if mode == "shift_labels":
        kw["shift_labels"] = torch.roll(labels, -1, 1)

    def run(fn, dt):
        z = logits.detach().to(dt).clone().requires_grad_(True)
        loss = fn(z, labels, V, **kw)
        loss.backward()
        return loss.detach(), z.grad

    gold = run(ForCausalLMLoss, torch.float64)
    hf = run(ForCausalLMLoss, dtype)
    ours = run(causal_lm_loss, dtype)
    assert ours[1].dtype == dtype
    for name, o, gd, h in zip(["loss", "dlogits"], ours, gold, hf):
        assert_close_to_gold(o.float(), gd, h.float(), name=name)


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_patch_installs_the_loss_on_causal_lms_only(arch):
    from fastft.ops.loss import hf_causal_lm_loss as causal_lm_loss

    model = tiny_model(arch)
    patch(model)
    if arch in CAUSAL:
        assert model.loss_function is causal_lm_loss
    else:
        assert model.loss_function is not causal_lm_loss
    model2 = tiny_model(arch)
    patch(model2, loss=False)
    assert model2.loss_function is not causal_lm_loss


def test_patch_reroutes_plain_linears_through_frozen_linear():
    """The LM head (a plain nn.Linear) takes fastft's frozen-linear node while its weight is frozen,
    and autograd's own F.linear (weight gradient included) once it trains -- decided per call."""
    model = tiny_model("llama")
    patch(model)
    head = model.get_output_embeddings()
    assert hasattr(head, "_fastft_orig_forward")
    h = torch.randn(2, 3, head.in_features, requires_grad=True)
    head.weight.requires_grad_(False)
    out = head(h)
    assert type(out.grad_fn).__name__ == "FrozenLinearFunctionBackward"
    torch.testing.assert_close(out, torch.nn.functional.linear(h, head.weight, head.bias), rtol=1e-5, atol=1e-5)
    head.weight.requires_grad_(True)
    head(h).sum().backward()
    assert head.weight.grad is not None


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_training_forward_with_labels_never_builds_logits(arch):
    """model.train() + labels: the patched forward takes fastft.ops.linear_cross_entropy on the
    backbone's hidden states; no (B, T, V) logits are built (.logits is None and no vocab-wide
    tensor is saved for backward), and loss and every gradient equal the unpatched model's within
    fp32 noise -- with and without num_items_in_batch. Eval mode keeps the logits."""
    import fastft

    ids, am, labels = tiny_batch("right")
    ref = tiny_model(arch).train()
    ref.set_attn_implementation("eager")
    model = tiny_model(arch).train()
    patch(model)
    assert hasattr(model, "_fastft_orig_forward")
    for kw in ({}, {"num_items_in_batch": torch.tensor(17)}):
        ref.zero_grad(set_to_none=True)
        model.zero_grad(set_to_none=True)
        r = ref(input_ids=ids, attention_mask=am, labels=labels, **kw)
        r.loss.backward()
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
            o = model(input_ids=ids, attention_mask=am, labels=labels, **kw)
        assert o.logits is None
        assert all(s[-1:] != (model.config.vocab_size,) for s in saved)
        o.loss.backward()
        assert abs(o.loss.item() - r.loss.item()) <= 1e-5 * abs(r.loss.item())
        got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        want = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}
        _assert_grads_match(got, want, 1e-5)
    model.eval()
    assert model(input_ids=ids, attention_mask=am, labels=labels).logits.shape[-1] == model.config.vocab_size
    # LoRA on a patched model: the fused forward runs under the PEFT wrapper, the adapter gets gradients.
    peft_model = fastft.get_peft_model(model, fastft.LoraConfig(r=4, target_modules="all-linear")).train()
    out = peft_model(input_ids=ids, attention_mask=am, labels=labels)
    assert out.logits is None
    out.loss.backward()
    assert all(p.grad is not None for n, p in peft_model.named_parameters() if p.requires_grad)


def test_fused_forward_left_out_where_logits_are_modified():
    """Classes outside FUSED_LOSS_CLASSES (Gemma's scaled / soft-capped logits, GPT-2) keep their own forward."""
    for arch in ("gemma", "gpt2"):
        model = tiny_model(arch).train()
        patch(model)
        assert not hasattr(model, "_fastft_orig_forward")
        ids, am, labels = tiny_batch("right")
        assert model(input_ids=ids, attention_mask=am, labels=labels).logits is not None


def test_bert_layer_norms_and_gelu_rerouted_to_fastft_ops(attention_calls, monkeypatch):
    """HF BERT's LayerNorms and its erf GELU activations run through fastft.ops.layer_norm / gelu
    (the Triton kernels on CUDA) after patching, with unchanged outputs (the CPU reference is torch's)."""
    model = tiny_model("bert")
    ids, am, _ = tiny_batch("right")
    ref = model(input_ids=ids, attention_mask=am).logits.detach()
    patch(model)
    norms = [m for m in model.modules() if type(m) is torch.nn.LayerNorm]
    acts = [m for m in model.modules() if type(m).__name__ == "GELUActivation"]
    assert norms and acts and all(hasattr(m, "_fastft_orig_forward") for m in norms + acts)
    from fastft.ops import dispatch

    seen = []
    for op in ("layer_norm", "gelu"):
        fn = dispatch.impl(op, "reference")
        monkeypatch.setitem(dispatch._IMPLS["reference"], op,
                            lambda *a, _fn=fn, _op=op, **k: seen.append(_op) or _fn(*a, **k))
    out = model(input_ids=ids, attention_mask=am).logits.detach()
    assert seen.count("layer_norm") == len(norms) and seen.count("gelu") == len(acts)
    assert rel_err(out[am.bool()], ref[am.bool()]) <= 1e-6
