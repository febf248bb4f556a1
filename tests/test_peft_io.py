"""Adapter files: fastft writes what PEFT writes and reads what PEFT writes; merging; atomic saves.

Round trips are judged by logits (PEFT silently loads nothing from mis-keyed files, so a key-only
check could pass on an adapter that never loads), with the adapter weights randomised so that a
dropped tensor changes the output.
"""
import importlib
import copy
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import fastft
from fastft.nn import LoraLinear
from fastft.peft_io import CONFIG_NAME, WEIGHTS_NAME
from utils import rel_err

peft = importlib.import_module("peft")
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, BertConfig, BertForMaskedLM  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

TOL = 1e-5


def tiny_model(arch: str, tie: bool = False) -> nn.Module:
    torch.manual_seed(0)
    if arch == "llama":
        cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                          tie_word_embeddings=tie, attention_bias=True)
        return LlamaForCausalLM(cfg).eval()
    cfg = BertConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=64)
    return BertForMaskedLM(cfg).eval()


def inputs(T: int = 7):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(4, 64, (2, T), generator=g)
    mask = torch.ones(2, T, dtype=torch.long)
    mask[1, -2:] = 0
    return {"input_ids": ids, "attention_mask": mask}


@torch.no_grad()
def randomise(model: nn.Module) -> None:
    for p in model.parameters():
        if p.requires_grad:
            p.add_(0.2 * torch.randn_like(p))


def logits(model, data):
    with torch.no_grad():
        return model(**data).logits


CASES = [
    ("llama", dict(target_modules="all-linear", modules_to_save=["lm_head"], use_rslora=True)),
    ("llama", dict(target_modules=["q_proj", "v_proj"], bias="all")),
    ("bert", dict(target_modules=["query", "value", "dense"], bias="lora_only", modules_to_save=["decoder"])),
    ("bert", dict(target_modules=r".*layer\.\d+\.attention\.self\.(query|key)", bias="all")),
]
IDS = [f"{a}-{i}" for i, (a, _) in enumerate(CASES)]


@pytest.mark.parametrize("arch,kw", CASES, ids=IDS)
def test_fastft_save_loads_in_peft(tmp_path, arch, kw):
    base = tiny_model(arch)
    pm = fastft.get_peft_model(copy.deepcopy(base), fastft.LoraConfig(r=4, lora_alpha=8, **kw))
    randomise(pm)
    data = inputs()
    ours = logits(pm, data)
    assert rel_err(ours, logits(base, data)) > 1e-2  # the adapter changes the model
    pm.save_pretrained(tmp_path / "adapter")
    assert sorted(os.listdir(tmp_path / "adapter")) == [CONFIG_NAME, WEIGHTS_NAME]
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]  # no temporary left behind

    ref = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "adapter").eval()
    assert rel_err(logits(ref, data), ours) <= TOL

    # Key names and values are exactly what PEFT itself writes for the same adapter.
    ref.save_pretrained(tmp_path / "peft_saved")
    theirs, mine = load_file(tmp_path / "peft_saved" / WEIGHTS_NAME), load_file(tmp_path / "adapter" / WEIGHTS_NAME)
    assert sorted(mine) == sorted(theirs)
    for k in mine:
        assert torch.equal(mine[k], theirs[k]), k


@pytest.mark.parametrize("arch,kw", CASES, ids=IDS)
def test_peft_save_loads_in_fastft(tmp_path, arch, kw):
    base = tiny_model(arch)
    ref = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, **kw)).eval()
    randomise(ref)
    ref.save_pretrained(tmp_path)
    data = inputs()
    pm = fastft.load_adapter(copy.deepcopy(base), tmp_path)
    assert rel_err(logits(pm, data), logits(ref, data)) <= TOL
    assert rel_err(logits(pm, data), logits(base, data)) > 1e-2
    assert not any(p.requires_grad for p in pm.parameters())  # inference mode, as PEFT's default
    pm_t = fastft.load_adapter(copy.deepcopy(base), tmp_path, is_trainable=True)
    assert {n for n, p in pm_t.named_parameters() if p.requires_grad} == \
        {n.replace(".default.", ".") for n, p in peft.PeftModel.from_pretrained(
            copy.deepcopy(base), tmp_path, is_trainable=True).named_parameters() if p.requires_grad}


def test_saved_config(tmp_path):
    pm = fastft.get_peft_model(tiny_model("llama"), fastft.LoraConfig(
        r=4, lora_alpha=16, target_modules="all-linear", lora_dropout=0.1, task_type="CAUSAL_LM"))
    pm.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM"
    assert (cfg["r"], cfg["lora_alpha"], cfg["lora_dropout"], cfg["bias"], cfg["use_rslora"]) == (4, 16, 0.1, "none", False)
    # "all-linear" is saved expanded (as PEFT does), without the output layer.
    assert sorted(cfg["target_modules"]) == sorted(pm.lora_layers()) and "lm_head" not in cfg["target_modules"]
    assert len(cfg["target_modules"]) == 2 * 7
    loaded = peft.PeftConfig.from_pretrained(tmp_path)
    assert loaded.r == 4 and set(loaded.target_modules) == set(cfg["target_modules"])


def test_saving_into_existing_directory_keeps_other_files(tmp_path):
    (tmp_path / "trainer_state.json").write_text("{}")
    pm = fastft.get_peft_model(tiny_model("llama"), fastft.LoraConfig(target_modules=["q_proj"]))
    pm.save_pretrained(tmp_path)
    pm.save_pretrained(tmp_path)  # overwrite
    assert sorted(os.listdir(tmp_path)) == sorted([CONFIG_NAME, WEIGHTS_NAME, "trainer_state.json"])


# ----------------------------------------------------------------------------------------------
# merge_and_unload


MERGE_CASES = [
    ("llama", False, CASES[0][1]),
    # modules_to_save on an output layer tied to the input embedding: the trained copy must survive
    # saving (the merged model is untied) and the embedding must stay as it was.
    ("llama", True, dict(target_modules=["q_proj"], modules_to_save=["lm_head"])),
    ("bert", True, CASES[2][1]),
]


@pytest.mark.parametrize("arch,tie,kw", MERGE_CASES, ids=["llama", "llama-tied", "bert-tied"])
def test_merge_and_unload(tmp_path, arch, tie, kw):
    base = tiny_model(arch, tie=tie)
    pm = fastft.get_peft_model(copy.deepcopy(base), fastft.LoraConfig(r=4, lora_alpha=8, **kw))
    randomise(pm)
    data = inputs()
    unmerged = logits(pm, data)
    merged = pm.merge_and_unload()
    assert type(merged) is type(base)
    assert not any(isinstance(m, LoraLinear) or hasattr(m, "modules_to_save") for m in merged.modules())
    assert set(merged.state_dict()) == set(base.state_dict())
    assert torch.equal(merged.get_input_embeddings().weight, base.get_input_embeddings().weight)
    assert rel_err(logits(merged, data), unmerged) <= TOL
    merged.save_pretrained(tmp_path)
    auto = AutoModelForCausalLM if arch == "llama" else AutoModelForMaskedLM
    reloaded = auto.from_pretrained(tmp_path).eval()
    assert rel_err(logits(reloaded, data), unmerged) <= TOL


def test_merge_is_fp32_for_half_base():
    torch.manual_seed(0)
    lin = nn.Linear(64, 48).to(torch.bfloat16)
    w0 = lin.weight.detach().float().clone()
    layer = LoraLinear(lin, r=8, lora_alpha=16, init_lora_weights=False)
    assert layer.lora_A.weight.dtype == torch.float32  # adapters stay fp32 over half bases
    expected = (w0 + 2.0 * layer.lora_B.weight.detach() @ layer.lora_A.weight.detach()).to(torch.bfloat16)
    merged = layer.merged_linear()
    assert merged.weight.dtype == torch.bfloat16
    assert torch.equal(merged.weight, expected)  # one rounding, from the fp32 sum


# ----------------------------------------------------------------------------------------------
# Failures: clear errors, nothing partial


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    import safetensors.torch

    pm = fastft.get_peft_model(tiny_model("llama"), fastft.LoraConfig(target_modules=["q_proj"]))

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save", boom)  # what fastft's deterministic writer calls
    with pytest.raises(OSError, match="disk full"):
        pm.save_pretrained(tmp_path / "new" / "adapter")
    assert list(tmp_path.iterdir()) == []  # neither the directory nor the parent it would have created
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / CONFIG_NAME).write_text("old")
    with pytest.raises(OSError, match="disk full"):
        pm.save_pretrained(existing)
    assert sorted(os.listdir(existing)) == [CONFIG_NAME] and (existing / CONFIG_NAME).read_text() == "old"


def test_save_onto_a_file_raises(tmp_path):
    pm = fastft.get_peft_model(tiny_model("llama"), fastft.LoraConfig(target_modules=["q_proj"]))
    f = tmp_path / "adapter"
    f.write_text("x")
    with pytest.raises(NotADirectoryError, match="not a directory"):
        pm.save_pretrained(f)
    assert f.read_text() == "x"
    with pytest.raises(ValueError, match="safetensors only"):
        pm.save_pretrained(tmp_path / "a", safe_serialization=False)
    assert not (tmp_path / "a").exists()


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, {n: p.requires_grad for n, p in model.named_parameters()}


def test_load_errors_leave_model_unchanged(tmp_path):
    base = tiny_model("llama")
    src = fastft.get_peft_model(copy.deepcopy(base), fastft.LoraConfig(r=4, target_modules=["q_proj"]))
    src.save_pretrained(tmp_path / "ok")
    target = tiny_model("llama")
    sd0, flags0 = _state(target)

    def unchanged():
        sd, flags = _state(target)
        assert flags == flags0 and sd.keys() == sd0.keys()
        assert all(torch.equal(sd[k], sd0[k]) for k in sd)
        assert not any(isinstance(m, LoraLinear) for m in target.modules())

    with pytest.raises(FileNotFoundError, match=CONFIG_NAME):
        fastft.load_adapter(target, tmp_path / "missing")
    # A tensor with the wrong shape: named in the error.
    bad = tmp_path / "bad_shape"
    bad.mkdir()
    (bad / CONFIG_NAME).write_text((tmp_path / "ok" / CONFIG_NAME).read_text())
    sd = load_file(tmp_path / "ok" / WEIGHTS_NAME)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    save_file({**sd, key: torch.zeros(5, 32)}, bad / WEIGHTS_NAME)
    with pytest.raises(ValueError, match="shape mismatch.*q_proj.lora_A"):
        fastft.load_adapter(target, bad)
    unchanged()
    # Keys without PEFT's prefix (PEFT itself would load nothing and only warn).
    save_file({k.removeprefix("base_model.model."): v for k, v in sd.items()}, bad / WEIGHTS_NAME)
    with pytest.raises(ValueError, match="without the 'base_model.model.' prefix"):
        fastft.load_adapter(target, bad)
    unchanged()
    # A missing adapter tensor and an extra one.
    save_file({k: v for k, v in sd.items() if "layers.1" not in k}, bad / WEIGHTS_NAME)
    with pytest.raises(ValueError, match="missing.*layers.1.self_attn.q_proj"):
        fastft.load_adapter(target, bad)
    save_file({**sd, "base_model.model.model.layers.0.mlp.up_proj.lora_A.weight": torch.zeros(4, 32)},
              bad / WEIGHTS_NAME)
    with pytest.raises(ValueError, match="unexpected keys.*up_proj"):
        fastft.load_adapter(target, bad)
    unchanged()
    # Pickle weights are not read.
    os.remove(bad / WEIGHTS_NAME)
    (bad / "adapter_model.bin").write_bytes(b"\x80")
    with pytest.raises(FileNotFoundError, match="safetensors only"):
        fastft.load_adapter(target, bad)
    # Unsupported PEFT features and types.
    cfg = json.loads((tmp_path / "ok" / CONFIG_NAME).read_text())
    save_file(sd, bad / WEIGHTS_NAME)
    (bad / CONFIG_NAME).write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(ValueError, match="use_dora"):
        fastft.load_adapter(target, bad)
    (bad / CONFIG_NAME).write_text(json.dumps({**cfg, "peft_type": "IA3"}))
    with pytest.raises(ValueError, match="IA3"):
        fastft.load_adapter(target, bad)
    unchanged()
    pm = fastft.load_adapter(target, tmp_path / "ok")
    with pytest.raises(ValueError, match="already a FastPeftModel"):
        fastft.load_adapter(pm, tmp_path / "ok")


# ----------------------------------------------------------------------------------------------
# fastft native models (fastft.from_pretrained): same files as for transformers models



def real(x, data):
    """Logits at real (unpadded) positions: what padded query rows produce is unspecified."""
    return x[data["attention_mask"].bool()]


NATIVE_CASES = [
    pytest.param("llama", dict(target_modules="all-linear", modules_to_save=["lm_head"]), id="llama"),
    pytest.param("bert", dict(target_modules="all-linear", bias="all", modules_to_save=["transform.dense"]),
                 id="bert"),
    # The merged model has an untied decoder (tie_word_embeddings turned off); transformers then
    # expects cls.predictions.decoder.bias in the checkpoint as well as cls.predictions.bias.
    pytest.param("bert", dict(target_modules=["query", "value"], modules_to_save=["decoder"]), id="bert-decoder"),
]


@pytest.mark.parametrize("arch,kw", NATIVE_CASES)
def test_native_model_adapter_round_trip(tmp_path, arch, kw):
    from models_util import save_tiny_checkpoint

    ckpt = save_tiny_checkpoint(tmp_path / "ckpt", arch)
    auto = AutoModelForCausalLM if arch == "llama" else AutoModelForMaskedLM
    hf = auto.from_pretrained(ckpt).eval()
    native = fastft.from_pretrained(ckpt).eval()
    pm = fastft.get_peft_model(native, fastft.LoraConfig(r=4, lora_alpha=8, **kw))
    pm_hf = fastft.get_peft_model(copy.deepcopy(hf), fastft.LoraConfig(r=4, lora_alpha=8, **kw))
    assert {n for n, p in pm.named_parameters() if p.requires_grad} == \
        {n for n, p in pm_hf.named_parameters() if p.requires_grad}
    randomise(pm)
    data = inputs()
    ours = real(logits(pm, data), data)
    pm.save_pretrained(tmp_path / "adapter")
    ref = peft.PeftModel.from_pretrained(copy.deepcopy(hf), tmp_path / "adapter").eval()
    assert rel_err(real(logits(ref, data), data), ours) <= TOL
    # And back: PEFT's file onto a fresh native model.
    ref.save_pretrained(tmp_path / "peft_saved")
    back = fastft.load_adapter(fastft.from_pretrained(ckpt).eval(), tmp_path / "peft_saved")
    assert rel_err(real(logits(back, data), data), ours) <= TOL
    # Merged native model saved with its own save_pretrained loads in transformers.
    merged = pm.merge_and_unload()
    assert rel_err(real(logits(merged, data), data), ours) <= TOL
    merged.save_pretrained(tmp_path / "merged")
    assert rel_err(real(logits(auto.from_pretrained(tmp_path / "merged").eval(), data), data), ours) <= TOL


def test_peft_seq_cls_adapter_loads(tmp_path):
    """PEFT records its SEQ_CLS defaults ["classifier", "score"] in modules_to_save; BERT has no "score"."""
    from transformers import BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                     num_attention_heads=4, max_position_embeddings=64, num_labels=3)
    base = BertForSequenceClassification(cfg).eval()
    ref = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(task_type="SEQ_CLS", target_modules=["query"]))
    randomise(ref)
    ref.eval().save_pretrained(tmp_path)
    assert set(json.loads((tmp_path / CONFIG_NAME).read_text())["modules_to_save"]) == {"classifier", "score"}
    pm = fastft.load_adapter(copy.deepcopy(base), tmp_path)
    assert list(pm.modules_to_save_wrappers()) == ["classifier"]
    data = inputs()
    assert rel_err(logits(pm, data), logits(ref, data)) <= TOL
    assert rel_err(logits(pm, data), logits(base, data)) > 1e-2


def test_native_qlora_reload_and_merge(tmp_path):
    """QLoRA on a native NF4 model: the adapter reloads exactly; the merged (dequantized) model loads in transformers."""
    from models_util import save_tiny_checkpoint

    ckpt = save_tiny_checkpoint(tmp_path / "ckpt", "llama")
    pm = fastft.get_peft_model(fastft.from_pretrained(ckpt, quantization="nf4"),
                               fastft.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    assert all(type(m.base_layer).__name__ == "QuantLinear" for m in pm.lora_layers().values())
    ids = torch.randint(4, 100, (2, 9), generator=torch.Generator().manual_seed(2))
    pm.train()
    pm(input_ids=ids, labels=ids).loss.backward()
    assert all((p.grad is not None) == ("lora_" in n) for n, p in pm.named_parameters())
    pm.eval()
    ours = logits(pm, {"input_ids": ids})
    pm.save_pretrained(tmp_path / "adapter")
    back = fastft.load_adapter(fastft.from_pretrained(ckpt, quantization="nf4"), tmp_path / "adapter")
    assert torch.equal(logits(back, {"input_ids": ids}), ours)
    merged = pm.merge_and_unload()
    assert rel_err(logits(merged, {"input_ids": ids}), ours) <= TOL
    merged.save_pretrained(tmp_path / "merged")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert rel_err(logits(hf, {"input_ids": ids}), ours) <= TOL
