"""What keeping the frozen embedding and LM head in host memory saves on the GPU, estimated without one.

The QLoRA step of ``fastft.memory`` (``native_model`` + ``train_steps``: NF4 + double quant, LoRA
r = 16 all-linear, gradient checkpointing, bf16 weights, batch 1, 2 steps) is traced on fake CUDA
tensors twice: as built, and with ``fastft.nn.offload_frozen_to_host(model)`` applied after
building (the two (V, H) tables become host tensors: fake CPU tensors, not counted on cuda). The
trace runs in a child process that loads fastft.memory's fake-CUDA shim before torch (as
``fastft.memory.run_traced`` does), on this branch's ``fastft.memory`` (main's has the same switch as
the spec key ``host_frozen``, docs/offload.md).

Rows: benchmarks/results/mem_offload.jsonl (one per model x seq x offload), the table printed.
Estimates, not GPU measurements.

Usage::

    python -m benchmarks.mem_offload                          # llama-3.1-8b at seq 2048 and 8192
    python -m benchmarks.mem_offload --model tiny-llama --seq 64 --no-write
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

GiB = float(2 ** 30)
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results", "mem_offload.jsonl")

# The child: shim first (torch reads its CUDA hooks once), then one trace per offload setting.
CHILD = r"""
import ctypes, importlib.util, json, os, sys, time
lib = os.path.join(os.path.dirname(importlib.util.find_spec("torch").origin), "lib")
if os.environ.get("FASTFT_FAKE_CUDA_SHIM"):
    for n in ("libc10.so", "libtorch_cpu.so"):
        ctypes.CDLL(os.path.join(lib, n), mode=ctypes.RTLD_GLOBAL)
    ctypes.CDLL(os.environ["FASTFT_FAKE_CUDA_SHIM"], mode=ctypes.RTLD_GLOBAL)
import torch
from fastft.memory import fake_trace, native_model, train_steps
from fastft.nn.offload import offload_frozen_to_host
from fastft.ops import loss
spec = json.loads(sys.argv[1])
if spec.get("vocab_chunk_bytes"):
    loss.VOCAB_CHUNK_BYTES_GPU = int(spec["vocab_chunk_bytes"])
for offload in spec["offload"]:
    t0 = time.time()
    with fake_trace() as mem:
        model = native_model(spec["model"], quantization="nf4", device="cuda")
        cuda0, cpu0 = mem.live["cuda"], mem.live["cpu"]
        if offload:
            offload_frozen_to_host(model)
        base = model.get_base_model()
        row = {"model": spec["model"], "seq": spec["seq"], "batch": spec["batch"], "offload": offload,
               "moved_cuda_bytes": cuda0 - mem.live["cuda"], "moved_cpu_bytes": mem.live["cpu"] - cpu0,
               "weights_bytes": mem.live["cuda"], "embedding_device": str(base.model.embed_tokens.weight.device),
               "lm_head_device": str(base.lm_head.weight.device)}
        row["step_peaks"] = train_steps(model, batch=spec["batch"], seq=spec["seq"], steps=2, mem=mem)
        row["peak_bytes"] = max(row["step_peaks"])
        row["ops"] = dict(mem.ops)
        del model, base
    row["trace_s"] = round(time.time() - t0, 1)
    print(json.dumps(row), flush=True)
"""


def trace(model: str, seq: int, batch: int = 1, offload=(False, True), vocab_chunk_bytes: int | None = None,
          timeout: float = 1200.0) -> list[dict]:
    """One row per offload setting (see ``CHILD``)."""
    import torch

    from fastft.memory import SHIM_ENV, fake_cuda_shim

    env = dict(os.environ)
    if torch.version.cuda is None:
        env[SHIM_ENV] = fake_cuda_shim()
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    spec = {"model": model, "seq": seq, "batch": batch, "offload": list(offload),
            "vocab_chunk_bytes": vocab_chunk_bytes}
    r = subprocess.run([sys.executable, "-c", CHILD, json.dumps(spec)], env=env, capture_output=True, text=True,
                       timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"mem_offload trace failed: {r.stderr[-3000:]}")
    return [json.loads(ln) for ln in r.stdout.splitlines() if ln.startswith("{")]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="llama-3.1-8b")
    p.add_argument("--seq", type=int, nargs="+", default=[2048, 8192])
    p.add_argument("--no-write", action="store_true")
    a = p.parse_args(argv)
    import torch

    rows = []
    for seq in a.seq:
        for row in trace(a.model, seq):
            row.update(torch=torch.__version__, time=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                       kind="cuda-estimate")
            rows.append(row)
    print(f"{'model':14} {'seq':>6} {'offload':>8} {'weights GiB':>12} {'peak GiB':>9}")
    for r in rows:
        print(f"{r['model']:14} {r['seq']:>6} {str(r['offload']):>8} {r['weights_bytes'] / GiB:12.3f} "
              f"{r['peak_bytes'] / GiB:9.3f}")
    if not a.no_write:
        with open(RESULTS, "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
