"""fastft LoRA vs PEFT on tiny transformers models: same trainable set, same logits, same gradients.

PEFT (the installed ``peft`` package) is the oracle: both libraries adapt identical copies of a
tiny random Llama / BERT with the same config; PEFT's LoRA weights are randomised (B is zero at
init, which would hide any mistake in the B path or in the scaling) and copied into fastft's, then
logits and every gradient must agree to fp32 round-off. The LoRA layer's own contract (init,
dropout placement, eval determinism) and config validation are tested directly.
"""
import importlib
import copy
import math

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertForMaskedLM, LlamaConfig, LlamaForCausalLM

import fastft
from fastft.nn import LoraLinear
from fastft.ops import cpu_gemm
from utils import ANALYTICALLY_ZERO, assert_close_to_gold, is_noise, rel_err

peft = importlib.import_module("peft")
TOL = 1e-5  # fp32, same operations in the same order up to summation order


def tiny_model(arch: str, **kw) -> nn.Module:
    if arch == "llama":
        cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                          tie_word_embeddings=False, attention_bias=True, **kw)
        return LlamaForCausalLM(cfg).eval()
    cfg = BertConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=64, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0, **kw)
    return BertForMaskedLM(cfg).eval()


def batch(arch: str, B: int = 2, T: int = 7):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(4, 64, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, -2:] = 0  # right padding on one row
    if arch == "llama":
        labels = ids.masked_fill(mask == 0, -100)
    else:
        labels = torch.full_like(ids, -100)
        labels[:, 1::3] = ids[:, 1::3]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def peft_name(n: str) -> str:
    """PEFT's parameter name with its adapter-name segment removed (fastft has a single adapter)."""
    return n.replace(".default.", ".")


@torch.no_grad()
def randomise_and_copy(pm_ref, pm) -> None:
    """Perturb PEFT's trainable tensors, then copy them into fastft's same-named parameters."""
    ours = dict(pm.named_parameters())
    for n, p in pm_ref.named_parameters():
        if p.requires_grad:
            p.add_(0.2 * torch.randn_like(p))
            ours[peft_name(n)].copy_(p)


def make_pair(arch, r=4, lora_alpha=8, **kw):
    base = tiny_model(arch)
    ref = copy.deepcopy(base)
    pm_ref = peft.get_peft_model(ref, peft.LoraConfig(r=r, lora_alpha=lora_alpha, **kw))
    pm = fastft.get_peft_model(base, fastft.LoraConfig(r=r, lora_alpha=lora_alpha, **kw))
    return pm_ref, pm


PARITY_CASES = [
    ("llama", dict(target_modules=["q_proj", "v_proj"])),
    ("llama", dict(target_modules="all-linear", use_rslora=True, modules_to_save=["lm_head"])),
    ("llama", dict(target_modules=r".*\.(q|k|v|o)_proj", bias="all", lora_dropout=0.1)),
    ("bert", dict(target_modules=["query", "value"], bias="lora_only")),
    ("bert", dict(target_modules="all-linear", bias="all", r=3, lora_alpha=5)),
    ("bert", dict(target_modules=["query", "key", "dense"], modules_to_save=["decoder"], use_rslora=True)),
]


@pytest.mark.parametrize("arch,kw", PARITY_CASES, ids=[f"{a}-{i}" for i, (a, _) in enumerate(PARITY_CASES)])
def test_parity_with_peft(arch, kw):
    kw = dict(kw)
    pm_ref, pm = make_pair(arch, r=kw.pop("r", 4), lora_alpha=kw.pop("lora_alpha", 8), **kw)

    # Same trainable parameters, by name and count, and the same expansion of "all-linear".
    ref_trainable = {peft_name(n): p.numel() for n, p in pm_ref.named_parameters() if p.requires_grad}
    trainable = {n: p.numel() for n, p in pm.named_parameters() if p.requires_grad}
    assert trainable == ref_trainable
    assert pm.get_nb_trainable_parameters() == pm_ref.get_nb_trainable_parameters()
    ref_tm, tm = pm_ref.peft_config["default"].target_modules, pm.adapter_config.target_modules
    assert tm == ref_tm if isinstance(ref_tm, str) else set(tm) == set(ref_tm)
    n_lora = sum(isinstance(m, LoraLinear) for m in pm.modules())
    n_lora_ref = sum(type(m).__name__ == "Linear" and hasattr(m, "lora_A") for m in pm_ref.modules())
    assert n_lora == n_lora_ref > 0

    pm_ref.eval()  # PEFT leaves its new dropout modules in training mode
    assert not pm.training and not any(m.training for m in pm.modules())  # fastft keeps the model's mode
    data = batch(arch)
    with torch.no_grad():
        before = pm(**data).logits
    randomise_and_copy(pm_ref, pm)

    out_ref, out = pm_ref(**data), pm(**data)
    # The perturbed adapter must change the model, or the comparison below proves nothing.
    assert rel_err(out.logits, before) > 1e-2
    assert rel_err(out.logits, out_ref.logits) <= TOL
    out_ref.loss.backward()
    out.loss.backward()
    ref_params = {peft_name(n): p for n, p in pm_ref.named_parameters()}
    scale = max(float(q.grad.abs().max()) for q in ref_params.values() if q.grad is not None)
    for n, p in pm.named_parameters():
        q = ref_params[n]
        if not p.requires_grad:
            assert p.grad is None and q.grad is None, n
            continue
        assert p.grad is not None and q.grad is not None, n
        if n.endswith(ANALYTICALLY_ZERO):  # exactly 0 in exact arithmetic: noise on both sides
            assert is_noise(p.grad, scale) and is_noise(q.grad, scale), n
            continue
        assert p.grad.abs().max() > 0, f"{n}: zero gradient"
        assert rel_err(p.grad, q.grad) <= TOL, f"{n}: grad rel err {rel_err(p.grad, q.grad):.2e}"


def test_accepts_peft_config_and_scaling():
    model = tiny_model("llama")
    cfg = peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "k_proj"], use_rslora=True,
                          lora_dropout=0.05, task_type="CAUSAL_LM")
    pm = fastft.get_peft_model(model, cfg)
    layers = pm.lora_layers()
    assert sorted(layers) == [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("k_proj", "q_proj")]
    assert all(m.scaling == 16 / math.sqrt(4) and m.lora_dropout == 0.05 for m in layers.values())
    assert pm.adapter_config.task_type == "CAUSAL_LM"
    pm2 = fastft.get_peft_model(tiny_model("llama"), fastft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj"]))
    assert all(m.scaling == 4.0 for m in pm2.lora_layers().values())


def test_default_targets_are_peft_defaults():
    pm = fastft.get_peft_model(tiny_model("bert"), fastft.LoraConfig())
    assert sorted({n.rsplit(".", 1)[1] for n in pm.lora_layers()}) == ["query", "value"]


def test_peft_features_not_implemented_raise():
    with pytest.raises(ValueError, match="use_dora"):
        fastft.get_peft_model(tiny_model("llama"), peft.LoraConfig(target_modules=["q_proj"], use_dora=True))
    with pytest.raises(ValueError, match="rank_pattern"):
        fastft.get_peft_model(tiny_model("llama"),
                              peft.LoraConfig(target_modules=["q_proj"], rank_pattern={"q_proj": 2}))


def test_init_statistics():
    torch.manual_seed(0)
    base = nn.Linear(256, 96)
    layer = LoraLinear(base, r=16, lora_alpha=32)
    A, B = layer.lora_A.weight, layer.lora_B.weight
    assert A.shape == (16, 256) and B.shape == (96, 16)
    assert torch.count_nonzero(B) == 0
    # kaiming_uniform(a=√5): U(-b, b), b = gain·√3/√fan_in, gain = √(2/(1+5)) -> b = 1/√fan_in.
    bound = 1 / math.sqrt(256)
    assert A.abs().max() <= bound
    assert A.abs().max() > 0.99 * bound  # 4096 draws: the max sits near the bound
    assert abs(A.mean().item()) < 0.05 * bound
    assert abs(A.var().item() / (bound**2 / 3) - 1) < 0.1
    assert layer.scaling == 2.0
    assert not base.weight.requires_grad and not base.bias.requires_grad
    assert A.requires_grad and B.requires_grad
    # Identity at init: B = 0 adds exactly nothing to the base GEMM (fastft's own fp32 CPU GEMM,
    # cpu_gemm.linear, which itself is within 2x of torch's fp32 error of the float64 base).
    x = torch.randn(5, 256)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), cpu_gemm.linear(x, base.weight, base.bias), rtol=0, atol=0)
    assert_close_to_gold(layer(x).detach(), copy.deepcopy(base).double()(x.double()), base(x).detach())
    g = LoraLinear(nn.Linear(256, 96), r=16, lora_alpha=16, init_lora_weights="gaussian")
    assert abs(g.lora_A.weight.std().item() * 16 - 1) < 0.05 and torch.count_nonzero(g.lora_B.weight) == 0


def test_dropout_on_lora_input_only():
    torch.manual_seed(0)
    base = nn.Linear(16, 16)
    layer = LoraLinear(base, r=16, lora_alpha=16, lora_dropout=0.5)  # scaling 1
    with torch.no_grad():
        layer.lora_A.weight.copy_(torch.eye(16))
        layer.lora_B.weight.copy_(torch.eye(16))
    x = torch.randn(64, 16) + 3.0  # no zeros in x
    base_out = base(x)
    layer.train()
    d = (layer(x) - base_out).detach()
    # With A = B = I the LoRA branch returns drop(x): each entry is 0 or x/(1-p). Any dropout on the
    # base path would leave other values.
    dropped = d.abs() < 1e-5
    torch.testing.assert_close(d[~dropped], 2 * x[~dropped], rtol=1e-5, atol=1e-5)
    frac = dropped.float().mean().item()
    assert 0.4 < frac < 0.6, frac
    d2 = (layer(x) - base_out).detach()
    assert not torch.equal(d, d2)  # fresh masks per call in training
    layer.eval()
    y1, y2 = layer(x), layer(x)
    assert torch.equal(y1, y2)
    torch.testing.assert_close(y1, base_out + x, rtol=1e-6, atol=1e-5)


def test_training_mode_dropout_matches_peft(monkeypatch):
    """Same seed, same masks: fastft draws LoRA dropout exactly where PEFT does (reference backend,
    whose dropout is torch's). Llama has no other dropout, so the LoRA layers are the only RNG users."""
    monkeypatch.setenv("FASTFT_BACKEND", "reference")
    pm_ref, pm = make_pair("llama", target_modules="all-linear", lora_dropout=0.3)
    randomise_and_copy(pm_ref, pm)
    pm_ref.train()
    pm.train()
    data = batch("llama")
    torch.manual_seed(5)
    out_ref = pm_ref(**data)
    torch.manual_seed(5)
    out = pm(**data)
    torch.manual_seed(6)
    other = pm(**data)
    assert rel_err(other.logits, out.logits) > 1e-3  # dropout is active
    assert rel_err(out.logits, out_ref.logits) <= TOL
    out_ref.loss.backward()
    out.loss.backward()
    ref_params = {peft_name(n): p for n, p in pm_ref.named_parameters()}
    for n, p in pm.named_parameters():
        if p.requires_grad:
            assert rel_err(p.grad, ref_params[n].grad) <= TOL, n


def test_gradient_checkpointing_matches():
    data = batch("llama")
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        pm = fastft.get_peft_model(tiny_model("llama"), fastft.LoraConfig(r=4, target_modules="all-linear",
                                                                          init_lora_weights=False))
        pm.train()
        if ckpt:
            pm.gradient_checkpointing_enable()
            assert any(getattr(m, "gradient_checkpointing", False) for m in pm.modules())
        pm(**data).loss.backward()
        grads.append({n: p.grad for n, p in pm.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        assert rel_err(grads[1][n], grads[0][n]) <= TOL, n


def test_half_precision_base_keeps_fp32_adapters():
    model = tiny_model("llama").to(torch.bfloat16)
    pm = fastft.get_peft_model(model, fastft.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    pm.train()
    out = pm(**batch("llama"))
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.loss)
    out.loss.backward()
    for n, p in pm.named_parameters():
        if p.requires_grad:
            assert p.dtype == torch.float32 and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all(), n
            assert p.grad.abs().max() > 0, n


def test_wrapper_delegates_and_counts(capsys):
    model = tiny_model("llama")
    pm = fastft.get_peft_model(model, fastft.LoraConfig(r=2, target_modules=["o_proj"]))
    assert pm.base_model.model is model and pm.get_base_model() is model
    assert pm.config is model.config
    assert pm.get_input_embeddings() is model.get_input_embeddings()
    trainable, total = pm.get_nb_trainable_parameters()
    assert trainable == 2 * (2 * 32 + 2 * 32)  # two layers, A (2, 32) + B (32, 2)
    assert total == sum(p.numel() for p in model.parameters())
    pm.print_trainable_parameters()
    assert f"trainable params: {trainable:,d} || all params: {total:,d}" in capsys.readouterr().out
    ids = batch("llama")["input_ids"][:1, :3]
    out = pm.generate(ids, max_new_tokens=2, do_sample=False)
    assert out.shape == (1, 5)


# ----------------------------------------------------------------------------------------------
# Config errors


@pytest.mark.parametrize("kw,msg", [
    (dict(r=0), "r must be a positive integer"),
    (dict(r=-2), "r must be a positive integer"),
    (dict(r=2.0), "r must be a positive integer"),
    (dict(lora_alpha=0), "lora_alpha must be a positive"),
    (dict(lora_alpha=-1.0), "lora_alpha must be a positive"),
    (dict(lora_dropout=1.0), r"lora_dropout must be in \[0, 1\)"),
    (dict(lora_dropout=-0.1), r"lora_dropout must be in \[0, 1\)"),
    (dict(bias="some"), "bias must be one of"),
    (dict(target_modules=[]), "target_modules must be non-empty"),
    (dict(target_modules="(unclosed"), "does not compile"),
    (dict(init_lora_weights="pissa"), "init_lora_weights"),
    (dict(task_type="CLM"), "task_type"),
])
def test_config_errors(kw, msg):
    with pytest.raises(ValueError, match=msg):
        fastft.LoraConfig(**kw)


def _untouched(model, params_before):
    assert not any(isinstance(m, LoraLinear) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())
    assert dict(model.named_parameters()).keys() == params_before


@pytest.mark.parametrize("kw,msg", [
    (dict(target_modules=["qkv_proj"]), r"matches no module.*q_proj"),
    (dict(target_modules=r"model\.nothing\..*"), r"matches no module.*down_proj"),
    (dict(target_modules=["mlp"]), "LlamaMLP.*nn.Linear"),
    (dict(target_modules=["q_proj"], modules_to_save=["classifier"]), r"modules_to_save \['classifier'\] match no"),
])
def test_bad_targets_raise_before_any_change(kw, msg):
    model = tiny_model("llama").train()
    before = dict(model.named_parameters()).keys()
    with pytest.raises(ValueError, match=msg):
        fastft.get_peft_model(model, fastft.LoraConfig(**kw))
    _untouched(model, before)


def test_double_application_raises():
    pm = fastft.get_peft_model(tiny_model("llama"), fastft.LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="already"):
        fastft.get_peft_model(pm, fastft.LoraConfig(target_modules=["k_proj"]))
    with pytest.raises(ValueError, match="already"):
        fastft.get_peft_model(pm.base_model.model, fastft.LoraConfig(target_modules=["k_proj"]))
    with pytest.raises(TypeError, match="LoraConfig"):
        fastft.get_peft_model(tiny_model("llama"), {"r": 4})
    ref = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="already carries PEFT adapter layers"):
        fastft.get_peft_model(ref, fastft.LoraConfig(target_modules="all-linear"))


# ----------------------------------------------------------------------------------------------
# QLoRA: LoRA over a quantized base


def _quantize_linears(model, quantization="nf4", **kw):
    from fastft.nn import QuantLinear

    for name, m in list(model.named_modules()):
        for cname, child in list(m.named_children()):
            full = f"{name}.{cname}" if name else cname
            if isinstance(child, nn.Linear) and full != "lm_head":
                setattr(m, cname, QuantLinear.from_linear(child, quantization=quantization, **kw))
    return model



@pytest.mark.parametrize("quantization", ["nf4", "int4"])
def test_lora_over_quantlinear(quantization):
    from fastft.nn import QuantLinear

    kw = {"group_size": 16} if quantization == "int4" else {}
    qmodel = _quantize_linears(tiny_model("llama"), quantization, **kw)
    qmodel_clean = copy.deepcopy(qmodel)
    # The dense twin holds the dequantized weights: LoRA over it is the oracle.
    dense = copy.deepcopy(qmodel)
    for name, m in list(dense.named_modules()):
        for cname, child in list(m.named_children()):
            if isinstance(child, QuantLinear):
                lin = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None)
                with torch.no_grad():
                    lin.weight.copy_(child.weight.dequantize(torch.float32))
                    if child.bias is not None:
                        lin.bias.copy_(child.bias)
                setattr(m, cname, lin)
    cfg = fastft.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)
    torch.manual_seed(3)
    pq = fastft.get_peft_model(qmodel, cfg)
    torch.manual_seed(3)
    pd = fastft.get_peft_model(dense, cfg)
    assert pq.lora_layers().keys() == pd.lora_layers().keys()
    assert all(isinstance(m.base_layer, QuantLinear) for m in pq.lora_layers().values())
    data = batch("llama")
    oq, od = pq(**data), pd(**data)
    assert rel_err(oq.logits, od.logits) <= 1e-5
    oq.loss.backward()
    od.loss.backward()
    dense_params = dict(pd.named_parameters())
    for n, p in pq.named_parameters():
        if "lora_" in n:
            assert p.grad is not None and rel_err(p.grad, dense_params[n].grad) <= 1e-5, n
        else:
            assert p.grad is None and not p.requires_grad, n
    trainable, total = pq.get_nb_trainable_parameters()
    assert (trainable, total) == pd.get_nb_trainable_parameters()
    # The adapter file is the same as over a dense base and loads onto a fresh quantized model.
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        pq.save_pretrained(d)
        fresh = copy.deepcopy(qmodel_clean)
        back = fastft.load_adapter(fresh, d)
        with torch.no_grad():
            assert rel_err(back(**data).logits, pq(**data).logits) <= 1e-6
    # Merging dequantizes: every LoRA-over-QuantLinear comes back as a dense nn.Linear (documented).
    with torch.no_grad():
        before = pq(**data).logits
    merged = pq.merge_and_unload()
    assert not any(isinstance(m, (QuantLinear, LoraLinear)) for m in merged.modules())
    with torch.no_grad():
        assert rel_err(merged(**data).logits, before) <= 1e-5
