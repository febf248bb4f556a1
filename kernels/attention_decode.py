"""Split-KV attention for a few query rows in Triton (flash-decoding), forward only.

Generation with a KV cache runs attention with T = 1 (or a few) query rows against S keys, often
with GQA; the FlashAttention-2 forward (``kernels/attention.py``) would then run one 16-row program
per (batch, query head) over all S keys. Here instead:

* one program per (key chunk, batch, kv head): its rows are all GROUP * T (query head, position)
  pairs of the GQA group (up to ``DECODE_MAX_ROWS``), so each K/V block is read once per group, not
  once per query head;
* the key range is split so that the GPU is filled (``_common.num_sms``) with at least a few key
  blocks per program; each program writes its normalised partial output and base-2 LSE, and
  ``_attn_combine_kernel`` merges them: O = sum_s 2^(LSE_s - LSE) O_s with LSE = log2 sum_s 2^LSE_s.

The key blocks run the dense forward's online-softmax step (``attention.fwd_block``), so masks
(bottom-right causal, key padding), dtypes and the UPCAST / PRECISION rules are the dense kernel's.
No dropout and no backward: ``decode_eligible`` says when this path applies (no gradient needed,
dropout_p == 0, GROUP * T <= DECODE_MAX_ROWS); ``fastft.ops.triton_backend.attention`` routes there.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._common import dot_flags, entry, interpreting, launch, num_sms
from .attention import LOG2E, check_dense, fwd_block, unit_last

DECODE_MAX_ROWS = 64  # GROUP * T rows per decode program (one tile of query rows)


# ========================================================================================= kernels
@triton.jit
def _attn_decode_kernel(
    Q, K, V, OP, LP, KPM,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_kpmb, Hkv, T, S, qk_scale, chunk, NUM_SPLITS,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
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
        acc, l_i, m_i = fwd_block(acc, l_i, m_i, q, K_base, V_base, KPM_base, start_n, pos, offs_n, offs_d,
                                  stride_kn, stride_vn, hi, causal_off, qk_scale, 0, 0.0, 0, 0, 0, HEAD_DIM=HEAD_DIM,
                                  BLOCK_D=BLOCK_D, MASK_N=False, MASK_CAUSAL=False, HAS_KPM=HAS_KPM, DROPOUT=False,
                                  UPCAST=UPCAST, PRECISION=PRECISION)
    for start_n in range(full_end, hi, BLOCK_N):
        acc, l_i, m_i = fwd_block(acc, l_i, m_i, q, K_base, V_base, KPM_base, start_n, pos, offs_n, offs_d,
                                  stride_kn, stride_vn, hi, causal_off, qk_scale, 0, 0.0, 0, 0, 0, HEAD_DIM=HEAD_DIM,
                                  BLOCK_D=BLOCK_D, MASK_N=True, MASK_CAUSAL=IS_CAUSAL, HAS_KPM=HAS_KPM, DROPOUT=False,
                                  UPCAST=UPCAST, PRECISION=PRECISION)
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


# ======================================================================================== launcher
def decode_eligible(q, k, v, dropout_p=0.0) -> bool:
    """Whether ``attention(q, k, v, ...)`` may run here: dense 4-D q / k / v with keys, no gradient
    needed, no dropout, and GROUP * T <= DECODE_MAX_ROWS (argument errors are left to the checks)."""
    if not all(isinstance(t, torch.Tensor) and t.dim() == 4 for t in (q, k, v)) or dropout_p != 0.0:
        return False
    Hq, T, Hkv, S = q.shape[1], q.shape[2], k.shape[1], k.shape[2]
    if Hkv == 0 or Hq % Hkv or q.numel() == 0 or S == 0:
        return False
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    return not needs_grad and T * (Hq // Hkv) <= DECODE_MAX_ROWS


def attention_decode(q, k, v, *, causal, scale=None, key_padding_mask=None):
    """Forward-only softmax(q kᵀ · scale + mask) v for GROUP * T <= DECODE_MAX_ROWS (generation with
    a cache): q (B, Hq, T, D), k/v (B, Hkv, S >= 1, D), the dense op's semantics."""
    kpm = check_dense(q, k, v, key_padding_mask, 0.0, scale)  # the attention op's checks and messages
    q, k, v = unit_last(q), unit_last(k), unit_last(v)
    group = q.shape[1] // k.shape[1]
    if group * q.shape[2] > DECODE_MAX_ROWS:
        raise ValueError(f"attention_decode: GROUP * T = {group * q.shape[2]} rows exceed {DECODE_MAX_ROWS}")
    return attn_decode(q, k, v, kpm, bool(causal), None if scale is None else float(scale))


def _attn_decode_fake(q, k, v, kpm, causal, scale):
    return torch.empty_like(q)


@entry("triton_attn_decode", fake=_attn_decode_fake)
def attn_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kpm: torch.Tensor | None, causal: bool,
                scale: float | None) -> torch.Tensor:
    """The split-KV decode and combine kernels over checked, unit-last-stride q / k / v (``kpm``:
    the uint8 (B, S) mask ``check_dense`` returns, or None)."""
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    group = Hq // Hkv
    block_m = max(16, triton.next_power_of_2(group * T))
    block_d = max(16, triton.next_power_of_2(D))
    block_n = 32 if (block_d >= 256 or interpreting()) else 64
    # Enough programs to fill the GPU twice over, each with at least a few key blocks of work.
    n_blocks = triton.cdiv(S, block_n)
    splits = max(1, min(triton.cdiv(2 * num_sms(q.device), B * Hkv), triton.cdiv(n_blocks, 4), 128))
    chunk = triton.cdiv(n_blocks, splits) * block_n
    splits = triton.cdiv(S, chunk)
    op = torch.empty(B * Hkv, splits, block_m, block_d, dtype=torch.float32, device=q.device)
    lp = torch.empty(B * Hkv, splits, block_m, dtype=torch.float32, device=q.device)
    kpm_t = kpm if kpm is not None else torch.zeros(1, dtype=torch.uint8, device=q.device)
    sm_scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    cx = dict(GROUP=group, HEAD_DIM=D, BLOCK_D=block_d, BLOCK_M=block_m)
    launch(_attn_decode_kernel, (splits, B * Hkv),
           q, k, v, op, lp, kpm_t, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
           v.stride(0), v.stride(1), v.stride(2), kpm_t.stride(0), Hkv, T, S, sm_scale * LOG2E, chunk, splits,
           BLOCK_N=block_n, IS_CAUSAL=bool(causal) and T > 1, HAS_KPM=kpm is not None, **dot_flags(q.dtype),
           num_warps=4, num_stages=3, **cx)
    o = torch.empty_like(q)
    launch(_attn_combine_kernel, (B * Hkv,), op, lp, o, o.stride(0), o.stride(1), o.stride(2), Hkv, T, splits, **cx,
           num_warps=4)
    return o


__all__ = ["DECODE_MAX_ROWS", "attention_decode", "attn_decode", "decode_eligible"]
