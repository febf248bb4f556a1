"""Task metrics, plain Python over label sequences (no numpy needed): accuracy, macro-F1,
entity-level F1 for BIO tags, recall@k and MRR.

``entity_f1`` counts entities the way seqeval's default (conlleval) mode does: an entity is a
maximal run ``B-X I-X I-X ...``; an ``I-X`` that does not continue an entity of type X (after
``O``, after another type, at the start) begins a new entity of type X; a prediction counts only
when its (type, start, end) equals a gold entity exactly. Precision, recall and F1 are micro
averages over all entities; F1 is 0 when there are no predicted or no gold entities.
"""
from __future__ import annotations

import math
from typing import Sequence


def accuracy(pred: Sequence, gold: Sequence) -> float:
    _same_length(pred, gold)
    if not gold:
        raise ValueError("accuracy of an empty set")
    return sum(p == g for p, g in zip(pred, gold)) / len(gold)


def macro_f1(pred: Sequence, gold: Sequence, labels: Sequence | None = None) -> float:
    """Unweighted mean over classes of per-class F1 (a class with no gold and no prediction is skipped
    unless named in ``labels``, where it scores 0, as scikit-learn's ``f1_score(average="macro")``)."""
    _same_length(pred, gold)
    if not gold:
        raise ValueError("macro-F1 of an empty set")
    classes = list(labels) if labels is not None else sorted(set(gold) | set(pred), key=str)
    f1s = []
    for c in classes:
        tp = sum(p == c and g == c for p, g in zip(pred, gold))
        fp = sum(p == c and g != c for p, g in zip(pred, gold))
        fn = sum(p != c and g == c for p, g in zip(pred, gold))
        f1s.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return sum(f1s) / len(f1s)


def bio_entities(tags: Sequence[str]) -> set[tuple[str, int, int]]:
    """(type, start, end-exclusive) of the entities in one BIO sequence (seqeval's default rules)."""
    out, cur = set(), None  # cur = [type, start]
    for i, t in enumerate(list(tags) + ["O"]):
        prefix, _, typ = (t.partition("-") if t != "O" else ("O", "", ""))
        if prefix not in ("B", "I", "O") or (prefix != "O" and not typ):
            raise ValueError(f"tag {t!r} at position {i} is not BIO ('O', 'B-TYPE' or 'I-TYPE')")
        continues = prefix == "I" and cur is not None and cur[0] == typ
        if cur is not None and not continues:
            out.add((cur[0], cur[1], i))
            cur = None
        if prefix == "B" or (prefix == "I" and not continues):
            cur = [typ, i]
    return out


def entity_prf(pred: Sequence[Sequence[str]], gold: Sequence[Sequence[str]]) -> dict:
    """Micro precision / recall / F1 over exact entity matches, and the counts."""
    _same_length(pred, gold)
    tp = n_pred = n_gold = 0
    for i, (p, g) in enumerate(zip(pred, gold)):
        if len(p) != len(g):
            raise ValueError(f"sentence {i}: {len(p)} predicted tags but {len(g)} gold tags")
        pe, ge = bio_entities(p), bio_entities(g)
        tp += len(pe & ge)
        n_pred += len(pe)
        n_gold += len(ge)
    prec = tp / n_pred if n_pred else 0.0
    rec = tp / n_gold if n_gold else 0.0
    f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
    return {"precision": prec, "recall": rec, "f1": f1, "true_positives": tp, "predicted": n_pred, "gold": n_gold}


def entity_f1(pred: Sequence[Sequence[str]], gold: Sequence[Sequence[str]]) -> float:
    return entity_prf(pred, gold)["f1"]


def ranks(scores: Sequence[Sequence[float]], targets: Sequence[int]) -> list[int]:
    """1-based rank of each query's target among its candidates' scores (ties count against the
    target: a candidate scoring the same is ranked ahead, so a constant scorer gets no credit)."""
    _same_length(scores, targets)
    out = []
    for i, (row, t) in enumerate(zip(scores, targets)):
        if not 0 <= t < len(row):
            raise ValueError(f"query {i}: target {t} is not a candidate index (0..{len(row) - 1})")
        s = row[t]
        if isinstance(s, float) and math.isnan(s):
            raise ValueError(f"query {i}: NaN score")
        out.append(1 + sum(1 for j, x in enumerate(row) if j != t and x >= s))
    return out


def recall_at_k(scores, targets, k: int) -> float:
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    r = ranks(scores, targets)
    if not r:
        raise ValueError("recall@k of an empty set")
    return sum(x <= k for x in r) / len(r)


def mrr(scores, targets) -> float:
    r = ranks(scores, targets)
    if not r:
        raise ValueError("MRR of an empty set")
    return sum(1.0 / x for x in r) / len(r)


def _same_length(a, b):
    if len(a) != len(b):
        raise ValueError(f"{len(a)} predictions but {len(b)} gold items")


__all__ = ["accuracy", "macro_f1", "bio_entities", "entity_prf", "entity_f1", "ranks", "recall_at_k", "mrr"]
