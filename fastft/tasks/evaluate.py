"""Predictions and task metrics of a task model over tokenized examples (``fastft.tasks.data``).

- classify: ``accuracy``, ``macro_f1`` (over the classes present in gold or predictions);
- ner: entity-level ``entity_f1`` / ``entity_precision`` / ``entity_recall`` (exact spans, seqeval's
  default rules) and token ``accuracy`` over words; the tag of a word is the prediction at its first
  sub-word, words cut off by truncation are predicted ``O`` (so truncation costs recall, as it should);
- embed: every query is scored against every positive (and hard negative) of the set by cosine
  similarity; its own positive is the target: ``recall@1``, ``recall@5``, ``mrr``.

The model runs in eval mode under ``torch.no_grad``; its training mode is restored afterwards.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

from . import metrics as M
from .data import IGNORE_INDEX, task_collator


@contextmanager
def _eval_mode(model):
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was)


def _device(model):
    return next(model.parameters()).device


def _batches(examples, collate, bs, device):
    for i in range(0, len(examples), bs):
        chunk = examples[i: i + bs]
        b = collate(chunk)
        yield chunk, {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in b.items()}


def evaluate_task(model, examples, task: str, *, labels=None, tokenizer=None, pad_token_id=None,
                  batch_size: int = 16) -> dict:
    """Task metrics of ``model`` on ``examples`` (see the module doc); ``labels`` are the label names."""
    if not examples:
        raise ValueError("no examples to evaluate")
    collate = task_collator(task, tokenizer, pad_token_id)
    dev = _device(model)
    with _eval_mode(model):
        if task == "classify":
            pred, gold = [], []
            for chunk, b in _batches(examples, collate, batch_size, dev):
                b.pop("labels", None)
                pred += model(**b).logits.argmax(-1).tolist()
                gold += [int(e["labels"]) for e in chunk]
            return {"accuracy": M.accuracy(pred, gold), "macro_f1": M.macro_f1(pred, gold), "examples": len(gold)}
        if task == "ner":
            if labels is None:
                raise ValueError("NER evaluation needs the tag names (labels)")
            P, G = [], []
            for chunk, b in _batches(examples, collate, batch_size, dev):
                lab = b.pop("labels")
                arg = model(**b).logits.argmax(-1)
                for row, e in enumerate(chunk):
                    first = (lab[row] != IGNORE_INDEX).nonzero()[:, 0]
                    words = [labels[int(arg[row, j])] for j in first]
                    gold_words = [labels[t] for t in e["word_labels"]]
                    words += ["O"] * (len(gold_words) - len(words))
                    P.append(words)
                    G.append(gold_words)
            r = M.entity_prf(P, G)
            flat_p = [t for s in P for t in s]
            flat_g = [t for s in G for t in s]
            return {"entity_f1": r["f1"], "entity_precision": r["precision"], "entity_recall": r["recall"],
                    "accuracy": M.accuracy(flat_p, flat_g), "entities": r["gold"]}
        if task == "embed":
            q, c_pos, c_neg = [], [], []
            for chunk, b in _batches(examples, collate, batch_size, dev):
                emb = _inner(model).embed
                q.append(emb(b["input_ids"], b["attention_mask"]))
                c_pos.append(emb(b["positive_input_ids"], b["positive_attention_mask"]))
                if "negative_input_ids" in b:
                    c_neg.append(emb(b["negative_input_ids"], b["negative_attention_mask"]))
            Q, C = torch.cat(q), torch.cat(c_pos + c_neg)
            scores = (Q @ C.T).tolist()
            targets = list(range(len(Q)))
            return {"recall@1": M.recall_at_k(scores, targets, 1), "recall@5": M.recall_at_k(scores, targets, 5),
                    "mrr": M.mrr(scores, targets), "queries": len(Q), "candidates": len(C)}
    raise ValueError(f"unknown task {task!r}")


def _inner(model):
    """The task model inside PEFT-style wrappers (its ``embed`` runs through the adapted layers)."""
    m = model
    for _ in range(3):
        if hasattr(type(m), "embed"):
            return m
        nxt = getattr(getattr(m, "base_model", None), "model", None)
        if nxt is None:
            break
        m = nxt
    raise TypeError(f"{type(model).__name__} is not a sentence-embedding model (no embed())")


PRIMARY = {"classify": "accuracy", "ner": "entity_f1", "embed": "mrr"}

__all__ = ["evaluate_task", "PRIMARY"]
