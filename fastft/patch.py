"""Make an existing transformers model use fastft: one generic mechanism, no per-architecture copies.

``fastft.patch(model, quantization=None, attention=True, lora=None)``:

* **attention** -- registers ``"fastft"`` with transformers' ``AttentionInterface`` (the attention
  function) *and* ``AttentionMaskInterface`` (the mask function). The mask function matters: a name
  unknown to the mask interface makes transformers skip mask creation, so padded batches would
  silently arrive with ``attention_mask=None``. Ours hands the attention function the 2-D padding
  mask (B, S) (None when there is no padding) and the attention function applies causality from
  ``module.is_causal``, aligned bottom-right so decoding with a KV cache works.
* **quantization** -- ``"nf4"`` / ``"int4"`` replaces the frozen ``nn.Linear`` (and GPT-2 style
  ``Conv1D``, whose weight is stored transposed) of the transformer blocks with
  ``fastft.nn.QuantLinear``, one layer at a time, so peak memory grows by one layer, not a model.
  The output projection (``get_output_embeddings()``) stays in full precision, as in QLoRA.
* **PEFT LoRA layers** already in the model (a ``peft.PeftModel``) keep their parameters and
  state_dict keys; only their forward is rerouted through ``fastft.ops.lora_linear``.
* **lora** -- a ``fastft.LoraConfig`` / ``peft.LoraConfig`` applied after patching
  (``fastft.get_peft_model``).

Modules fastft does not know are left alone (one log line lists their types).
"""
from __future__ import annotations

import logging
import types

import torch
import torch.nn as nn

from fastft import ops

logger = logging.getLogger("fastft")
ATTN_NAME = "fastft"


def fastft_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                             **kwargs):
    """transformers attention function: query (B, Hq, L, D), key/value (B, Hkv, S, D) -> ((B, L, Hq, D), None)."""
    if kwargs.get("softcap") is not None:
        raise ValueError("fastft attention does not support attention logit softcapping (softcap)")
    window = kwargs.get("sliding_window")
    if window is not None and key.shape[2] > window:
        raise ValueError(f"fastft attention: sliding_window={window} is shorter than the key length {key.shape[2]}; "
                         "sliding-window attention is not supported")
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    p = dropout if module.training else 0.0
    cu = kwargs.get("cu_seq_lens_q")
    if cu is not None and query.shape[0] == 1 and causal:
        # Packed batch (transformers' flattening collator): documents never attend to each other.
        q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (total, H, D)
        out = ops.attention_varlen(q, k, v, cu, int(kwargs.get("max_length_q") or q.shape[0]), causal=True,
                                   scale=scaling, dropout_p=p)
        return out[None], None
    kpm = None
    if attention_mask is not None:
        if attention_mask.dim() != 2:
            raise ValueError(f"fastft attention expects a 2-D padding mask, got shape {tuple(attention_mask.shape)}")
        kpm = attention_mask[:, -key.shape[2]:].to(torch.bool)
    out = ops.attention(query, key, value, causal=causal, scale=scaling, key_padding_mask=kpm, dropout_p=p)
    return out.transpose(1, 2).contiguous(), None


def fastft_attention_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None,
                          attention_mask=None, **kwargs):
    """transformers mask function: the 2-D (B, kv_length) padding mask, or None without padding."""
    if attention_mask is None:
        return None
    attention_mask = attention_mask[:, -kv_length:]
    if attention_mask.shape[1] == kv_length and bool(attention_mask.all()):
        return None
    return attention_mask


def register_attention() -> str:
    """Register "fastft" with transformers; afterwards ``attn_implementation="fastft"`` works."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTN_NAME, fastft_attention_forward)
    AttentionMaskInterface.register(ATTN_NAME, fastft_attention_mask)
    return ATTN_NAME


def _set_attn_implementation(model):
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(ATTN_NAME)
        return
    for m in model.modules():  # older transformers: every (sub)config carries the name
        cfg = getattr(m, "config", None)
        if cfg is not None and hasattr(cfg, "_attn_implementation"):
            cfg._attn_implementation = ATTN_NAME


def _peft_lora_forward(self, x, *args, **kwargs):
    """Forward of a peft LoRA Linear rerouted through fastft.ops.lora_linear (single active adapter)."""
    active = [a for a in self.active_adapters if a in self.lora_A]
    if self.disable_adapters or self.merged or len(active) != 1 or getattr(self, "use_dora", {}).get(active[0], False):
        return self._fastft_orig_forward(x, *args, **kwargs)
    a = active[0]
    base = self.get_base_layer()
    drop = self.lora_dropout[a]
    p = drop.p if isinstance(drop, nn.Dropout) and self.training else 0.0
    return ops.lora_linear(x, base.weight, self.lora_A[a].weight, self.lora_B[a].weight, self.scaling[a],
                           bias=base.bias, dropout_p=p)


def _is_conv1d(m):
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf")


def patch(model, *, quantization=None, attention=True, lora=None, blocksize=64, double_quant=True, group_size=128):
    """Patch a transformers (or peft) model in place to run on fastft ops; returns the model
    (or the PEFT-wrapped model when ``lora`` is given)."""
    if quantization not in (None, "nf4", "int4"):
        raise ValueError(f"patch: quantization must be None, 'nf4' or 'int4', got {quantization!r}")
    if attention:
        register_attention()
        _set_attn_implementation(model)
    skipped = set()
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    peft_lora = 0
    for name, mod in list(model.named_modules()):
        if hasattr(mod, "lora_A") and hasattr(mod, "get_base_layer") and not hasattr(mod, "_fastft_orig_forward"):
            mod._fastft_orig_forward = mod.forward
            mod.forward = types.MethodType(_peft_lora_forward, mod)
            peft_lora += 1
    if quantization:
        from fastft.nn.quant_linear import QuantLinear

        for name, mod in list(model.named_modules()):
            for cname, child in list(mod.named_children()):
                if child is out_emb:
                    continue
                if isinstance(child, nn.Linear):
                    lin = child
                elif _is_conv1d(child):  # GPT-2 Conv1D: weight (in, out), y = x W + b
                    lin = nn.Linear(child.weight.shape[0], child.nf, bias=True, device=child.weight.device,
                                    dtype=child.weight.dtype)
                    with torch.no_grad():
                        lin.weight.copy_(child.weight.t())
                        lin.bias.copy_(child.bias)
                else:
                    if len(list(child.children())) == 0 and any(p.dim() == 2 for p in child.parameters(recurse=False)):
                        skipped.add(type(child).__name__)
                    continue
                q = QuantLinear.from_linear(lin, quantization, blocksize=blocksize, double_quant=double_quant,
                                            group_size=group_size)
                setattr(mod, cname, q)
                del lin, child
    skipped.discard("Embedding")
    skipped.discard("LayerNorm")
    if skipped:
        logger.info("fastft.patch: left these module types unchanged: %s", ", ".join(sorted(skipped)))
    if peft_lora:
        logger.info("fastft.patch: %d PEFT LoRA layers now run through fastft.ops.lora_linear", peft_lora)
    if lora is not None:
        import fastft

        return fastft.get_peft_model(model, lora)
    return model


class _CallableModule(types.ModuleType):
    """``fastft.patch`` is both this module and the function DESIGN.md names: importing a submodule
    binds it as an attribute of its package, which would shadow a function of the same name, so the
    module itself is made callable and forwards to ``patch``."""

    def __call__(self, model, **kwargs):
        return patch(model, **kwargs)


import sys as _sys  # noqa: E402

_sys.modules[__name__].__class__ = _CallableModule
