"""Peak memory of a QLoRA training step on the CUDA code path, estimated without a GPU.

Method (docs/memory.md): the whole step -- forward with labels, backward, AdamW, twice -- is traced
on fake CUDA tensors (``fastft.memory``): fastft's kernels are custom ops with fake
implementations, so the trace follows the CUDA code (Triton attention, the lean NF4 dequantize +
cuBLAS LoRA node, the GPU-sized chunked loss); live tensor storage is counted per op and its peak
is the estimate of ``torch.cuda.max_memory_allocated``. The same accounting is validated on the CPU
path against the measured peak RSS of the real step (``--validate``).

Rows (benchmarks/results/mem_estimate.jsonl + .md):

* ``cuda-estimate``: fastft native + fastft.get_peft_model vs transformers + PEFT + bitsandbytes'
  memory (``fastft.memory.Linear4bitEmulation``: bitsandbytes cannot wrap fake tensors) with SDPA
  (FlashAttention), at the Llama-3.2-1B and Llama-3.1-8B shapes, seq 2048 and 8192, batch 1,
  LoRA r = 16 all-linear, NF4 + double quant, bf16 weights + bf16 autocast, gradient
  checkpointing on;
* ``cuda-longest``: the longest sequence each fits at the 8B shape in an 80 GB GPU (``BUDGET``);
* ``cpu-validation``: the fake-tensor estimate of the CPU step against its measured peak RSS.

Usage::

    python -m benchmarks.mem_estimate                 # table + longest + validation, written
    python -m benchmarks.mem_estimate --only table    # or longest / validate
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

GiB = float(2 ** 30)
HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
# An 80 GB card (H100 / A100 80GB) shows 79.6 GiB to torch; ~0.6 GiB goes to the CUDA context and
# cuBLAS workspaces outside max_memory_allocated, and the caching allocator's fragmentation is not
# estimated: the budget for the traced peak is 79 GiB.
BUDGET = 79 * GiB
LONG_POSITIONS = 1 << 21  # the longest-sequence search's position limit (see longest())
# With the memory options the answer is near a million tokens and one trace there takes minutes:
# the search starts at 64k, guesses ~1M next (the per-token slope between 8k and 64k), and
# brackets the answer to 16k tokens.
LONGEST_SEARCH = {"fastft-lean": {"start": 65536, "second": 983040, "quantum": 16384}}
SHAPES = ("llama-3.2-1b", "llama-3.1-8b")
SEQS = (2048, 8192)
BASE = {"batch": 1, "quant": "nf4", "device": "cuda", "dtype": "bfloat16", "autocast": True, "r": 16, "steps": 2,
        "checkpointing": True}
STACK_NAMES = {"fastft": "fastft native + get_peft_model",
               "fastft-lean": "fastft, memory options on (see LEAN)",
               "hf": "transformers + PEFT + bitsandbytes (memory emulated) + SDPA flash"}
# fastft's memory options (all exact: the same values and gradients as the default step): the
# checkpointed layer inputs offloaded to pinned host memory (--gradient-checkpointing offload),
# the tiled MLP (--tiled-mlp 8192), 128 MiB loss chunks, and the frozen embedding and LM head kept
# in host memory (--offload-embeddings: rows gathered on the host, the LM head streamed through
# the loss in vocabulary chunks).
# (A tied embedding / LM head -- Llama-3.2-1B -- moves as one host table.)
LEAN = {"offload": True, "tile_tokens": 8192, "ce_chunk_bytes": 1 << 27, "host_frozen": True}
CONFIGS = {"fastft": {"stack": "fastft"}, "fastft-lean": {"stack": "fastft", **LEAN}, "hf": {"stack": "hf"}}


def config_spec(config: str, model: str) -> dict:
    """The spec of ``config`` at shape ``model`` (the same at every shape: a tied table moves as one)."""
    return dict(CONFIGS[config])

# The CPU validation: a small-but-not-tiny model (SmolLM2-135M's shape: ~0.2 GB QLoRA / 0.5 GB
# LoRA in fp32), fp32 (this CPU has no native bf16), 2 steps.
VALIDATE = [dict(stack="fastft", model="smollm2-135m", batch=1, seq=1024, quant="nf4", device="cpu", dtype="float32",
                 autocast=False, r=16, steps=2),
            dict(stack="fastft", model="smollm2-135m", batch=1, seq=1024, quant=None, device="cpu", dtype="float32",
                 autocast=False, r=16, steps=2)]


def _env() -> dict:
    import torch

    return {"torch": torch.__version__, "python": platform.python_version(), "host": platform.node(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def table() -> list[dict]:
    from fastft.memory import run_traced

    specs = [{**BASE, **config_spec(c, m), "config": c, "model": m, "seq": s} for m in SHAPES for s in SEQS
             for c in CONFIGS]
    rows = []
    for r in run_traced(specs, timeout=1800):
        rows.append({"kind": "cuda-estimate", **_clean(r)})
        _print_row(rows[-1])
    return rows


def longest(only=None) -> list[dict]:
    from fastft.memory import run_traced

    from fastft.models.synthetic import SHAPES as MODEL_SHAPES

    # Llama-3.1-8B's context is 131,072 positions; past it the model refuses its input. The search
    # lifts that limit (RoPE as configured: memory does not depend on it), as long-context claims
    # for this model do (context extension).
    shape = {**MODEL_SHAPES["llama-3.1-8b"], "max_position_embeddings": LONG_POSITIONS}
    specs = [{**BASE, **config_spec(c, "llama-3.1-8b"), "config": c, "model": shape, "longest_within_bytes": BUDGET,
              **LONGEST_SEARCH.get(c, {})} for c in (only or CONFIGS)]
    rows = []
    for r in run_traced(specs, timeout=7200):
        r = {**r, "model": "llama-3.1-8b", "max_position_embeddings": LONG_POSITIONS}
        rows.append({"kind": "cuda-longest", **_clean(r)})
        print(f"longest 8B {r['config']}: fits {r.get('fits')} (peak {r.get('fits_peak_bytes', 0) / GiB:.2f} GiB), "
              f"exceeds {r.get('exceeds')}  {r.get('error', '')}", flush=True)
    return rows


def _clean(r: dict) -> dict:
    r = {k: v for k, v in r.items() if k != "stderr_tail"}
    for k in ("peak_bytes", "weights_bytes", "fits_peak_bytes", "exceeds_peak_bytes"):
        if r.get(k) is not None:
            r[k.replace("_bytes", "_gib")] = round(r[k] / GiB, 3)
    if "step_peaks" in r:
        r["step_peaks_gib"] = [round(p / GiB, 3) for p in r["step_peaks"]]
    return r


def _print_row(r: dict) -> None:
    if "error" in r:
        print(f"{r['model']} seq {r['seq']} {r['config']}: ERROR {r['error']}", flush=True)
    else:
        print(f"{r['model']} seq {r['seq']} {r['config']}: peak {r['peak_gib']:.2f} GiB (weights "
              f"{r['weights_gib']:.2f}) ops {r['ops']}", flush=True)


# ---------------------------------------------------------------------------------- CPU validation
def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def measure_cpu(spec: dict) -> dict:
    """The real CPU step of ``spec`` in this process: peak RSS during build + steps minus the RSS
    before building (after imports and a warm-up of the libraries), in bytes."""
    import torch

    from fastft.memory import native_model, train_steps
    from fastft.nn import QuantLinear

    torch.set_num_threads(int(os.environ.get("FASTFT_MEM_THREADS", "2")))
    # warm the libraries (BLAS, oneDNN, the C++ kernels) on a tiny model first, so their lazy
    # allocations are in the baseline, not in the measurement
    warm = native_model("tiny-llama", quantization=spec["quant"], dtype=torch.float32, device="cpu")
    train_steps(warm, batch=1, seq=16, steps=1, autocast=None)
    del warm
    base = _status_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:  # VmHWM := VmRSS
        f.write("5")
    model = native_model(spec["model"], quantization=spec["quant"], dtype=getattr(torch, spec["dtype"]), device="cpu",
                         r=spec["r"])
    with torch.no_grad():  # make every weight page resident (the trace counts them from creation)
        for t in list(model.parameters()) + list(model.buffers()):
            t.zero_()
        for m in model.modules():
            if isinstance(m, QuantLinear):
                w = m.weight
                for t in (w.data, getattr(w, "absmax", None), getattr(w, "nested_absmax", None)):
                    if isinstance(t, torch.Tensor):
                        t.zero_()
    built = _status_kb("VmRSS")
    t0 = time.perf_counter()
    train_steps(model, batch=spec["batch"], seq=spec["seq"], steps=spec["steps"], autocast=None)
    return {"rss_base_mb": base / 1024, "rss_built_mb": built / 1024, "peak_rss_mb": _status_kb("VmHWM") / 1024,
            "measured_peak_bytes": (_status_kb("VmHWM") - base) * 1024, "measured_built_bytes": (built - base) * 1024,
            "step_s": round(time.perf_counter() - t0, 1)}


# glibc keeps freed blocks below its (dynamic, up to 32 MiB) mmap threshold in its heap, so peak
# RSS is the CPU's "reserved"; with a fixed 128 KiB threshold every large block is unmapped when
# freed and peak RSS approaches the live bytes ("allocated"), what the estimate counts.
ALLOCATORS = {"glibc-default": {}, "glibc-mmap-128k": {"MALLOC_MMAP_THRESHOLD_": "131072",
                                                      "MALLOC_TRIM_THRESHOLD_": "131072"}}


def validate() -> list[dict]:
    rows = []
    for name, extra in ALLOCATORS.items():
        rows += _validate(name, extra)
    return rows


def _validate(allocator: str, extra: dict) -> list[dict]:
    from fastft.memory import estimate

    rows = []
    for spec in VALIDATE:
        est = estimate(spec)
        env = dict(os.environ, PYTHONPATH=os.path.dirname(HERE), **extra)
        r = subprocess.run([sys.executable, "-m", "benchmarks.mem_estimate", "--measure-cpu", json.dumps(spec)],
                           env=env, capture_output=True, text=True, timeout=1200, cwd=os.path.dirname(HERE))
        lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
        if r.returncode or not lines:
            rows.append({"kind": "cpu-validation", "allocator": allocator, **spec,
                         "error": r.stderr.strip().splitlines()[-1:]})
            print(rows[-1], flush=True)
            continue
        meas = json.loads(lines[-1])
        ratio = est["peak_bytes"] / meas["measured_peak_bytes"]
        row = {"kind": "cpu-validation", "allocator": allocator, **_clean(est), **meas,
               "estimate_over_measured": round(ratio, 3),
               "within_15pct": abs(ratio - 1) <= 0.15}
        rows.append(row)
        print(f"validate [{allocator}] {spec['model']} quant={spec['quant']} seq {spec['seq']}: estimate {est['peak_bytes'] / 2**20:.0f}"
              f" MiB, measured {meas['measured_peak_bytes'] / 2**20:.0f} MiB (weights est {est['weights_bytes'] / 2**20:.0f}"
              f" / measured {meas['measured_built_bytes'] / 2**20:.0f}) -> {ratio:.3f}", flush=True)
    return rows


# ------------------------------------------------------------------------------------------ output
def write(rows: list[dict]) -> None:
    os.makedirs(RESULTS, exist_ok=True)
    env = _env()
    with open(os.path.join(RESULTS, "mem_estimate.jsonl"), "a") as f:
        for r in rows:
            f.write(json.dumps({**r, **env}) + "\n")
    latest = {}
    with open(os.path.join(RESULTS, "mem_estimate.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            r.setdefault("config", r.get("stack"))  # rows before the memory options had one fastft config
            latest[(r["kind"], r.get("config"), r.get("model"), r.get("seq"), r.get("quant"),
                    r.get("allocator", "glibc-default"))] = r
    with open(os.path.join(RESULTS, "mem_estimate.md"), "w") as f:
        f.write(markdown(list(latest.values()), env))


def markdown(rows: list[dict], env: dict) -> str:
    out = ["# Peak memory of the QLoRA step (estimate: fake-tensor trace of the CUDA code path, no GPU)\n",
           f"{env['time']}, torch {env['torch']}. Method and validation: docs/memory.md. Estimate of "
           "`torch.cuda.max_memory_allocated` over two steps (forward, loss, backward, AdamW); batch 1, LoRA r = 16 "
           "all-linear, NF4 + double quant, bf16 weights + bf16 autocast, gradient checkpointing on.\n"]
    est = [r for r in rows if r["kind"] == "cuda-estimate" and "error" not in r]
    if est:
        out += ["Memory options (`LEAN`, all exact): " + ", ".join(f"{k}={v}" for k, v in LEAN.items()) + ".\n",
                "| shape | seq | fastft (GiB) | fastft, memory options (GiB) | transformers + PEFT + bnb (GiB) | "
                "ratio | ratio, memory options | weights on the GPU (GiB: fastft / options / HF) |",
                "|---|---|---|---|---|---|---|---|"]
        for m in SHAPES:
            for s in SEQS:
                f, lean, h = (next((r for r in est if r["model"] == m and r["seq"] == s and r["config"] == c), None)
                              for c in CONFIGS)
                if f and h and lean:
                    out.append(f"| {m} | {s} | {f['peak_gib']:.2f} | {lean['peak_gib']:.2f} | {h['peak_gib']:.2f} | "
                               f"{f['peak_bytes'] / h['peak_bytes']:.2f}x | {lean['peak_bytes'] / h['peak_bytes']:.2f}x | "
                               f"{f['weights_gib']:.2f} / {lean['weights_gib']:.2f} / {h['weights_gib']:.2f} |")
    lng = [r for r in rows if r["kind"] == "cuda-longest"]
    if lng:
        out += ["", f"Longest sequence at the Llama-3.1-8B shape whose traced peak fits {BUDGET / GiB:.0f} GiB "
                "(an 80 GB GPU less the CUDA context), batch 1:", "",
                "| stack | fits (tokens) | peak there (GiB) | does not fit (tokens) |", "|---|---|---|---|"]
        for r in lng:
            out.append(f"| {STACK_NAMES[r['config']]} | {r.get('fits')} | {r.get('fits_peak_gib', float('nan')):.2f} | "
                       f"{r.get('exceeds')} |")
    val = [r for r in rows if r["kind"] == "cpu-validation" and "error" not in r]
    if val:
        out += ["", "Validation on the CPU path (the same accounting on fake CPU tensors vs the real step's peak RSS "
                "minus the RSS before building, fp32, 2 steps, 2 threads):", "",
                "| shape | quant | seq | allocator | estimate (MiB) | measured (MiB) | estimate / measured |",
                "|---|---|---|---|---|---|---|"]
        for r in val:
            out.append(f"| {r['model']} | {r['quant'] or 'dense'} | {r['seq']} | {r.get('allocator', 'glibc-default')} | "
                       f"{r['peak_bytes'] / 2**20:.0f} | "
                       f"{r['measured_peak_bytes'] / 2**20:.0f} | {r['estimate_over_measured']:.3f} |")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", choices=["table", "longest", "validate"], action="append")
    ap.add_argument("--configs", nargs="+", choices=list(CONFIGS), help="longest: only these configurations")
    ap.add_argument("--measure-cpu", help=argparse.SUPPRESS)
    ap.add_argument("--no-write", action="store_true")
    a = ap.parse_args(argv)
    if a.measure_cpu:
        print(json.dumps(measure_cpu(json.loads(a.measure_cpu))), flush=True)
        return 0
    parts = a.only or ["table", "longest", "validate"]
    rows = []
    for p in parts:
        rows += longest(a.configs) if p == "longest" else {"table": table, "validate": validate}[p]()
    if not a.no_write:
        write(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
