"""The ``torch`` backend: lean compositions of PyTorch ops (cuBLAS / CPU BLAS matmuls), any device.

What it owns, and why it is the default for some ops on CUDA (``fastft.ops.dispatch``):

* ``lora_linear`` -- with a frozen base (LoRA, QLoRA) one autograd node, ``LeanLoraLinearFunction``:
  base matmul (F.linear or the quant-matmul op) with the rank-side term added into its output by
  one addmm, and a backward that adds du·A into the base's dX in place. It saves x and u =
  drop(x) Aᵀ only (no dropout copy of x, no mask: the mask is regenerated from the generator state
  in backward), like Unsloth's bookkeeping, with dropout and bias on the same path. With a
  trainable base (full fine-tuning) the base keeps its own node and the branch goes through
  ``LoraDeltaFunction``.
* ``quant_matmul`` -- dequantize the 4-bit weight with the fastest dequantize op of the device (the
  Triton kernel on CUDA), multiply with the vendor BLAS, drop the dense copy; backward dequantizes
  again. Nothing dense is saved for backward.

On an H200 this LoRA path and dequantize + cuBLAS beat fastft's fused Triton GEMMs at training
sizes (the fused NF4 quant-matmul is ALU-bound), so on CUDA the dispatcher picks these for
``lora_linear`` and ``quant_matmul``; ``FASTFT_BACKEND=triton`` forces the kernels. The
measurements are in benchmarks/NOTES.md. Known cost: with dropout the mask is not stored but drawn
again in backward (two full-size draws per step).

Calls the registrations' predicates reject run the reference: float64 (gold computations), a bias
or weight in another dtype than x, and autocast over a trainable base for ``lora_linear``. Under
autocast with a frozen base the inputs are cast to the autocast dtype (as autocast would for
F.linear) and the lean path runs. On CUDA, decode-shaped calls over a 4-bit weight go to the Triton
decode kernel through ``fastft.ops.triton_backend``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fastft.quant.int4 import Int4Weight
from fastft.quant.nf4 import NF4Weight

from . import cpu_gemm, dispatch
from .dispatch import register
from .reference_quant import DequantMatmulFunction, check_quant_matmul_args

LEAN_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class LoraDeltaFunction(torch.autograd.Function):
    """low = s · (drop(x) Aᵀ) Bᵀ, the LoRA branch of ``lora_linear``; u = drop(x) Aᵀ is (N, r).

    Backward (g = dY flattened to 2-D, gs = s·g):  dB = (uᵀ gs)ᵀ,  du = gs B,
    dA = (drop(x)ᵀ du)ᵀ,  dX = drop'(du A). Saved: x, u, A, B -- no (N, out) or (N, in)
    intermediate, and no dropout mask: the forward uses the mask drawn by ``lora_dropout_state``
    and drops it; the backward regenerates it once, from the generator state taken before the
    draw, for both dA and dX (two full-size draws per step in all). The products, scalings and
    their order are autograd's on the reference's ``F.linear(F.linear(drop(x), A), B) * s``, so
    the results round identically.
    """

    @staticmethod
    def forward(ctx, x, lora_A, lora_B, scaling, dropout_p, gen_state, keep=None):
        x2 = x.reshape(-1, x.shape[-1])
        xd = x2 if dropout_p <= 0.0 else _apply_keep(x2, keep.reshape(x2.shape), dropout_p)
        u = F.linear(xd, lora_A)  # (N, r)
        del xd
        low = F.linear(u, lora_B).mul_(scaling)
        ctx.save_for_backward(x, u, lora_A, lora_B)
        ctx.scaling, ctx.dropout_p, ctx.gen_state = scaling, dropout_p, gen_state
        return low.view(*x.shape[:-1], low.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        x, u, A, B = ctx.saved_tensors
        p = ctx.dropout_p
        gs = grad.reshape(-1, grad.shape[-1]) * ctx.scaling
        x2 = x.reshape(-1, x.shape[-1])
        need_x, need_a, need_b = ctx.needs_input_grad[:3]
        dx = dA = dB = None
        if need_b:
            dB = torch.mm(u.t(), gs).t()
        if need_x or need_a:
            du = torch.mm(gs, B)  # (N, r)
            keep = _keep_mask(x2, p, ctx.gen_state) if p > 0.0 else None
            if need_a:
                xd = x2 if keep is None else _apply_keep(x2, keep, p)
                dA = torch.mm(xd.t(), du).t()
                del xd
            if need_x:
                dx = torch.mm(du, A)
                if keep is not None:  # backward of (x * keep) / (1 - p)
                    dx = dx.div_(1.0 - p).mul_(keep)
                dx = dx.view(x.shape)
        return dx, dA, dB, None, None, None, None


class LeanLoraLinearFunction(torch.autograd.Function):
    """The whole LoRA layer with a frozen base in one node: y = x Wᵀ + b + s · (drop(x) Aᵀ) Bᵀ.

    Forward: the base matmul (dense F.linear, or the device's quant-matmul), then the rank side
    added into its output by one ``addmm_`` (alpha = s): no separate (N, out) low-rank tensor, no
    scaling pass, no add pass. (On CUDA, decode-shaped rows over a 4-bit base run as one Triton
    kernel instead, the rank side in the quant decode kernel's epilogue.) Backward (g = dY):
    du = s · g B and dB = s · (uᵀ g)ᵀ take the scaling on the (N, r) / (r, out) side, dA = duᵀ
    drop(x), and dX = g W (or the quant kernel's dX) with du A added in place: no s·g copy and no
    autograd accumulation of two (N, in) terms.
    Saved: x, u, the adapters; the mask is regenerated as in ``LoraDeltaFunction``. Rounding: the
    low-rank term enters the base output inside the GEMM's fp32 accumulator (one rounding where the
    reference's composition rounds three times).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling, dropout_p, gen_state, keep=None, cast_to=None):
        from fastft import ops

        # cast_to (autocast): x is computed in that dtype through one shared cast copy (``cast_once``:
        # q/k/v, or gate/up, reading the same x save one copy between them, not one each); dX is
        # returned in x's own dtype, so autograd sums the branches' gradients there.
        ctx.x_dtype = x.dtype
        if cast_to is not None and x.dtype != cast_to:
            x = cast_once(x, cast_to)
        x2 = x.reshape(-1, x.shape[-1])
        dense = isinstance(weight, torch.Tensor)
        # Adapters in another dtype (fp32 under bf16 activations, PEFT's default) are cast here, not
        # by two autograd ToCopy nodes per layer; backward returns their gradients in their dtype.
        ctx.adapter_dtypes = (lora_A.dtype, lora_B.dtype)
        lora_A, lora_B = lora_A.to(x.dtype), lora_B.to(x.dtype)
        # A frozen dense weight in another dtype (fp32 under autocast) is cast here and again in
        # backward: the cast is transient, only the weight itself (a parameter) is referenced.
        xd = x2 if dropout_p <= 0.0 else _apply_keep(x2, keep.reshape(x2.shape), dropout_p)
        u = F.linear(xd, lora_A)  # (N, r)
        del xd
        if not dense and _fused_decode(x2, weight):
            # Decode-shaped rows over a 4-bit base on CUDA (generation): the low-rank term is added
            # in the quant decode kernel's epilogue -- one kernel for the layer.
            from . import triton_backend

            y = triton_backend.quant_matmul_lora(x2, weight, bias, u, lora_B, scaling)
        else:
            y = cpu_gemm.linear(x2, weight.to(x.dtype), bias) if dense else ops.quant_matmul(x2, weight, bias)
            y.addmm_(u, lora_B.t(), alpha=scaling)
        ctx.save_for_backward(x, u, lora_A, lora_B, weight if dense else None)
        ctx.qweight = None if dense else weight
        ctx.scaling, ctx.dropout_p, ctx.gen_state = scaling, dropout_p, gen_state
        ctx.has_bias = bias is not None
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        x, u, A, B, W = ctx.saved_tensors
        p, s = ctx.dropout_p, ctx.scaling
        g = grad.reshape(-1, grad.shape[-1])
        x2 = x.reshape(-1, x.shape[-1])
        need_x, _, need_bias, need_a, need_b = ctx.needs_input_grad[:5]
        dx = db = dA = dB = None
        if need_b:
            dB = torch.mm(u.t(), g).t().mul_(s)
        if need_bias and ctx.has_bias:
            db = g.sum(0)
        if need_x or need_a:
            du = torch.mm(g, B).mul_(s)  # (N, r)
            keep = _keep_mask(x2, p, ctx.gen_state) if p > 0.0 else None
            if need_a:
                xd = x2 if keep is None else _apply_keep(x2, keep, p)
                dA = torch.mm(du.t(), xd)
                del xd
            if need_x:
                if W is not None:
                    dx = cpu_gemm.mm(g, W.to(g.dtype))
                else:
                    dx = dispatch.call("quant_matmul_grad_x", g.device, g, ctx.qweight)
                if keep is None:
                    dx.addmm_(du, A)
                else:  # backward of (x * keep) / (1 - p)
                    dx.add_(torch.mm(du, A).div_(1.0 - p).mul_(keep))
                dx = dx.view(x.shape).to(ctx.x_dtype)
        adt, bdt = ctx.adapter_dtypes
        dA = dA if dA is None else dA.to(adt)
        dB = dB if dB is None else dB.to(bdt)
        return dx, None, db, dA, dB, None, None, None, None, None


class FrozenLinearFunction(torch.autograd.Function):
    """y = x Wᵀ + b for a frozen W through ``cpu_gemm`` (oneDNN's fp32 GEMM on CPU), dX = dY W,
    db = Σ dY; saves W only (a parameter, not a copy)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        y = cpu_gemm.linear(x.reshape(-1, x.shape[-1]), weight, bias)
        ctx.save_for_backward(weight)
        ctx.has_bias = bias is not None
        return y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad):
        (W,) = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])
        dx = cpu_gemm.mm(g, W).view(*grad.shape[:-1], W.shape[1]) if ctx.needs_input_grad[0] else None
        db = g.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return dx, None, db


def frozen_linear(x, weight, bias=None):
    """``F.linear`` for a frozen fp32 weight on CPU through ``FrozenLinearFunction`` (2x the BLAS's
    fp32 rate on CPUs where MKL runs AVX2 code, see cpu_gemm); F.linear itself otherwise (other
    dtypes and devices, a trainable weight, autocast, torch.compile)."""
    if (x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() >= 1 and isinstance(weight, torch.Tensor)
            and weight.dtype == torch.float32 and weight.dim() == 2 and not weight.requires_grad
            and (bias is None or bias.dtype == torch.float32) and not torch.is_autocast_enabled("cpu")
            and not torch.compiler.is_compiling() and cpu_gemm.uses_onednn()):
        return FrozenLinearFunction.apply(x, weight, bias)
    return F.linear(x, weight, bias)


_LAST_CAST: list = [None]


def cast_once(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x.detach().to(dtype)``, reusing the previous call's result when it cast the same, unchanged
    tensor to the same dtype: the projections that read one activation (q, k, v; gate, up) then
    save one cast copy between them. Weak references only: nothing is kept alive here."""
    import weakref

    c = _LAST_CAST[0]
    if c is not None:
        src, ver, dt, res, rver = c
        r = res()
        if src() is x and ver == x._version and dt == dtype and r is not None and r._version == rver:
            return r
    r = x.detach().to(dtype)
    _LAST_CAST[0] = (weakref.ref(x), x._version, dtype, weakref.ref(r), r._version)
    return r


def _keep_mask(x2, p, gen_state):
    gen = torch.Generator(device=x2.device)
    gen.set_state(gen_state)
    return torch.rand(x2.shape, generator=gen, device=x2.device) >= p


def _apply_keep(x2, keep, p):
    return x2 * keep.to(x2.dtype) / (1.0 - p)  # the reference's order


def _default_generator(device: torch.device) -> torch.Generator:
    if device.type == "cpu":
        return torch.default_generator
    if device.type == "cuda" and torch.cuda.is_available():
        idx = device.index if device.index is not None else torch.cuda.current_device()
        return torch.cuda.default_generators[idx]
    gen = torch.Generator(device=device)  # other devices: a fresh generator seeded from the global RNG
    gen.manual_seed(int(torch.randint(0, 2 ** 62, (1,)).item()))
    return gen


def lora_dropout_state(x, dropout_p, generator):
    """(generator state, keep mask) for dropout on x, or (None, None) without dropout.

    The mask is ``torch.rand(x.shape, generator=generator) >= p``, drawn exactly as the reference
    draws it (so the generator advances the same way); the state before the draw is what the
    backward regenerates the mask from, so the mask itself never needs storing. With no generator
    the device's default generator draws it (its state is read on the host: no synchronisation, and
    ``torch.utils.checkpoint`` restores it for the recompute)."""
    if dropout_p <= 0.0:
        return None, None
    if generator is None:
        generator = _default_generator(x.device)
    state = generator.get_state()
    keep = torch.rand(x.shape, generator=generator, device=x.device) >= dropout_p
    return state, keep


def _frozen_base_ok(x, weight, lora_A, lora_B) -> bool:
    dense = isinstance(weight, torch.Tensor)
    return (not (dense and weight.requires_grad) and (dense or isinstance(weight, (NF4Weight, Int4Weight)))
            and lora_A.device == x.device and lora_B.device == x.device and weight.device == x.device)


def lora_linear_supports(x, weight, lora_A, lora_B, scaling, bias=None, dropout_p=0.0, generator=None) -> bool:
    """The calls the lean LoRA path takes: activations and adapters in fp32 / bf16 / fp16 on x's
    device; without autocast a bias and dense weight in x's dtype (a trainable base too); under
    autocast a frozen base only (a trainable one keeps autocast's own handling: the reference)."""
    dt = x.dtype
    if torch.is_autocast_enabled(x.device.type):
        return (torch.get_autocast_dtype(x.device.type) in LEAN_DTYPES and dt in LEAN_DTYPES
                and _frozen_base_ok(x, weight, lora_A, lora_B))
    dense = isinstance(weight, torch.Tensor)
    return (dt in LEAN_DTYPES and lora_A.dtype in LEAN_DTYPES and lora_B.dtype in LEAN_DTYPES
            and (bias is None or bias.dtype == dt) and lora_A.device == x.device and lora_B.device == x.device
            and (dense and weight.dtype == dt and weight.device == x.device
                 or isinstance(weight, (NF4Weight, Int4Weight)) and weight.device == x.device))


@register("lora_linear", "torch", supports=lora_linear_supports)
def lora_linear(x, weight, lora_A, lora_B, scaling, bias=None, dropout_p=0.0, generator=None):
    """``fastft.ops.lora_linear`` through ``LeanLoraLinearFunction`` (frozen base) or the base's own
    node plus ``LoraDeltaFunction`` (trainable base); see the module docstring."""
    dt = x.dtype
    dense = isinstance(weight, torch.Tensor)
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        # Autocast (e.g. the Trainer's bf16=True over an fp32 model): F.linear would run in the
        # autocast dtype, so cast x, a frozen base weight and the bias to it -- the casts autocast
        # makes itself -- and take the lean path with autocast off.
        adt = torch.get_autocast_dtype(dev)
        with torch.autocast(dev, enabled=False):
            gen_state, keep = lora_dropout_state(x, dropout_p, generator)
            # The fp32 base goes in as is: the node casts it transiently (autocast would save the
            # cast copy of every weight for backward); x is cast inside the node, once per tensor.
            return LeanLoraLinearFunction.apply(x, weight, None if bias is None else bias.to(adt), lora_A, lora_B,
                                                float(scaling), float(dropout_p), gen_state, keep, adt)
    from fastft import ops

    gen_state, keep = lora_dropout_state(x, dropout_p, generator)
    # Adapters kept in fp32 under bf16 / fp16 activations (PEFT's default): computed in the
    # activations' dtype, as the reference does, their gradients returned in fp32 (the fused node
    # casts inside; the trainable-base path through the casts' autograd).
    if not (dense and weight.requires_grad):  # frozen base (LoRA / QLoRA): one fused node
        return LeanLoraLinearFunction.apply(x, weight, bias, lora_A, lora_B, float(scaling), float(dropout_p),
                                            gen_state, keep)
    lora_A, lora_B = lora_A.to(dt), lora_B.to(dt)
    # Full fine-tuning (W trains): the base through its own autograd node (F.linear saves x, which
    # the LoRA branch shares), the rank side through LoraDeltaFunction.
    base = F.linear(x, weight, bias) if dense else ops.quant_matmul(x, weight, bias)
    return base + LoraDeltaFunction.apply(x, lora_A, lora_B, float(scaling), float(dropout_p), gen_state, keep)


def _fused_decode(x, qweight) -> bool:
    """CUDA, <= 16 rows of fp16 / bf16, the aligned 4-bit layout: the Triton decode kernel's case."""
    if not x.is_cuda:
        return False
    from . import triton_backend  # (imports triton: CUDA only)

    return triton_backend.decode_eligible(x, qweight)


def _device_dequantize(qweight, dtype):
    """The device's dequantize op (the Triton kernel on CUDA, the C++ one on CPU), one pass, into the
    reused per-device workspace (``fastft.ops.workspace``): a transient dense weight, no allocation."""
    from .workspace import dequantize_transient

    return dequantize_transient(qweight, dtype)


@register("quant_matmul_grad_x", "torch")
def quant_matmul_grad_x(grad, qweight):
    """dX = dY · dequant(W) through the device's dequantize op (the fused LoRA node's backward)."""
    return cpu_gemm.mm(grad, _device_dequantize(qweight, grad.dtype))


def _not_float64(x, qweight=None, bias=None) -> bool:
    return getattr(x, "dtype", None) != torch.float64  # float64 (gold computations): the reference


@register("quant_matmul", "torch", supports=_not_float64)
def quant_matmul(x, qweight, bias=None):
    """``x @ dequant(W)ᵀ (+ b)``: dequantize (device op) + BLAS, nothing dense saved for backward."""
    check_quant_matmul_args(x, qweight, bias)
    if _fused_decode(x, qweight):
        # Decode-shaped calls (<= 16 rows, generation) go to the fused Triton decode kernel, which
        # reads the 4-bit bytes once; dequantize + cuBLAS would write and re-read a dense weight.
        from . import triton_backend

        return triton_backend.quant_matmul(x, qweight, bias)
    return DequantMatmulFunction.apply(x, qweight, bias, _device_dequantize, cpu_gemm.linear)


__all__ = ["FrozenLinearFunction", "LoraDeltaFunction", "LeanLoraLinearFunction", "frozen_linear", "lora_dropout_state",
           "lora_linear", "quant_matmul", "quant_matmul_grad_x"]
