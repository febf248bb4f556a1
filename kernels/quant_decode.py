"""Triton 4-bit decode GEMM: y = x @ dequant(W)ᵀ (+ bias) (+ scaling · u Bᵀ) for a few rows.

At M <= 16 rows of fp16 / bf16 activations (generation) the weight's bytes are the whole cost, so
``_quant_decode_kernel`` is built around reading them once, at the aligned layout (K % quant block
== 0: every int4 weight, NF4 of every real layer; ``kernels/quant_pack.py`` has the formats):

* the nibbles are never interleaved: byte j holds columns 2j and 2j + 1, so x is read as its even
  and odd columns and a K-step is two dots, one per nibble (the sum order is free);
* a K-step stays inside one quant block, so its dots run on unscaled values (NF4: a 256-entry table
  of packed pairs, each entry rounded once to x's dtype, ``nf4_pair_table``; int4: q - 8 or q - z)
  and the block's scale multiplies the fp32 partial, once per output instead of once per weight;
* the next K-step's bytes and scale inputs are loaded before this one is decoded (a register
  double buffer);
* K splits write fp32 partials to a workspace; the last program of an output tile to finish (an
  acq_rel counter, reset to 0 by that program) adds them in split order, adds the bias and stores:
  deterministic, and no second launch. ``decode_plan`` picks the tile and the split by waves of
  resident programs;
* a LoRA adapter's low-rank term can be added in the epilogue (``epilogue``, shared with the
  general quant-matmul kernel), so a LoRA layer over a 4-bit base is one kernel.

The general path (M > 16, fp32 activations, NF4 with in % blocksize != 0) is
``kernels/quant_matmul.py``, which routes here when ``decode_eligible``; it also owns the autograd
Function and ``quant_matmul_lora``. Dtypes: x fp16 / bf16; accumulation fp32; y in x's dtype.
"""
from __future__ import annotations

import weakref

import torch
import triton
import triton.language as tl

from ._common import cast, launch, mma, num_sms, interpreting, upcast
from .quant_pack import NESTED_BLOCK, QuantMeta, QuantTensors, dummy

DECODE_MAX_M = 16  # rows the decode kernel takes (one 16-row MMA tile)
# The decode kernel's tile: BLOCK_N rows of W by BLOCK_K columns (one quant block or less) per step;
# 16 bytes of codes per thread per step with 4 warps.
DECODE_BLOCK_N = 64
DECODE_BLOCK_K = 64
DECODE_WARPS = 4
DECODE_PROGRAMS_PER_SM = 4  # resident programs per SM the split plans for (96-128 registers, 4 warps)


# ========================================================================================= kernels
@triton.jit
def lora_epilogue(acc, u_ptr, lb_ptr, offs_m, offs_n, mask_m, mask_n, R, scaling,
                  UPCAST: tl.constexpr, PRECISION: tl.constexpr, BLOCK_R: tl.constexpr):
    """acc + scaling · u[offs_m] B[offs_n]ᵀ: a LoRA adapter's low-rank term (u = drop(x) Aᵀ, (M, R)
    contiguous; B (N, R) contiguous, both in x's dtype) added in the output tile's epilogue. r runs
    in chunks of BLOCK_R straight into the fp32 accumulator (a second accumulator tile spilled the
    128 x 128 tile on sm_80); the scaling goes onto the u tile (fp32, then rounded once to x's
    dtype)."""
    for r0 in range(0, R, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        mr = offs_r < R
        ut = tl.load(u_ptr + offs_m.to(tl.int64)[:, None] * R + offs_r[None, :], mask=mask_m[:, None] & mr[None, :],
                     other=0.0)
        bt = tl.load(lb_ptr + offs_n.to(tl.int64)[:, None] * R + offs_r[None, :], mask=mask_n[:, None] & mr[None, :],
                     other=0.0)
        us = cast(ut.to(tl.float32) * scaling, ut.dtype, UPCAST=UPCAST)
        acc = mma(us, tl.trans(bt), acc, UPCAST=UPCAST, PRECISION=PRECISION)
    return acc


@triton.jit
def epilogue(acc, bias_ptr, u_ptr, lb_ptr, offs_m, offs_n, mask_m, mask_n, R, scaling, HAS_BIAS: tl.constexpr,
             HAS_LORA: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr, BLOCK_R: tl.constexpr):
    """acc + bias + scaling · u Bᵀ (each when present), in fp32 before the output's one rounding."""
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if HAS_LORA:
        acc = lora_epilogue(acc, u_ptr, lb_ptr, offs_m, offs_n, mask_m, mask_n, R, scaling, UPCAST=UPCAST,
                            PRECISION=PRECISION, BLOCK_R=BLOCK_R)
    return acc


@triton.jit
def _decode_pair(byte, tab_ptr, QTYPE: tl.constexpr, SYMMETRIC: tl.constexpr, DT: tl.constexpr,
                 UPCAST: tl.constexpr):
    """A (BLOCK_N, BLOCK_K / 2) byte tile -> its two nibbles' unscaled values in DT (fp16 / bf16).

    NF4: one gather per byte from a 256-entry table of packed pairs (the two table entries, each
    rounded once to DT; 1 KB, L1-resident): no nibble arithmetic and no conversion per element.
    int4: q - 8 (symmetric, exact) or q (asymmetric, exact; the zero point is applied per element
    by the caller).
    """
    if QTYPE == 0:
        pair = tl.load(tab_ptr + byte.to(tl.int32)).to(tl.uint32, bitcast=True)
        hi = (pair & 0xFFFF).to(tl.uint16).to(DT, bitcast=True)
        lo = (pair >> 16).to(tl.uint16).to(DT, bitcast=True)
    else:
        code = byte.to(tl.int32)
        if SYMMETRIC:
            hi = (code >> 4) - 8
            lo = (code & 0xF) - 8
        else:
            hi = code >> 4
            lo = code & 0xF
        # small integers: exact in fp16 / bf16 (via fp32 in the interpreter, whose direct int ->
        # bf16 conversion is wrong in Triton 3.9)
        if UPCAST:
            hi = hi.to(tl.float32)
            lo = lo.to(tl.float32)
        hi = hi.to(DT)
        lo = lo.to(DT)
    return hi, lo


@triton.jit
def _scale_loads(scale_ptr, aux_ptr, g, mask_n, QTYPE: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
                 SYMMETRIC: tl.constexpr, NBS: tl.constexpr):
    """The per-row global loads behind the scales of quant blocks / groups ``g`` (what the decode
    kernel prefetches a step ahead): NF4 + double quant (8-bit code, nested absmax), NF4 (absmax,
    unused), int4 (scale, zero point or unused)."""
    if QTYPE == 0:
        if DOUBLE_QUANT:
            a = tl.load(scale_ptr + g, mask=mask_n, other=0).to(tl.int32)
            b = tl.load(aux_ptr + g // NBS, mask=mask_n, other=0.0)
        else:
            a = tl.load(scale_ptr + g, mask=mask_n, other=0.0)
            b = a
    else:
        a = tl.load(scale_ptr + g, mask=mask_n, other=0.0)
        if SYMMETRIC:
            b = a
        else:
            b = tl.load(aux_ptr + g, mask=mask_n, other=0.0)
    return a, b


@triton.jit
def _scale_value(a, b, auxmap_ptr, offset, QTYPE: tl.constexpr, DOUBLE_QUANT: tl.constexpr):
    """The fp32 scale from ``_scale_loads``' values (double quant: the 256-entry map, L1-resident)."""
    if QTYPE == 0 and DOUBLE_QUANT:
        s = tl.load(auxmap_ptr + a) * b + offset
    else:
        s = a
    return s


@triton.jit
def _quant_decode_kernel(
    x_ptr, data_ptr, scale_ptr, aux_ptr, auxmap_ptr, qmap_ptr, bias_ptr, out_ptr, ws_ptr, cnt_ptr,
    u_ptr, lb_ptr, M, N, K, stride_xm, offset, K_SPLIT, R, scaling,
    QTYPE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, SYMMETRIC: tl.constexpr, QBLOCK: tl.constexpr,
    NBS: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, HAS_LORA: tl.constexpr,
    BLOCK_R: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Decode-shaped y = x @ dequant(W)ᵀ (+ bias) (+ scaling · u Bᵀ): M <= BLOCK_M = 16 rows of
    fp16 / bf16 x, the aligned layout (K % QBLOCK == 0, BLOCK_K | QBLOCK), program (N tile, K split).

    ``qmap_ptr`` is the NF4 pair table (``nf4_pair_table``); with SPLIT_K > 1 the programs of an
    N tile write fp32 partials to ``ws_ptr`` (SPLIT_K, M, N) and count themselves in ``cnt_ptr``;
    the last one reduces (see the module docstring).
    """
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_m = tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    jj = tl.arange(0, BLOCK_K // 2)
    k_start = pid_k * K_SPLIT
    k_end = tl.minimum(K, k_start + K_SPLIT)
    w_rows = data_ptr + offs_n.to(tl.int64)[:, None] * (K // 2)  # (BLOCK_N, 1) row starts
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    g_rows = offs_n.to(tl.int64) * (K // QBLOCK)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    byte = tl.load(w_rows + (k_start // 2 + jj)[None, :], mask=mask_n[:, None], other=0)
    sa, sb = _scale_loads(scale_ptr, aux_ptr, g_rows + k_start // QBLOCK, mask_n, QTYPE=QTYPE,
                          DOUBLE_QUANT=DOUBLE_QUANT, SYMMETRIC=SYMMETRIC, NBS=NBS)
    for k0 in range(k_start, k_end, BLOCK_K):
        # Prefetch the next step's bytes and scale inputs before decoding this one; the last step
        # re-reads its own (an address clamp, not a mask: the loads stay whole vectors).
        k1 = tl.minimum(k0 + BLOCK_K, k_end - BLOCK_K)
        nxt = tl.load(w_rows + (k1 // 2 + jj)[None, :], mask=mask_n[:, None], other=0)
        na, nb = _scale_loads(scale_ptr, aux_ptr, g_rows + k1 // QBLOCK, mask_n, QTYPE=QTYPE,
                              DOUBLE_QUANT=DOUBLE_QUANT, SYMMETRIC=SYMMETRIC, NBS=NBS)
        s = _scale_value(sa, sb, auxmap_ptr, offset, QTYPE=QTYPE, DOUBLE_QUANT=DOUBLE_QUANT)
        z = sb  # int4's zero point (unused otherwise)
        xx = tl.load(x_rows + (k0 + tl.arange(0, BLOCK_K))[None, :], mask=mask_m[:, None], other=0.0)
        xe, xo = tl.split(tl.reshape(xx, (BLOCK_M, BLOCK_K // 2, 2)))  # even / odd columns
        w_hi, w_lo = _decode_pair(byte, qmap_ptr, QTYPE=QTYPE, SYMMETRIC=SYMMETRIC, DT=xe.dtype, UPCAST=UPCAST)
        if QTYPE == 1:
            if not SYMMETRIC:  # q - z, in fp32, rounded once (as the reference's weight is)
                w_hi = cast(w_hi.to(tl.float32) - z[:, None], xe.dtype, UPCAST=UPCAST)
                w_lo = cast(w_lo.to(tl.float32) - z[:, None], xe.dtype, UPCAST=UPCAST)
        part = mma(xe, tl.trans(w_hi), tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), UPCAST=UPCAST,
                   PRECISION="ieee")
        part = mma(xo, tl.trans(w_lo), part, UPCAST=UPCAST, PRECISION="ieee")
        acc += part * s[None, :]  # the block's scale, once per output instead of once per weight
        byte = nxt
        sa = na
        sb = nb

    mask = mask_m[:, None] & mask_n[None, :]
    tile = offs_m[:, None] * N + offs_n[None, :]
    if SPLIT_K == 1:
        acc = epilogue(acc, bias_ptr, u_ptr, lb_ptr, offs_m, offs_n, mask_m, mask_n, R, scaling, HAS_BIAS=HAS_BIAS,
                       HAS_LORA=HAS_LORA, UPCAST=UPCAST, PRECISION="ieee", BLOCK_R=BLOCK_R)
        tl.store(out_ptr + tile, cast(acc, out_ptr.dtype.element_ty, UPCAST=UPCAST), mask=mask)
    else:
        MN = M * N
        tl.store(ws_ptr + pid_k * MN + tile, acc, mask=mask)
        tl.debug_barrier()  # every thread's partial is written before the counter moves
        done = tl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
        if done == SPLIT_K - 1:  # the last split of this N tile: reduce in split order
            total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for i in range(SPLIT_K):
                total += tl.load(ws_ptr + i * MN + tile, mask=mask, other=0.0, cache_modifier=".cg")
            total = epilogue(total, bias_ptr, u_ptr, lb_ptr, offs_m, offs_n, mask_m, mask_n, R, scaling,
                             HAS_BIAS=HAS_BIAS, HAS_LORA=HAS_LORA, UPCAST=UPCAST, PRECISION="ieee", BLOCK_R=BLOCK_R)
            tl.store(out_ptr + tile, cast(total, out_ptr.dtype.element_ty, UPCAST=UPCAST), mask=mask)
            tl.atomic_xchg(cnt_ptr + pid_n, 0, sem="relaxed", scope="gpu")  # ready for the next launch


# ======================================================================================== planning
def decode_eligible(x: torch.Tensor, meta: QuantMeta | None) -> bool:
    """Whether a quant matmul of ``x`` runs ``_quant_decode_kernel``: 1..DECODE_MAX_M rows, fp16 /
    bf16 compute (x's dtype or the autocast dtype), the aligned layout (``meta`` None: a weight the
    kernels do not take); never while torch.compile traces (the launcher keeps Python-side caches:
    the pair tables, the counters)."""
    if meta is None or torch.compiler.is_compiling():
        return False
    rows = x.numel() // max(1, x.shape[-1]) if x.dim() else 0
    if not 0 < rows <= DECODE_MAX_M:
        return False
    dt = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
    return dt in (torch.float16, torch.bfloat16) and meta.aligned


def decode_plan(M: int, N: int, K: int, qblock: int, device, split_k: int | None = None):
    """(BLOCK_N, BLOCK_K, split_k, K_SPLIT) of ``_quant_decode_kernel`` for this problem."""
    if interpreting():
        bn, bk = 32, 32
    else:
        bn, bk = DECODE_BLOCK_N, min(DECODE_BLOCK_K, qblock)
    k_blocks = K // bk
    tiles_n = triton.cdiv(N, bn)
    if split_k is None:
        # The split whose launch finishes first: waves of resident programs x (K-steps per program
        # + a program's fixed cost, ~2 steps: prologue, partial store, counter), ties to fewer
        # programs; a second, mostly empty wave costs as much as a full one. On 132 SMs: 4096²
        # 8 splits (512 programs, one wave); 4096 x 14336 2 (448, one wave), not 3 (672, two).
        slots = DECODE_PROGRAMS_PER_SM * num_sms(device)
        best = None
        for s in range(1, min(k_blocks, 64) + 1):
            steps = triton.cdiv(k_blocks, s)
            programs = tiles_n * triton.cdiv(k_blocks, steps)
            key = (triton.cdiv(programs, slots) * (steps + 2), programs)
            if best is None or key < best[0]:
                best = (key, s)
        split_k = best[1]
    split_k = max(1, min(int(split_k), k_blocks))
    k_split = triton.cdiv(k_blocks, split_k) * bk
    return bn, bk, triton.cdiv(K, k_split), k_split


_counters: dict = {}


def _counter_key(device) -> tuple:
    return (str(device), torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0)


def split_counters(device, n: int) -> torch.Tensor:
    """Zeroed int32 split-K counters (the kernel leaves them at 0), per device and stream. Every
    launch on a stream shares them: the last program of a tile resets its counter, and a launch
    that fails drops them (``drop_split_counters``), so no later launch starts from a stale count.
    Allocated on first use: warm up outside CUDA-graph capture on the stream that will replay."""
    key = _counter_key(device)
    c = _counters.get(key)
    if c is None or c.numel() < n:
        c = torch.zeros(max(n, 1024), dtype=torch.int32, device=device)
        _counters[key] = c
    return c


def drop_split_counters(device) -> None:
    """Forget this stream's counters (after a failed launch); the next launch allocates zeroed ones."""
    _counters.pop(_counter_key(device), None)


_pair_tables: dict = {}  # id(quant_map) -> (weakref to it, {dtype: (version, table)})


def nf4_pair_table(qmap: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """int32 (256,): entry b packs qmap[b >> 4] (low half) and qmap[b & 15] (high half), each as
    the bits of its ``dtype`` (fp16 / bf16) rounding -- the decode kernel's lookup, two outputs
    per byte. Cached per quant_map tensor (by identity, dropped with it) and dtype; rebuilt if the
    tensor was changed in place."""
    key = id(qmap)
    entry = _pair_tables.get(key)
    if entry is None or entry[0]() is not qmap:
        entry = (weakref.ref(qmap, lambda _, k=key: _pair_tables.pop(k, None)), {})
        _pair_tables[key] = entry
    hit = entry[1].get(dtype)
    if hit is not None and hit[0] == qmap._version:
        return hit[1]
    bits = qmap.detach().to(dtype).view(torch.int16).to(torch.int32) & 0xFFFF
    b = torch.arange(256, device=qmap.device)
    table = bits[b >> 4] | (bits[b & 15] << 16)
    entry[1][dtype] = (qmap._version, table)
    return table


def lora_args(lora, dtype, device):
    """(u, B, R, scaling, HAS_LORA, BLOCK_R) kernel arguments for an optional (u, B, scaling)."""
    if lora is None:
        d = dummy(device)
        return d, d, 0, 0.0, False, 16
    u, B, scaling = lora
    R = B.shape[1]
    return (u.to(dtype).contiguous(), B.to(dtype).contiguous(), R, float(scaling), True,
            16 if R <= 16 else 32)


# ======================================================================================== launcher
def quant_decode(x2, meta: QuantMeta, t: QuantTensors, bias, out, split_k=None, lora=None):
    """x2 (M <= 16, K) fp16 / bf16 with unit stride -> ``out`` (M, N) in x2's dtype, by
    ``_quant_decode_kernel``; ``lora`` = (u (M, r), B (N, r), scaling) adds scaling · u Bᵀ."""
    data, scale, aux, auxmap, qmap = t
    if meta.qtype == 0:
        qmap = nf4_pair_table(qmap, x2.dtype)
    M, K = x2.shape
    N = meta.N
    dev = x2.device
    d = dummy(dev)
    bn, bk, split_k, k_split = decode_plan(M, N, K, meta.qblock, dev, split_k)
    tiles_n = triton.cdiv(N, bn)
    ws = torch.empty((split_k, M, N), dtype=torch.float32, device=dev) if split_k > 1 else d
    cnt = split_counters(dev, tiles_n) if split_k > 1 else d
    lu, lb, R, scaling, has_lora, block_r = lora_args(lora, x2.dtype, dev)
    try:
        launch(_quant_decode_kernel, (tiles_n, split_k),
               x2, data, scale, aux if aux is not None else d, auxmap if auxmap is not None else d,
               qmap if qmap is not None else d, bias if bias is not None else d, out, ws, cnt, lu, lb,
               M, N, K, x2.stride(0), meta.offset, k_split, R, scaling,
               QTYPE=meta.qtype, DOUBLE_QUANT=meta.double_quant, SYMMETRIC=meta.symmetric, QBLOCK=meta.qblock,
               NBS=NESTED_BLOCK, HAS_BIAS=bias is not None, SPLIT_K=split_k, HAS_LORA=has_lora, BLOCK_R=block_r,
               UPCAST=upcast(x2.dtype), BLOCK_M=DECODE_MAX_M, BLOCK_N=bn, BLOCK_K=bk, num_warps=DECODE_WARPS,
               num_stages=2)
    except BaseException:
        # A launch that stopped part-way may have left counts behind; the next launch on this
        # stream gets fresh zeroed counters instead of electing the wrong program to reduce.
        if split_k > 1:
            drop_split_counters(dev)
        raise
    return out


__all__ = ["DECODE_MAX_M", "decode_eligible", "decode_plan", "drop_split_counters", "nf4_pair_table", "quant_decode",
           "split_counters"]
