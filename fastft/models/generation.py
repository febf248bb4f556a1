"""Autoregressive generation with a KV cache for the native causal LMs.

Greedy decoding, or sampling with temperature, top-k and top-p (nucleus) applied in that order,
as transformers' logits processors do (top-p keeps the smallest set of tokens whose probability
reaches ``top_p``, always at least one). Batches may be left-padded (``attention_mask``): position
ids come from the mask's cumsum, so each row decodes as if it were alone. A row stops at any of
``eos_token_id``; finished rows are filled with ``pad_token_id`` until every row has finished or
``max_new_tokens`` were produced. The cache is preallocated for prompt + ``max_new_tokens`` and
the prompt is run once (prefill), then one token per step, computing logits for the last
position only.
"""
from __future__ import annotations

import torch


def _as_list(x):
    if x is None:
        return []
    if isinstance(x, torch.Tensor):
        return x.flatten().tolist()
    return list(x) if isinstance(x, (list, tuple)) else [x]


def process_logits(logits, temperature=1.0, top_k=None, top_p=None):
    """Apply temperature, top-k, top-p to (B, V) fp32 logits; filtered entries become -inf."""
    if temperature != 1.0:
        logits = logits / temperature
    V = logits.shape[-1]
    if top_k is not None and 0 < top_k < V:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, dim=-1, descending=False)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        remove = cum <= (1 - top_p)
        remove[..., -1] = False  # keep the most likely token whatever top_p is
        logits = logits.masked_fill(remove.scatter(-1, idx, remove), float("-inf"))
    return logits


@torch.no_grad()
def generate(model, input_ids, attention_mask=None, max_new_tokens=20, do_sample=False, temperature=1.0, top_k=None,
             top_p=None, eos_token_id=None, pad_token_id=None, generator=None, **unsupported):
    """Return (B, T + n) token ids: the prompt followed by up to ``max_new_tokens`` new tokens."""
    if unsupported:
        raise TypeError(f"generate: unsupported arguments {sorted(unsupported)}")
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"generate: input_ids must be (batch, seq) with seq >= 1, got {tuple(input_ids.shape)}")
    if max_new_tokens < 0:
        raise ValueError(f"generate: max_new_tokens must be >= 0, got {max_new_tokens}")
    if do_sample:
        if temperature <= 0:
            raise ValueError(f"generate: temperature must be > 0 when sampling, got {temperature}")
        if top_p is not None and not 0 < top_p <= 1:
            raise ValueError(f"generate: top_p must be in (0, 1], got {top_p}")
        if top_k is not None and top_k < 0:
            raise ValueError(f"generate: top_k must be >= 0, got {top_k}")
    cfg = model.config
    eos = _as_list(eos_token_id if eos_token_id is not None else getattr(cfg, "eos_token_id", None))
    if pad_token_id is None:
        pad_token_id = getattr(cfg, "pad_token_id", None)
        if pad_token_id is None:
            pad_token_id = eos[0] if eos else 0
    B, T = input_ids.shape
    dev = model.device
    input_ids = input_ids.to(dev)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    attention_mask = attention_mask.to(dev).long()
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"generate: attention_mask {tuple(attention_mask.shape)} != input_ids {tuple(input_ids.shape)}"
        )
    if max_new_tokens == 0:
        return input_ids

    was_training = model.training
    model.eval()
    try:
        cache = model.new_cache(B, T + max_new_tokens)
        eos_t = torch.tensor(eos, device=dev, dtype=torch.long) if eos else None
        finished = torch.zeros(B, dtype=torch.bool, device=dev)
        out = [input_ids]
        step_ids, mask = input_ids, attention_mask
        for _ in range(max_new_tokens):
            logits = model(step_ids, attention_mask=mask, past_key_values=cache, logits_to_keep=1).logits[:, -1]
            logits = logits.float()
            if do_sample:
                probs = process_logits(logits, temperature, top_k, top_p).softmax(-1)
                nxt = torch.multinomial(probs, 1, generator=generator)[:, 0]
            else:
                nxt = logits.argmax(-1)
            nxt = torch.where(finished, torch.full_like(nxt, pad_token_id), nxt)
            out.append(nxt[:, None])
            if eos_t is not None:
                finished = finished | torch.isin(nxt, eos_t)
                if bool(finished.all()):
                    break
            step_ids = nxt[:, None]
            mask = torch.cat([mask, torch.ones(B, 1, dtype=mask.dtype, device=dev)], dim=1)
        return torch.cat(out, dim=1)
    finally:
        model.train(was_training)
