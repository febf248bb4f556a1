"""Triton 4-bit packing kernels: NF4 / int4 quantize and dequantize, and the W-tile decoder the
quant-matmul kernels share.

Formats (docs/CONTRACTS.md "Quantized weights")
------------------------------------------------
NF4 (QLoRA, Dettmers et al. 2023, arXiv:2305.14314), byte-compatible with bitsandbytes:
the (out, in) weight is flattened row-major and cut into blocks of ``blocksize`` (a power of two,
>= 32) consecutive elements, so a block may straddle two rows when in % blocksize != 0. Per block
``absmax`` (fp32); ``scaled = clamp(x * (1 / max(absmax, 1e-38)), -1, 1)``; code = number of the 15
fp32 midpoints of the sorted codebook strictly below ``scaled`` (ties go low). Two codes per byte,
flat element 2i in the high nibble of byte i; an odd element count pads the last low nibble with
code 7 (the value 0.0). ``data`` is uint8 ((n + 1) // 2, 1). Dequant: ``quant_map[code] * absmax``
in fp32, one cast to the output dtype.
Double quantization: ``offset = mean(absmax)`` (computed by the caller between the two launches);
``absmax - offset`` is cut into blocks of ``NESTED_BLOCK`` = 256 and quantized to 8 bits with
bitsandbytes' signed dynamic map (exactly nearest code, ties low: compared in float64 against the
exact midpoints) with one fp32 ``nested_absmax`` per 256 blocks. Decoding it is ``nested_map[c] *
nested_absmax + offset`` (two fp32 roundings, no FMA), done on the fly wherever a block scale is
needed.

int4 (group-wise along ``in``): ``data`` uint8 (out, in / 2), even column in the high nibble;
``scales`` fp32 (out, in / group_size); asymmetric: ``zeros`` fp32 (same shape), value =
``(q - zero) * scale``; symmetric: ``zeros`` is None and value = ``(q - 8) * scale``.
(The quantizer's exact rounding rules are in ``_int4_quantize_kernel``.)

The codebooks are arguments: ``nf4_quantize_raw`` takes the 15 NF4 midpoints, the dequantizer the
16-entry ``quant_map``, the double quantizer the 255 float64 midpoints of the dynamic map
(``fastft.ops.triton_backend`` passes ``fastft.quant.codebooks``' tensors). The kernels address a
weight through ``QuantMeta`` (its non-tensor description) and ``QuantTensors`` (its tensors).

Kernels
-------
* ``_nf4_quantize_kernel``   one program per ROWS blocks: absmax, nearest code, nibble packing.
* ``_dq8_quantize_kernel``   double quantization of the absmax (one program per 256 blocks).
* ``_nf4_dequantize_kernel`` one pass over the packed bytes; double-quantized scales decoded on the
                              fly (no separate launch).
* ``_int4_quantize_kernel`` / ``_int4_dequantize_kernel``  one program per (row block, group).
* ``dequant_tile``           a (BLOCK_N, BLOCK_K) tile of W decoded to fp32 in registers, for both
                              formats and both access paths (``kernels/quant_matmul.py``):
  aligned (every int4 weight; NF4 when in % blocksize == 0): the tile's bytes are a dense load whose
  nibbles are interleaved with ``tl.join``, one scale per row; general (NF4 with in % blocksize != 0):
  per element flat index, byte gather, nibble select by parity, per-element block scale. The 16-entry
  codebook lookup is a 4-level select tree (``lut16``), not a gather: a gather needs a 64-bit address
  per weight element and pushed 128x128 matmul tiles into register spills.

Row kernels use a fixed launch heuristic (``_common.rows_per_program``), no autotune. Every kernel
compiles for sm_80 / sm_90 at every block size it accepts without spills (tests/test_aot_quant_pack.py).

Limits: blocksize / group_size powers of two >= 32 (bitsandbytes' set for NF4; 32/64/128 for int4 in
practice: other int4 group sizes quantize / dequantize through the reference), in % group_size == 0
for int4, nested blocksize 256. Under the interpreter (Triton 3.9) fp32 -> bf16 casts truncate, so
with UPCAST the outputs are rounded by bit arithmetic (``_common.cast``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from ._common import IO_DTYPES, cast, check_device, entry, launch, rows_per_program, upcast

NESTED_BLOCK = 256  # bitsandbytes' block size for the double-quantized absmax (fastft.quant.nf4.NESTED_BLOCKSIZE)
# bitsandbytes clamps absmax to this before taking 1 / absmax: all-zero blocks quantize to 0, not NaN
SCALE_FLOOR = 1e-38
_SCALE_FLOOR = tl.constexpr(SCALE_FLOOR)
_OUT_KIND = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}  # dequantize kernel
DEQUANT_WARPS = 8  # warps per program of the NF4 dequantize row kernel on a GPU
# int4 quantize: 4096 elements per program; with 4 warps (32 per thread) Triton 3.6 spilled 8 bytes
# on sm_90 (g = 64, symmetric)
QUANTIZE_WARPS = 8


# ========================================================================================= weights
@dataclass(frozen=True)
class QuantMeta:
    """The non-tensor description of a 4-bit weight, as the kernels need it."""
    qtype: int  # 0 = NF4, 1 = int4
    N: int  # out_features
    K: int  # in_features
    qblock: int  # NF4 blocksize / int4 group_size
    double_quant: bool = False
    symmetric: bool = False
    offset: float = 0.0  # NF4 double quantization's offset

    @property
    def aligned(self) -> bool:
        return self.K % self.qblock == 0


class QuantTensors(NamedTuple):
    """The tensors of a 4-bit weight in the order the kernels take them.

    NF4: ``scale`` = absmax (fp32, or its uint8 codes with double quantization), ``aux`` =
    nested_absmax, ``aux_map`` = nested_quant_map, ``qmap`` = quant_map (16,). int4: ``scale`` =
    scales, ``aux`` = zeros (None when symmetric), ``aux_map`` = ``qmap`` = None.
    """
    data: torch.Tensor
    scale: torch.Tensor
    aux: Optional[torch.Tensor]
    aux_map: Optional[torch.Tensor]
    qmap: Optional[torch.Tensor]


def check_meta(meta: QuantMeta) -> None:
    name = "blocksize" if meta.qtype == 0 else "group_size"
    q = meta.qblock
    if q < 32 or q & (q - 1):
        raise ValueError(f"{name}={q} is not supported by the Triton kernels (a power of two >= 32)")
    if meta.qtype == 1 and meta.K % q:
        raise ValueError(f"in_features={meta.K} is not a multiple of group_size={q}")


def int4_supported(group_size: int) -> bool:
    """Whether the int4 kernels take this group size (a power of two >= 32)."""
    return group_size >= 32 and not group_size & (group_size - 1)


def dummy(device) -> torch.Tensor:
    """Stands in for an absent optional tensor argument."""
    return torch.empty(1, dtype=torch.float32, device=device)


# ========================================================================================= kernels
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
def nf4_block_scale(scale_ptr, aux_ptr, auxmap_ptr, offset, b, mask,
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
def lut16(code, lut_ptr):
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
def dequant_tile(data_ptr, scale_ptr, aux_ptr, auxmap_ptr, qmap_ptr, offset, offs_n, k0, N, K,
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
            s = nf4_block_scale(scale_ptr, aux_ptr, auxmap_ptr, offset, g, mask_n, DOUBLE_QUANT=DOUBLE_QUANT,
                                NBS=NBS)
            w = lut16(code, qmap_ptr) * s[:, None]
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
        s = nf4_block_scale(scale_ptr, aux_ptr, auxmap_ptr, offset, f // QBLOCK, mask, DOUBLE_QUANT=DOUBLE_QUANT,
                            NBS=NBS)
        w = tl.where(mask, lut16(code, qmap_ptr) * s, 0.0)
    return w


@triton.jit
def _to16(v, OUT: tl.constexpr, UPCAST: tl.constexpr):
    """fp32 -> the bits of its nearest fp16 (OUT = 1) / bf16 (OUT = 2) value, as uint32."""
    if OUT == 1:
        h = cast(v, tl.float16, UPCAST=UPCAST)
    else:
        h = cast(v, tl.bfloat16, UPCAST=UPCAST)
    return h.to(tl.uint16, bitcast=True).to(tl.uint32)


@triton.jit
def _pack_pair(hi, lo, OUT: tl.constexpr, UPCAST: tl.constexpr):
    """Two fp32 tiles -> one word tile holding (hi, lo) in the output dtype OUT (0 fp32, 1 fp16,
    2 bf16), hi at the lower address (little endian): uint64 for fp32, uint32 otherwise."""
    if OUT == 0:
        word = (hi.to(tl.uint32, bitcast=True).to(tl.uint64)
                | (lo.to(tl.uint32, bitcast=True).to(tl.uint64) << 32))
    else:
        word = _to16(hi, OUT=OUT, UPCAST=UPCAST) | (_to16(lo, OUT=OUT, UPCAST=UPCAST) << 16)
    return word


@triton.jit
def _nf4_dequantize_kernel(data_ptr, scale_ptr, aux_ptr, auxmap_ptr, qmap_ptr, out_ptr, n, nblocks,
                           offset, first_blk, BS: tl.constexpr, NBS: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
                           ROWS: tl.constexpr, MASKED: tl.constexpr, OUT: tl.constexpr,
                           UPCAST: tl.constexpr):
    """ROWS blocks of BS elements from block ``first_blk``: bytes -> codes -> quant_map[code] * absmax.

    Byte j holds flat elements 2j (high nibble) and 2j + 1, so the program works on its bytes as one
    (ROWS, BS / 2) tile and writes each byte's two outputs as one word (``out_ptr`` is the output
    viewed as uint32 for 2-byte dtypes, uint64 for fp32; the launcher pads an odd element count by
    one; OUT: 0 fp32, 1 fp16, 2 bf16, 3 fp64): every load and store is a contiguous run per thread,
    which the compiler turns into vector instructions (joining the nibbles into an element-order
    tile instead makes sm_90 code store 2-byte values one at a time). fp64 outputs are stored apart.
    Addresses are an int64 program base plus int32 offsets, and MASKED = False (programs wholly
    inside the tensor: every program of a real layer) drops every predicate.
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
    s = nf4_block_scale(scale_ptr, aux_ptr, auxmap_ptr, offset, blk, bmask, DOUBLE_QUANT=DOUBLE_QUANT, NBS=NBS)
    # A gather from the 64-byte code table (L1-resident), not the matmul kernels' select tree (~20
    # integer / select ops per element there).
    hi = tl.load(qmap_ptr + (byte >> 4).to(tl.int32)) * s[:, None]
    lo = tl.load(qmap_ptr + (byte & 0xF).to(tl.int32)) * s[:, None]
    if OUT < 3:
        tl.store(out_ptr + base + loc, _pack_pair(hi, lo, OUT=OUT, UPCAST=UPCAST), mask=mask)
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
                            UPCAST: tl.constexpr):
    """ROWS rows x one group: (q - zero) * scale (zero = 8 when symmetric), fp32 then one cast."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    grp = tl.program_id(1)
    w = dequant_tile(data_ptr, scale_ptr, zero_ptr, zero_ptr, scale_ptr, 0.0, rows, grp * G, N, K,
                     QTYPE=1, DOUBLE_QUANT=False, SYMMETRIC=SYMMETRIC, ALIGNED=True, QBLOCK=G, NBS=1, BLOCK_K=G)
    cols = grp * G + tl.arange(0, G)
    tl.store(out_ptr + rows[:, None] * K + cols[None, :], cast(w, out_ptr.dtype.element_ty, UPCAST=UPCAST),
             mask=(rows < N)[:, None])


# ======================================================================================= launchers
# Compile options of every launch of the kernels above that must match the reference bit for bit
# (quantize, double quantize, dequantize): no FP contraction, so LLVM emits no fma and every fp32
# multiply / add carries .rn, which ptxas may not fuse either -- the GPU then rounds each operation
# as the interpreter and the reference do. Divisions are tl.math.div_rn (IEEE), never '/', which
# lowers to the approximate div.full.f32. Asserted on the compiled PTX by tests/test_aot_exact.py.
EXACT_LAUNCH = {"enable_fp_fusion": False}


def _check_blocksize(blocksize: int, what: str) -> None:
    if blocksize < 32 or blocksize & (blocksize - 1):
        raise ValueError(f"{what}: blocksize={blocksize} must be a power of two >= 32")


def _nf4_quantize_fake(w, blocksize, midpoints):
    n = w.numel()
    return (w.new_empty(((n + 1) // 2, 1), dtype=torch.uint8),
            w.new_empty((-(-n // blocksize),), dtype=torch.float32))


@entry("triton_nf4_quantize", fake=_nf4_quantize_fake)
def nf4_quantize_raw(w: torch.Tensor, blocksize: int, midpoints: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(data uint8 ((n+1)//2, 1), absmax fp32 (nblocks,)) of ``w`` (any shape; flattened row-major)
    in bitsandbytes' layout; ``midpoints``: the 15 fp32 midpoints of the sorted NF4 codebook."""
    if w.dtype not in IO_DTYPES:
        raise TypeError(f"nf4_quantize: expected a floating-point tensor, got {w.dtype}")
    _check_blocksize(blocksize, "nf4_quantize")
    check_device(w.device, "nf4_quantize")
    dev = w.device
    wf = w.detach().contiguous().reshape(-1)
    n = wf.numel()
    nblocks = triton.cdiv(n, blocksize)
    data = torch.empty(((n + 1) // 2, 1), dtype=torch.uint8, device=dev)
    absmax = torch.empty(nblocks, dtype=torch.float32, device=dev)
    if n:
        rows = rows_per_program(blocksize)
        launch(_nf4_quantize_kernel, (triton.cdiv(nblocks, rows),), wf, data, absmax, midpoints.to(dev), n, nblocks,
               BS=blocksize, ROWS=rows, **EXACT_LAUNCH)
    return data, absmax


def _dq8_fake(absmax, offset, midpoints_f64):
    n = absmax.numel()
    return (absmax.new_empty((n,), dtype=torch.uint8),
            absmax.new_empty((-(-n // NESTED_BLOCK),), dtype=torch.float32))


@entry("triton_nf4_double_quantize", fake=_dq8_fake)
def nf4_double_quantize_raw(absmax: torch.Tensor, offset: float,
                            midpoints_f64: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes uint8 (nblocks,), nested_absmax fp32 (cdiv(nblocks, 256),)): ``absmax - offset``
    quantized in blocks of 256 to the dynamic map whose 255 float64 midpoints are given."""
    nblocks = absmax.numel()
    ng = triton.cdiv(nblocks, NESTED_BLOCK)
    codes = torch.empty(nblocks, dtype=torch.uint8, device=absmax.device)
    nested = torch.empty(ng, dtype=torch.float32, device=absmax.device)
    if nblocks:
        launch(_dq8_quantize_kernel, (ng,), absmax, codes, nested, midpoints_f64.to(absmax.device), nblocks,
               float(offset), NBS=NESTED_BLOCK, **EXACT_LAUNCH)
    return codes, nested


def _workspace_view(workspace, numel: int, dtype, dev, what: str) -> torch.Tensor:
    """The first ``numel`` elements of a caller's flat workspace (reused between calls, no allocation)."""
    if (not isinstance(workspace, torch.Tensor) or workspace.dim() != 1 or not workspace.is_contiguous()
            or workspace.dtype != dtype or workspace.device != dev or workspace.numel() < numel):
        raise ValueError(f"{what}: workspace must be a contiguous 1-D {dtype} tensor on {dev} with at least {numel} "
                         f"elements, got {getattr(workspace, 'dtype', None)} "
                         f"{tuple(getattr(workspace, 'shape', ()))} on {getattr(workspace, 'device', None)}")
    return workspace[:numel]


def nf4_dequantize_raw(data, absmax, quant_map, shape, blocksize, dtype=torch.float32,
                       nested_absmax=None, nested_quant_map=None, offset=None, workspace=None) -> torch.Tensor:
    """Dense tensor of ``shape`` and ``dtype`` from NF4 fields (double quant when nested_absmax).

    ``workspace``: a flat contiguous buffer of ``dtype`` on the weight's device with at least
    ``nf4_workspace_numel(shape, dtype)`` elements; the result is then a view of it (nothing
    allocated). That path launches directly: a custom op cannot return a view of its input."""
    if workspace is not None:
        return _nf4_dequantize_launch(data, absmax, quant_map, shape, blocksize, dtype, nested_absmax,
                                      nested_quant_map, offset, workspace)
    return nf4_dequantize_op(data, absmax, quant_map, [int(d) for d in shape], int(blocksize), dtype, nested_absmax,
                             nested_quant_map, None if offset is None else float(offset))


def _nf4_dequantize_fake(data, absmax, quant_map, shape, blocksize, dtype, nested_absmax, nested_quant_map, offset):
    return data.new_empty(shape, dtype=dtype)


@entry("triton_nf4_dequantize", fake=_nf4_dequantize_fake)
def nf4_dequantize_op(data: torch.Tensor, absmax: torch.Tensor, quant_map: torch.Tensor, shape: list[int],
                      blocksize: int, dtype: torch.dtype, nested_absmax: torch.Tensor | None,
                      nested_quant_map: torch.Tensor | None, offset: float | None) -> torch.Tensor:
    """``nf4_dequantize_raw``'s launch into a fresh tensor (the custom op the fake traces)."""
    return _nf4_dequantize_launch(data, absmax, quant_map, shape, blocksize, dtype, nested_absmax, nested_quant_map,
                                  offset, None)


def _nf4_dequantize_launch(data, absmax, quant_map, shape, blocksize, dtype, nested_absmax, nested_quant_map, offset,
                           workspace):
    if dtype not in IO_DTYPES:
        raise TypeError(f"nf4_dequantize: dtype must be a floating-point dtype, got {dtype}")
    _check_blocksize(blocksize, "nf4_dequantize")
    dev = data.device
    check_device(dev, "nf4_dequantize")
    for t in (absmax, quant_map, nested_absmax, nested_quant_map):
        if t is not None and t.device != dev:
            raise ValueError(f"nf4_dequantize: weight tensors on {t.device} and {dev}")
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
    need = n + (n & 1) if pack else n
    if workspace is None:
        flat = torch.empty(need, dtype=dtype, device=dev)
    else:
        flat = _workspace_view(workspace, need, dtype, dev, "nf4_dequantize")
    out = flat[:n].view(tuple(shape))
    if n == 0:
        return out
    dq = nested_absmax is not None
    d = dummy(dev)
    rows = rows_per_program(blocksize)
    words = flat.view(torch.int64 if dtype == torch.float32 else torch.int32) if pack else flat
    args = (data, absmax, nested_absmax if dq else d, nested_quant_map if dq else d, quant_map, words, n, nblocks,
            float(offset) if dq else 0.0)
    # No FMA in the nested decode (bit-exact with the reference). 8 warps: 8 bytes -> 16 outputs
    # per thread at the default blocksize.
    meta = dict(BS=blocksize, NBS=NESTED_BLOCK, DOUBLE_QUANT=dq, ROWS=rows, OUT=_OUT_KIND[dtype],
                UPCAST=upcast(dtype), num_warps=DEQUANT_WARPS, **EXACT_LAUNCH)
    # Programs wholly inside the tensor run without predicates; the ragged rest (if any) is one
    # masked program launched after them.
    full = n // (rows * blocksize)
    if full:
        launch(_nf4_dequantize_kernel, (full,), *args, 0, MASKED=False, **meta)
    if full * rows < nblocks:
        launch(_nf4_dequantize_kernel, (1,), *args, full * rows, MASKED=True, **meta)
    return out


def int4_quantize_raw(w: torch.Tensor, group_size: int = 128, symmetric: bool = False):
    """(data uint8 (out, in/2), scales fp32 (out, in/group_size), zeros fp32 or None) of a 2-D ``w``."""
    data, scales, zeros = int4_quantize_op(w, int(group_size), bool(symmetric))
    return data, scales, None if symmetric else zeros


def _int4_quantize_fake(w, group_size, symmetric):
    N, K = w.shape
    scales = w.new_empty((N, K // group_size), dtype=torch.float32)
    return (w.new_empty((N, K // 2), dtype=torch.uint8), scales,
            w.new_empty((0,) if symmetric else scales.shape, dtype=torch.float32))


@entry("triton_int4_quantize", fake=_int4_quantize_fake)
def int4_quantize_op(w: torch.Tensor, group_size: int,
                     symmetric: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``int4_quantize_raw``'s launch; zeros is an empty tensor when ``symmetric``."""
    if w.dtype not in IO_DTYPES:
        raise TypeError(f"int4_quantize: expected a floating-point tensor, got {w.dtype}")
    if w.dim() != 2:
        raise ValueError(f"int4_quantize: expected a 2-D (out_features, in_features) weight, got {tuple(w.shape)}")
    N, K = w.shape
    check_meta(QuantMeta(1, N, K, group_size))
    check_device(w.device, "int4_quantize")
    dev = w.device
    w = w.detach().contiguous()
    data = torch.empty((N, K // 2), dtype=torch.uint8, device=dev)
    scales = torch.empty((N, K // group_size), dtype=torch.float32, device=dev)
    zeros = None if symmetric else torch.empty_like(scales)
    if N and K:
        rows = rows_per_program(group_size)
        launch(_int4_quantize_kernel, (triton.cdiv(N, rows), K // group_size), w, data, scales,
               zeros if zeros is not None else scales, N, K, G=group_size, SYMMETRIC=symmetric, ROWS=rows,
               num_warps=QUANTIZE_WARPS, **EXACT_LAUNCH)
    return data, scales, zeros if zeros is not None else torch.empty(0, dtype=torch.float32, device=dev)


def nf4_workspace_numel(shape, dtype) -> int:
    """Elements of the flat workspace ``nf4_dequantize_raw`` writes for ``shape`` / ``dtype`` (the
    word-pair stores pad an odd count by one)."""
    n = 1
    for s in shape:
        n *= int(s)
    return n + (n & 1) if dtype != torch.float64 else n


def int4_dequantize_raw(data, scales, zeros, shape, group_size, dtype=torch.float32, workspace=None) -> torch.Tensor:
    """Dense (out, in) ``dtype`` from int4 fields: (q - zero) * scale in fp32, one cast.
    ``workspace``: as for ``nf4_dequantize_raw`` (at least out * in elements; a direct launch)."""
    if workspace is not None:
        return _int4_dequantize_launch(data, scales, zeros, shape, group_size, dtype, workspace)
    return int4_dequantize_op(data, scales, zeros, [int(d) for d in shape], int(group_size), dtype)


def _int4_dequantize_fake(data, scales, zeros, shape, group_size, dtype):
    return data.new_empty(shape, dtype=dtype)


@entry("triton_int4_dequantize", fake=_int4_dequantize_fake)
def int4_dequantize_op(data: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, shape: list[int],
                       group_size: int, dtype: torch.dtype) -> torch.Tensor:
    """``int4_dequantize_raw``'s launch into a fresh tensor (the custom op the fake traces)."""
    return _int4_dequantize_launch(data, scales, zeros, shape, group_size, dtype, None)


def _int4_dequantize_launch(data, scales, zeros, shape, group_size, dtype, workspace):
    if dtype not in IO_DTYPES:
        raise TypeError(f"int4_dequantize: dtype must be a floating-point dtype, got {dtype}")
    N, K = (int(s) for s in shape)
    check_meta(QuantMeta(1, N, K, group_size))
    check_device(data.device, "int4_dequantize")
    for t in (scales, zeros):
        if t is not None and t.device != data.device:
            raise ValueError(f"int4_dequantize: weight tensors on {t.device} and {data.device}")
    if tuple(data.shape) != (N, K // 2) or tuple(scales.shape) != (N, K // group_size):
        raise ValueError(f"int4_dequantize: data {tuple(data.shape)} / scales {tuple(scales.shape)} do not fit "
                         f"shape ({N}, {K}) with group_size {group_size}")
    if workspace is None:
        out = torch.empty((N, K), dtype=dtype, device=data.device)
    else:
        out = _workspace_view(workspace, N * K, dtype, data.device, "int4_dequantize").view(N, K)
    if N and K:
        rows = rows_per_program(group_size)
        launch(_int4_dequantize_kernel, (triton.cdiv(N, rows), K // group_size), data, scales,
               zeros if zeros is not None else scales, out, N, K, G=group_size, SYMMETRIC=zeros is None, ROWS=rows,
               UPCAST=upcast(dtype), **EXACT_LAUNCH)
    return out


__all__ = [
    "EXACT_LAUNCH", "NESTED_BLOCK", "SCALE_FLOOR", "QuantMeta", "QuantTensors", "check_meta", "int4_supported",
    "dequant_tile",
    "nf4_quantize_raw", "nf4_double_quantize_raw", "nf4_dequantize_raw", "int4_quantize_raw", "int4_dequantize_raw",
    "nf4_workspace_numel",
]
