"""Triton 4-bit kernels: NF4 / int4 quantize, dequantize, and the fused dequant-matmul (fwd + bwd).

Formats (DESIGN.md "Formats", docs/CONTRACTS.md "Quantized weights")
--------------------------------------------------------------------
NF4 (QLoRA, Dettmers et al. 2023, arXiv:2305.14314), byte-compatible with bitsandbytes:
the (out, in) weight is flattened row-major and cut into blocks of ``blocksize`` (a power of two,
>= 32) consecutive elements, so a block may straddle two rows when in % blocksize != 0. Per block
``absmax`` (fp32); ``scaled = clamp(x * (1 / max(absmax, 1e-38)), -1, 1)``; code = number of the 15
fp32 midpoints of the sorted codebook strictly below ``scaled`` (ties go low). Two codes per byte,
flat element 2i in the high nibble of byte i; an odd element count pads the last low nibble with
code 7 (the value 0.0). ``data`` is uint8 ((n + 1) // 2, 1). Dequant: ``quant_map[code] * absmax``
in fp32, one cast to the output dtype.
Double quantization: ``offset = mean(absmax)`` (torch's fp32 mean, computed by the launcher);
``absmax - offset`` is cut into blocks of 256 and quantized to 8 bits with bitsandbytes' signed
dynamic map (exactly nearest code, ties low: compared in float64 against the exact midpoints) with
one fp32 ``nested_absmax`` per 256 blocks. Decoding it is ``nested_map[c] * nested_absmax + offset``
(two fp32 roundings, no FMA), done on the fly wherever a block scale is needed.

int4 (group-wise along ``in``): ``data`` uint8 (out, in / 2), even column in the high nibble;
``scales`` fp32 (out, in / group_size); asymmetric: ``zeros`` fp32 (same shape), value =
``(q - zero) * scale``; symmetric: ``zeros`` is None and value = ``(q - 8) * scale``.
(The quantizer's exact rounding rules are in ``_int4_quantize_kernel``.)

Kernels
-------
* ``_nf4_quantize_kernel``   one program per ROWS blocks: absmax, nearest code, nibble packing.
* ``_dq8_quantize_kernel``   double quantization of the absmax (one program per 256 blocks).
* ``_nf4_dequantize_kernel`` one pass over the packed bytes; double-quantized scales decoded on the
                              fly (no separate launch).
* ``_int4_quantize_kernel`` / ``_int4_dequantize_kernel``  one program per (row block, group).
* ``_quant_matmul_fwd_kernel``  y = x @ dequant(W)^T (+ bias). Each program owns a
  (BLOCK_M, BLOCK_N) output tile; inside the K-loop a (BLOCK_N, BLOCK_K) tile of W is decoded from
  the packed bytes into registers (``_dequant_tile``), cast to x's dtype and fed to ``tl.dot``
  with an fp32 accumulator; the full-precision weight never exists in memory. ``SPLIT_K > 1`` is
  its decode path (M <= 16, fp32 activations or the general layout): the K range is split across
  programs that write fp32 partial sums to a (SPLIT_K, M, N) workspace, which the launcher reduces.
* ``_quant_decode_kernel``  the decode path of the aligned layout with fp16 / bf16 activations
  (M <= 16, e.g. generation): bytes prefetched a step ahead, two dots per K-step on the unscaled
  nibble values (NF4 through a 256-entry packed-pair table), the block scale applied to the fp32
  partial, split-K reduced in-kernel by the last program of each output tile (deterministic).
* ``_quant_matmul_bwd_kernel``  dX = dY @ dequant(W): the same tile decoder on the transposed access
  pattern (program tiles (M, K), reduction over N). W gets no gradient; nothing is saved for
  backward but the packed weight tensors (which the weight object holds anyway).

Two W access paths, chosen by the constexpr ALIGNED:
* aligned (every int4 weight; NF4 when in % blocksize == 0, i.e. every real layer): BLOCK_K divides
  the quant block, so a K-tile of one row lies inside one block: one scale per row, and the tile's
  bytes are a dense (BLOCK_N, BLOCK_K / 2) load whose nibbles are interleaved with ``tl.join``.
* general (NF4 with in % blocksize != 0, e.g. in = 40 or 200 with blocksize 64): per element flat
  index n * in + k (int64), byte gather, nibble select by parity, per-element block scale.
The 16-entry codebook lookup is a 4-level select tree (``_lut16``), not a gather: a gather needs a
64-bit address per weight element and pushed 128x128 tiles into register spills.

Dtypes: activations fp32 / fp16 / bf16 (output in x's dtype, or the autocast dtype under autocast;
float64 activations go to the reference op), fp32 accumulation, fp32 scales. The W tile is decoded
in fp32 and cast once to the activation dtype, so the kernel multiplies exactly the values of
``dequantize(x.dtype)``. fp32 dots use IEEE fp32 unless torch allows TF32 for matmuls (then TF32,
as torch would). Offsets that can pass 2^31 (row * stride, flat weight index) are int64.

Tuning: ``matmul_configs(kind)`` lists (pruned per problem by ``_prune_configs``; autotune key
buckets M to a power of two) for "fwd" (M > 16), "bwd", and "decode" (M <= 16, split-K) for the
general path and for fp32 activations; ``decode_plan`` fixes the tile and split of
``_quant_decode_kernel``. Every config compiles for sm_80 and sm_90 without
spills (fp32: a few bytes) and the M >= 64 tiles use wgmma on sm_90 (tests/test_aot_quant.py). Row
kernels use a fixed heuristic (``_rows_per_program``). Under TRITON_INTERPRET=1 each kernel runs
one config (``INTERPRET_CONFIGS``).

Limits: blocksize / group_size powers of two >= 32 (bitsandbytes' set for NF4; 32/64/128 for int4;
other int4 group sizes quantize / dequantize through the reference, and quant_matmul raises),
in % group_size == 0 for int4, nested_blocksize 256. Interpreter quirks handled here (Triton 3.9):
``tl.dot`` on bf16 operands computes garbage, and fp32 -> bf16 casts truncate, so when
interpreting bf16 dots are upcast to fp32 and bf16 casts round to nearest-even by bit arithmetic
(``_cast``). Performance (benchmarks/bench_quant.py, benchmarks/NOTES.md): for large M the
in-register decode costs ~20 integer/select ops per weight element per M-tile, which the BLOCK_M =
128 training tiles amortize only partly (~115 TFLOP/s on an H200), so CUDA training runs through
the ``torch`` backend (this dequantize + cuBLAS).
"""
from __future__ import annotations

import functools
import os
import weakref
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from fastft.ops.dispatch import register

from . import _tuning

_NESTED_BLOCK = 256  # bitsandbytes' block size for the double-quantized absmax
_ACT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # matmul activations / outputs
_FLOAT_DTYPES = _ACT_DTYPES + (torch.float64,)  # quantizer inputs, dequantizer outputs
_SCALE_FLOOR = tl.constexpr(1e-38)
_OUT_KIND = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}  # dequantize kernel  # bitsandbytes clamps absmax to this before taking 1 / absmax


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# ======================================================================================== kernels
@triton.jit
def _nf4_quantize_kernel(w_ptr, out_ptr, absmax_ptr, mids_ptr, n, nblocks,
                         BS: tl.constexpr, ROWS: tl.constexpr):
    """Codes and absmax of ROWS consecutive blocks of BS elements of the flat weight."""
    blk = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)  # (ROWS,)
    f = blk[:, None] * BS + tl.arange(0, BS)[None, :]  # (ROWS, BS) flat element index, int64
    # Out-of-range elements read as 0: they do not change absmax, and they quantize to code 7,
    # which is exactly bitsandbytes' padding of an odd element count.
    w = tl.load(w_ptr + f, mask=f < n, other=0.0).to(tl.float32)
    amax = tl.max(tl.abs(w), axis=1)  # (ROWS,)
    # IEEE reciprocal (div_rn): Triton's plain fp32 '/' lowers to the approximate div.full.f32 on
    # NVIDIA GPUs, which would flip codes that sit next to a midpoint.
    inv = tl.math.div_rn(tl.full([ROWS], 1.0, tl.float32), tl.maximum(amax, _SCALE_FLOOR).to(tl.float32))
    scaled = tl.minimum(tl.maximum(w * inv[:, None], -1.0), 1.0)
    code = tl.zeros([ROWS, BS], dtype=tl.int32)
    for j in tl.static_range(15):
        code += (scaled > tl.load(mids_ptr + j)).to(tl.int32)
    hi, lo = tl.split(tl.reshape(code, (ROWS, BS // 2, 2)))  # even flat index -> high nibble
    byte = ((hi << 4) | lo).to(tl.uint8)
    fb = blk[:, None] * (BS // 2) + tl.arange(0, BS // 2)[None, :]
    tl.store(out_ptr + fb, byte, mask=fb < (n + 1) // 2)
    tl.store(absmax_ptr + blk, amax, mask=blk < nblocks)


@triton.jit
def _dq8_quantize_kernel(absmax_ptr, code_ptr, nested_ptr, mids_ptr, nblocks, offset,
                         NBS: tl.constexpr):
    """Double quantization of NBS block scales: (absmax - offset) -> 8-bit dynamic-map code.

    mids_ptr holds the 255 exact (float64) midpoints of the sorted 256-entry map; the code is the
    number of midpoints strictly below the value, found by binary lifting (8 gathers, not 255
    compares).
    """
    i = tl.program_id(0).to(tl.int64) * NBS + tl.arange(0, NBS)
    m = i < nblocks
    v = tl.where(m, tl.load(absmax_ptr + i, mask=m, other=0.0) - offset, 0.0)
    amax = tl.max(tl.abs(v), axis=0)
    inv = tl.math.div_rn(1.0, tl.maximum(amax, _SCALE_FLOOR).to(tl.float32))
    s = tl.minimum(tl.maximum(v * inv, -1.0), 1.0).to(tl.float64)
    c = tl.zeros([NBS], dtype=tl.int32)
    for p in tl.static_range(8):
        step = 128 >> p
        cand = c + step  # c + step <= 255 always: the steps sum to 255
        c = tl.where(tl.load(mids_ptr + cand - 1) < s, cand, c)
    tl.store(code_ptr + i, c.to(tl.uint8), mask=m)
    tl.store(nested_ptr + tl.program_id(0), amax)


@triton.jit
def _nf4_block_scale(scale_ptr, aux_ptr, auxmap_ptr, offset, b, mask,
                     DOUBLE_QUANT: tl.constexpr, NBS: tl.constexpr):
    """fp32 absmax of NF4 blocks ``b`` (any shape, int64), decoding double quantization."""
    if DOUBLE_QUANT:
        c = tl.load(scale_ptr + b, mask=mask, other=0).to(tl.int32)
        s = tl.load(auxmap_ptr + c) * tl.load(aux_ptr + b // NBS, mask=mask, other=0.0)
        s = s + offset
    else:
        s = tl.load(scale_ptr + b, mask=mask, other=0.0)
    return s


@triton.jit
def _lut16(code, lut_ptr):
    """lut_ptr[code] for a tile of 4-bit codes, as a 4-level select tree over 16 scalars.

    A gather (``tl.load(lut_ptr + code)``) needs a 64-bit address per element, which in the matmul
    K-loop costs two registers per weight element and pushes 128x128 tiles into spills; the tree
    costs 15 selects and no addresses.
    """
    b0 = (code & 1) != 0
    b1 = (code & 2) != 0
    b2 = (code & 4) != 0
    b3 = (code & 8) != 0
    v0 = tl.where(b0, tl.load(lut_ptr + 1), tl.load(lut_ptr + 0))
    v1 = tl.where(b0, tl.load(lut_ptr + 3), tl.load(lut_ptr + 2))
    v2 = tl.where(b0, tl.load(lut_ptr + 5), tl.load(lut_ptr + 4))
    v3 = tl.where(b0, tl.load(lut_ptr + 7), tl.load(lut_ptr + 6))
    v4 = tl.where(b0, tl.load(lut_ptr + 9), tl.load(lut_ptr + 8))
    v5 = tl.where(b0, tl.load(lut_ptr + 11), tl.load(lut_ptr + 10))
    v6 = tl.where(b0, tl.load(lut_ptr + 13), tl.load(lut_ptr + 12))
    v7 = tl.where(b0, tl.load(lut_ptr + 15), tl.load(lut_ptr + 14))
    v0 = tl.where(b1, v1, v0)
    v2 = tl.where(b1, v3, v2)
    v4 = tl.where(b1, v5, v4)
    v6 = tl.where(b1, v7, v6)
    v0 = tl.where(b2, v2, v0)
    v4 = tl.where(b2, v6, v4)
    return tl.where(b3, v4, v0)


@triton.jit
def _dequant_tile(data_ptr, scale_ptr, aux_ptr, auxmap_ptr, qmap_ptr, offset, offs_n, k0, N, K,
                  QTYPE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, SYMMETRIC: tl.constexpr,
                  ALIGNED: tl.constexpr, QBLOCK: tl.constexpr, NBS: tl.constexpr,
                  BLOCK_K: tl.constexpr):
    """W[offs_n, k0:k0+BLOCK_K] decoded to fp32 in registers: (BLOCK_N, BLOCK_K).

    offs_n: int64 rows; QTYPE 0 = NF4 (QBLOCK = blocksize), 1 = int4 (QBLOCK = group_size).
    Rows >= N and columns >= K come out as exact zeros.
    """
    BLOCK_N: tl.constexpr = offs_n.shape[0]
    mask_n = offs_n < N
    if ALIGNED:
        # K % QBLOCK == 0 and BLOCK_K | QBLOCK: the tile is inside one quant block per row, and
        # (K even) row n's bytes start at n * K / 2 for both formats.
        offs_b = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        byte = tl.load(data_ptr + offs_n[:, None] * (K // 2) + offs_b[None, :],
                       mask=mask_n[:, None], other=0)
        code = tl.reshape(tl.join(byte >> 4, byte & 0xF), (BLOCK_N, BLOCK_K)).to(tl.int32)
        g = offs_n * (K // QBLOCK) + k0 // QBLOCK  # (BLOCK_N,) block / group index
        if QTYPE == 0:
            s = _nf4_block_scale(scale_ptr, aux_ptr, auxmap_ptr, offset, g, mask_n, DOUBLE_QUANT, NBS)
            w = _lut16(code, qmap_ptr) * s[:, None]
        else:
            s = tl.load(scale_ptr + g, mask=mask_n, other=0.0)
            if SYMMETRIC:
                w = (code.to(tl.float32) - 8.0) * s[:, None]
            else:
                z = tl.load(aux_ptr + g, mask=mask_n, other=0.0)
                w = (code.to(tl.float32) - z[:, None]) * s[:, None]
    else:
        # NF4 with blocks and byte pairs straddling rows: per-element flat index.
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask = mask_n[:, None] & (offs_k < K)[None, :]
        f = offs_n[:, None] * K + offs_k[None, :]  # int64
        byte = tl.load(data_ptr + f // 2, mask=mask, other=0).to(tl.int32)
        code = (byte >> ((1 - (f % 2)) * 4).to(tl.int32)) & 0xF  # even flat index: high nibble
        s = _nf4_block_scale(scale_ptr, aux_ptr, auxmap_ptr, offset, f // QBLOCK, mask, DOUBLE_QUANT, NBS)
        w = tl.where(mask, _lut16(code, qmap_ptr) * s, 0.0)
    return w


@triton.jit
def _to16(v, OUT: tl.constexpr, INTERPRET: tl.constexpr):
    """fp32 -> the bits of its nearest fp16 (OUT = 1) / bf16 (OUT = 2) value, as uint32."""
    if OUT == 1:
        h = _cast(v, tl.float16, INTERPRET)
    else:
        h = _cast(v, tl.bfloat16, INTERPRET)
    return h.to(tl.uint16, bitcast=True).to(tl.uint32)


@triton.jit
def _pack_pair(hi, lo, OUT: tl.constexpr, INTERPRET: tl.constexpr):
    """Two fp32 tiles -> one word tile holding (hi, lo) in the output dtype OUT (0 fp32, 1 fp16,
    2 bf16), hi at the lower address (little endian): uint64 for fp32, uint32 otherwise."""
    if OUT == 0:
        word = (hi.to(tl.uint32, bitcast=True).to(tl.uint64)
                | (lo.to(tl.uint32, bitcast=True).to(tl.uint64) << 32))
    else:
        word = _to16(hi, OUT, INTERPRET) | (_to16(lo, OUT, INTERPRET) << 16)
    return word


@triton.jit
def _nf4_dequantize_kernel(data_ptr, scale_ptr, aux_ptr, auxmap_ptr, qmap_ptr, out_ptr, n, nblocks,
                           offset, first_blk, BS: tl.constexpr, NBS: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
                           ROWS: tl.constexpr, MASKED: tl.constexpr, OUT: tl.constexpr,
                           INTERPRET: tl.constexpr):
    """ROWS blocks of BS elements from block ``first_blk``: bytes -> codes -> quant_map[code] * absmax.

    Byte j holds flat elements 2j (high nibble) and 2j + 1, so the program works on its bytes as one
    (ROWS, BS / 2) tile and, with PACK, writes each byte's two outputs as one word (``out_ptr`` is
    the output viewed as uint32 for 2-byte dtypes, uint64 for fp32; the launcher pads an odd element
    count by one; OUT: 0 fp32, 1 fp16, 2 bf16, 3 fp64): every load and store is a contiguous run
    per thread, which the compiler turns into vector instructions. (The version measured on the H200 joined the nibbles into an
    element-order tile: its sm_90 code stored 2-byte values one at a time and spent ~88 memory
    instructions per thread on 16 elements; it ran at 60 % of copy.) fp64 outputs are stored apart. Addresses are an int64 program base plus int32 offsets, and
    MASKED = False (programs wholly inside the tensor: every program of a real layer) drops every
    predicate.
    """
    b0 = first_blk + tl.program_id(0).to(tl.int64) * ROWS  # first block of the program
    base = b0 * (BS // 2)  # first byte = first output word
    r = tl.arange(0, ROWS)
    loc = r[:, None] * (BS // 2) + tl.arange(0, BS // 2)[None, :]  # int32 byte offsets in the program
    blk = b0 + r
    bmask = blk < nblocks  # per row: ROWS predicates, not per element
    if MASKED:
        mask = loc < ((n + 1) // 2 - base)
        byte = tl.load(data_ptr + base + loc, mask=mask, other=0)
    else:
        mask = None
        byte = tl.load(data_ptr + base + loc)
    s = _nf4_block_scale(scale_ptr, aux_ptr, auxmap_ptr, offset, blk, bmask, DOUBLE_QUANT, NBS)
    # A gather from the 64-byte code table (L1-resident), not the matmul kernels' select tree (~20
    # integer / select ops per element there).
    hi = tl.load(qmap_ptr + (byte >> 4).to(tl.int32)) * s[:, None]
    lo = tl.load(qmap_ptr + (byte & 0xF).to(tl.int32)) * s[:, None]
    if OUT < 3:
        tl.store(out_ptr + base + loc, _pack_pair(hi, lo, OUT, INTERPRET), mask=mask)
    else:  # fp64 output (OUT = 3): element stores
        f = 2 * base + 2 * loc.to(tl.int64)
        tl.store(out_ptr + f, hi.to(tl.float64), mask=f < n)
        tl.store(out_ptr + f + 1, lo.to(tl.float64), mask=f + 1 < n)


@triton.jit
def _round_half_even(x):
    # torch.round semantics (ties to even) with ops every backend (and the interpreter) has.
    r = tl.floor(x)
    d = x - r
    odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
    return tl.where((d > 0.5) | ((d == 0.5) & odd), r + 1.0, r)


@triton.jit
def _int4_quantize_kernel(w_ptr, data_ptr, scale_ptr, zero_ptr, N, K,
                          G: tl.constexpr, SYMMETRIC: tl.constexpr, ROWS: tl.constexpr):
    """ROWS rows x one group of G columns (fastft/quant/int4.py's convention, fp32 arithmetic).

    asymmetric: lo = min(w, 0), hi = max(w, 0), scale = (hi - lo) / 15, zero = -lo / scale
                (a float zero point, unrounded), q = clamp(round(w / scale + zero), 0, 15).
    symmetric:  scale = max|w| / 7, q = clamp(round(w / scale), -8, 7) + 8.
    An all-zero group stores scale 0 (and zero 0) and divides by 1 instead.
    """
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    grp = tl.program_id(1)
    cols = grp * G + tl.arange(0, G)
    mrow = rows < N
    w = tl.load(w_ptr + rows[:, None] * K + cols[None, :], mask=mrow[:, None], other=0.0).to(tl.float32)
    if SYMMETRIC:
        scale = tl.math.div_rn(tl.max(tl.abs(w), axis=1), tl.full([ROWS], 7.0, tl.float32))
        safe = tl.where(scale > 0.0, scale, 1.0)
        q = _round_half_even(tl.math.div_rn(w, safe[:, None]))
        q = tl.minimum(tl.maximum(q, -8.0), 7.0) + 8.0
    else:
        lo = tl.minimum(tl.min(w, axis=1), 0.0)
        hi = tl.maximum(tl.max(w, axis=1), 0.0)
        scale = tl.math.div_rn(hi - lo, tl.full([ROWS], 15.0, tl.float32))
        pos = scale > 0.0
        safe = tl.where(pos, scale, 1.0)
        zero = tl.where(pos, tl.math.div_rn(-lo, safe), 0.0)
        q = _round_half_even(tl.math.div_rn(w, safe[:, None]) + zero[:, None])
        q = tl.minimum(tl.maximum(q, 0.0), 15.0)
        tl.store(zero_ptr + rows * (K // G) + grp, zero, mask=mrow)
    hi_q, lo_q = tl.split(tl.reshape(q.to(tl.int32), (ROWS, G // 2, 2)))  # even column: high nibble
    byte = ((hi_q << 4) | lo_q).to(tl.uint8)
    tl.store(data_ptr + rows[:, None] * (K // 2) + grp * (G // 2) + tl.arange(0, G // 2)[None, :], byte,
             mask=mrow[:, None])
    tl.store(scale_ptr + rows * (K // G) + grp, scale, mask=mrow)


@triton.jit
def _int4_dequantize_kernel(data_ptr, scale_ptr, zero_ptr, out_ptr, N, K,
                            G: tl.constexpr, SYMMETRIC: tl.constexpr, ROWS: tl.constexpr,
                            INTERPRET: tl.constexpr):
    """ROWS rows x one group: (q - zero) * scale (zero = 8 when symmetric), fp32 then one cast."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    grp = tl.program_id(1)
    w = _dequant_tile(data_ptr, scale_ptr, zero_ptr, zero_ptr, scale_ptr, 0.0, rows, grp * G, N, K,
                      1, False, SYMMETRIC, True, G, 1, G)
    cols = grp * G + tl.arange(0, G)
    tl.store(out_ptr + rows[:, None] * K + cols[None, :], _cast(w, out_ptr.dtype.element_ty, INTERPRET),
             mask=(rows < N)[:, None])


@triton.jit
def _rne_bf16(v):
    """fp32 -> the nearest bf16 value (ties to even), still as fp32: integer bit arithmetic."""
    b = v.to(tl.uint32, bitcast=True)
    b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
    return b.to(tl.float32, bitcast=True)


@triton.jit
def _cast(v, dtype: tl.constexpr, INTERPRET: tl.constexpr):
    """``v.to(dtype)``, rounding to nearest even. Triton 3.9's interpreter truncates fp32 -> bf16
    (and its "rtne" mode does not carry into the exponent), so there the rounding is done first."""
    if INTERPRET:
        if dtype == tl.bfloat16:
            v = _rne_bf16(v.to(tl.float32))
    return v.to(dtype)


@triton.jit
def _mma(a, b, acc, INTERPRET: tl.constexpr, PRECISION: tl.constexpr):
    if INTERPRET:
        if a.dtype == tl.bfloat16:  # Triton 3.9's interpreter computes bf16 tl.dot wrongly
            return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _lora_epilogue(acc, u_ptr, lb_ptr, offs_m, offs_n, mask_m, mask_n, R, scaling,
                   INTERPRET: tl.constexpr, PRECISION: tl.constexpr, BLOCK_R: tl.constexpr):
    """acc + scaling · u[offs_m] B[offs_n]ᵀ: a LoRA adapter's low-rank term (u = drop(x) Aᵀ, (M, R)
    contiguous; B (N, R) contiguous, both in x's dtype) added in the output tile's epilogue, so a
    LoRA layer over a 4-bit base is one kernel. r runs in chunks of BLOCK_R straight into the fp32
    accumulator (a second accumulator tile spilled the 128 x 128 tile on sm_80); the scaling goes
    onto the u tile (fp32, then rounded once to x's dtype)."""
    for r0 in range(0, R, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        mr = offs_r < R
        ut = tl.load(u_ptr + offs_m.to(tl.int64)[:, None] * R + offs_r[None, :], mask=mask_m[:, None] & mr[None, :],
                     other=0.0)
        bt = tl.load(lb_ptr + offs_n.to(tl.int64)[:, None] * R + offs_r[None, :], mask=mask_n[:, None] & mr[None, :],
                     other=0.0)
        us = _cast(ut.to(tl.float32) * scaling, ut.dtype, INTERPRET)
        acc = _mma(us, tl.trans(bt), acc, INTERPRET, PRECISION)
    return acc


@triton.jit
def _epilogue(acc, bias_ptr, u_ptr, lb_ptr, offs_m, offs_n, mask_m, mask_n, R, scaling, HAS_BIAS: tl.constexpr,
              HAS_LORA: tl.constexpr, INTERPRET: tl.constexpr, PRECISION: tl.constexpr, BLOCK_R: tl.constexpr):
    """acc + bias + scaling · u Bᵀ (each when present), in fp32 before the output's one rounding."""
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if HAS_LORA:
        acc = _lora_epilogue(acc, u_ptr, lb_ptr, offs_m, offs_n, mask_m, mask_n, R, scaling, INTERPRET, PRECISION,
                             BLOCK_R)
    return acc


@triton.jit
def _quant_matmul_fwd_kernel(
    x_ptr, data_ptr, scale_ptr, aux_ptr, auxmap_ptr, qmap_ptr, bias_ptr, out_ptr, u_ptr, lb_ptr,
    M, N, K, stride_xm, offset, M_BUCKET, R, scaling,
    QTYPE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, SYMMETRIC: tl.constexpr, ALIGNED: tl.constexpr,
    QBLOCK: tl.constexpr, NBS: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr,
    HAS_LORA: tl.constexpr, BLOCK_R: tl.constexpr, INTERPRET: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """y[m, n] = sum_k x[m, k] * W[n, k] (+ bias[n]); W decoded tile by tile in registers.

    x (M, K) row stride stride_xm; out (M, N) contiguous in x's dtype, or with SPLIT_K > 1 an fp32
    (SPLIT_K, M, N) workspace of partial sums over the split's K range (bias and a LoRA term then
    added by the launcher). HAS_LORA: + scaling · u Bᵀ in the epilogue (``_lora_epilogue``).
    Backward of this is ``_quant_matmul_bwd_kernel``.
    """
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    # Grouped ordering: GROUP_M row tiles sweep the N tiles together, so the W tiles they decode
    # are re-read from L2 rather than DRAM.
    group = GROUP_M * num_n
    first_m = (pid // group) * GROUP_M
    size_m = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % size_m
    pid_n = (pid % group) // size_m

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
        w = _dequant_tile(data_ptr, scale_ptr, aux_ptr, auxmap_ptr, qmap_ptr, offset, offs_n, k0, N, K,
                          QTYPE, DOUBLE_QUANT, SYMMETRIC, ALIGNED, QBLOCK, NBS, BLOCK_K)
        acc = _mma(x, tl.trans(_cast(w, x.dtype, INTERPRET)), acc, INTERPRET, PRECISION)

    mask = mask_m[:, None] & (offs_n < N)[None, :]
    if SPLIT_K == 1:
        acc = _epilogue(acc, bias_ptr, u_ptr, lb_ptr, offs_m, offs_n, mask_m, offs_n < N, R, scaling, HAS_BIAS,
                        HAS_LORA, INTERPRET, PRECISION, BLOCK_R)
        tl.store(out_ptr + offs_m[:, None] * N + offs_n[None, :], _cast(acc, out_ptr.dtype.element_ty, INTERPRET),
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
    INTERPRET: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """dX[m, k] = sum_n dY[m, n] * W[n, k]: program tile (BLOCK_M, BLOCK_K), reduction over N.

    The same tile decoder as the forward: the K-tile of W a program owns is fixed and the loop walks
    the rows of W, so with ALIGNED each (row, K-tile) still needs one scale.
    """
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_k = tl.cdiv(K, BLOCK_K)
    group = GROUP_M * num_k
    first_m = (pid // group) * GROUP_M
    size_m = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % size_m
    pid_k = (pid % group) // size_m

    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    k0 = pid_k * BLOCK_K
    offs_k = k0 + tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = (n0 + tl.arange(0, BLOCK_N)).to(tl.int64)
        dy = tl.load(dy_ptr + offs_m[:, None] * stride_dym + offs_n[None, :],
                     mask=mask_m[:, None] & (offs_n < N)[None, :], other=0.0)
        w = _dequant_tile(data_ptr, scale_ptr, aux_ptr, auxmap_ptr, qmap_ptr, offset, offs_n, k0, N, K,
                          QTYPE, DOUBLE_QUANT, SYMMETRIC, ALIGNED, QBLOCK, NBS, BLOCK_K)
        acc = _mma(dy, _cast(w, dy.dtype, INTERPRET), acc, INTERPRET, PRECISION)
    mask = mask_m[:, None] & (offs_k < K)[None, :]
    tl.store(dx_ptr + offs_m[:, None] * K + offs_k[None, :], _cast(acc, dx_ptr.dtype.element_ty, INTERPRET), mask=mask)


@triton.jit
def _decode_pair(byte, tab_ptr, QTYPE: tl.constexpr, SYMMETRIC: tl.constexpr, DT: tl.constexpr,
                 INTERPRET: tl.constexpr):
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
        if INTERPRET:
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
    BLOCK_R: tl.constexpr, INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Decode-shaped y = x @ dequant(W)ᵀ (+ bias): M <= BLOCK_M = 16 rows of fp16 / bf16 x, the
    aligned layout (K % QBLOCK == 0, BLOCK_K | QBLOCK), program (N tile, K split).

    At M <= 16 the weight's bytes are the whole cost, and the first H200 run's decode (the training
    kernel with a 16-row tile) took 46 us at 4096² where its bytes need ~3: 24 instructions per
    weight element (the select-tree lookup and the nibble interleave), 233 registers, one warp per
    scheduler. Here:
    * the nibbles are never interleaved: byte j holds columns 2j and 2j + 1, so x is read as its
      even and odd columns and the K-step is two dots, one per nibble (sum order is free);
    * a K-step stays inside one quant block, so its dots run on unscaled values (NF4: the table
      entry rounded once to x's dtype, gathered two per byte from a packed-pair table passed as
      ``qmap_ptr``; int4: q - 8 or q - z) and the block's scale multiplies the fp32 partial,
      once per output instead of once per weight;
    * the next K-step's bytes and scale inputs are loaded before this one is decoded (a register
      double buffer);
    * K splits (SPLIT_K > 1) write fp32 partials to ``ws_ptr`` (SPLIT_K, M, N); the last program
      of an N tile to finish (an acq_rel counter in ``cnt_ptr``, reset to 0 by that program) adds
      them in split order, adds the bias and stores: deterministic, and no second launch;
    * HAS_LORA adds a LoRA adapter's scaling · u Bᵀ before the store (``_lora_epilogue``).
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
    sa, sb = _scale_loads(scale_ptr, aux_ptr, g_rows + k_start // QBLOCK, mask_n, QTYPE, DOUBLE_QUANT, SYMMETRIC,
                          NBS)
    for k0 in range(k_start, k_end, BLOCK_K):
        # Prefetch the next step's bytes and scale inputs before decoding this one; the last step
        # re-reads its own (an address clamp, not a mask: the loads stay whole vectors).
        k1 = tl.minimum(k0 + BLOCK_K, k_end - BLOCK_K)
        nxt = tl.load(w_rows + (k1 // 2 + jj)[None, :], mask=mask_n[:, None], other=0)
        na, nb = _scale_loads(scale_ptr, aux_ptr, g_rows + k1 // QBLOCK, mask_n, QTYPE, DOUBLE_QUANT, SYMMETRIC,
                              NBS)
        s = _scale_value(sa, sb, auxmap_ptr, offset, QTYPE, DOUBLE_QUANT)
        z = sb  # int4's zero point (unused otherwise)
        xx = tl.load(x_rows + (k0 + tl.arange(0, BLOCK_K))[None, :], mask=mask_m[:, None], other=0.0)
        xe, xo = tl.split(tl.reshape(xx, (BLOCK_M, BLOCK_K // 2, 2)))  # even / odd columns
        w_hi, w_lo = _decode_pair(byte, qmap_ptr, QTYPE, SYMMETRIC, xe.dtype, INTERPRET)
        if QTYPE == 1:
            if not SYMMETRIC:  # q - z, in fp32, rounded once (as the reference's weight is)
                w_hi = _cast(w_hi.to(tl.float32) - z[:, None], xe.dtype, INTERPRET)
                w_lo = _cast(w_lo.to(tl.float32) - z[:, None], xe.dtype, INTERPRET)
        part = _mma(xe, tl.trans(w_hi), tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), INTERPRET, "ieee")
        part = _mma(xo, tl.trans(w_lo), part, INTERPRET, "ieee")
        acc += part * s[None, :]  # the block's scale, once per output instead of once per weight
        byte = nxt
        sa = na
        sb = nb

    mask = mask_m[:, None] & mask_n[None, :]
    tile = offs_m[:, None] * N + offs_n[None, :]
    if SPLIT_K == 1:
        acc = _epilogue(acc, bias_ptr, u_ptr, lb_ptr, offs_m, offs_n, mask_m, mask_n, R, scaling, HAS_BIAS, HAS_LORA,
                        INTERPRET, "ieee", BLOCK_R)
        tl.store(out_ptr + tile, _cast(acc, out_ptr.dtype.element_ty, INTERPRET), mask=mask)
    else:
        MN = M * N
        tl.store(ws_ptr + pid_k * MN + tile, acc, mask=mask)
        tl.debug_barrier()  # every thread's partial is written before the counter moves
        done = tl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
        if done == SPLIT_K - 1:  # the last split of this N tile: reduce in split order
            total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for i in range(SPLIT_K):
                total += tl.load(ws_ptr + i * MN + tile, mask=mask, other=0.0, cache_modifier=".cg")
            total = _epilogue(total, bias_ptr, u_ptr, lb_ptr, offs_m, offs_n, mask_m, mask_n, R, scaling, HAS_BIAS,
                              HAS_LORA, INTERPRET, "ieee", BLOCK_R)
            tl.store(out_ptr + tile, _cast(total, out_ptr.dtype.element_ty, INTERPRET), mask=mask)
            tl.atomic_xchg(cnt_ptr + pid_n, 0, sem="relaxed", scope="gpu")  # ready for the next launch


# ================================================================================ configurations
# (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages). Every entry compiles for sm_80 and
# sm_90 without register spills (tests/test_aot_quant.py); BLOCK_M >= 64 entries use wgmma on sm_90.
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
    (``_quant_decode_kernel``) has a fixed tile (``decode_plan``), no list.

    Pruned per call by ``_prune_configs`` (BLOCK_K must divide the quant block on the aligned path;
    tiles no larger than the problem).
    """
    if kind not in _CONFIGS:
        raise ValueError(f"unknown matmul config kind {kind!r}; expected one of {sorted(_CONFIGS)}")
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": g}, num_warps=w, num_stages=st)
            for bm, bn, bk, g, w, st in _CONFIGS[kind]]


# Under the interpreter (CPU tests) one config per kernel: tiles small enough that the test shapes
# have partial tiles in every dimension, large enough that the interpreter is not too slow.
INTERPRET_CONFIGS = {
    "fwd": {"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2},
    "decode": {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 1},
    "bwd": {"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2},
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
        return _tuning.cap(kept)
    # Always keep one: the config with the smallest tiles that respects the quant block.
    ok = [c for c in configs if not args["ALIGNED"] or args["QBLOCK"] % c.kwargs["BLOCK_K"] == 0]
    return [min(ok or configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_K"])]


_TUNE_KEY = ["M_BUCKET", "N", "K", "QTYPE", "DOUBLE_QUANT", "SYMMETRIC", "ALIGNED", "QBLOCK", "PRECISION"]


def tuning_kind(kind: str, aligned: bool, dtype: torch.dtype) -> str:
    """The config list a launch draws from: "fwd" / "decode" / "bwd" (+ "_general"), or "fp32_*"."""
    if dtype == torch.float32:
        return "fp32_" + kind
    return kind if aligned else kind + "_general"


@functools.lru_cache(maxsize=None)
def _tuned(tkind: str):
    kernel = _quant_matmul_bwd_kernel if tkind.endswith("bwd") or "bwd_" in tkind else _quant_matmul_fwd_kernel
    key = _TUNE_KEY + ([] if kernel is _quant_matmul_bwd_kernel else ["HAS_BIAS", "SPLIT_K", "HAS_LORA"])
    return triton.autotune(configs=matmul_configs(tkind), key=key,
                           prune_configs_by={"early_config_prune": _prune_configs})(kernel)


# ===================================================================================== weights
@dataclass(frozen=True)
class QuantMeta:
    """The non-tensor description of a quantized weight, as the kernels need it."""
    qtype: int  # 0 = NF4, 1 = int4
    N: int  # out_features
    K: int  # in_features
    qblock: int  # NF4 blocksize / int4 group_size
    double_quant: bool = False
    symmetric: bool = False
    offset: float = 0.0

    @property
    def aligned(self) -> bool:
        return self.K % self.qblock == 0


def _unpack(qweight):
    """(meta, (data, scale, aux, auxmap, qmap)) of an NF4Weight / Int4Weight (duck-typed)."""
    if hasattr(qweight, "blocksize") and hasattr(qweight, "quant_map"):
        N, K = (int(s) for s in qweight.shape)
        dq = getattr(qweight, "nested_absmax", None) is not None
        if dq and int(getattr(qweight, "nested_blocksize", _NESTED_BLOCK)) != _NESTED_BLOCK:
            raise ValueError(f"nested_blocksize={qweight.nested_blocksize} is not supported (expected 256)")
        meta = QuantMeta(0, N, K, int(qweight.blocksize), dq, False, float(qweight.offset) if dq else 0.0)
        t = (qweight.data, qweight.absmax, qweight.nested_absmax if dq else None,
             qweight.nested_quant_map if dq else None, qweight.quant_map)
    elif hasattr(qweight, "group_size") and hasattr(qweight, "scales"):
        N, K = (int(s) for s in qweight.shape)
        sym = qweight.zeros is None
        meta = QuantMeta(1, N, K, int(qweight.group_size), False, sym)
        t = (qweight.data, qweight.scales, qweight.zeros, None, None)
    else:
        raise TypeError(f"quant_matmul: expected an NF4Weight or Int4Weight, got {type(qweight).__name__}")
    _check_meta(meta)
    return meta, t


def _check_meta(meta: QuantMeta) -> None:
    name = "blocksize" if meta.qtype == 0 else "group_size"
    q = meta.qblock
    if q < 32 or q & (q - 1):
        raise ValueError(f"{name}={q} is not supported by the Triton kernels (a power of two >= 32)")
    if meta.qtype == 1 and meta.K % q:
        raise ValueError(f"in_features={meta.K} is not a multiple of group_size={q}")


def _dummy(device):
    return torch.empty(1, dtype=torch.float32, device=device)


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return 4  # interpreter: pretend a small GPU so that tests exercise the split-K path


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:  # read once per device, not on every decode-path launch
    return torch.cuda.get_device_properties(index).multi_processor_count


def _precision(dtype) -> str:
    if dtype == torch.float32 and not _interpreting() and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


# ==================================================================================== launchers
def _check_device(x, tensors):
    for t in tensors:
        if t is not None and t.device != x.device:
            raise ValueError(f"quant_matmul: weight tensors on {t.device}, activations on {x.device}")
    if x.device.type != "cuda" and not _interpreting():
        raise ValueError("Triton quant kernels need CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors)")


DECODE_MAX_M = 16


def decode_split_k(M: int, N: int, K: int, device: torch.device) -> int:
    """How many programs share the K range of one output tile on the decode path (M <= 16).

    With M <= 16 there are only cdiv(N, BLOCK_N) output tiles -- 64 for N = 4096, fewer than the
    SMs of an H100 -- so K is split until there are about two programs per SM, keeping at least two
    BLOCK_K = 64 tiles per split. 1 (no split) for M > 16.
    """
    if M > DECODE_MAX_M:
        return 1
    tiles_n = triton.cdiv(N, 64)
    return max(1, min(triton.cdiv(2 * _num_sms(device), tiles_n), K // 128))


def decode_eligible(x: torch.Tensor, qweight) -> bool:
    """Whether ``quant_matmul(x, qweight)`` runs ``_quant_decode_kernel``: at most DECODE_MAX_M
    rows, fp16 / bf16 compute (x's dtype or the autocast dtype), the aligned layout; never while
    torch.compile traces (the launcher keeps Python-side caches: the pair tables, the counters)."""
    if torch.compiler.is_compiling():
        return False
    rows = x.numel() // max(1, x.shape[-1]) if x.dim() else 0
    if not 0 < rows <= DECODE_MAX_M:
        return False
    dt = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
    if dt not in (torch.float16, torch.bfloat16):
        return False
    try:
        meta, _ = _unpack(qweight)
    except (TypeError, ValueError):
        return False
    return meta.aligned


def _lora_args(lora, dtype, device):
    """(u, B, R, scaling, HAS_LORA, BLOCK_R) kernel arguments for an optional (u, B, scaling)."""
    if lora is None:
        d = _dummy(device)
        return d, d, 0, 0.0, False, 16
    u, B, scaling = lora
    R = B.shape[1]
    return (u.to(dtype).contiguous(), B.to(dtype).contiguous(), R, float(scaling), True,
            16 if R <= 16 else 32)


def _matmul_fwd(x2, meta: QuantMeta, t, bias, split_k=None, out=None, lora=None):
    """x2 (M, K) contiguous -> ``out`` (M, N) in x2's dtype (allocated when None); ``lora`` =
    (u (M, r), B (N, r), scaling) adds scaling · u Bᵀ in the kernel's epilogue."""
    data, scale, aux, auxmap, qmap = t
    M, K = x2.shape
    N = meta.N
    dev = x2.device
    if out is None:
        out = torch.empty((M, N), dtype=x2.dtype, device=dev)
    if M == 0 or N == 0:
        return out
    if K == 0:
        out.zero_() if bias is None else out.copy_(bias.to(out.dtype).expand(M, N))
        if lora is not None:
            out.addmm_(lora[0].to(out.dtype), lora[1].to(out.dtype).t(), alpha=float(lora[2]))
        return out
    d = _dummy(dev)
    interp = _interpreting()
    decode = M <= DECODE_MAX_M
    if decode and meta.aligned and x2.dtype in (torch.float16, torch.bfloat16):
        return _decode_launch(x2, meta, t, bias, out, split_k, lora)
    if split_k is None:
        split_k = decode_split_k(M, N, K, dev)
    common = dict(M=M, N=N, K=K, stride_xm=x2.stride(0), offset=meta.offset,
                  M_BUCKET=min(triton.next_power_of_2(M), 4096),
                  QTYPE=meta.qtype, DOUBLE_QUANT=meta.double_quant, SYMMETRIC=meta.symmetric,
                  ALIGNED=meta.aligned, QBLOCK=meta.qblock, NBS=_NESTED_BLOCK,
                  HAS_BIAS=bias is not None and split_k == 1, SPLIT_K=split_k,
                  INTERPRET=interp, PRECISION=_precision(x2.dtype))
    lu, lb, R, scaling, has_lora, block_r = _lora_args(lora if split_k == 1 else None, x2.dtype, dev)
    common.update(R=R, scaling=scaling, HAS_LORA=has_lora, BLOCK_R=block_r)
    target = out if split_k == 1 else torch.empty((split_k, M, N), dtype=torch.float32, device=dev)
    args = (x2, data, scale, aux if aux is not None else d, auxmap if auxmap is not None else d,
            qmap if qmap is not None else d, bias if bias is not None else d, target, lu, lb)
    if interp:
        cfg = INTERPRET_CONFIGS["decode" if decode else "fwd"]
        grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]), split_k)
        _quant_matmul_fwd_kernel[grid](*args, **common, **cfg)
    else:
        def grid(meta_):
            return (triton.cdiv(M, meta_["BLOCK_M"]) * triton.cdiv(N, meta_["BLOCK_N"]), split_k)
        _tuned(tuning_kind("decode" if decode else "fwd", meta.aligned, x2.dtype))[grid](*args, **common)
    if split_k > 1:
        acc = target.sum(0)
        if bias is not None:
            acc += bias.float()
        if lora is not None:
            acc.addmm_(lora[0].float(), lora[1].float().t(), alpha=float(lora[2]))
        out.copy_(acc)
    return out


# The decode kernel's tile: BLOCK_N rows of W by BLOCK_K columns (one quant block or less) per step;
# 16 bytes of codes per thread per step with 4 warps.
DECODE_BLOCK_N = 64
DECODE_BLOCK_K = 64
DECODE_WARPS = 4
DECODE_PROGRAMS_PER_SM = 4  # resident programs per SM the split plans for (96-128 registers, 4 warps)
_counters: dict = {}


def _split_counters(device, n: int) -> torch.Tensor:
    """Zeroed int32 split-K counters (the kernel leaves them at 0), per device and stream."""
    key = (str(device), torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0)
    c = _counters.get(key)
    if c is None or c.numel() < n:
        c = torch.zeros(max(n, 1024), dtype=torch.int32, device=device)
        _counters[key] = c
    return c


def decode_plan(M: int, N: int, K: int, qblock: int, device, split_k: int | None = None):
    """(BLOCK_N, BLOCK_K, split_k, K_SPLIT) of ``_quant_decode_kernel`` for this problem."""
    if _interpreting():
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
        slots = DECODE_PROGRAMS_PER_SM * _num_sms(device)
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


def _decode_launch(x2, meta: QuantMeta, t, bias, out, split_k=None, lora=None):
    data, scale, aux, auxmap, qmap = t
    if meta.qtype == 0:
        qmap = nf4_pair_table(qmap, x2.dtype)
    M, K = x2.shape
    N = meta.N
    dev = x2.device
    d = _dummy(dev)
    bn, bk, split_k, k_split = decode_plan(M, N, K, meta.qblock, dev, split_k)
    tiles_n = triton.cdiv(N, bn)
    ws = torch.empty((split_k, M, N), dtype=torch.float32, device=dev) if split_k > 1 else d
    cnt = _split_counters(dev, tiles_n) if split_k > 1 else d
    lu, lb, R, scaling, has_lora, block_r = _lora_args(lora, x2.dtype, dev)
    launch = {} if _interpreting() else {"num_warps": DECODE_WARPS, "num_stages": 2}
    _quant_decode_kernel[(tiles_n, split_k)](
        x2, data, scale, aux if aux is not None else d, auxmap if auxmap is not None else d,
        qmap if qmap is not None else d, bias if bias is not None else d, out, ws, cnt, lu, lb,
        M, N, K, x2.stride(0), meta.offset, k_split, R, scaling,
        QTYPE=meta.qtype, DOUBLE_QUANT=meta.double_quant, SYMMETRIC=meta.symmetric, QBLOCK=meta.qblock,
        NBS=_NESTED_BLOCK, HAS_BIAS=bias is not None, SPLIT_K=split_k, HAS_LORA=has_lora, BLOCK_R=block_r,
        INTERPRET=_interpreting(), BLOCK_M=DECODE_MAX_M, BLOCK_N=bn, BLOCK_K=bk, **launch)
    return out


def _matmul_bwd(dy2, meta: QuantMeta, t):
    """dy2 (M, N) contiguous -> dX (M, K) in dy2's dtype."""
    data, scale, aux, auxmap, qmap = t
    M, N = dy2.shape
    K = meta.K
    dev = dy2.device
    dx = torch.empty((M, K), dtype=dy2.dtype, device=dev)
    if M == 0 or K == 0:
        return dx
    if N == 0:
        return dx.zero_()
    d = _dummy(dev)
    interp = _interpreting()
    common = dict(M=M, N=N, K=K, stride_dym=dy2.stride(0), offset=meta.offset,
                  M_BUCKET=min(triton.next_power_of_2(M), 4096),
                  QTYPE=meta.qtype, DOUBLE_QUANT=meta.double_quant, SYMMETRIC=meta.symmetric,
                  ALIGNED=meta.aligned, QBLOCK=meta.qblock, NBS=_NESTED_BLOCK,
                  INTERPRET=interp, PRECISION=_precision(dy2.dtype))
    args = (dy2, data, scale, aux if aux is not None else d, auxmap if auxmap is not None else d,
            qmap if qmap is not None else d, dx)
    if interp:
        cfg = INTERPRET_CONFIGS["bwd"]
        grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(K, cfg["BLOCK_K"]),)
        _quant_matmul_bwd_kernel[grid](*args, **common, **cfg)
    else:
        def grid(meta_):
            return (triton.cdiv(M, meta_["BLOCK_M"]) * triton.cdiv(K, meta_["BLOCK_K"]),)
        _tuned(tuning_kind("bwd", meta.aligned, dy2.dtype))[grid](*args, **common)
    return dx


DEQUANT_WARPS = 8  # warps per program of the NF4 dequantize row kernel on a GPU
# int4 quantize: 4096 elements per program; with 4 warps (32 per thread) Triton 3.6 spilled 8 bytes
# on sm_90 (g = 64, symmetric)
QUANTIZE_WARPS = 8


def _rows_per_program(bs: int) -> int:
    # Row kernels: a fixed heuristic, no autotune. ~4096 elements per program keeps enough bytes in
    # flight per SM without register pressure, and gives exactly one compiled variant per block size.
    return max(1, 4096 // bs)


def nf4_quantize_raw(w: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> dict:
    """The NF4 fields of ``w`` (any shape; flattened row-major) in bitsandbytes' layout.

    Returns dict(data uint8 ((n+1)//2, 1), absmax (fp32, or uint8 with double_quant),
    nested_absmax fp32 / None, nested_quant_map fp32 (256,) / None, offset float / None,
    quant_map fp32 (16,)).
    """
    from fastft.quant import codebooks

    if w.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"nf4_quantize: expected a floating-point tensor, got {w.dtype}")
    if blocksize < 32 or blocksize & (blocksize - 1):
        raise ValueError(f"nf4_quantize: blocksize={blocksize} must be a power of two >= 32")
    _check_device(w, ())
    dev = w.device
    wf = w.detach().contiguous().reshape(-1)
    n = wf.numel()
    nblocks = triton.cdiv(n, blocksize)
    data = torch.empty(((n + 1) // 2, 1), dtype=torch.uint8, device=dev)
    absmax = torch.empty(nblocks, dtype=torch.float32, device=dev)
    if n:
        rows = _rows_per_program(blocksize)
        _nf4_quantize_kernel[(triton.cdiv(nblocks, rows),)](
            wf, data, absmax, codebooks.nf4_midpoints(dev), n, nblocks, BS=blocksize, ROWS=rows)
    out = dict(data=data, absmax=absmax, nested_absmax=None, nested_quant_map=None, offset=None,
               quant_map=codebooks.nf4_code(dev))
    if double_quant:
        # torch's fp32 mean, as bitsandbytes computes it (summation order decides the last bit),
        # by the reference's rule (float64 when the fp32 sum overflows).
        from fastft.quant.nf4 import double_quant_offset

        offset = float(double_quant_offset(absmax).item())
        ng = triton.cdiv(nblocks, _NESTED_BLOCK)
        codes = torch.empty(nblocks, dtype=torch.uint8, device=dev)
        nested = torch.empty(ng, dtype=torch.float32, device=dev)
        if nblocks:
            _dq8_quantize_kernel[(ng,)](absmax, codes, nested, codebooks.dynamic_map_midpoints_f64(dev),
                                        nblocks, offset, NBS=_NESTED_BLOCK)
        out.update(absmax=codes, nested_absmax=nested, nested_quant_map=codebooks.dynamic_map(True, dev),
                   offset=offset)
    return out


def nf4_dequantize_raw(data, absmax, quant_map, shape, blocksize, dtype=torch.float32,
                       nested_absmax=None, nested_quant_map=None, offset=None) -> torch.Tensor:
    """Dense tensor of ``shape`` and ``dtype`` from NF4 fields (double quant when nested_absmax)."""
    if dtype not in _FLOAT_DTYPES:
        raise TypeError(f"nf4_dequantize: dtype must be a floating-point dtype, got {dtype}")
    if blocksize < 32 or blocksize & (blocksize - 1):
        raise ValueError(f"nf4_dequantize: blocksize={blocksize} must be a power of two >= 32")
    dev = data.device
    _check_device(data, (absmax, quant_map, nested_absmax, nested_quant_map))
    n = 1
    for s in shape:
        n *= int(s)
    nblocks = triton.cdiv(n, blocksize)
    if data.numel() < (n + 1) // 2:
        raise ValueError(f"nf4_dequantize: data has {data.numel()} bytes, shape {tuple(shape)} needs {(n + 1) // 2}")
    if absmax.numel() < nblocks:
        raise ValueError(f"nf4_dequantize: absmax has {absmax.numel()} entries, {nblocks} blocks needed")
    pack = dtype != torch.float64
    # Outputs are written in pairs (one word per byte): an odd count gets one padding element.
    flat = torch.empty(n + (n & 1) if pack else n, dtype=dtype, device=dev)
    out = flat[:n].view(tuple(shape))
    if n == 0:
        return out
    dq = nested_absmax is not None
    d = _dummy(dev)
    rows = _rows_per_program(blocksize)
    words = flat.view(torch.int64 if dtype == torch.float32 else torch.int32) if pack else flat
    args = (data, absmax, nested_absmax if dq else d, nested_quant_map if dq else d, quant_map, words, n, nblocks,
            float(offset) if dq else 0.0)
    # No FMA in the nested decode (bit-exact with the reference). 8 warps: 8 bytes -> 16 outputs
    # per thread at the default blocksize.
    launch = {} if _interpreting() else {"enable_fp_fusion": False, "num_warps": DEQUANT_WARPS}
    meta = dict(BS=blocksize, NBS=_NESTED_BLOCK, DOUBLE_QUANT=dq, ROWS=rows, OUT=_OUT_KIND[dtype],
                INTERPRET=_interpreting(), **launch)
    # Programs wholly inside the tensor run without predicates; the ragged rest (if any) is one
    # masked program launched after them.
    full = n // (rows * blocksize)
    if full:
        _nf4_dequantize_kernel[(full,)](*args, 0, MASKED=False, **meta)
    if full * rows < nblocks:
        _nf4_dequantize_kernel[(1,)](*args, full * rows, MASKED=True, **meta)
    return out


def _int4_supported(group_size: int) -> bool:
    return group_size >= 32 and not group_size & (group_size - 1)


def int4_quantize_raw(w: torch.Tensor, group_size: int = 128, symmetric: bool = False) -> dict:
    """Int4 fields of a 2-D ``w`` (out, in): data uint8 (out, in/2), scales fp32, zeros fp32 / None."""
    if w.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"int4_quantize: expected a floating-point tensor, got {w.dtype}")
    if w.dim() != 2:
        raise ValueError(f"int4_quantize: expected a 2-D (out_features, in_features) weight, got {tuple(w.shape)}")
    N, K = w.shape
    _check_meta(QuantMeta(1, N, K, group_size))
    _check_device(w, ())
    dev = w.device
    w = w.detach().contiguous()
    data = torch.empty((N, K // 2), dtype=torch.uint8, device=dev)
    scales = torch.empty((N, K // group_size), dtype=torch.float32, device=dev)
    zeros = None if symmetric else torch.empty_like(scales)
    if N and K:
        rows = _rows_per_program(group_size)
        launch = {} if _interpreting() else {"num_warps": QUANTIZE_WARPS}
        _int4_quantize_kernel[(triton.cdiv(N, rows), K // group_size)](
            w, data, scales, zeros if zeros is not None else scales, N, K,
            G=group_size, SYMMETRIC=symmetric, ROWS=rows, **launch)
    return dict(data=data, scales=scales, zeros=zeros)


def int4_dequantize_raw(data, scales, zeros, shape, group_size, dtype=torch.float32) -> torch.Tensor:
    """Dense (out, in) ``dtype`` from int4 fields: (q - zero) * scale in fp32, one cast."""
    if dtype not in _FLOAT_DTYPES:
        raise TypeError(f"int4_dequantize: dtype must be a floating-point dtype, got {dtype}")
    N, K = (int(s) for s in shape)
    _check_meta(QuantMeta(1, N, K, group_size))
    _check_device(data, (scales, zeros))
    if tuple(data.shape) != (N, K // 2) or tuple(scales.shape) != (N, K // group_size):
        raise ValueError(f"int4_dequantize: data {tuple(data.shape)} / scales {tuple(scales.shape)} do not fit "
                         f"shape ({N}, {K}) with group_size {group_size}")
    out = torch.empty((N, K), dtype=dtype, device=data.device)
    if N and K:
        rows = _rows_per_program(group_size)
        _int4_dequantize_kernel[(triton.cdiv(N, rows), K // group_size)](
            data, scales, zeros if zeros is not None else scales, out, N, K,
            G=group_size, SYMMETRIC=zeros is None, ROWS=rows, INTERPRET=_interpreting())
    return out


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
        _matmul_fwd(x2, meta, (data, scale, aux, auxmap, qmap), bias, split_k, out=y.view(-1, meta.N))
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
            dx = _matmul_bwd(dy2, meta, ctx.saved_tensors).reshape(*dy.shape[:-1], meta.K).to(ctx.x_dtype)
        if ctx.bias_dtype is not None and ctx.needs_input_grad[6]:
            dbias = dy.reshape(-1, meta.N).sum(0).to(ctx.bias_dtype)
        return dx, None, None, None, None, None, dbias, None, None, None


def quant_matmul_triton(x, qweight, bias=None, *, split_k=None):
    """y = x @ dequant(qweight)^T (+ bias) for x (..., in) fp32/fp16/bf16, in x's dtype (or the
    autocast dtype when autocast is on, like F.linear).

    ``split_k`` forces the number of K splits (tests); by default the decode path (M <= 16) splits
    K so that the GPU stays busy.
    """
    meta, t = _unpack(qweight)
    if not isinstance(x, torch.Tensor) or x.dtype not in _ACT_DTYPES:
        raise TypeError(f"quant_matmul: activations must be fp32/fp16/bf16, got {getattr(x, 'dtype', type(x))}")
    if x.dim() == 0 or x.shape[-1] != meta.K:
        raise ValueError(f"quant_matmul: x's last dim ({x.shape[-1] if x.dim() else None}) must equal "
                         f"in_features ({meta.K})")
    if bias is not None and tuple(bias.shape) != (meta.N,):
        raise ValueError(f"quant_matmul: bias shape {tuple(bias.shape)} must be (out_features,) = ({meta.N},)")
    _check_device(x, t + (bias,))
    dt = x.dtype
    if torch.is_autocast_enabled(x.device.type):
        dt = torch.get_autocast_dtype(x.device.type)
    return QuantMatmulFunction.apply(x, *t, bias, meta, dt, split_k)


def quant_matmul_lora(x, qweight, bias, u, lora_B, scaling):
    """Forward only (no autograd; for use inside an autograd Function's forward): y = x @
    dequant(W)ᵀ (+ bias) + scaling · u B ᵀ in one kernel, the low-rank term added in the quant
    kernel's epilogue. x (..., in) fp32 / fp16 / bf16, u (rows, r) = drop(x) Aᵀ, B (out, r); y in
    x's dtype."""
    meta, t = _unpack(qweight)
    if x.dtype not in _ACT_DTYPES:
        raise TypeError(f"quant_matmul_lora: activations must be fp32/fp16/bf16, got {x.dtype}")
    if x.shape[-1] != meta.K:
        raise ValueError(f"quant_matmul_lora: x's last dim ({x.shape[-1]}) must equal in_features ({meta.K})")
    x2 = x.reshape(-1, meta.K)
    if x2.stride(-1) != 1 or (x2.shape[0] > 1 and x2.stride(0) != meta.K):
        x2 = x2.contiguous()
    if tuple(lora_B.shape[:1]) != (meta.N,) or lora_B.dim() != 2 or tuple(u.shape) != (x2.shape[0], lora_B.shape[1]):
        raise ValueError(f"quant_matmul_lora: u {tuple(u.shape)} / B {tuple(lora_B.shape)} do not fit x "
                         f"{tuple(x.shape)} and out_features {meta.N}")
    _check_device(x, t + (bias, u, lora_B))
    y = _matmul_fwd(x2, meta, t, bias, lora=(u, lora_B, scaling))
    return y.view(*x.shape[:-1], meta.N)


# ============================================================================ registered ops
# Same signatures as fastft.ops; argument checks shared with the reference backend so that every
# backend rejects the same inputs with the same messages.
@register("nf4_quantize", "triton")
def nf4_quantize(w, blocksize=64, double_quant=True):
    from fastft.quant.nf4 import NF4Weight, check_nf4_args

    check_nf4_args(w, blocksize)
    if not torch.isfinite(w).all():
        raise ValueError("nf4_quantize: the weight contains inf or NaN; NF4 block scales must be finite")
    r = nf4_quantize_raw(w, blocksize, double_quant)
    kw = {}
    if double_quant:
        kw = dict(nested_absmax=r["nested_absmax"], nested_quant_map=r["nested_quant_map"], offset=r["offset"])
    return NF4Weight(r["data"], w.shape, blocksize, w.dtype, r["quant_map"], r["absmax"], **kw)


@register("nf4_dequantize", "triton")
def nf4_dequantize(qweight, dtype=torch.float32):
    from fastft.quant.nf4 import NF4Weight

    if not isinstance(qweight, NF4Weight):
        raise TypeError(f"nf4_dequantize: expected an NF4Weight, got {type(qweight).__name__}")
    if qweight.double_quant and qweight.nested_blocksize != _NESTED_BLOCK:
        from fastft.ops.reference_quant import nf4_dequantize as ref

        return ref(qweight, dtype)
    return nf4_dequantize_raw(qweight.data, qweight.absmax, qweight.quant_map, qweight.shape, qweight.blocksize,
                              dtype, qweight.nested_absmax, qweight.nested_quant_map, qweight.offset)


@register("int4_quantize", "triton")
def int4_quantize(w, group_size=128, symmetric=False):
    from fastft.quant.int4 import Int4Weight, check_int4_args

    check_int4_args(w, group_size)
    if not _int4_supported(group_size):  # e.g. group_size 16 or 96: the torch reference does it
        from fastft.ops.reference_quant import int4_quantize as ref

        return ref(w, group_size, symmetric)
    if not torch.isfinite(w).all():
        raise ValueError("int4_quantize: the weight contains inf or NaN")
    r = int4_quantize_raw(w, group_size, symmetric)
    return Int4Weight(r["data"], r["scales"], r["zeros"], group_size, w.shape, w.dtype)


@register("int4_dequantize", "triton")
def int4_dequantize(qweight, dtype=torch.float32):
    from fastft.quant.int4 import Int4Weight

    if not isinstance(qweight, Int4Weight):
        raise TypeError(f"int4_dequantize: expected an Int4Weight, got {type(qweight).__name__}")
    if not _int4_supported(qweight.group_size):
        from fastft.ops.reference_quant import int4_dequantize as ref

        return ref(qweight, dtype)
    return int4_dequantize_raw(qweight.data, qweight.scales, qweight.zeros, qweight.shape, qweight.group_size, dtype)


@register("quant_matmul", "triton")
def quant_matmul(x, qweight, bias=None):
    """y = x @ dequant(qweight)ᵀ (+ bias); float64 activations go to the reference (no fp64 kernel)."""
    from fastft.ops import reference_quant

    reference_quant.check_quant_matmul_args(x, qweight, bias)
    if x.dtype == torch.float64:
        return reference_quant.quant_matmul(x, qweight, bias)
    return quant_matmul_triton(x, qweight, bias)
