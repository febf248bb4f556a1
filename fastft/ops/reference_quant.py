"""Pure-PyTorch references of fastft's quantization ops (the test oracle and the CPU fallback).

* ``nf4_quantize`` / ``nf4_dequantize`` -- NF4 in bitsandbytes' layout; the format is specified in
  ``fastft/quant/nf4.py``. Both stream over the flattened weight in chunks of 2^18 elements
  (a whole number of blocks) so that no full-size fp32 temporary exists: peak extra memory is a few
  chunk-sized buffers plus the outputs.
* ``int4_quantize`` / ``int4_dequantize`` -- group-wise int4; format in ``fastft/quant/int4.py``;
  chunked over rows the same way.
* ``quant_matmul(x, qweight, bias)`` -- y = x · deq(W)ᵀ + b as an autograd Function that saves
  nothing for backward: forward dequantizes W into the compute dtype, multiplies and drops it;
  backward dequantizes again for dX = dY · W. The weight gets no gradient. The compute dtype is
  x's dtype, or the autocast dtype when autocast is on (float64 inputs are never downcast), like
  ``F.linear`` under autocast. Bias is cast to the compute dtype; its gradient comes back in its
  own dtype.

Dtypes: weights fp16/bf16/fp32/fp64 (quantization arithmetic in fp32, as bitsandbytes does);
activations fp16/bf16/fp32/fp64.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fastft.quant.codebooks import NF4_ZERO_INDEX, dynamic_map, nf4_code, nf4_midpoints
from fastft.quant.int4 import Int4Weight, check_int4_args
from fastft.quant.nf4 import NF4Weight, check_nf4_args, double_quantize_absmax

from .dispatch import register

# Elements handled per step by the streaming (de)quantizers: 1 MiB of fp32, small next to any
# weight worth quantizing (and cache-friendly), large enough that the Python loop costs nothing.
CHUNK_ELEMS = 1 << 18


def _unpack_nibbles(packed: torch.Tensor, n: int) -> torch.Tensor:
    """uint8 (m,) -> uint8 (n,) codes, high nibble first. n <= 2m."""
    return torch.stack((packed >> 4, packed & 0xF), dim=-1).reshape(-1)[:n]


def _pack_nibbles(codes: torch.Tensor, pad_code: int) -> torch.Tensor:
    """uint8 (..., k) codes -> uint8 (..., ceil(k/2)), even positions in the high nibble."""
    if codes.shape[-1] % 2:
        codes = F.pad(codes, (0, 1), value=pad_code)
    return (codes[..., 0::2] << 4) | codes[..., 1::2]


def _blockwise(x: torch.Tensor, per_block: torch.Tensor, blocksize: int, op) -> torch.Tensor:
    """op(x_block, value_of_its_block) over consecutive blocks of x (1-D), the last maybe short."""
    full = (x.numel() // blocksize) * blocksize
    out = torch.empty_like(x)
    nfull = full // blocksize
    if nfull:
        out[:full] = op(x[:full].view(nfull, blocksize), per_block[:nfull, None]).reshape(-1)
    if full < x.numel():
        out[full:] = op(x[full:], per_block[nfull])
    return out


def _block_absmax(x: torch.Tensor, blocksize: int) -> torch.Tensor:
    full = (x.numel() // blocksize) * blocksize
    parts = []
    if full:  # max(-min, max) == max |x| exactly, without an |x| temporary
        mn, mx = torch.aminmax(x[:full].view(-1, blocksize), dim=1)
        parts.append(torch.maximum(mn.neg_(), mx))
    if full < x.numel():
        parts.append(x[full:].abs().amax().reshape(1))
    return torch.cat(parts) if len(parts) > 1 else parts[0]


@register("nf4_quantize", "reference")
def nf4_quantize(w, blocksize=64, double_quant=True):
    """Float (out, in) -> NF4Weight; bit-identical to bitsandbytes' 4-bit codes and fp32 absmax."""
    check_nf4_args(w, blocksize)
    w = w.detach()
    device, n = w.device, w.numel()
    flat = w.contiguous().view(-1)  # copies only a non-contiguous input, in its own dtype
    nblocks = -(-n // blocksize)
    data = torch.empty(((n + 1) // 2, 1), dtype=torch.uint8, device=device)
    absmax = torch.empty(nblocks, dtype=torch.float32, device=device)
    mids = nf4_midpoints(device)
    # A chunk is a whole number of blocks, and blocks have even size, so every chunk but the
    # last starts on a byte boundary and has an even length.
    chunk = max(1, CHUNK_ELEMS // blocksize) * blocksize
    for s in range(0, n, chunk):
        e = min(s + chunk, n)
        x = flat[s:e].float()
        am = _block_absmax(x, blocksize)
        # max propagates NaN and inf, so checking the block maxima checks every element.
        if not torch.isfinite(am).all():
            raise ValueError("nf4_quantize: the weight contains inf or NaN; NF4 block scales must be finite")
        absmax[s // blocksize: s // blocksize + am.numel()] = am
        # Reciprocal-then-multiply in fp32 (not division) is what bitsandbytes' kernels do (its
        # pure-PyTorch CPU path divides in a short last block instead: the two can differ by an
        # ulp of `scaled`, i.e. a code only for a value within an ulp of a midpoint). The 1e-38
        # floor keeps all-zero blocks at 0 instead of 0 * inf = NaN, as in bitsandbytes.
        inv = 1.0 / am.clamp(min=1e-38)
        scaled = _blockwise(x, inv, blocksize, torch.mul).clamp_(-1.0, 1.0)
        del x
        codes = torch.bucketize(scaled, mids, out_int32=True).to(torch.uint8)  # strict >: ties go low
        del scaled
        packed = _pack_nibbles(codes, NF4_ZERO_INDEX)
        data[s // 2: s // 2 + packed.numel(), 0] = packed
    kw = {}
    if double_quant:
        q, nested_absmax, offset = double_quantize_absmax(absmax)
        absmax = q
        kw = dict(nested_absmax=nested_absmax, nested_quant_map=dynamic_map(True, device), offset=offset)
    return NF4Weight(data, w.shape, blocksize, w.dtype, nf4_code(device), absmax, **kw)


@register("nf4_dequantize", "reference")
def nf4_dequantize(qweight, dtype=torch.float32):
    """NF4Weight -> dense (out, in) ``dtype``: quant_map[code] * absmax in fp32, then one cast."""
    if not isinstance(qweight, NF4Weight):
        raise TypeError(f"nf4_dequantize: expected an NF4Weight, got {type(qweight).__name__}")
    if not dtype.is_floating_point:
        raise TypeError(f"nf4_dequantize: dtype must be a floating-point dtype, got {dtype}")
    n, bs = qweight.numel, qweight.blocksize
    absmax = qweight.absmax_fp32()
    qmap = qweight.quant_map
    flat_data = qweight.data.view(-1)
    out = torch.empty(n, dtype=dtype, device=qweight.device)
    chunk = max(1, CHUNK_ELEMS // bs) * bs
    for s in range(0, n, chunk):
        e = min(s + chunk, n)
        codes = _unpack_nibbles(flat_data[s // 2: (e + 1) // 2], e - s)
        vals = qmap[codes.long()]
        b0 = s // bs
        out[s:e] = _blockwise(vals, absmax[b0: b0 + -(-(e - s) // bs)], bs, torch.mul).to(dtype)
    return out.view(qweight.shape)


@register("int4_quantize", "reference")
def int4_quantize(w, group_size=128, symmetric=False):
    """Float (out, in) -> Int4Weight, group-wise along in (convention in ``fastft/quant/int4.py``)."""
    check_int4_args(w, group_size)
    w = w.detach()
    out_f, in_f = w.shape
    G = in_f // group_size
    device = w.device
    data = torch.empty((out_f, (in_f + 1) // 2), dtype=torch.uint8, device=device)
    scales = torch.empty((out_f, G), dtype=torch.float32, device=device)
    zeros = None if symmetric else torch.empty((out_f, G), dtype=torch.float32, device=device)
    rows = max(1, CHUNK_ELEMS // in_f)
    for r0 in range(0, out_f, rows):
        r1 = min(r0 + rows, out_f)
        x = w[r0:r1].float().reshape(r1 - r0, G, group_size)
        if symmetric:
            scale = x.abs().amax(dim=-1) / 7.0
            # An all-zero group keeps scale 0 (dequantizes to exact zeros); divide by 1 there.
            safe = torch.where(scale > 0, scale, torch.ones_like(scale))
            q = torch.round(x / safe[..., None]).clamp_(-8, 7).add_(8)
        else:
            # The range always contains 0, so the zero point lies in [0, 15] and (q - zero) * scale
            # stays well conditioned in fp32.
            lo = x.amin(dim=-1).clamp(max=0.0)
            hi = x.amax(dim=-1).clamp(min=0.0)
            scale = (hi - lo) / 15.0
            pos = scale > 0
            safe = torch.where(pos, scale, torch.ones_like(scale))
            zero = torch.where(pos, -lo / safe, torch.zeros_like(scale))
            q = torch.round(x / safe[..., None] + zero[..., None]).clamp_(0, 15)
            zeros[r0:r1] = zero
        # min/max propagate NaN and inf into the scale, so this checks every element.
        if not torch.isfinite(scale).all():
            raise ValueError("int4_quantize: the weight contains inf or NaN")
        scales[r0:r1] = scale
        codes = q.to(torch.uint8).reshape(r1 - r0, in_f)
        data[r0:r1] = _pack_nibbles(codes, 8 if symmetric else 0)
    return Int4Weight(data, scales, zeros, group_size, w.shape, w.dtype)


@register("int4_dequantize", "reference")
def int4_dequantize(qweight, dtype=torch.float32):
    """Int4Weight -> dense (out, in) ``dtype``: (q - zero) * scale in fp32, then one cast."""
    if not isinstance(qweight, Int4Weight):
        raise TypeError(f"int4_dequantize: expected an Int4Weight, got {type(qweight).__name__}")
    if not dtype.is_floating_point:
        raise TypeError(f"int4_dequantize: dtype must be a floating-point dtype, got {dtype}")
    out_f, in_f = qweight.shape
    gs = qweight.group_size
    G = in_f // gs
    out = torch.empty((out_f, in_f), dtype=dtype, device=qweight.device)
    rows = max(1, CHUNK_ELEMS // in_f)
    for r0 in range(0, out_f, rows):
        r1 = min(r0 + rows, out_f)
        packed = qweight.data[r0:r1]
        codes = torch.stack((packed >> 4, packed & 0xF), dim=-1).reshape(r1 - r0, -1)[:, :in_f]
        q = codes.float().view(r1 - r0, G, gs)
        zero = 8.0 if qweight.zeros is None else qweight.zeros[r0:r1, :, None]
        out[r0:r1] = ((q - zero) * qweight.scales[r0:r1, :, None]).reshape(r1 - r0, in_f).to(dtype)
    return out


def _reference_dequantize(qweight, dtype):
    if isinstance(qweight, NF4Weight):
        return nf4_dequantize(qweight, dtype)
    if isinstance(qweight, Int4Weight):
        return int4_dequantize(qweight, dtype)
    if hasattr(qweight, "dequantize"):
        return qweight.dequantize(dtype)
    raise TypeError(f"quant_matmul: qweight must be an NF4Weight or Int4Weight, got {type(qweight).__name__}")


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    dev = x.device.type
    if x.dtype != torch.float64 and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


def check_quant_matmul_args(x, qweight, bias) -> None:
    """Shared argument checks for every quant_matmul backend."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"quant_matmul: x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"quant_matmul: x must be a floating-point tensor, got {x.dtype}")
    shape = getattr(qweight, "shape", None)
    if shape is None or len(shape) != 2 or isinstance(qweight, torch.Tensor):
        raise TypeError(f"quant_matmul: qweight must be a quantized weight object, got {type(qweight).__name__}")
    out_f, in_f = shape
    if x.dim() == 0 or x.shape[-1] != in_f:
        raise ValueError(f"quant_matmul: x's last dim ({x.shape[-1] if x.dim() else None}) must equal "
                         f"in_features ({in_f})")
    if x.device != qweight.device:
        raise ValueError(f"quant_matmul: x is on {x.device} but the weight is on {qweight.device}")
    if bias is not None:
        if not bias.is_floating_point():
            raise TypeError(f"quant_matmul: bias must be floating point, got {bias.dtype}")
        if tuple(bias.shape) != (out_f,):
            raise ValueError(f"quant_matmul: bias shape {tuple(bias.shape)} must be (out_features,) = ({out_f},)")


class DequantMatmulFunction(torch.autograd.Function):
    """y = x W_deqᵀ + b;  dX = dY W_deq;  db = Σ dY;  W gets no gradient and nothing is saved.

    ``dequantize(qweight, dtype)`` makes the transient dense weight (the reference's by default; the
    ``torch`` backend passes the device's fastest dequantize op); ``linear(a, w, bias)`` the 2-D
    matmul (F.linear by default; the fast backends pass ``cpu_gemm.linear``)."""

    @staticmethod
    def forward(ctx, x, qweight, bias, dequantize=None, linear=None):
        dt = _compute_dtype(x)
        ctx.dequantize = dequantize = dequantize or _reference_dequantize
        ctx.linear = linear = linear or F.linear
        with torch.autocast(x.device.type, enabled=False):
            w = dequantize(qweight, dt)  # (out, in), dropped on return
            x2 = x.to(dt).reshape(-1, x.shape[-1])
            y = linear(x2, w, None if bias is None else bias.to(dt)).view(*x.shape[:-1], w.shape[0])
        del w
        # The quantized weight is referenced (it exists anyway), never a dense copy.
        ctx.qweight = qweight
        ctx.compute_dtype = dt
        ctx.x_dtype = x.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        dx = db = None
        dt = ctx.compute_dtype
        if ctx.needs_input_grad[0]:
            with torch.autocast(dy.device.type, enabled=False):
                w = ctx.dequantize(ctx.qweight, dt)
                g2 = dy.to(dt).reshape(-1, dy.shape[-1])
                dx = ctx.linear(g2, w.t()).view(*dy.shape[:-1], w.shape[1]).to(ctx.x_dtype)
            del w
        if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
            db = dy.reshape(-1, dy.shape[-1]).sum(dim=0).to(ctx.bias_dtype)
        return dx, None, db, None, None


@register("quant_matmul_grad_x", "reference")
def quant_matmul_grad_x(grad, qweight):
    """dX = dY · dequant(W) (2-D dY in the compute dtype), the backward of ``quant_matmul``'s x."""
    return torch.mm(grad, _reference_dequantize(qweight, grad.dtype))


@register("quant_matmul", "reference")
def quant_matmul(x, qweight, bias=None):
    """y = x @ dequant(qweight)ᵀ (+ bias); x (..., in) -> (..., out) in the compute dtype."""
    check_quant_matmul_args(x, qweight, bias)
    return DequantMatmulFunction.apply(x, qweight, bias)


__all__ = ["nf4_quantize", "nf4_dequantize", "int4_quantize", "int4_dequantize", "quant_matmul",
           "DequantMatmulFunction", "check_quant_matmul_args"]
