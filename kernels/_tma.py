"""Hopper TMA (tensor memory accelerator) support shared by the kernel modules.

The attention forward and the fused LoRA GEMMs offer autotune configs (``USE_TMA``) whose loads go
through device-side tensor descriptors (``tl.make_tensor_descriptor``). Those need

* tensors the TMA can address: 16-byte aligned base, 16-byte multiple strides except the last,
  which is 1, and inner rows of at least 16 bytes (``addressable``), on an sm_90+ GPU or under the
  interpreter (``device_ok``); the launchers pass the answer as the ``TMA_OK`` constexpr, which
  compiles the TMA code out where it is False;
* Triton's scratch allocator for the descriptors (``ensure_allocator``);
* the autotuner's lists to fall back where TMA cannot run (``plain_twins``).
"""
from __future__ import annotations

import torch
import triton

from ._common import interpreting


def device_ok(device: torch.device) -> bool:
    """A Hopper (sm_90+) GPU, or CPU tensors under the interpreter."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device)[0] >= 9
    return interpreting()


def addressable(*tensors: torch.Tensor) -> bool:
    """Whether TMA descriptors may address these tensors (any rank, innermost dim contiguous) on
    their device."""
    if not tensors or not device_ok(tensors[0].device):
        return False
    for t in tensors:
        es = t.element_size()
        if t.dim() == 0 or t.stride(-1) != 1 or t.shape[-1] * es < 16 or t.data_ptr() % 16:
            return False
        if any(st * es % 16 for st in t.stride()[:-1]):
            return False
    return True


def _alloc(size: int, alignment: int, stream):
    return torch.empty(size, dtype=torch.int8, device="cuda")


def ensure_allocator(device: torch.device) -> None:
    """Device-side tensor descriptors need Triton's scratch allocator: set one (a torch buffer)
    where none is set in this context (Triton keeps it in a ContextVar, so per thread)."""
    if device.type != "cuda":
        return
    from triton.runtime import _allocation

    if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        triton.set_allocator(_alloc)


def plain_twins(configs: list, reset: tuple = ()) -> list:
    """``configs`` with every ``USE_TMA`` config replaced by its pointer-load twin (``USE_TMA``
    False, and the ``reset`` kwargs False too), each distinct config kept once, in order."""
    out, seen = [], set()
    for c in configs:
        kw = dict(c.kwargs)
        if kw.get("USE_TMA"):
            kw.update({"USE_TMA": False, **{k: False for k in reset}})
        key = (tuple(sorted(kw.items())), c.num_warps, c.num_stages)
        if key not in seen:
            seen.add(key)
            out.append(c if kw == c.kwargs else triton.Config(kw, num_warps=c.num_warps, num_stages=c.num_stages))
    return out
