"""fastft.from_config: native models without a checkpoint, weights seeded by tensor name, the same
tensors in a transformers model (seeded_materialize), quantization one layer at a time."""
import pytest
import torch
import transformers
from torch import nn

import fastft
from fastft.models import synthetic as fc
from fastft.models.llama import LlamaForCausalLM
from utils import rel_err

# Parameter counts of the published models (their model cards / safetensors headers).
PUBLISHED = {"llama-3.1-8b": 8_030_261_248, "llama-3.2-1b": 1_235_814_400, "llama-3.2-3b": 3_212_749_824,
             "smollm2-135m": 134_515_008}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_named_shapes_have_the_published_sizes(name):
    cfg = fc.make_config(name)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    assert model.num_parameters() == PUBLISHED[name]


def test_bad_configs_are_named():
    with pytest.raises(ValueError, match="unknown model shape 'llama-9b'.*llama-3.1-8b"):
        fastft.from_config("llama-9b")
    with pytest.raises(ValueError, match="model_type 'gpt2' is not supported"):
        fastft.from_config({"model_type": "gpt2"})
    with pytest.raises(ValueError, match="quantization must be one of"):
        fastft.from_config("tiny-llama", quantization="nf3")
    with pytest.raises(ValueError, match="group_size=96"):
        fastft.from_config("tiny-llama", quantization="int4", group_size=96)


def test_weights_depend_on_seed_and_name_only():
    a = fastft.from_config("tiny-llama", seed=3)
    b = fastft.from_config("tiny-llama", seed=3)
    c = fastft.from_config("tiny-llama", seed=4)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    name = "model.layers.1.mlp.down_proj.weight"
    assert not torch.equal(sa[name], sc[name])
    # the rule: N(0, initializer_range) by name, norms 1
    assert torch.equal(sa[name], fc.seeded_tensor(name, sa[name].shape, seed=3, std=0.02))
    assert torch.equal(sa["model.norm.weight"], torch.ones(64))
    std = float(sa["model.embed_tokens.weight"].std())
    assert 0.018 < std < 0.022
    # distinct names draw distinct values (no shared stream)
    assert not torch.equal(sa["model.layers.0.self_attn.q_proj.weight"], sa["model.layers.1.self_attn.q_proj.weight"])
    assert a.training is False and a.model.rotary_emb.inv_freq.dtype == torch.float32


def test_a_transformers_model_gets_the_same_tensors_and_logits():
    cfg = fc.make_config("tiny-llama")
    native = fastft.from_config(cfg, seed=0)
    with torch.device("meta"):
        hf = transformers.LlamaForCausalLM(cfg)
    fc.seeded_materialize(hf, cfg, seed=0)
    hs, ns = hf.state_dict(), native.state_dict()
    for k, v in ns.items():
        assert torch.equal(hs[k], v), k
    ids = torch.randint(0, cfg.vocab_size, (2, 19), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        lh = hf.eval()(input_ids=ids).logits
        ln = native(input_ids=ids).logits
    assert rel_err(ln, lh) < 1e-5


def test_source_dtype_rounds_every_seeded_value_through_it():
    """source_dtype=bf16 with dtype fp32: a bf16 checkpoint loaded in fp32 -- every weight is the fp32
    draw rounded to bf16 (not equal to the unrounded draw), in fastft and in the transformers model."""
    cfg = fc.make_config("tiny-llama")
    plain = fastft.from_config(cfg, seed=0).state_dict()
    got = fastft.from_config(cfg, seed=0, source_dtype="bfloat16").state_dict()
    with torch.device("meta"):
        hf = transformers.LlamaForCausalLM(cfg)
    hs = fc.seeded_materialize(hf, cfg, seed=0, source_dtype=torch.bfloat16).state_dict()
    for k, v in got.items():
        assert v.dtype == torch.float32 and torch.equal(v, plain[k].bfloat16().float()), k
        assert torch.equal(hs[k], v), k
    w = "model.embed_tokens.weight"
    assert not torch.equal(got[w], plain[w])
    with pytest.raises(ValueError, match="source_dtype"):
        fastft.from_config(cfg, source_dtype="int8")


def test_tied_head_and_dtype_device():
    m = fastft.from_config({**fc.SHAPES["tiny-llama"], "tie_word_embeddings": True},
                           dtype="bfloat16")
    assert m.lm_head.weight is m.model.embed_tokens.weight
    assert m.model.embed_tokens.weight.dtype == torch.bfloat16
    assert m.model.rotary_emb.inv_freq.dtype == torch.float32  # derived buffers stay fp32


def test_quantized_one_layer_at_a_time(monkeypatch):
    """No more than one full-precision target weight exists at any time, and each quantized layer is
    exactly the NF4 of its seeded weight."""
    from fastft.nn import QuantLinear

    real = QuantLinear.from_linear
    seen = []
    holder = {}

    def spy(lin, quantization="nf4", **kw):
        model = holder.get("model")
        seen.append(lin.weight.shape)
        if model is not None:  # every other target is still on meta or already quantized
            dense = [n for n, m in model.named_modules() if type(m) is nn.Linear and n != "lm_head"
                     and m.weight.device.type != "meta"]
            assert dense == [], dense
        return real(lin, quantization, **kw)

    monkeypatch.setattr(QuantLinear, "from_linear", staticmethod(spy))
    orig_init = LlamaForCausalLM.__init__

    def init(self, config):
        orig_init(self, config)
        holder["model"] = self

    monkeypatch.setattr(LlamaForCausalLM, "__init__", init)
    m = fastft.from_config("tiny-llama", quantization="nf4", seed=5)
    assert len(seen) == len(LlamaForCausalLM.quant_targets(m.config)) == 14
    from fastft.quant import NF4Weight

    name = "model.layers.1.self_attn.k_proj"
    q = m.get_submodule(name).weight
    ref = NF4Weight.from_float(fc.seeded_tensor(name + ".weight", (32, 64), seed=5), blocksize=64, double_quant=True)
    assert torch.equal(q.data, ref.data) and torch.equal(q.absmax, ref.absmax)


def test_seed_lora_makes_fastft_and_peft_adapters_equal():
    peft = pytest.importorskip("peft")
    cfg = fc.make_config("tiny-llama")
    a = fastft.get_peft_model(fastft.from_config(cfg), fastft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    with torch.device("meta"):
        hf = transformers.LlamaForCausalLM(cfg)
    fc.seeded_materialize(hf, cfg)
    b = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    assert fc.seed_lora(a, seed=1) == fc.seed_lora(b, seed=1) == 14
    la = {n.replace(".weight", ""): p for n, p in a.named_parameters() if "lora_A" in n}
    lb = {n.replace(".default.weight", ""): p for n, p in b.named_parameters() if "lora_A" in n}
    assert la.keys() == lb.keys()
    for k in la:
        assert torch.equal(la[k], lb[k]), k
    assert all(float(p.detach().abs().sum()) == 0 for n, p in a.named_parameters() if "lora_B" in n)
    assert fc.lora_a_name("base_model.model.model.layers.3.mlp.up_proj.base_layer") == "model.layers.3.mlp.up_proj.lora_A"
