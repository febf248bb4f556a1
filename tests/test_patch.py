"""fastft.patch on transformers models: attention through AttentionInterface + mask function."""
import pytest
import torch
import transformers

from fastft.patch import patch, register_attention
from tests.utils import rel_err

ARCHS = {
    "llama": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64)),
    "qwen2": lambda: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, max_position_embeddings=64)),
    "bert": lambda: transformers.BertForMaskedLM(transformers.BertConfig(
        vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=64)),
}


def _batch(left):
    ids = torch.randint(0, 101, (3, 11))
    am = torch.ones(3, 11, dtype=torch.long)
    if left:
        am[0, :4] = 0
        am[2, :1] = 0
    else:
        am[0, 7:] = 0
    return ids, am


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("padding", ["none", "left", "right"])
def test_patched_attention_matches_eager(arch, padding):
    torch.manual_seed(0)
    model = ARCHS[arch]().eval()
    model.set_attn_implementation("eager")
    ids, am = _batch(padding == "left")
    if padding == "none":
        am = torch.ones_like(am)
    ref = model(input_ids=ids, attention_mask=am).logits
    patch(model)
    assert model.config._attn_implementation == "fastft"
    out = model(input_ids=ids, attention_mask=am).logits
    keep = am.bool()
    assert rel_err(out[keep], ref[keep]) <= 1e-5


def test_patched_generate_matches_eager_greedy():
    torch.manual_seed(0)
    model = ARCHS["llama"]().eval()
    ids, am = _batch(left=True)
    model.set_attn_implementation("eager")
    ref = model.generate(input_ids=ids, attention_mask=am, max_new_tokens=6, do_sample=False, pad_token_id=0)
    patch(model)
    out = model.generate(input_ids=ids, attention_mask=am, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(out, ref)


def test_attn_implementation_name_in_from_config():
    register_attention()
    cfg = transformers.LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="fastft")
    assert model.config._attn_implementation == "fastft"
    ids = torch.randint(0, 50, (2, 5))
    ref = model(input_ids=ids).logits
    model.set_attn_implementation("eager")
    assert rel_err(model(input_ids=ids).logits, ref) <= 1e-5


def test_patch_rejects_unknown_quantization():
    with pytest.raises(ValueError, match="quantization"):
        patch(ARCHS["llama"](), quantization="nf3")


def test_fastft_patch_is_callable_from_package():
    import fastft

    model = ARCHS["llama"]()
    assert fastft.patch(model) is model
    assert model.config._attn_implementation == "fastft"
