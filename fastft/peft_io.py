"""Adapter files: PEFT-format LoRA and fastft's bottleneck-adapter format, read and written.

**LoRA (PEFT's format, read and written).** A directory with
- ``adapter_config.json``: ``peft_type`` "LORA", ``task_type``, ``r``, ``lora_alpha``,
  ``lora_dropout``, ``target_modules`` (list or full-match regex; "all-linear" is saved expanded to
  the module paths, as PEFT does), ``bias``, ``use_rslora``, ``modules_to_save``,
  ``init_lora_weights``, ``base_model_name_or_path``, ``fan_in_fan_out`` false, ``inference_mode``;
- ``adapter_model.safetensors`` with PEFT's keys (peft/utils/save_and_load.py
  ``get_peft_model_state_dict``, adapter name removed):
  ``base_model.model.<path>.lora_A.weight`` (r, in) and ``.lora_B.weight`` (out, r);
  bias="all": every ``*.bias`` parameter under its model path (a targeted layer's bias is
  ``<path>.base_layer.bias``), bias="lora_only": the targeted layers' ``<path>.base_layer.bias``;
  ``modules_to_save``: the trained copy's state dict under the module's own path
  (``base_model.model.lm_head.weight``).
PEFT loads keys without the ``base_model.model.`` prefix into nothing and only warns; fastft
refuses any key it cannot place and any adapter weight left unloaded.

Configs are parsed by ``fastft.peft_config``; applying an adapter to a model (``load_adapter``)
and merging live in ``fastft.peft``. This module is pure IO over state dicts and JSON.

**Bottleneck adapters (fastft's format).** The same two file names; ``adapter_config.json`` has
``peft_type`` "BOTTLENECK", ``format_version`` 1, the ``AdapterConfig`` fields (``target_modules``
holds the site regexes actually used) and ``adapter_modules`` (the adapted module paths); the
safetensors keys are ``base_model.model.<path>.adapter.{down,up}.{weight,bias}`` plus
``modules_to_save`` entries as for LoRA. PEFT cannot load these.

Writes are atomic: a new directory is assembled under a temporary name beside it and renamed into
place; into an existing directory each file is written to a temporary name and replaced. A failed
save leaves no partial directory or file. Only safetensors is read or written (no pickle).
"""
from __future__ import annotations

from .fsutil import user_mode
from .errors import ArgumentTypeError, CheckpointError, InputNotFoundError, OutputNotADirectoryError

import json
import os
import shutil
import tempfile
from typing import Callable

import torch

from fastft.peft_config import (ADAPTER_SITES, CONFIG_NAME, PREFIX, WEIGHTS_NAME, LoraConfig,
                                adapter_config_from_dict, lora_config_from_dict, model_type)

# ----------------------------------------------------------------------------------------------
# Configs


def base_quantization(model) -> str | None:
    """"nf4" / "int4" when the model's linear layers hold quantized weights, else None."""
    for m in model.modules():
        kind = type(getattr(m, "weight", None)).__name__
        if kind in ("NF4Weight", "Int4Weight"):
            return kind[:-len("Weight")].lower()
    return None


def config_to_json(peft_model) -> dict:
    cfg = peft_model.adapter_config
    if isinstance(cfg, LoraConfig):
        return {
            "peft_type": "LORA", "task_type": cfg.task_type, "r": cfg.r, "lora_alpha": cfg.lora_alpha,
            "lora_dropout": cfg.lora_dropout, "target_modules": cfg.target_modules, "bias": cfg.bias,
            "use_rslora": cfg.use_rslora, "modules_to_save": cfg.modules_to_save,
            "init_lora_weights": cfg.init_lora_weights, "base_model_name_or_path": cfg.base_model_name_or_path,
            "fan_in_fan_out": False, "inference_mode": True,
        }
    table = cfg.target_modules or ADAPTER_SITES[model_type(peft_model.base_model.model)]
    return {
        "peft_type": "BOTTLENECK", "format_version": 1, "task_type": cfg.task_type,
        "bottleneck_size": cfg.bottleneck_size, "placement": cfg.placement, "non_linearity": cfg.non_linearity,
        "scaling": cfg.scaling, "dropout": cfg.dropout, "target_modules": {s: table[s] for s in cfg.sites},
        "modules_to_save": cfg.modules_to_save, "base_model_name_or_path": cfg.base_model_name_or_path,
        "adapter_modules": sorted(peft_model.adapter_layers()),
    }

def read_adapter_config(directory) -> dict:
    path = os.path.join(os.fspath(directory), CONFIG_NAME)
    if not os.path.isfile(path):
        raise InputNotFoundError(f"no {CONFIG_NAME} in {os.fspath(directory)!r}")
    with open(path, encoding="utf-8") as f:
        try:
            d = json.load(f)
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(d, dict):
        raise CheckpointError(f"{path} must hold a JSON object")
    return d


# ----------------------------------------------------------------------------------------------
# State dicts


def adapter_state_dict(peft_model) -> dict[str, torch.Tensor]:
    """The tensors PEFT would save for this adapter, keyed as PEFT keys them."""
    cfg = peft_model.adapter_config
    model = peft_model.base_model.model
    out: dict[str, torch.Tensor] = {}
    for path, layer in peft_model.lora_layers().items():
        out[f"{path}.lora_A.weight"] = layer.lora_A.weight
        out[f"{path}.lora_B.weight"] = layer.lora_B.weight
        if cfg.bias == "lora_only" and layer.base_layer.bias is not None:
            out[f"{path}.base_layer.bias"] = layer.base_layer.bias
    if isinstance(cfg, LoraConfig) and cfg.bias == "all":
        # PEFT filters the model state_dict, which lists tied parameters under every name.
        for n, p in model.named_parameters(remove_duplicate=False):
            if n == "bias" or n.endswith(".bias"):
                out[n] = p
    for path, wrapped in peft_model.adapter_layers().items():
        for k, v in wrapped.adapter.state_dict(keep_vars=True).items():
            out[f"{path}.adapter.{k}"] = v
    for path, wrapper in peft_model.modules_to_save_wrappers().items():
        for k, v in wrapper.modules_to_save.state_dict(keep_vars=True).items():
            out[f"{path}.{k}"] = v
    return {PREFIX + k: v for k, v in out.items()}


def _for_safetensors(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses tensors that share storage (tied weights, bias="all" duplicates): copy those.
    seen, res = set(), {}
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor):
            raise ArgumentTypeError(f"adapter tensor {k!r} is a {type(v).__name__}, not a tensor")
        t = v.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen:
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        res[k] = t
    return res


def load_state_dict_into(peft_model, sd: dict[str, torch.Tensor], source: str) -> None:
    """Copy PEFT-keyed tensors into the adapted model, strictly: every key placed, every adapter weight set."""
    model = peft_model.base_model.model
    params = dict(model.named_parameters(remove_duplicate=False))
    params.update(dict(model.named_buffers(remove_duplicate=False)))
    wrappers = sorted(peft_model.modules_to_save_wrappers(), key=len, reverse=True)
    bad_prefix = [k for k in sd if not k.startswith(PREFIX)]
    if bad_prefix:
        raise CheckpointError(f"{source}: keys without the '{PREFIX}' prefix PEFT writes: {bad_prefix[:5]}")
    plan, unexpected, mismatched = [], [], []
    for key, tensor in sd.items():
        k = key[len(PREFIX):]
        target = None
        for w in wrappers:  # a modules_to_save module's tensors are saved under its own path
            if k.startswith(w + ".") and not k.startswith((w + ".modules_to_save.", w + ".original_module.")):
                target = f"{w}.modules_to_save.{k[len(w) + 1:]}"
                break
        target = target or k
        if target not in params:
            unexpected.append(key)
        elif tuple(params[target].shape) != tuple(tensor.shape):
            mismatched.append(f"{key}: file {tuple(tensor.shape)} vs model {tuple(params[target].shape)}")
        else:
            plan.append((target, tensor))
    if unexpected or mismatched:
        raise CheckpointError(f"{source}: adapter does not fit the model: unexpected keys {unexpected[:8]}"
                         f"{' ...' if len(unexpected) > 8 else ''}; shape mismatches {mismatched[:8]}")
    required = set()
    for path, layer in peft_model.lora_layers().items():
        required |= {f"{path}.lora_A.weight", f"{path}.lora_B.weight"}
    for path, wrapped in peft_model.adapter_layers().items():
        required |= {f"{path}.adapter.{k}" for k in wrapped.adapter.state_dict()}
    for path, w in peft_model.modules_to_save_wrappers().items():
        required |= {f"{path}.modules_to_save.{k}" for k, _ in w.modules_to_save.named_parameters()}
    missing = sorted(required - {t for t, _ in plan})
    if missing:
        raise CheckpointError(f"{source}: adapter weights missing from the file: {missing[:8]}"
                         f"{' ...' if len(missing) > 8 else ''}")
    with torch.no_grad():
        for target, tensor in plan:
            params[target].copy_(tensor)


# ----------------------------------------------------------------------------------------------
# Save / load


def _atomic_write(save_directory, writers: dict[str, Callable[[str], None]]) -> None:
    target = os.path.abspath(os.fspath(save_directory))
    if os.path.exists(target) and not os.path.isdir(target):
        raise OutputNotADirectoryError(f"cannot save adapter: {target!r} exists and is not a directory")
    if os.path.isdir(target):
        tmps = []
        try:
            for name, write in writers.items():
                fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=target)
                os.close(fd)
                tmps.append((tmp, name))
                write(tmp)
                user_mode(tmp)
            for tmp, name in tmps:
                os.replace(tmp, os.path.join(target, name))
        finally:
            for tmp, _ in tmps:
                if os.path.exists(tmp):
                    os.remove(tmp)
        return
    parent = os.path.dirname(target)
    created_top, p = None, parent
    while not os.path.exists(p):
        created_top, p = p, os.path.dirname(p)
    os.makedirs(parent, exist_ok=True)
    tmpdir = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.tmp-", dir=parent)
    try:
        for name, write in writers.items():
            write(os.path.join(tmpdir, name))
        user_mode(tmpdir)
        os.rename(tmpdir, target)
    except BaseException:
        shutil.rmtree(tmpdir, ignore_errors=True)
        if created_top is not None:
            shutil.rmtree(created_top, ignore_errors=True)
        raise


def save_adapter(peft_model, save_directory, tensors=None) -> None:
    """Write the adapter of ``peft_model`` (a FastPeftModel) to ``save_directory`` (see module doc).

    ``tensors``: the adapter's tensors, keyed as ``adapter_state_dict`` keys them, to write instead
    of reading the model's (a sharded FSDP model's, gathered to full tensors beforehand)."""
    from .models.safetensors_io import safetensors_bytes

    # Everything that can fail on bad input happens before the first file-system change.
    tensors = _for_safetensors(adapter_state_dict(peft_model) if tensors is None else tensors)
    text = json.dumps(config_to_json(peft_model), indent=2, sort_keys=True)

    def write_config(path):
        with open(path, "w", encoding="utf-8") as f:
            f.write(text + "\n")

    # The base's quantization goes into the safetensors metadata (PEFT ignores it there; an unknown
    # adapter_config.json key would make PEFT warn): load_adapter warns when applied to another base.
    meta = {"format": "pt", "fastft_base_quantization": base_quantization(peft_model.base_model.model) or "none"}

    def write_weights(path):
        with open(path, "wb") as f:
            f.write(safetensors_bytes(tensors, meta))  # byte-identical for the same adapter

    _atomic_write(save_directory, {WEIGHTS_NAME: write_weights, CONFIG_NAME: write_config})


def read_adapter(adapter_dir) -> tuple[object, dict, dict[str, torch.Tensor]]:
    """(config, raw adapter_config.json dict, state dict) of the adapter in ``adapter_dir``.

    Everything is read and checked before the caller touches a model: a missing or corrupt file
    raises naming its path.
    """
    from fastft.models.safetensors_io import SafetensorsFile

    adapter_dir = os.fspath(adapter_dir)
    d = read_adapter_config(adapter_dir)
    weights = os.path.join(adapter_dir, WEIGHTS_NAME)
    if not os.path.isfile(weights):
        other = [f for f in ("adapter_model.bin",) if os.path.exists(os.path.join(adapter_dir, f))]
        hint = f" (found {other[0]}: fastft reads safetensors only)" if other else ""
        raise InputNotFoundError(f"no {WEIGHTS_NAME} in {adapter_dir!r}{hint}")
    source = os.path.join(adapter_dir, CONFIG_NAME)
    peft_type = d.get("peft_type")
    try:
        if peft_type == "LORA":
            config = lora_config_from_dict(d, source)
            # The file overwrites the initial values, so the init scheme recorded in the config is moot.
            config.init_lora_weights = True
        elif peft_type == "BOTTLENECK":
            config = adapter_config_from_dict(d, source)
        else:
            raise CheckpointError(f"{source}: peft_type {peft_type!r} is not supported (LORA or BOTTLENECK)")
    except ValueError as e:  # a config fastft cannot apply is a bad input, named by its file
        if isinstance(e, CheckpointError):
            raise
        msg = str(e) if str(e).startswith(source) else f"{source}: {e}"
        raise CheckpointError(msg) from e
    # The strict reader (header, dtypes, byte ranges tiling the file): a lying header is refused.
    f = SafetensorsFile(weights)
    try:
        q = f.metadata.get("fastft_base_quantization") if isinstance(f.metadata, dict) else None
        if q is not None:
            d = {**d, "fastft_base_quantization": None if q == "none" else q}
        return config, d, {name: f.read(name) for name in f.tensors}
    finally:
        f.close()


__all__ = ["save_adapter", "read_adapter", "load_state_dict_into", "read_adapter_config", "adapter_state_dict", "config_to_json",
           "CONFIG_NAME", "WEIGHTS_NAME"]
