"""`fastft demo` (= `make demo`) end to end: wall time and the held-out exact match before / after.

The README quotes the demo's result (exact match on the held-out intent split after 60 QLoRA steps
on SmolLM2-135M) and its wall time on the measuring machine; this records both as a row of the cpu
suite. The demo runs in its own process, as a user runs it (``python -m fastft.cli demo``), with the
machine's facts beside the row (threads, ISA, load). ``FASTFT_BENCH_DEMO=0`` skips it.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time

from . import common


def demo_row() -> dict:
    from .bench_step import allocator_env, cpu_flags

    case = "make demo: SmolLM2-135M QLoRA (NF4+dq, r16 all-linear) 60 steps, held-out exact match, end to end"
    with tempfile.TemporaryDirectory() as out:
        load0 = os.getloadavg()[0]
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "fastft.cli", "demo", "--output-dir", os.path.join(out, "demo")],
                           capture_output=True, text=True, timeout=3600, cwd=out)
        wall = time.perf_counter() - t0
    text = r.stdout + r.stderr
    m = re.search(r"held-out exact match: ([\d.]+)% -> ([\d.]+)%\s+\((\d+) QLoRA steps, (\d+) s\)", text)
    if r.returncode != 0 or not m:
        return {"case": case, "impl": "fastft demo", "error": f"rc {r.returncode}: {text[-800:]}"}
    return common.row(case, "fastft demo", wall, exact_match_before=float(m.group(1)),
                      exact_match_after=float(m.group(2)), steps=int(m.group(3)), demo_reported_s=int(m.group(4)),
                      load_avg_before=round(load0, 2), cpu_flags=cpu_flags(), allocator_env=allocator_env())


def run(suite: str) -> list[dict]:
    if suite != "cpu" or os.environ.get("FASTFT_BENCH_DEMO", "1") == "0":
        return []
    return [demo_row()]
