"""Autotune budget shared by the kernel modules.

Each GEMM- or attention-shaped kernel autotunes over a short list of tile configs, ordered by
preference (the large-M training tile first). Every config is a separate compile (1-3 s each with
``ptxas`` on sm_90) and a timed trial per autotune key, so a cold process pays for the whole list
once per kernel variant. ``FASTFT_AUTOTUNE_MAX=N`` keeps only the first N candidates that survive
each kernel's per-shape pruning (applied inside the pruners, so a shape still gets the tiles made
for it: capping the list before pruning once left the rank-r GEMMs of the LoRA backward with a
128x64 tile for r = 16), trading a little tuning headroom for start-up time: the prepared GPU check
(benchmarks/gpu_check.sh) uses it to fit its time box. Unset or 0 means every surviving config.
"""
from __future__ import annotations

import os


def autotune_max() -> int:
    raw = os.environ.get("FASTFT_AUTOTUNE_MAX", "").strip()
    if not raw:
        return 0
    try:
        n = int(raw)
    except ValueError:
        raise ValueError(f"FASTFT_AUTOTUNE_MAX must be a non-negative integer, got {raw!r}") from None
    if n < 0:
        raise ValueError(f"FASTFT_AUTOTUNE_MAX must be a non-negative integer, got {raw!r}")
    return n


def cap(configs: list) -> list:
    """The first ``FASTFT_AUTOTUNE_MAX`` entries of an ordered candidate list (all when unset)."""
    n = autotune_max()
    return list(configs[:n]) if n else list(configs)
