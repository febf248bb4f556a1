"""Task data: JSONL files for classification, NER and retrieval -> tokenized examples -> batches.

Formats (one JSON object per line):
- classify: ``{"text": str, "label": str | int}``;
- ner:      ``{"tokens": [str, ...], "tags": [str, ...]}`` -- one BIO tag per token (``O``,
  ``B-TYPE``, ``I-TYPE``); the tokens are words, tokenized into sub-words here: the first sub-word
  of a word carries its tag, the others (and the special tokens) -100, as transformers' token
  classification examples align them;
- embed:    ``{"query": str, "positive": str}`` with an optional ``"negative": str`` (a hard
  negative; every other positive of the batch is a negative too).

The whole file is parsed and checked first; every error names ``path:line``: malformed JSON, a
missing or mistyped field, an empty text or tag sequence, tokens and tags of different lengths, a
tag that is not BIO, a label the label set does not know (eval data with a label the training data
never had). The label set is read from the training file (sorted; ``O`` first for NER) unless given.
"""
from __future__ import annotations

import os
import re
from typing import Optional, Sequence

import torch

from ..errors import DataError, InputNotFoundError, UsageError
from ..train.data import jsonl_objects

IGNORE_INDEX = -100
TASK_FIELDS = {"classify": ("text", "label"), "ner": ("tokens", "tags"), "embed": ("query", "positive")}
_BIO = re.compile(r"^(O|[BI]-\S.*)$")


def read_task_records(path, task: str) -> list[tuple[int, dict]]:
    """(line number, record) pairs of a task JSONL file, every record checked (see module doc)."""
    if task not in TASK_FIELDS:
        raise UsageError(f"task must be one of {sorted(TASK_FIELDS)}, got {task!r}")
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise InputNotFoundError(f"{path}: no such data file")
    if os.path.splitext(path)[1].lower() not in (".jsonl", ".json"):
        raise DataError(f"{path}: task data must be a .jsonl file")
    with open(path, encoding="utf-8") as f:
        records = jsonl_objects(path, f.read())
    if not records:
        raise DataError(f"{path}:1: empty data file")
    for i, rec in records:
        _check(rec, task, f"{path}:{i}")
    return records


def _check(rec, task, where):
    missing = [k for k in TASK_FIELDS[task] if k not in rec]
    if missing:
        raise DataError(f"{where}: task {task!r} needs fields {list(TASK_FIELDS[task])}; missing {missing} "
                         f"(got keys {sorted(rec)})")
    if task == "classify":
        if not isinstance(rec["text"], str) or not rec["text"].strip():
            raise DataError(f"{where}: 'text' must be a non-empty string")
        if not isinstance(rec["label"], (str, int)) or isinstance(rec["label"], bool):
            raise DataError(f"{where}: 'label' must be a string or an integer, got {rec['label']!r}")
    elif task == "ner":
        toks, tags = rec["tokens"], rec["tags"]
        if not isinstance(toks, list) or not all(isinstance(t, str) and t.strip() for t in toks):
            raise DataError(f"{where}: 'tokens' must be a list of non-empty strings")
        if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
            raise DataError(f"{where}: 'tags' must be a list of strings")
        if not tags:
            raise DataError(f"{where}: empty tag sequence")
        if len(toks) != len(tags):
            raise DataError(f"{where}: {len(toks)} tokens but {len(tags)} tags")
        bad = [t for t in tags if not _BIO.match(t)]
        if bad:
            raise DataError(f"{where}: tag {bad[0]!r} is not BIO ('O', 'B-TYPE' or 'I-TYPE')")
    else:
        for k in ("query", "positive", "negative"):
            if k in rec and (not isinstance(rec[k], str) or not rec[k].strip()):
                raise DataError(f"{where}: {k!r} must be a non-empty string")


def labels_of(records, task: str) -> list[str]:
    """The label set of training records: sorted names (NER: ``O`` first, then B-/I- of each type)."""
    if task == "classify":
        return sorted({str(r["label"]) for _, r in records})
    if task == "ner":
        types = sorted({t[2:] for _, r in records for t in r["tags"] if t != "O"})
        return ["O"] + [f"{p}-{t}" for t in types for p in ("B", "I")]
    raise DataError(f"task {task!r} has no labels")


def _special_affixes(tok):
    probe = "fastft probe"
    plain = tok(probe, add_special_tokens=False)["input_ids"]
    full = tok(probe, add_special_tokens=True)["input_ids"]
    for i in range(len(full) - len(plain) + 1):
        if full[i: i + len(plain)] == plain:
            return list(full[:i]), list(full[i + len(plain):])
    return [], []


def align_word_tags(word_ids: Sequence[Sequence[int]], tag_ids: Sequence[int], prefix: int, suffix: int,
                    max_length: int):
    """Sub-word ids and labels for one sentence: ``word_ids[w]`` are word w's sub-word ids. The
    first sub-word of a word gets its tag, the rest and the ``prefix`` / ``suffix`` special tokens
    -100. Returns (ids-without-specials, labels-without-specials, number of words kept) truncated so
    that prefix + ids + suffix fit ``max_length`` (a word is kept only if its first sub-word fits)."""
    room = max(0, max_length - prefix - suffix)
    ids, labels, kept = [], [], 0
    for w, (pieces, t) in enumerate(zip(word_ids, tag_ids)):
        if len(ids) >= room:
            break
        take = list(pieces)[: room - len(ids)]
        ids += take
        labels += [t] + [IGNORE_INDEX] * (len(take) - 1)
        kept = w + 1
    return ids, labels, kept


def tokenize_task(records, tokenizer, task: str, *, labels: Optional[Sequence[str]] = None, max_length: int = 128,
                  source: str = "data") -> list[dict]:
    """Tokenize checked records (``read_task_records``) into examples for the task's collator."""
    if max_length < 4:
        raise UsageError(f"max_length must be >= 4, got {max_length}")
    lab2id = {str(x): i for i, x in enumerate(labels)} if labels is not None else None
    prefix, suffix = _special_affixes(tokenizer)
    room = max_length - len(prefix) - len(suffix)
    unk = getattr(tokenizer, "unk_token_id", None)

    def enc(text):
        return prefix + list(tokenizer(text, add_special_tokens=False)["input_ids"])[:room] + suffix

    out = []
    for line, r in records:
        where = f"{source}:{line}"
        if task == "classify":
            lab = str(r["label"])
            if lab not in lab2id:
                raise DataError(f"{where}: unknown label {lab!r} (labels: {sorted(lab2id)})")
            out.append({"input_ids": enc(r["text"]), "labels": lab2id[lab]})
        elif task == "ner":
            unknown = [t for t in r["tags"] if t not in lab2id]
            if unknown:
                raise DataError(f"{where}: unknown tag {unknown[0]!r} (tags: {list(lab2id)})")
            words = []
            for w in r["tokens"]:
                ids = list(tokenizer(w, add_special_tokens=False)["input_ids"])
                if not ids:
                    if unk is None:
                        raise DataError(f"{where}: word {w!r} tokenizes to nothing and the tokenizer has no unk")
                    ids = [unk]
                words.append(ids)
            ids, labs, kept = align_word_tags(words, [lab2id[t] for t in r["tags"]], len(prefix), len(suffix),
                                              max_length)
            out.append({"input_ids": prefix + ids + suffix,
                        "labels": [IGNORE_INDEX] * len(prefix) + labs + [IGNORE_INDEX] * len(suffix),
                        "word_labels": [lab2id[t] for t in r["tags"]], "words_kept": kept})
        else:
            ex = {"input_ids": enc(r["query"]), "positive_input_ids": enc(r["positive"])}
            if "negative" in r:
                ex["negative_input_ids"] = enc(r["negative"])
            out.append(ex)
    return out


def load_task_dataset(path, tokenizer, task: str, *, labels: Optional[Sequence[str]] = None,
                      max_length: int = 128) -> tuple[list[dict], Optional[list[str]]]:
    """(examples, label names) of a task file; the labels come from the file unless given."""
    records = read_task_records(path, task)
    if task != "embed" and labels is None:
        labels = labels_of(records, task)
        if len(labels) < 2:
            raise DataError(f"{os.fspath(path)}: needs at least 2 distinct labels to train a classifier, "
                             f"found {labels}")
    return tokenize_task(records, tokenizer, task, labels=labels, max_length=max_length,
                         source=os.fspath(path)), (list(labels) if labels is not None else None)


# --- collators ------------------------------------------------------------------------------------
def _pad(rows, value):
    T = max(len(r) for r in rows)
    t = torch.full((len(rows), T), value, dtype=torch.long)
    m = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        t[i, : len(r)] = torch.as_tensor(list(r), dtype=torch.long)
        m[i, : len(r)] = 1
    return t, m


def _rows(features, key):
    rows = [f[key] for f in features]
    if any(len(r) == 0 for r in rows):
        raise DataError(f"every example needs a non-empty {key!r}")
    return rows


class ClassificationCollator:
    """Right-padded ``input_ids`` / ``attention_mask`` and one class id per example in ``labels``."""

    objective = "classify"

    def __init__(self, pad_token_id: int = 0):
        self.pad_token_id = int(pad_token_id)

    def __call__(self, features):
        if not features:
            raise DataError("cannot collate an empty list of examples")
        ids, am = _pad(_rows(features, "input_ids"), self.pad_token_id)
        batch = {"input_ids": ids, "attention_mask": am}
        if all("labels" in f for f in features):
            batch["labels"] = torch.tensor([int(f["labels"]) for f in features], dtype=torch.long)
        return batch


class TokenClassificationCollator(ClassificationCollator):
    """Right padding; ``labels`` (B, T) padded with -100."""

    objective = "ner"

    def __call__(self, features):
        if not features:
            raise DataError("cannot collate an empty list of examples")
        ids, am = _pad(_rows(features, "input_ids"), self.pad_token_id)
        batch = {"input_ids": ids, "attention_mask": am}
        if all("labels" in f for f in features):
            labs, _ = _pad([f["labels"] for f in features], IGNORE_INDEX)
            if labs.shape != ids.shape:
                raise DataError("an example has a different number of labels than input_ids")
            batch["labels"] = labs
        return batch


class EmbeddingCollator(ClassificationCollator):
    """Queries as ``input_ids``; ``positive_input_ids`` (and ``negative_input_ids`` when every
    example has one) with their own attention masks."""

    objective = "embed"

    def __call__(self, features):
        if not features:
            raise DataError("cannot collate an empty list of examples")
        ids, am = _pad(_rows(features, "input_ids"), self.pad_token_id)
        batch = {"input_ids": ids, "attention_mask": am}
        for k in ("positive", "negative"):
            if all(f"{k}_input_ids" in f for f in features):
                t, m = _pad(_rows(features, f"{k}_input_ids"), self.pad_token_id)
                batch[f"{k}_input_ids"], batch[f"{k}_attention_mask"] = t, m
        return batch


def task_collator(task: str, tokenizer=None, pad_token_id: Optional[int] = None):
    if pad_token_id is None:
        pad_token_id = next((getattr(tokenizer, n) for n in ("pad_token_id", "eos_token_id")
                             if getattr(tokenizer, n, None) is not None), 0)
    cls = {"classify": ClassificationCollator, "ner": TokenClassificationCollator, "embed": EmbeddingCollator}[task]
    return cls(pad_token_id)


__all__ = ["read_task_records", "labels_of", "tokenize_task", "load_task_dataset", "align_word_tags",
           "ClassificationCollator", "TokenClassificationCollator", "EmbeddingCollator", "task_collator",
           "TASK_FIELDS", "IGNORE_INDEX"]
