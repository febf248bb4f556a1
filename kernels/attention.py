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
  fp32 inputs run the matmuls at ``_common.matmul_precision`` (IEEE fp32 unless torch's fp32
  matmul precision allows TF32). Under the interpreter bf16 operands are upcast to fp32 before each
  dot (``UPCAST``: Triton 3.9's interpreter computes bf16 dots wrongly; products of bf16 values
  are exact in fp32, so this only removes the interpreter bug).
* Dropout on the attention probabilities from an in-kernel Philox stream: element (b, h, i, j) keeps
  iff ``tl.rand(seed, ((b*Hq + h)*T + i)*S + j) >= p`` (varlen: b = 0 and i, j are packed token
  indices, T = S = total). The seed comes from ``generator`` (or torch's default CPU generator), so
  ``torch.manual_seed`` reproduces a run; ``dropout_keep_mask`` materialises the same mask for tests.
* Backward: deterministic (no atomics). One kernel computes dQ per query block (and the row sums
  Delta = rowsum(dO * O)); a second computes dK, dV per key block, looping over every query head
  of its GQA group, so the group sum happens in registers in a fixed order.
* Offsets are int64 (batch/head/row bases), so tensors past 2^31 elements are fine.
* Forward-only calls with a few query rows per KV group (generation) have their own split-KV kernel,
  ``kernels/attention_decode.py``, which reuses this file's forward block (``fwd_block``);
  ``fastft.ops.triton_backend`` picks it.
* Autotuning: ``kernels/attention_configs.py`` (config lists pruned per launch by a register model
  fitted to AOT compiles for sm_80 / sm_90; keys bucket the lengths to powers of two). On Hopper the
  forward offers TMA loads of K / V (``USE_TMA``, where ``tma_eligible``) and a software-pipelined
  interior loop (``PIPE``). Under the interpreter: one config. Causal launches start with the
  longest query blocks (reverse row-block order) to shorten the tail.

Limits: D <= 256; dropout_p in [0, 1); CUDA tensors, or CPU tensors under TRITON_INTERPRET=1 (tests);
batch x heads <= 65535 (grid dimension). No warp specialization."""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import _tma
from ._common import FLOAT_DTYPES, Tuned, check_device, dot_flags, draw_seed, dropout_keep, entry, keep_mask, mma
from .attention_configs import (INTERPRET_DKDV, INTERPRET_DQ, INTERPRET_FWD, TUNE_KEY, bucket, dkdv_configs,
                                dq_configs, fwd_configs, pruner)

LOG2E = 1.4426950408889634
MAX_HEAD_DIM = 256


# ------------------------------------------------------------------------------------------ helpers
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
                BLOCK_D: tl.constexpr, MASK_N: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                USE_TMA: tl.constexpr):
    """Raw scores q kᵀ of one key block (fp32, unscaled)."""
    k = _kv_tile(K_base, start_n, offs_n, offs_d, stride_kn, S_b, HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D, MASK_N=MASK_N,
                 USE_TMA=USE_TMA)
    zero = tl.zeros((q.shape[0], offs_n.shape[0]), dtype=tl.float32)
    return mma(q, tl.trans(k), zero, UPCAST=UPCAST, PRECISION=PRECISION)


@triton.jit
def _fwd_update(acc, l_i, m_i, s, V_base, KPM_base, start_n, rows, offs_n, offs_d, stride_vn, S_b, causal_off,
                qk_scale, seed, dropout_p, rng_base, DROP_COLS, k_start, HEAD_DIM: tl.constexpr,
                BLOCK_D: tl.constexpr, MASK_N: tl.constexpr, MASK_CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr,
                DROPOUT: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr, SCALE_POS: tl.constexpr,
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
        keep = dropout_keep(seed, rng_base + rows[:, None], k_start + cols[None, :], DROP_COLS, dropout_p)
        p = tl.where(keep, p * (1.0 / (1.0 - dropout_p)), 0.0)
    v = _kv_tile(V_base, start_n, offs_n, offs_d, stride_vn, S_b, HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D, MASK_N=MASK_N,
                 USE_TMA=USE_TMA)
    acc = mma(p.to(v.dtype), v, acc, UPCAST=UPCAST, PRECISION=PRECISION)
    return acc, l_i, m_new


@triton.jit
def fwd_block(acc, l_i, m_i, q, K_base, V_base, KPM_base, start_n, rows, offs_n, offs_d,
               stride_kn, stride_vn, S_b, causal_off, qk_scale, seed, dropout_p, rng_base, DROP_COLS,
               k_start, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, MASK_N: tl.constexpr,
               MASK_CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, DROPOUT: tl.constexpr,
               UPCAST: tl.constexpr, PRECISION: tl.constexpr, SCALE_POS: tl.constexpr = False,
               USE_TMA: tl.constexpr = False):
    """One key block of the online softmax: scores, then the update. USE_TMA: K_base / V_base are
    tensor descriptors of the sequence's (S_b, HEAD_DIM) keys / values, loaded by the tensor
    memory accelerator on Hopper."""
    s = _fwd_scores(q, K_base, start_n, offs_n, offs_d, stride_kn, S_b, HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D,
                    MASK_N=MASK_N, UPCAST=UPCAST, PRECISION=PRECISION, USE_TMA=USE_TMA)
    return _fwd_update(acc, l_i, m_i, s, V_base, KPM_base, start_n, rows, offs_n, offs_d, stride_vn, S_b,
                       causal_off, qk_scale, seed, dropout_p, rng_base, DROP_COLS, k_start, HEAD_DIM=HEAD_DIM,
                       BLOCK_D=BLOCK_D, MASK_N=MASK_N, MASK_CAUSAL=MASK_CAUSAL, HAS_KPM=HAS_KPM, DROPOUT=DROPOUT,
                       UPCAST=UPCAST, PRECISION=PRECISION, SCALE_POS=SCALE_POS, USE_TMA=USE_TMA)


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, O, LSE, KPM, CU,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om, stride_lb, stride_lh, stride_kpmb,
    H, T, S, qk_scale, seed, dropout_p, DROP_ROWS, DROP_COLS,
    T_BUCKET, S_BUCKET,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, VARLEN: tl.constexpr,
    DROPOUT: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr, SCALE_POS: tl.constexpr,
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
    q_start, k_start, T_b, S_b = _seq_bounds(CU, off_b, T, S, VARLEN=VARLEN)
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
            s = _fwd_scores(q, K_src, 0, offs_n, offs_d, stride_kn, S_b, HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D,
                            MASK_N=False, UPCAST=UPCAST, PRECISION=PRECISION, USE_TMA=TMA)
            for start_n in range(0, full_end - BLOCK_N, BLOCK_N):
                s_next = _fwd_scores(q, K_src, start_n + BLOCK_N, offs_n, offs_d, stride_kn, S_b, HEAD_DIM=HEAD_DIM,
                                     BLOCK_D=BLOCK_D, MASK_N=False, UPCAST=UPCAST, PRECISION=PRECISION, USE_TMA=TMA)
                acc, l_i, m_i = _fwd_update(acc, l_i, m_i, s, V_src, KPM_base, start_n, rows, offs_n, offs_d,
                                            stride_vn, S_b, causal_off, qk_scale, seed, dropout_p, rng_base,
                                            DROP_COLS, k_start, HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D, MASK_N=False,
                                            MASK_CAUSAL=False, HAS_KPM=HAS_KPM, DROPOUT=DROPOUT, UPCAST=UPCAST,
                                            PRECISION=PRECISION, SCALE_POS=SCALE_POS, USE_TMA=TMA)
                s = s_next
            acc, l_i, m_i = _fwd_update(acc, l_i, m_i, s, V_src, KPM_base, full_end - BLOCK_N, rows, offs_n, offs_d,
                                        stride_vn, S_b, causal_off, qk_scale, seed, dropout_p, rng_base, DROP_COLS,
                                        k_start, HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D, MASK_N=False, MASK_CAUSAL=False,
                                        HAS_KPM=HAS_KPM, DROPOUT=DROPOUT, UPCAST=UPCAST, PRECISION=PRECISION,
                                        SCALE_POS=SCALE_POS, USE_TMA=TMA)
    else:
        for start_n in range(0, full_end, BLOCK_N):
            acc, l_i, m_i = fwd_block(acc, l_i, m_i, q, K_src, V_src, KPM_base, start_n, rows, offs_n, offs_d,
                                      stride_kn, stride_vn, S_b, causal_off, qk_scale, seed, dropout_p,
                                      rng_base, DROP_COLS, k_start, HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D, MASK_N=False,
                                      MASK_CAUSAL=False, HAS_KPM=HAS_KPM, DROPOUT=DROPOUT, UPCAST=UPCAST,
                                      PRECISION=PRECISION, SCALE_POS=SCALE_POS, USE_TMA=TMA)
    for start_n in range(full_end, hi, BLOCK_N):
        acc, l_i, m_i = fwd_block(acc, l_i, m_i, q, K_src, V_src, KPM_base, start_n, rows, offs_n, offs_d,
                                  stride_kn, stride_vn, S_b, causal_off, qk_scale, seed, dropout_p,
                                  rng_base, DROP_COLS, k_start, HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D, MASK_N=True,
                                  MASK_CAUSAL=IS_CAUSAL, HAS_KPM=HAS_KPM, DROPOUT=DROPOUT, UPCAST=UPCAST,
                                  PRECISION=PRECISION, SCALE_POS=SCALE_POS, USE_TMA=TMA)
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
                  UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """dQ += dS K_j for one key block, with P = 2^(s - LSE2), dS = P * (dP - Delta), dP = dO Vᵀ."""
    cols = start_n + offs_n
    k = _kv_tile(K_base, start_n, offs_n, offs_d, stride_kn, S_b, HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D, MASK_N=MASK_N,
                 USE_TMA=False)
    v = _kv_tile(V_base, start_n, offs_n, offs_d, stride_vn, S_b, HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D, MASK_N=MASK_N,
                 USE_TMA=False)
    zero = tl.zeros((q.shape[0], cols.shape[0]), dtype=tl.float32)
    s = mma(q, tl.trans(k), zero, UPCAST=UPCAST, PRECISION=PRECISION) * qk_scale
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
    dp = mma(do, tl.trans(v), zero, UPCAST=UPCAST, PRECISION=PRECISION)
    if DROPOUT:
        keep = dropout_keep(seed, rng_base + rows[:, None], k_start + cols[None, :], DROP_COLS, dropout_p)
        dp = tl.where(keep, dp * (1.0 / (1.0 - dropout_p)), 0.0)
    ds = p * (dp - delta[:, None])
    return mma(ds.to(k.dtype), k, dq, UPCAST=UPCAST, PRECISION=PRECISION)


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
    DROPOUT: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
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
    q_start, k_start, T_b, S_b = _seq_bounds(CU, off_b, T, S, VARLEN=VARLEN)
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
                           DROP_COLS, k_start, HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D, MASK_N=False, MASK_CAUSAL=False,
                           HAS_KPM=HAS_KPM, DROPOUT=DROPOUT, UPCAST=UPCAST, PRECISION=PRECISION)
    for start_n in range(full_end, hi, BLOCK_N):
        dq = _bwd_dq_block(dq, q, do, lse, delta, K_base, V_base, KPM_base, start_n, rows, offs_n, offs_d,
                           stride_kn, stride_vn, S_b, causal_off, qk_scale, seed, dropout_p, rng_base,
                           DROP_COLS, k_start, HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D, MASK_N=True, MASK_CAUSAL=IS_CAUSAL,
                           HAS_KPM=HAS_KPM, DROPOUT=DROPOUT, UPCAST=UPCAST, PRECISION=PRECISION)
    dq = dq * sm_scale
    tl.store(DQ + bq * stride_dqb + h64 * stride_dqh + (q_start + r64) * stride_dqm + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=q_mask)


@triton.jit
def _bwd_dkdv_block(dk, dv, k, v, Q_base, DO_base, L_base, D_base, start_m, cols, offs_m, offs_d,
                    stride_qm, stride_dom, T_b, causal_off, qk_scale, seed, dropout_p, rng_base, DROP_COLS,
                    k_start, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, MASK_CAUSAL: tl.constexpr,
                    DROPOUT: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
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
    sT = mma(k, tl.trans(q), zero, UPCAST=UPCAST, PRECISION=PRECISION) * qk_scale
    pT = tl.math.exp2(sT - lse[None, :])
    if MASK_CAUSAL:
        pT = tl.where(cols[:, None] <= rows[None, :] + causal_off, pT, 0.0)
    dpT = mma(v, tl.trans(do), zero, UPCAST=UPCAST, PRECISION=PRECISION)
    if DROPOUT:
        keepT = dropout_keep(seed, rng_base + rows[None, :], k_start + cols[:, None], DROP_COLS, dropout_p)
        inv = 1.0 / (1.0 - dropout_p)
        pdT = tl.where(keepT, pT * inv, 0.0).to(do.dtype)
        dv = mma(pdT, do, dv, UPCAST=UPCAST, PRECISION=PRECISION)
        dpT = tl.where(keepT, dpT * inv, 0.0)
    else:
        dv = mma(pT.to(do.dtype), do, dv, UPCAST=UPCAST, PRECISION=PRECISION)
    dsT = pT * (dpT - delta[None, :])
    dk = mma(dsT.to(q.dtype), q, dk, UPCAST=UPCAST, PRECISION=PRECISION)
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
    DROPOUT: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
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
    q_start, k_start, T_b, S_b = _seq_bounds(CU, off_b, T, S, VARLEN=VARLEN)
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
                                 HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D, MASK_CAUSAL=True, DROPOUT=DROPOUT,
                                 UPCAST=UPCAST, PRECISION=PRECISION)
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
                                 HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D, MASK_CAUSAL=False, DROPOUT=DROPOUT,
                                 UPCAST=UPCAST, PRECISION=PRECISION)
    dk = dk * sm_scale
    if HAS_KPM:
        kp = tl.load(KPM + bq * stride_kpmb + cols, mask=cols < S_b, other=0)
        dk = tl.where((kp != 0)[:, None], dk, 0.0)
        dv = tl.where((kp != 0)[:, None], dv, 0.0)
    tl.store(DK + bq * stride_dkb + hk64 * stride_dkh + (k_start + c64) * stride_dkn + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + bq * stride_dvb + hk64 * stride_dvh + (k_start + c64) * stride_dvn + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=kv_mask)


# -------------------------------------------------------------------------------- launch settings
# TMA_OK (a constexpr: where it is False the TMA code is compiled out of every config) is in the
# forward's key, so that tensors the TMA cannot address are tuned among the pointer-load configs.
ATTN_FWD = Tuned(_attn_fwd_kernel, configs=fwd_configs, key=TUNE_KEY + ["TMA_OK"], interpret=INTERPRET_FWD,
                 prune=pruner("fwd"))
ATTN_DQ = Tuned(_attn_bwd_dq_kernel, configs=dq_configs, key=TUNE_KEY, interpret=INTERPRET_DQ, prune=pruner("dq"))
ATTN_DKDV = Tuned(_attn_bwd_dkdv_kernel, configs=dkdv_configs, key=TUNE_KEY, interpret=INTERPRET_DKDV,
                  prune=pruner("dkdv"))


def tma_eligible(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the forward's TMA variant may run on these tensors (``_tma.addressable`` K and V:
    every head dim fastft supports gives that for contiguous and (B, S, H, D)-view layouts)."""
    return _tma.addressable(k, v)


# ---------------------------------------------------------------------------------------- launchers
def check_common(q, k, v, dropout_p, scale, what):
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"{what}: q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})")
    if q.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{what}: dtype {q.dtype} is not supported (float16, bfloat16, float32)")
    if not (q.device == k.device == v.device):
        raise ValueError(f"{what}: q, k, v are on different devices ({q.device}, {k.device}, {v.device})")
    check_device(q.device, what)
    D = q.shape[-1]
    if not 1 <= D <= MAX_HEAD_DIM:
        raise ValueError(f"{what}: head dim {D} is not supported (1..{MAX_HEAD_DIM})")
    if not (0.0 <= float(dropout_p) < 1.0):
        raise ValueError(f"{what}: dropout_p must be in [0, 1), got {dropout_p}")
    if scale is not None and not math.isfinite(float(scale)):
        raise ValueError(f"{what}: scale must be finite, got {scale}")


def check_dense(q, k, v, key_padding_mask, dropout_p, scale, what="attention"):
    """The dense op's argument checks; returns the key padding mask as the kernels read it (uint8
    (B, S) contiguous) or None."""
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
    check_common(q, k, v, dropout_p, scale, what)
    if key_padding_mask is None:
        return None
    if tuple(key_padding_mask.shape) != (B, S):
        raise ValueError(f"{what}: key_padding_mask must be (B, S) = ({B}, {S}), "
                         f"got {tuple(key_padding_mask.shape)}")
    if key_padding_mask.device != q.device:
        raise ValueError(f"{what}: key_padding_mask is on {key_padding_mask.device}, q on {q.device}")
    return key_padding_mask.to(torch.bool).contiguous().view(torch.uint8)


def unit_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


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
        return dict(
            GROUP=self.group, HEAD_DIM=self.D, BLOCK_D=self.block_d, IS_CAUSAL=self.causal,
            HAS_KPM=self.kpm is not None, VARLEN=self.varlen, DROPOUT=self.dropout_p > 0.0,
            **dot_flags(self.q4.dtype),
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
    ATTN_FWD[grid](
        q4, k4, v4, o4, lse, kpm, cu,
        *p.strides4(q4), *p.strides4(k4), *p.strides4(v4), *p.strides4(o4), *p.lse_strides(lse), s_kpm,
        p.H, p.T, p.S, p.sm_scale * LOG2E, p.seed, p.dropout_p, p.drop_rows, p.drop_cols,
        bucket(p.T), bucket(p.S),
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
               bucket(p.T), bucket(p.S))
    grid_q = lambda meta: (triton.cdiv(p.T, meta["BLOCK_M"]), p.nb * p.H)  # noqa: E731
    ATTN_DQ[grid_q](
        q4, k4, v4, o4, do4, dq4, lse, delta, kpm, cu,
        *p.strides4(q4), *p.strides4(k4), *p.strides4(v4), *p.strides4(o4), *p.strides4(do4),
        *p.strides4(dq4), *p.lse_strides(lse), s_kpm,
        *scalars, **p.common_constexprs(),
    )
    grid_k = lambda meta: (triton.cdiv(p.S, meta["BLOCK_N"]), p.nb * p.Hkv)  # noqa: E731
    ATTN_DKDV[grid_k](
        q4, k4, v4, do4, dk4, dv4, lse, delta, kpm, cu,
        *p.strides4(q4), *p.strides4(k4), *p.strides4(v4), *p.strides4(do4), *p.strides4(dk4),
        *p.strides4(dv4), *p.lse_strides(lse), s_kpm,
        *scalars, **p.common_constexprs(),
    )
    return dq4, dk4, dv4


# ----------------------------------------------------------------------------- entry points
def _views4(q, k, v, cu):
    """The (batch-or-1, H, L, D) views the kernels address (``_Problem``)."""
    if cu is None:
        return q, k, v
    return tuple(t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))


def _attn_fwd_fake(q, k, v, kpm, cu, max_seqlen, causal, scale, dropout_p, seed):
    q4 = _views4(q, k, v, cu)[0]
    return torch.empty_like(q4), q4.new_empty((q4.shape[0], q4.shape[1], q4.shape[2]), dtype=torch.float32)


@entry("triton_attn_fwd", fake=_attn_fwd_fake)
def attn_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kpm: torch.Tensor | None, cu: torch.Tensor | None,
             max_seqlen: int, causal: bool, scale: float | None, dropout_p: float,
             seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(o4, lse): the forward kernel over unit-last-stride q/k/v, dense (B, H, L, D) or, with ``cu``,
    varlen (total, H, D) (o4 is then (1, H, total, D))."""
    return _forward(_Problem(q, k, v, kpm, cu, max_seqlen, causal, scale, dropout_p, seed))


def _attn_bwd_fake(q, k, v, kpm, cu, max_seqlen, causal, scale, dropout_p, seed, o4, lse, do4):
    return tuple(torch.empty_like(t) for t in _views4(q, k, v, cu))


@entry("triton_attn_bwd", fake=_attn_bwd_fake)
def attn_bwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kpm: torch.Tensor | None, cu: torch.Tensor | None,
             max_seqlen: int, causal: bool, scale: float | None, dropout_p: float, seed: int, o4: torch.Tensor,
             lse: torch.Tensor, do4: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq4, dk4, dv4) in the layout of ``_views4(q, k, v, cu)``."""
    return _backward(_Problem(q, k, v, kpm, cu, max_seqlen, causal, scale, dropout_p, seed), o4, lse, do4)


# ---------------------------------------------------------------------------------- autograd
class AttentionFunction(torch.autograd.Function):
    """Fused attention with a recompute backward. Dense when ``cu_seqlens`` is None, else varlen
    (q/k/v are then (total, H, D)). ``seed`` fixes the dropout stream for forward and backward."""

    @staticmethod
    def forward(ctx, q, k, v, key_padding_mask, cu_seqlens, max_seqlen, causal, scale, dropout_p, seed):
        q, k, v = unit_last(q), unit_last(k), unit_last(v)
        args = (int(max_seqlen or 0), bool(causal), None if scale is None else float(scale), float(dropout_p),
                int(seed))
        o4, lse = attn_fwd(q, k, v, key_padding_mask, cu_seqlens, *args)
        ctx.save_for_backward(q, k, v, o4, lse, key_padding_mask, cu_seqlens)
        ctx.args = args
        return o4.squeeze(0).transpose(0, 1) if cu_seqlens is not None else o4

    @staticmethod
    def backward(ctx, do):
        q, k, v, o4, lse, kpm, cu = ctx.saved_tensors
        varlen = cu is not None
        do = unit_last(do)
        do4 = do.transpose(0, 1).unsqueeze(0) if varlen else do
        dq4, dk4, dv4 = attn_bwd(q, k, v, kpm, cu, *ctx.args, o4, lse, do4)
        if varlen:
            dq4, dk4, dv4 = (t.squeeze(0).transpose(0, 1) for t in (dq4, dk4, dv4))
        return dq4, dk4, dv4, None, None, None, None, None, None, None


# ---------------------------------------------------------------------------------- public entry
def attention(q, k, v, *, causal, scale=None, key_padding_mask=None, dropout_p=0.0, generator=None):
    """softmax(q kᵀ · scale + mask) v with FlashAttention-2 kernels; see the module docstring.

    q (B, Hq, T, D), k/v (B, Hkv, S, D) -> (B, Hq, T, D) in q's dtype (and q's memory layout).
    """
    kpm = check_dense(q, k, v, key_padding_mask, dropout_p, scale)
    if q.numel() == 0:
        return q.clone()
    if k.shape[2] == 0:  # no keys: every row sees nothing -> 0 (the empty sum keeps q in the graph)
        return torch.zeros_like(q) + q[..., :0].sum()
    seed = draw_seed(generator) if dropout_p > 0.0 else 0
    return AttentionFunction.apply(q, k, v, kpm, None, None, causal, scale, float(dropout_p), seed)


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
    check_common(q, k, v, dropout_p, scale, what)
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"{what}: cu_seqlens must be a 1-D tensor with at least 2 entries")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{what}: cu_seqlens must be int32 or int64, got {cu_seqlens.dtype}")
    max_seqlen = int(max_seqlen)
    if cu_seqlens.device.type == "cpu":
        # Host offsets: validated here at no cost (a bad offset would read out of bounds later).
        cu_host = cu_seqlens.tolist()
        lens = [b - a for a, b in zip(cu_host, cu_host[1:])]
        if cu_host[0] != 0 or cu_host[-1] != q.shape[0] or min(lens) < 0:
            raise ValueError(f"{what}: cu_seqlens {cu_host} must start at 0, be non-decreasing and end at "
                             f"total={q.shape[0]}")
        if max(lens) > max_seqlen:
            raise ValueError(f"{what}: a document ({max(lens)} tokens) is longer than max_seqlen={max_seqlen}")
        max_seqlen = max(lens)
    else:
        # Device offsets: checked on the device (no host synchronisation in a training step); the
        # kernels' grid comes from the caller's max_seqlen (an upper bound is enough).
        lens = cu_seqlens[1:] - cu_seqlens[:-1]
        torch._assert_async((cu_seqlens[0] == 0) & (cu_seqlens[-1] == q.shape[0]) & (lens >= 0).all()
                            & (lens.max() <= max_seqlen),
                            f"{what}: cu_seqlens must start at 0, be non-decreasing, end at total={q.shape[0]} "
                            f"and hold no document longer than max_seqlen={max_seqlen}")
        max_seqlen = min(max_seqlen, q.shape[0])
    if q.shape[0] == 0:  # only empty documents
        return q.clone()
    cu = cu_seqlens.to(device=q.device, dtype=torch.int32, non_blocking=True).contiguous()
    seed = draw_seed(generator) if dropout_p > 0.0 else 0
    return AttentionFunction.apply(q, k, v, None, cu, max_seqlen, causal, scale, float(dropout_p), seed)


def dropout_keep_mask(seed: int, B: int, H: int, T: int, S: int, dropout_p: float, device) -> torch.Tensor:
    """The kernels' dropout keep mask for ``seed`` as a (B, H, T, S) bool tensor (tests, debugging).

    Varlen runs use the mask of ``B = 1, T = S = total`` indexed by packed token positions.
    """
    return keep_mask(seed, B * H * T, S, dropout_p, device).reshape(B, H, T, S)


__all__ = ["AttentionFunction", "ATTN_FWD", "ATTN_DQ", "ATTN_DKDV", "attn_bwd", "attn_fwd", "attention", "attention_varlen",
           "dropout_keep_mask", "fwd_block", "tma_eligible"]
