"""fastft's public ops. Only this package knows about backends (see ``dispatch``).

Every module in fastft calls these functions; each dispatches on the device of its tensors and
``FASTFT_BACKEND`` to the triton, cpp, torch or reference implementation with the same signature.
"""
from __future__ import annotations

import torch

from . import dispatch
from . import argcheck as _ac
from .argcheck import check_linear_cross_entropy_args
from .dispatch import backend_for, impl, register


def _device(obj) -> torch.device:
    return obj.device if hasattr(obj, "device") else torch.device("cpu")


def attention(q, k, v, *, causal, scale=None, key_padding_mask=None, dropout_p=0.0, generator=None):
    """Scaled dot-product attention. q (B, Hq, T, D), k/v (B, Hkv, S, D), Hq % Hkv == 0 (GQA).

    ``causal`` masks are aligned bottom-right (query i sees keys j <= i + S - T).
    ``key_padding_mask`` (B, S) bool, True = real token. Returns (B, Hq, T, D) in q's dtype.
    """
    _ac.check_attention_args(q, k, v, causal, scale, key_padding_mask, dropout_p)
    return dispatch.call("attention", q.device, q, k, v, causal=causal, scale=scale,
                         key_padding_mask=key_padding_mask, dropout_p=dropout_p, generator=generator)


def attention_varlen(q, k, v, cu_seqlens, max_seqlen, *, causal, scale=None, dropout_p=0.0, generator=None):
    """Attention over packed documents: q (total, Hq, D), k/v (total, Hkv, D), cu_seqlens (n+1,)."""
    _ac.check_attention_varlen_args(q, k, v, cu_seqlens, max_seqlen, causal, scale, dropout_p)
    return dispatch.call("attention_varlen", q.device, q, k, v, cu_seqlens, max_seqlen, causal=causal, scale=scale,
                         dropout_p=dropout_p, generator=generator)


def lora_linear(x, weight, lora_A, lora_B, scaling, bias=None, dropout_p=0.0, generator=None):
    """y = x Wᵀ + b + scaling · (drop(x) Aᵀ) Bᵀ; ``weight`` is a dense tensor or a quantized weight."""
    _ac.check_lora_linear_args(x, weight, lora_A, lora_B, scaling, bias, dropout_p)
    return dispatch.call("lora_linear", x.device, x, weight, lora_A, lora_B, scaling, bias=bias, dropout_p=dropout_p,
                         generator=generator)


def quant_matmul(x, qweight, bias=None):
    """y = x @ dequant(qweight)ᵀ (+ bias) for an NF4Weight / Int4Weight; dX flows, W gets no grad."""
    return dispatch.call("quant_matmul", x.device, x, qweight, bias)


def nf4_quantize(w, blocksize=64, double_quant=True):
    """Quantize a float tensor to NF4 (bitsandbytes layout). Returns a ``fastft.quant.NF4Weight``."""
    _ac.check_quant_args("nf4_quantize", w, "blocksize", blocksize)
    return dispatch.call("nf4_quantize", w.device, w, blocksize=blocksize, double_quant=double_quant)


def nf4_dequantize(qweight, dtype=torch.float32):
    """Dequantize an NF4Weight to a dense (out, in) tensor of ``dtype``."""
    _ac.check_dequant_dtype("nf4_dequantize", dtype)
    return dispatch.call("nf4_dequantize", _device(qweight), qweight, dtype)


def int4_quantize(w, group_size=128, symmetric=False):
    """Group-wise int4 quantization along the input dim. Returns a ``fastft.quant.Int4Weight``."""
    _ac.check_quant_args("int4_quantize", w, "group_size", group_size)
    return dispatch.call("int4_quantize", w.device, w, group_size=group_size, symmetric=symmetric)


def int4_dequantize(qweight, dtype=torch.float32):
    """Dequantize an Int4Weight to a dense (out, in) tensor of ``dtype``."""
    _ac.check_dequant_dtype("int4_dequantize", dtype)
    return dispatch.call("int4_dequantize", _device(qweight), qweight, dtype)


def rms_norm(x, weight, eps):
    """RMSNorm as in HF Llama: w · (x / sqrt(mean(x²) + eps)), normalised in fp32, cast to x's dtype
    before the weight."""
    _ac.check_rms_norm_args(x, weight, eps)
    return dispatch.call("rms_norm", x.device, x, weight, eps)


def add_rms_norm(x, residual, weight, eps):
    """(rms_norm(x + residual, weight, eps), x + residual): the residual add and the RMSNorm after it
    in one pass (the Triton kernel on CUDA). Returns (normed, sum); gradients flow through both."""
    _ac.check_rms_norm_args(x, weight, eps, residual=residual, op="add_rms_norm")
    return dispatch.call("add_rms_norm", x.device, x, residual, weight, eps)


def rope(x, cos, sin, inplace=False):
    """Rotary position embedding: x (B, T, H, D), cos / sin (B or 1, T, d), d <= D (tail unrotated).

    ``inplace=True`` says the caller no longer needs x: a backend may then write the result into x
    (the Triton kernel does when autograd allows it); always use the returned tensor.
    """
    _ac.check_rope_args(x, cos, sin)
    return dispatch.call("rope", x.device, x, cos, sin, inplace=inplace)


def silu_mul(g, u):
    """SwiGLU's silu(g) · u (saves only g and u for backward)."""
    _ac.check_silu_mul_args(g, u)
    return dispatch.call("silu_mul", g.device, g, u)


def cross_entropy_grad_(logits, targets, ignore_index=-100):
    """Per-row cross-entropy losses of ``logits`` (n, V); ``logits`` becomes softmax − onehot in place.

    The fused loss-and-gradient step of a chunked cross-entropy: returns (n,) losses (fp32 for
    fp32 / half logits), zero loss and gradient on rows whose target is ``ignore_index``.
    """
    _ac.check_cross_entropy_grad_args(logits, targets, ignore_index)
    return dispatch.call("cross_entropy_grad_", logits.device, logits, targets, ignore_index)


def linear_cross_entropy(hidden, weight, labels, *, ignore_index=-100, reduction="mean", bias=None, chunk_rows=None,
                         stream_weight=None, vocab_chunk=None):
    """Cross-entropy of ``hidden @ weightᵀ + bias`` (the LM head) against ``labels``, never keeping
    the (tokens × vocab) logits for backward.

    hidden (..., H), weight (V, H), labels (...) int (no shift: callers shift for causal LMs),
    ``ignore_index`` rows skipped; ``reduction`` "mean" (over non-ignored rows, as F.cross_entropy:
    NaN when all are ignored) or "sum". The loss is computed in at least fp32; the logits' matmul runs
    in autocast's dtype when autocast is on. Gradients flow to ``hidden`` and, when they require
    grad, ``weight`` and ``bias``. ``chunk_rows`` overrides the chunk size (default: from the
    vocabulary and the device's free memory).

    A frozen ``weight`` (and ``bias``) on the CPU while ``hidden`` is on another device -- or any
    weight with ``stream_weight=True`` -- is streamed to hidden's device ``vocab_chunk`` vocabulary
    rows at a time with an online log-sum-exp (``fastft.ops.loss.streamed_linear_cross_entropy``;
    docs/offload.md): the device never holds the whole weight. Such a weight must not require grad.
    """
    if stream_weight or (stream_weight is None and isinstance(weight, torch.Tensor) and isinstance(hidden, torch.Tensor)
                         and weight.device.type == "cpu" and hidden.device.type != "cpu"):
        # (registered by fastft.ops.loss, which imports this package: a plug-in, not an import)
        streamed = dispatch.impl("linear_cross_entropy_streamed", "torch")
        return streamed(hidden, weight, labels, ignore_index=ignore_index, reduction=reduction,
                        bias=bias, chunk_rows=chunk_rows, vocab_chunk=vocab_chunk)
    check_linear_cross_entropy_args(hidden, weight, labels, ignore_index, reduction, bias)
    return dispatch.get_impl("linear_cross_entropy", hidden.device)(
        hidden, weight, labels, ignore_index=ignore_index, reduction=reduction, bias=bias, chunk_rows=chunk_rows)


def layer_norm(x, weight, bias, eps=1e-5):
    """LayerNorm over the last dimension as ``nn.LayerNorm`` / HF BERT: (x − mean) · rsqrt(var + eps)
    · weight + bias (biased variance, fp32 inside); y in x's dtype (fp32 under CUDA autocast, as
    torch's autocast runs layer_norm there). Gradients for x, weight and bias."""
    _ac.check_layer_norm_args(x, weight, bias, eps)
    return dispatch.call("layer_norm", x.device, x, weight, bias, eps)


def gelu(x):
    """GELU, the exact erf form ½ x (1 + erf(x / √2)) (``F.gelu``, HF's "gelu"); saves x for backward."""
    _ac.check_gelu_args(x)
    return dispatch.call("gelu", x.device, x)


__all__ = [
    "linear_cross_entropy", "attention", "cross_entropy_grad_", "rms_norm", "add_rms_norm", "rope", "silu_mul",
    "layer_norm", "gelu", "attention_varlen", "lora_linear", "quant_matmul", "nf4_quantize", "nf4_dequantize",
    "int4_quantize", "int4_dequantize", "backend_for", "impl", "register", "dispatch",
]
