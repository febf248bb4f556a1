"""CPU benchmarks of the C++ kernels (csrc/) against their baselines, in one run.

* Ceilings: preallocated copy_ bandwidth (read + write) and dense fp32 / bf16 matmul rate.
* NF4 dequantize of a 4096 x 4096 weight (blocksize 64, double quant -- the QLoRA setting), both
  sides allocating their output: fastft vs bitsandbytes' CPU ``dequantize_4bit`` (and the pure
  torch reference); and fastft into a preallocated buffer, as a percentage of copy bandwidth.
  Bytes = packed codes + block scales read + output written.
* Quant-matmul y = x Wᵀ with the same NF4 weight, M = 1 / 32 / 1024 rows, fp32 and bf16
  activations: fastft "tiled" (dequantize an L2-sized tile, multiply at once) and "full"
  (dequantize all of W into scratch, one GEMM) vs the dense matmul on an already dequantized W
  (the ceiling for this shape) and bitsandbytes' ``matmul_4bit``; plus the backward dX = dY W.

* A training step on the real SmolLM2-135M (batch 4 x seq 256, LoRA r = 16 on all linear layers,
  AdamW): fastft QLoRA (NF4 + double quant) vs transformers + PEFT + bitsandbytes with the same
  settings, tokens/s and peak RSS; in fp32, and in bf16 (both stacks both with bf16 weights and
  with fp32 weights under bf16 autocast; speedups against the faster baseline configuration). Each variant runs in its own process (peak RSS is per process):
  ``python -m benchmarks.bench_cpu --train-step fastft-qlora``. Off by default: the training step's
  benchmark is ``bench_step.py`` (alternating rounds, fixed threads, a first-step agreement check);
  ``FASTFT_BENCH_TRAIN=1`` runs this older form (one process per variant, run once, 1 warm-up step) for
  comparison with the rows it recorded before, ``FASTFT_BENCH_TRAIN=all`` adds the LoRA pair.

Only the cpu suite has rows here.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from . import common

N = K = 4096


def _bnb():
    try:
        import bitsandbytes.functional as bnbf
        import bitsandbytes as bnb
    except Exception:  # bitsandbytes is a baseline, not a dependency
        return None, None
    return bnb, bnbf


def _nf4_bytes(q, out_elem_size: int) -> int:
    scales = q.absmax.numel() * q.absmax.element_size()
    if q.double_quant:
        scales += q.nested_absmax.numel() * 4
    return q.data.numel() + scales + q.numel * out_elem_size


def dequant_rows(dev: str) -> list[dict]:
    from fastft import _C
    from fastft.ops import cpp, dispatch

    torch.manual_seed(0)
    w = torch.randn(N, K) * 0.02
    q = dispatch.impl("nf4_quantize", "cpp")(w, 64, True)
    bnb, bnbf = _bnb()
    big_src = torch.empty(64 << 20).normal_()  # 256 MiB, as common.copy_bandwidth
    big_dst = torch.empty_like(big_src)
    rows = []
    for dt in (torch.float32, torch.bfloat16):
        name = str(dt).replace("torch.", "")
        case = f"nf4_dequantize {N}x{K} bs64+dq -> {name} (alloc)"
        nbytes = _nf4_bytes(q, torch.empty((), dtype=dt).element_size())
        t_bnb = None
        if bnbf is not None:
            packed, state = bnbf.quantize_4bit(w.to(dt), blocksize=64, quant_type="nf4", compress_statistics=True)
            t_bnb = common.bench(lambda: bnbf.dequantize_4bit(packed, state))
            rows.append(common.row(case, "bitsandbytes", t_bnb, bytes=nbytes, ceiling="copy"))
        t = common.bench(lambda: cpp.ops.nf4_dequantize(*cpp.nf4_args(q), [N, K], dt))
        rows.append(common.row(case, "fastft", t, bytes=nbytes, ceiling="copy", baseline="bitsandbytes" if t_bnb else None,
                               baseline_s=t_bnb))
        # The same with fastft's reuse of freed large outputs switched off: every call gets fresh
        # (huge-page) memory, as a first call or a one-off dequantize does.
        cap = _C.reuse_cap()
        _C.set_reuse_cap(0)
        try:
            t = common.bench(lambda: cpp.ops.nf4_dequantize(*cpp.nf4_args(q), [N, K], dt))
        finally:
            _C.set_reuse_cap(cap)
        rows.append(common.row(case, "fastft (fresh memory, reuse cache off)", t, bytes=nbytes, ceiling="copy",
                               baseline="bitsandbytes" if t_bnb else None, baseline_s=t_bnb))
        if dt == torch.float32:
            t_ref = common.bench(lambda: dispatch.impl("nf4_dequantize", "reference")(q, dt), min_run_time=0.5)
            rows.append(common.row(case, "fastft reference (torch)", t_ref, bytes=nbytes, ceiling="copy"))
        out = torch.empty(N, K, dtype=dt)
        t_into = common.bench(lambda: cpp.nf4_dequantize_into(q, out))
        src = torch.empty(N, K, dtype=dt).normal_()
        t_copy = common.bench(lambda: out.copy_(src))
        rows.append(common.row(f"nf4_dequantize {N}x{K} bs64+dq -> {name} (preallocated)", "fastft", t_into,
                               bytes=nbytes, ceiling="copy"))
        # This VM's memory bandwidth moves by up to 2x within minutes, so a ratio against the
        # ceiling measured once at the start can be off either way. Paired: the 256 MiB copy
        # ceiling and the dequantize measured back to back, seven times; the median ratio.
        pairs, t_ds = [], []
        for _ in range(7):
            t_c = common.bench(lambda: big_dst.copy_(big_src), min_run_time=0.2)
            t_d = common.bench(lambda: cpp.nf4_dequantize_into(q, out), min_run_time=0.2)
            pairs.append((nbytes / t_d) / (2 * big_src.numel() * 4 / t_c))
            t_ds.append(t_d)
        pairs.sort()
        rows.append(common.row(f"nf4_dequantize {N}x{K} bs64+dq -> {name} (preallocated, paired with the copy ceiling)",
                               "fastft", statistics.median(t_ds), bytes=nbytes, ceiling_paired="copy 256 MiB",
                               pct_of_ceiling=round(100 * statistics.median(pairs), 1),
                               pct_of_ceiling_min=round(100 * pairs[0], 1), pct_of_ceiling_max=round(100 * pairs[-1], 1)))
        rows.append(common.row(f"copy_ {N}x{K} {name} (same output, preallocated)", "torch", t_copy,
                               bytes=2 * out.numel() * out.element_size(), ceiling="copy"))
    return rows


def matmul_rows(dev: str) -> list[dict]:
    from fastft import _C
    from fastft.ops import cpp, dispatch

    torch.manual_seed(0)
    w = torch.randn(N, K) * 0.02
    q = dispatch.impl("nf4_quantize", "cpp")(w, 64, True)
    bnb, bnbf = _bnb()
    qmm, qgx = dispatch.impl("quant_matmul", "cpp"), dispatch.impl("quant_matmul_grad_x", "cpp")
    rows = []
    for dt, ceil in ((torch.float32, "matmul"), (torch.bfloat16, "matmul_bf16")):
        name = str(dt).replace("torch.", "")
        wd = q.dequantize(dt)
        state = packed = None
        if bnb is not None:
            packed, state = bnbf.quantize_4bit(w.to(dt), blocksize=64, quant_type="nf4", compress_statistics=True)
        for M in (1, 32, 1024):
            x = torch.randn(M, K).to(dt)
            flops = 2 * M * N * K
            case = f"quant_matmul x({M}x{K}) @ nf4({N}x{K})ᵀ {name}"
            mrt = 0.5 if M < 1024 else 1.0
            t_dense = common.bench(lambda: F.linear(x, wd), min_run_time=mrt)
            rows.append(common.row(case, "torch dense (W already dequantized)", t_dense, flops=flops, ceiling=ceil))
            for strat in ("tiled", "full"):
                _C.set_matmul_strategy(strat)
                t = common.bench(lambda: cpp.ops.nf4_matmul(x, None, *cpp.nf4_args(q), N, K), min_run_time=mrt)
                rows.append(common.row(case, f"fastft {strat}", t, flops=flops, ceiling=ceil,
                                       baseline="torch dense", baseline_s=t_dense))
            _C.set_matmul_strategy("tiled")
            if dt == torch.float32 and M > _C.fused_max_m():  # what training calls: dequantize + oneDNN
                t = common.bench(lambda: qmm(x, q), min_run_time=mrt)
                rows.append(common.row(case, "fastft (dispatched op)", t, flops=flops, ceiling=ceil,
                                       baseline="torch dense", baseline_s=t_dense))
            if bnb is not None:
                t_b = common.bench(lambda: bnb.matmul_4bit(x, packed.t(), quant_state=state), min_run_time=mrt)
                rows.append(common.row(case, "bitsandbytes matmul_4bit", t_b, flops=flops, ceiling=ceil))
        # Backward dX = dY W at the training shape (seq 256 x batch 4).
        M = 1024
        dy = torch.randn(M, N).to(dt)
        case = f"quant_matmul dX = dY({M}x{N}) @ nf4({N}x{K}) {name}"
        t_dense = common.bench(lambda: dy @ wd)
        rows.append(common.row(case, "torch dense (W already dequantized)", t_dense, flops=2 * M * N * K, ceiling=ceil))
        for strat in ("tiled", "full"):
            _C.set_matmul_strategy(strat)
            t = common.bench(lambda: cpp.ops.nf4_matmul_grad_x(dy, *cpp.nf4_args(q), N, K))
            rows.append(common.row(case, f"fastft {strat}", t, flops=2 * M * N * K, ceiling=ceil,
                                   baseline="torch dense", baseline_s=t_dense))
        _C.set_matmul_strategy("tiled")
        if dt == torch.float32:
            t = common.bench(lambda: qgx(dy, q))
            rows.append(common.row(case, "fastft (dispatched op)", t, flops=2 * M * N * K, ceiling=ceil,
                                   baseline="torch dense", baseline_s=t_dense))
    return rows


# --------------------------------------------------------------------------------------------
# Training step, one process per variant
# --------------------------------------------------------------------------------------------
TRAIN_B, TRAIN_T, TRAIN_R = 4, 256, 16


def _train_step_main(variant: str, steps: int, dtype: str = "float32", autocast: bool = False) -> dict:
    """Build the model of ``variant``, run one untimed and ``steps`` timed steps; report as JSON.

    ``dtype``: the weights' (and so the activations') dtype; bfloat16 is QLoRA's usual compute dtype
    (bitsandbytes' ``bnb_4bit_compute_dtype``) and runs on the CPU's AVX512-BF16 units. The LoRA
    adapters stay fp32 (PEFT's default; fastft's too). ``autocast``: fp32 weights under
    ``torch.autocast("cpu", bfloat16)`` -- the other way a transformers user gets bf16 matmuls
    (for bitsandbytes with compute dtype bfloat16).
    """
    from fastft.models.convert import smollm2_path

    path = smollm2_path()
    qlora = variant.endswith("qlora")
    dt = getattr(torch, dtype)
    torch.manual_seed(0)
    rss0 = common.peak_rss_mb()
    if variant.startswith("fastft"):
        import fastft

        model = fastft.from_pretrained(path, quantization="nf4" if qlora else None, double_quant=True, dtype=dt)
        model = fastft.get_peft_model(model, fastft.LoraConfig(r=TRAIN_R, lora_alpha=2 * TRAIN_R,
                                                               target_modules="all-linear"))
    else:
        import peft
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        kw = {}
        if qlora:
            kw["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch.bfloat16 if autocast else dt)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dt, device_map="cpu", **kw)
        model = peft.get_peft_model(model, peft.LoraConfig(r=TRAIN_R, lora_alpha=2 * TRAIN_R,
                                                           target_modules="all-linear", task_type="CAUSAL_LM"))
    model.train()
    rss_loaded = common.peak_rss_mb()
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (TRAIN_B, TRAIN_T))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    loss0 = step()  # warm-up (allocations, oneDNN primitives)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return {"variant": variant, "dtype": dtype, "autocast": autocast, "median_s": statistics.median(times),
            "steps": steps, "first_loss": loss0,
            "peak_rss_mb": round(common.peak_rss_mb(), 1), "peak_rss_before_load_mb": round(rss0, 1),
            "peak_rss_after_load_mb": round(rss_loaded, 1)}


def _train_step(variant: str, steps: int, dtype: str, autocast: bool) -> dict:
    cmd = [sys.executable, "-m", __name__, "--train-step", variant, "--steps", str(steps), "--dtype", dtype]
    if autocast:
        cmd.append("--autocast")
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=common.REPO, timeout=1800)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    if r.returncode != 0 or not lines:
        raise RuntimeError(f"training-step benchmark {variant} {dtype} failed:\n{r.stderr[-3000:]}")
    return json.loads(lines[-1])


def train_rows(steps: int = 5) -> list[dict]:
    """fp32 pairs, then bf16: each stack with bf16 weights and with fp32 weights under bf16 autocast;
    both fastft rows take their speedup against the faster baseline configuration."""
    mode = os.environ.get("FASTFT_BENCH_TRAIN", "0")
    if mode == "0":
        return []
    pairs = [("fastft-qlora", "peft-bnb-qlora")]
    if mode == "all":
        pairs.append(("fastft-lora", "peft-lora"))
    dtypes = ("float32", "bfloat16")
    rows = []
    tokens = TRAIN_B * TRAIN_T
    for dtype in dtypes:
        for ours, theirs in pairs:
            q = ours.endswith("qlora")
            case = (f"train step SmolLM2-135M b{TRAIN_B}xT{TRAIN_T} r{TRAIN_R} all-linear "
                    f"{'NF4+dq' if q else 'dense base'} {'fp32' if dtype == 'float32' else 'bf16'} AdamW")
            name = "transformers+peft" + ("+bitsandbytes" if q else "")
            base = [(name + ("" if dtype == "float32" else " (bf16 weights)"), _train_step(theirs, steps, dtype, False))]
            if dtype != "float32":
                base.append((name + " (fp32 weights, bf16 autocast)", _train_step(theirs, steps, "float32", True)))
            for impl, b in base:
                rows.append(common.row(case, impl, b["median_s"], tokens=tokens, peak_rss_mb=b["peak_rss_mb"],
                                       peak_rss_after_load_mb=b["peak_rss_after_load_mb"]))
            impl, b = min(base, key=lambda ib: ib[1]["median_s"])
            mine = [("fastft" + ("" if dtype == "float32" else " (bf16 weights)"), _train_step(ours, steps, dtype, False))]
            if dtype != "float32":  # the baseline's own setting too: fp32 weights under bf16 autocast
                mine.append(("fastft (fp32 weights, bf16 autocast)", _train_step(ours, steps, "float32", True)))
            for name_o, o in mine:
                rows.append(common.row(case, name_o, o["median_s"], tokens=tokens, peak_rss_mb=o["peak_rss_mb"],
                                       peak_rss_after_load_mb=o["peak_rss_after_load_mb"], baseline=impl,
                                       baseline_s=b["median_s"], rss_ratio=round(o["peak_rss_mb"] / b["peak_rss_mb"], 3)))
    return rows


def run(suite: str) -> list[dict]:
    if suite != "cpu":
        return []
    from fastft.ops import cpp

    if not cpp.AVAILABLE:
        raise RuntimeError("fastft._C is not built; the cpu kernel benchmarks need it")
    dev = "cpu"
    rows = dequant_rows(dev) + matmul_rows(dev)  # the ceilings' own rows: bench_ceilings
    try:  # the end-to-end step depends on the whole stack; keep the kernel rows if it fails
        rows += train_rows()
    except Exception as e:
        rows.append({"case": "train step SmolLM2-135M", "impl": "-", "error": f"{type(e).__name__}: {str(e)[-500:]}"})
    return rows


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--train-step", required=True,
                    choices=["fastft-qlora", "peft-bnb-qlora", "fastft-lora", "peft-lora"])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--autocast", action="store_true")
    a = ap.parse_args()
    # `python -m` puts the repository root on sys.path, where fastft's kernels/ folder shadows the
    # PyPI package `kernels` that transformers and bitsandbytes probe for. fastft itself is
    # installed (editable), so the root is not needed past this point.
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != common.REPO]
    print(json.dumps(_train_step_main(a.train_step, a.steps, a.dtype, a.autocast)))
