"""Training data: JSONL / plain-text files -> lists of tokenized examples.

Formats (one JSON object per line in .jsonl; .txt holds documents separated by blank lines):
- ``{"text": ...}``                    every token is a target;
- ``{"prompt": ..., "completion": ...}`` only completion tokens (and the end marker) are targets;
- ``{"messages": [{"role", "content"}, ...]}`` rendered with the tokenizer's chat template; only
  assistant turns (their content plus the template's end-of-turn text) are targets.

Examples are ``{"input_ids": [...], "labels": [...]}`` for CLM (labels = input_ids with -100 where
not a target, unshifted: the model shifts, HF convention) and ``{"input_ids": [...]}`` for MLM (the
collator draws the masks). The whole file is parsed and checked before anything is tokenized, so a
bad line 90 000 fails in a second with ``path:line`` in the message.
"""
from __future__ import annotations

from ..errors import DataError, UsageError

import json
import os
import random
import warnings
from typing import Optional

IGNORE_INDEX = -100
OBJECTIVES = ("clm", "mlm")


# --- reading ----------------------------------------------------------------------------------
def read_records(path: str) -> list[tuple[int, dict]]:
    """Parse and validate a .jsonl/.txt file into (line number, record) pairs; no tokenization."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such data file")
    ext = os.path.splitext(path)[1].lower()
    with open(path, encoding="utf-8") as f:
        try:
            text = f.read()
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not UTF-8 text ({e})") from e
    if not text.strip():
        raise DataError(f"{path}:1: empty data file")
    if ext in (".jsonl", ".json"):
        return _read_jsonl(path, text)
    if ext == ".txt":
        return _read_txt(text)
    raise DataError(f"{path}: unsupported data file type {ext!r} (use .jsonl or .txt)")


def jsonl_objects(path, text):
    """[(line number, JSON object)] of a .jsonl file's ``text``: trailing blank lines are dropped; an
    empty line, malformed JSON or a non-object names ``path:line``."""
    lines = text.split("\n")
    # One trailing newline (or a few) at the end of the file is normal, not an empty record.
    while lines and not lines[-1].strip():
        lines.pop()
    records = []
    for i, line in enumerate(lines, 1):
        where = f"{path}:{i}"
        if not line.strip():
            raise DataError(f"{where}: empty line")
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: malformed JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(rec, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(rec).__name__}")
        records.append((i, rec))
    return records


def _read_jsonl(path, text):
    records = jsonl_objects(path, text)
    for i, rec in records:
        _check_record(rec, f"{path}:{i}")
    return records


def _read_txt(text):
    # Documents are separated by blank lines; each keeps its first line number for messages.
    records, buf, start = [], [], 0
    for i, line in enumerate(text.split("\n"), 1):
        if line.strip():
            if not buf:
                start = i
            buf.append(line)
        elif buf:
            records.append((start, {"text": "\n".join(buf)}))
            buf = []
    if buf:
        records.append((start, {"text": "\n".join(buf)}))
    return records


def _check_record(rec, where):
    if "messages" in rec:
        msgs = rec["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise DataError(f"{where}: 'messages' must be a non-empty list")
        for j, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise DataError(f"{where}: messages[{j}] must be an object with string 'role' and 'content'")
        if not any(m["role"] == "assistant" for m in msgs):
            raise DataError(f"{where}: no assistant message, so nothing to train on")
    elif "prompt" in rec or "completion" in rec:
        for k in ("prompt", "completion"):
            if k not in rec:
                raise DataError(f"{where}: has {'prompt' if k == 'completion' else 'completion'!r} but no {k!r} field")
            if not isinstance(rec[k], str):
                raise DataError(f"{where}: {k!r} must be a string, got {type(rec[k]).__name__}")
        if not rec["completion"]:
            raise DataError(f"{where}: empty 'completion'")
    elif "text" in rec:
        if not isinstance(rec["text"], str):
            raise DataError(f"{where}: 'text' must be a string, got {type(rec['text']).__name__}")
        if not rec["text"].strip():
            raise DataError(f"{where}: empty 'text'")
    else:
        raise DataError(f"{where}: missing field: expected 'text', 'prompt'+'completion' or 'messages', "
                         f"got keys {sorted(rec)}")


# --- tokenization -----------------------------------------------------------------------------
def _special_affixes(tokenizer):
    """Token ids the tokenizer wraps around a single text (e.g. [BOS] / [CLS] ... [SEP])."""
    probe = "fastft probe"
    plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
    full = tokenizer(probe, add_special_tokens=True)["input_ids"]
    for i in range(len(full) - len(plain) + 1):
        if full[i : i + len(plain)] == plain:
            return list(full[:i]), list(full[i + len(plain) :])
    return [], []


def _encode(tokenizer, text):
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


class _Tokenize:
    def __init__(self, tokenizer, objective, max_length):
        self.tok = tokenizer
        self.objective = objective
        self.max_length = max_length
        self.prefix, suffix = _special_affixes(tokenizer)
        eos = getattr(tokenizer, "eos_token_id", None)
        # CLM examples end with an end marker so the model learns to stop: the tokenizer's own
        # suffix ([SEP] for BERT-style) if it has one, else EOS.
        self.end = suffix if suffix else ([eos] if eos is not None else [])
        self.suffix = suffix

    def __call__(self, rec, where):
        if self.objective == "mlm":
            if "text" not in rec:
                raise DataError(f"{where}: the mlm objective needs 'text' records")
            # Keep [CLS] ... [SEP] around a truncated body, as the MLM pre-training data had them.
            room = max(0, self.max_length - len(self.prefix) - len(self.suffix))
            return {"input_ids": self.prefix + _encode(self.tok, rec["text"])[:room] + self.suffix}
        if "messages" in rec:
            ids, labels = self._chat(rec["messages"], where)
        elif "prompt" in rec:
            p = self.prefix + _encode(self.tok, rec["prompt"])
            # Prompt and completion are tokenized separately and concatenated: at inference the
            # model continues from the prompt's own tokens, so that is the split to train on (a
            # joint tokenization could merge characters across the boundary).
            c = _encode(self.tok, rec["completion"]) + self.end
            ids, labels = p + c, [IGNORE_INDEX] * len(p) + c
        else:
            ids = self.prefix + _encode(self.tok, rec["text"]) + self.end
            labels = list(ids)
        return {"input_ids": ids[: self.max_length], "labels": labels[: self.max_length]}

    def _chat(self, messages, where):
        tok = self.tok
        if not getattr(tok, "chat_template", None):
            raise DataError(f"{where}: 'messages' records need a tokenizer with a chat template")

        def render(msgs, gen=False):
            try:
                return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
            except Exception as e:  # jinja2 errors, raise_exception() calls in templates
                raise DataError(f"{where}: the chat template failed on this conversation: {e}") from e

        full = render(messages)
        # Assistant spans as character ranges: the render of the conversation up to turn i with a
        # generation prompt ends where the assistant's text begins; the render including turn i ends
        # where it (with its end-of-turn markup) stops. (A template that ignores add_generation_prompt
        # makes the assistant header a target too: harmless.) Templates are append-only in practice; one
        # that is not (e.g. it rewrites earlier turns) is reported rather than mislabelled.
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            start_s, end_s = render(messages[:i], gen=True), render(messages[: i + 1])
            if not (full.startswith(start_s) and full.startswith(end_s) and len(start_s) <= len(end_s)):
                raise DataError(f"{where}: the chat template does not render conversations append-only; "
                                 f"cannot locate assistant turn {i}")
            spans.append((len(start_s), len(end_s)))
        ids, labels, pos = [], [], 0
        # Tokenize segment by segment so each token lies wholly inside or outside a target span;
        # templates put special tokens at turn boundaries, which tokenize the same either way. The
        # template writes its own BOS, hence add_special_tokens=False (as apply_chat_template does).
        for a, b in spans:
            seg = _encode(tok, full[pos:a])
            ids += seg
            labels += [IGNORE_INDEX] * len(seg)
            seg = _encode(tok, full[a:b])
            ids += seg
            labels += seg
            pos = b
        seg = _encode(tok, full[pos:])
        ids += seg
        labels += [IGNORE_INDEX] * len(seg)
        return ids, labels


def load_dataset(path, tokenizer, *, objective: str = "clm", max_length: Optional[int] = 512) -> list[dict]:
    """Read ``path`` (.jsonl or .txt) and tokenize it into a list of examples (see module doc).

    Examples longer than ``max_length`` are truncated (keeping the start). CLM examples left with no
    target after truncation (a prompt longer than max_length) are dropped with a warning.
    """
    if objective not in OBJECTIVES:
        raise UsageError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    if max_length is not None and (not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 2):
        raise UsageError(f"max_length must be an integer >= 2 or None, got {max_length!r}")
    path = os.fspath(path)
    records = read_records(path)
    if objective == "mlm":
        for line, rec in records:
            if "text" not in rec:
                raise DataError(f"{path}:{line}: the mlm objective needs 'text' records, got keys {sorted(rec)}")
    if not getattr(tokenizer, "chat_template", None):
        chat = next((line for line, rec in records if "messages" in rec), None)
        if chat is not None:
            raise DataError(f"{path}:{chat}: 'messages' records need a tokenizer with a chat template")
    tokenize = _Tokenize(tokenizer, objective, max_length if max_length is not None else 1 << 62)
    out, dropped = [], 0
    for line, rec in records:
        ex = tokenize(rec, f"{path}:{line}")
        # The label at position 0 is never predicted (labels shift inside the model).
        if objective == "clm" and not any(t != IGNORE_INDEX for t in ex["labels"][1:]):
            dropped += 1
            continue
        out.append(ex)
    if dropped:
        warnings.warn(f"{path}: dropped {dropped} of {len(records)} examples with no target tokens "
                      f"after truncation to max_length={max_length}", stacklevel=2)
    if not out:
        raise DataError(f"{path}: no example has target tokens (max_length={max_length})")
    return out


def train_eval_split(dataset, eval_fraction: float = 0.1, *, seed: int = 0):
    """Shuffle with ``seed`` and split off ``eval_fraction`` (at least one example each side)."""
    n = len(dataset)
    if not 0.0 < eval_fraction < 1.0:
        raise UsageError(f"eval_fraction must be in (0, 1), got {eval_fraction!r}")
    if n < 2:
        raise DataError(f"need at least 2 examples to split, got {n}")
    n_eval = min(n - 1, max(1, round(n * eval_fraction)))
    idx = list(range(n))
    random.Random(seed).shuffle(idx)
    return [dataset[i] for i in idx[n_eval:]], [dataset[i] for i in idx[:n_eval]]
