"""The reused dequantize workspace of the lean 4-bit matmuls: no allocation per call.

A QLoRA step dequantizes every 4-bit base weight in forward, again in backward (dX) and again in
the recompute of a checkpointed layer; the dense copy lives only until its GEMM has been enqueued.
``dequantize_transient(qweight, dtype)`` writes it into one grow-only flat buffer per (device,
dtype, stream) -- on CUDA through the Triton dequantize kernel, on CPU through the C++ one -- so the
step allocates no dense weight and its memory never depends on which weight came last (the buffer
holds the largest weight seen, e.g. 14336 x 4096 bf16 = 112 MiB at the Llama-3-8B shape).

The result is a view of the shared buffer, valid until the next call for the same (device, dtype,
stream): callers must use it at once and never keep it (the matmul autograd nodes save the quantized
weight, never the dense one). Work on one stream is ordered, so a later dequantize cannot overwrite
the buffer before the GEMM enqueued before it has read it; other streams get their own buffer.
Fake / meta tensors (memory estimates, ``torch.compile`` tracing) and calls the kernels do not take
allocate as before (``fastft.ops.nf4_dequantize`` / ``int4_dequantize``, whose results are the
caller's to keep).
"""
from __future__ import annotations

import torch

from fastft.quant.int4 import Int4Weight
from fastft.quant.nf4 import NF4Weight

_BUFFERS: dict = {}
_INTO: dict = {}  # device type -> fn(NF4Weight, out (out, in) view) -> out: a backend's dequantize-into


def register_into(device_type: str, fn) -> None:
    """A backend's NF4 dequantize into a given contiguous (out, in) tensor (the C++ one on CPU)."""
    _INTO[device_type] = fn


def _stream_key(device: torch.device):
    if device.type == "cuda":
        return torch.cuda.current_stream(device).cuda_stream
    return 0


def workspace(device: torch.device, dtype: torch.dtype, numel: int) -> torch.Tensor:
    """The flat buffer of ``dtype`` on ``device`` (current stream) with at least ``numel`` elements,
    grown (never shrunk) on demand."""
    key = (device.type, device.index if device.type != "cuda" or device.index is not None
           else torch.cuda.current_device(), dtype, _stream_key(device))
    buf = _BUFFERS.get(key)
    if buf is None or buf.numel() < numel:
        _BUFFERS.pop(key, None)
        del buf  # free the smaller buffer before the larger one is allocated
        buf = _BUFFERS[key] = torch.empty(numel, dtype=dtype, device=device)
    return buf


def clear() -> None:
    """Drop every workspace (their memory returns to the allocator)."""
    _BUFFERS.clear()


def _real(t) -> bool:
    return type(t) is torch.Tensor and t.device.type != "meta"


def dequantize_transient(qweight, dtype: torch.dtype) -> torch.Tensor:
    """The dense ``dtype`` weight of ``qweight`` for immediate use (see the module docstring)."""
    from fastft import ops

    data = getattr(qweight, "data", None)
    dev = qweight.device
    if _real(data) and not torch.compiler.is_compiling():
        if dev.type == "cuda":
            from . import triton_backend

            if triton_backend.dequantize_into_supported(qweight, dtype):
                buf = workspace(dev, dtype, triton_backend.workspace_numel(qweight, dtype))
                return triton_backend.dequantize_into(qweight, dtype, buf)
        elif dev.type == "cpu" and isinstance(qweight, NF4Weight) and dtype in (torch.float32, torch.bfloat16,
                                                                                   torch.float16):
            # backend_for loads the C++ backend, which registers its dequantize-into (no import here:
            # fastft.ops.cpp imports the lean ops, which import this module)
            into = _INTO.get("cpu") if ops.backend_for("nf4_dequantize", dev, qweight, dtype) == "cpp" else None
            if into is not None:
                n = int(qweight.shape[0]) * int(qweight.shape[1])
                out = workspace(dev, dtype, n)[:n].view(tuple(qweight.shape))
                return into(qweight, out)
    if isinstance(qweight, NF4Weight):
        return ops.nf4_dequantize(qweight, dtype)
    if isinstance(qweight, Int4Weight):
        return ops.int4_dequantize(qweight, dtype)
    return qweight.dequantize(dtype)


__all__ = ["clear", "dequantize_transient", "register_into", "workspace"]
