"""Argument checks shared by the public ops and their backends (a leaf: imports torch only)."""
from __future__ import annotations

import torch


def check_linear_cross_entropy_args(hidden, weight, labels, ignore_index, reduction, bias) -> None:
    if reduction not in ("mean", "sum"):
        raise ValueError(f"linear_cross_entropy: reduction must be 'mean' or 'sum', got {reduction!r}")
    if weight.dim() != 2 or hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"linear_cross_entropy: hidden (..., H) and weight (V, H) must agree on H, got "
                         f"{tuple(hidden.shape)} and {tuple(weight.shape)}")
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(f"linear_cross_entropy: labels {tuple(labels.shape)} must have hidden's leading shape "
                         f"{tuple(hidden.shape[:-1])}")
    if labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"linear_cross_entropy: labels must be int64 or int32, got {labels.dtype}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"linear_cross_entropy: bias must be ({weight.shape[0]},), got {tuple(bias.shape)}")
    if not hidden.is_floating_point() or not weight.is_floating_point():
        raise ValueError(f"linear_cross_entropy: hidden and weight must be floating point, got {hidden.dtype} and "
                         f"{weight.dtype}")


def check_targets(targets: torch.Tensor, vocab: int, ignore_index: int, op: str) -> None:
    """Every target is ``ignore_index`` or in [0, vocab): a ValueError on CPU, an asynchronous device
    assert elsewhere (no host synchronisation in a GPU training step)."""
    ok = ((targets == ignore_index) | ((targets >= 0) & (targets < vocab))).all()
    msg = f"{op}: a target is outside [0, {vocab}) and is not ignore_index {ignore_index}"
    # fake tensors (memory estimates, fastft/memory.py) have no values to read: the assert path
    if targets.device.type == "cpu" and not torch._subclasses.fake_tensor.is_fake(targets):
        if not ok:
            raise ValueError(msg)
    else:
        torch._assert_async(ok, msg)


__all__ = ["check_linear_cross_entropy_args", "check_targets"]
