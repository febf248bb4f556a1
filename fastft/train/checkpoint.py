"""Resumable training checkpoints, written atomically.

A checkpoint directory ``output_dir/checkpoint-<step>/`` holds:
- ``trainable_params.safetensors``: every parameter with requires_grad, by name (the exact bits
  the resumed run restarts from; for a PEFT model the adapter is also written through its
  ``save_pretrained``, next to these files, so the checkpoint loads as a PEFT adapter);
- ``optimizer.safetensors`` + ``optimizer.json``: optimizer state tensors and its param groups;
- ``scheduler.json``: the LR scheduler's state;
- ``rng_state.safetensors`` + ``rng_state.json``: torch (CPU and CUDA), numpy and python RNGs;
- ``trainer_state.json``: global step (the data-order position: batches are a pure function of
  seed, epoch and step), loss history and the run's identity (dataset size, batch size, ...).

Distributed runs write the same files: under FSDP the sharded parameters and optimizer state are
gathered to full tensors first (``optimizer_state_full``; every rank joins, rank 0 writes), and
loading hands each rank its own shard of the full tensors (``distributed.load_full_into``), so a
checkpoint written by N ranks resumes on any other N.

No pickle anywhere: tensors go to safetensors, the rest to JSON, so loading runs no code.

Atomicity: everything is written into a hidden temporary directory next to the target, each file
fsynced, then the directory is renamed into place with ``os.replace`` and the parent fsynced. A
crash at any moment leaves either the complete checkpoint or none under its final name; stale
temporary directories are removed by the next run (``remove_stale_tmp``).
"""
from __future__ import annotations

from ..errors import CheckpointError
from ..fsutil import user_mode

import json
import os
import random
import re
import shutil
from typing import Optional

import numpy as np
import torch
from safetensors.torch import save_file

PREFIX = "checkpoint-"
TMP_PREFIX = ".tmp-fastft-"
TRAINER_STATE = "trainer_state.json"
_CKPT_RE = re.compile(r"^checkpoint-(\d+)$")


# --- atomic directory writes ------------------------------------------------------------------
def _fsync_dir(path):
    # Directory fsync makes the rename durable; not available on every OS/filesystem (Windows).
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(path):
    for root, _dirs, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(root)


def atomic_save_dir(final_dir: str, write_fn) -> str:
    """Call ``write_fn(tmp_dir)`` then move tmp_dir to ``final_dir`` atomically; returns final_dir."""
    final_dir = os.path.abspath(final_dir)
    parent = os.path.dirname(final_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f"{TMP_PREFIX}{os.path.basename(final_dir)}-{os.getpid()}")
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    os.makedirs(tmp)
    try:
        write_fn(tmp)
        user_mode(tmp)  # safetensors and mkstemp create 0600 files
        _fsync_tree(tmp)
        if os.path.exists(final_dir):
            # os.replace cannot overwrite a non-empty directory: move the old one aside first. A
            # crash in between leaves the (complete) new checkpoint in tmp and the old one aside,
            # never a partial directory under the final name.
            old = tmp + ".old"
            os.replace(final_dir, old)
            os.replace(tmp, final_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final_dir)
        _fsync_dir(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final_dir


def remove_stale_tmp(output_dir: str):
    if not os.path.isdir(output_dir):
        return
    for name in os.listdir(output_dir):
        if name.startswith(TMP_PREFIX):
            shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)


def _write_json(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)


def _read_json(path):
    """A JSON file of a checkpoint; a missing or corrupt one is a CheckpointError naming it."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: missing from the checkpoint (incomplete or not a fastft checkpoint)")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt checkpoint file ({e})") from None


def _load_tensors(path):
    """A safetensors file of a checkpoint, read with the strict reader (header, offsets, dtypes checked)."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: missing from the checkpoint (incomplete or not a fastft checkpoint)")
    from ..models.safetensors_io import SafetensorsFile

    f = SafetensorsFile(path)  # raises CheckpointError naming the file on any inconsistency
    try:
        return {name: f.read(name) for name in f.tensors}
    finally:
        f.close()


# --- listing ------------------------------------------------------------------------------------
def list_checkpoints(output_dir: str) -> list[tuple[int, str]]:
    """(step, path) of complete checkpoints in output_dir, oldest first."""
    if not os.path.isdir(output_dir):
        return []
    out = []
    for name in os.listdir(output_dir):
        m = _CKPT_RE.match(name)
        path = os.path.join(output_dir, name)
        if m and os.path.isfile(os.path.join(path, TRAINER_STATE)):
            out.append((int(m.group(1)), path))
    return sorted(out)


def latest_checkpoint(output_dir: str) -> Optional[str]:
    cks = list_checkpoints(output_dir)
    return cks[-1][1] if cks else None


def rotate_checkpoints(output_dir: str, limit: Optional[int]):
    if not limit:
        return
    cks = list_checkpoints(output_dir)
    for _step, path in cks[: max(0, len(cks) - limit)]:
        shutil.rmtree(path, ignore_errors=True)


# --- state pieces -------------------------------------------------------------------------------
def trainable_state(model) -> dict:
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def optimizer_state_full(optimizer, to_full) -> dict:
    """``optimizer.state_dict()`` with every state tensor passed through ``to_full`` (FSDP: the
    all-gather of a sharded DTensor, a collective every rank must join) and moved to the CPU."""
    sd = optimizer.state_dict()
    state = {idx: {k: (to_full(v).detach().cpu() if isinstance(v, torch.Tensor) else v) for k, v in st.items()}
             for idx, st in sd["state"].items()}
    return {"state": state, "param_groups": sd["param_groups"]}


def save_optimizer(optimizer, ckpt_dir, sd=None):
    sd = optimizer.state_dict() if sd is None else sd
    tensors, extra = {}, {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{idx}.{k}"] = v.detach().cpu().contiguous()
            else:
                extra.setdefault(str(idx), {})[k] = v
    save_file(tensors, os.path.join(ckpt_dir, "optimizer.safetensors"))
    _write_json(os.path.join(ckpt_dir, "optimizer.json"), {"param_groups": sd["param_groups"], "extra_state": extra})


def load_optimizer(optimizer, ckpt_dir):
    meta = _read_json(os.path.join(ckpt_dir, "optimizer.json"))
    state: dict = {}
    for key, t in _load_tensors(os.path.join(ckpt_dir, "optimizer.safetensors")).items():
        if "." not in key or not key.split(".", 1)[0].isdigit():
            raise CheckpointError(f"{ckpt_dir}/optimizer.safetensors: unexpected tensor {key!r}")
        idx, k = key.split(".", 1)
        state.setdefault(int(idx), {})[k] = t
    for idx, st in meta["extra_state"].items():
        state.setdefault(int(idx), {}).update(st)
    groups = meta["param_groups"]
    for g in groups:
        # JSON turns tuples into lists; restore them so the optimizer's hyperparameters are equal.
        for k, v in g.items():
            if isinstance(v, list) and k != "params":
                g[k] = tuple(v)
    # Sharded (FSDP) parameters take their shard of each full, parameter-shaped state tensor.
    from .distributed import like_param

    params = [p for g in optimizer.param_groups for p in g["params"]]
    for idx, st in state.items():
        if idx < len(params):
            for k, v in st.items():
                if isinstance(v, torch.Tensor) and tuple(v.shape) == tuple(params[idx].shape) and v.dim() > 0:
                    st[k] = like_param(v, params[idx])
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def rng_state() -> tuple[dict, dict]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["numpy"] = torch.from_numpy(np.asarray(keys, dtype=np.uint32).astype(np.int64))
    version, internal, gauss_next = random.getstate()
    meta = {"numpy": [kind, int(pos), int(has_gauss), float(cached)],
            "python": [version, list(internal), gauss_next]}
    return tensors, meta


def set_rng_state(tensors: dict, meta: dict):
    torch.set_rng_state(tensors["torch"])
    cuda = sorted((int(k.split(".")[1]), v) for k, v in tensors.items() if k.startswith("cuda."))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([v for _, v in cuda][: torch.cuda.device_count()])
    kind, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, tensors["numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss_next = meta["python"]
    random.setstate((version, tuple(internal), gauss_next))


def _is_peft(model) -> bool:
    return hasattr(model, "peft_config") or type(model).__name__ == "FastPeftModel"


def save_checkpoint(ckpt_dir: str, *, model, optimizer, scheduler, trainer_state: dict, collator=None,
                    params=None, optimizer_state=None, adapter_tensors=None) -> str:
    """Write a complete checkpoint atomically to ``ckpt_dir``. ``params`` / ``optimizer_state`` /
    ``adapter_tensors``: full tensors gathered beforehand (FSDP), instead of reading the model's."""

    def write(tmp):
        save_file(trainable_state(model) if params is None else params,
                  os.path.join(tmp, "trainable_params.safetensors"))
        if adapter_tensors is not None:
            from fastft.peft_io import save_adapter

            save_adapter(model, tmp, tensors=adapter_tensors)
        elif _is_peft(model) and hasattr(model, "save_pretrained"):
            # At the top level, as transformers.Trainer does, so PeftModel.from_pretrained(base,
            # "checkpoint-<step>") and fastft.load_adapter work on a checkpoint directly.
            model.save_pretrained(tmp)
        if optimizer_state is None:
            save_optimizer(optimizer, tmp)
        else:
            save_optimizer(optimizer, tmp, optimizer_state)
        _write_json(os.path.join(tmp, "scheduler.json"), scheduler.state_dict())
        tensors, meta = rng_state()
        if collator is not None and hasattr(collator, "state_dict"):
            for k, v in collator.state_dict().items():
                tensors[f"collator.{k}"] = v
        save_file(tensors, os.path.join(tmp, "rng_state.safetensors"))
        _write_json(os.path.join(tmp, "rng_state.json"), meta)
        # Written last: list_checkpoints only recognizes directories that have it.
        _write_json(os.path.join(tmp, TRAINER_STATE), trainer_state)

    return atomic_save_dir(ckpt_dir, write)


def read_trainer_state(ckpt_dir: str) -> dict:
    path = os.path.join(ckpt_dir, TRAINER_STATE)
    if not os.path.isfile(path):
        raise CheckpointError(f"{ckpt_dir}: not a fastft checkpoint (no {TRAINER_STATE})")
    return _read_json(path)


def load_checkpoint(ckpt_dir: str, *, model, optimizer, scheduler, collator=None) -> dict:
    """Restore model trainables, optimizer, scheduler, RNGs (and collator RNG); returns trainer_state."""
    state = read_trainer_state(ckpt_dir)
    saved = _load_tensors(os.path.join(ckpt_dir, "trainable_params.safetensors"))
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(saved) != set(params):
        missing, unexpected = sorted(set(params) - set(saved)), sorted(set(saved) - set(params))
        raise CheckpointError(f"{ckpt_dir}: trainable parameters differ from the model's "
                         f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    from .distributed import load_full_into

    with torch.no_grad():
        for n, p in params.items():
            if saved[n].shape != p.shape:
                raise CheckpointError(f"{ckpt_dir}: {n} has shape {tuple(saved[n].shape)}, model has {tuple(p.shape)}")
            load_full_into(p, saved[n])
    load_optimizer(optimizer, ckpt_dir)
    scheduler.load_state_dict(_read_json(os.path.join(ckpt_dir, "scheduler.json")))
    tensors = _load_tensors(os.path.join(ckpt_dir, "rng_state.safetensors"))
    set_rng_state(tensors, _read_json(os.path.join(ckpt_dir, "rng_state.json")))
    if collator is not None and hasattr(collator, "load_state_dict"):
        coll = {k[len("collator."):]: v for k, v in tensors.items() if k.startswith("collator.")}
        if coll:
            collator.load_state_dict(coll)
    return state
