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
``keep[m, k] = tl.rand(seed, m·K + k) >= p`` (int64 offsets, ``_common.dropout_keep``), so
``dropout_mask(seed, ...)`` can materialise exactly the mask the kernels used (the tests compare
with the reference given it).

The down projection, dA and dX kernels take 1-3 projections of one x (``NUM_SEG``; 1 for a single
projection), which ``kernels/lora_fused.py`` (``lora_qkv``, ``lora_gate_up_swiglu``) uses.

A 4-bit weight comes as a frozen base object; its protocol is in docs/CONTRACTS.md ("Frozen bases").

Launches: forward 2 (down projection, fused GEMM); backward 4 (du, dB, dA, fused dX), +1 for dW
and a torch reduction for db. The GEMM-shaped kernels autotune over ``gemm_configs()`` (pruned per
shape and shared-memory budget; key buckets M to a power of two so varying batches reuse tunings);
the memory-bound rank-r kernels (down projection, dA) use fixed tiles (``_rank_tiles``); under
the interpreter every kernel runs one small config. ``tests/test_aot_lora.py`` compiles the configs
for sm_80 / sm_90 and checks register spills (which is why 128×256 tiles are not offered). The
forward's and dX's K-loops have a TMA variant (``USE_TMA`` configs, Hopper, ``kernels/_tma.py``).

Dtypes: x, W in fp16 / bf16 / fp32 (the same dtype; under autocast everything is cast to the
autocast dtype first); A, B and bias are cast to x's dtype. All accumulation is fp32; fp32 dots
follow ``_common.matmul_precision``; bf16 dots under the interpreter are upcast (``UPCAST``). Any
r ≥ 1 (the r-loop runs in blocks of ≤ 64), any leading shape of x, any M, K, N ≥ 1 (tails are
clamped on load and masked on store). float64 is the reference backend's job.

Limits: tile origins are int64 but offsets inside a tile are int32, so a row stride must stay below
2³¹ / 128 elements (16.7 M); dB and dA reduce over M inside one program per output tile (no
split-K), which leaves an H100 under-filled when N·r or r·K is small and M is large.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import _tma
from ._autotune import unvalidated
from ._common import (FLOAT_DTYPES, Tuned, cap, check_device, config, dot_flags, draw_seed, dropout_keep, entry, grouped_pid,
                      interpreting, keep_mask, launch, mma)

__all__ = [
    "lora_linear", "dropout_mask", "LoraLinearFunction", "LoraFusedBaseFunction", "gemm_configs", "HOT_CONFIGS",
    "TUNED",
]

SEED_PARAMS = ["seed0", "seed1", "seed2"]


# ------------------------------------------------------------------------------------- helpers
@triton.jit
def load_k_tile(ptrs, offs_k, k_left, EVEN_K: tl.constexpr, K_AXIS: tl.constexpr):
    """One K-step's operand tile: a plain load where K is a multiple of the block (EVEN_K), else
    zeros past the ``k_left`` remaining columns (K_AXIS = 1) or rows (K_AXIS = 0)."""
    if EVEN_K:
        t = tl.load(ptrs)
    elif K_AXIS == 1:
        t = tl.load(ptrs, mask=(offs_k < k_left)[None, :], other=0.0)
    else:
        t = tl.load(ptrs, mask=(offs_k < k_left)[:, None], other=0.0)
    return t


@triton.jit
def gemm_loop(acc, P, Q, rows, cols, Kdim, stride_pm, stride_pk, stride_qk, stride_qn, alpha,
              BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, SCALE_P: tl.constexpr,
              UPCAST: tl.constexpr, PRECISION: tl.constexpr):
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
        a = load_k_tile(P + p_off, offs_k, Kdim - k0, EVEN_K=EVEN_K, K_AXIS=1)
        b = load_k_tile(Q + q_off, offs_k, Kdim - k0, EVEN_K=EVEN_K, K_AXIS=0)
        if SCALE_P:
            a = (a.to(tl.float32) * alpha).to(b.dtype)
        acc = mma(a, b, acc, UPCAST=UPCAST, PRECISION=PRECISION)
        P += BLOCK_K * stride_pk
        Q += BLOCK_K * stride_qk
    return acc


@triton.jit
def _gemm_loop_tma(acc, P, Q, Mdim, Ndim, Kdim, stride_pm, stride_qrow, m0, n0,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, Q_KMAJOR: tl.constexpr,
                   UPCAST: tl.constexpr, PRECISION: tl.constexpr):
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
        acc = mma(a, b, acc, UPCAST=UPCAST, PRECISION=PRECISION)
    return acc


@triton.jit
def tile_origin(pid_m, pid_n, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                EVEN_M: tl.constexpr, EVEN_N: tl.constexpr):
    """int64 tile origin (m0, n0), in-tile indices for loads, and global indices for stores.

    In-tile load indices are clamped to the last valid row / column, except along a dimension that
    is a multiple of its block (EVEN_M / EVEN_N): there they stay a plain ``arange``. The clamp
    hides contiguity from the compiler, so where that index runs along an operand's contiguous
    dimension (dX's W tile, dB's and dW's transposed dY tile) the loads fall back to 2-byte LDGs
    outside the cp.async pipeline (sm_90 SASS)."""
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
def _drop(x, seed, rows64, cols, ncols, p, keep_scale):
    """x̃ = keep ⊙ x / (1 - p) in x's dtype, for x at (rows64, cols) of a (·, ncols) input."""
    keep = dropout_keep(seed, rows64[:, None], cols[None, :], ncols, p)
    return tl.where(keep, x.to(tl.float32) * keep_scale, 0.0).to(x.dtype)


# ------------------------------------------------------------------------------------- kernels
@triton.jit
def _down_seg(acc, x, A, rows64, offs_r, ks, R, K, seed, p, keep_scale,
              HAS_DROPOUT: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    a = tl.load(A + offs_r[None, :].to(tl.int64) * K + ks[:, None],
                mask=(offs_r[None, :] < R) & (ks[:, None] < K), other=0.0)  # (BLOCK_K, BLOCK_R) = Aᵀ tile
    if HAS_DROPOUT:
        x = _drop(x, seed, rows64, ks, K, p, keep_scale)
    return mma(x, a, acc, UPCAST=UPCAST, PRECISION=PRECISION)


@triton.jit(do_not_specialize=SEED_PARAMS)
def _lora_down_kernel(X, A0, A1, A2, U0, U1, U2, M, K, R0, R1, R2, stride_xm,
                      seed0, seed1, seed2, p, keep_scale,
                      NUM_SEG: tl.constexpr, HAS_DROPOUT: tl.constexpr, UPCAST: tl.constexpr,
                      PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
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
        acc0 = _down_seg(acc0, x, A0, rows64, offs_r, ks, R0, K, seed0, p, keep_scale, HAS_DROPOUT=HAS_DROPOUT,
                         UPCAST=UPCAST, PRECISION=PRECISION)
        if NUM_SEG > 1:
            acc1 = _down_seg(acc1, x, A1, rows64, offs_r, ks, R1, K, seed1, p, keep_scale, HAS_DROPOUT=HAS_DROPOUT,
                             UPCAST=UPCAST, PRECISION=PRECISION)
        if NUM_SEG > 2:
            acc2 = _down_seg(acc2, x, A2, rows64, offs_r, ks, R2, K, seed2, p, keep_scale, HAS_DROPOUT=HAS_DROPOUT,
                             UPCAST=UPCAST, PRECISION=PRECISION)
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
                     UPCAST: tl.constexpr, PRECISION: tl.constexpr, TMA_OK: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
                     GROUP_M: tl.constexpr, USE_TMA: tl.constexpr = False):
    """y = x Wᵀ + s · u Bᵀ + b, one (BLOCK_M, BLOCK_N) tile per program.

    K-loop over x (M × K) and W (N × K), then an r-loop over u (M × r) and B (N × r) into the same
    fp32 accumulator (u scaled by s in registers), then the bias; one rounding to y's dtype.
    BASE_IN: y already holds the base product (a quantized weight's); the K-loop is skipped and the
    tile is read from Y and updated in place. USE_TMA (a config; compiled in only where TMA_OK, see
    ``_tma.addressable``): the K-loop through TMA tensor descriptors.
    Backward: ``_lora_dx_kernel`` (dX), ``_matmul_kernel`` (du, dB, dW), ``_lora_dA_kernel`` (dA).
    """
    pid_m, pid_n = grouped_pid(tl.program_id(0), M, N, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, GROUP_M=GROUP_M)
    m0, n0, rows, cols, offs_m, offs_n = tile_origin(pid_m, pid_n, M, N, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
                                                     EVEN_M=False, EVEN_N=False)
    y_ptrs = Y + offs_m[:, None] * N + offs_n[None, :]
    y_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if BASE_IN:
        acc = tl.load(y_ptrs, mask=y_mask, other=0.0).to(tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if USE_TMA and TMA_OK:
            acc = _gemm_loop_tma(acc, X, W, M, N, K, stride_xm, K, m0, n0, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
                                 BLOCK_K=BLOCK_K, Q_KMAJOR=True, UPCAST=UPCAST, PRECISION=PRECISION)
        else:
            # W is (N, K) row-major: as the (K, N) operand, stride_qk = 1, stride_qn = K.
            acc = gemm_loop(acc, X + m0 * stride_xm, W + n0 * K, rows, cols, K, stride_xm, 1, 1, K, 1.0,
                            BLOCK_K=BLOCK_K, EVEN_K=EVEN_K, SCALE_P=False, UPCAST=UPCAST, PRECISION=PRECISION)
    acc = gemm_loop(acc, U + m0 * R, B + n0 * R, rows, cols, R, R, 1, 1, R, scaling,
                    BLOCK_K=BLOCK_R, EVEN_K=EVEN_R, SCALE_P=True, UPCAST=UPCAST, PRECISION=PRECISION)
    if HAS_BIAS:
        acc += tl.load(BIAS + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptrs, acc.to(Y.dtype.element_ty), mask=y_mask)


@triton.jit
def _dx_lowrank(acc, DU, A, m0, n0, rows, cols, offs_m, offs_n, K, R, seed, p, keep_scale,
                HAS_DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
                UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    # du (M × r) row-major; A (r × K) row-major is the (K=r, N=K) operand: stride_qk = K, stride_qn = 1.
    if HAS_DROPOUT:
        # The mask applies to the low-rank term only, so it needs its own accumulator here.
        lo = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        lo = gemm_loop(lo, DU + m0 * R, A + n0, rows, cols, R, R, 1, K, 1, 1.0, BLOCK_K=BLOCK_R, EVEN_K=False,
                       SCALE_P=False, UPCAST=UPCAST, PRECISION=PRECISION)
        keep = dropout_keep(seed, offs_m[:, None], offs_n[None, :], K, p)
        acc += tl.where(keep, lo * keep_scale, 0.0)
    else:
        acc = gemm_loop(acc, DU + m0 * R, A + n0, rows, cols, R, R, 1, K, 1, 1.0, BLOCK_K=BLOCK_R, EVEN_K=False,
                        SCALE_P=False, UPCAST=UPCAST, PRECISION=PRECISION)
    return acc


@triton.jit
def _dx_base(acc, DY, W, rows, cols, m0, n0, M, K, N, EVEN_K: tl.constexpr, TMA: tl.constexpr,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
             UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """acc += dY W for one projection: dY (M × N) row-major, W (N × K) row-major (the (N, K)
    operand: strides (K, 1)); through TMA descriptors when TMA."""
    if TMA:
        acc = _gemm_loop_tma(acc, DY, W, M, K, N, N, K, m0, n0, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
                             Q_KMAJOR=False, UPCAST=UPCAST, PRECISION=PRECISION)
    else:
        acc = gemm_loop(acc, DY + m0 * N, W + n0, rows, cols, N, N, 1, K, 1, 1.0, BLOCK_K=BLOCK_K, EVEN_K=EVEN_K,
                        SCALE_P=False, UPCAST=UPCAST, PRECISION=PRECISION)
    return acc


@triton.jit(do_not_specialize=SEED_PARAMS)
def _lora_dx_kernel(DY0, DY1, DY2, W0, W1, W2, DU0, DU1, DU2, A0, A1, A2, DX,
                    M, K, N0, N1, N2, R0, R1, R2, seed0, seed1, seed2, p, keep_scale, M_KEY,
                    NUM_SEG: tl.constexpr, HAS_W: tl.constexpr, HAS_DROPOUT: tl.constexpr, EVEN_K: tl.constexpr,
                    EVEN_OUT: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr, TMA_OK: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
                    GROUP_M: tl.constexpr, USE_TMA: tl.constexpr = False):
    """dX = Σ_i dY_i W_i + Σ_i keep_i ⊙ (du_i A_i) / (1 - p), one (BLOCK_M, BLOCK_N) tile of dX (M × K).

    dY_i (M × N_i), W_i (N_i × K), du_i = s_i dY_i B_i (M × r_i), A_i (r_i × K); here BLOCK_K tiles the
    reduction over N_i and BLOCK_N the output columns (the K of the forward). HAS_W = False (quantized
    base: its dX comes from the base's own backward) keeps only the low-rank part.
    """
    pid_m, pid_n = grouped_pid(tl.program_id(0), M, K, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, GROUP_M=GROUP_M)
    m0, n0, rows, cols, offs_m, offs_n = tile_origin(pid_m, pid_n, M, K, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
                                                     EVEN_M=False, EVEN_N=EVEN_OUT)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    TMA: tl.constexpr = USE_TMA and TMA_OK  # dY_i (M, N_i) and W_i (N_i, K) through TMA descriptors
    if HAS_W:
        acc = _dx_base(acc, DY0, W0, rows, cols, m0, n0, M, K, N0, EVEN_K=EVEN_K, TMA=TMA, BLOCK_M=BLOCK_M,
                       BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, UPCAST=UPCAST, PRECISION=PRECISION)
        if NUM_SEG > 1:
            acc = _dx_base(acc, DY1, W1, rows, cols, m0, n0, M, K, N1, EVEN_K=EVEN_K, TMA=TMA, BLOCK_M=BLOCK_M,
                           BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, UPCAST=UPCAST, PRECISION=PRECISION)
        if NUM_SEG > 2:
            acc = _dx_base(acc, DY2, W2, rows, cols, m0, n0, M, K, N2, EVEN_K=EVEN_K, TMA=TMA, BLOCK_M=BLOCK_M,
                           BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, UPCAST=UPCAST, PRECISION=PRECISION)
    acc = _dx_lowrank(acc, DU0, A0, m0, n0, rows, cols, offs_m, offs_n, K, R0, seed0, p, keep_scale,
                      HAS_DROPOUT=HAS_DROPOUT, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_R=BLOCK_R, UPCAST=UPCAST,
                      PRECISION=PRECISION)
    if NUM_SEG > 1:
        acc = _dx_lowrank(acc, DU1, A1, m0, n0, rows, cols, offs_m, offs_n, K, R1, seed1, p, keep_scale,
                          HAS_DROPOUT=HAS_DROPOUT, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_R=BLOCK_R, UPCAST=UPCAST,
                          PRECISION=PRECISION)
    if NUM_SEG > 2:
        acc = _dx_lowrank(acc, DU2, A2, m0, n0, rows, cols, offs_m, offs_n, K, R2, seed2, p, keep_scale,
                          HAS_DROPOUT=HAS_DROPOUT, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_R=BLOCK_R, UPCAST=UPCAST,
                          PRECISION=PRECISION)
    tl.store(DX + offs_m[:, None] * K + offs_n[None, :], acc.to(DX.dtype.element_ty),
             mask=(offs_m[:, None] < M) & (offs_n[None, :] < K))


@triton.jit
def _dA_seg(acc, x, DU, rows64, offs_r, ks, M, K, R, seed, p, keep_scale,
            HAS_DROPOUT: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    du_t = tl.load(DU + rows64[None, :] * R + offs_r[:, None],
                   mask=(rows64[None, :] < M) & (offs_r[:, None] < R), other=0.0)  # (BLOCK_R, BLOCK_M) = duᵀ tile
    if HAS_DROPOUT:
        x = _drop(x, seed, rows64, ks, K, p, keep_scale)
    return mma(du_t, x, acc, UPCAST=UPCAST, PRECISION=PRECISION)


@triton.jit(do_not_specialize=SEED_PARAMS)
def _lora_dA_kernel(X, DU0, DU1, DU2, DA0, DA1, DA2, M, K, R0, R1, R2, stride_xm,
                    seed0, seed1, seed2, p, keep_scale,
                    NUM_SEG: tl.constexpr, HAS_DROPOUT: tl.constexpr, UPCAST: tl.constexpr,
                    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
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
        acc0 = _dA_seg(acc0, x, DU0, rows64, offs_r, ks, M, K, R0, seed0, p, keep_scale, HAS_DROPOUT=HAS_DROPOUT,
                       UPCAST=UPCAST, PRECISION=PRECISION)
        if NUM_SEG > 1:
            acc1 = _dA_seg(acc1, x, DU1, rows64, offs_r, ks, M, K, R1, seed1, p, keep_scale, HAS_DROPOUT=HAS_DROPOUT,
                           UPCAST=UPCAST, PRECISION=PRECISION)
        if NUM_SEG > 2:
            acc2 = _dA_seg(acc2, x, DU2, rows64, offs_r, ks, M, K, R2, seed2, p, keep_scale, HAS_DROPOUT=HAS_DROPOUT,
                           UPCAST=UPCAST, PRECISION=PRECISION)
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
                   PRECISION: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """C (M × N, row-major) = alpha · P Q with P (M × K), Q (K × N) given by strides (so transposes are
    free). Backward pieces: du = s·dY B, dB = s·dYᵀ u, dW = dYᵀ x."""
    pid_m, pid_n = grouped_pid(tl.program_id(0), M, N, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, GROUP_M=GROUP_M)
    m0, n0, rows, cols, offs_m, offs_n = tile_origin(pid_m, pid_n, M, N, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
                                                     EVEN_M=EVEN_M, EVEN_N=EVEN_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc = gemm_loop(acc, P + m0 * stride_pm, Q + n0 * stride_qn, rows, cols, K, stride_pm, stride_pk, stride_qk,
                    stride_qn, 1.0, BLOCK_K=BLOCK_K, EVEN_K=EVEN_K, SCALE_P=False, UPCAST=UPCAST, PRECISION=PRECISION)
    acc = acc * alpha
    tl.store(C + offs_m[:, None] * N + offs_n[None, :], acc.to(C.dtype.element_ty),
             mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


# ------------------------------------------------------------------------------------- configs
def gemm_configs(accumulators: int = 1, dropout: bool = False, tma: bool = False) -> list:
    """Tile configs the GEMM-shaped kernels autotune over on a GPU (pruned per shape by ``prune_gemm``).

    128×256×64 and 128×128×64 with 8 warps are the large-M configs (wgmma on Hopper; 128×256×64 in
    3 stages is the tile Triton's own matmul tutorial and cuBLAS favour for large bf16 GEMMs on
    Hopper, and it compiles without spills on sm_80 / sm_90 with Triton 3.6 and 3.9); 128×64 / 64×128
    with 4 warps cover narrow outputs, 32- and 16-row tiles short or decode-sized M, and the last three
    the rank-r outputs of the backward (N = r). 4-warp 128×128 tiles spill (tests/test_aot_lora.py), so
    they are not offered. ``tma=True`` (forward and dX) adds a TMA twin behind every tile of at
    least 128×128. The SwiGLU kernel holds two accumulators (``accumulators=2``) and gets the
    half-width tiles. The dX kernel with dropout holds a second accumulator plus the Philox state of
    its tile (``dropout=True``): at most 32 elements per thread, i.e. 8 warps for 64×128 / 128×64 tiles.
    """
    table = [
        (128, 256, 64, 8, 3), (128, 128, 64, 8, 4), (128, 128, 64, 8, 3), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4),
        (64, 64, 64, 4, 4), (32, 64, 64, 4, 4), (16, 64, 128, 4, 4),
        # r-wide outputs (du = s dY B, dB = s dYᵀ u: N = r): only these survive the pruning at r <= 16,
        # and their short M tiles give the memory-bound reductions enough programs (128x64 tiles leave
        # 32-64 programs).
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
        c = config(warps, stages, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8)
        if (bm, bn) == (128, 256):  # compiled and read in SASS, never executed on a GPU yet
            unvalidated(c, "128x256 tile")
        out.append(c)
        if tma and bm * bn >= 128 * 128:
            # its TMA twin right behind it (the forward's and dX's K-loops; see ``_tma.addressable``): with
            # FASTFT_AUTOTUNE_MAX = 3 the autotuner times TMA against pointer loads on the big tile
            out.append(unvalidated(config(warps, stages, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, USE_TMA=True),
                                   "TMA loads"))
    return out


HOT_CONFIGS = 3  # the first three of gemm_configs() carry large-M training shapes: no spills allowed


def prune_gemm(m_arg: str, n_arg: str, ptr_arg: str, n_operands: int = 2):
    """The per-call pruner of a GEMM-shaped kernel whose output is (args[m_arg], args[n_arg]) and
    whose operand dtype is args[ptr_arg]'s: tiles no wider than the (bucketed) problem, within the
    shared-memory budget of the pipelined K-loop, TMA configs as pointer-load twins where TMA cannot
    run, and for dX with dropout over several projections at most 16 elements per thread."""
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
        return cap(kept)
    return prune


def even_k(args) -> bool:
    return args["K"] % args["BLOCK_K"] == 0


# One config under the interpreter: 32-wide tiles keep the Python-level loop count low while the test
# shapes (40, 96, 200, M = 1, 3, 118) still hit every tail.
INTERPRET_CONFIG = config(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=4)
_INTERPRET_PLAIN = config(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=4, USE_TMA=False)
_DX_HEURISTICS = {"EVEN_K": lambda a: all(a[n] % a["BLOCK_K"] == 0 for n in ("N0", "N1", "N2")),
                  "EVEN_OUT": lambda a: a["K"] % a["BLOCK_N"] == 0}

# The GEMM-shaped kernels' launches (autotuners built on first GPU use).
TUNED = {
    "fwd": Tuned(_lora_fwd_kernel, configs=lambda: gemm_configs(tma=True), interpret=_INTERPRET_PLAIN,
                 key=["M_KEY", "N", "K", "R", "HAS_BIAS", "BASE_IN", "TMA_OK"], prune=prune_gemm("M", "N", "X"),
                 heuristics={"EVEN_K": even_k}, restore_value=["Y"]),
    "dx": Tuned(_lora_dx_kernel, configs=lambda: gemm_configs(tma=True), interpret=_INTERPRET_PLAIN,
                key=["M_KEY", "K", "N0", "N1", "N2", "NUM_SEG", "HAS_W", "HAS_DROPOUT", "TMA_OK"],
                prune=prune_gemm("M", "K", "DX"), heuristics=_DX_HEURISTICS),
    "dx_dropout": Tuned(_lora_dx_kernel, configs=lambda: gemm_configs(dropout=True, tma=True),
                        interpret=_INTERPRET_PLAIN,
                        key=["M_KEY", "K", "N0", "N1", "N2", "NUM_SEG", "HAS_W", "HAS_DROPOUT", "TMA_OK"],
                        prune=prune_gemm("M", "K", "DX"), heuristics=_DX_HEURISTICS),
    "mm": Tuned(_matmul_kernel, configs=gemm_configs, interpret=INTERPRET_CONFIG,
                key=["M_KEY", "N", "K", "stride_pm", "stride_qk"], prune=prune_gemm("M", "N", "C"),
                heuristics={"EVEN_K": even_k, "EVEN_M": lambda a: a["M"] % a["BLOCK_M"] == 0,
                            "EVEN_N": lambda a: a["N"] % a["BLOCK_N"] == 0}),
}


def gemm_grid(M, N):
    return lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)


def _rank_tiles(num_seg: int, dropout: bool):
    """(BLOCK_M, BLOCK_K, num_warps) of the rank-r kernels (down projection, dA): memory-bound, not tuned.

    64×64 x tiles over 8 warps; with dropout over several projections (one Philox state each) the
    tile narrows to 64×32 so the accumulators stay in registers at BLOCK_R = 64
    (tests/test_aot_lora.py).
    """
    if interpreting():
        return 32, 32, 4
    return (64, 32, 8) if dropout and num_seg > 1 else (64, 64, 8)


def block_r(r: int) -> int:
    return min(64, max(16, triton.next_power_of_2(r)))


def m_key(M: int) -> int:
    return triton.next_power_of_2(M)  # bucket: varying batch sizes reuse the tuned config


# ------------------------------------------------------------------------------------- launchers
def _pad3(lst, fill):
    return list(lst) + [fill] * (3 - len(lst))


@entry("triton_lora_down", fake=lambda x2, As, seeds, p: [x2.new_empty((x2.shape[0], A.shape[0])) for A in As])
def down(x2: torch.Tensor, As: list[torch.Tensor], seeds: list[int], p: float) -> list[torch.Tensor]:
    """u_i = drop_i(x) A_iᵀ for 1-3 projections; x2 (M, K) with unit column stride."""
    M, K = x2.shape
    n = len(As)
    us = [torch.empty(M, A.shape[0], device=x2.device, dtype=x2.dtype) for A in As]
    rmax = max(A.shape[0] for A in As)
    br = block_r(rmax)
    bm, bk, warps = _rank_tiles(n, p > 0)
    Ap, Up = _pad3(As, As[0]), _pad3(us, us[0])
    Rs, Ss = _pad3([A.shape[0] for A in As], 1), _pad3(seeds, 0)
    grid = (triton.cdiv(M, bm), triton.cdiv(rmax, br))
    launch(_lora_down_kernel, grid, x2, *Ap, *Up, M, K, *Rs, x2.stride(0), *Ss, p, 1.0 / (1.0 - p) if p > 0 else 1.0,
           NUM_SEG=n, HAS_DROPOUT=p > 0, BLOCK_M=bm, BLOCK_R=br, BLOCK_K=bk, num_warps=warps, **dot_flags(x2.dtype))
    return us


def fwd(x2, W, u, B, bias, scaling, y=None):
    """y = x Wᵀ + s·u Bᵀ + b; with W None, y holds the base product and is updated in place."""
    if W is None:
        fwd_add_(x2, u, B, float(scaling), y)
        return y
    return fwd_out(x2, W, u, B, bias, float(scaling))


@entry("triton_lora_fwd", fake=lambda x2, W, u, B, bias, scaling: x2.new_empty((x2.shape[0], B.shape[0])))
def fwd_out(x2: torch.Tensor, W: torch.Tensor, u: torch.Tensor, B: torch.Tensor, bias: torch.Tensor | None,
            scaling: float) -> torch.Tensor:
    return _fwd(x2, W, u, B, bias, scaling)


@entry("triton_lora_fwd_add_", fake=lambda x2, u, B, scaling, y: None, mutates_args=("y",))
def fwd_add_(x2: torch.Tensor, u: torch.Tensor, B: torch.Tensor, scaling: float, y: torch.Tensor) -> None:
    _fwd(x2, None, u, B, None, scaling, y)


def _fwd(x2, W, u, B, bias, scaling, y=None):
    M = x2.shape[0]
    N, r = B.shape
    K = x2.shape[1]
    base_in = W is None
    if y is None:
        y = torch.empty(M, N, device=x2.device, dtype=x2.dtype)
    use_tma = not base_in and _tma.addressable(x2, W)
    if use_tma:
        _tma.ensure_allocator(x2.device)
    TUNED["fwd"][gemm_grid(M, N)](
        X=x2, W=x2 if base_in else W, U=u, B=B, BIAS=bias if bias is not None else B, Y=y, M=M, N=N, K=K, R=r,
        stride_xm=x2.stride(0), scaling=float(scaling), M_KEY=m_key(M), HAS_BIAS=bias is not None, BASE_IN=base_in,
        EVEN_R=r % block_r(r) == 0, BLOCK_R=block_r(r), TMA_OK=use_tma, **dot_flags(x2.dtype))
    return y


def matmul(P, Q, M, N, K, strides, alpha, out_dtype, device=None):
    """alpha · P Q, P (M × K) and Q (K × N) given as (tensor, strides), on P's device."""
    return mm(P, Q, int(M), int(N), int(K), [int(s) for s in strides], float(alpha), out_dtype)


@entry("triton_lora_mm", fake=lambda P, Q, M, N, K, strides, alpha, out_dtype: P.new_empty((M, N), dtype=out_dtype))
def mm(P: torch.Tensor, Q: torch.Tensor, M: int, N: int, K: int, strides: list[int], alpha: float,
       out_dtype: torch.dtype) -> torch.Tensor:
    C = torch.empty(M, N, device=P.device, dtype=out_dtype)
    spm, spk, sqk, sqn = strides
    TUNED["mm"][gemm_grid(M, N)](P=P, Q=Q, C=C, M=M, N=N, K=K, stride_pm=spm, stride_pk=spk, stride_qk=sqk,
                                 stride_qn=sqn, alpha=float(alpha), M_KEY=m_key(M), **dot_flags(P.dtype))
    return C


@entry("triton_lora_dx", fake=lambda dys, Ws, dus, As, seeds, p, M, K, dtype: dys[0].new_empty((M, K), dtype=dtype))
def _dx(dys: list[torch.Tensor], Ws: list[torch.Tensor], dus: list[torch.Tensor], As: list[torch.Tensor],
        seeds: list[int], p: float, M: int, K: int, dtype: torch.dtype) -> torch.Tensor:
    """dX = Σ dY_i W_i + drop'(Σ du_i A_i); ``Ws`` empty for a base whose dX comes from elsewhere."""
    n = len(dus)
    device = dys[0].device
    dx = torch.empty(M, K, device=device, dtype=dtype)
    has_w = len(Ws) > 0
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
                **dict(zip(SEED_PARAMS, _pad3(seeds, 0))), p=p, keep_scale=1.0 / (1.0 - p) if p > 0 else 1.0,
                M_KEY=m_key(M), NUM_SEG=n, HAS_W=has_w, HAS_DROPOUT=p > 0, BLOCK_R=block_r(rmax),
                TMA_OK=use_tma, **dot_flags(dtype))
    TUNED["dx_dropout" if p > 0 else "dx"][gemm_grid(M, K)](**args)
    return dx


@entry("triton_lora_dA", fake=lambda x2, dus, seeds, p: [x2.new_empty((d.shape[1], x2.shape[1])) for d in dus])
def _dA(x2: torch.Tensor, dus: list[torch.Tensor], seeds: list[int], p: float) -> list[torch.Tensor]:
    M, K = x2.shape
    n = len(dus)
    rs = [d.shape[1] for d in dus]
    das = [torch.empty(r, K, device=x2.device, dtype=x2.dtype) for r in rs]
    br = block_r(max(rs))
    bm, bk, warps = _rank_tiles(n, p > 0)
    grid = (triton.cdiv(K, bk), triton.cdiv(max(rs), br))
    launch(_lora_dA_kernel, grid, x2, *_pad3(dus, dus[0]), *_pad3(das, das[0]), M, K, *_pad3(rs, 1), x2.stride(0),
           *_pad3(seeds, 0), p, 1.0 / (1.0 - p) if p > 0 else 1.0,
           NUM_SEG=n, HAS_DROPOUT=p > 0, BLOCK_M=bm, BLOCK_R=br, BLOCK_K=bk, num_warps=warps, **dot_flags(x2.dtype))
    return das


def backward(dys, x2, Ws, As, Bs, us, scalings, p, seeds, need_dx, need_dW, need_dA, need_dB):
    """Shared LoRA backward for 1-3 projections of one x. dys: list of (M, N_i) contiguous.

    Returns (dx, dWs, dAs, dBs); entries not needed are None. Ws is None for a frozen base the
    kernels do not read (its dX comes from the base).
    """
    M, K = x2.shape
    dev, dt = x2.device, x2.dtype
    n = len(dys)
    dus = None
    if need_dx or need_dA:
        # du_i = s_i · dY_i B_i  (M × r_i)
        dus = [matmul(dy, B, M, B.shape[1], B.shape[0], (dy.stride(0), 1, B.stride(0), 1), s, dt, dev)
               for dy, B, s in zip(dys, Bs, scalings)]
    dBs = [None] * n
    if need_dB:
        # dB_i = s_i · dY_iᵀ u_i  (N_i × r_i): P = dY_iᵀ via strides (1, N_i)
        dBs = [matmul(dy, u, dy.shape[1], u.shape[1], M, (1, dy.stride(0), u.stride(0), 1), s, dt, dev)
               for dy, u, s in zip(dys, us, scalings)]
    dAs = _dA(x2, dus, [int(s) for s in seeds], float(p)) if need_dA else [None] * n
    dx = _dx(dys, list(Ws) if Ws is not None else [], dus, As, [int(s) for s in seeds], float(p), M, K, dt) \
        if need_dx else None
    dWs = [None] * n
    if need_dW:
        # dW_i = dY_iᵀ x  (N_i × K)
        dWs = [matmul(dy, x2, dy.shape[1], K, M, (1, dy.stride(0), x2.stride(0), 1), 1.0, dt, dev)
               for dy in dys]
    return dx, dWs, dAs, dBs


def rows2d(x):
    """x as (M, K) with a unit column stride (a view when possible)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


# ------------------------------------------------------------------------------------- checks
def check(x, weights, As, Bs, biases, p, name="lora_linear"):
    """The op's argument checks (one clear error per problem), for 1-3 projections of one x."""
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        raise ValueError(f"{name}: x must be a tensor (..., in_features)")
    if x.dtype not in FLOAT_DTYPES:
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
    check_device(x.device, name)


def cast_inputs(x, weights, As, Bs, biases):
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


def dropout_mask(seed: int, shape, p: float, device="cpu") -> torch.Tensor:
    """The boolean keep mask the kernels regenerate for ``seed`` over an x of ``shape`` (…, in):
    element (m, k) of x viewed as (M, K) draws Philox counter m·K + k."""
    shape = tuple(shape)
    n = 1
    for s in shape:
        n *= s
    cols = shape[-1] if shape else 1
    return keep_mask(seed, n // cols if cols else 0, cols, p, device).view(shape)


# ------------------------------------------------------------------------------------- autograd
class LoraLinearFunction(torch.autograd.Function):
    """y = x Wᵀ + b + s·(drop(x) Aᵀ) Bᵀ (or base + s·(drop(x) Aᵀ) Bᵀ when ``base``, a frozen
    base's product with its own autograd node, is given and W is None).

    Saves x (2-D view), u and the parameters; the seed and scalars live on ctx.
    """

    @staticmethod
    def forward(ctx, x, weight, lora_A, lora_B, bias, scaling, dropout_p, seed, base):
        x2 = rows2d(x)
        N = lora_B.shape[0]
        u = down(x2, [lora_A], [int(seed)], float(dropout_p))[0]
        if base is not None:
            # Add the low-rank term onto the base's fresh output in place (no copy), unless it is a
            # view (autograd forbids modifying a custom Function's view output in place).
            if base.is_contiguous() and base._base is None:
                ctx.mark_dirty(base)
            else:
                base = base.clone(memory_format=torch.contiguous_format)
            fwd(x2, None, u, lora_B, None, scaling, y=base.view(-1, N))
            y = base
        else:
            y = fwd(x2, weight, u, lora_B, bias, scaling).view(*x.shape[:-1], N)
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
        dx, dWs, dAs, dBs = backward([dy2], x2, [W] if W is not None else None, [A], [B], [u], [ctx.scaling],
                                     ctx.p, [ctx.seed], nig[0], nig[1] and W is not None, nig[2], nig[3])
        db = dy2.sum(0, dtype=torch.float32).to(dy2.dtype) if ctx.has_bias and nig[4] else None
        dbase = dy if nig[8] else None
        dx = dx.view(ctx.x_shape) if dx is not None else None
        return dx, dWs[0], dAs[0], dBs[0], db, None, None, None, dbase


class LoraFusedBaseFunction(torch.autograd.Function):
    """A LoRA layer whose frozen base adds the low-rank term in its own kernel's epilogue (a 4-bit
    base at decode shapes: the quant decode kernel): u = drop(x) Aᵀ, then y = x Wᵀ + b + s·u Bᵀ by
    ``base.matmul_lora``. Backward: the rank side as in ``LoraLinearFunction`` (dX's low-rank part,
    dA, dB) plus the base's dX, ``base.grad_x(dY)``. Saves x, u and the adapters."""

    @staticmethod
    def forward(ctx, x, base, lora_A, lora_B, bias, scaling, dropout_p, seed):
        x2 = rows2d(x)
        u = down(x2, [lora_A], [int(seed)], float(dropout_p))[0]
        y = base.matmul_lora(x2, bias, u, lora_B, scaling)
        ctx.save_for_backward(x2, lora_A, lora_B, u)
        ctx.base = base
        ctx.scaling, ctx.p, ctx.seed, ctx.x_shape = scaling, dropout_p, seed, x.shape
        ctx.has_bias = bias is not None
        return y.view(*x.shape[:-1], lora_B.shape[0])

    @staticmethod
    def backward(ctx, dy):
        x2, A, B, u = ctx.saved_tensors
        N = B.shape[0]
        dy2 = dy.reshape(-1, N).contiguous()
        nig = ctx.needs_input_grad
        dx, _, dAs, dBs = backward([dy2], x2, None, [A], [B], [u], [ctx.scaling], ctx.p, [ctx.seed],
                                   nig[0], False, nig[2], nig[3])
        if dx is not None:
            dx = dx + ctx.base.grad_x(dy2).to(dx.dtype)
            dx = dx.view(ctx.x_shape)
        db = dy2.sum(0, dtype=torch.float32).to(dy2.dtype) if ctx.has_bias and nig[4] else None
        return dx, None, dAs[0], dBs[0], db, None, None, None


# ------------------------------------------------------------------------------------- public
def lora_linear(x, weight, lora_A, lora_B, scaling, bias=None, dropout_p=0.0, generator=None):
    """y = x Wᵀ + b + s·(drop(x) Aᵀ) Bᵀ, fused (see the module docstring). ``weight`` is a dense
    (out, in) tensor or a frozen base object (a 4-bit weight's, from ``fastft.ops.triton_backend``)."""
    dropout_p = float(dropout_p)
    check(x, [weight], [lora_A], [lora_B], [bias], dropout_p)
    x, (weight,), (A,), (B,), (bias,) = cast_inputs(x, [weight], [lora_A], [lora_B], [bias])
    dense = isinstance(weight, torch.Tensor)
    if x.numel() == 0:  # nothing to launch; keep the autograd graph (all gradients are zero)
        base = F.linear(x, weight, bias) if dense else weight.matmul(x, bias)
        return base + F.linear(F.linear(x, A), B) * scaling
    seed = draw_seed(generator) if dropout_p > 0 else 0
    with torch.autocast(x.device.type, enabled=False):
        if dense:
            return LoraLinearFunction.apply(x, weight, A, B, bias, float(scaling), dropout_p, seed, None)
        if weight.fused(x):
            # Decode-shaped rows (generation): base and low-rank term in one kernel (the base's LoRA
            # epilogue); the training-sized base stays on its own node plus the fused rank-r kernels.
            return LoraFusedBaseFunction.apply(x, weight, A, B, bias, float(scaling), dropout_p, seed)
        base = weight.matmul(x, bias)  # its own autograd: dX of the base, no dW
        return LoraLinearFunction.apply(x, None, A, B, None, float(scaling), dropout_p, seed, base)
