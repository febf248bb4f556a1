"""The end-to-end training step: fastft against transformers + PEFT (+ bitsandbytes, + Liger-Kernel).

Every variant runs in its own process (clean peak memory; Liger-Kernel patches transformers
globally), on the same weights -- seeded by tensor name (``fastft.from_config``, fastft/models/synthetic.py), or the same
checkpoint -- the same token ids, and the same settings: LoRA r = 16, alpha = 32, dropout 0, on all
seven linear layers of every block; NF4 + double quant (blocksize 64) for QLoRA; gradient
checkpointing (non-reentrant) on for all; AdamW (torch's default implementation), lr 1e-4. On a GPU
the frozen weights are bf16 and the step runs under bf16 autocast (what ``Trainer(bf16=True)`` does
with a bf16 model); on a CPU without native bf16 (AVX512-BF16 / AMX) the CPU cases run fp32.

Variants (``VARIANTS``):

* ``fastft``: the native model (``fastft.from_config`` / ``fastft.from_pretrained``) + ``fastft.get_peft_model``;
* ``fastft-lean``: ``fastft`` with its memory options on, as ``TrainingArguments(tiled_mlp=...,
  offload_embeddings=True, gradient_checkpointing="offload" on a GPU / lean_cpu_allocator=True on a
  CPU)`` applies them: the MLP in tiles of ``tile_tokens`` (case key, default 512) tokens, the frozen
  embedding / LM head as host tables (on a CPU: one table, stored in bf16 when its fp32 values are
  bf16's, the head streamed through the loss), the checkpointed layer inputs in pinned host memory
  (GPU) or glibc's large blocks returned to the OS when freed (CPU, ``fastft.train.allocator``);
* ``fastft-patch``: the transformers model + ``fastft.patch(model, quantization=...)`` + ``fastft.get_peft_model``;
  ``fastft-patch-hfloss`` the same with transformers' own loss (``loss=False``);
* ``hf``: transformers + PEFT (+ bitsandbytes ``Linear4bit`` for QLoRA), SDPA attention;
* ``hf-liger``: the same after ``liger_kernel.transformers.apply_liger_kernel_to_llama`` (RoPE,
  RMSNorm, SwiGLU, fused linear cross-entropy); skipped with a note where liger-kernel is absent;
* ``gold``: transformers + PEFT one precision up (fp32 for bf16 compute, fp64 for fp32) on the same
  weights (for QLoRA: the NF4 weights dequantized), first step only -- the reference of the
  agreement check.

Each variant reports tokens/s (median over the timed steps after ``warmup`` untimed ones), peak
memory (CUDA: ``max_memory_allocated`` / ``max_memory_reserved`` from the end of model building, and
the weights' footprint; CPU: the peak RSS from the end of building, reset through
``/proc/self/clear_refs``, and the process's whole-life peak), and the first step's loss and
gradient norm (over the LoRA parameters, before the optimizer's first update).

* ``ref``: the gold's model (transformers + PEFT, dense weights -- for QLoRA the NF4 weights
  dequantized by fastft's quantizer) in the variants' own precision, first step only: PyTorch
  computing the same function in that dtype.

**Agreement** (proof that every variant does the same work): a variant's first-step loss L (and
gradient norm G) must be within ``tol = 2 * |L_ref - L_gold| + floor * max(|L_gold|, 1)`` of the gold
value -- the rule of ``tests/utils.py``: twice PyTorch's own error in the compute dtype, plus a few
ulps of the dtype (``FLOOR``: 8e-3 for bf16, 1e-6 for fp32). Without a ``ref`` row the
transformers + PEFT row stands in; without a gold row the check reports ``agree=None``.

**Timing robustness.** ``--rounds R`` repeats every variant R times in alternating order
(ABC, CBA, ABC, ...), each process doing its own warm-up; reported: the median over rounds of
each process's median step time, and speedups as the median over rounds of the paired ratio
(baseline and fastft from the same round). ``--threads`` fixes torch's intra-op threads
(and OMP_NUM_THREADS of the children). Every row records the CPU's ISA flags, torch's CPU
capability, fastft's C++ ISA, the allocator environment (``MALLOC_*``, ``LD_PRELOAD``) and the
load average, since each moves CPU timings (see benchmarks/NOTES.md, "CPU step: what a user
reproduces").

Usage::

    python -m benchmarks.bench_step --case cpu-smollm2-qlora --rounds 3     # one case, printed
    python -m benchmarks.bench_step --list                                  # the cases
    python -m benchmarks.run --suite cpu --only step                        # recorded rows
    FASTFT_BENCH_STEP=all python -m benchmarks.run --suite cpu --only step  # + the 1B memory rows

``--spawn fork`` forks the variants from one parent that has imported torch / transformers / PEFT
once (the CI smoke test, where imports dominate); the default ``exec`` starts a fresh interpreter
per variant (what the recorded rows use).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import select
import signal
import statistics
import subprocess
import sys
import time

R, ALPHA = 16, 32
FLOOR = {"bfloat16": 8e-3, "float16": 1e-3, "float32": 1e-6, "float64": 1e-12}  # tests/utils.py FLOOR

VARIANTS = {
    "fastft": "fastft native + fastft.get_peft_model",
    "fastft-lean": "fastft native + fastft.get_peft_model + memory options (tiled MLP, host tables, offload / "
                   "lean CPU allocator)",
    "fastft-patch": "transformers + fastft.patch + fastft.get_peft_model",
    "fastft-patch-hfloss": "transformers + fastft.patch(loss=False) + fastft.get_peft_model",
    "hf": "transformers + PEFT{bnb} + SDPA",
    "hf-liger": "transformers + PEFT{bnb} + Liger-Kernel",
    "gold": "gold: transformers + PEFT, {gold_dtype}, dense{dq} weights (first step only)",
    "ref": "reference: the gold's model in the variants' precision (first step only)",
}
FIRST_STEP_ONLY = ("gold", "ref")
FASTFT_VARIANTS = ("fastft", "fastft-lean", "fastft-patch", "fastft-patch-hfloss")
BASELINE, LIGER = "hf", "hf-liger"

# source: ("checkpoint", "smollm2") -- the bundled real SmolLM2-135M -- or ("shape", SHAPES name).
CASES = {
    # CPU: the real model at the README's shape; fp32 (bf16 is emulated without AVX512-BF16).
    "cpu-smollm2-qlora": dict(source=("checkpoint", "smollm2"), quant="nf4", batch=4, seq=256, dtype="float32",
                              autocast=False, device="cpu", steps=5, warmup=2,
                              variants=["fastft", "fastft-patch", "hf", "gold", "ref"]),
    "cpu-smollm2-lora": dict(source=("checkpoint", "smollm2"), quant=None, batch=4, seq=256, dtype="float32",
                             autocast=False, device="cpu", steps=5, warmup=2,
                             variants=["fastft", "fastft-patch", "fastft-patch-hfloss", "hf", "gold", "ref"]),
    # The same in bf16, for CPUs with native bf16 (the README's bf16 rows; ~100x slower where emulated).
    "cpu-smollm2-qlora-bf16": dict(source=("checkpoint", "smollm2"), quant="nf4", batch=4, seq=256, dtype="bfloat16",
                                   autocast=False, device="cpu", steps=5, warmup=2,
                                   variants=["fastft", "fastft-patch", "hf", "gold", "ref"]),
    "cpu-smollm2-lora-bf16": dict(source=("checkpoint", "smollm2"), quant=None, batch=4, seq=256, dtype="bfloat16",
                                  autocast=False, device="cpu", steps=5, warmup=2,
                                  variants=["fastft", "fastft-patch", "fastft-patch-hfloss", "hf", "gold", "ref"]),
    # CPU, for memory: the Llama-3.2-1B shape at seq 2048, one timed step; the seeded values rounded
    # through bf16 (source_dtype: Llama-3.2-1B's checkpoint is bf16, loaded here in fp32).
    "cpu-1b-qlora-mem": dict(source=("shape", "llama-3.2-1b"), quant="nf4", batch=1, seq=2048, dtype="float32",
                             source_dtype="bfloat16", autocast=False, device="cpu", steps=1, warmup=1,
                             variants=["fastft", "fastft-lean", "fastft-patch", "hf"]),
    "cpu-1b-lora-mem": dict(source=("shape", "llama-3.2-1b"), quant=None, batch=1, seq=2048, dtype="float32",
                            source_dtype="bfloat16", autocast=False, device="cpu", steps=1, warmup=1,
                            variants=["fastft", "fastft-lean", "fastft-patch", "hf"]),
    # GPU: the headline shapes.
    "gpu-8b-qlora": dict(source=("shape", "llama-3.1-8b"), quant="nf4", batch=2, seq=2048, dtype="bfloat16",
                         autocast=True, device="cuda", steps=4, warmup=2,
                         tile_tokens=2048,
                        variants=["fastft", "hf", "gold", "ref", "hf-liger", "fastft-patch", "fastft-lean"]),
    "gpu-1b-lora": dict(source=("shape", "llama-3.2-1b"), quant=None, batch=1, seq=8192, dtype="bfloat16",
                        autocast=True, device="cuda", steps=4, warmup=2,
                        tile_tokens=2048,
                        variants=["fastft", "hf", "gold", "ref", "hf-liger", "fastft-patch", "fastft-lean"]),
    # Smoke runs (CI, gpu_check --dry-run): the Llama-3 structure at toy size, fp32 on the CPU.
    "tiny-qlora": dict(source=("shape", "tiny-llama"), quant="nf4", batch=2, seq=32, dtype="float32", autocast=False,
                       device="cpu", steps=1, warmup=1, tile_tokens=24,
                       variants=["fastft", "fastft-lean", "fastft-patch", "hf", "hf-liger", "gold", "ref"]),
    "tiny-lora": dict(source=("shape", "tiny-llama"), quant=None, batch=2, seq=32, dtype="float32", autocast=False,
                      device="cpu", steps=1, warmup=1, tile_tokens=24,
                       variants=["fastft", "fastft-lean", "fastft-patch", "hf", "hf-liger", "gold", "ref"]),
}


# ------------------------------------------------------------------------------------------------
# Environment facts that move step timings
# ------------------------------------------------------------------------------------------------
def cpu_flags() -> dict:
    from .common import cpu_flags as f

    return f()


def allocator_env() -> dict:
    from .common import allocator_env as f

    return f()


def native_bf16_cpu() -> bool:
    f = cpu_flags()
    return bool(f.get("avx512_bf16") or f.get("amx_bf16"))


# ------------------------------------------------------------------------------------------------
# Memory
# ------------------------------------------------------------------------------------------------
def _status_mb(key: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) of this process to its current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# ------------------------------------------------------------------------------------------------
# Building each variant's model
# ------------------------------------------------------------------------------------------------
def _dtype(name):
    import torch

    return getattr(torch, name)


def gold_dtype(spec) -> str:
    low = spec["autocast"] or spec["dtype"] in ("bfloat16", "float16")
    return "float32" if low else "float64"


def _compute_dtype(spec):
    import torch

    return torch.bfloat16 if spec["autocast"] else _dtype(spec["dtype"])


def _quant_targets(config) -> list[str]:
    from fastft.models.llama import LlamaForCausalLM

    return LlamaForCausalLM.quant_targets(config)


def _nf4(w):
    from fastft.quant import NF4Weight

    return NF4Weight.from_float(w, blocksize=64, double_quant=True)


def _hf_model(spec, quant_mode, dtype, device):
    """A transformers causal LM with SDPA attention. quant_mode: None (dense), "bnb" (bitsandbytes
    Linear4bit NF4 + double quant), "fastft" (fastft QuantLinear, for the shape source only: the
    checkpoint source is quantized by fastft.patch itself) or "dequant" (dense layers holding the
    NF4-dequantized weights, in ``dtype``: the gold model)."""
    import torch
    import transformers
    from torch import nn

    from fastft.models.synthetic import make_config, seeded_materialize

    kind, name = spec["source"]
    seed = spec["seed"]
    cdt = _compute_dtype(spec)
    wdt = _dtype(spec["dtype"])  # the variants' weights; the gold rounds through them first
    if kind == "checkpoint":
        from fastft.models.convert import smollm2_path

        path = smollm2_path()
        kw = {}
        if quant_mode == "bnb":
            kw["quantization_config"] = transformers.BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=cdt)
        model = transformers.AutoModelForCausalLM.from_pretrained(
            path, dtype=wdt, device_map={"": str(device)}, attn_implementation="sdpa", **kw)
        if quant_mode == "dequant":
            with torch.no_grad():
                for t in _quant_targets(model.config):
                    lin = model.get_submodule(t)
                    lin.weight.data = _nf4(lin.weight.data).dequantize(torch.float32).to(dtype)
        if dtype != wdt:
            model.to(dtype)
        return model

    cfg = make_config(name)
    cfg.use_cache = False
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
    targets, replace = (), None
    if quant_mode == "bnb":
        import bitsandbytes as bnb

        targets = _quant_targets(cfg)

        def replace(path, lin):
            q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None, compute_dtype=cdt,
                                  compress_statistics=True, quant_type="nf4", device="meta")
            q.weight = bnb.nn.Params4bit(lin.weight.data, requires_grad=False, compress_statistics=True,
                                         quant_type="nf4", blocksize=64).to(device)
            if lin.bias is not None:
                q.bias = nn.Parameter(lin.bias.data, requires_grad=False)
            return q
    elif quant_mode == "fastft":
        from fastft.nn import QuantLinear

        targets = _quant_targets(cfg)

        def replace(path, lin):
            return QuantLinear.from_linear(lin, "nf4", blocksize=64, double_quant=True)
    elif quant_mode == "dequant":
        targets = _quant_targets(cfg)

        def replace(path, lin):
            lin.weight.data = _nf4(lin.weight.data).dequantize(torch.float32).to(dtype)
            return lin
    src = _dtype(spec["source_dtype"]) if spec.get("source_dtype") else None
    seeded_materialize(model, cfg, seed=seed, device=device, dtype=wdt, targets=targets, replace_linear=replace,
                       source_dtype=src)
    if dtype != wdt:
        model.to(dtype)
    return model


def _lora_config_fastft():
    import fastft

    return fastft.LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules="all-linear")


def _peft_wrap(model):
    import peft

    return peft.get_peft_model(model, peft.LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0,
                                                      target_modules="all-linear", task_type="CAUSAL_LM"))


def _checkpointing(model, kw):
    """Gradient checkpointing on a transformers model, by whichever name its version has."""
    fn = getattr(model, "activation_checkpointing_enable", None)
    if fn is not None:
        return fn(activation_checkpointing_kwargs=kw)
    return model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)


def build(spec):
    """(model ready to train, notes) for ``spec["variant"]``."""
    import torch

    import fastft
    from fastft.models.synthetic import seed_lora

    variant, quant = spec["variant"], spec["quant"]
    device = torch.device(spec["device"])
    wdt = _dtype(spec["dtype"])
    kind, name = spec["source"]
    notes = []
    gc_kw = {"use_reentrant": False}
    if variant in ("fastft", "fastft-lean"):
        if kind == "checkpoint":
            from fastft.models.convert import smollm2_path

            model = fastft.from_pretrained(smollm2_path(), quantization=quant, dtype=wdt, device=device,
                                           double_quant=True)
        else:
            src = _dtype(spec["source_dtype"]) if spec.get("source_dtype") else None
            model = fastft.from_config(name, quantization=quant, dtype=wdt, device=device, seed=spec["seed"],
                                       source_dtype=src)
        model.gradient_checkpointing_enable()
        model = fastft.get_peft_model(model, _lora_config_fastft())
        if variant == "fastft-lean":  # what TrainingArguments(tiled_mlp=n, offload_embeddings=True) does
            from fastft.nn import offload_frozen_to_host

            tile = int(spec.get("tile_tokens", 512))
            if tile:
                model.tiled_mlp_enable(tile)
            offload_frozen_to_host(model)
            b = model.get_base_model()
            notes.append((f"tiled MLP {tile} tokens" if tile else "MLP not tiled")
                         + f"; host tables stored in {b.model.embed_tokens.weight.dtype}")
            if device.type == "cuda":  # --gradient-checkpointing offload (on a CPU the inputs are in host memory)
                b.gradient_checkpointing_enable(offload=True)
                notes.append("checkpointed layer inputs offloaded to pinned host memory")
            else:  # --lean-cpu-allocator
                from fastft.train.allocator import lean_cpu_allocator

                notes.append("lean CPU allocator (glibc mmap threshold 1 MiB)" if lean_cpu_allocator()
                             else "lean CPU allocator not applied (malloc is not glibc's)")
    elif variant in ("fastft-patch", "fastft-patch-hfloss"):
        # The shape source is quantized while it is built (one full-precision layer at a time), which
        # is what patch(quantization=) would do to a dense model; a checkpoint is patched as loaded.
        lean = quant and kind == "shape"
        model = _hf_model(spec, "fastft" if lean else None, wdt, device)
        _checkpointing(model, gc_kw)
        fastft.patch(model, quantization=quant, loss=variant == "fastft-patch")
        model = fastft.get_peft_model(model, _lora_config_fastft())
    elif variant in (BASELINE, LIGER):
        if variant == LIGER:
            from liger_kernel.transformers import apply_liger_kernel_to_llama

            flce = not spec.get("liger_no_flce")
            apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, cross_entropy=not flce,
                                        fused_linear_cross_entropy=flce)
            notes.append("liger: rope, rms_norm, swiglu, " + ("fused_linear_cross_entropy" if flce else "cross_entropy"))
        model = _hf_model(spec, "bnb" if quant else None, wdt, device)
        _checkpointing(model, gc_kw)
        model = _peft_wrap(model)
    elif variant in FIRST_STEP_ONLY:
        # gold: one precision up; ref: the same model in the variants' own precision, i.e. PyTorch
        # computing the same function in that dtype (the agreement tolerance's yardstick).
        gdt = _dtype(gold_dtype(spec)) if variant == "gold" else wdt
        model = _hf_model(spec, "dequant" if quant else None, gdt, device)
        _checkpointing(model, gc_kw)
        model = _peft_wrap(model)
        model.to(gdt)
    else:
        raise ValueError(f"unknown variant {variant!r}; known: {', '.join(VARIANTS)}")
    n = seed_lora(model, seed=spec["seed"])
    if n == 0:
        raise RuntimeError(f"{variant}: no LoRA layers found to seed")
    model.train()
    return model, notes


# ------------------------------------------------------------------------------------------------
# One variant, in its own process
# ------------------------------------------------------------------------------------------------
def worker(spec: dict) -> dict:
    import resource

    import torch

    t_start = time.perf_counter()
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    device = torch.device(spec["device"])
    cuda = device.type == "cuda"
    variant = spec["variant"]
    model, notes = build(spec)
    if cuda:
        torch.cuda.synchronize()
    t_built = time.perf_counter()
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in trainable)
    opt = torch.optim.AdamW(trainable, lr=1e-4)
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(spec["seed"] + 1)
    ids = torch.randint(0, vocab, (spec["batch"], spec["seq"]), generator=g).to(device)
    autocast = spec["autocast"] and variant != "gold"

    out = {"variant": variant, "notes": notes, "trainable_params": n_trainable, "build_s": round(t_built - t_start, 2),
           "threads": torch.get_num_threads()}
    if cuda:
        out["weights_mb"] = round(torch.cuda.memory_allocated() / 2**20, 1)
        torch.cuda.reset_peak_memory_stats()
    else:
        out["rss_after_build_mb"] = _status_mb("VmRSS")
        out["peak_rss_reset"] = reset_peak_rss()

    def step(first=False):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            if variant in FIRST_STEP_ONLY:
                # transformers' loss upcasts the logits to fp32 only: the gold's loss is formed here,
                # in the gold dtype (fp32 for the reference), from its own logits.
                logits = model(input_ids=ids, use_cache=False).logits
                logits = logits.float() if logits.dtype in (torch.bfloat16, torch.float16) else logits
                loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                         ids[:, 1:].reshape(-1))
                del logits
            else:
                loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        gn = None
        if first:
            gn = math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in trainable if p.grad is not None))
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach()), gn

    times = []
    steps = 0 if variant in FIRST_STEP_ONLY else int(spec["steps"])
    warmup = max(1, int(spec["warmup"]))
    for i in range(warmup + steps):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss, gn = step(first=i == 0)
        if cuda:
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        if i == 0:
            out.update(first_loss=loss, grad_norm=gn, first_step_s=round(dt, 3))
            if not math.isfinite(loss) or gn is None or not math.isfinite(gn) or gn == 0.0:
                raise RuntimeError(f"{variant}: first step gave loss {loss}, LoRA grad norm {gn}")
        elif i >= warmup:
            times.append(dt)
    if times:
        out.update(median_s=statistics.median(times), step_s=[round(t, 4) for t in times])
    if cuda:
        out.update(peak_allocated_mb=round(torch.cuda.max_memory_allocated() / 2**20, 1),
                   peak_reserved_mb=round(torch.cuda.max_memory_reserved() / 2**20, 1))
    else:
        out.update(peak_rss_mb=_status_mb("VmHWM"),
                   peak_rss_life_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1))
    return out


def _drop_repo_root():
    """`python -m` puts the repository root on sys.path, where fastft's kernels/ folder shadows the
    PyPI package `kernels` that transformers and bitsandbytes probe for; fastft itself is installed."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != here]


def _worker_main(spec_json: str) -> int:
    _drop_repo_root()
    spec = json.loads(spec_json)
    try:
        res = worker(spec)
    except Exception as e:  # reported as the variant's row
        import traceback

        traceback.print_exc()
        res = {"variant": spec["variant"], "error": f"{type(e).__name__}: {str(e)[-800:]}"}
    print("@@BENCH_STEP@@" + json.dumps(res), flush=True)
    return 0


# ------------------------------------------------------------------------------------------------
# Driver: spawn, time-box, interleave
# ------------------------------------------------------------------------------------------------
def _child_env(spec):
    env = dict(os.environ)
    if spec.get("threads"):
        env["OMP_NUM_THREADS"] = str(spec["threads"])
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    return env


def _run_exec(spec, timeout):
    cmd = [sys.executable, "-m", "benchmarks.bench_step", "--worker", json.dumps(spec)]
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if os.path.basename(repo) != "fastft":  # a checkout: run the module from it
        cwd = repo
    else:  # installed as fastft.benchmarks
        cmd[2] = "fastft.benchmarks.bench_step"
        cwd = os.getcwd()
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=_child_env(spec), timeout=timeout,
                           start_new_session=True)
    except subprocess.TimeoutExpired as e:
        tail = (e.stderr or b"")[-1500:]
        tail = tail.decode(errors="replace") if isinstance(tail, bytes) else tail
        return {"variant": spec["variant"], "error": f"timeout after {timeout:.0f} s", "log_tail": tail}
    return _parse_child(spec, r.stdout, r.stderr, r.returncode)


def _parse_child(spec, stdout, stderr, rc):
    lines = [ln for ln in (stdout or "").splitlines() if ln.startswith("@@BENCH_STEP@@")]
    if not lines:
        return {"variant": spec["variant"], "error": f"worker exited {rc} without a result",
                "log_tail": (stderr or "")[-1500:]}
    res = json.loads(lines[-1][len("@@BENCH_STEP@@"):])
    if "error" in res:
        res["log_tail"] = (stderr or "")[-1500:]
    return res


def _run_fork(spec, timeout):
    """Fork this process (which has imported the heavy libraries once) to run one variant."""
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(rfd)
        code = 0
        try:
            if spec.get("threads"):
                os.environ["OMP_NUM_THREADS"] = str(spec["threads"])
            try:
                res = worker(spec)
            except Exception as e:
                import traceback

                res = {"variant": spec["variant"], "error": f"{type(e).__name__}: {str(e)[-800:]}",
                       "log_tail": traceback.format_exc()[-1500:]}
            data = json.dumps(res).encode()
            view = memoryview(data)
            while view:
                n = os.write(wfd, view)
                view = view[n:]
        except BaseException:
            code = 1
        finally:
            os.close(wfd)
            os._exit(code)
    os.close(wfd)
    chunks, deadline = [], time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                return {"variant": spec["variant"], "error": f"timeout after {timeout:.0f} s"}
            ready, _, _ = select.select([rfd], [], [], min(left, 1.0))
            if ready:
                b = os.read(rfd, 1 << 16)
                if not b:
                    break
                chunks.append(b)
    finally:
        os.close(rfd)
    _, status = os.waitpid(pid, 0)
    data = b"".join(chunks)
    if not data:
        return {"variant": spec["variant"], "error": f"forked worker died (status {status}) without a result"}
    return json.loads(data)


def liger_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("liger_kernel") is not None


def skip_reason(variant, case) -> str | None:
    """Why ``variant`` cannot run here (None when it can)."""
    import importlib.util

    if variant == LIGER:
        if not liger_available():
            return "liger-kernel is not installed"
        if case["device"] == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            return "Liger-Kernel's Triton kernels need a GPU (or TRITON_INTERPRET=1)"
    if variant in (BASELINE, LIGER) and case["quant"] and importlib.util.find_spec("bitsandbytes") is None:
        return "bitsandbytes is not installed (the QLoRA baseline)"
    if variant not in VARIANTS:
        return f"unknown variant (known: {', '.join(VARIANTS)})"
    return None


def impl_name(variant, case) -> str:
    bnb = " + bitsandbytes" if case["quant"] else ""
    dq = " (NF4-dequantized)" if case["quant"] else ""
    return VARIANTS[variant].format(bnb=bnb, gold_dtype=gold_dtype(case), dq=dq)


def case_title(name, case) -> str:
    kind, src = case["source"]
    model = "SmolLM2-135M" if src == "smollm2" else f"{src} shape (seeded weights)"
    if case.get("source_dtype"):
        model = model.replace("seeded weights", f"seeded weights, {case['source_dtype']}-valued")
    mode = "QLoRA NF4+dq" if case["quant"] else "LoRA dense base"
    prec = "bf16 weights + bf16 autocast" if case["autocast"] else {"float32": "fp32", "bfloat16": "bf16 weights"}[
        case["dtype"]]
    return (f"train step {model} b{case['batch']}xT{case['seq']} {mode} r{R} a{ALPHA} all-linear {prec}, "
            f"grad ckpt, AdamW [{name}]")


def run_case(name: str, *, rounds: int = 1, steps=None, warmup=None, threads=None, variants=None, spawn="exec",
             budget: float | None = None, seed: int = 0, log=print, raw_path: str | None = None,
             tile_tokens: int | None = None) -> list[dict]:
    """Run one case; returns its rows (one per variant, plus skips and errors). ``raw_path``: each
    process's raw result is appended there as it arrives (a run killed mid-case keeps them).
    ``tile_tokens``: the ``fastft-lean`` variant's MLP tile (0: untiled) instead of the case's."""
    from . import common

    case = dict(CASES[name])
    if tile_tokens is not None:
        case["tile_tokens"] = int(tile_tokens)
    if variants:
        case["variants"] = list(variants)
    if steps is not None:
        case["steps"] = steps
    if warmup is not None:
        case["warmup"] = warmup
    if spawn == "fork" and case["device"] == "cuda":
        raise ValueError("--spawn fork cannot be used with CUDA (a forked CUDA context is unusable); use exec")
    t_end = time.monotonic() + budget if budget else None
    title = case_title(name, case)
    runnable, rows = [], []
    for v in case["variants"]:
        why = skip_reason(v, case)
        if why:
            rows.append(common.row(title, impl_name(v, case) if v in VARIANTS else v, None, variant=v, skipped=why))
            log(f"# {name} {v}: skipped ({why})")
        else:
            runnable.append(v)
    # gold (first step only) runs once, in round 0, where the case lists it: the GPU cases put it
    # right after the baseline, so a time box cuts optional variants before the agreement check.
    timed = [v for v in runnable if v not in FIRST_STEP_ONLY]
    order0 = list(runnable)
    results: dict[str, list[dict]] = {v: [] for v in runnable}
    env_facts = {"cpu_flags": cpu_flags(), "allocator_env": allocator_env(), "spawn": spawn}

    def run_one(v, r, no_flce=False):
        spec = {**{k: case[k] for k in ("source", "quant", "batch", "seq", "dtype", "autocast", "device", "steps",
                                        "warmup")}, "variant": v, "seed": seed, "threads": threads,
                **{k: case[k] for k in ("source_dtype", "tile_tokens") if case.get(k) is not None}}
        if no_flce:
            spec["liger_no_flce"] = True
        left = (t_end - time.monotonic()) if t_end else 3600.0
        if left < 5:
            res = {"variant": v, "error": "not run: the time box was used up"}
        else:
            load0 = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
            res = (_run_fork if spawn == "fork" else _run_exec)(spec, left)
            res["round"] = r
            res["load_avg_before"] = load0
        results[v].append(res)
        if raw_path:
            with open(raw_path, "a") as f:
                f.write(json.dumps({"case": name, **res}, sort_keys=True) + "\n")
        brief = {k: res.get(k) for k in ("median_s", "first_loss", "grad_norm", "peak_allocated_mb", "peak_rss_mb",
                                         "error") if res.get(k) is not None}
        log(f"# {name} round {r} {v}: {brief}")
        return res

    liger_no_flce = False
    for r in range(rounds):
        order = order0 if r == 0 else (timed if r % 2 == 0 else list(reversed(timed)))
        for v in order:
            res = run_one(v, r, no_flce=v == LIGER and liger_no_flce)
            if v == LIGER and "error" in res and not liger_no_flce and "timeout" not in res["error"] \
                    and "time box" not in res["error"]:
                # Liger's fused linear cross-entropy may not support this transformers version: once
                # more with its plain cross-entropy (a new process: Liger patches classes globally).
                log(f"# {name} {v}: retrying without Liger's fused linear cross-entropy")
                liger_no_flce = True
                results[v][-1]["superseded"] = True
                run_one(v, r, no_flce=True)

    rows += summarize(name, case, title, results, env_facts)
    return rows


def _ok(res_list):
    return [r for r in res_list if "error" not in r]


def _final(res_list):
    return [r for r in res_list if not r.get("superseded")]


def summarize(name, case, title, results, env_facts) -> list[dict]:
    from . import common

    tokens = case["batch"] * case["seq"]
    gold = _ok(results.get("gold", []))
    # PyTorch's own error in the dtype: the reference variant (the gold's model in the variants'
    # precision); without it, the transformers + PEFT baseline (which may differ in more than
    # precision, e.g. its own quantizer).
    base = _ok(results.get("ref", [])) or _ok(results.get(BASELINE, []))
    g = gold[0] if gold else None
    b = base[0] if base else None
    tol_loss = tol_gn = None
    dt = "bfloat16" if case["autocast"] else case["dtype"]  # the variants' compute dtype
    if g and b:
        floor = FLOOR[dt]
        tol_loss = 2 * abs(b["first_loss"] - g["first_loss"]) + floor * max(abs(g["first_loss"]), 1.0)
        tol_gn = 2 * abs(b["grad_norm"] - g["grad_norm"]) + floor * max(abs(g["grad_norm"]), 1.0)

    def med(v, key="median_s"):
        vals = [r[key] for r in _ok(results.get(v, [])) if r.get(key) is not None]
        return statistics.median(vals) if vals else None

    def paired(v, ref):
        """Median over rounds of t_ref / t_v (same round)."""
        by_r = {r["round"]: r for r in _ok(results.get(ref, [])) if r.get("median_s")}
        ratios = [by_r[r["round"]]["median_s"] / r["median_s"] for r in _ok(results.get(v, []))
                  if r.get("median_s") and r["round"] in by_r]
        return (statistics.median(ratios), min(ratios), max(ratios)) if ratios else None

    mem_key = "peak_allocated_mb" if case["device"] == "cuda" else "peak_rss_mb"
    rows = []
    for v, res_list in results.items():
        res_list = _final(res_list)
        ok = _ok(res_list)
        impl = impl_name(v, case)
        if not ok:
            last = res_list[-1] if res_list else {"error": "no result"}
            rows.append(common.row(title, impl, None, variant=v, error=last.get("error"),
                                   log_tail=last.get("log_tail", "")[-600:], **env_facts))
            continue
        first = ok[0]
        extra = {k: first.get(k) for k in ("first_loss", "grad_norm", "trainable_params", "threads", "build_s",
                                           "first_step_s", "weights_mb", "rss_after_build_mb", "peak_rss_reset",
                                           "notes") if first.get(k) is not None}
        for key in ("peak_allocated_mb", "peak_reserved_mb", "peak_rss_mb", "peak_rss_life_mb"):
            vals = [r[key] for r in ok if r.get(key) is not None]
            if vals:
                extra[key] = max(vals)
        extra["rounds"] = len(ok)
        extra["step_ms_by_round"] = [round(r["median_s"] * 1e3, 1) for r in ok if r.get("median_s")]
        extra["load_avg_before"] = [r.get("load_avg_before") for r in ok]
        if g is not None:
            extra["loss_err_vs_gold"] = abs(first["first_loss"] - g["first_loss"])
            extra["grad_norm_err_vs_gold"] = abs(first["grad_norm"] - g["grad_norm"])
        if tol_loss is not None and v not in FIRST_STEP_ONLY:
            extra.update(loss_tol=tol_loss, grad_norm_tol=tol_gn,
                         agree=bool(extra["loss_err_vs_gold"] <= tol_loss and extra["grad_norm_err_vs_gold"] <= tol_gn))
        elif v not in FIRST_STEP_ONLY:
            extra["agree"] = None
        t = med(v)
        kw = {}
        if v in FASTFT_VARIANTS or v == LIGER:
            p = paired(v, BASELINE)
            if p:
                kw.update(baseline=impl_name(BASELINE, case), baseline_s=p[0] * t)  # speedup = paired median
                extra.update(speedup_min=round(p[1], 3), speedup_max=round(p[2], 3))
            pl = paired(v, LIGER) if v != LIGER else None
            if pl:
                extra["speedup_vs_liger"] = round(pl[0], 3)
            bm = med(BASELINE, mem_key)
            if bm and extra.get(mem_key):
                extra["mem_ratio_vs_baseline"] = round(extra[mem_key] / bm, 3)
            lm = med(LIGER, mem_key)
            if lm and extra.get(mem_key) and v != LIGER:
                extra["mem_ratio_vs_liger"] = round(extra[mem_key] / lm, 3)
        rows.append(common.row(title, impl, t, tokens=tokens if t else None, variant=v, **kw, **extra, **env_facts))
    return rows


def disagreements(rows) -> list[str]:
    """Variants whose first step disagrees with the gold beyond the derived tolerance."""
    return [f"{r['variant']}: loss {r['first_loss']:.6g} (err {r['loss_err_vs_gold']:.2e} > tol {r['loss_tol']:.2e}) or "
            f"grad norm {r['grad_norm']:.6g} (err {r['grad_norm_err_vs_gold']:.2e} > tol {r['grad_norm_tol']:.2e})"
            for r in rows if r.get("agree") is False]


# ------------------------------------------------------------------------------------------------
# Suite entry (benchmarks.run) and CLI
# ------------------------------------------------------------------------------------------------
def suite_cases(suite: str) -> list[str]:
    mode = os.environ.get("FASTFT_BENCH_STEP", "1")
    if mode == "0":
        return []
    if suite == "gpu":
        return ["gpu-8b-qlora", "gpu-1b-lora"]
    bf16 = native_bf16_cpu()
    cases = ["cpu-smollm2-qlora", "cpu-smollm2-lora"]
    if bf16:
        cases += ["cpu-smollm2-qlora-bf16", "cpu-smollm2-lora-bf16"]
    if mode == "all":
        cases += ["cpu-1b-qlora-mem", "cpu-1b-lora-mem"]
    return cases


def run(suite: str) -> list[dict]:
    import torch

    if suite == "gpu" and not torch.cuda.is_available():
        return []
    rounds = int(os.environ.get("FASTFT_BENCH_STEP_ROUNDS", "3" if suite == "cpu" else "1"))
    threads = int(os.environ["FASTFT_BENCH_THREADS"]) if os.environ.get("FASTFT_BENCH_THREADS") else (
        torch.get_num_threads() if suite == "cpu" else None)
    rows = []
    for name in suite_cases(suite):
        rows += run_case(name, rounds=rounds, threads=threads)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--brief", metavar="JSONL", help="print a one-line summary of rows written by --json and exit")
    ap.add_argument("--case", action="append", default=[], help="a case of --list; repeatable")
    ap.add_argument("--list", action="store_true", help="list the cases and exit")
    ap.add_argument("--variants", help="comma-separated subset of the case's variants")
    ap.add_argument("--rounds", type=int, default=1, help="alternating rounds (each variant once per round)")
    ap.add_argument("--steps", type=int, help="timed steps per process (default: the case's)")
    ap.add_argument("--warmup", type=int, help="untimed steps first, >= 1 (default: the case's)")
    ap.add_argument("--threads", type=int, help="torch intra-op threads (and OMP_NUM_THREADS) in every variant")
    ap.add_argument("--spawn", choices=["exec", "fork"], default="exec")
    ap.add_argument("--budget", type=float, help="seconds for the whole run; variants not started in time are "
                    "reported as not run")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tile-tokens", type=int, help="fastft-lean's MLP tile in tokens, 0 for none (default: the case's)")
    ap.add_argument("--json", help="also write the rows to this file (JSON lines)")
    ap.add_argument("--record", action="store_true", help="record the rows under benchmarks/results (suite by device)")
    ap.add_argument("--check", action="store_true", help="exit 1 when a variant fails or disagrees with the gold")
    a = ap.parse_args(argv)
    if __name__ == "__main__":
        _drop_repo_root()
    if a.worker:
        return _worker_main(a.worker)
    if a.brief:
        with open(a.brief) as f:
            print(brief([json.loads(x) for x in f if x.strip()]))
        return 0
    if a.list:
        for n, c in CASES.items():
            print(f"{n:24s} {case_title(n, c)}  variants: {','.join(c['variants'])}")
        return 0
    if not a.case:
        ap.error("--case is required (see --list)")
    unknown = [c for c in a.case if c not in CASES]
    if unknown:
        ap.error(f"unknown case(s) {unknown}; known: {', '.join(CASES)}")
    if a.spawn == "fork":  # import once here; each forked variant then starts warm
        import torch  # noqa: F401
        import transformers  # noqa: F401

        import fastft.models  # noqa: F401
        try:
            import peft  # noqa: F401
        except ImportError:
            pass
    from . import common

    common.CURRENT_BENCH = "step"
    stream = os.environ.get("FASTFT_BENCH_STREAM")
    if stream and not os.path.exists(stream):  # `benchmarks.run --ingest` needs the environment first
        suite = "gpu" if any(CASES[c]["device"] == "cuda" for c in a.case) else "cpu"
        with open(stream, "a") as f:
            f.write(json.dumps({"_env": common.environment(suite)}, sort_keys=True) + "\n")
    t_end = time.monotonic() + a.budget if a.budget else None
    rows = []
    for name in a.case:
        left = (t_end - time.monotonic()) if t_end else None
        rows += run_case(name, rounds=a.rounds, steps=a.steps, warmup=a.warmup, threads=a.threads,
                         variants=a.variants.split(",") if a.variants else None, spawn=a.spawn, budget=left,
                         seed=a.seed, log=lambda s: print(s, flush=True), raw_path=a.json + ".raw" if a.json else None,
                         tile_tokens=a.tile_tokens)
    for r in rows:
        print(json.dumps(r, sort_keys=True), flush=True)
    if a.json:
        tmp = a.json + ".tmp"
        with open(tmp, "w") as f:
            for r in rows:
                f.write(json.dumps(r, sort_keys=True) + "\n")
        os.replace(tmp, a.json)
    if a.record:
        suite = "gpu" if any(CASES[c]["device"] == "cuda" for c in a.case) else "cpu"
        env = common.environment(suite)
        for r in rows:
            r.setdefault("bench", "step")
        print("# recorded:", common.record(suite, rows, env))
    print(table(rows))
    bad = disagreements(rows)
    for line in bad:
        print("DISAGREES:", line)
    failed = [r for r in rows if r.get("error")]
    return 1 if a.check and (bad or failed) else 0


def brief(rows) -> str:
    """One line: each variant's tokens/s, speedup and agreement (gpu_check's summary)."""
    out = []
    for r in rows:
        v = r.get("variant", r.get("impl"))
        if r.get("skipped") or r.get("error"):
            out.append(f"{v}: {'skipped' if r.get('skipped') else 'ERROR'}")
            continue
        if v in FIRST_STEP_ONLY:
            out.append(f"{v}: loss {r.get('first_loss', float('nan')):.6g}")
            continue
        tps = f" {r['tokens_per_s']:.0f} tok/s" if r.get("tokens_per_s") else ""
        sp = f" x{r['speedup']}" if r.get("speedup") else ""
        out.append(f"{v}:{tps}{sp} agree={r.get('agree')}")
    return "; ".join(out)


def table(rows) -> str:
    lines = ["| case | impl | ms/step | tokens/s | speedup | peak MB | mem ratio | first loss | grad norm | agree |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        peak = r.get("peak_allocated_mb", r.get("peak_rss_mb"))
        status = r.get("error") or r.get("skipped")
        lines.append("| " + " | ".join(str(x) if x is not None else "" for x in (
            r["case"].rsplit("[", 1)[-1].rstrip("]"), r["impl"], r.get("median_ms"), r.get("tokens_per_s"),
            r.get("speedup"), peak, r.get("mem_ratio_vs_baseline"),
            f"{r['first_loss']:.6g}" if r.get("first_loss") is not None else None,
            f"{r['grad_norm']:.6g}" if r.get("grad_norm") is not None else None,
            r.get("agree") if status is None else f"({status[:60]})")) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
