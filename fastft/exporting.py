"""Export a fine-tuned model where users deploy it, and prove the export reproduces it.

``fastft.export(model_or_dir, out, format="hf" | "gguf", ...)`` (CLI: ``fastft export``):

- **hf**: the merged model as sharded safetensors (``model-0000k-of-0000n.safetensors`` + index,
  or one ``model.safetensors``) with ``config.json``, ``generation_config.json`` and the tokenizer
  (incl. its chat template): a plain transformers checkpoint (vLLM, TGI, transformers) that needs
  no fastft. dtype bf16 (default), fp16 or fp32.
- **gguf**: one GGUF file for llama.cpp / Ollama / LM Studio, written with the ``gguf`` package
  (fastft/export_gguf.py has the layout facts): f16 (default) or q8_0.

The merge. A LoRA adapter is folded into its base in fp32 (W + s·B·A, ``merge_and_unload``) and the
result is cast once, to the export's type. A quantized base (QLoRA's NF4) is dequantized to fp32
first, and the export says so: it is a 16-bit model of the 4-bit base plus the adapter, which is
what training saw -- not the original full-precision base plus the adapter.

Memory. The merged model is held once (fp32); tensors are converted and written one at a time
(the GGUF writer and the safetensors writer here stream), so writing needs about one tensor
beyond the model. Verification reloads the file, which needs a second copy of the model while
the logits are compared (when ``export`` loaded the model itself it frees its own copy first).

Verification (``verify=True`` = "full", the default; "fast"; False), on a temporary path beside
``out`` before it is renamed into place:

1. every tensor is read back (safetensors; GGUF through gguf-py's reader and dequantizer) and
   must equal, bit for bit, the merged tensor as the format stores it (Q(W): the dtype cast, or
   fastft's q8_0 encoding, which must also meet q8_0's analytic error bound);
2. GGUF: the metadata keys llama.cpp requires are read back and compared with the config;
3. logits on three fixed prompts: the reloaded model -- transformers for hf; for GGUF a
   transformers model built from the file's metadata alone and filled from gguf-py's reader, and
   ("full") transformers' own GGUF loader where it supports the file -- is compared with fastft's
   merged model run on Q(W) ("dequantize-then-run on the same weights"). Errors are
   max |Δlogit| / max |logit| over the prompts. The reload must match Q(W) within ``TOL_FP32``
   (fp32 implementations of the same function); its error against the merged model itself is
   printed next to the format's own error err(Q(W)) -- the cost of bf16 / f16 / q8_0 -- which,
   by the triangle inequality, it then exceeds by at most ``TOL_FP32``;
4. an adapter whose merge changes nothing (all-zero lora_B) is reported; a merge that does not
   reproduce the adapted model (a dropped adapter) is an error.

A failed check raises :class:`ExportError` and leaves ``out`` untouched; no partial output is
ever left behind: everything is written under a temporary name and renamed into place.
"""
from __future__ import annotations

from .errors import ModelError, OutputConflictError, UsageError

import contextlib
import json
import os
import re
import shutil
import struct
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

FORMATS = ("hf", "gguf")
HF_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
ARCHITECTURES = ("llama", "mistral", "qwen2")
# Two fp32 implementations of the same network (fastft's kernels, transformers' eager code) agree
# to a few fp32 ulps per operation; through tens of layers that stays well below 1e-5 of the logit
# scale (tests/test_export.py measures both against a float64 gold and asserts the margin).
TOL_FP32 = 1e-5
PROMPTS = ("The capital of France is", "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
           "Translate to German: I would like a cup of coffee, please.")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


class ExportError(ValueError):
    """The written file does not reproduce the merged model (or the merge lost the adapter)."""


@dataclass
class ExportReport:
    path: str
    format: str
    dtype: str | None = None
    quant: str | None = None
    tensors: int = 0
    bytes: int = 0
    seconds: float = 0.0
    verified: bool = False
    error: float | None = None          # reload vs merged model, max |Δlogit| / max |logit|
    format_error: float | None = None   # merged model on Q(W) vs merged model
    reload_error: float | None = None   # reload vs merged model on Q(W); must be <= tolerance
    tolerance: float = TOL_FP32
    logit_scale: float | None = None
    adapter_effect: float | None = None  # adapted vs base model (adapter scaled to 0)
    merge_error: float | None = None     # merged vs adapted model
    dequantized_base: str | None = None  # e.g. "NF4Weight" when a quantized base was dequantized
    notes: list = field(default_factory=list)
    phases: list = field(default_factory=list)  # (phase, seconds since start, RSS MB, peak RSS MB so far)

    def phase(self, name: str, t0: float) -> None:
        rss, peak = rss_mb()
        self.phases.append((name, round(time.perf_counter() - t0, 3), round(rss, 1), round(peak, 1)))


def rss_mb() -> tuple[float, float]:
    """(current, peak) resident set size of this process in MiB, from /proc/self/status (VmRSS,
    VmHWM: the peak of this process image -- ru_maxrss would carry a forking parent's peak across
    exec); NaN where /proc is absent."""
    vals = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    key, kb = line.split()[:2]
                    vals[key] = int(kb) / 1024.0
    except OSError:
        pass
    return vals.get("VmRSS:", float("nan")), vals.get("VmHWM:", float("nan"))

    def to_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------------------------
# Options and paths
# ----------------------------------------------------------------------------------------------
def _check_options(fmt, dtype, quant):
    if fmt not in FORMATS:
        raise UsageError(f"export format {fmt!r} is not supported; supported: {', '.join(FORMATS)}")
    if fmt == "hf":
        if quant is not None:
            raise UsageError("quant applies to format='gguf'; for 'hf' choose dtype (bf16, fp16, fp32)")
        dtype = dtype or "bf16"
        if dtype not in HF_DTYPES:
            raise UsageError(f"hf export dtype {dtype!r} is not supported; supported: {', '.join(HF_DTYPES)}")
        return dtype, None
    from fastft.export_gguf import QUANTS

    if dtype is not None:
        raise UsageError("dtype applies to format='hf'; for 'gguf' choose quant (f16, q8_0)")
    quant = quant or "f16"
    if quant not in QUANTS:
        raise UsageError(f"gguf quantization type {quant!r} is not supported; supported: {', '.join(QUANTS)}")
    return None, quant


def parse_size(size) -> int:
    """Bytes of "5GB", "500MB", "2GiB" (decimal / binary units, as transformers reads them) or an int."""
    if isinstance(size, int):
        if size <= 0:
            raise UsageError(f"max_shard_size must be positive, got {size}")
        return size
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?I?B)?\s*", str(size), flags=re.IGNORECASE)
    if not m:
        raise UsageError(f"max_shard_size {size!r} is not a size like '5GB', '500MB' or a number of bytes")
    unit = (m.group(2) or "B").upper()
    mult = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
            "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
    n = int(float(m.group(1)) * mult)
    if n <= 0:
        raise UsageError(f"max_shard_size must be positive, got {size!r}")
    return n


def _check_out(out: str, fmt: str) -> None:
    """An existing output may be replaced only by an output of the same kind."""
    if not os.path.lexists(out):
        return
    if fmt == "hf":
        if not os.path.isdir(out):
            raise OutputConflictError(f"export: {out!r} exists and is not a directory")
        if os.listdir(out) and not os.path.isfile(os.path.join(out, "config.json")):
            raise OutputConflictError(f"export: {out!r} exists and is not a checkpoint directory (no config.json); "
                             "refusing to replace it")
    else:
        if not os.path.isfile(out):
            raise OutputConflictError(f"export: {out!r} exists and is not a file")
        with open(out, "rb") as f:
            if f.read(4) not in (b"GGUF", b""):
                raise OutputConflictError(f"export: {out!r} exists and is not a GGUF file; refusing to replace it")


def _temp_beside(out: str) -> str:
    return os.path.join(os.path.dirname(out), f".{os.path.basename(out)}.tmp-{uuid.uuid4().hex[:8]}")


@contextlib.contextmanager
def _gguf_alone(path: str):
    """(directory, file name) of ``path`` linked into a fresh directory of its own, for transformers'
    GGUF loader: given the output's own directory it would pick up whatever else lies there (a PEFT
    adapter_config.json, as a Trainer's output_dir holds, makes it load the adapter's base model
    instead of the file)."""
    d = tempfile.mkdtemp(prefix=".fastft-verify-", dir=os.path.dirname(path))
    alone = os.path.join(d, "model.gguf")
    try:
        try:
            os.link(path, alone)
        except OSError:
            os.symlink(os.path.abspath(path), alone)
        yield d, "model.gguf"
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _move_into_place(tmp: str, out: str) -> None:
    if not os.path.isdir(tmp):
        os.replace(tmp, out)  # a file: atomic, replacing any old one
        return
    if not os.path.lexists(out):
        os.rename(tmp, out)
        return
    # A directory cannot be swapped atomically; the old one moves aside first, so at every moment
    # `out` is either the complete old export, absent, or the complete new one.
    old = _temp_beside(out) + ".old"
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.remove(path)


def _model_type_of(model_dir: str) -> str | None:
    try:
        with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as f:
            return json.load(f).get("model_type")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None


def _check_arch(model_type) -> None:
    if model_type not in ARCHITECTURES:
        raise ModelError(f"export: model_type {model_type!r} is not supported; supported: {', '.join(ARCHITECTURES)}")


def _has_tokenizer(d) -> bool:
    return bool(d) and os.path.isdir(d) and any(os.path.isfile(os.path.join(d, f)) for f in _TOKENIZER_FILES)


# ----------------------------------------------------------------------------------------------
# The model: merge, dequantize, fp32
# ----------------------------------------------------------------------------------------------
def _release_memory() -> None:
    """Return freed heap memory (tokenizer tables, LoRA / NF4 objects after the merge) to the OS, so
    the write's peak sits on the model, not on garbage (glibc keeps small freed blocks otherwise)."""
    import gc

    from fastft.train.allocator import trim

    gc.collect()
    trim()  # (not glibc: nothing to do)


def _is_peft(model) -> bool:
    return hasattr(model, "lora_layers") and hasattr(model, "merge_and_unload")


@contextlib.contextmanager
def _adapter_disabled(peft_model):
    """The base model's function: every LoRA update scaled by 0, trained module copies bypassed."""
    layers = list(peft_model.lora_layers().values())
    saved = [layer.scaling for layer in layers]
    handles = [w.register_forward_hook(lambda m, args, out: m.original_module(*args))
               for w in peft_model.modules_to_save_wrappers().values()]
    try:
        for layer in layers:
            layer.scaling = 0.0
        yield
    finally:
        for layer, s in zip(layers, saved):
            layer.scaling = s
        for h in handles:
            h.remove()


def _dequantize_remaining(model: nn.Module) -> str | None:
    """Replace every quantized linear left after the merge by a dense fp32 nn.Linear."""
    from fastft.nn.lora import is_quant_linear

    kind = None
    for path, mod in list(model.named_modules()):
        if not is_quant_linear(mod):
            continue
        kind = type(mod.weight).__name__
        w = mod.weight.dequantize(torch.float32)
        lin = nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None, device=w.device,
                        dtype=torch.float32)
        with torch.no_grad():
            lin.weight.copy_(w)
            if mod.bias is not None:
                lin.bias.copy_(mod.bias.float())
        lin.requires_grad_(False)
        parent, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, lin)
    return kind


def _quant_kind(model: nn.Module) -> str | None:
    from fastft.nn.lora import is_quant_linear

    for mod in model.modules():
        if is_quant_linear(mod):
            return type(mod.weight).__name__
    return None


def _tensor_names(model: nn.Module) -> list[str]:
    """The checkpoint tensor names of the plain (merged) model, in order; tied aliases once."""
    if hasattr(model, "weight_table"):
        return list(model.weight_table(model.config))
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    names = []
    for n in model.state_dict():
        if tied and n == "lm_head.weight":
            continue
        if n.endswith("inv_freq"):
            continue
        names.append(n)
    return names


def _tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    params = dict(model.named_parameters(remove_duplicate=False))
    params.update(dict(model.named_buffers(remove_duplicate=False)))
    out = {}
    for n in _tensor_names(model):
        if n not in params:
            raise ValueError(f"export: the model has no tensor {n!r} (a quantized or adapted layer left unmerged?)")
        out[n] = params[n]
    return out


@contextlib.contextmanager
def _stored_weights(model: nn.Module, tensors: dict[str, torch.Tensor], fn):
    """Run ``model`` on Q(W): each module's parameters are swapped for ``fn(name, W)`` just for its
    own forward call, so no second copy of the model is ever held."""
    name_of = {id(t): n for n, t in tensors.items()}
    touched: set[str] = set()
    handles = []
    for mod in model.modules():
        own = [p for p in mod._parameters.values() if p is not None and id(p) in name_of]
        if not own:
            continue

        def pre(m, args, own=own):
            m._fastft_saved = [(p, p.data) for p in own]
            for p in own:
                touched.add(name_of[id(p)])
                p.data = fn(name_of[id(p)], p.data).to(device=p.device, dtype=p.dtype)

        def post(m, args, out):
            for p, d in m._fastft_saved:
                p.data = d
            del m._fastft_saved

        handles += [mod.register_forward_pre_hook(pre), mod.register_forward_hook(post)]
    try:
        yield touched
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def _quiet_transformers():
    """No progress bars from transformers' loaders (their GGUF loader uses a plain tqdm)."""
    import transformers.modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as tlog

    was = tlog.is_progress_bar_enabled()
    tlog.disable_progress_bar()
    bar = gguf_utils.tqdm
    gguf_utils.tqdm = lambda it, *a, **k: it
    try:
        yield
    finally:
        gguf_utils.tqdm = bar
        if was:
            tlog.enable_progress_bar()


def _batch(prompts: list[torch.Tensor], pad_id: int):
    """Right-padded (ids, attention_mask, lengths): one forward pass for all prompts."""
    lens = [int(p.shape[1]) for p in prompts]
    ids = torch.full((len(prompts), max(lens)), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, :lens[i]] = p[0]
        mask[i, :lens[i]] = 1
    return ids, mask, lens


def _logits(model, batch) -> list[torch.Tensor]:
    """fp32 logits of each prompt's real tokens (right padding cannot reach them: attention is causal)."""
    ids, mask, lens = batch
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask).logits.detach().float().cpu()
    return [out[i, :n] for i, n in enumerate(lens)]


def _maxdiff(a, b) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def _prompt_ids(tok, vocab_size: int, max_position: int) -> tuple[list[torch.Tensor], list[str] | None]:
    limit = max(2, min(32, max_position))
    if tok is None:
        g = torch.Generator().manual_seed(0)
        return [torch.randint(0, vocab_size, (1, n), generator=g) for n in (7, 13, 5)][:3], None
    texts = list(PROMPTS)
    if isinstance(getattr(tok, "chat_template", None), str):
        try:
            texts[2] = tok.apply_chat_template([{"role": "user", "content": PROMPTS[2]}], tokenize=False,
                                               add_generation_prompt=True)
        except Exception:  # a template that needs other inputs: the plain text prompt then
            pass
    ids = []
    for t in texts:
        x = tok(t, return_tensors="pt").input_ids[:, :limit]
        if x.numel() == 0 or int(x.max()) >= vocab_size:
            raise ValueError(f"export: the tokenizer's ids do not fit the model's vocab_size {vocab_size}")
        ids.append(x)
    return ids, texts


# ----------------------------------------------------------------------------------------------
# hf format
# ----------------------------------------------------------------------------------------------
def _write_safetensors(path: str, names: list[str], tensors: dict, dtype: torch.dtype) -> None:
    """A safetensors file written tensor by tensor (header first: every shape is known up front)."""
    from fastft.models.safetensors_io import TAGS

    header, off = {"__metadata__": {"format": "pt"}}, 0
    for n in names:
        t = tensors[n]
        nbytes = t.numel() * dtype.itemsize
        header[n] = {"dtype": TAGS[dtype], "shape": list(t.shape), "data_offsets": [off, off + nbytes]}
        off += nbytes
    hb = json.dumps(header, separators=(",", ":")).encode("utf-8")
    hb += b" " * (-len(hb) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hb)))
        f.write(hb)
        for n in names:
            t = tensors[n].detach().to("cpu", dtype).contiguous()
            if t.dtype == torch.float16 and not torch.isfinite(t).all() and torch.isfinite(tensors[n]).all():
                raise ValueError(f"export: tensor {n!r} overflows fp16 (|values| up to "
                                 f"{float(tensors[n].abs().max()):.4g}); use dtype bf16 or fp32")
            f.write(t.reshape(-1).view(torch.uint8).numpy().data)
            del t
        f.flush()
        os.fsync(f.fileno())


def _shards(names, tensors, dtype, limit: int) -> list[list[str]]:
    shards, cur, size = [], [], 0
    for n in names:
        b = tensors[n].numel() * dtype.itemsize
        if cur and size + b > limit:
            shards.append(cur)
            cur, size = [], 0
        cur.append(n)
        size += b
    if cur:
        shards.append(cur)
    return shards


def _hf_config(model, dtype_name: str) -> dict:
    cfg = model.config.to_dict()
    for k in ("quantization_config", "torch_dtype", "_name_or_path"):
        cfg.pop(k, None)
    arch = getattr(model, "hf_architecture", None) or type(model).__name__
    cfg["architectures"] = [arch]
    cfg["dtype"] = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[dtype_name]
    cfg["tie_word_embeddings"] = bool(getattr(model.config, "tie_word_embeddings", False))
    return cfg


def _write_hf(d, model, tensors, dtype_name, shard_limit, tok_dir, model_dir) -> int:
    from transformers import GenerationConfig

    dtype = HF_DTYPES[dtype_name]
    os.makedirs(d)
    names = list(tensors)
    shards = _shards(names, tensors, dtype, shard_limit)
    weight_map = {}
    for i, group in enumerate(shards):
        fname = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        _write_safetensors(os.path.join(d, fname), group, tensors, dtype)
        weight_map.update({n: fname for n in group})
    total = sum(tensors[n].numel() * dtype.itemsize for n in names)
    if len(shards) > 1:
        with open(os.path.join(d, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2, sort_keys=True)
    with open(os.path.join(d, "config.json"), "w", encoding="utf-8") as f:
        json.dump(_hf_config(model, dtype_name), f, indent=2, sort_keys=True)
    gen = os.path.join(model_dir, "generation_config.json") if model_dir else None
    if gen and os.path.isfile(gen):
        shutil.copy2(gen, os.path.join(d, "generation_config.json"))
    else:
        GenerationConfig.from_model_config(model.config).save_pretrained(d)
    if tok_dir:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(tok_dir).save_pretrained(d)
    return total


def _readback_hf(d, tensors, dtype_name) -> None:
    """Every tensor in the files equals the merged tensor cast once to the export dtype, bit for bit."""
    from safetensors import safe_open

    dtype = HF_DTYPES[dtype_name]
    seen = set()
    for fname in sorted(f for f in os.listdir(d) if f.endswith(".safetensors")):
        with safe_open(os.path.join(d, fname), framework="pt") as f:
            for n in f.keys():
                if n not in tensors:
                    raise ExportError(f"{fname}: unexpected tensor {n!r}")
                got = f.get_tensor(n)
                want = tensors[n].detach().to("cpu", dtype)
                if got.dtype != dtype or got.shape != want.shape or not torch.equal(got, want):
                    raise ExportError(f"{fname}: tensor {n!r} read back differs from the merged model's "
                                      f"({got.dtype} {tuple(got.shape)} vs {dtype} {tuple(want.shape)})")
                seen.add(n)
    missing = sorted(set(tensors) - seen)
    if missing:
        raise ExportError(f"{d}: tensors missing from the written files: {missing[:8]}")


# ----------------------------------------------------------------------------------------------
# gguf format: read-back checks
# ----------------------------------------------------------------------------------------------
def _readback_gguf(reader, path, config, tensors, plan) -> None:
    from fastft import export_gguf as G

    types = {g: tt for g, _, _, tt in plan.entries}
    expected = {g: h for g, h, _, _ in plan.entries}
    seen = set()
    for _, gname, ttype, got in G.read_tensors(reader, config):
        if gname not in expected:
            raise ExportError(f"{path}: unexpected tensor {gname!r}")
        if ttype != types[gname]:
            raise ExportError(f"{path}: tensor {gname!r} is {ttype}, planned {types[gname]}")
        seen.add(gname)
        hf = expected[gname]
        if hf is None:  # rope_freqs: llama3 RoPE divisors, F32
            want = G.rope_freq_factors(config)
            if not torch.equal(got.reshape(want.shape), want):
                raise ExportError(f"{path}: tensor {gname!r} differs from the config's llama3 RoPE factors")
            continue
        w = tensors[hf].detach().to("cpu", torch.float32)
        if tuple(got.shape) != tuple(w.shape):
            raise ExportError(f"{path}: tensor {gname!r} has shape {tuple(got.shape)}, the model's {hf!r} "
                              f"{tuple(w.shape)}")
        rows_got = got.reshape(-1, got.shape[-1]) if got.dim() > 1 else got.reshape(1, -1)
        rows_w = w.reshape(rows_got.shape)
        step = max(1, (1 << 22) // max(1, rows_w.shape[1]))  # row chunks: a few MB of temporaries
        for a in range(0, rows_w.shape[0], step):
            g_, w_ = rows_got[a:a + step], rows_w[a:a + step]
            want = G.roundtrip(w_, ttype)
            if not torch.equal(g_, want):
                raise ExportError(f"{path}: tensor {gname!r} ({hf}) read back differs from its {ttype} encoding by "
                                  f"up to {float((g_ - want).abs().max()):.3g}")
            if ttype == "Q8_0":
                # fastft's q8_0 encoder is held to q8_0's analytic error bound as well, so a file that
                # gguf-py decodes consistently with it still cannot hold wrong values.
                err = (g_ - w_).reshape(-1, G.Q8_0_BLOCK).abs()
                d = w_.reshape(-1, G.Q8_0_BLOCK).abs().amax(1, keepdim=True) / 127
                if bool((err > G.q8_0_error_bound(d) * (1 + 2.0 ** -20)).any()):
                    raise ExportError(f"{path}: tensor {gname!r} misses the q8_0 error bound (max error "
                                      f"{float(err.max()):.3g})")
        del got
    missing = sorted(set(expected) - seen)
    if missing:
        raise ExportError(f"{path}: tensors missing from the file: {missing[:8]}")


def _check_gguf_metadata(r, path, config, vocab) -> None:
    from fastft import export_gguf as G
    from fastft.models.llama import rope_parameters

    arch = G.architecture(config)
    for k in G.REQUIRED_KEYS + G.MODEL_KEYS:
        key = k.format(arch=arch)
        if key not in r.fields:
            raise ExportError(f"{path}: metadata key {key!r} (required by llama.cpp) is missing")
    n_head = config.num_attention_heads
    want = {
        "general.architecture": arch,
        f"{arch}.context_length": config.max_position_embeddings,
        f"{arch}.embedding_length": config.hidden_size,
        f"{arch}.feed_forward_length": config.intermediate_size,
        f"{arch}.block_count": config.num_hidden_layers,
        f"{arch}.attention.head_count": n_head,
        f"{arch}.attention.head_count_kv": getattr(config, "num_key_value_heads", None) or n_head,
        f"{arch}.rope.dimension_count": getattr(config, "head_dim", None) or config.hidden_size // n_head,
        "tokenizer.ggml.model": vocab.kind,
        "tokenizer.ggml.pre": vocab.pre,
        "tokenizer.ggml.add_bos_token": vocab.add_bos,
    }
    for k, v in want.items():
        got = G.field_value(r, k)
        if got != v:
            raise ExportError(f"{path}: metadata {k} = {got!r}, expected {v!r}")
    f32 = lambda x: struct.unpack("<f", struct.pack("<f", float(x)))[0]  # noqa: E731
    for k, v in ((f"{arch}.attention.layer_norm_rms_epsilon", config.rms_norm_eps),
                 (f"{arch}.rope.freq_base", rope_parameters(config)["rope_theta"])):
        if G.field_value(r, k) != f32(v):
            raise ExportError(f"{path}: metadata {k} = {G.field_value(r, k)!r}, expected {f32(v)!r}")
    toks = G.field_value(r, "tokenizer.ggml.tokens")
    if toks != vocab.tokens:
        raise ExportError(f"{path}: tokenizer.ggml.tokens read back differs ({len(toks or [])} vs {len(vocab.tokens)})")
    if vocab.merges and G.field_value(r, "tokenizer.ggml.merges") != vocab.merges:
        raise ExportError(f"{path}: tokenizer.ggml.merges read back differs")
    for kind, tid in vocab.special.items():
        key = {"bos": "bos_token_id", "eos": "eos_token_id", "unk": "unknown_token_id",
               "pad": "padding_token_id"}[kind]
        if G.field_value(r, f"tokenizer.ggml.{key}") != tid:
            raise ExportError(f"{path}: tokenizer.ggml.{key} read back differs from {tid}")
    if isinstance(vocab.chat_template, str) and vocab.chat_template and \
            G.field_value(r, "tokenizer.chat_template") != vocab.chat_template:
        raise ExportError(f"{path}: tokenizer.chat_template read back differs")


def _transformers_reads_gguf(config) -> bool:
    """transformers' GGUF loader rebuilds these files faithfully: llama / qwen2 without RoPE scaling
    (it ignores the scaling keys and rope_freqs) and, for qwen2, without an explicit head_dim."""
    from fastft.models.llama import rope_parameters

    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return rope_parameters(config)["rope_type"] == "default" and (
        config.model_type != "qwen2" or head_dim == config.hidden_size // config.num_attention_heads)


def _reload_from_reader(reader, path, config):
    """A transformers model built from the file alone: config from its metadata, tensors from gguf-py's
    reader, filled one tensor at a time."""
    import transformers

    from fastft import export_gguf as G

    cfg = G.config_from_metadata(reader, config)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    params = dict(model.named_parameters(remove_duplicate=False))
    want = set(params) - ({"lm_head.weight"} if cfg.tie_word_embeddings else set())
    seen = set()
    with torch.no_grad():
        for key, gname, _, w in G.read_tensors(reader, config):
            if gname == "rope_freqs.weight":
                continue
            if key not in params or tuple(params[key].shape) != tuple(w.shape):
                raise ExportError(f"{path}: tensor {gname!r} does not fit a {type(model).__name__} built from the "
                                  f"file's metadata")
            params[key].copy_(w)
            seen.add(key)
    if seen != want:
        raise ExportError(f"{path}: tensors missing for the model the metadata describes: {sorted(want - seen)[:5]}")
    return model


# ----------------------------------------------------------------------------------------------
# The entry point
# ----------------------------------------------------------------------------------------------
def export(model_or_dir, out, *, format: str = "hf", adapter=None, dtype: str | None = None,
           quant: str | None = None, quantization: str | None = None, tokenizer=None,
           max_shard_size="5GB", verify: bool | str = True, name: str | None = None, log=print) -> ExportReport:
    """Merge and export a model; returns an :class:`ExportReport` (see the module docstring).

    model_or_dir: a checkpoint directory (loaded in fp32; ``quantization="nf4"`` loads the base
        as QLoRA trained on it), or a fastft / transformers Llama-family model, plain or with a
        fastft LoRA adapter. A model object is merged in place (as ``merge_and_unload`` does) and
        upcast to fp32 if it is not; pass a copy to keep the original.
    adapter: a PEFT LoRA adapter directory to apply first.
    format: "hf" (``dtype`` bf16 | fp16 | fp32, default bf16) or "gguf" (``quant`` f16 | q8_0,
        default f16).
    tokenizer: a tokenizer directory or object; default: the model directory's, else the adapter's.
    verify: True / "full" (every check; GGUF also through transformers' GGUF loader and tokenizer
        converter), "fast" (GGUF: gguf-py's reader only, no transformers GGUF loader) or False.
    """
    t0 = time.perf_counter()
    dtype, quant = _check_options(format, dtype, quant)
    level = {True: "full", False: None, None: None, "full": "full", "fast": "fast"}.get(verify, "?")
    if level == "?":
        raise ValueError(f"verify must be True, False, 'full' or 'fast', got {verify!r}")
    shard_limit = parse_size(max_shard_size)
    out = os.path.abspath(os.fspath(out))
    _check_out(out, format)
    report = ExportReport(path=out, format=format, dtype=dtype, quant=quant)

    def note(msg):
        report.notes.append(msg)
        if log:
            log(msg)

    owned = isinstance(model_or_dir, (str, os.PathLike))
    model_dir = None
    if adapter is not None:
        adapter = os.fspath(adapter)
        if not os.path.isdir(adapter):
            raise FileNotFoundError(f"export: adapter directory {adapter!r} not found")
    if owned:
        model_dir = os.fspath(model_or_dir)
        if not os.path.isdir(model_dir):
            raise FileNotFoundError(f"export: model directory {model_dir!r} not found")
        _check_arch(_model_type_of(model_dir))
    else:
        if quantization is not None:
            raise ValueError("export: quantization= applies when loading from a directory; the model object "
                             "is used as it is")
        _check_arch(getattr(getattr(model_or_dir, "config", None), "model_type", None))
    tok_src = tokenizer if tokenizer is not None else next(
        (d for d in (model_dir, adapter) if _has_tokenizer(d)), None)
    tok_tmp = None
    if tok_src is not None and not isinstance(tok_src, (str, os.PathLike)):
        tok_tmp = tempfile.mkdtemp(prefix="fastft-export-tok-")
        tok_src.save_pretrained(tok_tmp)
        tok_src = tok_tmp
    if tok_src is not None and not os.path.isdir(tok_src):
        raise FileNotFoundError(f"export: tokenizer directory {os.fspath(tok_src)!r} not found")
    if tok_src is None and format == "gguf":
        raise ValueError("export: GGUF needs the tokenizer (llama.cpp tokenizes with the vocabulary stored in the "
                         "file); pass tokenizer= or keep tokenizer.json next to the model")
    try:
        return _export(model_or_dir, owned, model_dir, adapter, out, format, dtype, quant, quantization,
                       tok_src, shard_limit, level, name, report, note, t0)
    finally:
        if tok_tmp:
            shutil.rmtree(tok_tmp, ignore_errors=True)


def _load(model_or_dir, owned, model_dir, adapter, quantization):
    import fastft

    model = fastft.from_pretrained(model_dir, quantization=quantization, dtype=torch.float32) if owned \
        else model_or_dir
    if adapter is not None:
        if _is_peft(model):
            raise ValueError("export: the model already carries an adapter; pass adapter=None")
        model = fastft.load_adapter(model, adapter)
    return model


def _merge(model, batch, fmt, dtype, quant, report, note):
    """Merge (fp32), dequantize what stays quantized, check the adapter; returns the plain model."""
    devices = {str(p.device) for p in model.parameters()} - {"cpu"}
    if devices:
        # The files are written from host memory anyway, and the checks compare fp32 CPU runs (GPU
        # kernels may use TF32, whose rounding is far above the fp32 tolerance).
        note(f"the model moves from {'/'.join(sorted(devices))} to the CPU for the merge and the checks")
        model.cpu()
    quant_kind = _quant_kind(model)
    non_fp32 = sorted({str(p.dtype) for p in model.parameters() if p.is_floating_point() and p.dtype != torch.float32})
    if non_fp32:
        note(f"the model's {'/'.join(non_fp32)} parameters are upcast to fp32 for the merge and the checks")
        model.float()
    peft = model if _is_peft(model) else None
    logits_peft = logits_base = None
    if peft is not None:
        layers = peft.lora_layers()
        zero_b = [p for p, layer in layers.items() if not bool(layer.lora_B.weight.detach().any())]
        if batch is not None:
            logits_peft = _logits(peft, batch)
            with _adapter_disabled(peft):
                logits_base = _logits(peft, batch)
        elif layers and len(zero_b) == len(layers):
            note(f"WARNING: the adapter changes nothing after merging: all {len(layers)} LoRA layers have an all-zero "
                 "lora_B")
        model = peft.merge_and_unload()
    if quant_kind is not None:
        _dequantize_remaining(model)
        report.dequantized_base = quant_kind
        note(f"quantized base ({quant_kind}): dequantized to fp32 before the adapter was folded in; the {fmt} "
             f"{dtype or quant} export holds the quantized base plus the adapter (what training saw), not the "
             "original full-precision weights plus the adapter")
    model.eval()
    if batch is None:
        return model, None
    logits_ref = _logits(model, batch)
    scale = max(float(x.abs().max()) for x in logits_ref) or 1.0
    report.logit_scale = scale
    if peft is not None:
        report.adapter_effect = _maxdiff(logits_peft, logits_base) / scale
        report.merge_error = _maxdiff(logits_ref, logits_peft) / scale
        # The merge is fp32 math on fp32 weights here (the model was upcast), so it reproduces the
        # adapted model to fp32 rounding; a lower-precision quantized base (dequantized to its own
        # dtype by merge_and_unload) gets the looser test that still catches a dropped adapter.
        merge_tol = TOL_FP32 if not non_fp32 else max(TOL_FP32, 0.5 * report.adapter_effect)
        if report.adapter_effect <= TOL_FP32:
            why = (f"{len(zero_b)} of {len(layers)} LoRA layers have an all-zero lora_B" if zero_b
                   else "its updates cancel out")
            note(f"WARNING: the adapter changes nothing after merging (max logit change "
                 f"{report.adapter_effect:.2e} of the logit scale; {why})")
        elif report.merge_error > merge_tol:
            raise ExportError(f"export: the merged model does not reproduce the adapted model (logits differ by "
                              f"{report.merge_error:.2e} of the logit scale, tolerance {merge_tol:.1e}; the adapter "
                              f"itself changes them by {report.adapter_effect:.2e}): the merge lost the adapter")
        else:
            note(f"adapter merged: it changes the logits by {report.adapter_effect:.2e} of the logit scale; the merged "
                 f"model reproduces the adapted one within {report.merge_error:.2e}")
    return model, logits_ref


def _export(model_or_dir, owned, model_dir, adapter, out, fmt, dtype, quant, quantization, tok_dir, shard_limit,
            level, name, report, note, t0):
    report.phase("start", t0)
    if owned:
        from fastft.models.loader import load_config

        config = load_config(model_dir)[1]
    else:
        config = model_or_dir.config
    # The tokenizer work comes before the model is loaded: its transient memory then never adds
    # to the model's.
    tok = None
    if tok_dir is not None:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(tok_dir)
    vocab = None
    if fmt == "gguf":
        from fastft import export_gguf as G

        G._rope_metadata(_NullWriter(), config)  # unsupported RoPE scaling fails before any work
        vocab = G.Vocab(tok_dir, int(config.vocab_size), log=note, tokenizer=tok)
        window = getattr(config, "sliding_window", None)
        if window and (config.model_type == "mistral" or getattr(config, "use_sliding_window", False)) and \
                window < config.max_position_embeddings:
            note(f"note: sliding_window={window} is not part of GGUF {G.architecture(config)!r}; llama.cpp attends "
                 f"over the whole context, which equals the model for sequences up to {window} tokens")
    batch = texts = None
    if level:
        prompts, texts = _prompt_ids(tok, int(config.vocab_size), int(config.max_position_embeddings))
        pad = getattr(config, "pad_token_id", None)
        batch = _batch(prompts, pad if isinstance(pad, int) and 0 <= pad < config.vocab_size else 0)
    else:  # the tokenizer's memory (~100 MB for a 49k vocabulary) goes back before the model comes
        tok = None
        if vocab is not None:
            vocab.tokenizer = None
        _release_memory()
    model = _load(model_or_dir, owned, model_dir, adapter, quantization)
    report.phase("loaded", t0)
    model.eval()
    model, logits_ref = _merge(model, batch, fmt, dtype, quant, report, note)
    config = model.config  # the merge may untie embeddings (trained modules_to_save copies)
    _release_memory()
    report.phase("merged", t0)
    tensors = _tensors(model)
    report.tensors = len(tensors)

    tmp = _temp_beside(out)
    created_top, p = None, os.path.dirname(out)
    while not os.path.exists(p):
        created_top, p = p, os.path.dirname(p)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    try:
        if fmt == "hf":
            report.bytes = _write_hf(tmp, model, tensors, dtype, shard_limit, tok_dir, model_dir)
            stored = lambda n, w: w.to(HF_DTYPES[dtype]).float()  # noqa: E731
        else:
            from fastft import export_gguf as G

            label = name or _default_name(model_dir, config, adapter)
            plan = G.write(tmp, config, {n: tuple(t.shape) for n, t in tensors.items()},
                           lambda n: tensors[n], vocab, quant, label, log=note)
            if plan.fallback_f16:
                note(f"q8_0 needs rows that are a multiple of 32: {len(plan.fallback_f16)} tensors stay F16 "
                     f"({', '.join(plan.fallback_f16[:4])}{' ...' if len(plan.fallback_f16) > 4 else ''})")
            report.bytes = os.path.getsize(tmp)
            ttype = {h: tt for _, h, _, tt in plan.entries if h is not None}
            stored = lambda n, w: G.roundtrip(w, ttype[n])  # noqa: E731
        report.phase("written", t0)
        if level:
            _verify(tmp, fmt, dtype, level, model, tensors, stored, owned, config, vocab,
                    plan if fmt == "gguf" else None, batch, logits_ref, tok, texts, report, note, t0)
            del model, tensors
        _move_into_place(tmp, out)
        report.phase("done", t0)
    except BaseException:
        _remove(tmp)
        if created_top is not None:
            shutil.rmtree(created_top, ignore_errors=True)
        raise
    report.seconds = time.perf_counter() - t0
    note(f"wrote {out} ({fmt} {dtype or quant}, {report.tensors} tensors, {report.bytes / 1e6:.1f} MB) in "
         f"{report.seconds:.1f} s")
    if report.verified:
        note(f"verified on {len(batch[2])} prompts (logit scale {report.logit_scale:.3g}): max logit error vs the "
             f"merged model {report.error:.2e}; the format's own error (dequantize-then-run) "
             f"{report.format_error:.2e}; reloaded vs dequantize-then-run {report.reload_error:.2e} "
             f"(tolerance {TOL_FP32:.0e})")
    return report


def _verify(tmp, fmt, dtype, level, model, tensors, stored, owned, config, vocab, plan, batch, logits_ref, tok, texts,
            report, note, t0):
    reader = None
    if fmt == "hf":
        _readback_hf(tmp, tensors, dtype)
    else:
        from fastft import export_gguf as G

        reader = G.open_reader(tmp)
        _readback_gguf(reader, tmp, config, tensors, plan)
        _check_gguf_metadata(reader, tmp, config, vocab)
    report.phase("read back", t0)
    with _stored_weights(model, tensors, stored) as touched:
        logits_q = _logits(model, batch)
    if touched != set(tensors):
        raise RuntimeError(f"export: the dequantize-then-run pass missed tensors {sorted(set(tensors) - touched)[:5]}")
    if owned:
        # The reload needs the memory; the merged model (the caller's names are the only other
        # references, and the caller deletes them right after) is no longer used.
        for p in list(model.parameters()) + list(model.buffers()):
            p.data = torch.empty(0, dtype=p.dtype)
        tensors.clear()
        _release_memory()
        report.phase("merged model freed", t0)
    scale = report.logit_scale
    report.format_error = _maxdiff(logits_q, logits_ref) / scale
    reloads = []
    with _quiet_transformers():
        if fmt == "hf":
            from transformers import AutoModelForCausalLM

            reloads.append(("transformers", lambda: AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32)))
        else:
            reloads.append(("gguf-py's reader (config from the file's metadata)",
                            lambda: _reload_from_reader(reader, tmp, config)))
            if level == "full" and _transformers_reads_gguf(config):
                from transformers import AutoModelForCausalLM

                def by_transformers():
                    with _gguf_alone(tmp) as (d, base):
                        return AutoModelForCausalLM.from_pretrained(d, gguf_file=base, dtype=torch.float32)

                reloads.append(("transformers' GGUF loader", by_transformers))
        for how, load in reloads:
            reloaded = load().eval()
            report.phase(f"reloaded: {how}", t0)
            logits_file = _logits(reloaded, batch)
            del reloaded
            reload_error = _maxdiff(logits_file, logits_q) / scale
            error = _maxdiff(logits_file, logits_ref) / scale
            report.reload_error = max(report.reload_error or 0.0, reload_error)
            report.error = max(report.error or 0.0, error)
            if reload_error > TOL_FP32:
                raise ExportError(
                    f"export: the written {fmt} file, reloaded by {how}, does not reproduce the merged model: its "
                    f"logits differ from dequantize-then-run on the same weights by {reload_error:.2e} of the "
                    f"logit scale (tolerance {TOL_FP32:.0e}); vs the merged model {error:.2e}, the format's own "
                    f"error {report.format_error:.2e}")
        if tok is not None and (fmt == "hf" or level == "full"):
            _check_tokenizer(tmp, fmt, tok, texts, note)
    report.verified = True


def _check_tokenizer(path, fmt, tok, texts, note) -> None:
    """The exported tokenizer encodes the prompts as the original does (GGUF: as transformers reads it)."""
    if texts is None:
        return
    from transformers import AutoTokenizer

    try:
        if fmt == "hf":
            other = AutoTokenizer.from_pretrained(path)
        else:
            with _gguf_alone(path) as (d, name):
                other = AutoTokenizer.from_pretrained(d, gguf_file=name)
    except Exception as e:  # transformers cannot rebuild every GGUF tokenizer; the file was checked above
        note(f"note: transformers could not rebuild the tokenizer from the {fmt} export ({type(e).__name__}: {e})")
        return
    for t in texts:
        if other(t).input_ids != tok(t).input_ids:
            msg = f"the {fmt} export's tokenizer (as transformers reads it) encodes {t[:40]!r} differently"
            if fmt == "hf":
                raise ExportError(f"export: {msg}")
            note(f"note: {msg}")
            return
    if fmt == "hf" and getattr(other, "chat_template", None) != getattr(tok, "chat_template", None):
        raise ExportError("export: the hf export's chat template differs from the tokenizer's")


def _default_name(model_dir, config, adapter) -> str:
    base = os.path.basename(os.path.normpath(model_dir or getattr(config, "_name_or_path", None) or "")) or \
        config.model_type
    return f"{base} + {os.path.basename(os.path.normpath(adapter))}" if adapter else str(base)


class _NullWriter:
    """Accepts the GGUF writer's add_* calls (to validate metadata before writing)."""

    def __getattr__(self, name):
        return lambda *a, **k: None


__all__ = ["export", "ExportReport", "ExportError", "FORMATS", "HF_DTYPES", "TOL_FP32", "parse_size"]
