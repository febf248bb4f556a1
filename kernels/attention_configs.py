"""Autotune spaces of the attention kernels (``kernels/attention.py``) and the register model that
prunes them.

Config lists come from ``fwd_configs`` / ``dq_configs`` / ``dkdv_configs`` (GPU candidates in order
of preference) and are pruned per launch (``pruner``) by a register model fitted to AOT compiles
for sm_80 / sm_90 (no config that spills on the hot paths; tests/test_aot_attention.py; run it with
``FASTFT_AOT_ALL=1`` to recalibrate), then capped by ``FASTFT_AUTOTUNE_MAX``. The forward offers
Hopper variants: TMA loads (``USE_TMA``, where ``TMA_OK``) and a software-pipelined interior loop
(``PIPE``, only the tiles ``PIPE_SM90`` lists). Under the interpreter each kernel runs one config
(``INTERPRET_*``): its cost is per block step, so large blocks keep tests fast, and BLOCK_M !=
BLOCK_N keeps the tile-skipping arithmetic honest. Measured throughput of these tiles is in
benchmarks/NOTES.md.
"""
from __future__ import annotations

import triton

from . import _tma
from ._autotune import unvalidated
from ._common import cap, capability, config

INTERPRET_FWD = config(4, 1, BLOCK_M=64, BLOCK_N=32, USE_TMA=False, PIPE=False)
INTERPRET_DQ = config(4, 1, BLOCK_M=64, BLOCK_N=32)
INTERPRET_DKDV = config(4, 1, BLOCK_M=32, BLOCK_N=64)
TUNE_KEY = ["T_BUCKET", "S_BUCKET", "GROUP", "HEAD_DIM", "IS_CAUSAL", "HAS_KPM", "VARLEN", "DROPOUT"]


def _cfg(bm, bn, w, s, **extra):
    return config(w, s, BLOCK_M=bm, BLOCK_N=bn, **extra)


def fwd_configs() -> list:
    """Forward autotune space (pruned per call by ``prune_configs``; TMA variants only where
    ``TMA_OK``, software-pipelined ones only where ``PIPE_SM90`` says they compile clean).

    With FASTFT_AUTOTUNE_MAX = 3 the autotuner times the first three that survive pruning: at
    D <= 128 on sm_90 the 128 x 128 pointer-load tile and the software-pipelined 128 x 64 tile with
    pointer loads and with TMA. TMA: compiled for sm_90 (D = 128, bf16), a 128 x 128 step is 504 /
    638 instructions (interior / masked) with Triton 3.9 against 624 / 785 with pointer loads, 196
    registers against 240; Triton 3.6's TMA loops are larger, so there the timing decides. PIPE: the
    interior loop issues block j+1's Q Kᵀ before block j's softmax, so the P V wgmma of block j
    overlaps the next block's exponentials (see ``_attn_fwd_kernel``).
    """
    out = [_cfg(bm, bn, w, s, USE_TMA=tma, PIPE=pipe) for bm, bn, w, s, tma, pipe in [
        (128, 128, 8, 3, False, False), (128, 64, 8, 3, False, True), (128, 64, 8, 3, True, True),
        (128, 64, 8, 3, False, False), (128, 128, 8, 3, True, False), (128, 64, 8, 3, True, False),
        (64, 64, 4, 3, False, False), (128, 128, 8, 2, False, False), (128, 64, 4, 3, False, False),
        (64, 32, 4, 3, False, False), (64, 64, 8, 2, False, False), (64, 32, 8, 3, False, False),
        (16, 64, 4, 3, False, False),
    ]]
    for c in out:  # compiled and read in SASS, never executed on a GPU yet (benchmarks/NOTES.md)
        kw = c.kwargs
        why = ("TMA loads" if kw["USE_TMA"] else "software-pipelined loop" if kw["PIPE"]
               else "128x128 forward tile" if (kw["BLOCK_M"], kw["BLOCK_N"]) == (128, 128) else None)
        if why:
            unvalidated(c, why)
    return out


# (BLOCK_M, BLOCK_N, warps, stages, TMA) of the software-pipelined forward that compile on sm_90
# without spills at head dims <= 128 in bf16 / fp16 with causal masking and key padding (Triton 3.6
# and 3.9; tests/test_aot_attention.py). Its second score tile costs BLOCK_M x BLOCK_N registers:
# every 128 x 128 variant spilled with Triton 3.9 (64-496 bytes) or overflowed shared memory (TMA,
# 3 stages: 262 KB); dropout's Philox state is not offered the extra tile either.
PIPE_SM90 = {(128, 64, 8, 3, False), (128, 64, 8, 3, True)}


def dq_configs() -> list:
    """dQ kernel space: many query rows per program, narrow key blocks (it holds Q, dO, dQ)."""
    return [_cfg(bm, bn, w, s) for bm, bn, w, s in [
        (128, 64, 8, 3), (128, 32, 8, 3), (64, 64, 4, 3), (64, 32, 4, 3), (64, 64, 8, 2), (64, 32, 8, 3),
        (16, 64, 4, 3),
    ]]


def dkdv_configs() -> list:
    """dK/dV kernel space: many keys per program (it holds K, V, dK, dV), narrow query blocks."""
    return [_cfg(bm, bn, w, s) for bm, bn, w, s in [
        (32, 128, 8, 3), (64, 128, 8, 3), (64, 64, 4, 3), (32, 64, 4, 3), (32, 64, 8, 3), (16, 32, 8, 2),
        (16, 64, 4, 3),
    ]]


# Per-thread fp32 registers a config needs for its live tiles, and the most that compiled without
# spills on sm_80 and sm_90 (calibrated with tests/test_aot_attention.py, FASTFT_AOT_ALL=1): the
# forward holds acc (M x D, fp32), Q (M x D) and S/P (M x N); dQ holds dQ, Q, dO and S, dP; dK/dV
# holds dK, dV (N x D, fp32), K, V and S, dP (N x M). Register allocation is not linear in these
# terms, so the limits below are fitted to compiles, and conservative.
REG_LIMIT = {"fwd": 128, "dq": 160, "dkdv": 224}
_REG_LIMIT_D256 = {"fwd": 104, "dq": 144, "dkdv": 200}  # Hopper's wgmma layouts at D = 256
# With dropout the Philox rounds keep several words per score element live (dQ, which also holds
# dP, the most): extra words per element and the limit that compiled without spills.
_DROPOUT_WORDS = {"fwd": 2, "dq": 4, "dkdv": 2}
_REG_LIMIT_DROPOUT = {"fwd": 90, "dq": 120, "dkdv": 120}
# Hopper (sm_90 and later): 128 x 128 forward tiles at D <= 128 compile to 238-248 registers with no
# spills (Triton 3.6 and 3.9; they spill 8-80 bytes on sm_80), so the forward may try them there.
_REG_LIMIT_SM90 = {"fwd": 160}


def reg_estimate(kind: str, bm: int, bn: int, warps: int, block_d: int, elem_bytes: int,
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


def _reg_limit(kind: str, block_d: int, elem_bytes: int, dropout: bool = False, arch: int | None = None) -> float:
    limit = _REG_LIMIT_D256[kind] if block_d >= 256 else REG_LIMIT[kind]
    if arch is not None and arch >= 90 and kind in _REG_LIMIT_SM90 and block_d <= 128 and elem_bytes == 2:
        limit = max(limit, _REG_LIMIT_SM90[kind])
    if dropout:
        limit = min(limit, _REG_LIMIT_DROPOUT[kind])
    if elem_bytes == 4:  # fp32: exact ("ieee") dots are FMA loops with far more live registers
        limit = limit / 3
    return limit


def prune_configs(configs, block_d: int, t_bucket: int = 1 << 20, s_bucket: int = 1 << 20, *,
                  kind: str = "fwd", elem_bytes: int = 2, dropout: bool = False, arch: int | None = None):
    """Drop configs whose tiles would spill registers at this head dim (see ``REG_LIMIT``; ``arch``,
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
        if reg_estimate(kind, bm, bn, c.num_warps, block_d, elem_bytes, dropout) > limit:
            continue
        keep.append(c)
    if not keep:
        plain = [c for c in configs if not c.kwargs.get("PIPE")] or configs
        keep = [min(plain, key=lambda c: reg_estimate(kind, c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"],
                                                      c.num_warps, block_d, elem_bytes, dropout))]
    return keep


def pruner(kind: str):
    """The autotuner's per-call pruner of kernel ``kind`` ("fwd", "dq", "dkdv")."""
    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        if kind == "fwd" and not args.get("TMA_OK", False):
            # (a pipelined TMA tile's pointer twin may spill: its twin is plain)
            configs = _tma.plain_twins(configs, reset=("PIPE",))
        return cap(prune_configs(configs, int(args["BLOCK_D"]), int(args["T_BUCKET"]), int(args["S_BUCKET"]),
                                 kind=kind, elem_bytes=args["Q"].element_size(), dropout=bool(args["DROPOUT"]),
                                 arch=capability(args["Q"].device)))
    return prune


def bucket(n: int) -> int:
    """Autotune key for a length: next power of two (>= 16), so varying batches share configs."""
    return max(16, triton.next_power_of_2(max(int(n), 1)))
