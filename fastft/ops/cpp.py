"""The ``cpp`` backend: fastft's C++ CPU kernels (``fastft._C``, built from ``csrc/``).

This module declares the ``torch.library`` ops of namespace ``fastft`` (schemas below; the CPU
implementations are registered from C++ with ``TORCH_LIBRARY_IMPL``), their fake kernels (so
``torch.compile`` and FSDP trace them as single ops) and the autograd formula of the quant-matmuls,
and registers the ``cpp`` implementations of the public ops with ``fastft.ops.dispatch``:
``nf4_quantize``, ``nf4_dequantize``, ``int4_quantize``, ``int4_dequantize``, ``quant_matmul``,
``cross_entropy_grad_``.

Raw-tensor ops (arguments are the fields of ``NF4Weight`` / ``Int4Weight``; see csrc/README.md):

* ``nf4_quantize(w, blocksize) -> (data, absmax)`` and, for double quantization,
  ``quantize_blockwise_8bit(absmax - offset, code, 256) -> (q, nested_absmax)``: bytes identical
  to ``fastft.ops.reference_quant.nf4_quantize`` (and hence to bitsandbytes' 4-bit codes).
* ``nf4_dequantize(...)`` / ``nf4_dequantize_out(..., out)``: ``quant_map[code] * absmax`` in fp32
  then one cast, bit-identical to the reference; fp32 / bf16 / fp16 outputs.
* ``nf4_matmul(x, bias, ...)`` = ``x @ W_deqᵀ + bias`` and ``nf4_matmul_grad_x(dy, ...)`` =
  ``dy @ W_deq``: W is dequantized one L2-sized tile at a time straight into the BLAS, never as a
  whole. Autograd saves only the packed weight tensors (inputs anyway), nothing dequantized, not x.
* ``int4_*``: the same for group-wise int4.
* ``ce_loss_grad_(logits, targets, ignore_index) -> losses``: per-row cross-entropy (fp32) of
  fp32 / bf16 logits, which are overwritten by their gradient softmax - onehot in the same call:
  three passes over each (cache-resident) row instead of the ~8 full passes of the torch
  composition (``.float()``, logsumexp, sub, exp, scatter, mask, cast back).

* ``rmsnorm_fwd(x, w, eps) -> (y, rstd)`` / ``rmsnorm_bwd``, ``silu_mul(g, u)`` / ``silu_mul_bwd``,
  ``rope(x, cos, sin, backward)``:
  the transformer block's elementwise steps fused per row (fp32 / bf16), autograd registered.
* ``attn_fwd(q, k, v, scale, causal) -> (out, lse)`` / ``attn_bwd``: CPU attention, fp32 / bf16,
  GQA by index, bottom-right causal; ``attention`` uses it (autograd registered below).

Also registered for CPU tensors: ``attention`` / ``attention_varlen`` (the kernel above, or torch's
fused CPU SDPA with padding masks and fp16; GQA without repeating K/V; fully masked rows fixed up
to 0), and ``lora_linear`` through the rank side (``fastft/ops/lean.py``: one autograd node per
LoRA layer with a frozen base, saving x and u = drop(x)Aᵀ, the dropout mask regenerated in backward).

Dtypes: activations fp32 / bf16 / fp16 (the compute dtype is x's, or autocast's, as in the
reference); other dtypes (float64 for gold computations) and non-CPU tensors go to the reference:
each registration's ``supports`` predicate says which calls it takes (``fastft.ops.dispatch``).

If ``fastft._C`` is missing (not built, ``FASTFT_BUILD_EXT=0``, no compiler) this module still
imports, registers nothing, and logs once -- when the dispatcher first loads it, i.e. on the first
CPU op -- that fastft runs its slower PyTorch fallback.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from fastft.quant.codebooks import dynamic_map, nf4_code
from fastft.quant.int4 import Int4Weight, check_int4_args
from fastft.quant.nf4 import NESTED_BLOCKSIZE, NF4Weight, check_nf4_args, double_quant_offset

from . import cpu_gemm, dispatch
from .dispatch import register
from .reference import _check_attention_inputs, attention_mask_bias
from .reference_quant import DequantMatmulFunction, _compute_dtype, check_quant_matmul_args

logger = logging.getLogger("fastft")

try:
    from fastft import _C  # noqa: F401  (registers the CPU kernels of the ops defined below)
except ImportError as _e:  # not built, or built against another torch
    _C = None
    _IMPORT_ERROR: Exception | None = _e
else:
    _IMPORT_ERROR = None

AVAILABLE = _C is not None
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_NF4_Q = ("Tensor data, Tensor absmax, Tensor quant_map, Tensor? nested_absmax, Tensor? nested_quant_map, "
          "float offset, int blocksize, int nested_blocksize")
_INT4_Q = "Tensor data, Tensor scales, Tensor? zeros, int group_size"
SCHEMAS = {
    "nf4_quantize": "nf4_quantize(Tensor w, int blocksize) -> (Tensor, Tensor)",
    "quantize_blockwise_8bit": "quantize_blockwise_8bit(Tensor x, Tensor code, int blocksize) -> (Tensor, Tensor)",
    "dequantize_blockwise_8bit": ("dequantize_blockwise_8bit(Tensor q, Tensor absmax, Tensor code, int blocksize, "
                                  "float offset) -> Tensor"),
    "nf4_dequantize": f"nf4_dequantize({_NF4_Q}, int[] shape, ScalarType dtype) -> Tensor",
    "nf4_dequantize_out": f"nf4_dequantize_out({_NF4_Q}, int[] shape, Tensor(a!) out) -> ()",
    "nf4_matmul": f"nf4_matmul(Tensor x, Tensor? bias, {_NF4_Q}, int out_features, int in_features) -> Tensor",
    "nf4_matmul_grad_x": f"nf4_matmul_grad_x(Tensor grad, {_NF4_Q}, int out_features, int in_features) -> Tensor",
    "int4_quantize": "int4_quantize(Tensor w, int group_size, bool symmetric) -> (Tensor, Tensor, Tensor)",
    "int4_dequantize": f"int4_dequantize({_INT4_Q}, int out_features, int in_features, ScalarType dtype) -> Tensor",
    "int4_matmul": f"int4_matmul(Tensor x, Tensor? bias, {_INT4_Q}, int out_features, int in_features) -> Tensor",
    "int4_matmul_grad_x": f"int4_matmul_grad_x(Tensor grad, {_INT4_Q}, int out_features, int in_features) -> Tensor",
    "ce_loss_grad_": "ce_loss_grad_(Tensor(a!) logits, Tensor targets, int ignore_index) -> Tensor",
    "rmsnorm_fwd": "rmsnorm_fwd(Tensor x, Tensor weight, float eps) -> (Tensor, Tensor)",
    "rmsnorm_bwd": "rmsnorm_bwd(Tensor grad, Tensor x, Tensor weight, Tensor rstd) -> Tensor",
    "silu_mul": "silu_mul(Tensor g, Tensor u) -> Tensor",
    "silu_mul_bwd": "silu_mul_bwd(Tensor grad, Tensor g, Tensor u) -> (Tensor, Tensor)",
    "rope": "rope(Tensor x, Tensor cos, Tensor sin, bool backward) -> Tensor",
    "attn_fwd": ("attn_fwd(Tensor q, Tensor k, Tensor v, float scale, bool causal, Tensor? key_padding_mask=None) "
                 "-> (Tensor, Tensor)"),
    "attn_bwd": ("attn_bwd(Tensor grad, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, float scale, "
                 "bool causal, Tensor? key_padding_mask=None) -> (Tensor, Tensor, Tensor)"),
}


def nf4_args(q: NF4Weight) -> tuple:
    """The NF4Weight fields in the order of the ops' ``_NF4_Q`` arguments."""
    return (q.data, q.absmax, q.quant_map, q.nested_absmax, q.nested_quant_map,
            0.0 if q.offset is None else q.offset, q.blocksize, q.nested_blocksize)


def int4_args(q: Int4Weight) -> tuple:
    return (q.data, q.scales, q.zeros, q.group_size)


def _cpu(t, dtypes=None) -> bool:
    """A CPU tensor (of one of ``dtypes``): what the C++ kernels read."""
    return isinstance(t, torch.Tensor) and t.device.type == "cpu" and (dtypes is None or t.dtype in dtypes)


def _on_cpu(w, *args, **kw) -> bool:
    return _cpu(w)


def _dequantizes(cls):
    def supports(qweight, dtype=torch.float32) -> bool:
        # another weight type reaches the implementation, which names the problem
        return not isinstance(qweight, cls) or (dtype in KERNEL_DTYPES and qweight.device.type == "cpu")
    return supports


if AVAILABLE:
    _lib = torch.library.Library("fastft", "FRAGMENT")
    for _schema in SCHEMAS.values():
        _lib.define(_schema)
    ops = torch.ops.fastft

    # -- fake kernels: output metadata only ---------------------------------------------------
    @torch.library.register_fake("fastft::nf4_quantize")
    def _(w, blocksize):
        n = w.numel()
        return w.new_empty(((n + 1) // 2, 1), dtype=torch.uint8), w.new_empty((-(-n // blocksize),), dtype=torch.float32)

    @torch.library.register_fake("fastft::quantize_blockwise_8bit")
    def _(x, code, blocksize):
        return x.new_empty(x.shape, dtype=torch.uint8), x.new_empty((-(-x.numel() // blocksize),), dtype=torch.float32)

    @torch.library.register_fake("fastft::dequantize_blockwise_8bit")
    def _(q, absmax, code, blocksize, offset):
        return q.new_empty(q.shape, dtype=torch.float32)

    @torch.library.register_fake("fastft::nf4_dequantize")
    def _(data, absmax, quant_map, nested_absmax, nested_quant_map, offset, blocksize, nested_blocksize, shape, dtype):
        return data.new_empty(shape, dtype=dtype)

    @torch.library.register_fake("fastft::nf4_dequantize_out")
    def _(data, absmax, quant_map, nested_absmax, nested_quant_map, offset, blocksize, nested_blocksize, shape, out):
        return None

    @torch.library.register_fake("fastft::nf4_matmul")
    def _(x, bias, data, absmax, quant_map, nested_absmax, nested_quant_map, offset, blocksize, nested_blocksize,
          out_features, in_features):
        return x.new_empty((*x.shape[:-1], out_features))

    @torch.library.register_fake("fastft::nf4_matmul_grad_x")
    def _(grad, data, absmax, quant_map, nested_absmax, nested_quant_map, offset, blocksize, nested_blocksize,
          out_features, in_features):
        return grad.new_empty((*grad.shape[:-1], in_features))

    @torch.library.register_fake("fastft::int4_quantize")
    def _(w, group_size, symmetric):
        n, k = w.shape
        g = k // group_size
        return (w.new_empty((n, (k + 1) // 2), dtype=torch.uint8), w.new_empty((n, g), dtype=torch.float32),
                w.new_empty((0 if symmetric else n, g), dtype=torch.float32))

    @torch.library.register_fake("fastft::int4_dequantize")
    def _(data, scales, zeros, group_size, out_features, in_features, dtype):
        return data.new_empty((out_features, in_features), dtype=dtype)

    @torch.library.register_fake("fastft::int4_matmul")
    def _(x, bias, data, scales, zeros, group_size, out_features, in_features):
        return x.new_empty((*x.shape[:-1], out_features))

    @torch.library.register_fake("fastft::int4_matmul_grad_x")
    def _(grad, data, scales, zeros, group_size, out_features, in_features):
        return grad.new_empty((*grad.shape[:-1], in_features))

    @torch.library.register_fake("fastft::ce_loss_grad_")
    def _(logits, targets, ignore_index):
        return logits.new_empty((logits.shape[0],), dtype=torch.float32)

    @torch.library.register_fake("fastft::attn_fwd")
    def _(q, k, v, scale, causal, key_padding_mask=None):
        return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32)

    @torch.library.register_fake("fastft::attn_bwd")
    def _(grad, q, k, v, out, lse, scale, causal, key_padding_mask=None):
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)

    def _attn_setup_context(ctx, inputs, output):
        q, k, v, scale, causal, *mask = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, out, lse, mask[0] if mask else None)
        ctx.scale, ctx.causal = scale, causal
        ctx.set_materialize_grads(True)

    def _attn_backward(ctx, grad_out, grad_lse):
        # lse is an auxiliary output for the backward; nothing differentiates through it.
        q, k, v, out, lse, mask = ctx.saved_tensors
        dq, dk, dv = ops.attn_bwd(grad_out.contiguous(), q, k, v, out, lse, ctx.scale, ctx.causal, mask)
        return dq, dk, dv, None, None, None

    torch.library.register_autograd("fastft::attn_fwd", _attn_backward, setup_context=_attn_setup_context)

    @torch.library.register_fake("fastft::rmsnorm_fwd")
    def _(x, weight, eps):
        return x.new_empty(x.shape), x.new_empty(x.shape[:-1], dtype=torch.float32)

    @torch.library.register_fake("fastft::rmsnorm_bwd")
    def _(grad, x, weight, rstd):
        return x.new_empty(x.shape)

    @torch.library.register_fake("fastft::silu_mul")
    def _(g, u):
        return g.new_empty(g.shape)

    @torch.library.register_fake("fastft::silu_mul_bwd")
    def _(grad, g, u):
        return g.new_empty(g.shape), u.new_empty(u.shape)

    def _rms_setup_context(ctx, inputs, output):
        x, weight, eps = inputs
        ctx.save_for_backward(x, weight, output[1])

    def _rms_backward(ctx, grad_y, grad_rstd):
        x, weight, rstd = ctx.saved_tensors
        dx = ops.rmsnorm_bwd(grad_y.contiguous(), x, weight, rstd) if ctx.needs_input_grad[0] else None
        dw = None
        if ctx.needs_input_grad[1]:  # y = w · t with t the rounded normalised x
            t = (x.float() * rstd[..., None]).to(x.dtype)
            dw = (grad_y * t).reshape(-1, x.shape[-1]).sum(0)
        return dx, dw, None

    torch.library.register_autograd("fastft::rmsnorm_fwd", _rms_backward, setup_context=_rms_setup_context)

    def _silu_setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def _silu_backward(ctx, grad):
        g, u = ctx.saved_tensors
        dg, du = ops.silu_mul_bwd(grad.contiguous(), g, u)
        return dg, du

    torch.library.register_autograd("fastft::silu_mul", _silu_backward, setup_context=_silu_setup_context)

    @torch.library.register_fake("fastft::rope")
    def _(x, cos, sin, backward):
        return x.new_empty(x.shape)

    def _rope_setup_context(ctx, inputs, output):
        x, cos, sin, backward = inputs
        ctx.save_for_backward(cos, sin)
        ctx.backward = backward

    def _rope_backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        return ops.rope(grad.contiguous(), cos, sin, not ctx.backward), None, None, None

    torch.library.register_autograd("fastft::rope", _rope_backward, setup_context=_rope_setup_context)

    # -- autograd: dX = dY · W through the transposed kernel; db = Σ dY; W frozen ---------------
    # Only the packed weight tensors (inputs that exist anyway) are saved; never x, never W_deq.
    def _qmm_setup_context(ctx, inputs, output):
        x, bias, *q = inputs
        tensors = [t for t in q if isinstance(t, torch.Tensor) or t is None]
        ctx.n_tensors = len(tensors)
        ctx.save_for_backward(*tensors)
        ctx.scalars = tuple(q[len(tensors):])
        ctx.out_features = q[-2]

    def _make_backward(grad_op):
        def backward(ctx, grad):
            q = ctx.saved_tensors
            dx = grad_op(grad, *q, *ctx.scalars) if ctx.needs_input_grad[0] else None
            db = grad.reshape(-1, ctx.out_features).sum(0) if ctx.needs_input_grad[1] else None
            return (dx, db) + (None,) * (len(q) + len(ctx.scalars))

        return backward

    torch.library.register_autograd("fastft::nf4_matmul", _make_backward(ops.nf4_matmul_grad_x),
                                    setup_context=_qmm_setup_context)
    torch.library.register_autograd("fastft::int4_matmul", _make_backward(ops.int4_matmul_grad_x),
                                    setup_context=_qmm_setup_context)

    # -- the cpp backend of the public ops ------------------------------------------------------
    def _ce_rows(logits, targets, ignore_index=-100) -> bool:
        # The fused row kernel is vectorized by hand for AVX-512 only; on the AVX2 / scalar tables
        # (correct, tested) it is slower than torch's own vectorized ops, which run instead.
        return (_C.isa() == "avx512" and _cpu(logits, (torch.float32, torch.bfloat16)) and logits.dim() == 2
                and logits.is_contiguous() and not logits.requires_grad)

    @register("cross_entropy_grad_", "cpp", supports=_ce_rows)
    def cross_entropy_grad_(logits, targets, ignore_index=-100):
        """Per-row losses, logits -> their gradient in place; fp32 / bf16 rows in one fused pass each."""
        return ops.ce_loss_grad_(logits, targets.to(torch.int64), int(ignore_index))

    @register("nf4_quantize", "cpp", supports=_on_cpu)
    def nf4_quantize(w, blocksize=64, double_quant=True):
        """Float (out, in) -> NF4Weight; bytes identical to the reference quantizer."""
        check_nf4_args(w, blocksize)
        w = w.detach()
        # float64 is rounded to fp32 first, exactly as the reference does (all arithmetic is fp32).
        data, absmax = ops.nf4_quantize(w.float() if w.dtype == torch.float64 else w, blocksize)
        if not torch.isfinite(absmax).all():
            raise ValueError("nf4_quantize: the weight contains inf or NaN; NF4 block scales must be finite")
        kw = {}
        if double_quant:
            offset = double_quant_offset(absmax)  # the reference's rule, shared
            code = dynamic_map(True)
            q, nested = ops.quantize_blockwise_8bit(absmax - offset, code, NESTED_BLOCKSIZE)
            kw = dict(nested_absmax=nested, nested_quant_map=code, offset=float(offset.item()))
            absmax = q
        return NF4Weight(data, w.shape, blocksize, w.dtype, nf4_code(), absmax, **kw)

    @register("nf4_dequantize", "cpp", supports=_dequantizes(NF4Weight))
    def nf4_dequantize(qweight, dtype=torch.float32):
        """NF4Weight -> dense (out, in) ``dtype``, bit-identical to the reference."""
        if not isinstance(qweight, NF4Weight):
            raise TypeError(f"nf4_dequantize: expected an NF4Weight, got {type(qweight).__name__}")
        return ops.nf4_dequantize(*nf4_args(qweight), list(qweight.shape), dtype)

    @register("int4_quantize", "cpp", supports=_on_cpu)
    def int4_quantize(w, group_size=128, symmetric=False):
        """Float (out, in) -> Int4Weight; bytes identical to the reference quantizer."""
        check_int4_args(w, group_size)
        w = w.detach()
        data, scales, zeros = ops.int4_quantize(w.float() if w.dtype == torch.float64 else w, group_size, symmetric)
        if not torch.isfinite(scales).all():
            raise ValueError("int4_quantize: the weight contains inf or NaN")
        return Int4Weight(data, scales, None if symmetric else zeros, group_size, w.shape, w.dtype)

    @register("int4_dequantize", "cpp", supports=_dequantizes(Int4Weight))
    def int4_dequantize(qweight, dtype=torch.float32):
        if not isinstance(qweight, Int4Weight):
            raise TypeError(f"int4_dequantize: expected an Int4Weight, got {type(qweight).__name__}")
        return ops.int4_dequantize(*int4_args(qweight), *qweight.shape, dtype)

    def _cpp_dequantize(qweight, dtype):
        """The transient dense weight of a matmul: NF4 into the reused workspace (fastft.ops.workspace:
        no allocation, and no fresh pages to fault in, per call), int4 into a new tensor."""
        if isinstance(qweight, NF4Weight):
            from .workspace import dequantize_transient

            return dequantize_transient(qweight, dtype)
        return int4_dequantize(qweight, dtype)

    def _onednn_rows(x, k):
        """fp32 with more rows than the fused dot kernel takes, and oneDNN's GEMM available."""
        # Under torch.compile the registered op stays in the graph (dynamo cannot trace pybind).
        return (x.dtype == torch.float32 and not torch.compiler.is_compiling() and cpu_gemm.uses_onednn()
                and x.numel() // max(k, 1) > _C.fused_max_m())

    def _quant_matmul_supports(x, qweight, bias=None) -> bool:
        return _cpu(x) and _compute_dtype(x) in KERNEL_DTYPES and isinstance(qweight, (NF4Weight, Int4Weight))

    @register("quant_matmul", "cpp", supports=_quant_matmul_supports)
    def quant_matmul(x, qweight, bias=None):
        """y = x @ W_deqᵀ (+ bias) in the compute dtype; dX by the transposed kernel, W gets no grad."""
        check_quant_matmul_args(x, qweight, bias)
        dt = _compute_dtype(x)
        xc = x.to(dt)
        b = None if bias is None else bias.to(dt)
        if _onednn_rows(xc, qweight.shape[1]):
            # fp32 at training sizes: dequantize W once (one pass, into the reused workspace) and
            # run oneDNN's GEMM, 2x the BLAS's fp32 rate on AVX-512 (fastft/ops/cpu_gemm.py); the
            # backward likewise. Nothing dense is saved.
            return DequantMatmulFunction.apply(xc, qweight, b, _cpp_dequantize, cpu_gemm.linear)
        if isinstance(qweight, NF4Weight):
            return ops.nf4_matmul(xc, b, *nf4_args(qweight), *qweight.shape)
        return ops.int4_matmul(xc, b, *int4_args(qweight), *qweight.shape)

    # Pointwise rows: autocast leaves these ops in their inputs' dtype, so the fused kernels apply
    # under autocast too (same dtypes in, same dtype out as the reference).
    _ROW_DTYPES = (torch.float32, torch.bfloat16)

    def _rms_rows(x, weight, eps) -> bool:
        return _cpu(x, _ROW_DTYPES) and weight.dtype == x.dtype and weight.dim() == 1

    @register("rms_norm", "cpp", supports=_rms_rows)
    def rms_norm(x, weight, eps):
        """One fused pass per row (two reductions' worth), saving x and 1/rms; dx likewise."""
        return ops.rmsnorm_fwd(x, weight, float(eps))[0]

    def _add_rms_rows(x, residual, weight, eps) -> bool:
        return _cpu(x) and _cpu(residual)

    @register("add_rms_norm", "cpp", supports=_add_rms_rows)
    def add_rms_norm(x, residual, weight, eps):
        """The residual add, then the dispatched rms_norm (the fused C++ row where it applies)."""
        h = x + residual
        return dispatch.call("rms_norm", h.device, h, weight, eps), h

    def _silu_rows(g, u) -> bool:
        return _cpu(g, _ROW_DTYPES) and u.dtype == g.dtype and g.shape == u.shape

    @register("silu_mul", "cpp", supports=_silu_rows)
    def silu_mul(g, u):
        """silu(g) · u in one pass, dg / du in one pass, saving g and u."""
        return ops.silu_mul(g, u)

    def _rope_dtype(x, cos, sin):
        """x's compute dtype: bf16 q against fp32 cos/sin (autocast) promotes, as torch does."""
        if x.dtype != cos.dtype and cos.dtype == sin.dtype and torch.promote_types(x.dtype, cos.dtype) == cos.dtype:
            return cos.dtype
        return x.dtype

    def _rope_rows(x, cos, sin, inplace=False) -> bool:
        dt = _rope_dtype(x, cos, sin)
        return (_cpu(x) and dt in _ROW_DTYPES and cos.dtype == dt and sin.dtype == dt and x.dim() == 4
                and cos.dim() == 3 and cos.shape[-1] % 2 == 0 and not cos.requires_grad and not sin.requires_grad
                and cos.shape == sin.shape and cos.shape[0] in (1, x.shape[0]) and cos.shape[1] == x.shape[1])

    @register("rope", "cpp", supports=_rope_rows)
    def rope(x, cos, sin, inplace=False):
        """Rotary embedding in one pass (and its transpose in backward); cos / sin get no gradient.
        Always a new tensor (``inplace`` is a hint)."""
        if cos.shape[0] != x.shape[0]:  # one table for the batch (transformers' rotary): the kernel reads (B, T, d)
            cos, sin = (t.expand(x.shape[0], -1, -1).contiguous() for t in (cos, sin))
        return ops.rope(x.to(_rope_dtype(x, cos, sin)), cos, sin, False)

    def _grad_rows(grad, qweight) -> bool:
        return _cpu(grad, KERNEL_DTYPES)

    @register("quant_matmul_grad_x", "cpp", supports=_grad_rows)
    def quant_matmul_grad_x(grad, qweight):
        """dX = dY · W_deq by the transposed C++ kernel (the fused LoRA node's backward)."""
        if _onednn_rows(grad, qweight.shape[0]):
            return cpu_gemm.mm(grad, _cpp_dequantize(qweight, grad.dtype))
        if isinstance(qweight, NF4Weight):
            return ops.nf4_matmul_grad_x(grad, *nf4_args(qweight), *qweight.shape)
        return ops.int4_matmul_grad_x(grad, *int4_args(qweight), *qweight.shape)

    # -- attention on CPU: fastft's kernel, or torch's fused (flash) CPU SDPA with a mask ---------
    def _attention_cpu(q, k, v, *, causal, scale=None, key_padding_mask=None, dropout_p=0.0, generator=None):
        return _cpu(q, KERNEL_DTYPES) and dropout_p <= 0.0  # float64 (gold) and dropout: the reference

    @register("attention", "cpp", supports=_attention_cpu)
    def attention(q, k, v, *, causal, scale=None, key_padding_mask=None, dropout_p=0.0, generator=None):
        """The reference's contract on CPU. fp32 / bf16 attention, causal or bidirectional, with
        or without a key padding mask, runs fastft's kernel (``fastft::attn_fwd`` / ``attn_bwd``, csrc/ops.cpp:
        GEMMs on 64-row query blocks against the keys they can see -- AVX512-BF16 pair-packed ones
        for bf16 where the CPU has them, fp32 BLAS otherwise -- softmax rows in L2, log-sum-exp
        saved, P recomputed in backward, one task per K/V head so dK/dV need no atomics).

        fp16 goes to torch's fused CPU SDPA (online softmax, nothing (T, S)
        saved), ``enable_gqa`` mapping query-head groups onto K/V heads (no repeat). Masks are
        boolean: ``is_causal`` when T == S and there is no padding (SDPA's causal is aligned
        top-left, which equals bottom-right only then), else an explicit bottom-right mask. Rows
        with no visible key are unmasked for the kernel and their output set to 0, so they get 0
        output and contribute 0 to every gradient. float64 (gold), dropout and non-CPU tensors go
        to the reference.
        """
        _check_attention_inputs(q, k, v, key_padding_mask)
        T, S = q.shape[2], k.shape[2]
        if q.dtype in (torch.float32, torch.bfloat16):
            # fastft's kernel (fastft::attn_fwd / attn_bwd): causal or not, any T / S, GQA by index,
            # padding on either side.
            sc = q.shape[-1] ** -0.5 if scale is None else float(scale)
            kpm = None if key_padding_mask is None else key_padding_mask.to(torch.bool)
            return ops.attn_fwd(q, k, v, sc, causal, kpm)[0]
        gqa = q.shape[1] != k.shape[1]
        if key_padding_mask is None and (not causal or T == S):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, enable_gqa=gqa)
        allowed = attention_mask_bias(T, S, causal=causal, key_padding_mask=key_padding_mask, device=q.device)
        # No data-dependent branch (torch.compile fullgraph): the fix-up always runs; it is cheap.
        dead = ~allowed.any(-1, keepdim=True)  # (B|1, 1, T, 1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed | dead, scale=scale, enable_gqa=gqa)
        return out.masked_fill(dead, 0.0)

    def _varlen_cpu(q, k, v, cu_seqlens, max_seqlen, *, causal, scale=None, dropout_p=0.0, generator=None):
        return _cpu(q, KERNEL_DTYPES) and dropout_p <= 0.0 and q.dim() == 3

    @register("attention_varlen", "cpp", supports=_varlen_cpu)
    def attention_varlen(q, k, v, cu_seqlens, max_seqlen, *, causal, scale=None, dropout_p=0.0, generator=None):
        """Packed documents, one fused SDPA call per document (no (total, total) mask)."""
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
            raise ValueError(
                f"attention_varlen: cu_seqlens must be 1-D with at least 2 entries, got {tuple(cu_seqlens.shape)}")
        cu = cu_seqlens.tolist()
        if cu[0] != 0 or cu[-1] != q.shape[0] or any(b < a for a, b in zip(cu, cu[1:])):
            raise ValueError(
                f"attention_varlen: cu_seqlens {cu} must start at 0, be non-decreasing and end at total={q.shape[0]}")
        if max(b - a for a, b in zip(cu, cu[1:])) > max_seqlen:
            raise ValueError(f"attention_varlen: a document is longer than max_seqlen={max_seqlen}")
        pieces = []
        for a, b in zip(cu, cu[1:]):
            if b == a:
                continue
            qi, ki, vi = (t[a:b].transpose(0, 1)[None] for t in (q, k, v))  # (1, H, L, D)
            pieces.append(attention(qi, ki, vi, causal=causal, scale=scale)[0].transpose(0, 1))
        return torch.cat(pieces, dim=0) if pieces else torch.zeros_like(q)

    # -- LoRA linear through the rank side: the torch backend's op (fastft/ops/lean.py, with its
    # predicate) is device-agnostic and its base matmul goes through fastft.ops.quant_matmul, i.e.
    # this backend's C++ quant-matmul on CPU; registered here too, so that FASTFT_BACKEND=cpp and
    # backend_for name the backend whose kernels run.
    from .lean import lora_linear as _lean_lora_linear

    register("lora_linear", "cpp")(_lean_lora_linear)

    def nf4_dequantize_into(qweight: NF4Weight, out: torch.Tensor) -> torch.Tensor:
        """Dequantize into a preallocated contiguous (out, in) CPU buffer of fp32 / bf16 / fp16."""
        ops.nf4_dequantize_out(*nf4_args(qweight), list(qweight.shape), out)
        return out

    from .workspace import register_into

    register_into("cpu", nf4_dequantize_into)  # the lean matmuls' reused dequantize workspace

    def isa() -> str:
        """The SIMD kernel table in use: 'avx512', 'avx2' or 'scalar' (FASTFT_CPU_ISA overrides)."""
        return _C.isa()

else:
    logger.warning(
        "fastft: the C++ extension fastft._C is not available (%s); CPU ops use the slower PyTorch "
        "reference fallback. Rebuild with `pip install --no-build-isolation -e .` to get the C++ kernels.",
        _IMPORT_ERROR,
    )

__all__ = ["AVAILABLE", "SCHEMAS", "KERNEL_DTYPES", "nf4_args", "int4_args"]
