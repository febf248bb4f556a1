"""Collators: lists of examples -> dicts of tensors that go straight into ``model(**batch)``.

- ``DataCollatorForCLM``: right padding; labels -100 on pads; attention_mask 1 on real tokens.
- ``DataCollatorForPacking``: the examples concatenated into one row (1, total) for varlen
  attention, with ``cu_seqlens`` (int32, n_docs + 1), ``max_seqlen`` and ``position_ids``
  restarting at 0 per document. The model shifts labels, so the label at a document's first
  position is what the *previous* document's last token would be trained to predict; it is set to
  -100 so nothing is learnt across a boundary.
- ``DataCollatorForMLM``: BERT masking (Devlin et al. 2019): each non-special, non-pad token is
  selected with probability ``mlm_probability``; selected tokens become [MASK] (80%), a random
  token (10%) or stay (10%); labels are the original ids at selected positions, -100 elsewhere.
  Randomness comes from the collator's own generator when a seed is given (its state can be
  checkpointed: ``state_dict``/``load_state_dict``), else from torch's global RNG.

Every collator has an ``objective`` attribute ("clm" / "mlm"): the trainer needs it to count target
tokens the way the model does (CLM models drop the first label when shifting).
"""
from __future__ import annotations

from ..errors import DataError, UsageError

from typing import Optional, Sequence

import torch

from .data import IGNORE_INDEX


def _ids_of(ex, max_length):
    ids = ex["input_ids"]
    ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
    return ids[:max_length] if max_length is not None else ids


def _labels_of(ex, ids, max_length):
    if "labels" not in ex or ex["labels"] is None:
        return list(ids)
    lab = ex["labels"]
    lab = lab.tolist() if isinstance(lab, torch.Tensor) else list(lab)
    lab = lab[:max_length] if max_length is not None else lab
    if len(lab) != len(ids):
        raise DataError(f"example has {len(ids)} input_ids but {len(lab)} labels")
    return lab


def _check_features(features):
    if not features:
        raise UsageError("cannot collate an empty list of examples")
    for ex in features:
        if "input_ids" not in ex or len(ex["input_ids"]) == 0:
            raise DataError("every example needs a non-empty 'input_ids'")


class DataCollatorForCLM:
    objective = "clm"

    def __init__(self, pad_token_id: int = 0, *, max_length: Optional[int] = None,
                 pad_to_multiple_of: Optional[int] = None):
        if max_length is not None and max_length < 1:
            raise UsageError(f"max_length must be >= 1, got {max_length}")
        if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
            raise UsageError(f"pad_to_multiple_of must be >= 1, got {pad_to_multiple_of}")
        self.pad_token_id = int(pad_token_id)
        self.max_length = max_length
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: Sequence[dict]) -> dict:
        _check_features(features)
        rows = [_ids_of(ex, self.max_length) for ex in features]
        labs = [_labels_of(ex, ids, self.max_length) for ex, ids in zip(features, rows)]
        T = max(len(r) for r in rows)
        if self.pad_to_multiple_of:
            T = -(-T // self.pad_to_multiple_of) * self.pad_to_multiple_of
        B = len(rows)
        input_ids = torch.full((B, T), self.pad_token_id, dtype=torch.long)
        labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((B, T), dtype=torch.long)
        for i, (r, lab) in enumerate(zip(rows, labs)):
            input_ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
            labels[i, : len(r)] = torch.tensor(lab, dtype=torch.long)
            attention_mask[i, : len(r)] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


class DataCollatorForPacking:
    objective = "clm"

    def __init__(self, *, max_length: Optional[int] = None):
        if max_length is not None and max_length < 1:
            raise UsageError(f"max_length must be >= 1, got {max_length}")
        self.max_length = max_length

    def __call__(self, features: Sequence[dict]) -> dict:
        _check_features(features)
        ids, labels, pos, cu = [], [], [], [0]
        for ex in features:
            r = _ids_of(ex, self.max_length)
            lab = _labels_of(ex, r, self.max_length)
            lab[0] = IGNORE_INDEX
            ids += r
            labels += lab
            pos += range(len(r))
            cu.append(cu[-1] + len(r))
        lengths = [b - a for a, b in zip(cu, cu[1:])]
        return {
            "input_ids": torch.tensor([ids], dtype=torch.long),  # (1, total)
            "labels": torch.tensor([labels], dtype=torch.long),
            "position_ids": torch.tensor([pos], dtype=torch.long),
            "cu_seqlens": torch.tensor(cu, dtype=torch.int32),  # (n_docs + 1,)
            "max_seqlen": max(lengths),
        }


class DataCollatorForMLM:
    objective = "mlm"

    def __init__(self, tokenizer=None, *, mlm_probability: float = 0.15, mask_token_id: Optional[int] = None,
                 pad_token_id: Optional[int] = None, vocab_size: Optional[int] = None,
                 special_token_ids: Optional[Sequence[int]] = None, seed: Optional[int] = None,
                 generator: Optional[torch.Generator] = None, max_length: Optional[int] = None):
        if tokenizer is not None:
            mask_token_id = tokenizer.mask_token_id if mask_token_id is None else mask_token_id
            pad_token_id = tokenizer.pad_token_id if pad_token_id is None else pad_token_id
            vocab_size = len(tokenizer) if vocab_size is None else vocab_size
            if special_token_ids is None:
                special_token_ids = tokenizer.all_special_ids
        if mask_token_id is None:
            raise UsageError("MLM needs a mask token: the tokenizer has none and mask_token_id was not given")
        if vocab_size is None or vocab_size < 2:
            raise UsageError(f"MLM needs vocab_size >= 2 (or a tokenizer), got {vocab_size}")
        if not 0.0 < mlm_probability < 1.0:
            raise UsageError(f"mlm_probability must be in (0, 1), got {mlm_probability}")
        if seed is not None and generator is not None:
            raise UsageError("give a seed or a generator, not both")
        self.mask_token_id = int(mask_token_id)
        self.pad_token_id = int(pad_token_id) if pad_token_id is not None else 0
        self.vocab_size = int(vocab_size)
        self.special_token_ids = sorted({int(t) for t in (special_token_ids or [])} | {self.mask_token_id}
                                        | ({int(pad_token_id)} if pad_token_id is not None else set()))
        self.mlm_probability = float(mlm_probability)
        self.max_length = max_length
        if seed is not None:
            generator = torch.Generator().manual_seed(int(seed))
        self.generator = generator

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()} if self.generator is not None else {}

    def load_state_dict(self, sd: dict):
        if self.generator is not None and "generator" in sd:
            self.generator.set_state(sd["generator"])

    def __call__(self, features: Sequence[dict]) -> dict:
        _check_features(features)
        rows = [_ids_of(ex, self.max_length) for ex in features]
        B, T = len(rows), max(len(r) for r in rows)
        input_ids = torch.full((B, T), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((B, T), dtype=torch.long)
        for i, r in enumerate(rows):
            input_ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
            attention_mask[i, : len(r)] = 1
        input_ids, labels = self.mask_tokens(input_ids, attention_mask.bool())
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

    def mask_tokens(self, input_ids: torch.Tensor, real: torch.Tensor):
        """Apply 80/10/10 masking to (B, T) ids; ``real`` is True on non-pad positions."""
        g = self.generator
        special = torch.isin(input_ids, torch.tensor(self.special_token_ids, dtype=input_ids.dtype))
        candidates = real & ~special
        # One uniform draw per position decides selection and the replacement kind together:
        # u < p*0.8 -> [MASK], < p*0.9 -> random token, < p -> unchanged; this consumes a fixed
        # number of random numbers per batch shape, which keeps resumed runs reproducible.
        u = torch.rand(input_ids.shape, generator=g)
        rand_tok = torch.randint(self.vocab_size, input_ids.shape, generator=g, dtype=input_ids.dtype)
        p = self.mlm_probability
        selected = candidates & (u < p)
        to_mask = selected & (u < 0.8 * p)
        to_rand = selected & (u >= 0.8 * p) & (u < 0.9 * p)
        labels = torch.where(selected, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
        out = torch.where(to_mask, torch.full_like(input_ids, self.mask_token_id), input_ids)
        out = torch.where(to_rand, rand_tok, out)
        return out, labels


def _pad_id(tokenizer):
    for name in ("pad_token_id", "eos_token_id"):
        v = getattr(tokenizer, name, None)
        if v is not None:
            return int(v)
    return 0


def default_collator(tokenizer=None, *, objective: str = "clm", packing: bool = False,
                     max_length: Optional[int] = None, seed: Optional[int] = None):
    """The collator fastft uses for ``objective`` ("clm" / "mlm"); packing applies to CLM only."""
    if objective == "mlm":
        if packing:
            raise UsageError("packing is implemented for the clm objective only")
        if tokenizer is None:
            raise UsageError("the mlm collator needs a tokenizer (for [MASK], pad and special tokens)")
        return DataCollatorForMLM(tokenizer, seed=seed, max_length=max_length)
    if objective != "clm":
        raise UsageError(f"objective must be 'clm' or 'mlm', got {objective!r}")
    if packing:
        return DataCollatorForPacking(max_length=max_length)
    return DataCollatorForCLM(_pad_id(tokenizer) if tokenizer is not None else 0, max_length=max_length)
