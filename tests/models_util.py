"""Tiny random checkpoints for model tests (imported by other test files too).

``tiny_config(arch, **overrides)`` gives a transformers config small enough for CPU tests;
``save_tiny_checkpoint(dir, arch, sharded=False, **overrides)`` saves a randomly initialised
transformers model of it with safetensors (sharded through a small ``max_shard_size``) and returns
the directory. Norm weights and biases are perturbed away from their 1/0 initialisation so that a
loader or model that drops them cannot pass a parity test.
"""
from __future__ import annotations

import hashlib
import os

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ARCHS = ("llama", "mistral", "qwen2", "bert", "roberta")


def tiny_config(arch: str, **overrides):
    import transformers

    if arch in ("llama", "mistral", "qwen2"):
        kw = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6, tie_word_embeddings=False,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
        if arch == "mistral":
            kw["sliding_window"] = None
        kw.update(overrides)
        cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
               "qwen2": transformers.Qwen2Config}[arch]
        return cls(**kw)
    if arch in ("bert", "roberta"):
        kw = dict(vocab_size=100, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=64, type_vocab_size=2, layer_norm_eps=1e-12, pad_token_id=0)
        if arch == "roberta":
            kw.update(pad_token_id=1, bos_token_id=0, eos_token_id=2, max_position_embeddings=66, type_vocab_size=1)
        kw.update(overrides)
        cls = transformers.BertConfig if arch == "bert" else transformers.RobertaConfig
        return cls(**kw)
    raise ValueError(f"tiny_config: unknown arch {arch!r}; expected one of {ARCHS}")


def hf_model_class(arch: str, head: bool = True):
    import transformers

    if arch in ("llama", "mistral", "qwen2"):
        return transformers.AutoModelForCausalLM
    if arch == "bert":
        return transformers.BertForMaskedLM if head else transformers.BertModel
    return transformers.RobertaForMaskedLM if head else transformers.RobertaModel


def random_hf_model(arch: str, seed: int = 0, head: bool = True, **overrides):
    cfg = tiny_config(arch, **overrides)
    torch.manual_seed(seed)
    cls = hf_model_class(arch, head)
    model = cls.from_config(cfg) if hasattr(cls, "from_config") and cls.__name__.startswith("Auto") else cls(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name.lower():
                p.add_(torch.randn_like(p) * 0.1)
    return model.float().eval()


def save_tiny_checkpoint(tmp_path, arch: str, sharded: bool = False, head: bool = True, seed: int = 0,
                         **overrides) -> str:
    """Save a random tiny transformers model of ``arch`` under ``tmp_path``; returns the directory."""
    model = random_hf_model(arch, seed=seed, head=head, **overrides)
    # one directory per distinct checkpoint, so two calls with the same tmp_path never overwrite
    tag = hashlib.sha1(repr(sorted(overrides.items())).encode()).hexdigest()[:8]
    d = os.path.join(str(tmp_path), f"{arch}-{'sharded' if sharded else 'single'}-{'mlm' if head else 'base'}-"
                                    f"s{seed}-{tag}")
    kw = {"max_shard_size": "60KB"} if sharded else {}
    model.save_pretrained(d, **kw)
    return d


def _one_thread_impl():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


try:
    import pytest

    # Import into a test module (``from models_util import one_thread``) to run it single-threaded:
    # on a small shared CPU box, intra-op threads contending with other processes make these
    # latency-bound model runs 10-20x slower than one thread does.
    one_thread = pytest.fixture(autouse=True, scope="module")(_one_thread_impl)
except ImportError:  # pragma: no cover - models_util used outside pytest
    pass
