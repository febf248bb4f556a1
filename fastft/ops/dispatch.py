"""Backend dispatch for fastft ops.

Every op has up to three implementations with one signature:

* ``triton``    -- Triton kernels in ``fastft.kernels`` (CUDA tensors; CPU tensors only under
                   ``TRITON_INTERPRET=1``, which is how the tests check kernel semantics).
* ``cpp``       -- the C++ CPU extension ``fastft._C`` (built from ``csrc/``), when it is built.
* ``torch``     -- lean compositions of PyTorch ops (``fastft.ops.lean``): vendor-BLAS matmuls with
                   fastft's autograd bookkeeping (what is saved, regenerated dropout masks); any device.
* ``reference`` -- pure PyTorch (``fastft.ops.reference``): any device, float64-capable, autograd.

``FASTFT_BACKEND=auto|triton|cpp|torch|reference`` overrides the automatic choice, which is per op
and device: CPU -> cpp if built, else torch (the lean LoRA / quant-matmul compositions, which need
no compiler: 1.29x the reference's fp32 LoRA step on SmolLM2 here, 0.80x its RSS), else reference;
CUDA -> triton, except the ops in ``CUDA_PREFER``,
which go to the backend measured faster on a GPU (``torch`` for lora_linear and quant_matmul, see
the H200 numbers in fastft/ops/lean.py). An op that has no implementation on the chosen
backend falls back to ``reference`` (an explicit ``FASTFT_BACKEND`` that names a backend with no
implementation of the op for that device falls back too, with one log line per op).

Backends register lazily: nothing is imported and no device is queried until the first call.
"""
from __future__ import annotations

import importlib
import logging
import os
from typing import Callable

import torch

logger = logging.getLogger("fastft")

BACKENDS = ("triton", "cpp", "torch", "reference")
_IMPLS: dict[str, dict[str, Callable]] = {b: {} for b in BACKENDS}
# Modules that register implementations when imported, per backend.
_PROVIDERS: dict[str, list[str]] = {
    "reference": ["fastft.ops.reference"],
    # One module per kernel file; each registers its ops with @register(op, "triton") on import.
    "triton": ["fastft.kernels.attention", "fastft.kernels.quant", "fastft.kernels.lora"],
    # The C++ extension's Python side registers the CPU ops it was built with.
    "cpp": ["fastft.ops.cpp"],
    "torch": ["fastft.ops.lean", "fastft.ops.loss"],
}
# On CUDA, ops whose first choice is not triton, from measurements (benchmarks/results/gpu.md,
# benchmarks/NOTES.md): on an H200 the lean cuBLAS compositions beat the fused Triton GEMMs.
CUDA_PREFER: dict[str, str] = {"lora_linear": "torch", "quant_matmul": "torch",
                               # chunked cuBLAS GEMMs around the cross-entropy rows kernel
                               "linear_cross_entropy": "torch",
                               # the fused LoRA node's quantized dX: the Triton dequantize + cuBLAS
                               "quant_matmul_grad_x": "torch"}
_loaded: set[str] = set()
_warned: set[tuple[str, str]] = set()


def register(op: str, backend: str):
    """Decorator: ``@register("attention", "triton")`` makes ``fn`` that backend's implementation."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")

    def deco(fn):
        _IMPLS[backend][op] = fn
        return fn

    return deco


def add_provider(backend: str, module: str) -> None:
    """Declare that importing ``module`` registers implementations for ``backend``."""
    if module not in _PROVIDERS[backend]:
        _PROVIDERS[backend].append(module)


def _load(backend: str) -> None:
    if backend in _loaded:
        return
    _loaded.add(backend)
    for mod in _PROVIDERS[backend]:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            # The provider (or triton itself) is absent: that backend is simply unavailable. Any other
            # import error inside a provider is a bug and propagates.
            if e.name not in (mod, "triton", "fastft._C"):
                raise
            logger.info("fastft: backend %s provider %s unavailable (%s)", backend, mod, e)


def requested_backend() -> str:
    b = os.environ.get("FASTFT_BACKEND", "auto").strip().lower() or "auto"
    if b not in BACKENDS + ("auto",):
        raise ValueError(f"FASTFT_BACKEND={b!r} is not one of auto, triton, cpp, torch, reference")
    return b


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def backend_for(op: str, device: torch.device) -> str:
    """The backend that will run ``op`` for tensors on ``device``."""
    req = requested_backend()
    if req == "auto":
        if device.type == "cuda":
            order = [CUDA_PREFER[op], "triton", "reference"] if op in CUDA_PREFER else ["triton", "reference"]
        elif device.type == "cpu":
            order = ["cpp", "torch", "reference"]
        else:
            order = ["reference"]
    else:
        order = [req, "reference"]
    for b in order:
        if b == "triton" and device.type != "cuda" and not _interpreting():
            continue
        if b == "cpp" and device.type != "cpu":
            continue
        _load(b)
        if op in _IMPLS[b]:
            if req != "auto" and b != req and (op, req) not in _warned:
                _warned.add((op, req))
                logger.warning("fastft: op %s has no %s implementation for %s; using %s", op, req, device.type, b)
            return b
    raise NotImplementedError(f"fastft op {op!r} has no implementation for device {device}")


def get_impl(op: str, device: torch.device) -> Callable:
    return _IMPLS[backend_for(op, device)][op]


def impl(op: str, backend: str) -> Callable:
    """A specific backend's implementation (tests compare backends with this)."""
    _load(backend)
    try:
        return _IMPLS[backend][op]
    except KeyError:
        raise NotImplementedError(f"fastft op {op!r} has no {backend} implementation") from None
