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
no compiler), else reference; CUDA -> triton, except the ops in ``CUDA_PREFER``, which go to the
backend measured faster on a GPU (``torch`` for lora_linear and quant_matmul; benchmarks/NOTES.md).
An op that has no implementation on the chosen backend falls back to ``reference`` (an explicit
``FASTFT_BACKEND`` that names a backend with no implementation of the op for that device falls back
too, with one log line per op).

A registration may carry a predicate, ``register(op, backend, supports=fn)``: ``fn`` takes the op's
arguments and says whether this implementation takes the call (a dtype, device or shape the backend
does not cover returns False). Calls it rejects run the ``reference`` implementation. The registered
function applies its predicate itself, so calling a backend's function directly (``impl(op, b)(...)``)
behaves as a dispatched call, and ``backend_for(op, device, *args, **kw)`` names the backend that
really runs for those arguments (without arguments it answers per device, predicates unasked).

Backends register lazily: nothing is imported and no device is queried until the first call.
"""
from __future__ import annotations

import functools
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
    "reference": ["fastft.ops.reference", "fastft.ops.reference_quant"],
    # The adapter over fastft.kernels (which import nothing from fastft): it registers the Triton ops.
    "triton": ["fastft.ops.triton_backend"],
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


def register(op: str, backend: str, *, supports: Callable[..., bool] | None = None):
    """Decorator: ``@register("attention", "triton")`` makes ``fn`` that backend's implementation.

    ``supports(*args, **kw) -> bool`` (same signature as the op) says which calls the implementation
    takes; the decorated function runs the reference implementation for the others. A predicate may
    raise the op's own argument error (it sees the arguments first). Registering an already
    registered function (``register("lora_linear", "cpp")(lean.lora_linear)``) keeps its predicate.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")

    def deco(fn):
        raw, pred = getattr(fn, "raw", fn), supports
        if pred is None:
            pred = getattr(fn, "supports", None)
        if pred is None:
            _IMPLS[backend][op] = fn
            return fn

        @functools.wraps(raw)
        def guarded(*args, **kw):
            if pred(*args, **kw):
                return raw(*args, **kw)
            return impl(op, "reference")(*args, **kw)

        guarded.raw, guarded.supports = raw, pred
        _IMPLS[backend][op] = guarded
        return guarded

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


def backend_for(op: str, device: torch.device, *args, **kw) -> str:
    """The backend that will run ``op`` for tensors on ``device``; given the call's arguments too,
    the one that runs that call (a backend whose predicate rejects them hands it to the reference)."""
    b = _backend_for_device(op, device)
    if (args or kw) and not _accepts(_IMPLS[b][op], args, kw):
        return "reference"
    return b


def _accepts(fn, args, kw) -> bool:
    pred = getattr(fn, "supports", None)
    return pred is None or bool(pred(*args, **kw))


def _backend_for_device(op: str, device: torch.device) -> str:
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
    """The implementation ``op`` gets for tensors on ``device`` (it applies its own predicate)."""
    return _IMPLS[_backend_for_device(op, device)][op]


def call(op: str, device: torch.device, *args, **kw):
    """Run ``op`` on ``args`` with the backend ``backend_for(op, device, *args, **kw)`` names."""
    fn = _IMPLS[_backend_for_device(op, device)][op]
    if _accepts(fn, args, kw):
        return getattr(fn, "raw", fn)(*args, **kw)
    return _IMPLS["reference"][op](*args, **kw)


def impl(op: str, backend: str) -> Callable:
    """A specific backend's implementation (tests compare backends with this)."""
    _load(backend)
    try:
        return _IMPLS[backend][op]
    except KeyError:
        raise NotImplementedError(f"fastft op {op!r} has no {backend} implementation") from None
