"""Fused LoRA linear in Triton: base matmul and low-rank update in one pass, forward and backward.

Forward (LoRA, Hu et al. 2021, with PEFT's dropout on the LoRA input only)::

    x̃ = drop(x)                      (keep with probability 1 - p, scale kept values by 1 / (1 - p))
    u = x̃ Aᵀ                         (M × r, tiny; ``_lora_down_kernel``)
    y = x Wᵀ + b + s · u Bᵀ          (``_lora_fwd_kernel``: the K-loop of x Wᵀ, then an r-loop that
                                      adds s·u Bᵀ into the same fp32 accumulator, then the bias)

W + s·BA is never formed. Backward, with dY (M × N)::

    du = s · dY B                    (M × r)         dB = s · dYᵀ u     (N × r)
    dA = duᵀ x̃                       (r × K)         db = Σ_m dY
    dX = dY W + drop'(du A)          (``_lora_dx_kernel``: the N-loop of dY W, then an r-loop of du A
                                      masked by the same dropout mask, in the epilogue)
    dW = dYᵀ x                       (only when the weight requires grad: full fine-tuning)

Saved for backward: x, u and the dropout seed (a Python int) besides the parameters W, A, B. The
dropout mask is never stored: every kernel that needs it regenerates it from Philox,
``keep[m, k] = tl.rand(seed, m·K + k) >= p`` (int64 offsets), so ``dropout_mask(seed, ...)`` can
materialise exactly the mask the kernels used (the tests compare with the reference given it).

Fused variants (one input feeding several projections):
* ``lora_qkv``: q/k/v (or any 1-3 projections of one x). The down projections of all of them come from
  one pass over x (each with its own dropout mask, as separate PEFT modules have), the base GEMMs are
  one launch per projection, and dX = Σ_i dY_i W_i + drop_i'(du_i A_i) is one kernel.
* ``lora_gate_up_swiglu``: h = silu(g) ⊙ up with g, up two LoRA linears of the same x; one kernel
  computes both accumulators from each x tile and applies SwiGLU in the epilogue. Backward keeps the
  pre-activations g, up and recomputes silu (the activation itself is never stored).

Over a quantized base (``fastft.quant.NF4Weight`` / ``Int4Weight``) the base part is
``fastft.ops.quant_matmul`` (dequantization inside its K-loop; its own autograd gives the base dX
with its fused transposed kernel) and the rank-r part stays fused: ``_lora_fwd_kernel`` with BASE_IN
adds s·u Bᵀ onto the base output in place (a copy only when quant_matmul returns a view), and the
dX kernel runs without its base loop (HAS_W = False); autograd sums the two dX parts. At decode
shapes (<= 16 rows: ``LoraQuantDecodeFunction``) the base and the low-rank term are one kernel, the
quant decode kernel with its LoRA epilogue (``quant_matmul_lora``).

Launches: forward 2 (down projection, fused GEMM); backward 4 (du, dB, dA, fused dX), +1 for dW
and a torch reduction for db. The GEMM-shaped kernels autotune over ``gemm_configs()`` (pruned per
shape and shared-memory budget; key buckets M to a power of two so varying batches reuse tunings);
the memory-bound rank-r kernels (down projection, dA) use fixed tiles (``_rank_tiles``); under
the interpreter every kernel runs one small config. ``tests/test_aot_lora.py`` compiles the configs
for sm_80 / sm_90 and checks register spills (which is why 128×256 tiles are not offered).

Dtypes: x, W in fp16 / bf16 / fp32 (the same dtype; under autocast everything is cast to the
autocast dtype first); A, B and bias are cast to x's dtype. All accumulation is fp32; fp32 inputs
use IEEE fp32 products unless ``torch.backends.cuda.matmul.allow_tf32`` is set. Triton 3.9's
interpreter computes ``tl.dot`` on bf16 operands wrongly, so when interpreting, bf16 operands are
upcast to fp32 before each dot (UPCAST). Any r ≥ 1 (the r-loop runs in blocks of ≤ 64), any leading
shape of x, any M, K, N ≥ 1 (tails are clamped on load and masked on store). float64 is the
reference backend's job.

Limits: tile origins are int64 but offsets inside a tile are int32, so a row stride must stay below
2³¹ / 128 elements (16.7 M); the fused variants take dense weights only (quantized projections go
through ``lora_linear`` one by one); dB and dA reduce over M inside one program per output tile (no
split-K), which leaves an H100 under-filled when N·r or r·K is small and M is large.
"""
from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from fastft.ops.dispatch import register

from . import _tma, _tuning

__all__ = [
    "lora_linear", "lora_qkv", "lora_gate_up_swiglu", "dropout_mask", "draw_seed", "LoraLinearFunction",
    "LoraMultiFunction", "LoraSwiGLUFunction", "gemm_configs", "HOT_CONFIGS",
]

_SEED_PARAMS = ["seed0", "seed1", "seed2"]


# ------------------------------------------------------------------------------------- helpers
@triton.jit
def _mma(a, b, acc, UPCAST: tl.constexpr, PREC: tl.constexpr):
    # The interpreter's bf16 dot is wrong (Triton 3.9); fp32 operands are exact there.
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PREC)


@triton.jit
def _gemm_loop(acc, P, Q, rows, cols, Kdim, stride_pm, stride_pk, stride_qk, stride_qn, alpha,
               BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, SCALE_P: tl.constexpr,
               UPCAST: tl.constexpr, PREC: tl.constexpr):
    """acc += (alpha ·) P[rows, :Kdim] @ Q[:Kdim, cols], P and Q addressed by strides.

    P and Q point at the tile's origin (the caller offsets them in int64: M·stride can pass 2³¹);
    ``rows``/``cols`` are in-tile indices already clamped to the last valid row/column, so the K-loop
    loads need no M/N masks (tail rows re-read a valid row and are masked at the store). In-tile
    offsets stay int32 (block · stride < 2³¹), which keeps the per-thread pointer state small.
    With SCALE_P the P tile is multiplied by alpha (in fp32, rounded back to its dtype) before the
    dot, so a scaled product accumulates into ``acc`` without a second (BLOCK_M, BLOCK_N) register
    accumulator.
    """
    offs_k = tl.arange(0, BLOCK_K)
    p_off = rows[:, None] * stride_pm + offs_k[None, :] * stride_pk
    q_off = offs_k[:, None] * stride_qk + cols[None, :] * stride_qn
    for k0 in range(0, Kdim, BLOCK_K):
        if EVEN_K:
            a = tl.load(P + p_off)
            b = tl.load(Q + q_off)
        else:
            kmask = offs_k < Kdim - k0
            a = tl.load(P + p_off, mask=kmask[None, :], other=0.0)
            b = tl.load(Q + q_off, mask=kmask[:, None], other=0.0)
        if SCALE_P:
            a = (a.to(tl.float32) * alpha).to(b.dtype)
        acc = _mma(a, b, acc, UPCAST, PREC)
        P += BLOCK_K * stride_pk
        Q += BLOCK_K * stride_qk
    return acc


@triton.jit
def _gemm_loop_tma(acc, P, Q, Mdim, Ndim, Kdim, stride_pm, stride_qrow, m0, n0,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, Q_KMAJOR: tl.constexpr,
                   UPCAST: tl.constexpr, PREC: tl.constexpr):
    """acc += P[m0:, :Kdim] @ Qᵀ-or-Q through TMA tensor descriptors (Hopper's tensor memory
    accelerator; zero fill replaces every mask). P (Mdim, Kdim) row stride stride_pm; Q is (Ndim,
    Kdim) with row stride stride_qrow when Q_KMAJOR (used transposed: the forward's W), else
    (Kdim, Ndim) (used as is: the dX kernel's W). No per-thread address arithmetic in the loop."""
    pd = tl.make_tensor_descriptor(P, shape=[Mdim, Kdim], strides=[stride_pm, 1], block_shape=[BLOCK_M, BLOCK_K])
    if Q_KMAJOR:
        qd = tl.make_tensor_descriptor(Q, shape=[Ndim, Kdim], strides=[stride_qrow, 1],
                                       block_shape=[BLOCK_N, BLOCK_K])
    else:
        qd = tl.make_tensor_descriptor(Q, shape=[Kdim, Ndim], strides=[stride_qrow, 1],
                                       block_shape=[BLOCK_K, BLOCK_N])
    mi = m0.to(tl.int32)  # descriptor coordinates are int32 (the tile origins come as int64)
    ni = n0.to(tl.int32)
    for k0 in range(0, Kdim, BLOCK_K):
        a = pd.load([mi, k0])
        if Q_KMAJOR:
            b = qd.load([ni, k0]).T
        else:
            b = qd.load([k0, ni])
        acc = _mma(a, b, acc, UPCAST, PREC)
    return acc


@triton.jit
def _tile_origin(pid_m, pid_n, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 EVEN_M: tl.constexpr, EVEN_N: tl.constexpr):
    """int64 tile origin (m0, n0), in-tile indices for loads, and global indices for stores.

    In-tile load indices are clamped to the last valid row / column, except along a dimension that
    is a multiple of its block (EVEN_M / EVEN_N): there they stay a plain ``arange``. The clamp
    hides contiguity from the compiler, so where that index runs along an operand's contiguous
    dimension (dX's W tile, dB's and dW's transposed dY tile) the loads fell back to 2-byte LDGs
    outside the cp.async pipeline (seen in the sm_90 SASS after the first H200 run measured these
    kernels at ~85 TFLOP/s)."""
    m0 = pid_m.to(tl.int64) * BLOCK_M
    n0 = pid_n.to(tl.int64) * BLOCK_N
    if EVEN_M:
        rows = tl.arange(0, BLOCK_M)
    else:
        rows = tl.minimum(tl.arange(0, BLOCK_M), (M - 1 - m0).to(tl.int32))
    if EVEN_N:
        cols = tl.arange(0, BLOCK_N)
    else:
        cols = tl.minimum(tl.arange(0, BLOCK_N), (N - 1 - n0).to(tl.int32))
    return m0, n0, rows, cols, m0 + tl.arange(0, BLOCK_M), n0 + tl.arange(0, BLOCK_N)


@triton.jit
def _keep(seed, rows64, cols, ncols, p):
    """The dropout keep mask of x at (rows, cols): Philox uniform at offset row·ncols + col >= p."""
    return tl.rand(seed, rows64[:, None] * ncols + cols[None, :]) >= p


@triton.jit
def _drop(x, seed, rows64, cols, ncols, p, keep_scale):
    """x̃ = keep ⊙ x / (1 - p) in x's dtype."""
    keep = _keep(seed, rows64, cols, ncols, p)
    return tl.where(keep, x.to(tl.float32) * keep_scale, 0.0).to(x.dtype)


@triton.jit
def _tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Grouped (super-row) tile order: GROUP_M row-blocks share column tiles while they are in L2."""
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * num_n
    group = pid // width
    first_m = group * GROUP_M
    size = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size
    pid_n = (pid % width) // size
    return pid_m, pid_n


# ------------------------------------------------------------------------------------- kernels
@triton.jit
def _down_seg(acc, x, A, rows64, offs_r, ks, R, K, seed, p, keep_scale,
              HAS_DROPOUT: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr):
    a = tl.load(A + offs_r[None, :].to(tl.int64) * K + ks[:, None],
                mask=(offs_r[None, :] < R) & (ks[:, None] < K), other=0.0)  # (BLOCK_K, BLOCK_R) = Aᵀ tile
    if HAS_DROPOUT:
        x = _drop(x, seed, rows64, ks, K, p, keep_scale)
    return _mma(x, a, acc, UPCAST, PREC)


@triton.jit(do_not_specialize=_SEED_PARAMS)
def _lora_down_kernel(X, A0, A1, A2, U0, U1, U2, M, K, R0, R1, R2, stride_xm,
                      seed0, seed1, seed2, p, keep_scale,
                      NUM_SEG: tl.constexpr, HAS_DROPOUT: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """u_i = drop_i(x) A_iᵀ for up to three projections i of one x, each x tile loaded once.

    Forward: u_i[m, j] = Σ_k keep_i[m, k] x[m, k] A_i[j, k] / (1 - p); keep_i from seed_i.
    Backward: none of its own (du_i A_i and du_iᵀ x̃_i are the dX epilogue and ``_lora_dA_kernel``).
    Grid: (cdiv(M, BLOCK_M), cdiv(max r_i, BLOCK_R)).
    """
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K)
    rows64 = offs_m.to(tl.int64)
    mask_m = offs_m < M
    acc0 = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + offs_k
        x = tl.load(X + rows64[:, None] * stride_xm + ks[None, :], mask=mask_m[:, None] & (ks[None, :] < K), other=0.0)
        acc0 = _down_seg(acc0, x, A0, rows64, offs_r, ks, R0, K, seed0, p, keep_scale, HAS_DROPOUT, UPCAST, PREC)
        if NUM_SEG > 1:
            acc1 = _down_seg(acc1, x, A1, rows64, offs_r, ks, R1, K, seed1, p, keep_scale, HAS_DROPOUT, UPCAST, PREC)
        if NUM_SEG > 2:
            acc2 = _down_seg(acc2, x, A2, rows64, offs_r, ks, R2, K, seed2, p, keep_scale, HAS_DROPOUT, UPCAST, PREC)
    tl.store(U0 + rows64[:, None] * R0 + offs_r[None, :], acc0.to(U0.dtype.element_ty),
             mask=mask_m[:, None] & (offs_r[None, :] < R0))
    if NUM_SEG > 1:
        tl.store(U1 + rows64[:, None] * R1 + offs_r[None, :], acc1.to(U1.dtype.element_ty),
                 mask=mask_m[:, None] & (offs_r[None, :] < R1))
    if NUM_SEG > 2:
        tl.store(U2 + rows64[:, None] * R2 + offs_r[None, :], acc2.to(U2.dtype.element_ty),
                 mask=mask_m[:, None] & (offs_r[None, :] < R2))


@triton.jit
def _lora_fwd_kernel(X, W, U, B, BIAS, Y, M, N, K, R, stride_xm, scaling, M_KEY,
                     HAS_BIAS: tl.constexpr, BASE_IN: tl.constexpr, EVEN_K: tl.constexpr, EVEN_R: tl.constexpr,
                     UPCAST: tl.constexpr, PREC: tl.constexpr, TMA_OK: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
                     GROUP_M: tl.constexpr, USE_TMA: tl.constexpr = False):
    """y = x Wᵀ + s · u Bᵀ + b, one (BLOCK_M, BLOCK_N) tile per program.

    K-loop over x (M × K) and W (N × K), then an r-loop over u (M × r) and B (N × r) into the same
    fp32 accumulator (u scaled by s in registers), then the bias; one rounding to y's dtype.
    BASE_IN: y already holds the base product (quantized weight, from ``quant_matmul``); the K-loop
    is skipped and the tile is read from Y and updated in place. USE_TMA (a config; compiled in only
    where TMA_OK, see ``_tma.addressable``): the K-loop through TMA tensor descriptors.
    Backward: ``_lora_dx_kernel`` (dX), ``_matmul_kernel`` (du, dB, dW), ``_lora_dA_kernel`` (dA).
    """
    pid_m, pid_n = _tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    m0, n0, rows, cols, offs_m, offs_n = _tile_origin(pid_m, pid_n, M, N, BLOCK_M, BLOCK_N, False, False)
    y_ptrs = Y + offs_m[:, None] * N + offs_n[None, :]
    y_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if BASE_IN:
        acc = tl.load(y_ptrs, mask=y_mask, other=0.0).to(tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if USE_TMA and TMA_OK:
            acc = _gemm_loop_tma(acc, X, W, M, N, K, stride_xm, K, m0, n0, BLOCK_M, BLOCK_N, BLOCK_K, True,
                                 UPCAST, PREC)
        else:
            # W is (N, K) row-major: as the (K, N) operand, stride_qk = 1, stride_qn = K.
            acc = _gemm_loop(acc, X + m0 * stride_xm, W + n0 * K, rows, cols, K, stride_xm, 1, 1, K, 1.0,
                             BLOCK_K, EVEN_K, False, UPCAST, PREC)
    acc = _gemm_loop(acc, U + m0 * R, B + n0 * R, rows, cols, R, R, 1, 1, R, scaling,
                     BLOCK_R, EVEN_R, True, UPCAST, PREC)
    if HAS_BIAS:
        acc += tl.load(BIAS + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptrs, acc.to(Y.dtype.element_ty), mask=y_mask)


@triton.jit
def _dx_lowrank(acc, DU, A, m0, n0, rows, cols, offs_m, offs_n, K, R, seed, p, keep_scale,
                HAS_DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
                UPCAST: tl.constexpr, PREC: tl.constexpr):
    # du (M × r) row-major; A (r × K) row-major is the (K=r, N=K) operand: stride_qk = K, stride_qn = 1.
    if HAS_DROPOUT:
        # The mask applies to the low-rank term only, so it needs its own accumulator here.
        lo = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        lo = _gemm_loop(lo, DU + m0 * R, A + n0, rows, cols, R, R, 1, K, 1, 1.0, BLOCK_R, False, False, UPCAST, PREC)
        keep = _keep(seed, offs_m, offs_n, K, p)
        acc += tl.where(keep, lo * keep_scale, 0.0)
    else:
        acc = _gemm_loop(acc, DU + m0 * R, A + n0, rows, cols, R, R, 1, K, 1, 1.0, BLOCK_R, False, False,
                         UPCAST, PREC)
    return acc


@triton.jit(do_not_specialize=_SEED_PARAMS)
def _lora_dx_kernel(DY0, DY1, DY2, W0, W1, W2, DU0, DU1, DU2, A0, A1, A2, DX,
                    M, K, N0, N1, N2, R0, R1, R2, seed0, seed1, seed2, p, keep_scale, M_KEY,
                    NUM_SEG: tl.constexpr, HAS_W: tl.constexpr, HAS_DROPOUT: tl.constexpr, EVEN_K: tl.constexpr,
                    EVEN_OUT: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr, TMA_OK: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
                    GROUP_M: tl.constexpr, USE_TMA: tl.constexpr = False):
    """dX = Σ_i dY_i W_i + Σ_i keep_i ⊙ (du_i A_i) / (1 - p), one (BLOCK_M, BLOCK_N) tile of dX (M × K).

    dY_i (M × N_i), W_i (N_i × K), du_i = s_i dY_i B_i (M × r_i), A_i (r_i × K); here BLOCK_K tiles the
    reduction over N_i and BLOCK_N the output columns (the K of the forward). HAS_W = False (quantized
    base: its dX comes from quant_matmul's backward) keeps only the low-rank part.
    """
    pid_m, pid_n = _tile(tl.program_id(0), M, K, BLOCK_M, BLOCK_N, GROUP_M)
    m0, n0, rows, cols, offs_m, offs_n = _tile_origin(pid_m, pid_n, M, K, BLOCK_M, BLOCK_N, False, EVEN_OUT)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if HAS_W and USE_TMA and TMA_OK:  # dY_i (M, N_i) and W_i (N_i, K) through TMA descriptors
        acc = _gemm_loop_tma(acc, DY0, W0, M, K, N0, N0, K, m0, n0, BLOCK_M, BLOCK_N, BLOCK_K, False, UPCAST, PREC)
        if NUM_SEG > 1:
            acc = _gemm_loop_tma(acc, DY1, W1, M, K, N1, N1, K, m0, n0, BLOCK_M, BLOCK_N, BLOCK_K, False, UPCAST,
                                 PREC)
        if NUM_SEG > 2:
            acc = _gemm_loop_tma(acc, DY2, W2, M, K, N2, N2, K, m0, n0, BLOCK_M, BLOCK_N, BLOCK_K, False, UPCAST,
                                 PREC)
    elif HAS_W:
        # dY_i (M × N_i) row-major; W_i (N_i × K) row-major is the (N_i, K) operand: strides (K, 1).
        acc = _gemm_loop(acc, DY0 + m0 * N0, W0 + n0, rows, cols, N0, N0, 1, K, 1, 1.0, BLOCK_K, EVEN_K, False,
                         UPCAST, PREC)
        if NUM_SEG > 1:
            acc = _gemm_loop(acc, DY1 + m0 * N1, W1 + n0, rows, cols, N1, N1, 1, K, 1, 1.0, BLOCK_K, EVEN_K, False,
                             UPCAST, PREC)
        if NUM_SEG > 2:
            acc = _gemm_loop(acc, DY2 + m0 * N2, W2 + n0, rows, cols, N2, N2, 1, K, 1, 1.0, BLOCK_K, EVEN_K, False,
                             UPCAST, PREC)
    acc = _dx_lowrank(acc, DU0, A0, m0, n0, rows, cols, offs_m, offs_n, K, R0, seed0, p, keep_scale, HAS_DROPOUT,
                      BLOCK_M, BLOCK_N, BLOCK_R, UPCAST, PREC)
    if NUM_SEG > 1:
        acc = _dx_lowrank(acc, DU1, A1, m0, n0, rows, cols, offs_m, offs_n, K, R1, seed1, p, keep_scale,
                          HAS_DROPOUT, BLOCK_M, BLOCK_N, BLOCK_R, UPCAST, PREC)
    if NUM_SEG > 2:
        acc = _dx_lowrank(acc, DU2, A2, m0, n0, rows, cols, offs_m, offs_n, K, R2, seed2, p, keep_scale,
                          HAS_DROPOUT, BLOCK_M, BLOCK_N, BLOCK_R, UPCAST, PREC)
    tl.store(DX + offs_m[:, None] * K + offs_n[None, :], acc.to(DX.dtype.element_ty),
             mask=(offs_m[:, None] < M) & (offs_n[None, :] < K))


@triton.jit
def _dA_seg(acc, x, DU, rows64, offs_r, ks, M, K, R, seed, p, keep_scale,
            HAS_DROPOUT: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr):
    du_t = tl.load(DU + rows64[None, :] * R + offs_r[:, None],
                   mask=(rows64[None, :] < M) & (offs_r[:, None] < R), other=0.0)  # (BLOCK_R, BLOCK_M) = duᵀ tile
    if HAS_DROPOUT:
        x = _drop(x, seed, rows64, ks, K, p, keep_scale)
    return _mma(du_t, x, acc, UPCAST, PREC)


@triton.jit(do_not_specialize=_SEED_PARAMS)
def _lora_dA_kernel(X, DU0, DU1, DU2, DA0, DA1, DA2, M, K, R0, R1, R2, stride_xm,
                    seed0, seed1, seed2, p, keep_scale,
                    NUM_SEG: tl.constexpr, HAS_DROPOUT: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """dA_i = du_iᵀ drop_i(x) (r_i × K), reducing over M; each x tile loaded once for all i.

    The dropout mask is regenerated from seed_i exactly as in the forward (offset m·K + k).
    Grid: (cdiv(K, BLOCK_K), cdiv(max r_i, BLOCK_R)).
    """
    pid_k = tl.program_id(0)
    pid_r = tl.program_id(1)
    ks = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_m = tl.arange(0, BLOCK_M)
    acc0 = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        rows64 = (m0 + offs_m).to(tl.int64)
        x = tl.load(X + rows64[:, None] * stride_xm + ks[None, :], mask=(rows64[:, None] < M) & (ks[None, :] < K),
                    other=0.0)
        acc0 = _dA_seg(acc0, x, DU0, rows64, offs_r, ks, M, K, R0, seed0, p, keep_scale, HAS_DROPOUT, UPCAST, PREC)
        if NUM_SEG > 1:
            acc1 = _dA_seg(acc1, x, DU1, rows64, offs_r, ks, M, K, R1, seed1, p, keep_scale, HAS_DROPOUT, UPCAST, PREC)
        if NUM_SEG > 2:
            acc2 = _dA_seg(acc2, x, DU2, rows64, offs_r, ks, M, K, R2, seed2, p, keep_scale, HAS_DROPOUT, UPCAST, PREC)
    r64 = offs_r.to(tl.int64)
    tl.store(DA0 + r64[:, None] * K + ks[None, :], acc0.to(DA0.dtype.element_ty),
             mask=(offs_r[:, None] < R0) & (ks[None, :] < K))
    if NUM_SEG > 1:
        tl.store(DA1 + r64[:, None] * K + ks[None, :], acc1.to(DA1.dtype.element_ty),
                 mask=(offs_r[:, None] < R1) & (ks[None, :] < K))
    if NUM_SEG > 2:
        tl.store(DA2 + r64[:, None] * K + ks[None, :], acc2.to(DA2.dtype.element_ty),
                 mask=(offs_r[:, None] < R2) & (ks[None, :] < K))


@triton.jit
def _matmul_kernel(P, Q, C, M, N, K, stride_pm, stride_pk, stride_qk, stride_qn, alpha, M_KEY,
                   EVEN_K: tl.constexpr, EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, UPCAST: tl.constexpr,
                   PREC: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """C (M × N, row-major) = alpha · P Q with P (M × K), Q (K × N) given by strides (so transposes are
    free). Backward pieces: du = s·dY B, dB = s·dYᵀ u, dW = dYᵀ x."""
    pid_m, pid_n = _tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    m0, n0, rows, cols, offs_m, offs_n = _tile_origin(pid_m, pid_n, M, N, BLOCK_M, BLOCK_N, EVEN_M, EVEN_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc = _gemm_loop(acc, P + m0 * stride_pm, Q + n0 * stride_qn, rows, cols, K, stride_pm, stride_pk, stride_qk,
                     stride_qn, 1.0, BLOCK_K, EVEN_K, False, UPCAST, PREC)
    acc = acc * alpha
    tl.store(C + offs_m[:, None] * N + offs_n[None, :], acc.to(C.dtype.element_ty),
             mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


@triton.jit
def _lora_swiglu_fwd_kernel(X, WG, WU, UG, UU, BG, BU, BIASG, BIASU, G, UP, H, M, N, K, RG, RU, stride_xm,
                            sg, su, M_KEY,
                            HAS_BIAS: tl.constexpr, STORE_GU: tl.constexpr, EVEN_K: tl.constexpr,
                            UPCAST: tl.constexpr, PREC: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                            BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr):
    """h = silu(g) ⊙ up, g = x W_gᵀ + s_g u_g B_gᵀ (+ b_g), up = x W_uᵀ + s_u u_u B_uᵀ (+ b_u).

    Each x tile feeds both accumulators. STORE_GU writes the pre-activations g, up for backward,
    which recomputes σ(g): dg = dh ⊙ up ⊙ σ(g)(1 + g(1 - σ(g))), dup = dh ⊙ g σ(g)
    (``_swiglu_bwd_kernel``), then runs the two-projection LoRA backward.
    """
    pid_m, pid_n = _tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    m0, n0, rows, cols, offs_m, offs_n = _tile_origin(pid_m, pid_n, M, N, BLOCK_M, BLOCK_N, False, False)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    x_off = rows[:, None] * stride_xm + offs_k[None, :]
    w_off = cols[None, :] * K + offs_k[:, None]  # (BLOCK_K, BLOCK_N) = Wᵀ tile
    Xt = X + m0 * stride_xm
    WGt = WG + n0 * K
    WUt = WU + n0 * K
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            x = tl.load(Xt + x_off)
            wg = tl.load(WGt + w_off)
            wu = tl.load(WUt + w_off)
        else:
            kmask = offs_k < K - k0
            x = tl.load(Xt + x_off, mask=kmask[None, :], other=0.0)
            wg = tl.load(WGt + w_off, mask=kmask[:, None], other=0.0)
            wu = tl.load(WUt + w_off, mask=kmask[:, None], other=0.0)
        acc_g = _mma(x, wg, acc_g, UPCAST, PREC)
        acc_u = _mma(x, wu, acc_u, UPCAST, PREC)
        Xt += BLOCK_K
        WGt += BLOCK_K
        WUt += BLOCK_K
    acc_g = _gemm_loop(acc_g, UG + m0 * RG, BG + n0 * RG, rows, cols, RG, RG, 1, 1, RG, sg, BLOCK_R, False, True,
                       UPCAST, PREC)
    acc_u = _gemm_loop(acc_u, UU + m0 * RU, BU + n0 * RU, rows, cols, RU, RU, 1, 1, RU, su, BLOCK_R, False, True,
                       UPCAST, PREC)
    if HAS_BIAS:
        acc_g += tl.load(BIASG + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        acc_u += tl.load(BIASU + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    out_off = offs_m[:, None] * N + offs_n[None, :]
    out_mask = mask_m[:, None] & mask_n[None, :]
    if STORE_GU:
        tl.store(G + out_off, acc_g.to(G.dtype.element_ty), mask=out_mask)
        tl.store(UP + out_off, acc_u.to(UP.dtype.element_ty), mask=out_mask)
    h = acc_g * tl.sigmoid(acc_g) * acc_u
    tl.store(H + out_off, h.to(H.dtype.element_ty), mask=out_mask)


@triton.jit
def _swiglu_bwd_kernel(DH, G, UP, DG, DUP, n, BLOCK: tl.constexpr):
    """dg = dh ⊙ up ⊙ σ(g)(1 + g(1 - σ(g))), dup = dh ⊙ g σ(g), in fp32 (σ recomputed from g)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dh = tl.load(DH + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(UP + offs, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    tl.store(DG + offs, (dh * up * sig * (1.0 + g * (1.0 - sig))).to(DG.dtype.element_ty), mask=mask)
    tl.store(DUP + offs, (dh * g * sig).to(DUP.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["seed"])
def _dropout_mask_kernel(OUT, n, seed, p, BLOCK: tl.constexpr):
    """keep[i] = rand(seed, i) >= p over the flattened (M, K) input: the kernels' mask, materialised."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    keep = tl.rand(seed, offs) >= p
    tl.store(OUT + offs, keep.to(tl.int8), mask=offs < n)


# ------------------------------------------------------------------------------------- configs
def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def gemm_configs(accumulators: int = 1, dropout: bool = False, tma: bool = False) -> list:
    """Tile configs the GEMM-shaped kernels autotune over on a GPU (pruned per shape by ``_prune``).

    128×256×64 and 128×128×64 with 8 warps are the large-M configs (wgmma on Hopper; 128×256×64 in
    3 stages is the tile Triton's own matmul tutorial and cuBLAS favour for large bf16 GEMMs on
    Hopper; it compiles without spills on sm_80 / sm_90 with Triton 3.6 and 3.9, and was missing
    when the H200 runs measured these kernels at 1.22-1.25x cuBLAS's time); 128×64 / 64×128 with 4
    warps cover narrow outputs, 32- and 16-row tiles short or decode-sized M, and the last three the
    rank-r outputs of the backward (N = r). 4-warp 128×128 tiles spill (tests/test_aot_lora.py), so
    they are not offered. ``tma=True`` (forward and dX) adds a TMA twin behind every tile of at
    least 128×128. The SwiGLU kernel holds
    two accumulators (``accumulators=2``) and gets the half-width tiles. The dX kernel with dropout
    holds a second accumulator plus the Philox state of its tile (``dropout=True``): at most 32
    elements per thread, i.e. 8 warps for 64×128 / 128×64 tiles.
    """
    table = [
        (128, 256, 64, 8, 3), (128, 128, 64, 8, 4), (128, 128, 64, 8, 3), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4),
        (64, 64, 64, 4, 4), (32, 64, 64, 4, 4), (16, 64, 128, 4, 4),
        # r-wide outputs (du = s dY B, dB = s dYᵀ u: N = r): only these survive the pruning at r <= 16,
        # and their short M tiles give the memory-bound reductions enough programs (H200 profile:
        # 128x64 tiles left 32-64 programs and took 10x the bytes' time).
        (64, 32, 128, 4, 4), (32, 32, 128, 4, 4), (32, 16, 128, 4, 4),
    ]
    if dropout:  # the 8-warp 64×64 tile is what several projections (≤ 16 elements per thread) get
        table = [(64, 128, 64, 8, 4), (128, 64, 64, 8, 4), (64, 64, 64, 8, 4), (64, 64, 64, 4, 4),
                 (32, 64, 64, 4, 4), (16, 64, 128, 4, 4)]
    if accumulators > 1:  # (two 128x128 accumulators spill on sm_80: the 128x256 entry is dropped)
        table = [(bm, bn // accumulators if bm * bn >= 128 * 128 else bn, bk, w, st) for bm, bn, bk, w, st in table
                 if bm * bn <= 128 * 128]
    out = []
    for bm, bn, bk, warps, stages in dict.fromkeys(table):
        out.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
                                 num_warps=warps, num_stages=stages))
        if tma and bm * bn >= 128 * 128:
            # its TMA twin right behind it (the forward's and dX's K-loops; see ``_tma.addressable``): with
            # FASTFT_AUTOTUNE_MAX = 3 the autotuner times TMA against pointer loads on the big tile
            out.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8, "USE_TMA": True},
                                     num_warps=warps, num_stages=stages))
    return out


HOT_CONFIGS = 3  # the first three of gemm_configs() carry large-M training shapes: no spills allowed


# One config under the interpreter: 32-wide tiles keep the Python-level loop count low while the test
# shapes (40, 96, 200, M = 1, 3, 118) still hit every tail.
_INTERP_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4}


def _prune_factory(m_arg: str, n_arg: str, ptr_arg: str, n_operands: int = 2):
    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}  # launchers pass everything by keyword
        M, N = args[m_arg], args[n_arg]
        elt = args[ptr_arg].element_size()
        pm, pn = max(16, triton.next_power_of_2(M)), max(16, triton.next_power_of_2(N))
        # dX with dropout over several projections: one Philox state per projection per element.
        per_thread = 16 if args.get("HAS_DROPOUT") and args.get("NUM_SEG", 1) > 1 else None
        if not args.get("TMA_OK", False):  # TMA configs become their pointer-load twins
            configs = _tma.plain_twins(configs)
        kept = []
        for c in configs:
            kw = c.kwargs
            if kw["BLOCK_M"] > pm or kw["BLOCK_N"] > 2 * pn:
                continue
            if per_thread and kw["BLOCK_M"] * kw["BLOCK_N"] > per_thread * 32 * c.num_warps:
                continue
            # Shared memory of the pipelined K-loop; H100 has 227 KB, A100 163 KB per block.
            smem = (kw["BLOCK_M"] + (n_operands - 1) * kw["BLOCK_N"]) * kw["BLOCK_K"] * elt * c.num_stages
            if smem > 160 * 1024:
                continue
            kept.append(c)
        if not kept:  # a tiny problem: the smallest tile
            kept = [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])]
        return _tuning.cap(kept)
    return prune


def _even_k(args):
    return args["K"] % args["BLOCK_K"] == 0


@functools.lru_cache(maxsize=None)
def _tuned(name: str):
    """The autotuned wrapper of a kernel (built lazily: nothing happens at import time)."""
    if name == "fwd":
        return triton.autotune(gemm_configs(tma=True), key=["M_KEY", "N", "K", "R", "HAS_BIAS", "BASE_IN", "TMA_OK"],
                               prune_configs_by={"early_config_prune": _prune_factory("M", "N", "X")},
                               restore_value=["Y"])(
            triton.heuristics({"EVEN_K": _even_k})(_lora_fwd_kernel))
    if name in ("dx", "dx_dropout"):
        return triton.autotune(gemm_configs(dropout=name == "dx_dropout", tma=True),
                               key=["M_KEY", "K", "N0", "N1", "N2", "NUM_SEG", "HAS_W", "HAS_DROPOUT", "TMA_OK"],
                               prune_configs_by={"early_config_prune": _prune_factory("M", "K", "DX")})(
            triton.heuristics({"EVEN_K": lambda a: all(a[n] % a["BLOCK_K"] == 0 for n in ("N0", "N1", "N2")),
                               "EVEN_OUT": lambda a: a["K"] % a["BLOCK_N"] == 0})(
                _lora_dx_kernel))
    if name == "mm":
        return triton.autotune(gemm_configs(), key=["M_KEY", "N", "K", "stride_pm", "stride_qk"],
                               prune_configs_by={"early_config_prune": _prune_factory("M", "N", "C")})(
            triton.heuristics({"EVEN_K": _even_k, "EVEN_M": lambda a: a["M"] % a["BLOCK_M"] == 0,
                               "EVEN_N": lambda a: a["N"] % a["BLOCK_N"] == 0})(_matmul_kernel))
    if name == "swiglu":
        return triton.autotune(gemm_configs(2), key=["M_KEY", "N", "K", "RG", "RU", "HAS_BIAS", "STORE_GU"],
                               prune_configs_by={"early_config_prune": _prune_factory("M", "N", "X", 3)})(
            triton.heuristics({"EVEN_K": _even_k})(_lora_swiglu_fwd_kernel))
    raise KeyError(name)


def _launch(name: str, raw_kernel, grid_fn, args: dict):
    """Launch ``raw_kernel`` with the interpreter's single config, or its autotuned wrapper on a GPU."""
    if _interpreting():
        meta = dict(_INTERP_CONFIG)
        if "EVEN_K" in raw_kernel.arg_names:
            ks = [args[n] for n in ("N0", "N1", "N2")] if "N0" in args else [args["K"]]
            meta["EVEN_K"] = all(k % meta["BLOCK_K"] == 0 for k in ks)
        if "EVEN_OUT" in raw_kernel.arg_names:  # dX: output columns are K
            meta["EVEN_OUT"] = args["K"] % meta["BLOCK_N"] == 0
        if "EVEN_M" in raw_kernel.arg_names:
            meta["EVEN_M"] = args["M"] % meta["BLOCK_M"] == 0
            meta["EVEN_N"] = args["N"] % meta["BLOCK_N"] == 0
        if "USE_TMA" in raw_kernel.arg_names:
            meta["USE_TMA"] = INTERPRET_TMA
        raw_kernel[grid_fn(meta)](**args, **meta)
    else:
        _tuned(name)[grid_fn](**args)


# Under the interpreter: whether the forward / dX kernels take their TMA variant (tests set it).
INTERPRET_TMA = False


def _gemm_grid(M, N):
    return lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)


def _common(dtype) -> dict:
    upcast = _interpreting() and dtype == torch.bfloat16
    tf32 = dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 and not _interpreting()
    return {"UPCAST": upcast, "PREC": "tf32" if tf32 else "ieee"}


def _rank_tiles(num_seg: int, dropout: bool):
    """(BLOCK_M, BLOCK_K, num_warps) of the rank-r kernels (down projection, dA): memory-bound, not tuned.

    64×64 x tiles over 8 warps; with dropout over several projections (one Philox state each) the
    tile narrows to 64×32 so the accumulators stay in registers at BLOCK_R = 64
    (tests/test_aot_lora.py).
    """
    if _interpreting():
        return 32, 32, 4
    return (64, 32, 8) if dropout and num_seg > 1 else (64, 64, 8)


def _block_r(r: int) -> int:
    return min(64, max(16, triton.next_power_of_2(r)))


def _m_key(M: int) -> int:
    return triton.next_power_of_2(M)  # bucket: varying batch sizes reuse the tuned config


# ------------------------------------------------------------------------------------- launchers
def _pad3(lst, fill):
    return list(lst) + [fill] * (3 - len(lst))


def _down(x2, As, seeds, p):
    """u_i = drop_i(x) A_iᵀ for 1-3 projections; x2 (M, K) with unit column stride."""
    M, K = x2.shape
    n = len(As)
    us = [torch.empty(M, A.shape[0], device=x2.device, dtype=x2.dtype) for A in As]
    rmax = max(A.shape[0] for A in As)
    br = _block_r(rmax)
    bm, bk, warps = _rank_tiles(n, p > 0)
    Ap, Up = _pad3(As, As[0]), _pad3(us, us[0])
    Rs, Ss = _pad3([A.shape[0] for A in As], 1), _pad3(seeds, 0)
    grid = (triton.cdiv(M, bm), triton.cdiv(rmax, br))
    _lora_down_kernel[grid](x2, *Ap, *Up, M, K, *Rs, x2.stride(0), *Ss, p, 1.0 / (1.0 - p) if p > 0 else 1.0,
                            NUM_SEG=n, HAS_DROPOUT=p > 0, BLOCK_M=bm, BLOCK_R=br, BLOCK_K=bk,
                            num_warps=warps, **_common(x2.dtype))
    return us


def _fwd(x2, W, u, B, bias, scaling, y=None):
    """y = x Wᵀ + s·u Bᵀ + b; with W None, y holds the base product and is updated in place."""
    M = x2.shape[0]
    N, r = B.shape
    K = x2.shape[1]
    base_in = W is None
    if y is None:
        y = torch.empty(M, N, device=x2.device, dtype=x2.dtype)
    use_tma = not base_in and _tma.addressable(x2, W)
    if use_tma:
        _tma.ensure_allocator(x2.device)
    args = dict(X=x2, W=x2 if base_in else W, U=u, B=B, BIAS=bias if bias is not None else B, Y=y,
                M=M, N=N, K=K, R=r, stride_xm=x2.stride(0), scaling=float(scaling), M_KEY=_m_key(M),
                HAS_BIAS=bias is not None, BASE_IN=base_in, EVEN_R=r % _block_r(r) == 0, BLOCK_R=_block_r(r),
                TMA_OK=use_tma, **_common(x2.dtype))
    _launch("fwd", _lora_fwd_kernel, _gemm_grid(M, N), args)
    return y


def _matmul(P, Q, M, N, K, strides, alpha, out_dtype, device):
    """alpha · P Q, P (M × K) and Q (K × N) given as (tensor, strides)."""
    C = torch.empty(M, N, device=device, dtype=out_dtype)
    spm, spk, sqk, sqn = strides
    args = dict(P=P, Q=Q, C=C, M=M, N=N, K=K, stride_pm=spm, stride_pk=spk, stride_qk=sqk, stride_qn=sqn,
                alpha=float(alpha), M_KEY=_m_key(M), **_common(P.dtype))
    _launch("mm", _matmul_kernel, _gemm_grid(M, N), args)
    return C


def _dx(dys, Ws, dus, As, seeds, p, M, K, dtype, device):
    n = len(dus)
    dx = torch.empty(M, K, device=device, dtype=dtype)
    has_w = Ws is not None
    Ns = _pad3([d.shape[1] for d in dys], 0)
    dyp = _pad3(dys, dys[0])
    wp = _pad3(Ws, Ws[0]) if has_w else [dx] * 3
    rmax = max(A.shape[0] for A in As)
    use_tma = has_w and _tma.addressable(*dys, *Ws)
    if use_tma:
        _tma.ensure_allocator(device)
    args = dict(zip(["DY0", "DY1", "DY2"], dyp), **dict(zip(["W0", "W1", "W2"], wp)),
                **dict(zip(["DU0", "DU1", "DU2"], _pad3(dus, dus[0]))),
                **dict(zip(["A0", "A1", "A2"], _pad3(As, As[0]))),
                DX=dx, M=M, K=K, **dict(zip(["N0", "N1", "N2"], Ns)),
                **dict(zip(["R0", "R1", "R2"], _pad3([A.shape[0] for A in As], 1))),
                **dict(zip(_SEED_PARAMS, _pad3(seeds, 0))), p=p, keep_scale=1.0 / (1.0 - p) if p > 0 else 1.0,
                M_KEY=_m_key(M), NUM_SEG=n, HAS_W=has_w, HAS_DROPOUT=p > 0, BLOCK_R=_block_r(rmax),
                TMA_OK=use_tma, **_common(dtype))
    _launch("dx_dropout" if p > 0 else "dx", _lora_dx_kernel, _gemm_grid(M, K), args)
    return dx


def _dA(x2, dus, seeds, p):
    M, K = x2.shape
    n = len(dus)
    rs = [d.shape[1] for d in dus]
    das = [torch.empty(r, K, device=x2.device, dtype=x2.dtype) for r in rs]
    br = _block_r(max(rs))
    bm, bk, warps = _rank_tiles(n, p > 0)
    grid = (triton.cdiv(K, bk), triton.cdiv(max(rs), br))
    _lora_dA_kernel[grid](x2, *_pad3(dus, dus[0]), *_pad3(das, das[0]), M, K, *_pad3(rs, 1), x2.stride(0),
                          *_pad3(seeds, 0), p, 1.0 / (1.0 - p) if p > 0 else 1.0,
                          NUM_SEG=n, HAS_DROPOUT=p > 0, BLOCK_M=bm, BLOCK_R=br, BLOCK_K=bk, num_warps=warps,
                          **_common(x2.dtype))
    return das


def _backward(dys, x2, Ws, As, Bs, us, scalings, p, seeds, need_dx, need_dW, need_dA, need_dB):
    """Shared LoRA backward for 1-3 projections of one x. dys: list of (M, N_i) contiguous.

    Returns (dx, dWs, dAs, dBs); entries not needed are None. Ws is None for a quantized base.
    """
    M, K = x2.shape
    dev, dt = x2.device, x2.dtype
    n = len(dys)
    dus = None
    if need_dx or need_dA:
        # du_i = s_i · dY_i B_i  (M × r_i)
        dus = [_matmul(dy, B, M, B.shape[1], B.shape[0], (dy.stride(0), 1, B.stride(0), 1), s, dt, dev)
               for dy, B, s in zip(dys, Bs, scalings)]
    dBs = [None] * n
    if need_dB:
        # dB_i = s_i · dY_iᵀ u_i  (N_i × r_i): P = dY_iᵀ via strides (1, N_i)
        dBs = [_matmul(dy, u, dy.shape[1], u.shape[1], M, (1, dy.stride(0), u.stride(0), 1), s, dt, dev)
               for dy, u, s in zip(dys, us, scalings)]
    dAs = _dA(x2, dus, seeds, p) if need_dA else [None] * n
    dx = _dx(dys, Ws, dus, As, seeds, p, M, K, dt, dev) if need_dx else None
    dWs = [None] * n
    if need_dW:
        # dW_i = dY_iᵀ x  (N_i × K)
        dWs = [_matmul(dy, x2, dy.shape[1], K, M, (1, dy.stride(0), x2.stride(0), 1), 1.0, dt, dev)
               for dy in dys]
    return dx, dWs, dAs, dBs


# ------------------------------------------------------------------------------------- checks
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check(x, weights, As, Bs, biases, p, name="lora_linear"):
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        raise ValueError(f"{name}: x must be a tensor (..., in_features)")
    if x.dtype not in _DTYPES:
        raise TypeError(f"{name}: the triton backend supports fp16/bf16/fp32 x, got {x.dtype} "
                        "(use FASTFT_BACKEND=reference for float64)")
    if not 0.0 <= p < 1.0:
        raise ValueError(f"{name}: dropout_p must be in [0, 1), got {p}")
    K = x.shape[-1]
    if K == 0:
        raise ValueError(f"{name}: in_features is 0")
    for i, (W, A, B, b) in enumerate(zip(weights, As, Bs, biases)):
        tag = f"{name}[{i}]" if len(weights) > 1 else name
        if A.dim() != 2 or B.dim() != 2:
            raise ValueError(f"{tag}: lora_A must be (r, in) and lora_B (out, r); "
                             f"got {tuple(A.shape)}, {tuple(B.shape)}")
        r = A.shape[0]
        if r < 1:
            raise ValueError(f"{tag}: LoRA rank must be >= 1, got {r}")
        if A.shape[1] != K:
            raise ValueError(f"{tag}: lora_A is {tuple(A.shape)} but x has in_features={K}")
        if B.shape[1] != r:
            raise ValueError(f"{tag}: lora_B is {tuple(B.shape)}, its rank dim does not match lora_A's r={r}")
        N = B.shape[0]
        if isinstance(W, torch.Tensor):
            if W.shape != (N, K):
                raise ValueError(f"{tag}: weight is {tuple(W.shape)}, expected (out, in) = ({N}, {K}) "
                                 "from lora_B and x")
            if W.dtype != x.dtype:
                raise TypeError(f"{tag}: weight dtype {W.dtype} differs from x dtype {x.dtype}")
        else:
            shape = tuple(getattr(W, "shape", ()))
            if shape != (N, K):
                raise ValueError(f"{tag}: quantized weight has shape {shape}, expected ({N}, {K})")
        if b is not None and b.shape != (N,):
            raise ValueError(f"{tag}: bias is {tuple(b.shape)}, expected ({N},)")
        for t in (W, A, B, b):
            if t is not None and getattr(t, "device", x.device) != x.device:
                raise ValueError(f"{tag}: all tensors must be on x's device {x.device}")
    if not _device_supported(x.device):
        raise RuntimeError(f"{name}: the triton backend needs CUDA tensors (or TRITON_INTERPRET=1 on CPU)")


def _device_supported(device) -> bool:
    return device.type == "cuda" or _interpreting()


def draw_seed(generator) -> int:
    """A Philox seed in [0, 2³¹) from ``generator`` (or torch's default CPU generator)."""
    if generator is not None:
        return int(torch.randint(0, 2**31 - 1, (1,), generator=generator, device=generator.device).item())
    return int(torch.randint(0, 2**31 - 1, (1,)).item())


def dropout_mask(seed: int, shape, p: float, device="cpu") -> torch.Tensor:
    """The boolean keep mask the kernels regenerate for ``seed`` over an x of ``shape`` (…, in)."""
    shape = tuple(shape)
    n = 1
    for s in shape:
        n *= s
    out = torch.empty(n, dtype=torch.int8, device=device)
    if n:
        _dropout_mask_kernel[(triton.cdiv(n, 1024),)](out, n, int(seed), float(p), BLOCK=1024)
    return out.view(shape).bool()


def _cast_inputs(x, weights, As, Bs, biases):
    """Autocast: run in the autocast dtype (as F.linear would); else A, B, bias follow x's dtype."""
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        dt = torch.get_autocast_dtype(dev)
        x = x.to(dt)
        weights = [W.to(dt) if isinstance(W, torch.Tensor) else W for W in weights]
    else:
        dt = x.dtype
    # The kernels address W, A, B and bias as dense row-major arrays.
    weights = [W.contiguous() if isinstance(W, torch.Tensor) else W for W in weights]
    As = [A.to(dt).contiguous() for A in As]
    Bs = [B.to(dt).contiguous() for B in Bs]
    biases = [b.to(dt).contiguous() if b is not None else None for b in biases]
    return x, weights, As, Bs, biases


# ------------------------------------------------------------------------------------- autograd
class LoraLinearFunction(torch.autograd.Function):
    """y = x Wᵀ + b + s·(drop(x) Aᵀ) Bᵀ (or base + s·(drop(x) Aᵀ) Bᵀ when ``base`` is given).

    Saves x (2-D view), u and the parameters; the seed and scalars live on ctx.
    """

    @staticmethod
    def forward(ctx, x, weight, lora_A, lora_B, bias, scaling, dropout_p, seed, base):
        K = x.shape[-1]
        x2 = x.reshape(-1, K)
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        N = lora_B.shape[0]
        u = _down(x2, [lora_A], [seed], dropout_p)[0]
        if base is not None:
            # Quantized base: add the low-rank term onto quant_matmul's fresh output in place (no copy),
            # unless it is a view (autograd forbids modifying a custom Function's view output in place).
            if base.is_contiguous() and base._base is None:
                ctx.mark_dirty(base)
            else:
                base = base.clone(memory_format=torch.contiguous_format)
            _fwd(x2, None, u, lora_B, None, scaling, y=base.view(-1, N))
            y = base
        else:
            y = _fwd(x2, weight, u, lora_B, bias, scaling).view(*x.shape[:-1], N)
        ctx.save_for_backward(x2, weight if base is None else None, lora_A, lora_B, u)
        ctx.scaling, ctx.p, ctx.seed, ctx.x_shape = scaling, dropout_p, seed, x.shape
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        x2, W, A, B, u = ctx.saved_tensors
        N = B.shape[0]
        dy2 = dy.reshape(-1, N).contiguous()
        nig = ctx.needs_input_grad
        dx, dWs, dAs, dBs = _backward([dy2], x2, [W] if W is not None else None, [A], [B], [u], [ctx.scaling],
                                      ctx.p, [ctx.seed], nig[0], nig[1] and W is not None, nig[2], nig[3])
        db = dy2.sum(0, dtype=torch.float32).to(dy2.dtype) if ctx.has_bias and nig[4] else None
        dbase = dy if nig[8] else None
        dx = dx.view(ctx.x_shape) if dx is not None else None
        return dx, dWs[0], dAs[0], dBs[0], db, None, None, None, dbase


class LoraQuantDecodeFunction(torch.autograd.Function):
    """A LoRA layer over a 4-bit base at decode shapes (<= 16 rows): u = drop(x) Aᵀ, then
    y = x Wᵀ + b + s·u Bᵀ in one quant kernel (``quant_matmul_lora``). Backward: the rank side as
    in ``LoraLinearFunction`` (dX's low-rank part, dA, dB) plus the base's dX through the device's
    quantized dX op. Saves x, u and the adapters, as ``LoraLinearFunction``."""

    @staticmethod
    def forward(ctx, x, qweight, lora_A, lora_B, bias, scaling, dropout_p, seed):
        from fastft.kernels import quant as triton_quant

        K = x.shape[-1]
        x2 = x.reshape(-1, K)
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        u = _down(x2, [lora_A], [seed], dropout_p)[0]
        y = triton_quant.quant_matmul_lora(x2, qweight, bias, u, lora_B, scaling)
        ctx.save_for_backward(x2, lora_A, lora_B, u)
        ctx.qweight = qweight
        ctx.scaling, ctx.p, ctx.seed, ctx.x_shape = scaling, dropout_p, seed, x.shape
        ctx.has_bias = bias is not None
        return y.view(*x.shape[:-1], lora_B.shape[0])

    @staticmethod
    def backward(ctx, dy):
        from fastft.ops import dispatch

        x2, A, B, u = ctx.saved_tensors
        N = B.shape[0]
        dy2 = dy.reshape(-1, N).contiguous()
        nig = ctx.needs_input_grad
        dx, _, dAs, dBs = _backward([dy2], x2, None, [A], [B], [u], [ctx.scaling], ctx.p, [ctx.seed],
                                    nig[0], False, nig[2], nig[3])
        if dx is not None:
            dx = dx + dispatch.get_impl("quant_matmul_grad_x", dy2.device)(dy2, ctx.qweight).to(dx.dtype)
            dx = dx.view(ctx.x_shape)
        db = dy2.sum(0, dtype=torch.float32).to(dy2.dtype) if ctx.has_bias and nig[4] else None
        return dx, None, dAs[0], dBs[0], db, None, None, None


class LoraMultiFunction(torch.autograd.Function):
    """1-3 LoRA linears of one x (q/k/v): y_i = x W_iᵀ + b_i + s_i (drop_i(x) A_iᵀ) B_iᵀ.

    forward(ctx, x, n, scalings, dropout_p, seeds, *tensors) with tensors = W_0..W_{n-1},
    A_0.., B_0.., bias_0.. (bias entries may be None). Returns n outputs.
    """

    @staticmethod
    def forward(ctx, x, n, scalings, dropout_p, seeds, *tensors):
        Ws, As, Bs, bs = (list(tensors[i * n:(i + 1) * n]) for i in range(4))
        K = x.shape[-1]
        x2 = x.reshape(-1, K)
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        us = _down(x2, As, seeds, dropout_p)
        ys = [_fwd(x2, W, u, B, b, s).view(*x.shape[:-1], B.shape[0])
              for W, u, B, b, s in zip(Ws, us, Bs, bs, scalings)]
        ctx.save_for_backward(x2, *Ws, *As, *Bs, *us)
        ctx.n, ctx.scalings, ctx.p, ctx.seeds, ctx.x_shape = n, scalings, dropout_p, seeds, x.shape
        ctx.has_bias = [b is not None for b in bs]
        return tuple(ys)

    @staticmethod
    def backward(ctx, *dys):
        n = ctx.n
        saved = ctx.saved_tensors
        x2 = saved[0]
        Ws, As, Bs, us = (list(saved[1 + i * n:1 + (i + 1) * n]) for i in range(4))
        dys = [dy.reshape(-1, B.shape[0]).contiguous() if dy is not None
               else torch.zeros(x2.shape[0], B.shape[0], device=x2.device, dtype=x2.dtype)
               for dy, B in zip(dys, Bs)]
        nig = ctx.needs_input_grad[5:]
        need_W = any(nig[:n])
        dx, dWs, dAs, dBs = _backward(dys, x2, Ws, As, Bs, us, ctx.scalings, ctx.p, ctx.seeds,
                                      ctx.needs_input_grad[0], need_W, any(nig[n:2 * n]), any(nig[2 * n:3 * n]))
        dbs = [dy.sum(0, dtype=torch.float32).to(dy.dtype) if hb else None for dy, hb in zip(dys, ctx.has_bias)]
        dWs = [g if nig[i] else None for i, g in enumerate(dWs)]
        dx = dx.view(ctx.x_shape) if dx is not None else None
        return (dx, None, None, None, None, *dWs, *dAs, *dBs, *dbs)


class LoraSwiGLUFunction(torch.autograd.Function):
    """h = silu(g) ⊙ up with g, up LoRA linears of one x (gate/up projections of a SwiGLU MLP).

    forward(ctx, x, scalings, dropout_p, seeds, Wg, Wu, Ag, Au, Bg, Bu, bg, bu). Saves x, u_g, u_u and
    the pre-activations g, up; the activation is recomputed in backward.
    """

    @staticmethod
    def forward(ctx, x, scalings, dropout_p, seeds, Wg, Wu, Ag, Au, Bg, Bu, bg, bu):
        K = x.shape[-1]
        x2 = x.reshape(-1, K)
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        M, N = x2.shape[0], Bg.shape[0]
        ug, uu = _down(x2, [Ag, Au], seeds, dropout_p)
        store = any(ctx.needs_input_grad)
        h = torch.empty(M, N, device=x.device, dtype=x.dtype)
        g = torch.empty_like(h) if store else h
        up = torch.empty_like(h) if store else h
        rmax = max(Ag.shape[0], Au.shape[0])
        args = dict(X=x2, WG=Wg, WU=Wu, UG=ug, UU=uu, BG=Bg, BU=Bu, BIASG=bg if bg is not None else Bg,
                    BIASU=bu if bu is not None else Bu, G=g, UP=up, H=h, M=M, N=N, K=K, RG=Ag.shape[0],
                    RU=Au.shape[0], stride_xm=x2.stride(0), sg=float(scalings[0]), su=float(scalings[1]),
                    M_KEY=_m_key(M), HAS_BIAS=bg is not None, STORE_GU=store, BLOCK_R=_block_r(rmax),
                    **_common(x.dtype))
        _launch("swiglu", _lora_swiglu_fwd_kernel, _gemm_grid(M, N), args)
        ctx.save_for_backward(x2, Wg, Wu, Ag, Au, Bg, Bu, ug, uu, g, up)
        ctx.scalings, ctx.p, ctx.seeds, ctx.x_shape = scalings, dropout_p, seeds, x.shape
        ctx.has_bias = bg is not None
        return h.view(*x.shape[:-1], N)

    @staticmethod
    def backward(ctx, dh):
        x2, Wg, Wu, Ag, Au, Bg, Bu, ug, uu, g, up = ctx.saved_tensors
        N = Bg.shape[0]
        dh2 = dh.reshape(-1, N).contiguous()
        dg, dup = torch.empty_like(g), torch.empty_like(up)
        n = dh2.numel()
        _swiglu_bwd_kernel[(triton.cdiv(n, 1024),)](dh2, g, up, dg, dup, n, BLOCK=1024)
        nig = ctx.needs_input_grad
        dx, dWs, dAs, dBs = _backward([dg, dup], x2, [Wg, Wu], [Ag, Au], [Bg, Bu], [ug, uu], ctx.scalings, ctx.p,
                                      ctx.seeds, nig[0], nig[4] or nig[5], nig[6] or nig[7], nig[8] or nig[9])
        dbg = dg.sum(0, dtype=torch.float32).to(dg.dtype) if ctx.has_bias else None
        dbu = dup.sum(0, dtype=torch.float32).to(dup.dtype) if ctx.has_bias else None
        dx = dx.view(ctx.x_shape) if dx is not None else None
        return (dx, None, None, None, dWs[0] if nig[4] else None, dWs[1] if nig[5] else None, *dAs, *dBs, dbg, dbu)


# ------------------------------------------------------------------------------------- public
@register("lora_linear", "triton")
def lora_linear(x, weight, lora_A, lora_B, scaling, bias=None, dropout_p=0.0, generator=None):
    """y = x Wᵀ + b + s·(drop(x) Aᵀ) Bᵀ, fused (see the module docstring). W dense or quantized."""
    dropout_p = float(dropout_p)
    _check(x, [weight], [lora_A], [lora_B], [bias], dropout_p)
    if x.numel() == 0:
        from fastft.ops import reference
        return reference.lora_linear(x, weight, lora_A, lora_B, scaling, bias, dropout_p, generator)
    x, (weight,), (A,), (B,), (bias,) = _cast_inputs(x, [weight], [lora_A], [lora_B], [bias])
    seed = draw_seed(generator) if dropout_p > 0 else 0
    with torch.autocast(x.device.type, enabled=False):
        if isinstance(weight, torch.Tensor):
            return LoraLinearFunction.apply(x, weight, A, B, bias, float(scaling), dropout_p, seed, None)
        from fastft.kernels import quant as triton_quant

        if triton_quant.decode_eligible(x, weight):
            # Decode-shaped rows (generation): base and low-rank term in one quant kernel (its
            # LoRA epilogue); the training-sized base stays on the faster dequantize + GEMM below.
            return LoraQuantDecodeFunction.apply(x, weight, A, B, bias, float(scaling), dropout_p, seed)
        from fastft import ops
        base = ops.quant_matmul(x, weight, bias)  # its own autograd: dX of the base, no dW
        return LoraLinearFunction.apply(x, None, A, B, None, float(scaling), dropout_p, seed, base)


def lora_qkv(x, weights, lora_As, lora_Bs, scalings, biases=None, dropout_p=0.0, generator=None):
    """[x W_iᵀ + b_i + s_i (drop_i(x) A_iᵀ) B_iᵀ for i] for 1-3 dense projections of one x.

    Each projection draws its own dropout seed (in order), as separate PEFT modules would.
    """
    n = len(weights)
    if not 1 <= n <= 3 or len(lora_As) != n or len(lora_Bs) != n:
        raise ValueError(f"lora_qkv: expected 1-3 projections with matching weights/A/B lists, got "
                         f"{len(weights)}, {len(lora_As)}, {len(lora_Bs)}")
    biases = [None] * n if biases is None else list(biases)
    scalings = [float(scalings)] * n if isinstance(scalings, (int, float)) else [float(s) for s in scalings]
    if len(biases) != n or len(scalings) != n:
        raise ValueError("lora_qkv: biases and scalings must have one entry per projection")
    dropout_p = float(dropout_p)
    if not all(isinstance(W, torch.Tensor) for W in weights):
        raise TypeError("lora_qkv: quantized weights are not fused; call lora_linear per projection")
    _check(x, weights, lora_As, lora_Bs, biases, dropout_p, name="lora_qkv")
    x, weights, As, Bs, biases = _cast_inputs(x, list(weights), list(lora_As), list(lora_Bs), biases)
    if x.numel() == 0:  # nothing to launch; keep the autograd graph (all gradients are zero)
        return [F.linear(x, W, b) + F.linear(F.linear(x, A), B) * s
                for W, A, B, b, s in zip(weights, As, Bs, biases, scalings)]
    seeds = [draw_seed(generator) if dropout_p > 0 else 0 for _ in range(n)]
    with torch.autocast(x.device.type, enabled=False):
        return list(LoraMultiFunction.apply(x, n, scalings, dropout_p, seeds, *weights, *As, *Bs, *biases))


def lora_gate_up_swiglu(x, weights, lora_As, lora_Bs, scalings, biases=None, dropout_p=0.0, generator=None):
    """silu(g) ⊙ up with g, up = LoRA linears (weights = [W_gate, W_up], etc.) of one x, fused."""
    if len(weights) != 2 or len(lora_As) != 2 or len(lora_Bs) != 2:
        raise ValueError("lora_gate_up_swiglu: expected two projections (gate, up)")
    biases = [None, None] if biases is None else list(biases)
    if (biases[0] is None) != (biases[1] is None):
        raise ValueError("lora_gate_up_swiglu: gate and up must both have a bias or neither")
    scalings = [float(scalings)] * 2 if isinstance(scalings, (int, float)) else [float(s) for s in scalings]
    dropout_p = float(dropout_p)
    if not all(isinstance(W, torch.Tensor) for W in weights):
        raise TypeError("lora_gate_up_swiglu: quantized weights are not fused; use lora_linear per projection")
    _check(x, weights, lora_As, lora_Bs, biases, dropout_p, name="lora_gate_up_swiglu")
    if weights[0].shape != weights[1].shape:
        raise ValueError(f"lora_gate_up_swiglu: gate {tuple(weights[0].shape)} and up {tuple(weights[1].shape)} differ")
    x, weights, As, Bs, biases = _cast_inputs(x, list(weights), list(lora_As), list(lora_Bs), biases)
    if x.numel() == 0:  # nothing to launch; keep the autograd graph (all gradients are zero)
        g, up = (F.linear(x, W, b) + F.linear(F.linear(x, A), B) * s
                 for W, A, B, b, s in zip(weights, As, Bs, biases, scalings))
        return F.silu(g) * up
    seeds = [draw_seed(generator) if dropout_p > 0 else 0 for _ in range(2)]
    with torch.autocast(x.device.type, enabled=False):
        return LoraSwiGLUFunction.apply(x, scalings, dropout_p, seeds, *weights, *As, *Bs, *biases)
