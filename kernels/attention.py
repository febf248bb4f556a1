"""Fused scaled-dot-product attention in Triton: FlashAttention-2, forward and backward.

Algorithm: FlashAttention-2 (Dao, "FlashAttention-2: Faster Attention with Better Parallelism and
Work Partitioning", 2023; after Dao et al., "FlashAttention", 2022). Each program owns a block of
query rows and streams key/value blocks through an online softmax kept in base 2 (log2(e) is folded
into the scale so the exponentials are ``exp2``), accumulating in fp32; it saves only the output and
the per-row log-sum-exp. The backward recomputes the probabilities from that LSE instead of storing
the T x S matrix.

Semantics (same as ``fastft.ops.reference.attention`` / ``attention_varlen``):

* ``attention(q, k, v, *, causal, scale=None, key_padding_mask=None, dropout_p=0.0, generator=None)``:
  q (B, Hq, T, D), k/v (B, Hkv, S, D), any strides with a unit last stride (otherwise copied);
  Hq % Hkv == 0: GQA/MQA by index mapping (query head h reads kv head h // (Hq/Hkv); K/V are never
  copied). ``causal`` is aligned bottom-right (query i sees keys j <= i + S - T, as when decoding
  against a KV cache); ``key_padding_mask`` (B, S) bool, True = real token, left or right padding,
  applied in-kernel. Rows that see no key output 0 and pass zero gradient.
* ``attention_varlen(q, k, v, cu_seqlens, max_seqlen, *, causal, ...)``: packed (total, H, D)
  documents delimited by ``cu_seqlens`` (n_docs + 1, starting at 0); documents never attend to
  each other; zero-length documents are fine. Same kernels, a document index in place of the batch.
* Head dims 1..256 (32, 40, 64, 80, 96, 128, 256 are the ones that matter): the head dim is padded
  to the next power of two (>= 16, ``tl.dot``'s minimum) with load masks.
* Dtypes: fp16 and bf16 (matmul operands in the input dtype, softmax and accumulators in fp32).
  fp32 inputs run the matmuls in the precision ``torch.get_float32_matmul_precision()`` asks for:
  "highest" (torch's default) -> exact fp32 FMA ("ieee", slow), otherwise TF32 tensor cores.
  Under the Triton interpreter bf16 operands are upcast to fp32 before ``tl.dot`` (Triton 3.9's
  interpreter computes bf16 dots wrongly); products of bf16 values are exact in fp32, so this only
  removes the interpreter bug.
* Dropout on the attention probabilities from an in-kernel Philox stream: element (b, h, i, j) keeps
  iff ``tl.rand(seed, ((b*Hq + h)*T + i)*S + j) >= p`` (varlen: b = 0 and i, j are packed token
  indices, T = S = total). The seed comes from ``generator`` (or torch's default CPU generator), so
  ``torch.manual_seed`` reproduces a run; ``dropout_keep_mask`` materialises the same mask for tests.
* Backward: deterministic (no atomics). One kernel computes dQ per query block (and the row sums
  Delta = rowsum(dO * O)); a second computes dK, dV per key block, looping over every query head
  of its GQA group, so the group sum happens in registers in a fixed order.
* Offsets are int64 (batch/head/row bases), so tensors past 2^31 elements are fine.
* ``T = 1`` (or any T <= 16) with GQA takes a decode path when no gradient is needed: the group's
  query heads are packed into the row dimension so each K/V block is read once per group, and the
  key range is split across programs (flash-decoding) then combined by LSE.

* Autotuning: config lists come from ``fwd_configs`` / ``dq_configs`` / ``dkdv_configs`` and are
  pruned per launch by a register model fitted to AOT compiles for sm_80 / sm_90 (no config that
  spills on the hot paths; tests/test_aot_attention.py), keyed on power-of-two length buckets, head
  dim, GQA group and the mask / dropout / varlen flags. Under the interpreter: one config.
* Causal launches start with the longest query blocks (reverse row-block order) to shorten the tail.

Limits: D <= 256; dropout_p in [0, 1); CUDA tensors, or CPU tensors under TRITON_INTERPRET=1 (tests);
batch x heads <= 65535 (grid dimension). Not yet tuned on a GPU: block shapes come from compile-time
resource checks only; no TMA / warp specialization (Hopper) yet.
"""
from __future__ import annotations

import contextlib
import functools
import math
import os

import torch
import triton
import triton.language as tl

from fastft.ops.dispatch import register

from . import _tma, _tuning

LOG2E = 1.4426950408889634


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# ------------------------------------------------------------------------------------------ helpers
@triton.jit
def _keep(seed, rows, cols, rng_base, DROP_COLS, dropout_p):
    """Dropout keep mask (True = keep) for a (rows x cols) tile of one (batch, head).

    Element (i, j) draws ``tl.rand(seed, (rng_base + i) * DROP_COLS + j)`` (Philox-4x32, one counter
    per element, so the mask is independent of the tiling and the forward and both backward kernels
    regenerate identical bits). rng_base = (b*Hq + h)*T, or h*total + doc start for varlen; int64.
    """
    offs = (rng_base + rows).to(tl.int64) * DROP_COLS + cols
    return tl.rand(seed, offs) >= dropout_p


@triton.jit
def _seq_bounds(CU, pid_b, T, S, VARLEN: tl.constexpr):
    """(q_start, k_start, T_b, S_b): where this batch entry / document lives and how long it is."""
    if VARLEN:
        start = tl.load(CU + pid_b).to(tl.int64)
        end = tl.load(CU + pid_b + 1).to(tl.int64)
        return start, start, (end - start).to(tl.int32), (end - start).to(tl.int32)
    else:
        zero = tl.zeros((), dtype=tl.int64)
        return zero, zero, T, S


# ------------------------------------------------------------------------------------------ forward
@triton.jit
def _kv_tile(base, start_n, offs_n, offs_d, stride_n, S_b, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
             MASK_N: tl.constexpr, USE_TMA: tl.constexpr):
    """The (BLOCK_N, BLOCK_D) K or V tile of keys start_n.. (rows / columns out of range read 0)."""
    if USE_TMA:
        t = base.load([start_n, 0])
    else:
        cols = start_n + offs_n
        kv_mask = None
        if MASK_N:
            kv_mask = cols[:, None] < S_b
            if HEAD_DIM != BLOCK_D:
                kv_mask = kv_mask & (offs_d[None, :] < HEAD_DIM)
        elif HEAD_DIM != BLOCK_D:
            kv_mask = offs_d[None, :] < HEAD_DIM
        ptrs = base + cols[:, None].to(tl.int64) * stride_n + offs_d[None, :]
        if MASK_N or HEAD_DIM != BLOCK_D:
            t = tl.load(ptrs, mask=kv_mask, other=0.0)
        else:  # interior block at a power-of-two head dim: no predication at all
            t = tl.load(ptrs)
    return t


@triton.jit
def _fwd_scores(q, K_base, start_n, offs_n, offs_d, stride_kn, S_b, HEAD_DIM: tl.constexpr,
                BLOCK_D: tl.constexpr, MASK_N: tl.constexpr, MM_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
                USE_TMA: tl.constexpr):
    """Raw scores q kᵀ of one key block (fp32, unscaled)."""
    k = _kv_tile(K_base, start_n, offs_n, offs_d, stride_kn, S_b, HEAD_DIM, BLOCK_D, MASK_N, USE_TMA)
    zero = tl.zeros((q.shape[0], offs_n.shape[0]), dtype=tl.float32)
    return tl.dot(q.to(MM_DTYPE), tl.trans(k).to(MM_DTYPE), zero, input_precision=PRECISION)


@triton.jit
def _fwd_update(acc, l_i, m_i, s, V_base, KPM_base, start_n, rows, offs_n, offs_d, stride_vn, S_b, causal_off,
                qk_scale, seed, dropout_p, rng_base, DROP_COLS, k_start, HEAD_DIM: tl.constexpr,
                BLOCK_D: tl.constexpr, MASK_N: tl.constexpr, MASK_CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr,
                DROPOUT: tl.constexpr, MM_DTYPE: tl.constexpr, PRECISION: tl.constexpr, SCALE_POS: tl.constexpr,
                USE_TMA: tl.constexpr):
    """The online-softmax update (base 2) with one key block's raw scores s: masks, running max and
    sum, and acc += P V. SCALE_POS (qk_scale > 0): the scale is folded into the exponent's FFMA."""
    cols = start_n + offs_n  # (BLOCK_N,)
    if not SCALE_POS:
        s = s * qk_scale  # scores in log2 units
    if MASK_N or MASK_CAUSAL or HAS_KPM:
        valid = tl.full(s.shape, 1, tl.int1)
        if MASK_N:
            valid = valid & (cols[None, :] < S_b)
        if MASK_CAUSAL:
            valid = valid & (cols[None, :] <= rows[:, None] + causal_off)
        if HAS_KPM:
            kp = tl.load(KPM_base + cols, mask=cols < S_b, other=0)
            valid = valid & (kp != 0)[None, :]
        s = tl.where(valid, s, float("-inf"))
    if SCALE_POS:
        # Raw scores: scaling by a positive number commutes with max (rounding is monotonic), so the
        # row max is scaled once per row and the exponent is one FFMA per score (s·c - m), not a
        # multiply and a subtract.
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
    else:
        m_new = tl.maximum(m_i, tl.max(s, 1))
    # A row that has seen only masked keys keeps m = -inf; shift by 0 there so exp2 gives 0, not NaN.
    m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    if SCALE_POS:
        p = tl.math.exp2(s * qk_scale - m_shift[:, None])
    else:
        p = tl.math.exp2(s - m_shift[:, None])
    alpha = tl.math.exp2(m_i - m_shift)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    if DROPOUT:
        keep = _keep(seed, rows[:, None], k_start + cols[None, :], rng_base, DROP_COLS, dropout_p)
        p = tl.where(keep, p * (1.0 / (1.0 - dropout_p)), 0.0)
    v = _kv_tile(V_base, start_n, offs_n, offs_d, stride_vn, S_b, HEAD_DIM, BLOCK_D, MASK_N, USE_TMA)
    acc = tl.dot(p.to(v.dtype).to(MM_DTYPE), v.to(MM_DTYPE), acc, input_precision=PRECISION)
    return acc, l_i, m_new


@triton.jit
def _fwd_block(acc, l_i, m_i, q, K_base, V_base, KPM_base, start_n, rows, offs_n, offs_d,
               stride_kn, stride_vn, S_b, causal_off, qk_scale, seed, dropout_p, rng_base, DROP_COLS,
               k_start, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, MASK_N: tl.constexpr,
               MASK_CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, DROPOUT: tl.constexpr,
               MM_DTYPE: tl.constexpr, PRECISION: tl.constexpr, SCALE_POS: tl.constexpr = False,
               USE_TMA: tl.constexpr = False):
    """One key block of the online softmax: scores, then the update. USE_TMA: K_base / V_base are
    tensor descriptors of the sequence's (S_b, HEAD_DIM) keys / values, loaded by the tensor
    memory accelerator on Hopper."""
    s = _fwd_scores(q, K_base, start_n, offs_n, offs_d, stride_kn, S_b, HEAD_DIM, BLOCK_D, MASK_N, MM_DTYPE,
                    PRECISION, USE_TMA)
    return _fwd_update(acc, l_i, m_i, s, V_base, KPM_base, start_n, rows, offs_n, offs_d, stride_vn, S_b,
                       causal_off, qk_scale, seed, dropout_p, rng_base, DROP_COLS, k_start, HEAD_DIM, BLOCK_D,
                       MASK_N, MASK_CAUSAL, HAS_KPM, DROPOUT, MM_DTYPE, PRECISION, SCALE_POS, USE_TMA)


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, O, LSE, KPM, CU,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om, stride_lb, stride_lh, stride_kpmb,
    H, T, S, qk_scale, seed, dropout_p, DROP_ROWS, DROP_COLS,
    T_BUCKET, S_BUCKET,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, VARLEN: tl.constexpr,
    DROPOUT: tl.constexpr, MM_DTYPE: tl.constexpr, PRECISION: tl.constexpr, SCALE_POS: tl.constexpr,
    TMA_OK: tl.constexpr, USE_TMA: tl.constexpr, PIPE: tl.constexpr = False,
):
    """O = softmax(scale * Q Kᵀ + mask) V for one (BLOCK_M rows, batch/document, query head).

    Online softmax in base 2 over key blocks j: with s = scale * log2(e) * q kᵀ,
        m' = max(m, rowmax(s_j)),  l' = l * 2^(m - m') + rowsum(2^(s_j - m')),
        acc' = acc * 2^(m - m') + 2^(s_j - m') V_j    (dropout: times keep / (1 - p) here, not in l)
    and finally O = acc / l, LSE2 = m + log2(l) (stored; +inf for rows that see no key, whose O = 0).
    Causal tile skipping: key blocks past the diagonal are never loaded; blocks fully below it run
    without mask arithmetic (loop 1), only the diagonal / ragged blocks mask (loop 2).
    """
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = pid_bh // H
    off_h = pid_bh % H
    off_hk = off_h // GROUP
    q_start, k_start, T_b, S_b = _seq_bounds(CU, off_b, T, S, VARLEN)
    if IS_CAUSAL:
        # Causal work grows with the row index: launch the heaviest (last) row blocks first so the
        # short ones fill the tail of the wave.
        pid_m = tl.num_programs(0) - 1 - pid_m
    start_m = pid_m * BLOCK_M
    if start_m >= T_b:
        return
    if VARLEN:
        bq = 0
        rng_base = off_h.to(tl.int64) * DROP_ROWS + q_start
    else:
        bq = off_b.to(tl.int64)
        rng_base = pid_bh.to(tl.int64) * DROP_ROWS
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    rows = start_m + offs_m
    Q_base = Q + bq * stride_qb + off_h.to(tl.int64) * stride_qh + q_start * stride_qm
    K_base = K + bq * stride_kb + off_hk.to(tl.int64) * stride_kh + k_start * stride_kn
    V_base = V + bq * stride_vb + off_hk.to(tl.int64) * stride_vh + k_start * stride_vn
    KPM_base = KPM + bq * stride_kpmb
    q_mask = rows[:, None] < T_b
    if HEAD_DIM != BLOCK_D:
        q_mask = q_mask & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(Q_base + rows[:, None].to(tl.int64) * stride_qm + offs_d[None, :], mask=q_mask, other=0.0)
    TMA: tl.constexpr = USE_TMA and TMA_OK  # a TMA config runs its pointer-load twin where TMA can't
    if TMA:
        # The K / V loads of the loops become TMA copies: no per-thread address arithmetic (on
        # sm_90 ~100 integer instructions of a 128 x 128 step's ~600) and no load predicates.
        K_src = tl.make_tensor_descriptor(K_base, shape=[S_b, HEAD_DIM], strides=[stride_kn, 1],
                                          block_shape=[BLOCK_N, BLOCK_D])
        V_src = tl.make_tensor_descriptor(V_base, shape=[S_b, HEAD_DIM], strides=[stride_vn, 1],
                                          block_shape=[BLOCK_N, BLOCK_D])
    else:
        K_src = K_base
        V_src = V_base

    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    causal_off = S_b - T_b  # bottom-right alignment: row i sees cols <= i + causal_off
    full_end = S_b // BLOCK_N * BLOCK_N
    hi = S_b
    if IS_CAUSAL:
        # every row of this block sees keys <= start_m + causal_off; the last row sees up to ...
        full_end = tl.minimum(full_end, tl.maximum(start_m + causal_off + 1, 0) // BLOCK_N * BLOCK_N)
        hi = tl.minimum(S_b, tl.maximum(tl.minimum(start_m + BLOCK_M, T_b) + causal_off, 0))
    if PIPE:
        # Software-pipelined interior loop: block j+1's scores are issued before block j's softmax
        # and P V, so on Hopper the asynchronous P V wgmma of block j runs while the exponentials
        # of block j+1 are computed (FlashAttention-3's intra-warpgroup overlap, by program order).
        if full_end > 0:
            s = _fwd_scores(q, K_src, 0, offs_n, offs_d, stride_kn, S_b, HEAD_DIM, BLOCK_D, False, MM_DTYPE,
                            PRECISION, TMA)
            for start_n in range(0, full_end - BLOCK_N, BLOCK_N):
                s_next = _fwd_scores(q, K_src, start_n + BLOCK_N, offs_n, offs_d, stride_kn, S_b, HEAD_DIM, BLOCK_D,
                                     False, MM_DTYPE, PRECISION, TMA)
                acc, l_i, m_i = _fwd_update(acc, l_i, m_i, s, V_src, KPM_base, start_n, rows, offs_n, offs_d,
                                            stride_vn, S_b, causal_off, qk_scale, seed, dropout_p, rng_base,
                                            DROP_COLS, k_start, HEAD_DIM, BLOCK_D, False, False, HAS_KPM, DROPOUT,
                                            MM_DTYPE, PRECISION, SCALE_POS, TMA)
                s = s_next
            acc, l_i, m_i = _fwd_update(acc, l_i, m_i, s, V_src, KPM_base, full_end - BLOCK_N, rows, offs_n, offs_d,
                                        stride_vn, S_b, causal_off, qk_scale, seed, dropout_p, rng_base, DROP_COLS,
                                        k_start, HEAD_DIM, BLOCK_D, False, False, HAS_KPM, DROPOUT, MM_DTYPE,
                                        PRECISION, SCALE_POS, TMA)
    else:
        for start_n in range(0, full_end, BLOCK_N):
            acc, l_i, m_i = _fwd_block(acc, l_i, m_i, q, K_src, V_src, KPM_base, start_n, rows, offs_n, offs_d,
                                       stride_kn, stride_vn, S_b, causal_off, qk_scale, seed, dropout_p,
                                       rng_base, DROP_COLS, k_start, HEAD_DIM, BLOCK_D, False, False, HAS_KPM,
                                       DROPOUT, MM_DTYPE, PRECISION, SCALE_POS, TMA)
    for start_n in range(full_end, hi, BLOCK_N):
        acc, l_i, m_i = _fwd_block(acc, l_i, m_i, q, K_src, V_src, KPM_base, start_n, rows, offs_n, offs_d,
                                   stride_kn, stride_vn, S_b, causal_off, qk_scale, seed, dropout_p,
                                   rng_base, DROP_COLS, k_start, HEAD_DIM, BLOCK_D, True, IS_CAUSAL, HAS_KPM,
                                   DROPOUT, MM_DTYPE, PRECISION, SCALE_POS, TMA)
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("inf"), m_i + tl.math.log2(tl.where(empty, 1.0, l_i)))
    O_base = O + bq * stride_ob + off_h.to(tl.int64) * stride_oh + q_start * stride_om
    tl.store(O_base + rows[:, None].to(tl.int64) * stride_om + offs_d[None, :], out.to(O.dtype.element_ty),
             mask=q_mask)
    L_base = LSE + bq * stride_lb + off_h.to(tl.int64) * stride_lh + q_start
    tl.store(L_base + rows, lse, mask=rows < T_b)


# ----------------------------------------------------------------------------------------- backward
@triton.jit
def _bwd_dq_block(dq, q, do, lse, delta, K_base, V_base, KPM_base, start_n, rows, offs_n, offs_d,
                  stride_kn, stride_vn, S_b, causal_off, qk_scale, seed, dropout_p, rng_base, DROP_COLS,
                  k_start, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, MASK_N: tl.constexpr,
                  MASK_CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, DROPOUT: tl.constexpr,
                  MM_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """dQ += dS K_j for one key block, with P = 2^(s - LSE2), dS = P * (dP - Delta), dP = dO Vᵀ."""
    cols = start_n + offs_n
    k = _kv_tile(K_base, start_n, offs_n, offs_d, stride_kn, S_b, HEAD_DIM, BLOCK_D, MASK_N, False)
    v = _kv_tile(V_base, start_n, offs_n, offs_d, stride_vn, S_b, HEAD_DIM, BLOCK_D, MASK_N, False)
    zero = tl.zeros((q.shape[0], cols.shape[0]), dtype=tl.float32)
    s = tl.dot(q.to(MM_DTYPE), tl.trans(k).to(MM_DTYPE), zero, input_precision=PRECISION) * qk_scale
    p = tl.math.exp2(s - lse[:, None])  # rows with no visible key have LSE = +inf -> p = 0
    if MASK_N or MASK_CAUSAL or HAS_KPM:
        valid = tl.full(s.shape, 1, tl.int1)
        if MASK_N:
            valid = valid & (cols[None, :] < S_b)
        if MASK_CAUSAL:
            valid = valid & (cols[None, :] <= rows[:, None] + causal_off)
        if HAS_KPM:
            kp = tl.load(KPM_base + cols, mask=cols < S_b, other=0)
            valid = valid & (kp != 0)[None, :]
        p = tl.where(valid, p, 0.0)  # where, not multiply: p may be inf on masked entries
    dp = tl.dot(do.to(MM_DTYPE), tl.trans(v).to(MM_DTYPE), zero, input_precision=PRECISION)
    if DROPOUT:
        keep = _keep(seed, rows[:, None], k_start + cols[None, :], rng_base, DROP_COLS, dropout_p)
        dp = tl.where(keep, dp * (1.0 / (1.0 - dropout_p)), 0.0)
    ds = p * (dp - delta[:, None])
    return tl.dot(ds.to(k.dtype).to(MM_DTYPE), k.to(MM_DTYPE), dq, input_precision=PRECISION)


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, O, DO, DQ, LSE, DELTA, KPM, CU,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om, stride_dob, stride_doh, stride_dom, stride_dqb, stride_dqh, stride_dqm,
    stride_lb, stride_lh, stride_kpmb,
    H, T, S, qk_scale, sm_scale, seed, dropout_p, DROP_ROWS, DROP_COLS,
    T_BUCKET, S_BUCKET,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, VARLEN: tl.constexpr,
    DROPOUT: tl.constexpr, MM_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    """dQ for one (BLOCK_M rows, batch/document, query head); also stores Delta = rowsum(dO * O).

    With s = scale * q kᵀ, P = softmax(s) recomputed as 2^(s log2 e - LSE2), Z the dropout keep
    mask scaled by 1/(1-p) (Z = 1 without dropout), O = (P*Z) V:
        dP = (dO Vᵀ) * Z,   Delta_i = sum_j P_ij dP_ij = dO_i . O_i,   dS = P * (dP - Delta),
        dQ = scale * dS K.
    Same key-block schedule as the forward (unmasked blocks, then diagonal / ragged ones).
    """
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = pid_bh // H
    off_h = pid_bh % H
    off_hk = off_h // GROUP
    q_start, k_start, T_b, S_b = _seq_bounds(CU, off_b, T, S, VARLEN)
    if IS_CAUSAL:
        # Causal work grows with the row index: launch the heaviest (last) row blocks first so the
        # short ones fill the tail of the wave.
        pid_m = tl.num_programs(0) - 1 - pid_m
    start_m = pid_m * BLOCK_M
    if start_m >= T_b:
        return
    if VARLEN:
        bq = 0
        rng_base = off_h.to(tl.int64) * DROP_ROWS + q_start
    else:
        bq = off_b.to(tl.int64)
        rng_base = pid_bh.to(tl.int64) * DROP_ROWS
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    rows = start_m + offs_m
    h64 = off_h.to(tl.int64)
    q_mask = rows[:, None] < T_b
    if HEAD_DIM != BLOCK_D:
        q_mask = q_mask & (offs_d[None, :] < HEAD_DIM)
    r64 = rows[:, None].to(tl.int64)
    q = tl.load(Q + bq * stride_qb + h64 * stride_qh + (q_start + r64) * stride_qm + offs_d[None, :],
                mask=q_mask, other=0.0)
    do = tl.load(DO + bq * stride_dob + h64 * stride_doh + (q_start + r64) * stride_dom + offs_d[None, :],
                 mask=q_mask, other=0.0)
    o = tl.load(O + bq * stride_ob + h64 * stride_oh + (q_start + r64) * stride_om + offs_d[None, :],
                mask=q_mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    L_off = bq * stride_lb + h64 * stride_lh + q_start + rows
    tl.store(DELTA + L_off, delta, mask=rows < T_b)
    lse = tl.load(LSE + L_off, mask=rows < T_b, other=float("inf"))

    K_base = K + bq * stride_kb + off_hk.to(tl.int64) * stride_kh + k_start * stride_kn
    V_base = V + bq * stride_vb + off_hk.to(tl.int64) * stride_vh + k_start * stride_vn
    KPM_base = KPM + bq * stride_kpmb
    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    causal_off = S_b - T_b
    full_end = S_b // BLOCK_N * BLOCK_N
    hi = S_b
    if IS_CAUSAL:
        full_end = tl.minimum(full_end, tl.maximum(start_m + causal_off + 1, 0) // BLOCK_N * BLOCK_N)
        hi = tl.minimum(S_b, tl.maximum(tl.minimum(start_m + BLOCK_M, T_b) + causal_off, 0))
    for start_n in range(0, full_end, BLOCK_N):
        dq = _bwd_dq_block(dq, q, do, lse, delta, K_base, V_base, KPM_base, start_n, rows, offs_n, offs_d,
                           stride_kn, stride_vn, S_b, causal_off, qk_scale, seed, dropout_p, rng_base,
                           DROP_COLS, k_start, HEAD_DIM, BLOCK_D, False, False, HAS_KPM, DROPOUT, MM_DTYPE,
                           PRECISION)
    for start_n in range(full_end, hi, BLOCK_N):
        dq = _bwd_dq_block(dq, q, do, lse, delta, K_base, V_base, KPM_base, start_n, rows, offs_n, offs_d,
                           stride_kn, stride_vn, S_b, causal_off, qk_scale, seed, dropout_p, rng_base,
                           DROP_COLS, k_start, HEAD_DIM, BLOCK_D, True, IS_CAUSAL, HAS_KPM, DROPOUT, MM_DTYPE,
                           PRECISION)
    dq = dq * sm_scale
    tl.store(DQ + bq * stride_dqb + h64 * stride_dqh + (q_start + r64) * stride_dqm + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=q_mask)


@triton.jit
def _bwd_dkdv_block(dk, dv, k, v, Q_base, DO_base, L_base, D_base, start_m, cols, offs_m, offs_d,
                    stride_qm, stride_dom, T_b, causal_off, qk_scale, seed, dropout_p, rng_base, DROP_COLS,
                    k_start, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, MASK_CAUSAL: tl.constexpr,
                    DROPOUT: tl.constexpr, MM_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """dV += (P*Z)ᵀ dO and dK += dSᵀ Q for one query block, computed transposed (keys as rows).

    Rows past T_b load Q = dO = 0, Delta = 0 and LSE = +inf, so their P is 0 without masking; key
    columns past S_b (or padded) are garbage here but only reach their own dK/dV row, which the
    caller drops (or zeroes).
    """
    rows = start_m + offs_m  # (BLOCK_M,)
    q_mask = rows[:, None] < T_b
    if HEAD_DIM != BLOCK_D:
        q_mask = q_mask & (offs_d[None, :] < HEAD_DIM)
    r64 = rows[:, None].to(tl.int64)
    q = tl.load(Q_base + r64 * stride_qm + offs_d[None, :], mask=q_mask, other=0.0)
    do = tl.load(DO_base + r64 * stride_dom + offs_d[None, :], mask=q_mask, other=0.0)
    lse = tl.load(L_base + rows, mask=rows < T_b, other=float("inf"))
    delta = tl.load(D_base + rows, mask=rows < T_b, other=0.0)
    zero = tl.zeros((cols.shape[0], rows.shape[0]), dtype=tl.float32)
    # (BLOCK_N, BLOCK_M): keys as rows, so dK/dV accumulate without transposes
    sT = tl.dot(k.to(MM_DTYPE), tl.trans(q).to(MM_DTYPE), zero, input_precision=PRECISION) * qk_scale
    pT = tl.math.exp2(sT - lse[None, :])
    if MASK_CAUSAL:
        pT = tl.where(cols[:, None] <= rows[None, :] + causal_off, pT, 0.0)
    dpT = tl.dot(v.to(MM_DTYPE), tl.trans(do).to(MM_DTYPE), zero, input_precision=PRECISION)
    if DROPOUT:
        keepT = _keep(seed, rows[None, :], k_start + cols[:, None], rng_base, DROP_COLS, dropout_p)
        inv = 1.0 / (1.0 - dropout_p)
        pdT = tl.where(keepT, pT * inv, 0.0).to(do.dtype)
        dv = tl.dot(pdT.to(MM_DTYPE), do.to(MM_DTYPE), dv, input_precision=PRECISION)
        dpT = tl.where(keepT, dpT * inv, 0.0)
    else:
        dv = tl.dot(pT.to(do.dtype).to(MM_DTYPE), do.to(MM_DTYPE), dv, input_precision=PRECISION)
    dsT = pT * (dpT - delta[None, :])
    dk = tl.dot(dsT.to(q.dtype).to(MM_DTYPE), q.to(MM_DTYPE), dk, input_precision=PRECISION)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV, LSE, DELTA, KPM, CU,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom, stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn,
    stride_lb, stride_lh, stride_kpmb,
    H, T, S, qk_scale, sm_scale, seed, dropout_p, DROP_ROWS, DROP_COLS,
    T_BUCKET, S_BUCKET,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, VARLEN: tl.constexpr,
    DROPOUT: tl.constexpr, MM_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    """dK, dV for one (BLOCK_N keys, batch/document, kv head), summed over the GQA group.

        dV_j = sum_{h in group} sum_i (P*Z)_ij dO_i,     dK_j = scale * sum_h sum_i dS_ij Q_i
    with P, Z, dS as in the dQ kernel (Delta comes from it). The group's query heads are visited in
    order inside this program: deterministic, no atomics. Causal: query blocks that cannot see these
    keys are skipped; only blocks straddling the diagonal mask. Padded keys get dK = dV = 0.
    """
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    HKV = H // GROUP
    off_b = pid_bh // HKV
    off_hk = pid_bh % HKV
    q_start, k_start, T_b, S_b = _seq_bounds(CU, off_b, T, S, VARLEN)
    start_n = pid_n * BLOCK_N
    if start_n >= S_b:
        return
    if VARLEN:
        bq = 0
    else:
        bq = off_b.to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    cols = start_n + offs_n
    c64 = cols[:, None].to(tl.int64)
    kv_mask = cols[:, None] < S_b
    if HEAD_DIM != BLOCK_D:
        kv_mask = kv_mask & (offs_d[None, :] < HEAD_DIM)
    hk64 = off_hk.to(tl.int64)
    k = tl.load(K + bq * stride_kb + hk64 * stride_kh + (k_start + c64) * stride_kn + offs_d[None, :],
                mask=kv_mask, other=0.0)
    v = tl.load(V + bq * stride_vb + hk64 * stride_vh + (k_start + c64) * stride_vn + offs_d[None, :],
                mask=kv_mask, other=0.0)
    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    causal_off = S_b - T_b
    lo = 0
    full_start = 0
    if IS_CAUSAL:
        # first query row that sees key start_n, and first block whose rows all see the whole key block
        lo = tl.maximum(start_n - causal_off, 0) // BLOCK_M * BLOCK_M
        full_start = (tl.maximum(start_n + BLOCK_N - 1 - causal_off, 0) + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    mid = tl.maximum(tl.minimum(full_start, T_b), lo)
    # The GQA group and the query blocks are walked as one flat loop (head-major, so the sum over the
    # group has a fixed order): a nested per-head loop makes the software pipeliner keep a second
    # set of prefetch buffers live and spills at D = 128 (tests/test_aot_attention.py).
    n_diag = (mid - lo + BLOCK_M - 1) // BLOCK_M  # query blocks straddling the diagonal (masked)
    n_full = (T_b - mid + BLOCK_M - 1) // BLOCK_M  # query blocks that see the whole key block
    # Every address this loop forms stays inside Q / dO / LSE / Delta for ANY value of ``it``, not only
    # for the iterations that run: the software pipeliner issues the loads of iterations past the end
    # (and of the first iteration of a loop that runs zero times) with only their own masks, which
    # cover rows, not heads. So the head index is clamped to the group and the divisor is never 0.
    # (The first H200 run, Triton 3.6, hit an illegal address in this kernel on every non-causal
    # backward; these bounds are the out-of-range addressing found by reading it. Unconfirmed on a
    # GPU yet: benchmarks/gpu_check.sh runs the non-causal cases first thing.)
    diag_div = tl.maximum(n_diag, 1)
    full_div = tl.maximum(n_full, 1)
    for it in range(0, GROUP * n_diag):
        g = tl.minimum(it // diag_div, GROUP - 1)
        start_m = lo + (it - g * n_diag) * BLOCK_M
        h64 = (off_hk * GROUP + g).to(tl.int64)
        if VARLEN:
            rng_base = h64 * DROP_ROWS + q_start
        else:
            rng_base = (off_b * H).to(tl.int64) * DROP_ROWS + h64 * DROP_ROWS
        L_base = bq * stride_lb + h64 * stride_lh + q_start
        dk, dv = _bwd_dkdv_block(dk, dv, k, v, Q + bq * stride_qb + h64 * stride_qh + q_start * stride_qm,
                                 DO + bq * stride_dob + h64 * stride_doh + q_start * stride_dom,
                                 LSE + L_base, DELTA + L_base, start_m, cols, offs_m, offs_d, stride_qm, stride_dom,
                                 T_b, causal_off, qk_scale, seed, dropout_p, rng_base, DROP_COLS, k_start,
                                 HEAD_DIM, BLOCK_D, True, DROPOUT, MM_DTYPE, PRECISION)
    for it in range(0, GROUP * n_full):
        g = tl.minimum(it // full_div, GROUP - 1)
        start_m = mid + (it - g * n_full) * BLOCK_M
        h64 = (off_hk * GROUP + g).to(tl.int64)
        if VARLEN:
            rng_base = h64 * DROP_ROWS + q_start
        else:
            rng_base = (off_b * H).to(tl.int64) * DROP_ROWS + h64 * DROP_ROWS
        L_base = bq * stride_lb + h64 * stride_lh + q_start
        dk, dv = _bwd_dkdv_block(dk, dv, k, v, Q + bq * stride_qb + h64 * stride_qh + q_start * stride_qm,
                                 DO + bq * stride_dob + h64 * stride_doh + q_start * stride_dom,
                                 LSE + L_base, DELTA + L_base, start_m, cols, offs_m, offs_d, stride_qm, stride_dom,
                                 T_b, causal_off, qk_scale, seed, dropout_p, rng_base, DROP_COLS, k_start,
                                 HEAD_DIM, BLOCK_D, False, DROPOUT, MM_DTYPE, PRECISION)
    dk = dk * sm_scale
    if HAS_KPM:
        kp = tl.load(KPM + bq * stride_kpmb + cols, mask=cols < S_b, other=0)
        dk = tl.where((kp != 0)[:, None], dk, 0.0)
        dv = tl.where((kp != 0)[:, None], dv, 0.0)
    tl.store(DK + bq * stride_dkb + hk64 * stride_dkh + (k_start + c64) * stride_dkn + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + bq * stride_dvb + hk64 * stride_dvh + (k_start + c64) * stride_dvn + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=kv_mask)


# ------------------------------------------------------------------------------------------- decode
@triton.jit
def _attn_decode_kernel(
    Q, K, V, OP, LP, KPM,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_kpmb, Hkv, T, S, qk_scale, chunk, NUM_SPLITS,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr,
    MM_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    """Split-KV forward for a few query rows (flash-decoding): one program per (key chunk, batch,
    kv head). Its rows are all GROUP*T (query head, position) pairs of the GQA group, so each K/V
    block is loaded once per group, not once per query head. Writes per-split normalised partial
    outputs OP and base-2 LSEs LP (-inf when a row sees no key of the chunk); ``_attn_combine_kernel``
    merges them: O = sum_s 2^(LSE_s - LSE) O_s with LSE = log2 sum_s 2^LSE_s.
    """
    pid_s = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // Hkv).to(tl.int64)
    off_hk = pid_bh % Hkv
    r = tl.arange(0, BLOCK_M)
    pos = r % T  # query position of row r; its head is off_hk * GROUP + r // T
    head = (off_hk * GROUP + r // T).to(tl.int64)
    row_ok = r < GROUP * T
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q_mask = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(Q + off_b * stride_qb + head[:, None] * stride_qh + pos[:, None].to(tl.int64) * stride_qm
                + offs_d[None, :], mask=q_mask, other=0.0)
    K_base = K + off_b * stride_kb + off_hk.to(tl.int64) * stride_kh
    V_base = V + off_b * stride_vb + off_hk.to(tl.int64) * stride_vh
    KPM_base = KPM + off_b * stride_kpmb
    lo = pid_s * chunk
    hi = tl.minimum(lo + chunk, S)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    causal_off = S - T
    full_end = hi
    if IS_CAUSAL:
        full_end = lo  # T > 1 with a causal mask: every block masks (the rows see different prefixes)
    full_end = lo + (full_end - lo) // BLOCK_N * BLOCK_N
    for start_n in range(lo, full_end, BLOCK_N):
        acc, l_i, m_i = _fwd_block(acc, l_i, m_i, q, K_base, V_base, KPM_base, start_n, pos, offs_n, offs_d,
                                   stride_kn, stride_vn, hi, causal_off, qk_scale, 0, 0.0, 0, 0, 0, HEAD_DIM,
                                   BLOCK_D, False, False, HAS_KPM, False, MM_DTYPE, PRECISION)
    for start_n in range(full_end, hi, BLOCK_N):
        acc, l_i, m_i = _fwd_block(acc, l_i, m_i, q, K_base, V_base, KPM_base, start_n, pos, offs_n, offs_d,
                                   stride_kn, stride_vn, hi, causal_off, qk_scale, 0, 0.0, 0, 0, 0, HEAD_DIM,
                                   BLOCK_D, True, IS_CAUSAL, HAS_KPM, False, MM_DTYPE, PRECISION)
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), m_i + tl.math.log2(tl.where(empty, 1.0, l_i)))
    base = (pid_bh * NUM_SPLITS + pid_s).to(tl.int64) * BLOCK_M
    tl.store(OP + (base + r[:, None]) * BLOCK_D + offs_d[None, :], out)
    tl.store(LP + base + r, lse)


@triton.jit
def _attn_combine_kernel(OP, LP, O, stride_ob, stride_oh, stride_om, Hkv, T, NUM_SPLITS,
                         GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                         BLOCK_M: tl.constexpr):
    """O = sum_s 2^(LSE_s - LSE) O_s over the key splits; rows that saw no key anywhere get 0."""
    pid_bh = tl.program_id(0)
    off_b = (pid_bh // Hkv).to(tl.int64)
    off_hk = pid_bh % Hkv
    r = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    for sp in range(NUM_SPLITS):
        m = tl.maximum(m, tl.load(LP + (pid_bh * NUM_SPLITS + sp).to(tl.int64) * BLOCK_M + r))
    m_shift = tl.where(m == float("-inf"), 0.0, m)
    den = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for sp in range(NUM_SPLITS):
        base = (pid_bh * NUM_SPLITS + sp).to(tl.int64) * BLOCK_M
        w = tl.math.exp2(tl.load(LP + base + r) - m_shift)
        den += w
        acc += w[:, None] * tl.load(OP + (base + r[:, None]) * BLOCK_D + offs_d[None, :])
    out = acc / tl.where(den == 0.0, 1.0, den)[:, None]
    pos = (r % T).to(tl.int64)
    head = (off_hk * GROUP + r // T).to(tl.int64)
    mask = (r[:, None] < GROUP * T) & (offs_d[None, :] < HEAD_DIM)
    tl.store(O + off_b * stride_ob + head[:, None] * stride_oh + pos[:, None] * stride_om + offs_d[None, :],
             out.to(O.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------------ dropout mask (tests)
@triton.jit
def _dropout_mask_kernel(OUT, seed, dropout_p, ROWS, COLS, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """OUT[r, c] = keep flag of Philox offset r * COLS + c (r = (b*H + h)*T + i), as in the kernels."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    keep = _keep(seed, rows[:, None], cols[None, :], 0, COLS, dropout_p)
    mask = (rows[:, None] < ROWS) & (cols[None, :] < COLS)
    tl.store(OUT + rows[:, None].to(tl.int64) * COLS + cols[None, :], keep.to(tl.int8), mask=mask)


# -------------------------------------------------------------------------------- configs, autotune
def _cfg(bm, bn, w, s, **extra):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, **extra}, num_warps=w, num_stages=s)


def fwd_configs(interpret: bool | None = None) -> list:
    """Forward autotune space (pruned per call by ``prune_configs``; TMA variants only where
    ``tma_eligible``, software-pipelined ones only where ``PIPE_SM90`` says they compile clean).
    Under the interpreter one config: its cost is per block step, so large blocks keep tests fast,
    and BLOCK_M != BLOCK_N keeps the tile-skipping arithmetic honest."""
    if _interpreting() if interpret is None else interpret:
        return [_cfg(64, 32, 4, 1, USE_TMA=False, PIPE=False)]
    # With FASTFT_AUTOTUNE_MAX = 3 the autotuner times the first three that survive pruning: on an
    # H200 at D <= 128 the 128 x 128 pointer-load tile and the software-pipelined 128 x 64 tile with
    # pointer loads and with TMA.
    # TMA (sm_90+, see tma_eligible): compiled for sm_90 (D = 128, bf16), a 128 x 128 step is 504 /
    # 638 instructions (interior / masked) with Triton 3.9 against 624 / 785 with pointer loads, 196
    # registers against 240; Triton 3.6's TMA loops are larger, so there the timing decides.
    # PIPE: the interior loop issues block j+1's Q Kᵀ before block j's softmax, so the P V wgmma
    # of block j overlaps the next block's exponentials (see _attn_fwd_kernel).
    return [_cfg(bm, bn, w, s, USE_TMA=tma, PIPE=pipe) for bm, bn, w, s, tma, pipe in [
        (128, 128, 8, 3, False, False), (128, 64, 8, 3, False, True), (128, 64, 8, 3, True, True),
        (128, 64, 8, 3, False, False), (128, 128, 8, 3, True, False), (128, 64, 8, 3, True, False),
        (64, 64, 4, 3, False, False), (128, 128, 8, 2, False, False), (128, 64, 4, 3, False, False),
        (64, 32, 4, 3, False, False), (64, 64, 8, 2, False, False), (64, 32, 8, 3, False, False),
        (16, 64, 4, 3, False, False),
    ]]


# (BLOCK_M, BLOCK_N, warps, stages, TMA) of the software-pipelined forward that compile on sm_90
# without spills at head dims <= 128 in bf16 / fp16 with causal masking and key padding (Triton 3.6
# and 3.9; tests/test_aot_attention.py). Its second score tile costs BLOCK_M x BLOCK_N registers:
# every 128 x 128 variant spilled with Triton 3.9 (64-496 bytes) or overflowed shared memory (TMA,
# 3 stages: 262 KB); dropout's Philox state is not offered the extra tile either.
PIPE_SM90 = {(128, 64, 8, 3, False), (128, 64, 8, 3, True)}


def dq_configs(interpret: bool | None = None) -> list:
    """dQ kernel space: many query rows per program, narrow key blocks (it holds Q, dO, dQ)."""
    if _interpreting() if interpret is None else interpret:
        return [_cfg(64, 32, 4, 1)]
    return [_cfg(bm, bn, w, s) for bm, bn, w, s in [
        (128, 64, 8, 3), (128, 32, 8, 3), (64, 64, 4, 3), (64, 32, 4, 3), (64, 64, 8, 2), (64, 32, 8, 3),
        (16, 64, 4, 3),
    ]]


def dkdv_configs(interpret: bool | None = None) -> list:
    """dK/dV kernel space: many keys per program (it holds K, V, dK, dV), narrow query blocks."""
    if _interpreting() if interpret is None else interpret:
        return [_cfg(32, 64, 4, 1)]
    return [_cfg(bm, bn, w, s) for bm, bn, w, s in [
        (32, 128, 8, 3), (64, 128, 8, 3), (64, 64, 4, 3), (32, 64, 4, 3), (32, 64, 8, 3), (16, 32, 8, 2),
        (16, 64, 4, 3),
    ]]


# Per-thread fp32 registers a config needs for its live tiles, and the most that compiled without
# spills on sm_80 and sm_90 (calibrated with tests/test_aot_attention.py, FASTFT_AOT_ALL=1): the
# forward holds acc (M x D, fp32), Q (M x D) and S/P (M x N); dQ holds dQ, Q, dO and S, dP; dK/dV
# holds dK, dV (N x D, fp32), K, V and S, dP (N x M). Register allocation is not linear in these
# terms, so the limits below are fitted to compiles, and conservative.
_REG_LIMIT = {"fwd": 128, "dq": 160, "dkdv": 224}
_REG_LIMIT_D256 = {"fwd": 104, "dq": 144, "dkdv": 200}  # Hopper's wgmma layouts at D = 256
# With dropout the Philox rounds keep several words per score element live (dQ, which also holds
# dP, the most): extra words per element and the limit that compiled without spills.
_DROPOUT_WORDS = {"fwd": 2, "dq": 4, "dkdv": 2}
_REG_LIMIT_DROPOUT = {"fwd": 90, "dq": 120, "dkdv": 120}


def _reg_estimate(kind: str, bm: int, bn: int, warps: int, block_d: int, elem_bytes: int,
                  dropout: bool = False) -> float:
    half = elem_bytes / 4  # registers per element of an input-dtype tile
    if kind == "fwd":
        words = bm * block_d + bm * block_d * half + bm * bn
    elif kind == "dq":
        words = bm * block_d + 2 * bm * block_d * half + 2 * bm * bn
    else:
        words = 2 * bn * block_d + 2 * bn * block_d * half + 2 * bm * bn
    if dropout:  # Philox-4x32 state and int64 counters per score element
        words += _DROPOUT_WORDS[kind] * bm * bn
    return words / (32 * warps)


# Hopper (sm_90 and later): 128 x 128 forward tiles at D <= 128 compile to 238-248 registers with no
# spills (Triton 3.6 and 3.9; they spill 8-80 bytes on sm_80), so the forward may try them there.
# The first H200 run measured the 128 x 64 forward at 381-445 TFLOP/s (D = 128, T >= 4k); the
# autotuner now times the wider tile beside it.
_REG_LIMIT_SM90 = {"fwd": 160}


def _reg_limit(kind: str, block_d: int, elem_bytes: int, dropout: bool = False, arch: int | None = None) -> float:
    limit = _REG_LIMIT_D256[kind] if block_d >= 256 else _REG_LIMIT[kind]
    if arch is not None and arch >= 90 and kind in _REG_LIMIT_SM90 and block_d <= 128 and elem_bytes == 2:
        limit = max(limit, _REG_LIMIT_SM90[kind])
    if dropout:
        limit = min(limit, _REG_LIMIT_DROPOUT[kind])
    if elem_bytes == 4:  # fp32: exact ("ieee") dots are FMA loops with far more live registers
        limit = limit / 3
    return limit


def prune_configs(configs, block_d: int, t_bucket: int = 1 << 20, s_bucket: int = 1 << 20, *,
                  kind: str = "fwd", elem_bytes: int = 2, dropout: bool = False, arch: int | None = None):
    """Drop configs whose tiles would spill registers at this head dim (see ``_REG_LIMIT``; ``arch``,
    e.g. 90, the GPU's compute capability, None for the portable limits) or that are wider than the
    (bucketed) sequence lengths; keep at least the cheapest one."""
    keep = []
    limit = _reg_limit(kind, block_d, elem_bytes, dropout, arch)
    for c in configs:
        bm, bn = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
        if bm > max(16, t_bucket) or bn > max(16, s_bucket):
            continue
        if c.kwargs.get("PIPE"):  # measured compiles, not the estimate (see PIPE_SM90)
            if ((arch or 0) >= 90 and elem_bytes == 2 and not dropout and block_d <= 128
                    and (bm, bn, c.num_warps, c.num_stages, bool(c.kwargs.get("USE_TMA"))) in PIPE_SM90):
                keep.append(c)
            continue
        if _reg_estimate(kind, bm, bn, c.num_warps, block_d, elem_bytes, dropout) > limit:
            continue
        keep.append(c)
    if not keep:
        plain = [c for c in configs if not c.kwargs.get("PIPE")] or configs
        keep = [min(plain, key=lambda c: _reg_estimate(kind, c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"],
                                                       c.num_warps, block_d, elem_bytes, dropout))]
    return keep


def tma_eligible(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the forward's TMA variant may run on these tensors (``_tma.addressable`` K and V:
    every head dim fastft supports gives that for contiguous and (B, S, H, D)-view layouts)."""
    return _tma.addressable(k, v)


def _pruner(kind):
    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        if kind == "fwd" and not args.get("TMA_OK", False):
            # (a pipelined TMA tile's pointer twin may spill: its twin is plain)
            configs = _tma.plain_twins(configs, reset=("PIPE",))
        return _tuning.cap(prune_configs(configs, int(args["BLOCK_D"]), int(args["T_BUCKET"]), int(args["S_BUCKET"]),
                                         kind=kind, elem_bytes=args["Q"].element_size(),
                                         dropout=bool(args["DROPOUT"]), arch=_arch(args["Q"].device)))
    return prune


def _arch(device) -> int | None:
    """Compute capability as 80 / 90 / ... for a CUDA device; None elsewhere (the interpreter)."""
    if device.type != "cuda":
        return None
    return _capability(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> int:
    major, minor = torch.cuda.get_device_capability(index)
    return 10 * major + minor


_TUNE_KEY = ["T_BUCKET", "S_BUCKET", "GROUP", "HEAD_DIM", "IS_CAUSAL", "HAS_KPM", "VARLEN", "DROPOUT"]
# TMA_OK (a constexpr: where it is False the TMA code is compiled out of every config) is in the
# forward's key, so that tensors the TMA cannot address are tuned among the pointer-load configs.
_attn_fwd = triton.autotune(fwd_configs(), key=_TUNE_KEY + ["TMA_OK"],
                            prune_configs_by={"early_config_prune": _pruner("fwd")})(
    _attn_fwd_kernel)
_attn_bwd_dq = triton.autotune(dq_configs(), key=_TUNE_KEY, prune_configs_by={"early_config_prune": _pruner("dq")})(
    _attn_bwd_dq_kernel)
_attn_bwd_dkdv = triton.autotune(dkdv_configs(), key=_TUNE_KEY,
                                 prune_configs_by={"early_config_prune": _pruner("dkdv")})(_attn_bwd_dkdv_kernel)


@contextlib.contextmanager
def use_configs(fwd=None, dq=None, dkdv=None, fwd_tma=False, fwd_pipe=False):
    """Run the kernels with the given ``(BLOCK_M, BLOCK_N)`` instead of autotuning (tests exercise
    tile shapes other than the interpreter's default, and the forward's TMA and software-pipelined
    variants with ``fwd_tma`` / ``fwd_pipe``; benchmarks pin a config). Not thread-safe."""
    saved = []
    try:
        for tuner, shape in ((_attn_fwd, fwd), (_attn_bwd_dq, dq), (_attn_bwd_dkdv, dkdv)):
            if shape is not None:
                saved.append((tuner, tuner.configs))
                extra = {"USE_TMA": fwd_tma, "PIPE": fwd_pipe} if tuner is _attn_fwd else {}
                tuner.configs = [_cfg(shape[0], shape[1], 4, 1 if _interpreting() else 3, **extra)]
        yield
    finally:
        for tuner, configs in saved:
            tuner.configs = configs


def _bucket(n: int) -> int:
    """Autotune key for a length: next power of two (>= 16), so varying batches share configs."""
    return max(16, triton.next_power_of_2(max(int(n), 1)))


# ---------------------------------------------------------------------------------------- launchers
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256


def _check_device(t: torch.Tensor, what: str) -> None:
    if t.device.type == "cuda":
        return
    if t.device.type == "cpu" and _interpreting():
        return
    raise ValueError(
        f"{what}: the Triton attention kernels need CUDA tensors (or CPU tensors under TRITON_INTERPRET=1); "
        f"got {t.device}. Use FASTFT_BACKEND=reference or move the tensors to a GPU."
    )


def _check_common(q, k, v, dropout_p, scale, what):
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"{what}: q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})")
    if q.dtype not in _DTYPES:
        raise TypeError(f"{what}: dtype {q.dtype} is not supported (float16, bfloat16, float32)")
    if not (q.device == k.device == v.device):
        raise ValueError(f"{what}: q, k, v are on different devices ({q.device}, {k.device}, {v.device})")
    _check_device(q, what)
    D = q.shape[-1]
    if not 1 <= D <= MAX_HEAD_DIM:
        raise ValueError(f"{what}: head dim {D} is not supported (1..{MAX_HEAD_DIM})")
    if not (0.0 <= float(dropout_p) < 1.0):
        raise ValueError(f"{what}: dropout_p must be in [0, 1), got {dropout_p}")
    if scale is not None and not math.isfinite(float(scale)):
        raise ValueError(f"{what}: scale must be finite, got {scale}")


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _precision(dtype) -> str:
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


def _mm_dtype(dtype):
    """Operand dtype of every tl.dot. Triton 3.9's interpreter computes bf16 dots wrongly, so there
    bf16 tiles are upcast to fp32 first (exact: bf16 values are fp32 values with a shorter mantissa)."""
    if dtype == torch.bfloat16:
        return tl.float32 if _interpreting() else tl.bfloat16
    return tl.float16 if dtype == torch.float16 else tl.float32


def _dropout_seed(generator) -> int:
    """A Philox seed drawn from ``generator`` (or torch's default CPU generator): reproducible
    under torch.manual_seed, no device synchronisation for the default case."""
    if generator is not None:
        return int(torch.randint(0, 2**31 - 1, (), generator=generator, device=generator.device).item())
    return int(torch.randint(0, 2**31 - 1, ()).item())


class _Problem:
    """Strided 4-D views (batch-or-1, H, L, D) of the inputs plus the launch-wide scalars.

    Dense: q/k/v are the (B, H, T|S, D) tensors. Varlen: the (total, H, D) tensors are viewed as
    (1, H, total, D) (no copy) and the batch stride is 0: the kernels read each document's start from
    cu_seqlens instead.
    """

    def __init__(self, q, k, v, kpm, cu, max_seqlen, causal, scale, dropout_p, seed):
        self.varlen = cu is not None
        if self.varlen:
            self.q4, self.k4, self.v4 = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
            self.nb = cu.numel() - 1
            self.T = self.S = int(max_seqlen)
            total = q.shape[0]
            self.drop_rows = self.drop_cols = total
        else:
            self.q4, self.k4, self.v4 = q, k, v
            self.nb = q.shape[0]
            self.T, self.S = q.shape[2], k.shape[2]
            self.drop_rows, self.drop_cols = self.T, self.S
        self.H, self.Hkv, self.D = self.q4.shape[1], self.k4.shape[1], self.q4.shape[3]
        self.group = self.H // self.Hkv
        self.block_d = max(16, triton.next_power_of_2(self.D))
        self.causal, self.dropout_p, self.seed = bool(causal), float(dropout_p), int(seed)
        self.sm_scale = 1.0 / math.sqrt(self.D) if scale is None else float(scale)
        self.kpm, self.cu = kpm, cu
        dev = q.device
        self._dummy = torch.empty(1, dtype=torch.int32, device=dev)  # stands in for absent KPM / CU
        if self.nb * self.H > 65535:
            raise ValueError(f"attention: batch x heads = {self.nb * self.H} exceeds the CUDA grid limit 65535")

    def lse_like(self):
        L = self.q4.shape[2]
        return torch.empty(self.q4.shape[0], self.H, L, dtype=torch.float32, device=self.q4.device)

    def strides4(self, t4):
        return (0 if self.varlen else t4.stride(0)), t4.stride(1), t4.stride(2)

    def lse_strides(self, lse):
        return (0 if self.varlen else lse.stride(0)), lse.stride(1)

    def kpm_args(self):
        if self.kpm is None:
            return self._dummy, 0
        return self.kpm, self.kpm.stride(0)

    def common_constexprs(self):
        dt = self.q4.dtype
        return dict(
            GROUP=self.group, HEAD_DIM=self.D, BLOCK_D=self.block_d, IS_CAUSAL=self.causal,
            HAS_KPM=self.kpm is not None, VARLEN=self.varlen, DROPOUT=self.dropout_p > 0.0,
            MM_DTYPE=_mm_dtype(dt), PRECISION=_precision(dt),
        )


def _forward(p: _Problem):
    q4, k4, v4 = p.q4, p.k4, p.v4
    o4 = torch.empty_like(q4)
    lse = p.lse_like()
    kpm, s_kpm = p.kpm_args()
    cu = p.cu if p.cu is not None else p._dummy
    tma_ok = tma_eligible(q4, k4, v4)
    if tma_ok:
        _tma.ensure_allocator(q4.device)
    grid = lambda meta: (triton.cdiv(p.T, meta["BLOCK_M"]), p.nb * p.H)  # noqa: E731
    _attn_fwd[grid](
        q4, k4, v4, o4, lse, kpm, cu,
        *p.strides4(q4), *p.strides4(k4), *p.strides4(v4), *p.strides4(o4), *p.lse_strides(lse), s_kpm,
        p.H, p.T, p.S, p.sm_scale * LOG2E, p.seed, p.dropout_p, p.drop_rows, p.drop_cols,
        _bucket(p.T), _bucket(p.S),
        SCALE_POS=p.sm_scale > 0, TMA_OK=tma_ok, **p.common_constexprs(),
    )
    return o4, lse


def _backward(p: _Problem, o4, lse, do4):
    q4, k4, v4 = p.q4, p.k4, p.v4
    dq4, dk4, dv4 = torch.empty_like(q4), torch.empty_like(k4), torch.empty_like(v4)
    delta = torch.empty_like(lse)
    kpm, s_kpm = p.kpm_args()
    cu = p.cu if p.cu is not None else p._dummy
    scalars = (p.H, p.T, p.S, p.sm_scale * LOG2E, p.sm_scale, p.seed, p.dropout_p, p.drop_rows, p.drop_cols,
               _bucket(p.T), _bucket(p.S))
    grid_q = lambda meta: (triton.cdiv(p.T, meta["BLOCK_M"]), p.nb * p.H)  # noqa: E731
    _attn_bwd_dq[grid_q](
        q4, k4, v4, o4, do4, dq4, lse, delta, kpm, cu,
        *p.strides4(q4), *p.strides4(k4), *p.strides4(v4), *p.strides4(o4), *p.strides4(do4),
        *p.strides4(dq4), *p.lse_strides(lse), s_kpm,
        *scalars, **p.common_constexprs(),
    )
    grid_k = lambda meta: (triton.cdiv(p.S, meta["BLOCK_N"]), p.nb * p.Hkv)  # noqa: E731
    _attn_bwd_dkdv[grid_k](
        q4, k4, v4, do4, dk4, dv4, lse, delta, kpm, cu,
        *p.strides4(q4), *p.strides4(k4), *p.strides4(v4), *p.strides4(do4), *p.strides4(dk4),
        *p.strides4(dv4), *p.lse_strides(lse), s_kpm,
        *scalars, **p.common_constexprs(),
    )
    return dq4, dk4, dv4


DECODE_MAX_ROWS = 64  # GROUP * T rows per decode program (one tile of query rows)


def _num_sms(device) -> int:
    if device.type != "cuda":
        return 4  # interpreter: a few splits, enough to exercise the combine
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _decode(q, k, v, kpm, causal, scale):
    """Forward-only split-KV attention for T * GROUP <= DECODE_MAX_ROWS (generation with a cache)."""
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    group = Hq // Hkv
    block_m = max(16, triton.next_power_of_2(group * T))
    block_d = max(16, triton.next_power_of_2(D))
    block_n = 32 if (block_d >= 256 or _interpreting()) else 64
    # Enough programs to fill the GPU twice over, each with at least a few key blocks of work.
    n_blocks = triton.cdiv(S, block_n)
    splits = max(1, min(triton.cdiv(2 * _num_sms(q.device), B * Hkv), triton.cdiv(n_blocks, 4), 128))
    chunk = triton.cdiv(n_blocks, splits) * block_n
    splits = triton.cdiv(S, chunk)
    op = torch.empty(B * Hkv, splits, block_m, block_d, dtype=torch.float32, device=q.device)
    lp = torch.empty(B * Hkv, splits, block_m, dtype=torch.float32, device=q.device)
    kpm_t = kpm if kpm is not None else torch.zeros(1, dtype=torch.uint8, device=q.device)
    sm_scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    cx = dict(GROUP=group, HEAD_DIM=D, BLOCK_D=block_d, BLOCK_M=block_m)
    _attn_decode_kernel[(splits, B * Hkv)](
        q, k, v, op, lp, kpm_t, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), kpm_t.stride(0), Hkv, T, S, sm_scale * LOG2E, chunk, splits,
        BLOCK_N=block_n, IS_CAUSAL=bool(causal) and T > 1, HAS_KPM=kpm is not None, MM_DTYPE=_mm_dtype(q.dtype),
        PRECISION=_precision(q.dtype), num_warps=4, num_stages=1 if _interpreting() else 3, **cx,
    )
    o = torch.empty_like(q)
    _attn_combine_kernel[(B * Hkv,)](op, lp, o, o.stride(0), o.stride(1), o.stride(2), Hkv, T, splits, **cx,
                                     num_warps=4)
    return o


# ---------------------------------------------------------------------------------- autograd
class AttentionFunction(torch.autograd.Function):
    """Fused attention with a recompute backward. Dense when ``cu_seqlens`` is None, else varlen
    (q/k/v are then (total, H, D)). ``seed`` fixes the dropout stream for forward and backward."""

    @staticmethod
    def forward(ctx, q, k, v, key_padding_mask, cu_seqlens, max_seqlen, causal, scale, dropout_p, seed):
        q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
        p = _Problem(q, k, v, key_padding_mask, cu_seqlens, max_seqlen, causal, scale, dropout_p, seed)
        o4, lse = _forward(p)
        ctx.save_for_backward(q, k, v, o4, lse, key_padding_mask, cu_seqlens)
        ctx.args = (max_seqlen, causal, scale, dropout_p, seed)
        return o4.squeeze(0).transpose(0, 1) if p.varlen else o4

    @staticmethod
    def backward(ctx, do):
        q, k, v, o4, lse, kpm, cu = ctx.saved_tensors
        p = _Problem(q, k, v, kpm, cu, *ctx.args)
        do = _unit_last(do)
        do4 = do.transpose(0, 1).unsqueeze(0) if p.varlen else do
        dq4, dk4, dv4 = _backward(p, o4, lse, do4)
        if p.varlen:
            dq4, dk4, dv4 = (t.squeeze(0).transpose(0, 1) for t in (dq4, dk4, dv4))
        return dq4, dk4, dv4, None, None, None, None, None, None, None


# ---------------------------------------------------------------------------------- public entry
@register("attention", "triton")
def attention(q, k, v, *, causal, scale=None, key_padding_mask=None, dropout_p=0.0, generator=None):
    """softmax(q kᵀ · scale + mask) v with FlashAttention-2 kernels; see the module docstring.

    q (B, Hq, T, D), k/v (B, Hkv, S, D) -> (B, Hq, T, D) in q's dtype (and q's memory layout).
    """
    what = "attention"
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"{what} expects q (B, Hq, T, D) and k, v (B, Hkv, S, D); got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    B, Hq, T, D = q.shape
    if k.shape != v.shape:
        raise ValueError(f"{what}: k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape")
    if k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"{what}: k/v batch or head dim {tuple(k.shape)} does not match q {tuple(q.shape)}")
    Hkv, S = k.shape[1], k.shape[2]
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"{what}: query heads ({Hq}) must be a multiple of key/value heads ({Hkv})")
    _check_common(q, k, v, dropout_p, scale, what)
    kpm = None
    if key_padding_mask is not None:
        if tuple(key_padding_mask.shape) != (B, S):
            raise ValueError(f"{what}: key_padding_mask must be (B, S) = ({B}, {S}), "
                             f"got {tuple(key_padding_mask.shape)}")
        if key_padding_mask.device != q.device:
            raise ValueError(f"{what}: key_padding_mask is on {key_padding_mask.device}, q on {q.device}")
        kpm = key_padding_mask.to(torch.bool).contiguous().view(torch.uint8)
    if q.numel() == 0:
        return q.clone()
    if S == 0:  # no keys: every row sees nothing -> 0 (the empty sum keeps q in the graph)
        return torch.zeros_like(q) + q[..., :0].sum()
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if not needs_grad and dropout_p == 0.0 and T * (Hq // Hkv) <= DECODE_MAX_ROWS:
        return _decode(q, k, v, kpm, causal, scale)
    seed = _dropout_seed(generator) if dropout_p > 0.0 else 0
    return AttentionFunction.apply(q, k, v, kpm, None, None, causal, scale, float(dropout_p), seed)


@register("attention_varlen", "triton")
def attention_varlen(q, k, v, cu_seqlens, max_seqlen, *, causal, scale=None, dropout_p=0.0, generator=None):
    """Attention over packed documents (total, H, D) delimited by ``cu_seqlens``; see module docstring."""
    what = "attention_varlen"
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(f"{what} expects q (total, Hq, D), k/v (total, Hkv, D); got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape != v.shape or k.shape[0] != q.shape[0] or k.shape[2] != q.shape[2]:
        raise ValueError(f"{what}: k {tuple(k.shape)} / v {tuple(v.shape)} do not match q {tuple(q.shape)}")
    Hq, Hkv = q.shape[1], k.shape[1]
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"{what}: query heads ({Hq}) must be a multiple of key/value heads ({Hkv})")
    _check_common(q, k, v, dropout_p, scale, what)
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"{what}: cu_seqlens must be a 1-D tensor with at least 2 entries")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{what}: cu_seqlens must be int32 or int64, got {cu_seqlens.dtype}")
    cu_host = cu_seqlens.tolist()  # one small sync; validation here saves an out-of-bounds read later
    lens = [b - a for a, b in zip(cu_host, cu_host[1:])]
    if cu_host[0] != 0 or cu_host[-1] != q.shape[0] or min(lens) < 0:
        raise ValueError(f"{what}: cu_seqlens {cu_host} must start at 0, be non-decreasing and end at "
                         f"total={q.shape[0]}")
    if max(lens) > max_seqlen:
        raise ValueError(f"{what}: a document ({max(lens)} tokens) is longer than max_seqlen={max_seqlen}")
    if q.shape[0] == 0:  # only empty documents
        return q.clone()
    cu = cu_seqlens.to(device=q.device, dtype=torch.int32).contiguous()
    seed = _dropout_seed(generator) if dropout_p > 0.0 else 0
    return AttentionFunction.apply(q, k, v, None, cu, max(lens), causal, scale, float(dropout_p), seed)


def dropout_keep_mask(seed: int, B: int, H: int, T: int, S: int, dropout_p: float, device) -> torch.Tensor:
    """The kernels' dropout keep mask for ``seed`` as a (B, H, T, S) bool tensor (tests, debugging).

    Varlen runs use the mask of ``B = 1, T = S = total`` indexed by packed token positions.
    """
    rows, cols = B * H * T, S
    out = torch.empty(max(rows, 1), max(cols, 1), dtype=torch.int8, device=device)
    if rows and cols:
        BR, BC = 64, 64
        grid = (triton.cdiv(rows, BR), triton.cdiv(cols, BC))
        _dropout_mask_kernel[grid](out, int(seed), float(dropout_p), rows, cols, BLOCK_R=BR, BLOCK_C=BC)
    return out[:rows, :cols].reshape(B, H, T, S).bool()
