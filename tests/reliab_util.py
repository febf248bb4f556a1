"""A tiny causal LM and data set for the reliability tests (trainer behaviour, not model numerics).

Importable from a bare subprocess too (tests/test_nothing_lost.py forks trainings from it).
"""
from __future__ import annotations

from types import SimpleNamespace

import torch

VOCAB = 32


class TinyLM(torch.nn.Module):
    """embedding -> dropout -> linear -> tanh -> linear head; loss = sum of token CE / num_items."""

    def __init__(self, seed=0, dropout=0.1, nan_at_call=None):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.emb = torch.nn.Embedding(VOCAB, 16)
        self.mid = torch.nn.Linear(16, 16)
        self.head = torch.nn.Linear(16, VOCAB)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        self.drop = torch.nn.Dropout(dropout)
        self.calls = 0
        self.nan_at_call = nan_at_call

    def forward(self, input_ids, labels=None, attention_mask=None, num_items_in_batch=None):
        self.calls += 1
        h = torch.tanh(self.mid(self.drop(self.emb(input_ids))))
        if self.nan_at_call is not None and self.calls >= self.nan_at_call:
            h = h / 0.0 * 0.0  # NaN from the middle layer on
        logits = self.head(h)
        n = num_items_in_batch or max(1, int((labels[:, 1:] != -100).sum()))
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1),
                                                 ignore_index=-100, reduction="sum") / n
        return SimpleNamespace(loss=loss, logits=logits)


def dataset(n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        L = int(torch.randint(3, 10, (1,), generator=g))
        ids = torch.randint(1, VOCAB, (L,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": list(ids)})
    return out


def targs(output_dir, **kw):
    from fastft.train import TrainingArguments

    base = dict(output_dir=str(output_dir), per_device_train_batch_size=2, gradient_accumulation_steps=2,
                learning_rate=1e-2, max_steps=12, save_steps=1, logging_steps=1, disable_tqdm=True, plot_loss=False,
                save_final_model=False, seed=3, lr_scheduler_type="cosine", warmup_steps=2, weight_decay=0.01)
    base.update(kw)
    return TrainingArguments(**base)


def params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}
