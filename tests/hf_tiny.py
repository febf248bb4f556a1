"""Tiny random transformers models (hidden 64, 2 layers) for the patch / interop / trainer tests."""
import torch
import transformers

VOCAB = 101
_COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
               max_position_embeddings=64)

# arch -> (model class, config class, config kwargs beyond _COMMON); one table, no per-arch code.
TABLE = {
    "llama": ("LlamaForCausalLM", "LlamaConfig", dict(num_key_value_heads=2)),
    "mistral": ("MistralForCausalLM", "MistralConfig", dict(num_key_value_heads=2, sliding_window=32)),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Config", dict(num_key_value_heads=1)),
    "gemma": ("GemmaForCausalLM", "GemmaConfig", dict(num_key_value_heads=1, head_dim=16)),
    "phi3": ("Phi3ForCausalLM", "Phi3Config", dict(num_key_value_heads=2, pad_token_id=0, bos_token_id=1,
                                                   eos_token_id=2)),
    "gpt2": ("GPT2LMHeadModel", "GPT2Config", dict(n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=1,
                                                   eos_token_id=2)),
    "bert": ("BertForMaskedLM", "BertConfig", {}),
    "roberta": ("RobertaForMaskedLM", "RobertaConfig", dict(pad_token_id=1, max_position_embeddings=70)),
}
CAUSAL = {"llama", "mistral", "qwen2", "gemma", "phi3", "gpt2"}


def tiny_config(arch, **overrides):
    _, cfg_name, extra = TABLE[arch]
    kw = dict(extra) if arch == "gpt2" else {**_COMMON, **extra}
    kw.update(overrides)
    if arch == "gpt2":
        kw["vocab_size"] = VOCAB
    return getattr(transformers, cfg_name)(**kw)


def tiny_model(arch, seed=0, **overrides):
    torch.manual_seed(seed)
    model = getattr(transformers, TABLE[arch][0])(tiny_config(arch, **overrides))
    return model.float().eval()


def tiny_batch(padding="right", batch=3, length=11, seed=1):
    """input_ids, attention_mask (1 = token) and labels (-100 on padding) with padding on one side."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, length), generator=g)
    am = torch.ones(batch, length, dtype=torch.long)
    if padding == "left":
        am[0, :4] = 0
        am[2, :1] = 0
    elif padding == "right":
        am[0, 7:] = 0
        am[2, 10:] = 0
    ids = ids.masked_fill(am == 0, 0)
    return ids, am, ids.masked_fill(am == 0, -100)
