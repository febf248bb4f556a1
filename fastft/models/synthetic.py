"""Build a native model from a config alone: no checkpoint, weights seeded by tensor name.

``fastft.from_config(config_or_name, quantization=None, dtype=None, device=None, seed=0)`` returns
the same native model ``fastft.from_pretrained`` would (``LlamaForCausalLM`` / ``BertForMaskedLM``,
in eval mode), with every weight drawn from a generator seeded by (``seed``, the tensor's name).
It exists for benchmarks and tests that need a model of a real shape (an 8B Llama) without its
16 GB checkpoint, and for comparisons across implementations: :func:`seeded_materialize` fills a
*transformers* model built on the meta device with exactly the same tensors, because native models
use transformers' parameter names.

``config_or_name``: a transformers config (llama, mistral, qwen2, bert, roberta), a dict with a
``model_type``, or a name from ``SHAPES`` ("llama-3.1-8b", "llama-3.2-1b", "llama-3.2-3b",
"smollm2-135m", "tiny-llama": the published configs' shapes, no weights).

The rule (``seeded_tensor``): 2-D weights (embeddings, linear layers, the LM head) ~ N(0, std) with
``std = config.initializer_range`` (transformers' own init, 0.02 for these models), 1-D norm
weights = 1, biases = 0. Each tensor comes from its own ``torch.Generator`` on the target device,
seeded by a hash of ``f"{seed}:{name}"``, so the values depend only on (seed, name, shape, device
type) -- not on construction order, the process, or which other tensors exist. The same name gives
the same values on every run on the same kind of device (CPU and CUDA generators differ).

Memory: the model is built on the meta device and materialised one tensor at a time; with
``quantization`` each linear layer inside the blocks is generated in ``dtype`` and quantized at once,
so an 8B NF4 model never holds more than one full-precision linear weight (as ``from_pretrained``).
"""
from __future__ import annotations

import copy
import hashlib
import re
from typing import Callable

import torch
from torch import nn

# Published configs' shapes (hub config.json of each model, read for the numbers only). Every key
# is a transformers config attribute; ``model_type`` picks the config class.
_LLAMA3_ROPE_8B = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
_LLAMA3_ROPE_32 = {**_LLAMA3_ROPE_8B, "factor": 32.0}
SHAPES: dict[str, dict] = {
    # meta-llama/Llama-3.1-8B
    "llama-3.1-8b": dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                         num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                         max_position_embeddings=131072, rms_norm_eps=1e-5, rope_scaling=_LLAMA3_ROPE_8B,
                         rope_theta=500000.0, tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128001),
    # meta-llama/Llama-3.2-3B
    "llama-3.2-3b": dict(model_type="llama", vocab_size=128256, hidden_size=3072, intermediate_size=8192,
                         num_hidden_layers=28, num_attention_heads=24, num_key_value_heads=8, head_dim=128,
                         max_position_embeddings=131072, rms_norm_eps=1e-5, rope_scaling=_LLAMA3_ROPE_32,
                         rope_theta=500000.0, tie_word_embeddings=True, bos_token_id=128000, eos_token_id=128001),
    # meta-llama/Llama-3.2-1B
    "llama-3.2-1b": dict(model_type="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                         num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                         max_position_embeddings=131072, rms_norm_eps=1e-5, rope_scaling=_LLAMA3_ROPE_32,
                         rope_theta=500000.0, tie_word_embeddings=True, bos_token_id=128000, eos_token_id=128001),
    # HuggingFaceTB/SmolLM2-135M
    "smollm2-135m": dict(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                         max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0,
                         tie_word_embeddings=True, bos_token_id=0, eos_token_id=0),
    # For tests and smoke runs: the Llama-3 structure (GQA, llama3 RoPE, untied head) at toy size.
    "tiny-llama": dict(model_type="llama", vocab_size=512, hidden_size=64, intermediate_size=160,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                       max_position_embeddings=16384, rms_norm_eps=1e-5, rope_scaling=_LLAMA3_ROPE_8B,
                       rope_theta=500000.0, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2),
}


def make_config(config_or_name):
    """A transformers config from a config object, a dict with ``model_type``, or a ``SHAPES`` name."""
    from .loader import ARCHITECTURES

    if isinstance(config_or_name, str):
        key = config_or_name.lower()
        if key not in SHAPES:
            raise ValueError(f"unknown model shape {config_or_name!r}; known shapes: {', '.join(SHAPES)} "
                             "(or pass a transformers config / a dict with model_type)")
        config_or_name = SHAPES[key]
    if isinstance(config_or_name, dict):
        raw = copy.deepcopy(config_or_name)
        mt = raw.pop("model_type", None)
        if mt not in ARCHITECTURES:
            raise ValueError(f"config model_type {mt!r} is not supported; supported: {', '.join(ARCHITECTURES)}")
        import transformers

        return getattr(transformers, ARCHITECTURES[mt][1])(**raw)
    mt = getattr(config_or_name, "model_type", None)
    if mt not in ARCHITECTURES:
        raise ValueError(f"config model_type {mt!r} is not supported; supported: {', '.join(ARCHITECTURES)}")
    return copy.deepcopy(config_or_name)


def name_seed(seed: int, name: str) -> int:
    """The generator seed of tensor ``name``: 63 bits of sha256(f"{seed}:{name}")."""
    digest = hashlib.sha256(f"{int(seed)}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def seeded_tensor(name: str, shape, *, seed: int = 0, std: float = 0.02, device=None,
                  dtype: torch.dtype = torch.float32, source_dtype: torch.dtype | None = None) -> torch.Tensor:
    """The tensor the seeding rule gives ``name`` (see the module docstring); drawn in fp32 on
    ``device``, rounded to ``source_dtype`` when given (the dtype a checkpoint would store it in: a
    bf16 checkpoint loaded in fp32), then cast to ``dtype``."""
    device = torch.device(device or "cpu")
    shape = tuple(int(s) for s in shape)
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "bias" or leaf == "beta":
        return torch.zeros(shape, device=device, dtype=dtype)
    if len(shape) == 1:  # norm weights (RMSNorm / LayerNorm gamma)
        return torch.ones(shape, device=device, dtype=dtype)
    g = torch.Generator(device=device)
    g.manual_seed(name_seed(seed, name))
    t = torch.empty(shape, device=device, dtype=torch.float32)
    t.normal_(0.0, std, generator=g)
    if source_dtype is not None:
        t = t.to(source_dtype)
    return t.to(dtype)


def lora_a_name(module_path: str) -> str:
    """The seeding name of a LoRA ``A`` matrix: the base layer's path from ``model.layers`` / ``layers``
    on (the part every wrapper -- fastft's, PEFT's -- keeps), plus ``.lora_A``."""
    m = re.search(r"((?:model\.)?layers\.\d+\..*)$", module_path)
    core = m.group(1) if m else module_path
    core = re.sub(r"\.base_layer$", "", core)
    if not core.startswith("model."):
        core = "model." + core
    return core + ".lora_A"


@torch.no_grad()
def seed_lora(model: nn.Module, *, seed: int = 0) -> int:
    """Overwrite every LoRA ``A`` matrix (fastft's ``LoraLinear`` or PEFT's ``lora.Linear``) with the
    seeding rule's tensor for its base layer's name, std 1/sqrt(in_features) (kaiming-uniform's
    spread); ``B`` is set to zero. Returns the number of layers seeded. After it, fastft and PEFT
    models built from the same seeded base have identical adapters, so their first-step gradients
    can be compared."""
    n = 0
    for path, mod in model.named_modules():
        a = getattr(mod, "lora_A", None)
        b = getattr(mod, "lora_B", None)
        if a is None or b is None:
            continue
        if isinstance(a, nn.ModuleDict):  # PEFT: one entry per adapter
            pairs = [(a[k], b[k]) for k in a.keys()]
        else:
            pairs = [(a, b)]
        for la, lb in pairs:
            wa = la.weight if isinstance(la, nn.Module) else la
            wb = lb.weight if isinstance(lb, nn.Module) else lb
            t = seeded_tensor(lora_a_name(path), wa.shape, seed=seed, std=wa.shape[1] ** -0.5, device=wa.device)
            wa.copy_(t.to(wa.dtype))
            wb.zero_()
            n += 1
    return n


def _std(config) -> float:
    return float(getattr(config, "initializer_range", None) or 0.02)


def _fix_meta_buffers(model: nn.Module, config, device) -> None:
    """Recompute buffers derived from the config (rotary frequencies) that are still on meta."""
    if hasattr(model, "init_buffers"):
        model.init_buffers(device)
    for path, mod in list(model.named_modules()):
        if not any(b is not None and b.device.type == "meta" for b in mod.buffers(recurse=False)):
            continue
        if type(mod).__name__.endswith("RotaryEmbedding"):  # transformers: rebuilt from its config
            parent_path, _, child = path.rpartition(".")
            parent = model.get_submodule(parent_path) if parent_path else model
            cfg = getattr(mod, "config", config)
            with torch.device("cpu"):  # the constructor's signature varies across versions; CPU, then move
                fresh = type(mod)(cfg)
            setattr(parent, child, fresh.to(device))
        else:
            for bname, b in list(mod.named_buffers(recurse=False)):
                if b is not None and b.device.type == "meta":
                    # position_ids-style buffers: arange over the last dimension
                    if "position" in bname and b.dim() >= 1:
                        val = torch.arange(b.shape[-1], device=device).expand(b.shape).clone()
                    else:
                        val = torch.zeros(b.shape, dtype=b.dtype, device=device)
                    mod._buffers[bname] = val.to(b.dtype)


@torch.no_grad()
def seeded_materialize(model: nn.Module, config, *, seed: int = 0, device=None, dtype: torch.dtype = torch.float32,
                       targets=(), replace_linear: Callable[[str, nn.Linear], nn.Module] | None = None,
                       source_dtype: torch.dtype | None = None) -> nn.Module:
    """Give every meta tensor of ``model`` (native or transformers, built under ``torch.device("meta")``)
    its seeded value on ``device`` in ``dtype``, one tensor at a time.

    ``targets``: module paths of linear layers handed, once their weight (and bias) exist, to
    ``replace_linear(path, linear) -> module`` (a quantizer: fastft's ``QuantLinear.from_linear``,
    bitsandbytes' ``Linear4bit``); the returned module takes the layer's place, so no more than one
    full-precision target weight is alive at a time. Tied parameters are materialised once (under
    the first name ``named_parameters`` gives them) and re-tied. ``source_dtype``: every seeded value
    rounded through it first (``seeded_tensor``).
    """
    device = torch.device(device or "cpu")
    std = _std(config)
    targets = set(targets)
    if targets and replace_linear is None:
        raise ValueError("seeded_materialize: targets given without replace_linear")
    done: dict[int, nn.Parameter] = {}
    tied: list[tuple[nn.Module, str, int]] = []
    # All parameters of a target layer first (bias before weight), then the layer is replaced.
    for path, mod in list(model.named_modules()):
        if path in targets:
            if not isinstance(mod, nn.Linear):
                raise TypeError(f"seeded_materialize: target {path} is a {type(mod).__name__}, not nn.Linear")
            lin = nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None, device="meta")
            lin.weight = nn.Parameter(seeded_tensor(f"{path}.weight", mod.weight.shape, seed=seed, std=std,
                                                    device=device, dtype=dtype, source_dtype=source_dtype), requires_grad=False)
            if mod.bias is not None:
                lin.bias = nn.Parameter(seeded_tensor(f"{path}.bias", mod.bias.shape, seed=seed, std=std,
                                                      device=device, dtype=dtype, source_dtype=source_dtype), requires_grad=False)
            parent_path, _, child = path.rpartition(".")
            parent = model.get_submodule(parent_path) if parent_path else model
            setattr(parent, child, replace_linear(path, lin))
            del lin
            continue
        if any(path == t or path.startswith(t + ".") for t in targets):
            continue
        for pname, p in list(mod.named_parameters(recurse=False)):
            if p is None or p.device.type != "meta":
                continue
            if id(p) in done:
                tied.append((mod, pname, id(p)))
                continue
            full = f"{path}.{pname}" if path else pname
            val = seeded_tensor(full, p.shape, seed=seed, std=std, device=device, dtype=dtype,
                                source_dtype=source_dtype)
            newp = nn.Parameter(val, requires_grad=p.requires_grad)
            done[id(p)] = newp
            mod._parameters[pname] = newp
    for mod, pname, pid in tied:
        mod._parameters[pname] = done[pid]
    _fix_meta_buffers(model, config, device)
    if hasattr(model, "tie_weights"):
        try:
            model.tie_weights()
        except TypeError:  # transformers' signature takes options; the defaults re-tie
            pass
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.device.type == "meta"]
    if left:
        raise RuntimeError(f"seeded_materialize left tensors on the meta device: {left[:10]}")
    return model


def from_config(config_or_name, *, quantization=None, dtype=None, device=None, seed: int = 0,
                double_quant: bool = True, blocksize: int = 64, group_size: int = 128, source_dtype=None):
    """A native fastft model of ``config_or_name``'s shape with seeded weights (module docstring).

    quantization: None, "nf4" (``blocksize``, ``double_quant``) or "int4" (``group_size``) for every
    linear layer inside the transformer blocks, as ``from_pretrained``. dtype: the weights' dtype
    (default fp32). device: where they live (default CPU). source_dtype: the checkpoint dtype the
    seeded values are rounded through first (e.g. torch.bfloat16 with dtype float32: a bf16
    checkpoint loaded in fp32, as Llama's are); default none. Returned in eval mode, like
    ``from_pretrained``; call ``.train()`` to train.
    """
    from .loader import ARCHITECTURES, QUANTIZATIONS, _quant_kwargs, model_class

    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {quantization!r}")
    if isinstance(dtype, str):
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ValueError(f"unknown dtype {dtype!r}")
        dtype = getattr(torch, dtype)
    dtype = dtype or torch.float32
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating dtype, got {dtype}")
    if isinstance(source_dtype, str):
        source_dtype = getattr(torch, source_dtype, source_dtype)
    if source_dtype is not None and not (isinstance(source_dtype, torch.dtype) and source_dtype.is_floating_point):
        raise ValueError(f"source_dtype must be a floating dtype, got {source_dtype!r}")
    device = torch.device(device) if device is not None else torch.device("cpu")
    config = make_config(config_or_name)
    cls = model_class(ARCHITECTURES[config.model_type][0])
    with torch.device("meta"):
        model = cls(config)
    targets = list(cls.quant_targets(config)) if quantization else []
    if quantization == "int4":
        for t in targets:
            inf = model.get_submodule(t).in_features
            if inf % group_size:
                raise ValueError(f"int4 quantization: {t} has in_features={inf}, not a multiple of "
                                 f"group_size={group_size}")
    replace = None
    if quantization:
        from fastft.nn import QuantLinear

        kw = _quant_kwargs(quantization, blocksize, double_quant, group_size)

        def replace(path, lin):
            return QuantLinear.from_linear(lin, quantization, **kw)

    seeded_materialize(model, config, seed=seed, device=device, dtype=dtype, targets=targets,
                       replace_linear=replace, source_dtype=source_dtype)
    model.eval()
    return model


__all__ = ["SHAPES", "from_config", "make_config", "name_seed", "seeded_tensor", "seeded_materialize", "seed_lora",
           "lora_a_name"]
