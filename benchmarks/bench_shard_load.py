"""Load-time host memory of FSDP2 + QLoRA: per-rank NF4 quantization vs quantize-whole-then-shard.

A random Llama checkpoint (bf16 safetensors, 8 layers of hidden 2048 / MLP 5632: 411 M linear
weights, 822 MB; NF4: 212 MB) is loaded with ``quantization="nf4"`` by 2 gloo ranks (``torchrun``), once per
path, each path in fresh processes (peak RSS is a per-process high-water mark), and sharded by
``setup_fsdp``. Per rank: the load's peak RSS growth (peak RSS after ``setup_fsdp`` minus RSS before
loading, after a warm-up load of a tiny checkpoint: imports and one-time initialisations are not
load memory), the elements quantized (counted at ``fastft.ops.nf4_quantize``), the bytes read of the
quantized weights, and the frozen bytes held after sharding (``local_tensor_bytes``).

Rows: benchmarks/results/shard_load.jsonl (+ .md). Usage::

    python -m benchmarks.bench_shard_load            # both paths, rows written
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
SHAPE = dict(vocab_size=1024, hidden_size=2048, intermediate_size=5632, num_hidden_layers=8, num_attention_heads=16,
             num_key_value_heads=16, max_position_embeddings=256, tie_word_embeddings=False)


def _status_mb(key: str) -> float:
    """VmRSS / VmHWM (peak RSS since the last reset) of this process, MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024.0
    raise RuntimeError(f"no {key} in /proc/self/status")


def worker(model_dir: str, shard: bool, out: str):
    import gc

    import torch

    import fastft
    import fastft.ops as ops
    from fastft.models.safetensors_io import SafetensorsFile
    from fastft.train import distributed as D

    D.init_from_env(timeout_s=300)
    count = {"elements": 0, "bytes": 0}
    quantize, read_range = ops.nf4_quantize, SafetensorsFile.read_range

    def counting_quantize(w, *a, **k):
        count["elements"] += w.numel()
        return quantize(w, *a, **k)

    def counting_read(self, name, start, stop, **k):
        if name.endswith("proj.weight"):
            count["bytes"] += (stop - start) * self.tensors[name].dtype.itemsize
        return read_range(self, name, start, stop, **k)

    # Warm-up on a tiny checkpoint of the same family: the imports and one-time initialisations
    # (transformers' config classes, the fastft._C extension, FSDP's modules) are not load memory.
    D.setup_fsdp(fastft.from_pretrained(model_dir + "-tiny", quantization="nf4", shard_quantization=shard))
    gc.collect()
    ops.nf4_quantize, SafetensorsFile.read_range = counting_quantize, counting_read
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets this process's peak RSS (VmHWM) to its current RSS
    rss0 = _status_mb("VmRSS")
    t0 = time.perf_counter()
    model = fastft.from_pretrained(model_dir, quantization="nf4", shard_quantization=shard)
    D.setup_fsdp(model)
    dt = time.perf_counter() - t0
    peak = _status_mb("VmHWM")
    held = D.local_tensor_bytes(model)
    row = {"path": "per-rank" if shard else "whole-then-shard", "rank": D.rank(), "world": D.world_size(),
           "rss_before_mb": round(rss0, 1), "peak_rss_mb": round(peak, 1), "load_peak_growth_mb": round(peak - rss0, 1),
           "elements_quantized": count["elements"], "bytes_read_quantized": count["bytes"],
           "frozen_held_mb": round((held["params_frozen"] + held["buffers"]) / 2 ** 20, 2), "load_s": round(dt, 2)}
    rows = [None] * D.world_size()
    torch.distributed.all_gather_object(rows, row)
    if D.rank() == 0:
        with open(out, "w") as f:
            json.dump(rows, f)
    torch.distributed.destroy_process_group()


def make_checkpoint(d: str) -> int:
    import torch
    import transformers

    torch.manual_seed(0)
    tiny = dict(SHAPE, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                num_key_value_heads=4)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**tiny)).to(torch.bfloat16).save_pretrained(d + "-tiny")
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SHAPE)).to(torch.bfloat16)
    model.save_pretrained(d)
    return sum(p.numel() for n, p in model.named_parameters() if n.endswith("proj.weight"))


def main():
    sys.path.insert(0, os.path.dirname(HERE))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.path.dirname(HERE))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        n_quant = make_checkpoint(os.path.join(tmp, "ckpt"))
        for shard in (False, True):
            out = os.path.join(tmp, f"rows-{shard}.json")
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                   "-m", "benchmarks.bench_shard_load", "--worker", os.path.join(tmp, "ckpt"), str(int(shard)), out]
            r = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=os.path.dirname(HERE))
            if r.returncode:
                sys.exit(r.stdout[-2000:] + r.stderr[-4000:])
            rows += json.load(open(out))
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    for r in rows:
        r.update(case=f"llama h2048 i5632 L8 bf16, {n_quant / 1e6:.1f} M NF4 weights", time=stamp)
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "shard_load.jsonl"), "a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    keys = ["path", "rank", "load_peak_growth_mb", "elements_quantized", "bytes_read_quantized", "frozen_held_mb",
            "load_s"]
    md = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    md += ["| " + " | ".join(str(r[k]) for k in keys) + " |" for r in rows]
    text = f"# Load-time memory, FSDP2 + QLoRA on 2 gloo ranks ({rows[0]['case']}, {stamp})\n\n" + "\n".join(md)
    with open(os.path.join(RESULTS, "shard_load.md"), "w") as f:
        f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2], bool(int(sys.argv[3])), sys.argv[4])
    else:
        main()
