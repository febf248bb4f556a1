"""Codebooks of the 4-bit and 8-bit formats fastft reads and writes.

* ``NF4_CODE`` -- the 16 NormalFloat-4 values of QLoRA (Dettmers et al. 2023, arXiv:2305.14314),
  sorted, exactly as bitsandbytes stores them in ``weight.quant_map`` (fp32). Index 7 is 0.0.
* ``dynamic_map(signed=True)`` -- bitsandbytes' 8-bit "dynamic" map (Dettmers 2015,
  arXiv:1511.04561) used for the double-quantized NF4 absmax. Reimplemented here so that fastft
  never needs bitsandbytes at run time; tests check it equals
  ``bitsandbytes.functional.create_dynamic_map(signed=True)`` bit for bit.

Both maps are sorted ascending, so "nearest code" is a bucketize against the midpoints of
neighbouring codes.
"""
from __future__ import annotations

import functools

import torch

NF4_VALUES = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
)
# The code scaled 0.0 maps to; bitsandbytes pads an odd element count with it.
NF4_ZERO_INDEX = 7


@functools.lru_cache(maxsize=None)
def _nf4_code_cpu() -> torch.Tensor:
    return torch.tensor(NF4_VALUES, dtype=torch.float32)


def nf4_code(device=None) -> torch.Tensor:
    """The NF4 codebook, fp32 (16,), a fresh tensor (callers may store it)."""
    return _nf4_code_cpu().to(device=device, copy=True)


def nf4_midpoints(device=None) -> torch.Tensor:
    """fp32 midpoints of adjacent NF4 codes (15,): code index = number of midpoints < x.

    Computed in fp32 like bitsandbytes (``(code[:-1] + code[1:]) / 2``), so ties and near-ties land
    on the same side as bitsandbytes' CPU/CUDA quantizers.
    """
    c = _nf4_code_cpu()
    return ((c[:-1] + c[1:]) / 2).to(device)


@functools.lru_cache(maxsize=None)
def _dynamic_map_cpu(signed: bool) -> torch.Tensor:
    # Layout with 7 exponent bits and 8 total bits: for decade e = 10^(i-6), i = 0..6, the
    # 2^i (signed) or 2^(i+1) (unsigned) midpoints of an fp32 linspace(0.1, 1) grid, scaled by e;
    # their negatives when signed; then 0 and 1.0. The arithmetic is kept in fp32 (linspace, mean
    # of neighbours, scalar product) because that is how bitsandbytes' table was built, and the
    # stored maps must match it bit for bit.
    values: list[float] = []
    for i in range(7):
        n_frac = 2 ** i + 1 if signed else 2 ** (i + 1) + 1
        grid = torch.linspace(0.1, 1, n_frac, dtype=torch.float32)
        mids = (grid[:-1] + grid[1:]) / 2.0
        decade = 10 ** (i - 6)
        values += (decade * mids).tolist()
        if signed:
            values += (-decade * mids).tolist()
    values += [0.0, 1.0]
    values += [0.0] * (256 - len(values))  # unsigned map: fills to 256 with zeros
    values.sort()
    return torch.tensor(values, dtype=torch.float32)


def dynamic_map(signed: bool = True, device=None) -> torch.Tensor:
    """bitsandbytes' 8-bit dynamic map, fp32 (256,), sorted ascending, a fresh tensor."""
    return _dynamic_map_cpu(bool(signed)).to(device=device, copy=True)


def dynamic_map_midpoints_f64(device=None) -> torch.Tensor:
    """Exact midpoints (float64) of adjacent codes of the signed dynamic map (255,).

    The mean of two fp32 numbers is exact in float64, so bucketizing an fp32 value (widened to
    float64) against these gives the exactly nearest code, ties to the lower code.
    """
    m = _dynamic_map_cpu(True).double()
    return ((m[:-1] + m[1:]) / 2).to(device)
