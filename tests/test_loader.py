"""fastft.from_pretrained: exact tensors, formats, quantized loading, every bad input, peak memory."""
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file

from models_util import one_thread, save_tiny_checkpoint, tiny_config  # noqa: F401
from utils import rel_err

import fastft
from fastft.models import CheckpointError
from fastft.models import safetensors_io as sio


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("ld"), "llama")


def _copy(src, tmp_path, name="ck"):
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


def _count_reads(monkeypatch):
    """Count tensor reads: errors must be raised before any tensor data is touched."""
    calls = []
    orig = sio.SafetensorsFile.read

    def read(self, name, **kw):
        calls.append(name)
        return orig(self, name, **kw)

    monkeypatch.setattr(sio.SafetensorsFile, "read", read)
    return calls


@pytest.mark.parametrize("sharded", [False, True])
def test_tensors_equal_checkpoint(tmp_path, sharded):
    d = save_tiny_checkpoint(tmp_path, "qwen2", sharded=sharded)
    if sharded:
        assert os.path.isfile(os.path.join(d, "model.safetensors.index.json"))
        files = [f for f in os.listdir(d) if f.endswith(".safetensors")]
        assert len(files) > 1
        sd = {}
        for f in files:
            sd.update(load_file(os.path.join(d, f)))
    else:
        sd = load_file(os.path.join(d, "model.safetensors"))
    m = fastft.from_pretrained(d)
    ours = m.state_dict()
    for k, v in sd.items():
        assert torch.equal(ours[k], v), k
    assert set(ours) - set(sd) <= {"lm_head.weight"}  # only the tied head is not stored
    assert m.model_type == "qwen2" and not m.training
    assert all(p.device.type == "cpu" for p in m.parameters())


def test_dtype_and_default_dtype(tmp_path, llama_dir):
    m = fastft.from_pretrained(llama_dir, dtype=torch.bfloat16)
    assert {p.dtype for p in m.parameters()} == {torch.bfloat16}
    m.save_pretrained(tmp_path / "bf16")
    assert load_file(str(tmp_path / "bf16" / "model.safetensors"))["model.norm.weight"].dtype == torch.bfloat16
    # dtype=None keeps the checkpoint's precision
    assert fastft.from_pretrained(tmp_path / "bf16").dtype == torch.bfloat16
    assert fastft.from_pretrained(llama_dir, dtype="float64").dtype == torch.float64


def test_unprefixed_base_model_checkpoint_loads_when_tied(tmp_path):
    # A bare LlamaModel checkpoint (keys without "model.") with tied embeddings is a full LM.
    d = save_tiny_checkpoint(tmp_path, "llama", tie_word_embeddings=True)
    sd = load_file(os.path.join(d, "model.safetensors"))
    save_file({k[len("model."):]: v for k, v in sd.items()}, os.path.join(d, "model.safetensors"))
    m = fastft.from_pretrained(d)
    assert torch.equal(m.model.embed_tokens.weight, sd["model.embed_tokens.weight"])
    assert m.lm_head.weight is m.model.embed_tokens.weight


@pytest.fixture(scope="module")
def quant_dirs(tmp_path_factory, llama_dir):
    root = tmp_path_factory.mktemp("q")
    return {"llama": llama_dir, "qwen2": save_tiny_checkpoint(root, "qwen2"), "bert": save_tiny_checkpoint(root, "bert")}


@pytest.mark.parametrize("arch", ["llama", "qwen2", "bert"])
@pytest.mark.parametrize("quant", ["nf4", "int4"])
def test_quantized_loading(quant_dirs, arch, quant):
    from fastft.nn import QuantLinear
    from fastft.quant import Int4Weight, NF4Weight

    d = quant_dirs[arch]
    m = fastft.from_pretrained(d, quantization=quant, group_size=16, blocksize=64)
    qnames = {n for n, mod in m.named_modules() if isinstance(mod, QuantLinear)}
    assert qnames == set(type(m).quant_targets(m.config)) and len(qnames) == (12 if arch == "bert" else 14)
    assert all(not isinstance(mod, QuantLinear) for mod in (m.get_input_embeddings(), m.get_output_embeddings()))
    if arch == "qwen2":  # q/k/v biases survive quantized loading
        assert m.model.layers[1].self_attn.k_proj.bias is not None
    # Same result as quantizing the fp32 weights independently, then running dense.
    dense, exact = fastft.from_pretrained(d), fastft.from_pretrained(d)
    with torch.no_grad():
        for n in qnames:
            w = dense.get_submodule(n).weight
            q = NF4Weight.from_float(w, blocksize=64) if quant == "nf4" else Int4Weight.from_float(w, group_size=16)
            w.copy_(q.dequantize(torch.float32))
            qb, eb = m.get_submodule(n).bias, exact.get_submodule(n).bias
            assert (qb is None) == (eb is None) and (eb is None or torch.equal(qb, eb)), n
        ids = torch.randint(3, 100, (2, 10))
        got, want, ref = m(ids).logits, dense(ids).logits, exact(ids).logits
    assert rel_err(got, want) <= 1e-5
    # and close to the unquantized model: 4-bit weight error (~10% per weight on these random
    # gaussians) shrinks in the logits; a model without its blocks is off by ~1.
    assert rel_err(got, ref) <= 0.2


def test_quantized_loading_bad_group_size(llama_dir, monkeypatch):
    calls = _count_reads(monkeypatch)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.down_proj has in_features=96.*group_size=64"):
        fastft.from_pretrained(llama_dir, quantization="int4", group_size=64)
    with pytest.raises(ValueError, match="quantization must be one of"):
        fastft.from_pretrained(llama_dir, quantization="NF4")
    assert calls == []


@pytest.mark.parametrize("kw,match", [({"quantization": "int8"}, "quantization must be one of"),
                                      ({"dtype": torch.int32}, "floating dtype"),
                                      ({"dtype": "float17"}, "unknown dtype")])
def test_bad_arguments(llama_dir, kw, match):
    with pytest.raises(ValueError, match=match):
        fastft.from_pretrained(llama_dir, **kw)


def test_unsupported_model_type(tmp_path, llama_dir):
    d = _copy(llama_dir, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"model_type 'gpt2' is not supported.*llama, mistral, qwen2, bert, roberta"):
        fastft.from_pretrained(d)


def test_not_a_checkpoint_dir(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        fastft.from_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        fastft.from_pretrained(tmp_path / "nope")


def _edit_single(d, fn):
    p = os.path.join(d, "model.safetensors")
    sd = load_file(p)
    fn(sd)
    save_file(sd, p)


def test_missing_tensor(tmp_path, llama_dir, monkeypatch):
    d = _copy(llama_dir, tmp_path)
    _edit_single(d, lambda sd: sd.pop("model.layers.1.mlp.up_proj.weight"))
    calls = _count_reads(monkeypatch)
    with pytest.raises(CheckpointError, match=r"missing tensors \(1\): \['model\.layers\.1\.mlp\.up_proj\.weight'\]"):
        fastft.from_pretrained(d)
    assert calls == []


def test_unexpected_tensor(tmp_path, llama_dir, monkeypatch):
    d = _copy(llama_dir, tmp_path)
    _edit_single(d, lambda sd: sd.__setitem__("model.layers.0.mlp.extra.weight", torch.zeros(2)))
    calls = _count_reads(monkeypatch)
    with pytest.raises(CheckpointError, match=r"unexpected tensors \(1\): 'model\.layers\.0\.mlp\.extra\.weight' "
                                              r"in model\.safetensors"):
        fastft.from_pretrained(d)
    assert calls == []


def test_shape_mismatch_names_key_and_file(tmp_path, llama_dir, monkeypatch):
    d = save_tiny_checkpoint(tmp_path, "llama", sharded=True)
    cfg = json.loads(open(os.path.join(d, "config.json")).read())
    cfg["intermediate_size"] = 80
    open(os.path.join(d, "config.json"), "w").write(json.dumps(cfg))
    idx = json.load(open(os.path.join(d, "model.safetensors.index.json")))["weight_map"]
    calls = _count_reads(monkeypatch)
    with pytest.raises(CheckpointError) as e:
        fastft.from_pretrained(d)
    msg = str(e.value)
    assert "shape mismatch" in msg and "'model.layers.0.mlp.up_proj.weight' in " + idx[
        "model.layers.0.mlp.up_proj.weight"] in msg and "(96, 64), model expects (80, 64)" in msg
    assert calls == []


def test_truncated_file(tmp_path, llama_dir):
    d = _copy(llama_dir, tmp_path)
    p = d / "model.safetensors"
    size = p.stat().st_size
    with open(p, "r+b") as f:
        f.truncate(size - 100)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated file: tensor '.*' ends at byte"):
        fastft.from_pretrained(d)
    with open(p, "r+b") as f:
        f.truncate(5)
    with pytest.raises(CheckpointError, match="truncated safetensors file"):
        fastft.from_pretrained(d)


def test_corrupt_header(tmp_path, llama_dir):
    d = _copy(llama_dir, tmp_path)
    p = d / "model.safetensors"
    raw = bytearray(p.read_bytes())
    raw[8:12] = b"\x00\xff{["  # garbage inside the JSON header
    p.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="corrupt safetensors header"):
        fastft.from_pretrained(d)
    raw[0:8] = (10 ** 12).to_bytes(8, "little")
    p.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="header length"):
        fastft.from_pretrained(d)


def test_missing_shard_and_bad_index(tmp_path):
    d = save_tiny_checkpoint(tmp_path, "llama", sharded=True)
    idx_p = os.path.join(d, "model.safetensors.index.json")
    idx = json.load(open(idx_p))
    victim = idx["weight_map"]["model.norm.weight"]
    # an index that points a tensor at the wrong shard
    other = next(f for f in set(idx["weight_map"].values()) if f != victim)
    idx["weight_map"]["model.norm.weight"] = other
    json.dump(idx, open(idx_p, "w"))
    with pytest.raises(CheckpointError, match=f"'model.norm.weight' is mapped to '{other}'"):
        fastft.from_pretrained(d)
    idx["weight_map"]["model.norm.weight"] = victim
    json.dump(idx, open(idx_p, "w"))
    os.unlink(os.path.join(d, victim))
    with pytest.raises(CheckpointError, match=f"shard '{victim}' listed in the index is missing"):
        fastft.from_pretrained(d)


def test_no_weights_file(tmp_path, llama_dir):
    d = _copy(llama_dir, tmp_path)
    os.unlink(d / "model.safetensors")
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        fastft.from_pretrained(d)


def test_pickle_refused_unless_allowed(tmp_path, llama_dir):
    d = _copy(llama_dir, tmp_path)
    sd = load_file(str(d / "model.safetensors"))
    os.unlink(d / "model.safetensors")
    torch.save(sd, d / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="refusing to unpickle.*allow_pickle=True"):
        fastft.from_pretrained(d)
    m = fastft.from_pretrained(d, allow_pickle=True)
    assert torch.equal(m.model.layers[1].self_attn.k_proj.weight, sd["model.layers.1.self_attn.k_proj.weight"])
    # weights_only=True: a pickle that is not plain tensors is rejected, not executed
    torch.save({"model.norm.weight": torch.ones(64), "x": _Evil()}, d / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="weights_only=True"):
        fastft.from_pretrained(d, allow_pickle=True)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


# ------------------------------------------------------------------------------------------------
# Peak memory: the model is never held twice
# ------------------------------------------------------------------------------------------------
_MEM_SCRIPT = textwrap.dedent(r"""
    import json, resource, sys
    import torch, transformers  # noqa: F401 - imported before the baseline
    torch.set_num_threads(1)
    import fastft
    from fastft.models import loader  # noqa: F401

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024
        return None

    # Warm-up: load a tiny checkpoint of the same architecture first, so that lazily imported
    # modules and first-touched library code (~150 MB, independent of model size) are in the baseline.
    fastft.from_pretrained(sys.argv[3])
    import gc; gc.collect()
    base = status("VmRSS:")
    try:  # reset the high-water mark to the current RSS (Linux); else fall back to ru_maxrss
        open("/proc/self/clear_refs", "w").write("5")
        reset = True
    except OSError:
        reset = False
    model = fastft.from_pretrained(sys.argv[1], **json.loads(sys.argv[2]))
    peak = status("VmHWM:") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    seen, size = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            size += t.numel() * t.element_size()
    for mod in model.modules():  # quantized weights are not Parameters
        w = getattr(mod, "weight", None)
        if w is not None and not isinstance(w, torch.Tensor):
            size += w.nbytes
    print(json.dumps({"base": base, "peak": peak, "size": size}))
""")


@pytest.fixture(scope="module")
def big_checkpoint(tmp_path_factory):
    """A ~170 MB fp32 Llama checkpoint (random weights, written with safetensors directly)."""
    import transformers

    cfg = tiny_config("llama", vocab_size=32000, hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=4)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in transformers.AutoModelForCausalLM.from_config(cfg).state_dict().items()}
    d = tmp_path_factory.mktemp("big")
    g = torch.Generator().manual_seed(0)
    save_file({k: torch.randn(s, generator=g) * 0.02 for k, s in shapes.items()}, str(d / "model.safetensors"))
    cfg.save_pretrained(d)
    assert (d / "model.safetensors").stat().st_size >= 100e6
    return d


@pytest.mark.slow
def test_peak_memory_while_loading(big_checkpoint, llama_dir):
    out = subprocess.run([sys.executable, "-c", _MEM_SCRIPT, str(big_checkpoint), "{}", llama_dir], capture_output=True,
                         text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    growth = r["peak"] - r["base"]
    assert r["size"] >= 100e6
    assert growth <= 1.3 * r["size"], f"peak RSS grew {growth / 1e6:.0f} MB for a {r['size'] / 1e6:.0f} MB model"
