"""fastft inside the Hugging Face ecosystem: PEFT adapters both ways on patched and native models,
patching a peft.PeftModel, torch.compile on a patched model, bitsandbytes 4-bit checkpoints both ways.

Adapter round trips are judged by logits with randomised adapter weights (PEFT loads mis-keyed files
into nothing and only warns, so a key check alone could pass on an adapter that never loaded)."""
import importlib
import copy
import logging

import pytest
import torch

import fastft
import fastft.ops
from fastft.nn import QuantLinear
from hf_tiny import tiny_batch, tiny_model
from utils import rel_err


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one intra-op thread is fastest, and it keeps shared CPUs from oversubscription."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

peft = importlib.import_module("peft")
@torch.no_grad()
def _randomise(model):
    g = torch.Generator().manual_seed(5)
    for n, p in model.named_parameters():
        if "lora_" in n:
            p.copy_(0.2 * torch.randn(p.shape, generator=g))


def _logits(model, ids, am):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=am).logits[am.bool()]


@pytest.mark.parametrize("arch", ["llama", "phi3", "roberta"])
def test_peft_adapter_loads_into_patched_model(tmp_path, arch):
    ids, am, _ = tiny_batch("right")
    base = tiny_model(arch)
    ref = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    _randomise(ref)
    ref.eval().save_pretrained(tmp_path)
    ref_logits = _logits(ref, ids, am)
    assert rel_err(_logits(base, ids, am), ref_logits) > 1e-2  # the adapter matters

    pm = fastft.load_adapter(fastft.patch(copy.deepcopy(base)), tmp_path)
    assert pm.config._attn_implementation == "fastft"
    assert rel_err(_logits(pm, ids, am), ref_logits) <= 1e-5


@pytest.mark.parametrize("arch", ["qwen2", "bert"])
def test_fastft_adapter_on_patched_model_loads_into_peft(tmp_path, arch):
    ids, am, _ = tiny_batch("right")
    base = tiny_model(arch)
    pm = fastft.get_peft_model(fastft.patch(copy.deepcopy(base)),
                               fastft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    _randomise(pm)
    pm.save_pretrained(tmp_path)
    ours = _logits(pm, ids, am)
    ref = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    assert rel_err(_logits(ref, ids, am), ours) <= 1e-5
    assert rel_err(_logits(base, ids, am), ours) > 1e-2


def test_peft_adapter_loads_into_native_model(tmp_path):
    from models_util import save_tiny_checkpoint
    from transformers import AutoModelForCausalLM

    ckpt = save_tiny_checkpoint(tmp_path / "ckpt", "llama")
    ids, am, _ = tiny_batch("right", length=9)
    ids = ids % 64
    ref = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(ckpt).eval(),
                              peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"]))
    _randomise(ref)
    ref.eval().save_pretrained(tmp_path / "adapter")
    pm = fastft.load_adapter(fastft.from_pretrained(ckpt), tmp_path / "adapter")
    assert rel_err(_logits(pm, ids, am), _logits(ref, ids, am)) <= 1e-5


@pytest.fixture
def lora_calls(monkeypatch):
    calls = []
    orig = fastft.ops.lora_linear

    def spy(*a, **k):
        calls.append(tuple(a[0].shape))
        return orig(*a, **k)

    monkeypatch.setattr(fastft.ops, "lora_linear", spy)
    return calls


def test_patching_peft_model_keeps_keys_logits_and_grads(tmp_path, lora_calls, caplog):
    ids, am, labels = tiny_batch("right")
    ref = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                                   target_modules=["q_proj", "v_proj", "up_proj"]))
    _randomise(ref)
    ref.base_model.model.set_attn_implementation("eager")
    model = copy.deepcopy(ref)
    keys = list(ref.state_dict())

    def run(m):
        m.zero_grad(set_to_none=True)
        out = m(input_ids=ids, attention_mask=am, labels=labels)
        out.loss.backward()
        return out.logits.detach()[am.bool()], {n: p.grad for n, p in m.named_parameters() if p.grad is not None}

    ref_logits, ref_grads = run(ref)
    with caplog.at_level(logging.INFO, logger="fastft"):
        assert fastft.patch(model) is model
    assert any("6 PEFT LoRA layers" in r.getMessage() for r in caplog.records)
    assert list(model.state_dict()) == keys
    assert model.base_model.model.config._attn_implementation == "fastft"
    logits, grads = run(model)
    assert len(lora_calls) == 6  # 2 layers x 3 targets, every one through fastft's fused op
    assert rel_err(logits, ref_logits) <= 1e-5
    assert grads.keys() == ref_grads.keys() and len(grads) == 12
    for n in grads:
        assert rel_err(grads[n], ref_grads[n]) <= 1e-4, n
    # PEFT's own saving still works on the patched model and reloads to the same logits.
    model.save_pretrained(tmp_path)
    again = peft.PeftModel.from_pretrained(tiny_model("llama"), tmp_path).eval()
    assert rel_err(_logits(again, ids, am), _logits(model.eval(), ids, am)) <= 1e-5


def test_quantizing_peft_model_keeps_adapter_weights_dense():
    pm = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(r=4, target_modules="all-linear"))
    keys_lora = [k for k in pm.state_dict() if "lora_" in k]
    fastft.patch(pm, quantization="nf4")
    layer = pm.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(layer.get_base_layer(), QuantLinear)
    assert isinstance(layer.lora_A["default"], torch.nn.Linear) and layer.lora_A["default"].weight.requires_grad
    assert [k for k in pm.state_dict() if "lora_" in k] == keys_lora
    ids, am, labels = tiny_batch("right")
    pm(input_ids=ids, attention_mask=am, labels=labels).loss.backward()
    assert layer.lora_B["default"].weight.grad is not None


def test_torch_compile_patched_qlora_model_fullgraph():
    """fullgraph=True: any graph break inside fastft's attention, mask, LoRA or NF4 ops raises."""
    ids, am, labels = tiny_batch("right")
    model = fastft.patch(tiny_model("llama"), quantization="nf4")
    pm = fastft.get_peft_model(model, fastft.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    out = pm(input_ids=ids, attention_mask=am, labels=labels)
    out.loss.backward()
    ref_grads = {n: p.grad.clone() for n, p in pm.named_parameters() if p.grad is not None}
    pm.zero_grad(set_to_none=True)
    torch._dynamo.reset()
    compiled = torch.compile(pm, backend="aot_eager", fullgraph=True)
    out_c = compiled(input_ids=ids, attention_mask=am, labels=labels)
    out_c.loss.backward()
    assert rel_err(out_c.logits[am.bool()], out.logits[am.bool()].detach()) <= 1e-5
    assert rel_err(out_c.loss, out.loss.detach()) <= 1e-5
    grads = {n: p.grad for n, p in pm.named_parameters() if p.grad is not None}
    assert grads.keys() == ref_grads.keys() and len(grads) == 2 * 7 * 2
    for n in grads:
        assert rel_err(grads[n], ref_grads[n]) <= 1e-4, n


# ---- bitsandbytes 4-bit checkpoints ------------------------------------------------------------
BNB_ARCHS = {"llama": "AutoModelForCausalLM", "gpt2": "AutoModelForCausalLM", "bert": "AutoModelForMaskedLM"}


def _bnb_checkpoint(tmp_path, arch):
    """A transformers checkpoint saved by transformers + bitsandbytes 4-bit NF4 with double quant.
    (bitsandbytes' CPU kernels need in_features divisible by the blocksize, hence intermediate 128.)"""
    import transformers

    importlib.import_module("bitsandbytes")
    dense = tmp_path / f"{arch}_dense"
    tiny_model(arch, **({} if arch == "gpt2" else {"intermediate_size": 128})).save_pretrained(dense)
    bnb_cfg = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                              bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
    auto = getattr(transformers, BNB_ARCHS[arch])
    bq = auto.from_pretrained(dense, quantization_config=bnb_cfg, device_map="cpu").eval()
    out = tmp_path / f"{arch}_bnb"
    bq.save_pretrained(out)  # before any forward: bitsandbytes repacks CPU weights in place on the first one
    return dense, out, bq, auto


def _bnb_dequantized_reference(dense, bq, auto):
    """The dense model with every 4-bit layer's weight replaced by bitsandbytes' own dequantization."""
    import bitsandbytes as bnb

    ref = auto.from_pretrained(dense).eval()
    n = 0
    for name, m in bq.named_modules():
        if isinstance(m, bnb.nn.Linear4bit):
            w = bnb.functional.dequantize_4bit(m.weight.data, m.weight.quant_state).float()
            target = ref.get_submodule(name)
            with torch.no_grad():
                target.weight.copy_(w.t() if type(target).__name__ == "Conv1D" else w)
            n += 1
    return ref, n


@pytest.mark.parametrize("arch,route", [("llama", "native"), ("llama", "patch"), ("gpt2", "patch"),
                                        ("bert", "native"), ("bert", "patch")])
def test_bnb_checkpoint_loads_without_bitsandbytes(tmp_path, monkeypatch, arch, route):
    import sys

    dense, path, bq, auto = _bnb_checkpoint(tmp_path, arch)
    ref, n_quant = _bnb_dequantized_reference(dense, bq, auto)
    ids, am, _ = tiny_batch("right")
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # any import of bitsandbytes now fails
    model = fastft.from_pretrained(path) if route == "native" else fastft.patch.from_pretrained(path)
    quant = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(quant) == n_quant > 0
    assert all(m.weight.double_quant for m in quant)
    assert rel_err(_logits(model, ids, am), _logits(ref, ids, am)) <= 1e-5


@pytest.mark.parametrize("arch,route", [("llama", "native"), ("gpt2", "patch"), ("bert", "patch")])
def test_save_quantized_loads_in_transformers_bitsandbytes(tmp_path, arch, route):
    """fastft writes the bytes bitsandbytes wrote; transformers + bitsandbytes (CPU) rebuild Linear4bit
    layers from it whose bitsandbytes dequantization equals fastft's weights exactly."""
    import bitsandbytes as bnb
    from safetensors.torch import load_file

    dense, path, bq, auto = _bnb_checkpoint(tmp_path, arch)
    model = fastft.from_pretrained(path) if route == "native" else fastft.patch.from_pretrained(path)
    fastft.models.save_quantized(model, tmp_path / "saved")
    theirs, ours = load_file(path / "model.safetensors"), load_file(tmp_path / "saved" / "model.safetensors")
    quant_keys = [k for k in theirs if ".weight." in k or k + ".absmax" in theirs]
    assert quant_keys and all(k in ours for k in quant_keys)
    for k in quant_keys:
        assert torch.equal(ours[k], theirs[k]), k

    back = auto.from_pretrained(tmp_path / "saved", device_map="cpu").eval()
    layers = {n: m for n, m in back.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    mine = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert layers.keys() == mine.keys() and layers
    for n, m in layers.items():
        w = bnb.functional.dequantize_4bit(m.weight.data, m.weight.quant_state).float()
        assert torch.equal(w, mine[n].weight.dequantize(torch.float32)), n
    ids, am, _ = tiny_batch("right")
    assert rel_err(_logits(back, ids, am), _logits(bq, ids, am)) <= 1e-6  # same bytes, same bitsandbytes math


def test_bnb_checkpoint_errors_name_the_problem(tmp_path):
    import json

    _, path, _, _ = _bnb_checkpoint(tmp_path, "llama")
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"]["bnb_4bit_quant_type"] = "fp4"
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="fp4"):
        fastft.from_pretrained(path)
    with pytest.raises(ValueError, match="fp4"):
        fastft.patch.from_pretrained(path)
    with pytest.raises(ValueError, match="int4"):
        fastft.models.save_quantized(fastft.patch(tiny_model("llama"), quantization="int4", group_size=32),
                                     tmp_path / "x")


def test_native_loader_accepts_agreeing_duplicate_names_only(tmp_path):
    """A tensor saved under two names (BERT's shared head bias) loads when the copies agree and is
    refused, naming both keys, when they differ."""
    import os

    from models_util import save_tiny_checkpoint
    from safetensors.torch import load_file, save_file

    ckpt = save_tiny_checkpoint(tmp_path, "bert")
    f = os.path.join(ckpt, "model.safetensors")
    sd = load_file(f)
    src = "cls.predictions.bias"
    dup = "cls.predictions.decoder.bias"
    sd.pop(dup, None)
    ids = torch.randint(3, 60, (2, 6))
    save_file(sd, f, metadata={"format": "pt"})
    with torch.no_grad():
        want = fastft.from_pretrained(ckpt)(ids).logits
    save_file({**sd, dup: sd[src].clone()}, f, metadata={"format": "pt"})
    with torch.no_grad():
        assert torch.equal(fastft.from_pretrained(ckpt)(ids).logits, want)
    save_file({**sd, dup: sd[src] + 1}, f, metadata={"format": "pt"})
    with pytest.raises(fastft.models.CheckpointError, match="differ"):
        fastft.from_pretrained(ckpt)
