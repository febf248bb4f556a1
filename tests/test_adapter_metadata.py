"""Complete outputs (issue 19, item 5): an adapter records the base it was trained on (path and
quantization); applying it to another base warns, naming both; PEFT still reads the config."""
from __future__ import annotations

import json
import warnings

import pytest
import torch

import fastft
from models_util import save_tiny_checkpoint


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("meta"), "llama")


def _adapter(base, tmp_path, quantization):
    torch.manual_seed(0)
    m = fastft.get_peft_model(fastft.from_pretrained(base, quantization=quantization),
                              fastft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    out = tmp_path / f"adapter-{quantization}"
    m.save_pretrained(str(out))
    return out


def test_adapter_records_base_quantization_and_warns_on_another(base, tmp_path):
    ad = _adapter(base, tmp_path, "nf4")
    from safetensors import safe_open

    cfg = json.loads((ad / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] and "fastft_base_quantization" not in cfg  # PEFT would warn on it
    with safe_open(str(ad / "adapter_model.safetensors"), "pt") as f:
        assert f.metadata()["fastft_base_quantization"] == "nf4"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fastft.load_adapter(fastft.from_pretrained(base, quantization="nf4"), str(ad))  # same base: silent
    with pytest.warns(UserWarning, match="trained on a nf4 base, applied to a unquantized one"):
        fastft.load_adapter(fastft.from_pretrained(base), str(ad))
    plain = _adapter(base, tmp_path, None)
    with safe_open(str(plain / "adapter_model.safetensors"), "pt") as f:
        assert f.metadata()["fastft_base_quantization"] == "none"
    with pytest.warns(UserWarning, match="trained on a unquantized base, applied to a int4 one"):
        fastft.load_adapter(fastft.from_pretrained(base, quantization="int4", group_size=32), str(plain))


def test_peft_reads_the_recorded_config(base, tmp_path):
    peft = pytest.importorskip("peft")
    ad = _adapter(base, tmp_path, "nf4")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "unexpected keyword" warning from PEFT
        cfg = peft.PeftConfig.from_pretrained(str(ad))
    assert cfg.r == 2 and sorted(cfg.target_modules) == ["q_proj", "v_proj"]
