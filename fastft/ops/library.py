"""Kernel entry points as ``torch.library`` custom ops, each with a fake (meta) implementation.

Every place where fastft launches its own kernel (a Triton launcher, a C++ op) is one custom op in
the ``fastft`` namespace, so that

* ``torch.compile`` sees one opaque node per launch instead of tracing into launcher Python
  (autotuner caches, grid arithmetic) and breaking the graph;
* a whole training step can run on fake tensors (``FakeTensorMode``, e.g. fake CUDA tensors on a
  machine without a GPU) with a memory tracker around it: the fake implementation gives each output's
  shape, dtype and device, and the autograd Functions above the ops save exactly what they save for
  real -- the basis of ``benchmarks/mem_estimate.py``'s GPU-path estimates.

Usage (in the backend adapters, e.g. ``fastft/ops/triton_backend.py``)::

    def _fake(x, w, eps):
        return x.new_empty(x.shape), x.new_empty(x.shape[:-1], dtype=torch.float32)

    @kernel_op("triton_rms_norm_fwd", fake=_fake)
    def rms_norm_fwd(x: torch.Tensor, w: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        return _kernels.rms_norm_fwd(x, w, eps)

The schema is inferred from the type annotations (``torch.Tensor``, ``int``, ``float``, ``bool``,
``torch.Tensor | None``, ``list[torch.Tensor]``, tuples of tensors as results). Ops that write into
an argument name it in ``mutates_args`` and return None. Autograd stays in Python (the
``torch.autograd.Function`` that calls the forward and backward ops), so backends keep their own
choice of what to save.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch

NAMESPACE = "fastft"
_OPS: dict[str, object] = {}


def kernel_op(name: str, *, fake: Callable, mutates_args: Iterable[str] = ()) -> Callable:
    """Decorator: register ``fn`` as the custom op ``fastft::<name>`` with fake implementation ``fake``;
    returns the op (call it like ``fn``). Registering a name twice is an error."""

    def deco(fn):
        if name in _OPS:
            raise RuntimeError(f"fastft::{name} is already registered")
        op = torch.library.custom_op(f"{NAMESPACE}::{name}", fn, mutates_args=tuple(mutates_args))
        op.register_fake(fake)
        _OPS[name] = op
        return op

    return deco


def registered() -> dict[str, object]:
    """The custom ops registered through ``kernel_op`` so far (name -> op)."""
    return dict(_OPS)


__all__ = ["kernel_op", "registered", "NAMESPACE"]
