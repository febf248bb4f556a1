"""Native Llama-family models vs transformers on the same checkpoints (fp32, rel. error <= 1e-4).

Tiny random checkpoints cover llama / mistral / qwen2 (biases), tied and untied embeddings, GQA /
MQA / MHA, an explicit head_dim, every supported RoPE scaling type, padding on either side and
packed batches; the real SmolLM2-135M-Instruct (converted once from its GGUF) checks a trained
model. The 1e-4 bound: both sides compute in fp32 through different kernels (summation orders),
which leaves ~1e-6 relative differences; a wrong RoPE variant, bias or norm gives > 1e-2.
"""
import os

import pytest
import torch

from models_util import one_thread, save_tiny_checkpoint, tiny_config  # noqa: F401
from utils import rel_err

import fastft
from fastft.models import llama as fl

# fp32 parity: 2-4x the fp32 noise measured on this suite's comparisons (max 1.4e-6 on SmolLM2-135M (30 layers), <= 3.1e-7 on the tiny variants);
# a bug of a few 1e-6 relative (a wrong norm epsilon on unit-scale activations) fails it.
TOL = 3e-6

VARIANTS = {
    "llama-gqa": ("llama", {}),
    "llama-tied": ("llama", {"tie_word_embeddings": True}),
    "llama-mha-bias": ("llama", {"num_key_value_heads": 4, "attention_bias": True, "mlp_bias": True}),
    "llama-mqa-headdim": ("llama", {"num_key_value_heads": 1, "head_dim": 32}),
    "mistral": ("mistral", {}),
    "qwen2-bias-tied": ("qwen2", {"tie_word_embeddings": True}),
    "rope-linear": ("llama", {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}}),
    "rope-dynamic": ("llama", {"max_position_embeddings": 16,
                               "rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}}),
    "rope-llama3": ("llama", {"max_position_embeddings": 128,
                              "rope_parameters": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 64,
                                                  "rope_theta": 10000.0}}),
    "rope-yarn": ("llama", {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                                                "original_max_position_embeddings": 16}}),
}


def _hf(d):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32,
                                                             attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama")
    return {name: save_tiny_checkpoint(root / name, arch, **kw) for name, (arch, kw) in VARIANTS.items()}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_transformers(ckpts, variant):
    d = ckpts[variant]
    ours, ref = fastft.from_pretrained(d), _hf(d)
    T = 24  # longer than max_position_embeddings=16 for the dynamic variant: exercises its rescaling
    ids = torch.randint(3, ours.config.vocab_size, (2, T))
    with torch.no_grad():
        a, b = ours(ids).logits, ref(ids).logits
    assert a.shape == b.shape
    assert rel_err(a, b) <= TOL, f"{variant}: rel err {rel_err(a, b):.2e}"
    # the untrained model is not trivially constant: logits vary across positions
    assert b.std(dim=1).mean() > 1e-3


@pytest.mark.parametrize("variant", ["llama-gqa", "qwen2-bias-tied", "rope-yarn"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_matches_transformers(ckpts, variant, side):
    d = ckpts[variant]
    ours, ref = fastft.from_pretrained(d), _hf(d)
    lens = [12, 7, 3]
    T = max(lens)
    ids = torch.zeros(len(lens), T, dtype=torch.long)
    mask = torch.zeros(len(lens), T, dtype=torch.long)
    for i, n in enumerate(lens):
        sl = slice(T - n, T) if side == "left" else slice(0, n)
        ids[i, sl] = torch.randint(3, 128, (n,))
        mask[i, sl] = 1
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        a = ours(ids, attention_mask=mask).logits
        b = ref(ids, attention_mask=mask, position_ids=pos).logits
        real = mask.bool()
        assert rel_err(a[real], b[real]) <= TOL
        # each padded row equals the same sequence run alone
        for i, n in enumerate(lens):
            alone = ours(ids[i:i + 1][mask[i:i + 1].bool()][None]).logits[0]
            assert rel_err(a[i][real[i]], alone) <= TOL


@pytest.mark.parametrize("variant", ["llama-gqa", "qwen2-bias-tied"])
def test_packed_batch_equals_per_document(ckpts, variant):
    d = ckpts[variant]
    ours, ref = fastft.from_pretrained(d), _hf(d)
    lens = [5, 9, 1, 7]
    docs = [torch.randint(3, 128, (n,)) for n in lens]
    packed = torch.cat(docs)[None]
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    with torch.no_grad():
        out = ours(packed, cu_seqlens=cu, max_seqlen=max(lens)).logits[0]
        for i, doc in enumerate(docs):
            want = ref(doc[None]).logits[0]
            assert rel_err(out[cu[i]:cu[i + 1]], want) <= TOL, f"document {i}"


def test_packing_by_restarting_position_ids(ckpts):
    """transformers' flattening convention: no cu_seqlens, position ids restart per document."""
    m = fastft.from_pretrained(ckpts["llama-gqa"])
    docs = [torch.randint(3, 128, (n,)) for n in (6, 3, 8)]
    pos = torch.cat([torch.arange(len(d)) for d in docs])[None]
    with torch.no_grad():
        out = m(torch.cat(docs)[None], position_ids=pos).logits[0]
        a = 0
        for doc in docs:
            assert rel_err(out[a:a + len(doc)], m(doc[None]).logits[0]) <= TOL
            a += len(doc)


def test_loss_matches_transformers_and_num_items(ckpts):
    d = ckpts["llama-gqa"]
    ours, ref = fastft.from_pretrained(d), _hf(d)
    ids = torch.randint(3, 128, (2, 10))
    labels = ids.clone()
    labels[0, :4] = -100
    with torch.no_grad():
        a, b = ours(ids, labels=labels).loss, ref(ids, labels=labels).loss
        assert abs(a.item() - b.item()) <= 1e-5 * abs(b.item())
        n = int((labels[:, 1:] != -100).sum())
        a2 = ours(ids, labels=labels, num_items_in_batch=torch.tensor(3 * n)).loss
        assert abs(a2.item() - a.item() / 3) <= 1e-6 * a.item()


def test_packed_loss_ignores_cross_document_targets(ckpts):
    ours = fastft.from_pretrained(ckpts["llama-gqa"])
    docs = [torch.randint(3, 128, (n,)) for n in (6, 4)]
    packed = torch.cat(docs)[None]
    cu = torch.tensor([0, 6, 10], dtype=torch.int32)
    with torch.no_grad():
        got = ours(packed, labels=packed, cu_seqlens=cu).loss
        per_doc = [ours(doc[None], labels=doc[None]).loss * (len(doc) - 1) for doc in docs]
    # mean over the 5 + 3 within-document targets only
    assert abs(got.item() - sum(per_doc).item() / 8) <= 1e-5 * got.item()


def test_gradient_checkpointing_same_gradients(ckpts):
    d = ckpts["llama-gqa"]
    ids = torch.randint(3, 128, (2, 9))
    grads = []
    for gc in (False, True):
        m = fastft.from_pretrained(d).train()
        if gc:
            m.gradient_checkpointing_enable()
        m(ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], rtol=1e-5, atol=1e-7), n
    assert any(g.abs().sum() > 0 for g in grads[1].values())


def test_bf16_error_no_worse_than_transformers(ckpts):
    """bf16 logits: within 2x transformers' own bf16 error against its float64 run (+ bf16 floor)."""
    import transformers

    from utils import assert_close_to_gold

    d = ckpts["qwen2-bias-tied"]
    gold_m = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float64).eval()
    hf16 = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.bfloat16).eval()
    ours = fastft.from_pretrained(d, dtype=torch.bfloat16)
    assert ours.dtype == torch.bfloat16
    ids = torch.randint(3, 128, (2, 16))
    with torch.no_grad():
        assert_close_to_gold(ours(ids).logits, gold_m(ids).logits, hf16(ids).logits, name="bf16 logits")


def test_autocast_bf16_error_no_worse_than_transformers(ckpts):
    """Under CPU autocast the projections run in bf16 while RoPE stays fp32: attention must still
    get one dtype, and the result be as accurate as transformers' under the same autocast."""
    import transformers

    from utils import assert_close_to_gold

    d = ckpts["llama-gqa"]
    gold_m = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float64).eval()
    ours, ref = fastft.from_pretrained(d), _hf(d)
    ids = torch.randint(3, 128, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        gold = gold_m(ids, attention_mask=mask, position_ids=pos).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            a = ours(ids, attention_mask=mask).logits
            b = ref(ids, attention_mask=mask, position_ids=pos).logits
    real = mask.bool()
    assert_close_to_gold(a[real].float(), gold[real], b[real].float(), name="autocast logits")


def test_too_long_input_raises(ckpts):
    m = fastft.from_pretrained(ckpts["llama-gqa"])  # max_position_embeddings=64
    with pytest.raises(ValueError, match="max_position_embeddings=64"):
        m(torch.randint(3, 128, (1, 65)))


def test_sliding_window_limit_raises(tmp_path):
    d = save_tiny_checkpoint(tmp_path, "mistral", sliding_window=8)
    m = fastft.from_pretrained(d)
    m(torch.randint(3, 128, (1, 8)))  # within the window: fine
    with pytest.raises(ValueError, match="sliding_window=8"):
        m(torch.randint(3, 128, (1, 9)))


def test_unsupported_rope_type_raises():
    cfg = tiny_config("llama", rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                                                "short_factor": [1.0] * 8, "long_factor": [1.0] * 8,
                                                "original_max_position_embeddings": 32})
    with pytest.raises(ValueError, match="rope_type 'longrope'"):
        fl.LlamaForCausalLM(cfg)


@pytest.mark.parametrize("variant", ["llama-gqa", "qwen2-bias-tied"])
def test_save_pretrained_roundtrip(ckpts, variant, tmp_path):
    m = fastft.from_pretrained(ckpts[variant])
    with torch.no_grad():  # a "fine-tuned" model: weights differ from the checkpoint
        m.model.layers[0].mlp.up_proj.weight.mul_(1.5)
    out = tmp_path / "saved"
    m.save_pretrained(out)
    assert not [f for f in os.listdir(out) if f.startswith(".tmp")]
    ids = torch.randint(3, 128, (2, 11))
    with torch.no_grad():
        want = m(ids).logits
        assert rel_err(_hf(out)(ids).logits, want) <= TOL
        assert torch.equal(fastft.from_pretrained(out)(ids).logits, want)
    assert rel_err(want, fastft.from_pretrained(ckpts[variant])(ids).logits) > 1e-3


@pytest.mark.slow
def test_smollm2_logits_match_transformers():
    from fastft.models.convert import smollm2_path

    d = smollm2_path()
    ours, ref = fastft.from_pretrained(d), _hf(d)
    assert ours.tie_word_embeddings and ours.config.num_key_value_heads == 3
    ids = torch.tensor([[1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3437, 2, 198, 1, 4093, 198]])
    with torch.no_grad():
        a, b = ours(ids).logits, ref(ids).logits
    assert rel_err(a, b) <= TOL


def test_transformers_trainer_drives_model(ckpts, tmp_path):
    import transformers
    from safetensors.torch import load_file

    m = fastft.from_pretrained(ckpts["qwen2-bias-tied"]).train()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    rows = [torch.randint(3, 128, (12,)) for _ in range(8)]
    data = [{"input_ids": r, "labels": r} for r in rows]
    args = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=2,
                                          save_steps=2, learning_rate=1e-2, report_to=[], use_cpu=True,
                                          activation_checkpointing=True)

    def collate(batch):
        return {k: torch.stack([b[k] for b in batch]) for k in batch[0]}

    out = transformers.Trainer(model=m, args=args, train_dataset=data, data_collator=collate).train()
    assert out.global_step == 2 and out.training_loss > 0
    saved = load_file(str(tmp_path / "checkpoint-2" / "model.safetensors"))
    after = m.state_dict()
    assert saved.keys() == after.keys() == before.keys()  # tied lm_head left out, as in HF files
    assert all(torch.equal(saved[k], after[k]) for k in saved)
    assert not torch.equal(after["model.layers.0.mlp.up_proj.weight"], before["model.layers.0.mlp.up_proj.weight"])


def test_save_pretrained_quantized_writes_dequantized_weights(ckpts, tmp_path):
    m = fastft.from_pretrained(ckpts["llama-gqa"], quantization="nf4")
    with pytest.warns(UserWarning, match="dequantized"):
        m.save_pretrained(tmp_path / "deq")
    ids = torch.randint(3, 128, (2, 9))
    with torch.no_grad():
        assert rel_err(_hf(tmp_path / "deq")(ids).logits, m(ids).logits) <= TOL


def test_save_pretrained_refuses_unmerged_lora(ckpts, tmp_path):
    from fastft.nn import LoraLinear

    m = fastft.from_pretrained(ckpts["llama-gqa"])
    attn = m.model.layers[0].self_attn
    attn.q_proj = LoraLinear(attn.q_proj, r=4, lora_alpha=8)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj.*merge adapters first"):
        m.save_pretrained(tmp_path / "lora")
    assert not (tmp_path / "lora").exists()


def test_state_dict_omits_tied_alias_and_round_trips(ckpts):
    m = fastft.from_pretrained(ckpts["llama-tied"])
    sd = m.state_dict()
    assert "lm_head.weight" not in sd and "model.embed_tokens.weight" in sd
    wrapper = torch.nn.Module()
    wrapper.inner = fastft.from_pretrained(ckpts["llama-tied"])
    with torch.no_grad():
        wrapper.inner.model.norm.weight.zero_()
    res = wrapper.load_state_dict({"inner." + k: v for k, v in sd.items()})
    assert not res.missing_keys and not res.unexpected_keys
    assert torch.equal(wrapper.inner.model.norm.weight, m.model.norm.weight)
    assert wrapper.inner.lm_head.weight is wrapper.inner.model.embed_tokens.weight


def test_training_loss_chunked_for_a_dense_head_full_logits_for_a_lora_head(ckpts):
    """A training forward with labels takes the fused linear + cross-entropy (``.logits`` None) when
    the LM head is a dense linear; a LoRA-adapted head keeps the full logits, so its adapter counts.
    Both losses equal the eval-mode (full logits) loss."""
    d = ckpts[next(iter(VARIANTS))]
    ids = torch.randint(3, 100, (2, 9))
    m = fastft.from_pretrained(d).train()
    with torch.no_grad():
        ref = m.eval()(ids, labels=ids).loss
    out = m.train()(ids, labels=ids)
    assert out.logits is None and torch.allclose(out.loss, ref, rtol=1e-5, atol=0)
    pm = fastft.get_peft_model(fastft.from_pretrained(d), fastft.LoraConfig(r=4, target_modules=["lm_head"]))
    head = pm.get_output_embeddings() if hasattr(pm, "get_output_embeddings") else None
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_()  # a non-zero adapter, so a dropped one would show
        ref = pm.eval()(ids, labels=ids).loss
    out = pm.train()(ids, labels=ids)
    assert head is None or type(head) is not torch.nn.Linear
    assert out.logits is not None and torch.allclose(out.loss, ref, rtol=1e-5, atol=0)


def test_parity_tolerance_catches_a_small_constant_bug(ckpts):
    """TOL is tight enough to see a 5e-6 relative error in one norm (e.g. a wrong RMSNorm epsilon on
    unit-scale activations), which the former 1e-4 let through."""
    d = ckpts["llama-gqa"]
    ours, ref = fastft.from_pretrained(d), _hf(d)
    ids = torch.randint(3, ours.config.vocab_size, (2, 24))
    with torch.no_grad():
        assert rel_err(ours(ids).logits, ref(ids).logits) <= TOL
        ref.model.norm.weight.mul_(1 + 5e-6)
        assert rel_err(ours(ids).logits, ref(ids).logits) > TOL
