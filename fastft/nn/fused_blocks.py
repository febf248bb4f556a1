"""The fused LoRA blocks of a decoder layer, one switch away: q/k/v in one block and gate/up + SwiGLU
in one block (the Triton ``lora_qkv`` / ``lora_gate_up_swiglu`` of ``kernels/lora_fused.py``).

The switch, most specific first:

* per model: ``model.set_fused_lora_blocks(True | False | "auto" | None)`` on a native model (or the
  Trainer's ``TrainingArguments.fused_lora_blocks``), stored on its attention / MLP modules
  (None there: follow the process setting);
* per process: ``fastft.nn.fused_blocks.set_fused_lora_blocks(...)``, else the environment variable
  ``FASTFT_FUSED_LORA`` (``1`` / ``on`` / ``true``, ``0`` / ``off`` / ``false``, ``auto``);
* ``"auto"`` (the default) keeps today's measured path -- per-projection lean LoRA nodes and the
  SwiGLU op -- until a GPU run measures the fused blocks against it (benchmarks/bench_lora.py,
  ``fused_blocks`` rows in the GPU check); it is then the place to turn them on per device.

``True`` runs the fused blocks where the kernels run: CUDA tensors, or CPU tensors under the Triton
interpreter (``TRITON_INTERPRET=1``: tests). A block is fused only when every projection in it is a
fastft ``LoraLinear`` over a dense ``nn.Linear`` (the fused kernels take dense weights: QLoRA bases
keep the per-projection path), with one dropout probability, the weights in the compute dtype
(x's, or autocast's), no module hooks, and gate / up with a bias on both or neither; any other call
runs the unfused path, with the same results up to rounding.
"""
from __future__ import annotations

import os

import torch
from torch import nn

ENV = "FASTFT_FUSED_LORA"
_MODES = {"1": True, "on": True, "true": True, "yes": True, "0": False, "off": False, "false": False, "no": False,
          "auto": "auto", "": "auto"}
_setting: list = [None]


def normalise(value, what: str = "fused_lora_blocks"):
    """True / False / "auto" from a bool or a string spelling; None stays None."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _MODES:
        return _MODES[value.strip().lower()]
    raise ValueError(f"{what}={value!r}: must be True, False or 'auto' (or on / off / 1 / 0)")


def set_fused_lora_blocks(value) -> None:
    """The process-wide setting (None: back to ``FASTFT_FUSED_LORA``, default "auto")."""
    _setting[0] = normalise(value)


def fused_lora_setting(override=None):
    """The setting that applies: ``override`` (a module's), else the process's, else the environment's."""
    if override is not None:
        return override
    if _setting[0] is not None:
        return _setting[0]
    return normalise(os.environ.get(ENV, "auto"), ENV)


def enabled(override, x: torch.Tensor) -> bool:
    """Whether the fused blocks run for activations ``x`` under this setting."""
    mode = fused_lora_setting(override)
    if mode is not True:
        return False  # "auto": off until a GPU measures the fused blocks (module docstring)
    return x.is_cuda or (x.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")


def _compute_dtype(x):
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


def _fusable(mods, x) -> bool:
    from .lora import LoraLinear

    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16) or torch.compiler.is_compiling():
        return False
    dt = _compute_dtype(x)
    p = None
    for m in mods:
        if type(m) is not LoraLinear or type(m.base_layer) is not nn.Linear:
            return False
        if m._forward_hooks or m._forward_pre_hooks or m.base_layer._forward_hooks or m.base_layer._forward_pre_hooks:
            return False
        W = m.base_layer.weight
        if W.requires_grad or W.device != x.device or (W.dtype != dt and not torch.is_autocast_enabled(x.device.type)):
            return False
        drop = m.lora_dropout if m.training else 0.0
        if p is not None and drop != p:
            return False
        p = drop
    return True


def _parts(mods, x):
    return ([m.base_layer.weight for m in mods], [m.lora_A.weight for m in mods], [m.lora_B.weight for m in mods],
            [m.base_layer.bias for m in mods], [m.scaling for m in mods],
            mods[0].lora_dropout if mods[0].training else 0.0)


def qkv(q_proj, k_proj, v_proj, x):
    """(q, k, v) through the fused ``lora_qkv`` block, or None when the projections are not fusable."""
    mods = (q_proj, k_proj, v_proj)
    if not _fusable(mods, x):
        return None
    from fastft.ops import triton_backend

    Ws, As, Bs, bs, ss, p = _parts(mods, x)
    return tuple(triton_backend.lora_qkv(x, Ws, As, Bs, ss, biases=bs, dropout_p=p))


def gate_up_swiglu(gate_proj, up_proj, x):
    """silu(gate(x)) · up(x) through the fused ``lora_gate_up_swiglu`` block, or None when not fusable."""
    mods = (gate_proj, up_proj)
    if not _fusable(mods, x) or (gate_proj.base_layer.bias is None) != (up_proj.base_layer.bias is None) \
            or gate_proj.base_layer.weight.shape != up_proj.base_layer.weight.shape:
        return None
    from fastft.ops import triton_backend

    Ws, As, Bs, bs, ss, p = _parts(mods, x)
    return triton_backend.lora_gate_up_swiglu(x, Ws, As, Bs, ss, biases=bs, dropout_p=p)


__all__ = ["ENV", "enabled", "fused_lora_setting", "gate_up_swiglu", "normalise", "qkv", "set_fused_lora_blocks"]
