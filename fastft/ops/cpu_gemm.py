"""fp32 matmuls on CPU through oneDNN's AVX-512 GEMM instead of the default BLAS.

Why: torch's CPU ``mm`` / ``F.linear`` in fp32 go to MKL's sgemm. On a non-Intel CPU MKL takes its
AVX2 code path even where the CPU has AVX-512, so it tops out at half the machine's FMA rate. On
this project's 2-core AMD EPYC (Zen 5) machine, M = 1024 and SmolLM2's layer shapes: MKL 192-220
GFLOP/s, oneDNN's ``mkldnn::_linear_pointwise`` on the same dense fp32 tensors 435-495 GFLOP/s,
with fp32 accumulation (relative error vs float64 ~1e-6, the same order as MKL's; bf16 would be
3e-3). torch already routes bf16 matmuls through oneDNN, so only fp32 is rerouted here.

``FASTFT_CPU_GEMM=blas`` turns the reroute off (read once, on first use); the op's absence (a
torch without oneDNN) does too. Everything else (other devices and dtypes, empty shapes) goes to
torch's own op, so the helpers are safe to call anywhere; so does tracing under torch.compile,
where inductor picks its own GEMMs.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

_LP = None  # the oneDNN op, False once found unusable, None before the first call


def _onednn_op():
    global _LP
    if _LP is None:
        ok = (os.environ.get("FASTFT_CPU_GEMM", "onednn").strip().lower() != "blas"
              and torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise"))
        _LP = torch.ops.mkldnn._linear_pointwise.default if ok else False
    return _LP


def uses_onednn() -> bool:
    """Whether fp32 CPU matmuls of the helpers below go through oneDNN."""
    return bool(_onednn_op())


# Below this many multiply-adds (M * N * K) oneDNN's per-call set-up costs more than its faster
# inner loop saves: measured here, 8x64x64 took 12.6 us through oneDNN and 3.7 us through BLAS,
# 1x576x576 27 vs 18 us; from 1x576x1536 (8.8e5) up oneDNN is ahead (41 vs 48 us, and ~2x at M >= 16).
MIN_MACS = 1 << 19


def _eligible(a: torch.Tensor, w: torch.Tensor, bias) -> bool:
    return (a.device.type == "cpu" and a.dtype == torch.float32 and w.dtype == torch.float32
            and a.dim() == 2 and w.dim() == 2 and a.numel() > 0 and w.numel() > 0
            and a.shape[0] * w.numel() >= MIN_MACS
            and (bias is None or bias.dtype == torch.float32)
            and not (torch.is_grad_enabled() and (a.requires_grad or w.requires_grad
                                                  or bias is not None and bias.requires_grad))
            and not torch.compiler.is_compiling() and bool(_onednn_op()))


def linear(a: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(a, w, bias)`` = a wᵀ + bias for 2-D a (M, K), w (N, K). The oneDNN op has no
    autograd formula, so it is taken only where no graph is being recorded (inside an autograd
    Function's forward / backward, under no_grad); otherwise this is F.linear. Any strides: a
    transposed view is read as is."""
    if _eligible(a, w, bias):
        return _LP(a, w, bias, "none", [], "")
    return F.linear(a, w, bias)


def mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``torch.mm(a, b)`` for 2-D a (M, K), b (K, N), as ``linear(a, bᵀ)``; no autograd."""
    return linear(a, b.t())


__all__ = ["MIN_MACS", "linear", "mm", "uses_onednn"]
