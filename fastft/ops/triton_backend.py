"""The ``triton`` backend: fastft's Triton kernels (``fastft.kernels``) behind the op signatures.

The twin of ``fastft/ops/cpp.py``. ``fastft.kernels`` imports only torch and triton
(tests/test_layering.py): its functions take tensors and plain descriptions. This module

* converts fastft's objects for them: an ``NF4Weight`` / ``Int4Weight`` becomes a ``QuantMeta``
  and ``QuantTensors`` (``raw``), and the NF4 codebooks and the double-quantization offset rule come
  from ``fastft.quant`` (``nf4_quantize``);
* composes kernels with the dispatcher where an op needs another op: a LoRA layer over a 4-bit base
  runs the base through ``fastft.ops.quant_matmul`` (``QuantBase``), or, at decode shapes, the quant
  decode kernel with the LoRA term in its epilogue;
* picks the kernel within the backend: forward-only attention with a few query rows per KV group
  runs the split-KV decode kernel;
* turns every kernel launcher the kernel modules declare as an entry point (``kernels/_common.py``
  ``entry``: ``triton_attn_fwd``, ``triton_lora_down``, ``triton_nf4_dequantize``, ...) into a
  ``torch.library`` custom op ``fastft::<name>`` with its fake implementation
  (``fastft.ops.library.kernel_op``), so ``torch.compile`` sees one node per launch and a step can
  be traced on fake CUDA tensors without a GPU (``fastft/ops/fake_step.py``);
* registers the ops, each with the predicate of the calls it does not take (they run the
  reference, and ``fastft.ops.backend_for(op, device, *args)`` says so):

  ============== ====================================================================
  quant_matmul   float64 activations (no fp64 kernel)
  nf4_dequantize double quantization with a nested block size other than 256
  int4_quantize  group sizes that are not a power of two >= 32 (e.g. 16 or 96)
  int4_dequantize the same
  rms_norm       float64 (or other non-fp16/bf16/fp32) tensors, a weight that is not (N,), N > 65536
  add_rms_norm   the same, or a residual of another shape
  rope           float64, cos / sin that need a gradient or are not (B or 1, T, d) with d even <= D
  silu_mul       float64, g and u of different dtypes or shapes
  layer_norm     float64, weight or bias None, rows wider than 65536
  gelu           float64
  cross_entropy_grad_ float64 logits, non-unit column stride, malformed shapes (the
                 reference raises the error)
  ============== ====================================================================

The row-wise ops' launchers (``kernels/rms_norm.py``, ``rope.py``, ``silu_mul.py``) run as the
``torch.library`` custom ops ``fastft::triton_rms_norm_fwd`` / ``_bwd``, ``triton_rope`` /
``triton_rope_``, ``triton_silu_mul_fwd`` / ``_bwd``, each with its fake implementation
(``fastft.ops.library.kernel_op``): their autograd Functions call these.

Importing this module imports triton (the dispatcher loads it on the first CUDA op, or on CPU
under ``TRITON_INTERPRET=1`` when the triton backend is asked for).
"""
from __future__ import annotations

import torch

from fastft.kernels import _common as _kcommon
from fastft.kernels import attention as _attn
from fastft.kernels import attention_decode as _attn_decode
from fastft.kernels import cross_entropy as _ce
from fastft.kernels import gelu as _gelu
from fastft.kernels import layer_norm as _ln
from fastft.kernels import lora as _lora
from fastft.kernels import lora_fused as _lora_fused  # noqa: F401  (declares its entry points)
from fastft.kernels import quant_decode as _qdecode
from fastft.kernels import quant_matmul as _qmm
from fastft.kernels import quant_pack as _qpack
from fastft.kernels import rms_norm as _rms
from fastft.kernels import rope as _rope
from fastft.kernels import silu_mul as _silu
from fastft.kernels.quant_pack import QuantMeta, QuantTensors
from fastft.quant import codebooks
from fastft.quant.int4 import Int4Weight, check_int4_args
from fastft.quant.nf4 import NF4Weight, check_nf4_args, double_quant_offset

from . import dispatch
from .argcheck import check_targets
from .dispatch import register
from .library import kernel_op, registered
from .reference_quant import check_quant_matmul_args


def _bind_entries() -> None:
    """Every kernel entry point becomes the custom op ``fastft::<name>`` (once per process)."""
    ops = registered()
    for name, e in _kcommon.entries().items():
        op = ops.get(name) or kernel_op(name, fake=e.fake, mutates_args=e.mutates_args)(e.raw)
        e.bind(op)


_bind_entries()


# ----------------------------------------------------------------------------------- quantized weights
def raw(qweight) -> tuple[QuantMeta, QuantTensors]:
    """The kernels' view of an NF4Weight / Int4Weight: (QuantMeta, QuantTensors)."""
    if isinstance(qweight, NF4Weight):
        N, K = (int(s) for s in qweight.shape)
        dq = qweight.nested_absmax is not None
        if dq and int(qweight.nested_blocksize) != _qpack.NESTED_BLOCK:
            raise ValueError(f"nested_blocksize={qweight.nested_blocksize} is not supported (expected "
                             f"{_qpack.NESTED_BLOCK})")
        meta = QuantMeta(0, N, K, int(qweight.blocksize), dq, False, float(qweight.offset) if dq else 0.0)
        t = QuantTensors(qweight.data, qweight.absmax, qweight.nested_absmax if dq else None,
                         qweight.nested_quant_map if dq else None, qweight.quant_map)
    elif isinstance(qweight, Int4Weight):
        N, K = (int(s) for s in qweight.shape)
        meta = QuantMeta(1, N, K, int(qweight.group_size), False, qweight.zeros is None)
        t = QuantTensors(qweight.data, qweight.scales, qweight.zeros, None, None)
    else:
        raise TypeError(f"quant_matmul: expected an NF4Weight or Int4Weight, got {type(qweight).__name__}")
    _qpack.check_meta(meta)
    return meta, t


def decode_eligible(x: torch.Tensor, qweight) -> bool:
    """Whether ``quant_matmul(x, qweight)`` runs the quant decode kernel (``quant_decode``): at most
    16 rows of fp16 / bf16 compute over the aligned layout of an NF4 / int4 weight the kernels take."""
    try:
        meta = raw(qweight)[0]
    except (TypeError, ValueError):
        return False
    return _qdecode.decode_eligible(x, meta)


def quant_matmul_lora(x, qweight, bias, u, lora_B, scaling):
    """Forward only: x @ dequant(W)ᵀ (+ bias) + scaling · u Bᵀ in one kernel (``kernels/quant_matmul.py``)."""
    return _qmm.quant_matmul_lora(x, *raw(qweight), bias, u, lora_B, scaling)


def _not_float64(x, qweight=None, bias=None) -> bool:
    return getattr(x, "dtype", None) != torch.float64


@register("quant_matmul", "triton", supports=_not_float64)
def quant_matmul(x, qweight, bias=None):
    """y = x @ dequant(qweight)ᵀ (+ bias); argument checks shared with the reference backend."""
    check_quant_matmul_args(x, qweight, bias)
    return _qmm.quant_matmul(x, *raw(qweight), bias)


@register("nf4_quantize", "triton")
def nf4_quantize(w, blocksize=64, double_quant=True):
    check_nf4_args(w, blocksize)
    if not torch.isfinite(w).all():
        raise ValueError("nf4_quantize: the weight contains inf or NaN; NF4 block scales must be finite")
    dev = w.device
    data, absmax = _qpack.nf4_quantize_raw(w, blocksize, codebooks.nf4_midpoints(dev))
    kw = {}
    if double_quant:
        # torch's fp32 mean, as bitsandbytes computes it (summation order decides the last bit), by
        # the reference's rule (float64 when the fp32 sum overflows).
        offset = float(double_quant_offset(absmax).item())
        codes, nested = _qpack.nf4_double_quantize_raw(absmax, offset, codebooks.dynamic_map_midpoints_f64(dev))
        kw = dict(nested_absmax=nested, nested_quant_map=codebooks.dynamic_map(True, dev), offset=offset)
        absmax = codes
    return NF4Weight(data, w.shape, blocksize, w.dtype, codebooks.nf4_code(dev), absmax, **kw)


def _nested_block_supported(qweight, dtype=None) -> bool:
    return not (isinstance(qweight, NF4Weight) and qweight.double_quant
                and qweight.nested_blocksize != _qpack.NESTED_BLOCK)


@register("nf4_dequantize", "triton", supports=_nested_block_supported)
def nf4_dequantize(qweight, dtype=torch.float32):
    if not isinstance(qweight, NF4Weight):
        raise TypeError(f"nf4_dequantize: expected an NF4Weight, got {type(qweight).__name__}")
    return _qpack.nf4_dequantize_raw(qweight.data, qweight.absmax, qweight.quant_map, qweight.shape,
                                     qweight.blocksize, dtype, qweight.nested_absmax, qweight.nested_quant_map,
                                     qweight.offset)


def dequantize_into(qweight, dtype, workspace) -> torch.Tensor:
    """The dense ``dtype`` weight written into ``workspace`` (a flat buffer of at least
    ``workspace_numel(qweight, dtype)`` elements; the result is a view of it). For the transient
    dense weight of a matmul (``fastft.ops.workspace``)."""
    if isinstance(qweight, NF4Weight):
        return _qpack.nf4_dequantize_raw(qweight.data, qweight.absmax, qweight.quant_map, qweight.shape,
                                         qweight.blocksize, dtype, qweight.nested_absmax, qweight.nested_quant_map,
                                         qweight.offset, workspace=workspace)
    if isinstance(qweight, Int4Weight):
        return _qpack.int4_dequantize_raw(qweight.data, qweight.scales, qweight.zeros, qweight.shape,
                                          qweight.group_size, dtype, workspace=workspace)
    raise TypeError(f"dequantize_into: expected an NF4Weight or Int4Weight, got {type(qweight).__name__}")


def workspace_numel(qweight, dtype) -> int:
    return _qpack.nf4_workspace_numel(qweight.shape, dtype)


def dequantize_into_supported(qweight, dtype) -> bool:
    return (dtype in (torch.float32, torch.bfloat16, torch.float16)
            and (_nested_block_supported(qweight) if isinstance(qweight, NF4Weight)
                 else isinstance(qweight, Int4Weight) and _weight_group_supported(qweight)))


def _group_supported(w, group_size=128, symmetric=False) -> bool:
    return isinstance(group_size, int) and _qpack.int4_supported(group_size)


@register("int4_quantize", "triton", supports=_group_supported)
def int4_quantize(w, group_size=128, symmetric=False):
    check_int4_args(w, group_size)
    if not torch.isfinite(w).all():
        raise ValueError("int4_quantize: the weight contains inf or NaN")
    data, scales, zeros = _qpack.int4_quantize_raw(w, group_size, symmetric)
    return Int4Weight(data, scales, zeros, group_size, w.shape, w.dtype)


def _weight_group_supported(qweight, dtype=None) -> bool:
    return not isinstance(qweight, Int4Weight) or _qpack.int4_supported(qweight.group_size)


@register("int4_dequantize", "triton", supports=_weight_group_supported)
def int4_dequantize(qweight, dtype=torch.float32):
    if not isinstance(qweight, Int4Weight):
        raise TypeError(f"int4_dequantize: expected an Int4Weight, got {type(qweight).__name__}")
    return _qpack.int4_dequantize_raw(qweight.data, qweight.scales, qweight.zeros, qweight.shape, qweight.group_size,
                                      dtype)


# ------------------------------------------------------------------------------------------------ LoRA
class QuantBase:
    """A 4-bit weight as the frozen base of the LoRA kernels (the interface ``kernels/lora.py``
    documents): the base product through the dispatched ``quant_matmul`` (its own autograd node),
    or at decode shapes the quant decode kernel with the low-rank term in its epilogue, dX through
    the dispatched ``quant_matmul_grad_x``."""

    def __init__(self, qweight):
        self.qweight = qweight
        self.shape = tuple(qweight.shape)
        self.device = qweight.device

    def matmul(self, x, bias):
        return dispatch.call("quant_matmul", x.device, x, self.qweight, bias)

    def fused(self, x2) -> bool:
        return decode_eligible(x2, self.qweight)

    def matmul_lora(self, x2, bias, u, lora_B, scaling):
        return quant_matmul_lora(x2, self.qweight, bias, u, lora_B, scaling)

    def grad_x(self, dy2):
        return dispatch.call("quant_matmul_grad_x", dy2.device, dy2, self.qweight)


@register("lora_linear", "triton")
def lora_linear(x, weight, lora_A, lora_B, scaling, bias=None, dropout_p=0.0, generator=None):
    """The fused LoRA kernels (``kernels/lora.py``); a quantized base through ``QuantBase``."""
    if not isinstance(weight, torch.Tensor):
        weight = QuantBase(weight)
    return _lora.lora_linear(x, weight, lora_A, lora_B, scaling, bias=bias, dropout_p=dropout_p, generator=generator)


def lora_qkv(x, weights, lora_As, lora_Bs, scalings, biases=None, dropout_p=0.0, generator=None):
    """The fused q/k/v LoRA block (``kernels/lora_fused.py``; dense bases), for ``fastft.nn.fused_blocks``."""
    return _lora_fused.lora_qkv(x, weights, lora_As, lora_Bs, scalings, biases=biases, dropout_p=dropout_p,
                                generator=generator)


def lora_gate_up_swiglu(x, weights, lora_As, lora_Bs, scalings, biases=None, dropout_p=0.0, generator=None):
    """The fused gate/up + SwiGLU LoRA block (``kernels/lora_fused.py``; dense bases)."""
    return _lora_fused.lora_gate_up_swiglu(x, weights, lora_As, lora_Bs, scalings, biases=biases,
                                           dropout_p=dropout_p, generator=generator)


# ------------------------------------------------------------------------------------------- attention
@register("attention", "triton")
def attention(q, k, v, *, causal, scale=None, key_padding_mask=None, dropout_p=0.0, generator=None):
    """FlashAttention-2 kernels (``kernels/attention.py``); forward-only calls with at most
    ``DECODE_MAX_ROWS`` query rows per KV group run the split-KV decode kernel
    (``kernels/attention_decode.py``)."""
    if _attn_decode.decode_eligible(q, k, v, dropout_p):
        return _attn_decode.attention_decode(q, k, v, causal=causal, scale=scale, key_padding_mask=key_padding_mask)
    return _attn.attention(q, k, v, causal=causal, scale=scale, key_padding_mask=key_padding_mask,
                           dropout_p=dropout_p, generator=generator)


register("attention_varlen", "triton")(_attn.attention_varlen)


# ------------------------------------------------------------------ custom ops (row-wise ops, CE, norms)
def _eager(args) -> bool:
    """Real tensors outside ``torch.compile``: the launcher runs directly. Python custom ops cost
    tens of microseconds of dispatch per call (more than a BERT-sized LayerNorm takes on a GPU);
    fake / meta tensors (memory estimates) and compiled code go through the custom op and its fake."""
    if torch.compiler.is_compiling():
        return False
    return all(t.__class__ in (torch.Tensor, torch.nn.Parameter) and not t.is_meta
               for t in args if isinstance(t, torch.Tensor))


def _kernel_op(name, fn, fake, **kw):
    """``fn`` registered as ``fastft::<name>``; returned as ``torch.ops.fastft.<name>`` (the form
    torch.compile traces as one node, where the Python ``CustomOpDef`` object is opaque to it)."""
    kernel_op(name, fake=fake, **kw)(fn)
    return getattr(torch.ops.fastft, name)


def _dual(op, raw):
    """``raw(*args)`` on the eager path, the custom op ``op(*args)`` otherwise (``_eager``)."""

    def call(*args):
        return raw(*args) if _eager(args) else op(*args)

    call.op, call.raw = op, raw
    return call


def _bind_row_ops() -> None:
    """The row kernels' launchers become custom ops with fake implementations; their autograd
    Functions call those (once per process)."""
    fwd = _kernel_op("triton_rms_norm_fwd", _rms.rms_norm_fwd, _rms.rms_norm_fwd_fake)
    bwd = _kernel_op("triton_rms_norm_bwd", _rms.rms_norm_bwd, _rms.rms_norm_bwd_fake)
    for fn in (_rms.RMSNormFunction, _rms.AddRMSNormFunction):
        fn.fwd, fn.bwd = staticmethod(fwd), staticmethod(bwd)
    _rope.RopeFunction.fwd = staticmethod(_kernel_op("triton_rope", _rope.rope_fwd, _rope.rope_fwd_fake))
    _rope.RopeFunction.fwd_ = staticmethod(_kernel_op("triton_rope_", _rope.rope_, _rope.rope_inplace_fake,
                                                      mutates_args=("x",)))
    _silu.SiluMulFunction.fwd = staticmethod(_kernel_op("triton_silu_mul_fwd", _silu.silu_mul_fwd,
                                                        _silu.silu_mul_fwd_fake))
    _silu.SiluMulFunction.bwd = staticmethod(_kernel_op("triton_silu_mul_bwd", _silu.silu_mul_bwd,
                                                        _silu.silu_mul_bwd_fake))


_bind_row_ops()


@register("rms_norm", "triton", supports=lambda x, weight, eps: _rms.supported(x, weight))
def rms_norm(x, weight, eps):
    """HF Llama RMSNorm (``kernels/rms_norm.py``), weight gradient included."""
    return _rms.rms_norm(x, weight, eps)


@register("add_rms_norm", "triton",
          supports=lambda x, residual, weight, eps: _rms.supported(x, weight, residual))
def add_rms_norm(x, residual, weight, eps):
    """(rms_norm(x + residual), x + residual) in one pass (``kernels/rms_norm.py``)."""
    return _rms.add_rms_norm(x, residual, weight, eps)


@register("rope", "triton", supports=lambda x, cos, sin, inplace=False: _rope.supported(x, cos, sin))
def rope(x, cos, sin, inplace=False):
    """Rotary embedding (``kernels/rope.py``), written into x when ``inplace`` and autograd allows."""
    return _rope.rope(x, cos, sin, inplace)


@register("silu_mul", "triton", supports=_silu.supported)
def silu_mul(g, u):
    """silu(g) · u saving g and u (``kernels/silu_mul.py``)."""
    return _silu.silu_mul(g, u)


# ---------------------------------------------------------------------------------------- cross-entropy
def _ce_fake(logits, targets, ignore_index):
    return logits.new_empty(logits.shape[:1], dtype=torch.float32)


def _ce_grad_raw(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
    loss = torch.empty(logits.shape[:1], dtype=torch.float32, device=logits.device)
    _ce.cross_entropy_grad_(logits, targets, ignore_index, loss)
    return loss


_ce_grad = _dual(_kernel_op("triton_cross_entropy_grad_", _ce_grad_raw, _ce_fake, mutates_args=("logits",)),
                 _ce_grad_raw)


@register("cross_entropy_grad_", "triton", supports=_ce.supported)
def cross_entropy_grad_(logits, targets, ignore_index=-100):
    """Per-row losses (fp32), logits ← softmax − onehot in place (``kernels/cross_entropy.py``, one
    launch); targets checked on the device without a host synchronisation (``check_targets``)."""
    check_targets(targets, logits.shape[1], int(ignore_index), "cross_entropy_grad_")
    return _ce_grad(logits, targets, int(ignore_index))


# ----------------------------------------------------------------------------------- LayerNorm, GELU
# The kernels' autograd Functions call their module's LAUNCHERS; these become custom ops with fakes
# (taken on fake / meta tensors and under torch.compile, ``_dual``).
def _ln_fwd_fake(x, weight, bias, eps, out_dtype):
    M = x.shape[0]
    f32 = torch.float32
    return x.new_empty(x.shape, dtype=out_dtype), x.new_empty(M, dtype=f32), x.new_empty(M, dtype=f32)


def _ln_bwd_fake(dy, x, weight, mean, rstd):
    N = x.shape[1]
    return x.new_empty(x.shape), x.new_empty(N, dtype=torch.float32), x.new_empty(N, dtype=torch.float32)


_ln.LAUNCHERS.update(fwd=_dual(_kernel_op("triton_layer_norm_fwd", _ln.layer_norm_fwd, _ln_fwd_fake),
                                _ln.layer_norm_fwd),
                     bwd=_dual(_kernel_op("triton_layer_norm_bwd", _ln.layer_norm_bwd, _ln_bwd_fake),
                                _ln.layer_norm_bwd))
_gelu.LAUNCHERS.update(fwd=_dual(_kernel_op("triton_gelu_fwd", _gelu.gelu_fwd, lambda x: torch.empty_like(x)),
                                  _gelu.gelu_fwd),
                       bwd=_dual(_kernel_op("triton_gelu_bwd", _gelu.gelu_bwd, lambda dy, x: torch.empty_like(x)),
                                  _gelu.gelu_bwd))


@register("layer_norm", "triton", supports=_ln.supported)
def layer_norm(x, weight, bias, eps=1e-5):
    """``kernels/layer_norm.py``; under CUDA autocast the output is fp32, as torch's CUDA autocast
    runs ``layer_norm`` in fp32 (the kernel reads x in its own dtype; CPU autocast leaves it alone)."""
    out = torch.float32 if x.device.type == "cuda" and torch.is_autocast_enabled("cuda") else x.dtype
    return _ln.layer_norm(x, weight, bias, eps, out)


gelu = register("gelu", "triton", supports=_gelu.supported)(_gelu.gelu)


__all__ = ["QuantBase", "add_rms_norm", "attention", "cross_entropy_grad_", "decode_eligible", "dequantize_into",
           "dequantize_into_supported", "gelu", "int4_dequantize", "int4_quantize", "layer_norm", "lora_gate_up_swiglu",
           "lora_linear", "lora_qkv", "nf4_dequantize", "nf4_quantize", "quant_matmul", "quant_matmul_lora", "raw",
           "rms_norm", "rope", "silu_mul", "workspace_numel"]
