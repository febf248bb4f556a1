"""Shared benchmark machinery: timing, ceilings, environment, and the results files.

Writing a benchmark (``benchmarks/bench_<name>.py``)::

    from . import common

    def run(suite):                      # suite: "cpu" or "gpu"
        dev = common.device_for(suite)   # torch.device; raises if the suite's device is absent
        t = common.bench(lambda: f(x), device=dev)          # median seconds
        tb = common.bench(lambda: baseline(x), device=dev)
        return [common.row("f 4096x4096", "fastft", t, bytes=..., baseline="torch", baseline_s=tb,
                           ceiling="copy"),
                common.row("f 4096x4096", "torch", tb, bytes=...)]

Rows are flat dicts. ``row()`` fills in the physical units: ``gbps`` from ``bytes`` (read +
written), ``tflops`` from ``flops``, ``tokens_per_s`` from ``tokens``, the percentage of the
measured ceiling (``ceiling="copy"`` -> copy bandwidth, ``"matmul"`` / ``"matmul_bf16"`` -> dense
matmul rate of the suite's device) and ``speedup`` = baseline_s / median_s. ``benchmarks.run``
adds ``bench`` (module name), ``suite``, ``date``, ``commit``, ``device`` and ``versions`` to every
row, appends them as JSON lines to ``benchmarks/results/<suite>.jsonl`` and rewrites
``benchmarks/results/<suite>.md`` (the latest run as a table) and ``<suite>_<bench>.png``.

Timing: the median over repeated calls -- ``torch.utils.benchmark.Timer.blocked_autorange`` on CPU
(which also sets the thread count explicitly), ``triton.testing.do_bench`` on CUDA (L2 flushed
between calls, events for timing). Never time a first call: warm-up runs happen before.
"""
from __future__ import annotations

import datetime as _dt
import functools
import importlib.metadata
import json
import math
import os
import platform
import subprocess
from typing import Callable

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _results_dir() -> str:
    """Where rows are recorded: ``$FASTFT_RESULTS_DIR``; else ``benchmarks/results`` in a checkout (the
    committed rows); else, for an installed copy (``fastft.benchmarks``), ``fastft-bench-results`` in the
    working directory rather than inside site-packages."""
    if os.environ.get("FASTFT_RESULTS_DIR"):
        return os.path.abspath(os.environ["FASTFT_RESULTS_DIR"])
    if os.path.isfile(os.path.join(REPO, "pyproject.toml")) and os.path.isdir(os.path.join(REPO, "fastft")):
        return os.path.join(REPO, "benchmarks", "results")
    return os.path.join(os.getcwd(), "fastft-bench-results")


RESULTS_DIR = _results_dir()


# --------------------------------------------------------------------------------------------
# Devices and timing
# --------------------------------------------------------------------------------------------
def device_for(suite: str) -> torch.device:
    if suite == "cpu":
        return torch.device("cpu")
    if suite == "gpu":
        if not torch.cuda.is_available():
            raise RuntimeError("the gpu suite needs a CUDA device, and torch sees none")
        return torch.device("cuda")
    raise ValueError(f"suite must be 'cpu' or 'gpu', got {suite!r}")


def quick() -> bool:
    """``FASTFT_BENCH_QUICK=1``: the GPU benchmarks run only the shapes the issues' targets name
    first (attention D = 128 at T 4k / 8k; quant-matmul M 1, 16, 8192 at two weight shapes; LoRA
    M = 8192, r = 16): a lent GPU's short time box then covers every module."""
    return os.environ.get("FASTFT_BENCH_QUICK", "0") not in ("", "0")


def bench(fn: Callable[[], object], *, device=None, min_run_time: float = 1.0, warmup: int = 2) -> float:
    """Median seconds per call of ``fn``.

    CPU: ``warmup`` untimed calls, then torch.utils.benchmark's blocked autorange for at least
    ``min_run_time`` seconds (each block runs enough calls to dwarf the timer overhead).
    CUDA: ``triton.testing.do_bench`` (median, ms -> s).
    """
    device = torch.device(device or "cpu")
    if device.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3
    import torch.utils.benchmark as tub

    for _ in range(warmup):
        fn()
    m = tub.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads()).blocked_autorange(
        min_run_time=min_run_time)
    return float(m.median)


def bench_graph(fn: Callable[[], object], *, reps: int = 50, flush_bytes: int = 256 << 20) -> float:
    """CUDA: seconds per call of ``fn`` replayed from a CUDA graph, each call after an L2 flush.

    Decode-sized ops take a few microseconds, less than the Python and launch overhead around them,
    so ``bench`` (do_bench) times the host path there. Serving engines run decode under CUDA graphs;
    this times the same way: ``reps`` x (zero a ``flush_bytes`` buffer, ``fn()``) captured in one
    graph, minus a graph of the flushes alone (median of 5 replays each). Warm-up calls (JIT,
    autotuning, cached tables) run first on the capture stream, outside the graph.
    """
    buf = torch.empty(flush_bytes, dtype=torch.int8, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.synchronize()

    def capture(with_fn: bool):
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, stream=stream):
            for _ in range(reps):
                buf.zero_()
                if with_fn:
                    fn()
        return g

    def timed(g) -> float:
        g.replay()
        torch.cuda.synchronize()
        ts = []
        for _ in range(5):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            g.replay()
            b.record()
            torch.cuda.synchronize()
            ts.append(a.elapsed_time(b) / 1e3)
        return sorted(ts)[2]

    full, flush = capture(True), capture(False)
    return max(1e-9, (timed(full) - timed(flush)) / reps)


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, MiB (Linux ru_maxrss is in KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# --------------------------------------------------------------------------------------------
# Ceilings, measured on the machine at hand (cached per process)
# --------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def copy_bandwidth(device: str = "cpu", nbytes: int = 256 << 20) -> float:
    """Bytes/s of a preallocated ``dst.copy_(src)``, counting bytes read + written."""
    dev = torch.device(device)
    n = nbytes // 4
    src = torch.randn(n, device=dev)
    dst = torch.empty_like(src)
    t = bench(lambda: dst.copy_(src), device=dev)
    return 2 * nbytes / t


@functools.lru_cache(maxsize=None)
def matmul_rate(device: str = "cpu", dtype: torch.dtype = torch.float32, n: int | None = None,
                torch_mm_only: bool = False) -> float:
    """FLOP/s of a square dense matmul (2n³ FLOPs) in ``dtype`` (torch.mm into a preallocated
    output; for fp32 on CPU the faster of that and oneDNN's GEMM unless ``torch_mm_only``)."""
    dev = torch.device(device)
    n = n or (2048 if dev.type == "cpu" else 8192)
    a = torch.randn(n, n, device=dev).to(dtype)
    b = torch.randn(n, n, device=dev).to(dtype)
    c = torch.empty(n, n, device=dev, dtype=dtype)
    t = bench(lambda: torch.mm(a, b, out=c), device=dev)
    if dev.type == "cpu" and dtype == torch.float32 and torch_mm_only is False:
        # torch's fp32 CPU mm is MKL's sgemm, which on non-Intel CPUs runs AVX2 code: the machine's
        # fp32 rate is the faster of it and oneDNN's AVX-512 GEMM (what fastft's CPU path calls).
        from fastft.ops import cpu_gemm

        if cpu_gemm.uses_onednn():
            t = min(t, bench(lambda: cpu_gemm.mm(a, b), device=dev))
    return 2 * n ** 3 / t


def ceiling_value(ceiling: str, device: str) -> tuple[float, str]:
    """(value, unit key) of a named ceiling."""
    if ceiling == "copy":
        return copy_bandwidth(device) / 1e9, "gbps"
    if ceiling == "matmul":
        return matmul_rate(device, torch.float32) / 1e12, "tflops"
    if ceiling == "matmul_bf16":
        return matmul_rate(device, torch.bfloat16) / 1e12, "tflops"
    raise ValueError(f"unknown ceiling {ceiling!r} (copy, matmul, matmul_bf16)")


def ceilings(device: str) -> list[dict]:
    """Rows for the ceilings themselves, so every results file states them. With
    ``FASTFT_BENCH_QUICK=1`` on a CPU the shapes are small (a smoke run; bf16 GEMMs without native
    bf16 instructions take a minute at 2048^3)."""
    cpu = torch.device(device).type == "cpu"
    small = cpu and quick()
    mib = 16 if small else 256
    rows = [row(f"ceiling: copy_ {mib} MiB fp32 (read + write)", "torch",
                2 * (mib << 20) / copy_bandwidth(device, mib << 20), bytes=2 * (mib << 20))]
    n = 256 if small else 2048 if cpu else 8192
    for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        rate = matmul_rate(device, dt, n)
        rows.append(row(f"ceiling: matmul {n}^3 {name}", "torch" if name == "bf16" or not cpu else
                        "fastest of torch.mm / oneDNN", 2 * n ** 3 / rate, flops=2 * n ** 3))
        if name == "fp32" and cpu:
            t = 2 * n ** 3 / matmul_rate(device, dt, n, torch_mm_only=True)
            rows.append(row(f"matmul {n}^3 fp32 through torch.mm (MKL sgemm)", "torch", t, flops=2 * n ** 3,
                            ceiling="matmul"))
    return rows


# --------------------------------------------------------------------------------------------
# Rows
# --------------------------------------------------------------------------------------------
def row(case: str, impl: str, median_s: float, *, bytes: float | None = None, flops: float | None = None,
        tokens: float | None = None, ceiling: str | None = None, device: str = "cpu", baseline: str | None = None,
        baseline_s: float | None = None, **extra) -> dict:
    """One result: ``case`` (what), ``impl`` (who), median seconds, and the derived metrics."""
    r = {"case": case, "impl": impl}
    if median_s is None:  # a count, not a timing (e.g. bytes saved for backward)
        r.update(extra)
        stream(r)
        return r
    r["median_ms"] = round(median_s * 1e3, 4)
    if bytes is not None:
        r["gbps"] = round(bytes / median_s / 1e9, 3)
    if flops is not None:
        r["tflops"] = round(flops / median_s / 1e12, 4)
    if tokens is not None:
        r["tokens_per_s"] = round(tokens / median_s, 2)
    if ceiling is not None:
        value, key = ceiling_value(ceiling, device)
        if key in r:
            r["ceiling"] = ceiling
            r["pct_of_ceiling"] = round(100.0 * r[key] / value, 1)
    if baseline is not None and baseline_s is not None:
        r["baseline"] = baseline
        r["speedup"] = round(baseline_s / median_s, 3)
    r.update(extra)
    stream(r)
    return r


# Streaming: with ``FASTFT_BENCH_STREAM=path`` every row is also appended to that file the moment it
# is made (``benchmarks.run`` writes the environment as its first line and sets ``CURRENT_BENCH``), so
# a run cut short by a time box still leaves its rows; ``python -m benchmarks.run --ingest path``
# records them into the results files afterwards.
CURRENT_BENCH: str | None = None


def stream(r: dict) -> None:
    path = os.environ.get("FASTFT_BENCH_STREAM")
    if not path:
        return
    line = {**r, "bench": r.get("bench", CURRENT_BENCH)} if CURRENT_BENCH else r
    with open(path, "a") as f:
        f.write(json.dumps(line, sort_keys=True) + "\n")


# --------------------------------------------------------------------------------------------
# Environment
# --------------------------------------------------------------------------------------------
def _version(pkg: str) -> str | None:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None


def versions() -> dict:
    v = {p: _version(p) for p in ("torch", "triton", "transformers", "peft", "bitsandbytes")}
    v["python"] = platform.python_version()
    try:
        from fastft.ops import cpp

        v["fastft_cpu_isa"] = cpp.isa() if cpp.AVAILABLE else None
    except Exception:  # the benchmark still runs without the extension
        v["fastft_cpu_isa"] = None
    return v


def git_commit() -> str | None:
    if os.environ.get("FASTFT_COMMIT"):  # a copy of the tree without .git (e.g. a lent device machine)
        return os.environ["FASTFT_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> dict:
    """The ISA features that decide which GEMM / kernel code runs on this CPU (MKL, oneDNN and
    fastft's C++ kernels each pick code by them): a CPU number means little without them."""
    want = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    return {k: k in have for k in want}
    except OSError:
        pass
    return {}


def allocator_env() -> dict:
    """Environment that changes the allocator (glibc malloc tunables, a preloaded allocator)."""
    return {k: v for k, v in os.environ.items()
            if k.startswith("MALLOC_") or k in ("LD_PRELOAD", "PYTORCH_CUDA_ALLOC_CONF", "OMP_NUM_THREADS")}


def machine(suite: str = "cpu") -> dict:
    """What the numbers were measured on."""
    m = {"cpu": _cpu_model(), "logical_cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
         "platform": platform.platform(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
         "cpu_flags": [k for k, v in cpu_flags().items() if v], "allocator_env": allocator_env()}
    try:
        import psutil

        m["memory_gb"] = round(psutil.virtual_memory().total / 2 ** 30, 1)
    except ImportError:
        pass
    try:
        m["load_avg_1m"] = round(os.getloadavg()[0], 2)  # other processes skew CPU timings
    except OSError:
        pass
    if suite == "gpu" and torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        m.update(gpu=p.name, gpu_memory_gb=round(p.total_memory / 2 ** 30, 1), cuda=torch.version.cuda)
    return m


def environment(suite: str) -> dict:
    return {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "suite": suite,
            "commit": git_commit(), "machine": machine(suite), "versions": versions()}


# --------------------------------------------------------------------------------------------
# Results files
# --------------------------------------------------------------------------------------------
_COLUMNS = ["bench", "case", "impl", "median_ms", "gbps", "tflops", "tokens_per_s", "pct_of_ceiling", "baseline",
            "speedup", "peak_rss_mb", "saved_mb", "saved_vs_peft", "error"]


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.0f}"
    return str(v).replace("|", "\\|")


def markdown(rows: list[dict], env: dict) -> str:
    cols = [c for c in _COLUMNS if any(c in r for r in rows)]
    m, v = env["machine"], env["versions"]
    lines = [
        f"# fastft benchmarks, suite `{env['suite']}`",
        "",
        f"- date: {env['date']}, commit: `{env['commit']}`",
        "- machine: " + ", ".join(f"{k}={val}" for k, val in m.items()),
        "- versions: " + ", ".join(f"{k} {val}" for k, val in v.items()),
        "- times are medians; gbps counts bytes read + written; pct_of_ceiling is relative to the measured "
        "ceiling rows; speedup = baseline time / this time.",
        "",
        "| " + " | ".join(cols) + " |",
        "|" + "---|" * len(cols),
    ]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def markdown_history(jsonl: str) -> str:
    """Every run recorded in a .jsonl file, newest first, one table per run (date + commit)."""
    runs: dict[tuple, list[dict]] = {}
    with open(jsonl) as f:
        for line in f:
            if line.strip():
                r = json.loads(line)
                runs.setdefault((r.get("date"), r.get("commit")), []).append(r)
    parts = []
    for (date, commit), rows in sorted(runs.items(), key=lambda kv: kv[0][0] or "", reverse=True):
        env = {"suite": rows[0].get("suite"), "date": date, "commit": commit, "machine": rows[0].get("machine", {}),
               "versions": rows[0].get("versions", {})}
        parts.append(markdown(rows, env))
    return "\n".join(parts)


def plot(rows: list[dict], path: str, title: str) -> bool:
    """Horizontal bars of the main metric of each row (GB/s, TFLOP/s, tokens/s, else ms)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = [r for r in rows if "error" not in r and "median_ms" in r]  # counts have no bar
    if not rows:
        return False
    for key, label in (("gbps", "GB/s"), ("tflops", "TFLOP/s"), ("tokens_per_s", "tokens/s"), ("median_ms", "ms")):
        if all(key in r for r in rows):
            break
    else:  # mixed rows: time, on a log axis
        key, label = "median_ms", "median ms, log scale (lower is better)"
    labels = [f"{r['case']} [{r['impl']}]" for r in rows]
    vals = [r.get(key, math.nan) for r in rows]
    fig, ax = plt.subplots(figsize=(10, 0.35 * len(rows) + 1.2))
    ax.barh(range(len(rows)), vals, color=["tab:blue" if r["impl"].startswith("fastft") else "tab:gray" for r in rows])
    ax.set_yticks(range(len(rows)), labels, fontsize=7)
    ax.invert_yaxis()
    if key == "median_ms":  # mixed cases span microseconds to seconds
        ax.set_xscale("log")
    for i, r in enumerate(rows):  # the headline ratio next to each bar
        if "speedup" in r:
            ax.annotate(f" {r['speedup']:.2f}x vs {r['baseline']}", (vals[i], i), va="center", fontsize=6)
    ax.set_xlabel(label)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    tmp = path + ".tmp"
    fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return True


def record(suite: str, rows: list[dict], env: dict, results_dir: str = RESULTS_DIR) -> dict:
    """Append rows (with the environment) to <suite>.jsonl; rewrite <suite>.md and the plots."""
    os.makedirs(results_dir, exist_ok=True)
    full = [{**r, **{k: env[k] for k in ("date", "suite", "commit")}, "machine": env["machine"],
             "versions": env["versions"]} for r in rows]
    jsonl = os.path.join(results_dir, f"{suite}.jsonl")
    with open(jsonl, "a") as f:
        for r in full:
            f.write(json.dumps(r, sort_keys=True) + "\n")
    md = os.path.join(results_dir, f"{suite}.md")
    with open(md, "w") as f:
        f.write(markdown_history(jsonl))
    plots = []
    for bench_name in dict.fromkeys(r.get("bench", "misc") for r in rows):
        p = os.path.join(results_dir, f"{suite}_{bench_name}.png")
        if plot([r for r in rows if r.get("bench", "misc") == bench_name], p, f"{suite} / {bench_name}  ({env['date']})"):
            plots.append(p)
    return {"jsonl": jsonl, "md": md, "plots": plots}
