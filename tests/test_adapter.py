"""Bottleneck adapters: identity at init, placement per architecture, trainability, files.

The oracle for placement is a hand-written forward hook: adding u = s·up(act(down(h))) to the
output h of exactly the named linears of an unmodified twin model must reproduce the adapted
model's logits, which pins both the sites and the formula.
"""
import copy
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from transformers import BertConfig, BertForMaskedLM, LlamaConfig, LlamaForCausalLM

import fastft
from fastft.nn import BottleneckAdapter
from fastft.nn.adapter import LinearWithAdapter
from fastft.peft_io import CONFIG_NAME, WEIGHTS_NAME
from utils import rel_err

TOL = 1e-5


def tiny_model(arch: str) -> nn.Module:
    torch.manual_seed(0)
    if arch == "llama":
        cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                          tie_word_embeddings=False)
        return LlamaForCausalLM(cfg).eval()
    cfg = BertConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=64)
    return BertForMaskedLM(cfg).eval()


def inputs():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(4, 64, (2, 6), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def logits(model, data):
    with torch.no_grad():
        return model(**data).logits


@torch.no_grad()
def randomise(model):
    for p in model.parameters():
        if p.requires_grad:
            p.add_(0.3 * torch.randn_like(p))


SITES = {
    ("llama", "attention"): [f"model.layers.{i}.self_attn.o_proj" for i in range(2)],
    ("llama", "mlp"): [f"model.layers.{i}.mlp.down_proj" for i in range(2)],
    ("bert", "attention"): [f"bert.encoder.layer.{i}.attention.output.dense" for i in range(2)],
    ("bert", "mlp"): [f"bert.encoder.layer.{i}.output.dense" for i in range(2)],
}


@pytest.mark.parametrize("arch", ["llama", "bert"])
@pytest.mark.parametrize("placement", ["attention", "mlp", "both"])
def test_placement_identity_and_formula(arch, placement):
    base = tiny_model(arch)
    cfg = fastft.AdapterConfig(bottleneck_size=8, placement=placement, non_linearity="gelu", scaling=0.5)
    pm = fastft.get_peft_model(copy.deepcopy(base), cfg)
    sites = [s for p in (["attention", "mlp"] if placement == "both" else [placement]) for s in SITES[(arch, p)]]
    assert sorted(pm.adapter_layers()) == sorted(sites)

    data = inputs()
    assert torch.equal(logits(pm, data), logits(base, data))  # up-projection is zero: exact identity

    randomise(pm)
    ours = logits(pm, data)
    assert rel_err(ours, logits(base, data)) > 1e-2
    # Oracle: hooks on the untouched twin add s·up(gelu(down(h))) to the same linears' outputs.
    twin = copy.deepcopy(base)
    for path, wrapped in pm.adapter_layers().items():
        a = wrapped.adapter
        W1, b1, W2, b2 = (t.detach() for t in (a.down.weight, a.down.bias, a.up.weight, a.up.bias))
        twin.get_submodule(path).register_forward_hook(
            lambda m, i, h, W1=W1, b1=b1, W2=W2, b2=b2: h + 0.5 * F.linear(F.gelu(F.linear(h, W1, b1)), W2, b2))
    assert rel_err(logits(twin, data), ours) <= TOL


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_only_adapters_train(arch):
    model = tiny_model(arch)
    d, b = 32, 16
    pm = fastft.get_peft_model(model, fastft.AdapterConfig(bottleneck_size=b))
    trainable = {n: p.numel() for n, p in pm.named_parameters() if p.requires_grad}
    assert all(".adapter." in n for n in trainable)
    n_sites = 4  # 2 layers x (attention + mlp)
    assert sum(trainable.values()) == n_sites * (d * b + b + b * d + d)
    assert pm.get_nb_trainable_parameters() == (sum(trainable.values()), sum(p.numel() for p in pm.parameters()))
    randomise(pm)
    pm.train()
    out = pm(**inputs(), labels=inputs()["input_ids"])
    out.loss.backward()
    for n, p in pm.named_parameters():
        assert (p.grad is not None) == (".adapter." in n), n


def test_adapter_dropout_and_dtype():
    torch.manual_seed(0)
    a = BottleneckAdapter(16, 4, "relu", scaling=1.0, dropout=0.5, dtype=torch.bfloat16)
    assert a.down.weight.dtype == torch.float32  # fp32 adapter over a half model
    with torch.no_grad():
        a.up.weight.normal_()
    h = torch.randn(8, 16, dtype=torch.bfloat16)
    a.eval()
    y1, y2 = a(h), a(h)
    assert y1.dtype == torch.bfloat16 and torch.equal(y1, y2)
    a.train()
    assert not torch.equal(a(h), a(h))


def test_save_load_round_trip(tmp_path):
    base = tiny_model("bert")
    cfg = fastft.AdapterConfig(bottleneck_size=4, placement="both", non_linearity="silu", scaling=2.0,
                               modules_to_save=["decoder"])
    pm = fastft.get_peft_model(copy.deepcopy(base), cfg)
    randomise(pm)
    data = inputs()
    ours = logits(pm, data)
    pm.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert saved["peft_type"] == "BOTTLENECK" and saved["format_version"] == 1
    assert saved["adapter_modules"] == sorted(SITES[("bert", "attention")] + SITES[("bert", "mlp")])
    keys = set(load_file(tmp_path / WEIGHTS_NAME))
    expected = {f"base_model.model.{p}.adapter.{n}.{t}" for p in saved["adapter_modules"]
                for n in ("down", "up") for t in ("weight", "bias")}
    expected |= {"base_model.model.cls.predictions.decoder.weight", "base_model.model.cls.predictions.decoder.bias"}
    assert keys == expected
    loaded = fastft.load_adapter(copy.deepcopy(base), tmp_path)
    assert isinstance(loaded.adapter_config, fastft.AdapterConfig)
    assert (loaded.adapter_config.non_linearity, loaded.adapter_config.scaling) == ("silu", 2.0)
    assert torch.equal(logits(loaded, data), ours)


def test_unload_and_no_merge():
    base = tiny_model("llama")
    pm = fastft.get_peft_model(copy.deepcopy(base), fastft.AdapterConfig(bottleneck_size=4))
    randomise(pm)
    with pytest.raises(ValueError, match="cannot be merged"):
        pm.merge_and_unload()
    assert len(pm.adapter_layers()) == 4  # the failed merge changed nothing
    plain = pm.unload()
    assert not any(isinstance(m, LinearWithAdapter) for m in plain.modules())
    assert torch.equal(logits(plain, inputs()), logits(base, inputs()))


def test_custom_site_table():
    model = tiny_model("llama")
    cfg = fastft.AdapterConfig(bottleneck_size=4, placement="mlp", target_modules={"mlp": r".*\.mlp\.up_proj"})
    pm = fastft.get_peft_model(model, cfg)
    assert sorted(pm.adapter_layers()) == [f"model.layers.{i}.mlp.up_proj" for i in range(2)]
    assert pm.adapter_layers()["model.layers.0.mlp.up_proj"].adapter.hidden_size == 48


@pytest.mark.parametrize("kw,msg", [
    (dict(bottleneck_size=0), "bottleneck_size must be a positive integer"),
    (dict(placement="ffn"), "placement must be"),
    (dict(non_linearity="softplus"), "non_linearity must be one of"),
    (dict(dropout=1.0), r"dropout must be in \[0, 1\)"),
    (dict(target_modules={"mlp": "("}), "not a valid regex"),
    (dict(target_modules={"ffn": ".*"}), "keys 'attention' and/or 'mlp'"),
])
def test_config_errors(kw, msg):
    with pytest.raises(ValueError, match=msg):
        fastft.AdapterConfig(**kw)


def test_site_errors_leave_model_untouched():
    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4)

    with pytest.raises(ValueError, match="no bottleneck adapter site table for model type None"):
        fastft.get_peft_model(Tiny(), fastft.AdapterConfig())
    model = tiny_model("llama")
    cfg = fastft.AdapterConfig(placement="both", target_modules={"attention": r".*o_proj", "mlp": r".*nothing"})
    with pytest.raises(ValueError, match=r"sites \['mlp'\].*match no module"):
        fastft.get_peft_model(model, cfg)
    assert not any(isinstance(m, LinearWithAdapter) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())
    cfg = fastft.AdapterConfig(placement="attention", target_modules={"attention": r".*self_attn"})
    with pytest.raises(ValueError, match="LlamaAttention, expected a linear"):
        fastft.get_peft_model(model, cfg)
    cfg = fastft.AdapterConfig(target_modules={"attention": r".*o_proj", "mlp": r".*_proj"})
    with pytest.raises(ValueError, match="match both"):
        fastft.get_peft_model(model, cfg)
    with pytest.raises(ValueError, match="inside modules_to_save"):
        fastft.get_peft_model(model, fastft.AdapterConfig(modules_to_save=["mlp"]))
    assert not any(isinstance(m, LinearWithAdapter) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())



@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_native_models_same_sites_and_logits(tmp_path, arch):
    """The site table finds the same layers in a native model, and the adapted models agree."""
    from models_util import save_tiny_checkpoint
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    ckpt = save_tiny_checkpoint(tmp_path, arch)
    auto = AutoModelForCausalLM if arch == "llama" else AutoModelForMaskedLM
    cfg = fastft.AdapterConfig(bottleneck_size=4)
    pm_hf = fastft.get_peft_model(auto.from_pretrained(ckpt).eval(), cfg)
    pm = fastft.get_peft_model(fastft.from_pretrained(ckpt).eval(), cfg)
    assert sorted(pm.adapter_layers()) == sorted(pm_hf.adapter_layers())
    randomise(pm_hf)
    pm_hf.save_pretrained(tmp_path / "adapter")
    loaded = fastft.load_adapter(fastft.from_pretrained(ckpt).eval(), tmp_path / "adapter")
    ids = torch.randint(4, 64, (2, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert rel_err(loaded(input_ids=ids).logits, pm_hf(input_ids=ids).logits) <= TOL
