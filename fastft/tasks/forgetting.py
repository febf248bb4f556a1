"""The forgetting report: how much of its general ability a model keeps after fine-tuning.

The model is measured on a general reference text set that is not the training data: docstrings of
the Python standard library (``fastft/data/reference_stdlib.jsonl``, built by
``fastft/data/make_reference.py``; provenance in ``fastft/data/README.md``). ``docs`` documents are
taken at a fixed stride through the file (so every module family is represented), each truncated to
``max_length`` tokens.

- **Causal LMs**: perplexity = exp(mean next-token loss over the reference tokens).
- **Encoders (BERT family)**: masked-token accuracy. In each document, 15% of the non-special
  tokens are chosen by a generator seeded with ``seed`` (the same positions for every model) and
  all replaced by [MASK]; accuracy = share of them whose original token is the argmax. A masked LM
  is scored with its own head. A task model (classifier, tagger, embedder) has none: it is scored
  with the *base* model's MLM head (a frozen copy) on top of its encoder -- the head reads the
  encoder's output, so whatever the fine-tuning changed in the encoder shows.
- **Encoders whose base has no MLM head** (all-MiniLM-L6-v2 is a bare BertModel, trained for
  sentence similarity): reference retrieval MRR. Each document is cut in two halves (at the middle
  word); each first half is a query, the second halves are the candidates, scored by cosine
  similarity of mean-pooled last hidden states; MRR of the matching half. (A fitted MLM probe is
  no measure there: on all-MiniLM-L6-v2 a head trained on the base's [MASK] states scores at the
  level of always predicting the most frequent token, so it could not show anything being lost.)

``ForgettingProbe.build(model, tokenizer)`` prepares the data (and the head) from the model as it is
*before* training; ``probe.measure(model)`` returns ``{"metric", "value", "tokens"}``;
``report(base, tuned, task_base, task_tuned)`` makes the table and the JSON row.
"""
from __future__ import annotations

import copy
import json
import math
import os
from typing import Optional

import torch
import torch.nn.functional as F

from .evaluate import _device
from .evaluate import _eval_mode as _eval  # one definition of "score without grad, then restore"

REFERENCE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data",
                         "reference_stdlib.jsonl")
MASK_PROB = 0.15


def reference_texts(docs: Optional[int] = None, offset: int = 0, path: str = REFERENCE) -> list[str]:
    """``docs`` reference documents at a fixed stride through the file (all when None), starting at
    ``offset`` within each stride."""
    with open(path, encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f if line.strip()]
    if docs is None or docs >= len(texts):
        return texts
    stride = len(texts) // docs
    return [texts[i * stride + (offset % stride)] for i in range(docs)]


def _unwrap(model):
    """The model inside PEFT-style wrappers (FastPeftModel / peft.PeftModel: ``.base_model.model``)."""
    m = model
    for _ in range(3):
        inner = getattr(getattr(m, "base_model", None), "model", None)
        if inner is None or not isinstance(inner, torch.nn.Module):
            break
        m = inner
    return m


# Masked-LM families (the same list as fastft.train.trainer's, which imports this module).
ENCODER_MODEL_TYPES = {"bert", "roberta", "xlm-roberta", "distilbert", "electra", "albert", "deberta", "deberta-v2",
                       "camembert", "mpnet", "modernbert"}


def is_encoder(model) -> bool:
    mt = getattr(getattr(_unwrap(model), "config", None), "model_type", None)
    return mt in ENCODER_MODEL_TYPES


def _pad(rows, pad):
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad, dtype=torch.long)
    am = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        am[i, : len(r)] = 1
    return ids, am


def _mlm_head_of(model):
    """(head module, True) when the unwrapped model is a masked LM with its own head."""
    inner = _unwrap(model)
    from fastft.models.bert import BertForMaskedLM

    if isinstance(inner, BertForMaskedLM):
        return inner.head, True
    get_out = getattr(inner, "get_output_embeddings", None)
    if type(inner).__name__.endswith("ForMaskedLM") and callable(get_out):
        return None, True  # a transformers masked LM: its logits come from its own forward
    return None, False


def encoder_states(model, input_ids, attention_mask):
    """Last hidden states (B, T, H) of the encoder of a native or transformers BERT-family model."""
    inner = _unwrap(model)
    if hasattr(inner, "encode"):
        return inner.encode(input_ids, attention_mask)[0]
    base = getattr(inner, getattr(inner, "base_model_prefix", ""), None) or inner
    return base(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


class ForgettingProbe:
    def __init__(self, kind, batches, head=None, head_source=None, docs=0, max_length=0, batch_size=8):
        self.kind = kind  # "perplexity" | "masked_accuracy"
        self.batches = batches  # list of (input_ids, attention_mask, labels) on the CPU
        self.head = head  # MLM head for task encoders (frozen copy)
        self.head_source = head_source  # "model" | "base" (masked accuracy only)
        self.docs, self.max_length, self.batch_size = docs, max_length, batch_size

    @property
    def metric(self) -> str:
        return {"perplexity": "reference_perplexity", "masked_accuracy": "reference_masked_accuracy",
                "retrieval": "reference_retrieval_mrr"}[self.kind]

    # --- construction ------------------------------------------------------------------------------
    @classmethod
    def build(cls, model, tokenizer, *, docs: int = 48, max_length: int = 128, seed: int = 0, batch_size: int = 8,
              base_path: Optional[str] = None):
        """Tokenize the reference set for ``model`` (measured as it is now, i.e. the base) and, for a
        task encoder, prepare the MLM head (see the module doc)."""
        if tokenizer is None:
            raise ValueError("the forgetting report needs the model's tokenizer")
        if max_length < 8:
            raise ValueError(f"max_length must be >= 8, got {max_length}")
        cfg = getattr(_unwrap(model), "config", None)
        limit = getattr(cfg, "max_position_embeddings", None)
        if limit:  # RoBERTa's positions start after padding_idx
            limit -= (cfg.pad_token_id + 1) if getattr(cfg, "model_type", "") == "roberta" else 0
            max_length = min(max_length, limit)
        texts = reference_texts(docs)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
        if not is_encoder(model):
            inner = _unwrap(model)
            if getattr(inner, "task", None) == "classify" or "ForSequenceClassification" in type(inner).__name__:
                raise ValueError("the forgetting report of a causal-LM classifier is not implemented "
                                 "(it has no LM head to measure perplexity with)")
            rows = [tokenizer(t, add_special_tokens=True, truncation=True, max_length=max_length)["input_ids"]
                    for t in texts]
            batches = []
            for i in range(0, len(rows), batch_size):
                ids, am = _pad(rows[i: i + batch_size], pad)
                batches.append((ids, am, ids.masked_fill(am == 0, -100)))
            return cls("perplexity", batches, docs=len(rows), max_length=max_length, batch_size=batch_size)

        batches = cls._masked_batches(tokenizer, texts, max_length, seed, batch_size, pad)
        head, own = _mlm_head_of(model)
        if own:
            return cls("masked_accuracy", batches, None, "model", len(texts), max_length, batch_size)
        inner = _unwrap(model)
        base_path = (base_path or getattr(inner, "source_path", None)
                     or getattr(getattr(inner, "config", None), "_name_or_path", None))
        if not base_path or not os.path.isdir(base_path):
            raise ValueError("the forgetting report of a BERT task model needs the base checkpoint (for its MLM "
                             f"head); pass base_path (found {base_path!r})")
        import fastft

        base = fastft.from_pretrained(base_path)
        if getattr(base, "mlm_head_initialised", False):
            return cls("retrieval", cls._halves(tokenizer, texts, max_length, batch_size, pad), None, None,
                       len(texts), max_length, batch_size)
        head = copy.deepcopy(base.head).to(_device(model)).float().eval()
        head.requires_grad_(False)
        return cls("masked_accuracy", batches, head, "base", len(texts), max_length, batch_size)

    @staticmethod
    def _halves(tokenizer, texts, max_length, batch_size, pad):
        firsts, seconds = [], []
        for t in texts:
            words = t.split()
            mid = len(words) // 2
            for part, out in ((words[:mid], firsts), (words[mid:], seconds)):
                out.append(tokenizer(" ".join(part), add_special_tokens=True, truncation=True,
                                     max_length=max_length)["input_ids"])
        batches = []
        for i in range(0, len(texts), batch_size):
            a, am = _pad(firsts[i: i + batch_size], pad)
            b, bm = _pad(seconds[i: i + batch_size], pad)
            batches.append((a, am, b, bm))
        return batches

    @staticmethod
    def _masked_batches(tokenizer, texts, max_length, seed, batch_size, pad):
        if tokenizer.mask_token_id is None:
            raise ValueError("masked-token accuracy needs a tokenizer with a mask token")
        g = torch.Generator().manual_seed(seed)
        special = set(tokenizer.all_special_ids)
        rows, labs = [], []
        for t in texts:
            ids = tokenizer(t, add_special_tokens=True, truncation=True, max_length=max_length)["input_ids"]
            cand = torch.tensor([i not in special for i in ids])
            chosen = cand & (torch.rand(len(ids), generator=g) < MASK_PROB)
            if not bool(chosen.any()):  # every document contributes at least one masked token
                chosen[int(cand.nonzero()[0])] = True
            x = torch.tensor(ids)
            rows.append(torch.where(chosen, tokenizer.mask_token_id, x).tolist())
            labs.append(torch.where(chosen, x, -100).tolist())
        batches = []
        for i in range(0, len(rows), batch_size):
            ids, am = _pad(rows[i: i + batch_size], pad)
            lab, _ = _pad(labs[i: i + batch_size], -100)
            batches.append((ids, am, lab))
        return batches

    # --- measurement -------------------------------------------------------------------------------
    def measure(self, model) -> dict:
        dev = _device(model)
        total, n = 0.0, 0
        if self.kind == "retrieval":
            from .metrics import mrr
            from fastft.models.heads import mean_pool

            qs, cs = [], []
            with _eval(model):
                for a, am, b, bm in self.batches:
                    for ids, m, out in ((a, am, qs), (b, bm, cs)):
                        ids, m = ids.to(dev), m.to(dev)
                        out.append(F.normalize(mean_pool(encoder_states(model, ids, m), m).float(), dim=-1))
            Q, C = torch.cat(qs), torch.cat(cs)
            return {"metric": self.metric, "value": mrr((Q @ C.T).tolist(), list(range(len(Q)))), "tokens": len(Q)}
        with _eval(model):
            for ids, am, lab in self.batches:
                ids, am, lab = ids.to(dev), am.to(dev), lab.to(dev)
                if self.kind == "perplexity":
                    logits = model(input_ids=ids, attention_mask=am).logits.float()
                    tgt = lab[:, 1:]
                    total += float(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), tgt.reshape(-1),
                                                   ignore_index=-100, reduction="sum"))
                    n += int((tgt != -100).sum())
                else:
                    if self.head is None:
                        logits = model(input_ids=ids, attention_mask=am).logits
                    else:
                        logits = self.head(encoder_states(model, ids, am).float())
                    sel = lab != -100
                    total += float((logits.argmax(-1)[sel] == lab[sel]).sum())
                    n += int(sel.sum())
        if self.kind == "perplexity":
            value = math.exp(total / n) if total / n < 700 else float("inf")
        else:
            value = total / n
        out = {"metric": self.metric, "value": value, "tokens": n}
        if self.head_source:
            out["head"] = self.head_source
        return out


def report(base: dict, tuned: dict, task_base: Optional[dict] = None, task_tuned: Optional[dict] = None,
           task_metric: Optional[str] = None) -> tuple[dict, str]:
    """(JSON-able report, text table) comparing base and fine-tuned reference (and task) metrics."""
    b, t = base["value"], tuned["value"]
    if base["metric"] == "reference_perplexity":
        change = (t / b - 1.0) if b > 0 else float("nan")
        forgot = change  # relative perplexity increase: > 0 is forgetting
        desc = "relative perplexity change (> 0: forgot)"
    else:
        change = t - b
        forgot = -change  # accuracy points lost
        desc = "accuracy / MRR change (< 0: forgot)"
    rep = {"reference_metric": base["metric"], "base": b, "fine_tuned": t, "change": change,
           "forgetting": forgot, "reference_tokens": base["tokens"], "reference_set": os.path.basename(REFERENCE)}
    if base.get("head"):
        rep["head"] = base["head"]
    rows = [(base["metric"], b, t, change)]
    if task_tuned is not None and task_metric:
        tb = task_base.get(task_metric) if task_base else None
        tt = task_tuned.get(task_metric)
        rep.update({"task_metric": task_metric, "task_base": tb, "task_fine_tuned": tt})
        rows.append((f"task {task_metric}", tb, tt, (tt - tb) if tb is not None and tt is not None else None))

    def f(x):
        return "-" if x is None else (f"{x:.4g}" if isinstance(x, float) else str(x))

    lines = ["forgetting report (reference: Python stdlib docstrings; " + desc + ")",
             f"| {'metric':<28} | {'base':>10} | {'fine-tuned':>10} | {'change':>10} |",
             f"|{'-' * 30}|{'-' * 12}|{'-' * 12}|{'-' * 12}|"]
    for name, x, y, c in rows:
        lines.append(f"| {name:<28} | {f(x):>10} | {f(y):>10} | {f(c):>10} |")
    return rep, "\n".join(lines)


__all__ = ["ForgettingProbe", "reference_texts", "report", "encoder_states", "is_encoder", "REFERENCE"]
