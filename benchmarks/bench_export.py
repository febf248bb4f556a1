"""Export time and memory: SmolLM2-135M-Instruct (fp32 checkpoint, 538 MB) to GGUF and merged HF.

Each export runs in a fresh subprocess (peak RSS is per process, and imports are part of what a
user waits for) with torch's default threads on this machine. A row reports the ``fastft.export``
call's wall time as ``median_ms`` (one run: exports are long and steady), the whole process's wall
time (interpreter, imports, export), the CPU seconds (user + sys) of the export call and of the
process (on a shared machine wall time mostly measures the other tenants; on 2 idle cores the wall
time is at most the CPU time), the 1-minute load average before the run, the peak RSS (VmHWM), the
RSS before loading (Python + torch), and peak / model size, where the model size is the bytes of
the fp32 tensors held for the merge (513 MiB). The issue's target: GGUF f16 in under 30 s on 2
cores with peak memory under 2x the model size. The verify rows add the read-back checks (the
reload holds a second copy of the model).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

from . import common

_CHILD = r"""
import json, resource, sys, time
t0 = time.perf_counter()
import fastft
from fastft.exporting import rss_mb
from fastft.models.convert import smollm2_path
fmt, opt, verify, out = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
verify = {"none": False, "fast": "fast", "full": "full"}[verify]
kw = {"dtype": opt} if fmt == "hf" else {"quant": opt}
cpu = lambda: sum(resource.getrusage(resource.RUSAGE_SELF)[:2])
path = smollm2_path()
c0 = cpu()
r = fastft.export(path, out, format=fmt, verify=verify, log=None, **kw)
print(json.dumps({"seconds": r.seconds, "cpu_s": cpu() - c0, "process_cpu_s": cpu(), "phases": r.phases,
                  "bytes": r.bytes, "error": r.error, "format_error": r.format_error,
                  "reload_error": r.reload_error,
                  "peak_mb": rss_mb()[1]}))
"""

CASES = [("gguf", "f16", "none"), ("gguf", "q8_0", "none"), ("hf", "bf16", "none"), ("gguf", "f16", "full"),
         ("hf", "bf16", "full")]


def export_once(fmt: str, opt: str, verify: str) -> dict:
    with tempfile.TemporaryDirectory(prefix="fastft-bench-export-") as d:
        out = os.path.join(d, "model.gguf" if fmt == "gguf" else "model")
        t = time.perf_counter()
        p = subprocess.run([sys.executable, "-c", _CHILD, fmt, opt, verify, out], capture_output=True, text=True,
                           cwd=common.REPO)
        wall = time.perf_counter() - t
    if p.returncode != 0:
        raise RuntimeError(f"export {fmt} {opt} failed:\n{p.stderr[-3000:]}")
    res = json.loads(p.stdout.strip().splitlines()[-1])
    res["process_s"] = wall
    return res


def model_mb() -> float:
    from fastft.models.convert import smollm2_path
    from fastft.models.safetensors_io import SafetensorsFile

    f = SafetensorsFile(os.path.join(smollm2_path(), "model.safetensors"))
    try:
        return sum(i.nbytes for i in f.tensors.values()) / 2**20
    finally:
        f.close()


def run(suite: str) -> list[dict]:
    if suite != "cpu":
        return []
    size = model_mb()
    rows = []
    for fmt, opt, verify in CASES:
        load = round(os.getloadavg()[0], 2)
        r = export_once(fmt, opt, verify)
        start_rss = r["phases"][0][2]
        rows.append(common.row(
            f"export SmolLM2-135M -> {fmt} {opt} (verify: {verify})", "fastft", r["seconds"],
            process_s=round(r["process_s"], 2), cpu_s=round(r["cpu_s"], 2),
            process_cpu_s=round(r["process_cpu_s"], 2), load_avg_before=load, peak_rss_mb=round(r["peak_mb"], 1),
            rss_before_load_mb=start_rss,
            model_mb=round(size, 1), peak_over_model=round(r["peak_mb"] / size, 3),
            peak_above_start_over_model=round((r["peak_mb"] - start_rss) / size, 3),
            file_mb=round(r["bytes"] / 2**20, 1), threads=os.cpu_count(),
            phases=[p[:2] for p in r["phases"]],
            **({"logit_error": r["error"], "format_error": r["format_error"], "reload_error": r["reload_error"]}
               if verify != "none" else {})))
    return rows
