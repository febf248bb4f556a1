"""glibc's allocator during CPU training: freed activations go back to the operating system.

PyTorch on the CPU has no caching allocator: every tensor is a ``posix_memalign`` block from the C
library. glibc serves blocks below its *dynamic* mmap threshold from its heap, and raises that
threshold (up to 32 MiB) each time it frees a mapped block; a training step's activations (16 MiB
per (2048 tokens x 2048 hidden) fp32 tensor at Llama-3.2-1B) then land in the heap, interleaved with
small long-lived blocks, and the heap keeps the freed ones: the process's peak RSS exceeds its live
tensor bytes by hundreds of MB to GB (measured in docs/memory.md: +37 % to +85 % at the 1B shape).

``lean_cpu_allocator(threshold)`` fixes the mmap threshold (``mallopt(M_MMAP_THRESHOLD)``; a fixed
value turns the dynamic adjustment off) and the heap trim threshold (``M_TRIM_THRESHOLD``), then trims
the heap once (``malloc_trim(0)``): every block of ``threshold`` bytes or more is mapped on
allocation and unmapped when freed, so peak RSS approaches the live tensor bytes (the CPU analog of
``max_memory_allocated``). The cost: each such allocation faults in fresh zeroed pages (+18 % to
+28 % step time in the 1B rows of docs/memory.md). Process-wide and for the rest of the process (glibc
cannot restore its dynamic state). Only where glibc's malloc serves the process (Linux, no allocator
preloaded); elsewhere it returns False and changes nothing. The trainer applies it with
``TrainingArguments(lean_cpu_allocator=True)`` / ``fastft train --lean-cpu-allocator`` when training
on the CPU. The environment variables ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` do the
same from process start.
"""
from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD = -1  # glibc malloc.h
M_MMAP_THRESHOLD = -3
DEFAULT_THRESHOLD = 1 << 20  # 1 MiB: activations, logits chunks, dequantized weights are all larger
MAX_THRESHOLD = 1 << 25  # glibc refuses an mmap threshold above HEAP_MAX_SIZE / 2 (32 MiB on 64-bit)

_applied: int | None = None


def _glibc():
    """The process's C library when it is glibc and serves malloc; else None."""
    if not sys.platform.startswith("linux"):
        return None
    if "malloc" in os.environ.get("LD_PRELOAD", ""):  # jemalloc / tcmalloc: mallopt would not reach them
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 -- glibc only
        libc.mallopt, libc.malloc_trim  # noqa: B018
    except (OSError, AttributeError):
        return None
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt.restype = ctypes.c_int
    libc.malloc_trim.argtypes = [ctypes.c_size_t]
    return libc


def lean_cpu_allocator(threshold: int = DEFAULT_THRESHOLD) -> bool:
    """Fix glibc's mmap and trim thresholds at ``threshold`` bytes (module docstring); True when
    applied, False where the process's malloc is not glibc's (nothing changed)."""
    global _applied
    if isinstance(threshold, bool) or not isinstance(threshold, int) or not 4096 <= threshold <= MAX_THRESHOLD:
        raise ValueError(f"lean_cpu_allocator: threshold must be an int number of bytes in [4096, {MAX_THRESHOLD}], "
                         f"got {threshold!r}")
    libc = _glibc()
    if libc is None:
        return False
    if libc.mallopt(M_MMAP_THRESHOLD, threshold) != 1 or libc.mallopt(M_TRIM_THRESHOLD, threshold) != 1:
        return False
    libc.malloc_trim(0)
    _applied = threshold
    return True


def trim() -> bool:
    """Return the free memory at the top of glibc's heap to the OS now (``malloc_trim(0)``); False
    where malloc is not glibc's."""
    libc = _glibc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True


def applied_threshold() -> int | None:
    """The threshold ``lean_cpu_allocator`` set in this process, or None."""
    return _applied


__all__ = ["lean_cpu_allocator", "trim", "applied_threshold", "DEFAULT_THRESHOLD"]
