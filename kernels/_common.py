"""The kernel toolkit: everything the Triton kernel modules share, each concept spelled once.

Host side (plain Python):

* ``interpreting()``: ``TRITON_INTERPRET=1``; kernels then run on CPU tensors through Triton's
  interpreter (how the tests check kernel semantics without a GPU). ``check_device`` refuses other
  CPU tensors with one clear error.
* ``FLOAT_DTYPES`` (fp16 / bf16 / fp32: activations, accumulators' inputs) and ``IO_DTYPES`` (plus
  float64: what a quantizer reads and a dequantizer writes).
* ``dot_flags(dtype)``: the ``UPCAST`` / ``PRECISION`` constexprs of every kernel that multiplies
  through ``mma``. The fp32 rule is the one torch's own CUDA fp32 matmuls follow: TF32 tensor
  cores when ``torch.backends.cuda.matmul.fp32_precision`` is "tf32" -- set directly, through
  ``torch.backends.fp32_precision``, or through the legacy ``torch.set_float32_matmul_precision("high")``
  / ``torch.backends.cuda.matmul.allow_tf32 = True``, which torch maps onto it (reading that one
  setting never raises, where the legacy getters do once both APIs were used) -- exact IEEE fp32
  products otherwise. Under the interpreter always "ieee" (it computes every dot in fp32 anyway).
  16-bit operands ignore the precision.
* ``num_sms(device)``, ``capability(device)``: read once per device (cached), never at import.
* ``draw_seed(generator)``: the Philox seed of in-kernel dropout; ``keep_mask`` materialises the mask
  the kernels regenerate (``dropout_keep``) for any seed, for tests.
* ``rows_per_program(row_len)`` and ``row_settings(n_cols)``: the fixed launch heuristics of row-wise
  kernels (no autotune).
* ``entry(name, fake=...)``: declares a launcher -- a host function that takes tensors and plain
  scalars (types a ``torch.library`` schema can carry), allocates its outputs and launches kernels
  -- as a named entry point with a fake implementation (output shapes, dtypes and devices only).
  Calls go through ``entries()[name].impl``: the raw launcher until the Triton adapter
  (``fastft/ops/triton_backend.py``) binds each entry to a ``torch.library`` custom op of the same
  name (this package imports nothing from fastft), so ``torch.compile`` sees one node per launch and
  a whole step can run on fake CUDA tensors without a GPU.
* ``launch(kernel, grid, ...)``: every launch goes through it (it drops GPU compile options under the
  interpreter and counts launches: ``count_launches`` lets tests assert which kernels a call ran).
* ``Tuned``: a GEMM- or attention-shaped kernel's launch: autotuned on a GPU (configs from a
  function, pruned per call, capped by ``FASTFT_AUTOTUNE_MAX``; configs never run on a GPU left
  out, tuning time-bounded and its picks kept on disk: ``kernels/_autotune.py``), one fixed config under the
  interpreter, the same ``triton.heuristics`` on both paths. ``pinned_configs`` replaces the
  config of chosen kernels for a block (tests exercise other tiles and the TMA / pipelined
  variants; benchmarks pin a tile); ``autotuning`` forces the GPU launch path under the interpreter
  (tests of the autotuner plumbing).

Device side (``@triton.jit`` helpers; constexpr flags are passed by keyword at every call):

* ``mma(a, b, acc, UPCAST=, PRECISION=)``: ``tl.dot`` into an fp32 accumulator. Triton 3.9's
  interpreter computes bf16 dots wrongly, so with ``UPCAST`` (bf16 operands under the interpreter)
  both operands go to fp32 first: exact, bf16 values are fp32 values with a shorter mantissa.
* ``cast(v, dtype, UPCAST=)``: ``v.to(dtype)`` rounding to nearest even; Triton 3.9's interpreter
  truncates fp32 -> bf16, so with ``UPCAST`` the rounding is done by bit arithmetic first.
* ``grouped_pid(pid, M, N, BLOCK_M=, BLOCK_N=, GROUP_M=)``: grouped ("super-row") tile order.
* ``dropout_keep(seed, rows, cols, ncols, p)``: the dropout keep mask of a tile, one Philox counter
  per element.
"""
from __future__ import annotations

import collections
import contextlib
import contextvars
import functools
import os
from typing import Callable

import torch
import triton
import triton.language as tl

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
IO_DTYPES = FLOAT_DTYPES + (torch.float64,)


# ------------------------------------------------------------------------------------- entry points
class Entry:
    """One launcher: ``raw`` (the Python function), ``fake`` (same signature, outputs' metadata
    only), ``mutates_args`` (arguments written in place; the launcher then returns None), and
    ``impl``: what calls run (``raw`` until ``bind``)."""

    def __init__(self, name: str, raw: Callable, fake: Callable, mutates_args: tuple):
        self.name, self.raw, self.fake, self.mutates_args = name, raw, fake, mutates_args
        self.impl = raw

    def bind(self, impl: Callable) -> None:
        self.impl = impl


_ENTRIES: dict[str, Entry] = {}


def entry(name: str, *, fake: Callable, mutates_args: tuple = ()):
    """Decorator: ``fn`` (annotated with schema types: Tensor, Tensor | None, list[Tensor], int,
    float, bool, torch.dtype, torch.device, list[int], their optionals) becomes entry point
    ``name``; the returned function calls the entry's current ``impl``."""

    def deco(fn):
        if name in _ENTRIES:
            raise RuntimeError(f"kernel entry {name} is declared twice")
        e = _ENTRIES[name] = Entry(name, fn, fake, tuple(mutates_args))

        @functools.wraps(fn)
        def call(*args, **kwargs):
            return e.impl(*args, **kwargs)

        call.entry = e
        return call

    return deco


def entries() -> dict[str, Entry]:
    """Every declared entry point (name -> Entry), once the kernel modules are imported."""
    return dict(_ENTRIES)


# ------------------------------------------------------------------------------------ environment
def interpreting() -> bool:
    """Whether Triton runs kernels through its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def device_supported(device: torch.device) -> bool:
    """CUDA tensors, or CPU tensors under the interpreter."""
    return device.type == "cuda" or (device.type == "cpu" and interpreting())


def check_device(device: torch.device, what: str) -> None:
    if not device_supported(device):
        raise ValueError(f"{what}: the Triton kernels need CUDA tensors (or CPU tensors under TRITON_INTERPRET=1); "
                         f"got {device}. Use FASTFT_BACKEND=reference or move the tensors to a GPU.")


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; 4 elsewhere (the interpreter: a small GPU, so that
    tests exercise the split paths that fill a big one)."""
    return _sm_count(_index(device)) if device.type == "cuda" else 4


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def capability(device: torch.device) -> int | None:
    """Compute capability as 80 / 90 / ... for a CUDA device; None elsewhere (the interpreter)."""
    return _capability(_index(device)) if device.type == "cuda" else None


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> int:
    major, minor = torch.cuda.get_device_capability(index)
    return 10 * major + minor


# ---------------------------------------------------------------------------------------- precision
def _tf32_allowed() -> bool:
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):  # torch >= 2.9
        return matmul.fp32_precision == "tf32"
    return torch.get_float32_matmul_precision() != "highest"


def matmul_precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s input_precision for operands of ``dtype`` (the rule in the module docstring)."""
    if dtype == torch.float32 and not interpreting() and _tf32_allowed():
        return "tf32"
    return "ieee"


def upcast(dtype: torch.dtype) -> bool:
    """Whether the interpreter's bf16 workarounds apply to values of ``dtype``."""
    return dtype == torch.bfloat16 and interpreting()


def dot_flags(dtype: torch.dtype) -> dict:
    """The ``UPCAST`` / ``PRECISION`` constexprs for a kernel whose dot operands are ``dtype``."""
    return {"UPCAST": upcast(dtype), "PRECISION": matmul_precision(dtype)}


@triton.jit
def mma(a, b, acc, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """acc + a @ b (fp32 accumulator); see the module docstring for UPCAST."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _rne_bf16(v):
    """fp32 -> the nearest bf16 value (ties to even), still as fp32: integer bit arithmetic."""
    b = v.to(tl.uint32, bitcast=True)
    b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
    return b.to(tl.float32, bitcast=True)


@triton.jit
def cast(v, dtype: tl.constexpr, UPCAST: tl.constexpr):
    """``v.to(dtype)`` rounding to nearest even, also under the interpreter (whose fp32 -> bf16 cast
    truncates, and whose "rtne" mode does not carry into the exponent, in Triton 3.9)."""
    if UPCAST:
        if dtype == tl.bfloat16:
            v = _rne_bf16(v.to(tl.float32))
    return v.to(dtype)


@triton.jit
def grouped_pid(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of a 1-D program id in grouped order: GROUP_M row tiles sweep the column tiles
    together, so the operand tiles they share are re-read from L2 rather than DRAM."""
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * num_n
    first_m = (pid // width) * GROUP_M
    size = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size
    pid_n = (pid % width) // size
    return pid_m, pid_n


# ------------------------------------------------------------------------------------------ dropout
def draw_seed(generator) -> int:
    """A Philox seed in [0, 2³¹) from ``generator`` (or torch's default CPU generator): reproducible
    under ``torch.manual_seed``, no device synchronisation in the default case."""
    if generator is not None:
        return int(torch.randint(0, 2**31 - 1, (1,), generator=generator, device=generator.device).item())
    return int(torch.randint(0, 2**31 - 1, (1,)).item())


@triton.jit
def dropout_keep(seed, rows, cols, ncols, p):
    """Keep flags (True = keep) of the elements (rows, cols) of a (·, ncols) matrix: ``tl.rand(seed,
    row * ncols + col) >= p``, one Philox-4x32 counter per element (int64), so the mask does not
    depend on the tiling and every kernel that needs it regenerates identical bits. ``rows`` and
    ``cols`` are broadcastable index tiles."""
    return tl.rand(seed, rows.to(tl.int64) * ncols + cols) >= p


@triton.jit(do_not_specialize=["seed"])
def _keep_mask_kernel(OUT, seed, p, ROWS, COLS, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    keep = dropout_keep(seed, rows[:, None], cols[None, :], COLS, p)
    mask = (rows[:, None] < ROWS) & (cols[None, :] < COLS)
    tl.store(OUT + rows[:, None].to(tl.int64) * COLS + cols[None, :], keep.to(tl.int8), mask=mask)


def _keep_mask_fake(seed: int, rows: int, cols: int, p: float, device: torch.device) -> torch.Tensor:
    return torch.empty(max(rows, 1), max(cols, 1), dtype=torch.int8, device=device)


@entry("triton_keep_mask", fake=_keep_mask_fake)
def _keep_mask_int8(seed: int, rows: int, cols: int, p: float, device: torch.device) -> torch.Tensor:
    out = torch.empty(max(rows, 1), max(cols, 1), dtype=torch.int8, device=device)
    if rows and cols:
        grid = (triton.cdiv(rows, 64), triton.cdiv(cols, 64))
        launch(_keep_mask_kernel, grid, out, int(seed), float(p), rows, cols, BLOCK_R=64, BLOCK_C=64)
    return out


def keep_mask(seed: int, rows: int, cols: int, p: float, device) -> torch.Tensor:
    """The (rows, cols) bool mask ``dropout_keep`` gives for ``seed`` (tests, debugging)."""
    return _keep_mask_int8(int(seed), int(rows), int(cols), float(p), torch.device(device))[:rows, :cols].bool()


# --------------------------------------------------------------------------------- row kernels
def rows_per_program(row_len: int, elements: int = 4096) -> int:
    """Rows of ``row_len`` elements a row-wise kernel handles per program: about ``elements`` in
    flight per program keeps enough bytes moving per SM without register pressure, and gives one
    compiled variant per row length."""
    return max(1, elements // row_len)


def row_settings(n_cols: int, max_block: int = 65536) -> tuple[int, int]:
    """(BLOCK, num_warps) of a kernel holding one whole row of ``n_cols`` elements per program
    (RMSNorm, softmax): the row padded to a power of two, 4 warps up to 2K elements, then one more
    doubling of warps per doubling of the row up to 32 (at most 64 elements per thread)."""
    block = triton.next_power_of_2(max(int(n_cols), 1))
    if block > max_block:
        raise ValueError(f"a row of {n_cols} elements exceeds the largest row block ({max_block})")
    warps = min(32, max(4, block // 512))
    return block, warps


# ------------------------------------------------------------------------------------------ launches
_GPU_OPTIONS = ("num_warps", "num_stages", "num_ctas", "enable_fp_fusion", "maxnreg")
_counters: list[collections.Counter] = []


def _name(kernel) -> str:
    while type(kernel).__name__ in ("Autotuner", "Heuristics"):
        kernel = kernel.fn
    return kernel.fn.__name__  # JITFunction / InterpretedFunction: the Python function


def launch(kernel, grid, *args, **kwargs):
    """``kernel[grid](*args, **kwargs)``; GPU compile options are dropped under the interpreter."""
    if _counters:
        name = _name(kernel)
        for c in _counters:
            c[name] += 1
    if interpreting():
        kwargs = {k: v for k, v in kwargs.items() if k not in _GPU_OPTIONS}
    return kernel[grid](*args, **kwargs)


@contextlib.contextmanager
def count_launches():
    """Yields a Counter of kernel launches by kernel name (``_attn_fwd_kernel``, ...) made inside
    the block, through ``launch`` or a ``Tuned`` (every launch in this package)."""
    c: collections.Counter = collections.Counter()
    _counters.append(c)
    try:
        yield c
    finally:
        del _counters[next(i for i, other in enumerate(_counters) if other is c)]  # (equal counters are not it)


@triton.jit
def row_param(W, N, BLOCK: tl.constexpr):
    """A row-wise kernel's column offsets, their mask and the fp32 per-column parameter W[cols]."""
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    return cols, mask, tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)


def autotune_max() -> int:
    """``FASTFT_AUTOTUNE_MAX``: keep only the first N candidates that survive a kernel's per-shape
    pruning (0 or unset: all). Every config is a compile (1-3 s with ptxas on sm_90) and a timed
    trial per autotune key, so a cold process pays for the whole list once per kernel variant; the
    time-boxed GPU check (benchmarks/gpu_check.sh) caps it. The cap applies after pruning, so a
    shape still gets the tiles made for it."""
    return env_nonnegative("FASTFT_AUTOTUNE_MAX", 0, int, "a non-negative integer")


def env_nonnegative(name: str, default, cast, what: str):
    """The environment variable ``name`` parsed by ``cast`` (``default`` when unset or blank); a
    value that does not parse or is negative is a ValueError naming the variable and ``what`` it
    must be."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        v = cast(raw)
    except ValueError:
        raise ValueError(f"{name} must be {what}, got {raw!r}") from None
    if v < 0:
        raise ValueError(f"{name} must be {what}, got {raw!r}")
    return v


def cap(configs: list) -> list:
    """The first ``FASTFT_AUTOTUNE_MAX`` entries of an ordered candidate list (all when unset)."""
    n = autotune_max()
    return list(configs[:n]) if n else list(configs)


_PINNED: contextvars.ContextVar[dict] = contextvars.ContextVar("fastft_pinned_configs", default={})
_AUTOTUNING: contextvars.ContextVar = contextvars.ContextVar("fastft_autotuning", default=None)


class Tuned:
    """How one autotuned kernel is launched.

    ``configs()`` lists the GPU candidates in order of preference; ``prune`` (Triton's
    ``early_config_prune``: ``prune(configs, named_args, **kwargs)``) cuts them per call, ``key`` names
    the arguments a tuning is cached by, ``heuristics`` maps constexpr names to functions of the
    call's arguments and the config (``triton.heuristics``), ``restore_value`` names outputs the
    autotuner restores between trials (kernels that read their output). Under the interpreter
    the kernel runs the single ``interpret`` config, the heuristics computed the same way.
    Launch with ``tuned[grid](*args, **kwargs)`` (``grid`` a tuple or a function of the config).
    The autotuner is built on first use: nothing happens at import time.
    """

    def __init__(self, kernel, *, configs: Callable[[], list], key: list, interpret: triton.Config, prune=None,
                 heuristics: dict | None = None, restore_value: list | None = None):
        self.kernel = kernel
        self.name = _name(kernel)
        self.configs = configs
        self.key = list(key)
        self.interpret = interpret
        self.prune = prune
        self.heuristics = dict(heuristics or {})
        self.restore_value = restore_value
        self._autotuner = None

    def _build(self, configs: list, do_bench=None):
        fn = triton.heuristics(self.heuristics)(self.kernel) if self.heuristics else self.kernel
        prune = {"early_config_prune": self.prune} if self.prune is not None else None
        return triton.autotune(configs, key=self.key, prune_configs_by=prune, restore_value=self.restore_value,
                               do_bench=do_bench)(fn)

    def autotuner(self):
        """The autotuned wrapper (``autotuning`` swaps in one over its chosen configs)."""
        forced = _AUTOTUNING.get()
        if forced is not None:
            if self.name not in forced.wrappers:
                forced.wrappers[self.name] = self._build(forced.select(self.configs()), forced.bench)
            return forced.wrappers[self.name]
        if self._autotuner is None:
            # Configs that never ran on a GPU stay out unless FASTFT_UNVALIDATED_CONFIGS=1; tuning
            # is time-bounded and its picks persist on disk (kernels/_autotune.py).
            from . import _autotune

            self._autotuner = _autotune.policy(self._build(_autotune.admitted(self.configs())), self.name)
        return self._autotuner

    def __getitem__(self, grid):
        return functools.partial(self.launch, grid)

    def launch(self, grid, *args, **kwargs):
        cfg = _PINNED.get().get(self.name)
        if cfg is None and interpreting() and _AUTOTUNING.get() is None:
            cfg = self.interpret
        if cfg is None:
            return launch(self.autotuner(), grid, *args, **kwargs)
        meta = dict(cfg.kwargs)
        if self.heuristics:
            named = {**dict(zip(self.kernel.arg_names, args)), **kwargs, **meta}
            for k, f in self.heuristics.items():
                meta[k] = named[k] = f(named)
        grid = grid(meta) if callable(grid) else grid
        return launch(self.kernel, grid, *args, **kwargs, **meta, num_warps=cfg.num_warps,
                      num_stages=cfg.num_stages)


def config(num_warps: int = 4, num_stages: int = 1, **kwargs) -> triton.Config:
    """``triton.Config(kwargs, num_warps=, num_stages=)``, the spelling config tables use."""
    return triton.Config(kwargs, num_warps=num_warps, num_stages=num_stages)


@contextlib.contextmanager
def pinned_configs(pins: dict):
    """Run the given kernels with one config each instead of autotuning (or of the interpreter's
    config) inside the block: ``pins`` maps a ``Tuned`` to a ``triton.Config``, or to a dict of
    constexprs that overrides its interpreter config (``{attention.ATTN_FWD: dict(BLOCK_M=64,
    USE_TMA=True)}``). Context-local (a ContextVar), so concurrent threads are not affected."""
    table = dict(_PINNED.get())
    for tuned, cfg in pins.items():
        if isinstance(cfg, dict):
            base = tuned.interpret
            cfg = triton.Config({**base.kwargs, **cfg}, num_warps=base.num_warps, num_stages=base.num_stages)
        table[tuned.name] = cfg
    token = _PINNED.set(table)
    try:
        yield
    finally:
        _PINNED.reset(token)


class _Autotuning:
    def __init__(self, select, bench):
        self.select, self.bench, self.wrappers = select, bench, {}


def _run_once(kernel_call, quantiles=None):
    kernel_call()
    return 1.0


@contextlib.contextmanager
def autotuning(select: Callable[[list], list] = lambda configs: configs, bench=_run_once):
    """Launch every ``Tuned`` kernel through its autotuner inside the block, under the interpreter
    too (tests of the GPU launch path: pruning on the call's arguments, the heuristics,
    restore_value), over the configs ``select`` keeps, each candidate timed by ``bench(kernel_call,
    quantiles)`` (default: run it once and report 1.0, since the interpreter cannot time)."""
    token = _AUTOTUNING.set(_Autotuning(select, bench))
    try:
        yield
    finally:
        _AUTOTUNING.reset(token)
