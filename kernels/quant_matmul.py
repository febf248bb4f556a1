"""Triton 4-bit matmul: y = x @ dequant(W)ᵀ (+ bias), forward and backward, W decoded in registers.

Kernels
-------
* ``_quant_matmul_fwd_kernel``  y = x @ dequant(W)ᵀ (+ bias) (+ scaling · u Bᵀ). Each program owns
  a (BLOCK_M, BLOCK_N) output tile; inside the K-loop a (BLOCK_N, BLOCK_K) tile of W is decoded from
  the packed bytes into registers (``quant_pack.dequant_tile``), cast to x's dtype and fed to
  ``tl.dot`` with an fp32 accumulator; the full-precision weight never exists in memory.
  ``SPLIT_K > 1`` is its decode path where ``kernels/quant_decode.py`` does not apply (M <= 16 with
  fp32 activations or the general layout): the K range is split across programs that write fp32
  partial sums to a (SPLIT_K, M, N) workspace, which the launcher reduces.
* ``_quant_matmul_bwd_kernel``  dX = dY @ dequant(W): the same tile decoder on the transposed access
  pattern (program tiles (M, K), reduction over N). W gets no gradient; nothing is saved for
  backward but the packed weight tensors (which the weight object holds anyway).

Two W access paths, chosen by the constexpr ALIGNED (``kernels/quant_pack.py``): aligned (K % quant
block == 0; BLOCK_K divides the quant block, so a K-tile of one row has one scale) and general
(NF4 with in % blocksize != 0, per-element decode). Launches with M <= 16 rows of fp16 / bf16 on the
aligned layout go to ``quant_decode.quant_decode``.

Dtypes: activations fp32 / fp16 / bf16 (output in x's dtype, or the autocast dtype under autocast),
fp32 accumulation, fp32 scales. The W tile is decoded in fp32 and cast once to the activation dtype,
so the kernel multiplies exactly the values of ``dequantize(x.dtype)``. fp32 dots follow
``_common.matmul_precision``. Offsets that can pass 2^31 (row * stride, flat weight index) are int64.

Tuning: ``matmul_configs(kind)`` lists (pruned per problem by ``_prune_configs``; the autotune key
buckets M to a power of two) for "fwd" (M > 16), "bwd", and "decode" (M <= 16, split-K) for the
general path and for fp32 activations. Every config compiles for sm_80 and sm_90 without spills
(fp32: a few bytes) and the M >= 64 tiles use wgmma on sm_90 (tests/test_aot_quant_matmul.py). Under the
interpreter each kernel runs one config (``INTERPRET_CONFIGS``).

Performance (benchmarks/bench_quant_matmul.py, benchmarks/NOTES.md): for large M the in-register
decode costs ~20 integer/select ops per weight element per M-tile, which the BLOCK_M = 128 training
tiles amortize only partly, so CUDA training runs through the ``torch`` backend (the dequantize
kernel + cuBLAS).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (FLOAT_DTYPES, Tuned, cap, cast, check_device, config, entry, grouped_pid, matmul_precision, mma,
                      num_sms, upcast)
from .quant_decode import DECODE_MAX_M, epilogue, lora_args, quant_decode
from .quant_pack import NESTED_BLOCK, QuantMeta, QuantTensors, check_meta, dequant_tile, dummy


# ========================================================================================= kernels
@triton.jit
def _quant_matmul_fwd_kernel(
    x_ptr, data_ptr, scale_ptr, aux_ptr, auxmap_ptr, qmap_ptr, bias_ptr, out_ptr, u_ptr, lb_ptr,
    M, N, K, stride_xm, offset, M_BUCKET, R, scaling,
    QTYPE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, SYMMETRIC: tl.constexpr, ALIGNED: tl.constexpr,
    QBLOCK: tl.constexpr, NBS: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr,
    HAS_LORA: tl.constexpr, BLOCK_R: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """y[m, n] = sum_k x[m, k] * W[n, k] (+ bias[n]); W decoded tile by tile in registers.

    x (M, K) row stride stride_xm; out (M, N) contiguous in x's dtype, or with SPLIT_K > 1 an fp32
    (SPLIT_K, M, N) workspace of partial sums over the split's K range (bias and a LoRA term then
    added by the launcher). HAS_LORA: + scaling · u Bᵀ in the epilogue (``quant_decode.epilogue``).
    Backward of this is ``_quant_matmul_bwd_kernel``.
    """
    pid_m, pid_n = grouped_pid(tl.program_id(0), M, N, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, GROUP_M=GROUP_M)
    pid_k = tl.program_id(1)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    mask_m = offs_m < M
    k_per_split = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K) * BLOCK_K
    k_start = pid_k * k_per_split
    k_end = min(K, k_start + k_per_split)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :]
        if ALIGNED:  # K % BLOCK_K == 0
            x = tl.load(x_ptrs, mask=mask_m[:, None], other=0.0)
        else:
            x = tl.load(x_ptrs, mask=mask_m[:, None] & (offs_k < K)[None, :], other=0.0)
        w = dequant_tile(data_ptr, scale_ptr, aux_ptr, auxmap_ptr, qmap_ptr, offset, offs_n, k0, N, K,
                         QTYPE=QTYPE, DOUBLE_QUANT=DOUBLE_QUANT, SYMMETRIC=SYMMETRIC, ALIGNED=ALIGNED, QBLOCK=QBLOCK,
                         NBS=NBS, BLOCK_K=BLOCK_K)
        acc = mma(x, tl.trans(cast(w, x.dtype, UPCAST=UPCAST)), acc, UPCAST=UPCAST, PRECISION=PRECISION)

    mask = mask_m[:, None] & (offs_n < N)[None, :]
    if SPLIT_K == 1:
        acc = epilogue(acc, bias_ptr, u_ptr, lb_ptr, offs_m, offs_n, mask_m, offs_n < N, R, scaling, HAS_BIAS=HAS_BIAS,
                       HAS_LORA=HAS_LORA, UPCAST=UPCAST, PRECISION=PRECISION, BLOCK_R=BLOCK_R)
        tl.store(out_ptr + offs_m[:, None] * N + offs_n[None, :], cast(acc, out_ptr.dtype.element_ty, UPCAST=UPCAST),
                 mask=mask)
    else:
        ws = out_ptr + pid_k.to(tl.int64) * M * N
        tl.store(ws + offs_m[:, None] * N + offs_n[None, :], acc, mask=mask)


@triton.jit
def _quant_matmul_bwd_kernel(
    dy_ptr, data_ptr, scale_ptr, aux_ptr, auxmap_ptr, qmap_ptr, dx_ptr,
    M, N, K, stride_dym, offset, M_BUCKET,
    QTYPE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, SYMMETRIC: tl.constexpr, ALIGNED: tl.constexpr,
    QBLOCK: tl.constexpr, NBS: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """dX[m, k] = sum_n dY[m, n] * W[n, k]: program tile (BLOCK_M, BLOCK_K), reduction over N.

    The same tile decoder as the forward: the K-tile of W a program owns is fixed and the loop walks
    the rows of W, so with ALIGNED each (row, K-tile) still needs one scale.
    """
    pid_m, pid_k = grouped_pid(tl.program_id(0), M, K, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_K, GROUP_M=GROUP_M)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    k0 = pid_k * BLOCK_K
    offs_k = k0 + tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = (n0 + tl.arange(0, BLOCK_N)).to(tl.int64)
        dy = tl.load(dy_ptr + offs_m[:, None] * stride_dym + offs_n[None, :],
                     mask=mask_m[:, None] & (offs_n < N)[None, :], other=0.0)
        w = dequant_tile(data_ptr, scale_ptr, aux_ptr, auxmap_ptr, qmap_ptr, offset, offs_n, k0, N, K,
                         QTYPE=QTYPE, DOUBLE_QUANT=DOUBLE_QUANT, SYMMETRIC=SYMMETRIC, ALIGNED=ALIGNED, QBLOCK=QBLOCK,
                         NBS=NBS, BLOCK_K=BLOCK_K)
        acc = mma(dy, cast(w, dy.dtype, UPCAST=UPCAST), acc, UPCAST=UPCAST, PRECISION=PRECISION)
    mask = mask_m[:, None] & (offs_k < K)[None, :]
    tl.store(dx_ptr + offs_m[:, None] * K + offs_k[None, :], cast(acc, dx_ptr.dtype.element_ty, UPCAST=UPCAST),
             mask=mask)


# ================================================================================ configurations
# (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages). Every entry compiles for sm_80 and
# sm_90 without register spills (tests/test_aot_quant_matmul.py); BLOCK_M >= 64 entries use wgmma on sm_90.
# BLOCK_K = 32 in the training shapes: with the W tile decoded in registers, 128x128x64 tiles run
# out of registers on sm_80 (255 + spills), 128x128x32 with 8 warps does not.
# "bwd": BLOCK_N is the reduction tile, BLOCK_K the output tile.
# "*_general": the per-element NF4 path (in % blocksize != 0), which needs more registers per element.
_CONFIGS = {
    "fwd": [(128, 128, 32, 8, 8, 4), (128, 64, 32, 8, 8, 4), (64, 64, 32, 8, 4, 4), (32, 64, 32, 8, 4, 4)],
    "bwd": [(128, 32, 128, 8, 8, 3), (128, 32, 64, 8, 8, 4), (64, 64, 64, 8, 8, 4), (64, 32, 32, 8, 4, 4)],
    "fwd_general": [(128, 64, 32, 8, 8, 3), (64, 32, 32, 8, 4, 3)],
    "decode_general": [(16, 64, 32, 1, 4, 3)],
    "bwd_general": [(64, 32, 32, 8, 4, 3)],
    # fp32 activations (IEEE fp32 dots run on FMA units, whose operand layouts are register-hungry:
    # even these tiles reach 255 registers and spill up to ~24 bytes on sm_90). Not a hot path:
    # QLoRA training runs in bf16 / fp16.
    "fp32_fwd": [(64, 32, 32, 8, 8, 3)],
    "fp32_decode": [(16, 32, 32, 1, 4, 2)],
    "fp32_bwd": [(64, 32, 32, 8, 8, 3)],
}


def matmul_configs(kind: str) -> list:
    """Autotune candidates for the quant-matmul kernels: ``kind`` in "fwd", "bwd", "decode_general",
    "fwd_general", "bwd_general" (the NF4 path for in % blocksize != 0) and "fp32_fwd" /
    "fp32_decode" / "fp32_bwd" (fp32 activations). The aligned fp16 / bf16 decode path
    (``quant_decode``) has a fixed tile (``decode_plan``), no list.

    Pruned per call by ``_prune_configs`` (BLOCK_K must divide the quant block on the aligned path;
    tiles no larger than the problem).
    """
    if kind not in _CONFIGS:
        raise ValueError(f"unknown matmul config kind {kind!r}; expected one of {sorted(_CONFIGS)}")
    return [config(num_warps=w, num_stages=st, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=g)
            for bm, bn, bk, g, w, st in _CONFIGS[kind]]


# Under the interpreter (CPU tests) one config per kernel: tiles small enough that the test shapes
# have partial tiles in every dimension, large enough that the interpreter is not too slow.
INTERPRET_CONFIGS = {
    "fwd": config(BLOCK_M=64, BLOCK_N=32, BLOCK_K=32, GROUP_M=2),
    "decode": config(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=1),
    "bwd": config(BLOCK_M=64, BLOCK_N=32, BLOCK_K=32, GROUP_M=2),
}


# The LoRA epilogue's u / B tiles on top of a 128 x 128 fp32 accumulator and the decoded W tile
# spill (16 bytes on sm_90, 80 on sm_80): with HAS_LORA the tiles stay below this many outputs.
LORA_MAX_TILE = 128 * 64


def config_fits(cfg: dict, *, M: int, N: int, K: int, aligned: bool, qblock: int, bwd: bool = False,
                lora: bool = False) -> bool:
    """Whether a config may run on this problem (also used by the AOT test to list pickable ones)."""
    bk = cfg["BLOCK_K"]
    if aligned and qblock % bk:
        return False  # a K tile must not straddle two quant blocks on the aligned path
    if lora and cfg["BLOCK_M"] * cfg["BLOCK_N"] > LORA_MAX_TILE:
        return False
    # Tiles much larger than the problem only waste work (but the smallest always stays).
    if bk > max(32, triton.next_power_of_2(K)):
        return False
    if cfg["BLOCK_N"] > max(32, triton.next_power_of_2(N)):
        return False
    if not bwd and cfg["BLOCK_M"] > max(16, triton.next_power_of_2(M)):
        return False
    return True


def _prune_configs(configs, named_args, **kwargs):
    args = {**named_args, **kwargs}
    kept = [c for c in configs if config_fits(c.kwargs, M=args["M_BUCKET"], N=args["N"], K=args["K"],
                                             aligned=bool(args["ALIGNED"]), qblock=args["QBLOCK"],
                                             bwd="dx_ptr" in args, lora=bool(args.get("HAS_LORA", False)))]
    if kept:
        return cap(kept)
    # Always keep one: the config with the smallest tiles that respects the quant block.
    ok = [c for c in configs if not args["ALIGNED"] or args["QBLOCK"] % c.kwargs["BLOCK_K"] == 0]
    return [min(ok or configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_K"])]


_TUNE_KEY = ["M_BUCKET", "N", "K", "QTYPE", "DOUBLE_QUANT", "SYMMETRIC", "ALIGNED", "QBLOCK", "PRECISION"]


def tuning_kind(kind: str, aligned: bool, dtype: torch.dtype) -> str:
    """The config list a launch draws from: "fwd" / "decode" / "bwd" (+ "_general"), or "fp32_*"."""
    if dtype == torch.float32:
        return "fp32_" + kind
    return kind if aligned else kind + "_general"


def _tuned(tkind: str, kind: str) -> Tuned:
    bwd = kind == "bwd"
    kernel = _quant_matmul_bwd_kernel if bwd else _quant_matmul_fwd_kernel
    key = _TUNE_KEY + ([] if bwd else ["HAS_BIAS", "SPLIT_K", "HAS_LORA"])
    return Tuned(kernel, configs=lambda: matmul_configs(tkind), key=key, interpret=INTERPRET_CONFIGS[kind],
                 prune=_prune_configs)


# One launch description per config list ("fwd" with M > 16 rows, "decode" with M <= 16 on the
# paths quant_decode does not take, "bwd"), built lazily.
TUNED = {tuning_kind(kind, aligned, dt): _tuned(tuning_kind(kind, aligned, dt), kind)
         for kind in ("fwd", "decode", "bwd") for aligned in (True, False) for dt in (torch.float16, torch.float32)
         if not (kind == "decode" and aligned and dt != torch.float32)}


# ======================================================================================= launchers
def decode_split_k(M: int, N: int, K: int, device: torch.device) -> int:
    """How many programs share the K range of one output tile on the general decode path (M <= 16).

    With M <= 16 there are only cdiv(N, BLOCK_N) output tiles -- 64 for N = 4096, fewer than the
    SMs of an H100 -- so K is split until there are about two programs per SM, keeping at least two
    BLOCK_K = 64 tiles per split. 1 (no split) for M > 16.
    """
    if M > DECODE_MAX_M:
        return 1
    tiles_n = triton.cdiv(N, 64)
    return max(1, min(triton.cdiv(2 * num_sms(device), tiles_n), K // 128))


def _common_args(meta: QuantMeta, M: int, N: int, K: int, dtype) -> dict:
    return dict(M=M, N=N, K=K, offset=meta.offset, M_BUCKET=min(triton.next_power_of_2(M), 4096),
                QTYPE=meta.qtype, DOUBLE_QUANT=meta.double_quant, SYMMETRIC=meta.symmetric, ALIGNED=meta.aligned,
                QBLOCK=meta.qblock, NBS=NESTED_BLOCK, UPCAST=upcast(dtype), PRECISION=matmul_precision(dtype))


def _tensor_args(t: QuantTensors, d) -> tuple:
    data, scale, aux, auxmap, qmap = t
    return (data, scale, aux if aux is not None else d, auxmap if auxmap is not None else d,
            qmap if qmap is not None else d)


def matmul_fwd(x2, meta: QuantMeta, t: QuantTensors, bias, split_k=None, out=None, lora=None):
    """x2 (M, K) contiguous -> ``out`` (M, N) in x2's dtype (allocated when None); ``lora`` =
    (u (M, r), B (N, r), scaling) adds scaling · u Bᵀ in the kernel's epilogue."""
    if out is None:
        out = torch.empty((x2.shape[0], meta.N), dtype=x2.dtype, device=x2.device)
    u, lb, scaling = lora if lora is not None else (None, None, 0.0)
    matmul_fwd_into(x2, *t, bias, u, lb, float(scaling), *_meta_args(meta), split_k, out)
    return out


def _meta_args(meta: QuantMeta) -> tuple:
    return (meta.qtype, meta.N, meta.K, meta.qblock, meta.double_quant, meta.symmetric, float(meta.offset))


def _fwd_into_fake(x2, data, scale, aux, auxmap, qmap, bias, lora_u, lora_B, scaling, qtype, N, K, qblock,
                   double_quant, symmetric, offset, split_k, out):
    return None


@entry("triton_quant_matmul_fwd_", fake=_fwd_into_fake, mutates_args=("out",))
def matmul_fwd_into(x2: torch.Tensor, data: torch.Tensor, scale: torch.Tensor, aux: torch.Tensor | None,
                    auxmap: torch.Tensor | None, qmap: torch.Tensor | None, bias: torch.Tensor | None,
                    lora_u: torch.Tensor | None, lora_B: torch.Tensor | None, scaling: float, qtype: int, N: int,
                    K: int, qblock: int, double_quant: bool, symmetric: bool, offset: float, split_k: int | None,
                    out: torch.Tensor) -> None:
    """``matmul_fwd``'s launch into ``out`` (the quant GEMM, or at <= 16 rows the decode kernel)."""
    meta = QuantMeta(qtype, N, K, qblock, double_quant, symmetric, offset)
    lora = None if lora_u is None else (lora_u, lora_B, scaling)
    _matmul_fwd(x2, meta, QuantTensors(data, scale, aux, auxmap, qmap), bias, split_k, out, lora)


def _matmul_fwd(x2, meta: QuantMeta, t: QuantTensors, bias, split_k, out, lora):
    M, K = x2.shape
    N = meta.N
    dev = x2.device
    if M == 0 or N == 0:
        return out
    if K == 0:
        out.zero_() if bias is None else out.copy_(bias.to(out.dtype).expand(M, N))
        if lora is not None:
            out.addmm_(lora[0].to(out.dtype), lora[1].to(out.dtype).t(), alpha=float(lora[2]))
        return out
    d = dummy(dev)
    decode = M <= DECODE_MAX_M
    if decode and meta.aligned and x2.dtype in (torch.float16, torch.bfloat16):
        return quant_decode(x2, meta, t, bias, out, split_k, lora)
    if split_k is None:
        split_k = decode_split_k(M, N, K, dev)
    args = _common_args(meta, M, N, K, x2.dtype)
    args.update(stride_xm=x2.stride(0), HAS_BIAS=bias is not None and split_k == 1, SPLIT_K=split_k)
    lu, lb, R, scaling, has_lora, block_r = lora_args(lora if split_k == 1 else None, x2.dtype, dev)
    args.update(R=R, scaling=scaling, HAS_LORA=has_lora, BLOCK_R=block_r)
    target = out if split_k == 1 else torch.empty((split_k, M, N), dtype=torch.float32, device=dev)

    def grid(cfg):
        return (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]), split_k)

    TUNED[tuning_kind("decode" if decode else "fwd", meta.aligned, x2.dtype)][grid](
        x2, *_tensor_args(t, d), bias if bias is not None else d, target, lu, lb, **args)
    if split_k > 1:
        acc = target.sum(0)
        if bias is not None:
            acc += bias.float()
        if lora is not None:
            acc.addmm_(lora[0].float(), lora[1].float().t(), alpha=float(lora[2]))
        out.copy_(acc)
    return out


def matmul_bwd(dy2, meta: QuantMeta, t: QuantTensors):
    """dy2 (M, N) contiguous -> dX (M, K) in dy2's dtype."""
    return matmul_bwd_out(dy2, *t, *_meta_args(meta))


def _bwd_fake(dy2, data, scale, aux, auxmap, qmap, qtype, N, K, qblock, double_quant, symmetric, offset):
    return dy2.new_empty((dy2.shape[0], K))


@entry("triton_quant_matmul_bwd", fake=_bwd_fake)
def matmul_bwd_out(dy2: torch.Tensor, data: torch.Tensor, scale: torch.Tensor, aux: torch.Tensor | None,
                   auxmap: torch.Tensor | None, qmap: torch.Tensor | None, qtype: int, N: int, K: int, qblock: int,
                   double_quant: bool, symmetric: bool, offset: float) -> torch.Tensor:
    """``matmul_bwd``'s launch."""
    meta = QuantMeta(qtype, N, K, qblock, double_quant, symmetric, offset)
    t = QuantTensors(data, scale, aux, auxmap, qmap)
    M, N = dy2.shape
    K = meta.K
    dev = dy2.device
    dx = torch.empty((M, K), dtype=dy2.dtype, device=dev)
    if M == 0 or K == 0:
        return dx
    if N == 0:
        return dx.zero_()
    args = _common_args(meta, M, N, K, dy2.dtype)

    def grid(cfg):
        return (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(K, cfg["BLOCK_K"]),)

    TUNED[tuning_kind("bwd", meta.aligned, dy2.dtype)][grid](dy2, *_tensor_args(t, dummy(dev)), dx,
                                                               stride_dym=dy2.stride(0), **args)
    return dx


# ======================================================================= autograd Function
class QuantMatmulFunction(torch.autograd.Function):
    """y = x @ dequant(W)^T (+ bias) in ``compute_dtype``.

    Backward: dX = dY @ dequant(W) by the fused transposed kernel (returned in x's dtype),
    dbias = sum dY (in bias's dtype); the packed weight gets no gradient, and the only tensors saved
    are the packed weight's own (no dequantized copy, no activations).
    """

    @staticmethod
    def forward(ctx, x, data, scale, aux, auxmap, qmap, bias, meta, compute_dtype, split_k):
        lead = x.shape[:-1]
        x2 = x.reshape(-1, meta.K).to(compute_dtype)
        if x2.stride(-1) != 1 or (x2.shape[0] > 1 and x2.stride(0) != meta.K):
            x2 = x2.contiguous()
        # Allocated in its final shape so that the output is not a view: callers (the fused LoRA
        # op) add onto it in place, which autograd forbids on views made inside a Function.
        y = torch.empty((*lead, meta.N), dtype=compute_dtype, device=x.device)
        matmul_fwd(x2, meta, QuantTensors(data, scale, aux, auxmap, qmap), bias, split_k, out=y.view(-1, meta.N))
        ctx.save_for_backward(data, scale, aux, auxmap, qmap)
        ctx.meta = meta
        ctx.compute_dtype = compute_dtype
        ctx.x_dtype = x.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        meta = ctx.meta
        dy2 = dy.reshape(-1, meta.N).to(ctx.compute_dtype).contiguous()
        dx = dbias = None
        if ctx.needs_input_grad[0]:
            dx = matmul_bwd(dy2, meta, QuantTensors(*ctx.saved_tensors))
            dx = dx.reshape(*dy.shape[:-1], meta.K).to(ctx.x_dtype)
        if ctx.bias_dtype is not None and ctx.needs_input_grad[6]:
            dbias = dy.reshape(-1, meta.N).sum(0).to(ctx.bias_dtype)
        return dx, None, None, None, None, None, dbias, None, None, None


# ========================================================================================== public
def _check(what: str, x, meta: QuantMeta, tensors: tuple) -> None:
    check_meta(meta)
    if not isinstance(x, torch.Tensor) or x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{what}: activations must be fp32/fp16/bf16, got {getattr(x, 'dtype', type(x))}")
    if x.dim() == 0 or x.shape[-1] != meta.K:
        raise ValueError(f"{what}: x's last dim ({x.shape[-1] if x.dim() else None}) must equal "
                         f"in_features ({meta.K})")
    for t in tensors:
        if t is not None and t.device != x.device:
            raise ValueError(f"{what}: weight tensors on {t.device}, activations on {x.device}")
    check_device(x.device, what)


def quant_matmul(x, meta: QuantMeta, t: QuantTensors, bias=None, *, split_k=None):
    """y = x @ dequant(W)^T (+ bias) for x (..., in) fp32/fp16/bf16, in x's dtype (or the autocast
    dtype when autocast is on, like F.linear); W given as (``meta``, ``t``).

    ``split_k`` forces the number of K splits (tests); by default the decode paths (M <= 16) split
    K so that the GPU stays busy.
    """
    _check("quant_matmul", x, meta, tuple(t) + (bias,))
    if bias is not None and tuple(bias.shape) != (meta.N,):
        raise ValueError(f"quant_matmul: bias shape {tuple(bias.shape)} must be (out_features,) = ({meta.N},)")
    dt = x.dtype
    if torch.is_autocast_enabled(x.device.type):
        dt = torch.get_autocast_dtype(x.device.type)
    return QuantMatmulFunction.apply(x, *t, bias, meta, dt, split_k)


def quant_matmul_lora(x, meta: QuantMeta, t: QuantTensors, bias, u, lora_B, scaling):
    """Forward only (no autograd; for use inside an autograd Function's forward): y = x @
    dequant(W)ᵀ (+ bias) + scaling · u Bᵀ in one kernel, the low-rank term added in the quant
    kernel's epilogue. x (..., in) fp32 / fp16 / bf16, u (rows, r) = drop(x) Aᵀ, B (out, r); y in
    x's dtype."""
    _check("quant_matmul_lora", x, meta, tuple(t) + (bias, u, lora_B))
    x2 = x.reshape(-1, meta.K)
    if x2.stride(-1) != 1 or (x2.shape[0] > 1 and x2.stride(0) != meta.K):
        x2 = x2.contiguous()
    if tuple(lora_B.shape[:1]) != (meta.N,) or lora_B.dim() != 2 or tuple(u.shape) != (x2.shape[0], lora_B.shape[1]):
        raise ValueError(f"quant_matmul_lora: u {tuple(u.shape)} / B {tuple(lora_B.shape)} do not fit x "
                         f"{tuple(x.shape)} and out_features {meta.N}")
    y = matmul_fwd(x2, meta, t, bias, lora=(u, lora_B, scaling))
    return y.view(*x.shape[:-1], meta.N)


__all__ = ["QuantMatmulFunction", "TUNED", "matmul_configs", "config_fits", "decode_split_k", "quant_matmul",
           "quant_matmul_lora", "tuning_kind"]
