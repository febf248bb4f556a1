"""Cheap up-front checks of the paths a command is given, run before anything heavy loads.

Each check raises a ``fastft.errors`` user error that names the path and the problem, so a typo
in a path fails in milliseconds instead of after a model load. Used by the CLI and usable from the
API (``Trainer`` runs the output-directory check itself).
"""
from __future__ import annotations

import json
import os
import tempfile

from .errors import CheckpointError, InputNotFoundError, ModelError, OutputError

# The files a tokenizer directory can hold (any one of them lets AutoTokenizer load it).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.txt", "vocab.json", "spiece.model")
# Files a fastft run writes into its output directory: their presence marks another run's outputs.
RUN_MARKER = "fastft_run.json"
RUN_FILES = (RUN_MARKER, "metrics.jsonl", "adapter_model.safetensors", "adapter_config.json", "model.safetensors",
             "loss.png")


def _exists(path, what):
    if not os.path.lexists(path):
        raise InputNotFoundError(f"{path}: {what} does not exist")


def json_object(path, error, what: str) -> dict:
    """The JSON object in ``path``; an unreadable, malformed or non-object file raises ``error``
    naming the path and ``what`` it should have been."""
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise error(f"{path}: cannot parse {what} ({e})") from None
    if not isinstance(d, dict):
        raise error(f"{path}: {what} must be a JSON object")
    return d


def check_model_dir(path, *, tokenizer: bool = True, allow_pickle: bool = False) -> None:
    """A Hugging Face checkpoint directory: config.json naming a supported model type, weights, tokenizer."""
    path = os.fspath(path)
    _exists(path, "model directory")
    if not os.path.isdir(path):
        raise ModelError(f"{path}: is a file, expected a model directory (config.json + *.safetensors)")
    cfg = os.path.join(path, "config.json")
    if not os.path.isfile(cfg):
        raise ModelError(f"{path}: no config.json (expected a Hugging Face checkpoint directory)")
    raw = json_object(cfg, ModelError, "config")
    from .models.loader import ARCHITECTURES

    if raw.get("model_type") not in ARCHITECTURES:
        raise ModelError(f"{cfg}: model_type {raw.get('model_type')!r} is not supported; supported model types: "
                         f"{', '.join(ARCHITECTURES)}")
    names = os.listdir(path)
    if not any(n.endswith(".safetensors") or n == "model.safetensors.index.json" for n in names):
        if any(n.endswith(".bin") for n in names):
            if not allow_pickle:
                raise ModelError(f"{path}: holds only pickle (*.bin) weights; convert them to safetensors or pass "
                                 "--allow-pickle (loaded with weights_only=True)")
        else:
            raise ModelError(f"{path}: no weights (*.safetensors) in the model directory")
    if tokenizer:
        check_tokenizer_dir(path)


def check_tokenizer_dir(path) -> None:
    path = os.fspath(path)
    _exists(path, "tokenizer directory")
    if not os.path.isdir(path):
        raise ModelError(f"{path}: is a file, expected a tokenizer directory")
    if not any(os.path.isfile(os.path.join(path, f)) for f in TOKENIZER_FILES):
        raise ModelError(f"{path}: no tokenizer files (one of {', '.join(TOKENIZER_FILES)}); copy the base "
                         "model's tokenizer next to its config.json")


def check_adapter_dir(path) -> None:
    path = os.fspath(path)
    _exists(path, "adapter directory")
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: is a file, expected an adapter directory (adapter_config.json + "
                              "adapter_model.safetensors)")
    from .peft_io import read_adapter, read_adapter_config

    read_adapter_config(path)
    w = os.path.join(path, "adapter_model.safetensors")
    if not os.path.isfile(w):
        raise CheckpointError(f"{path}: no adapter_model.safetensors")
    read_adapter(path)  # the config fastft must be able to apply, the tensors read strictly (adapters are small)


def check_data_file(path, what: str = "data file", task=None) -> None:
    """Exists, is a file, parses (every line of a .jsonl is checked; no tokenization); ``task``
    (classify | ner | embed): in that task's JSONL format."""
    path = os.fspath(path)
    _exists(path, what)
    if os.path.isdir(path):
        from .errors import DataError

        raise DataError(f"{path}: is a directory, expected a {what} (.jsonl or .txt)")
    if task:
        from .tasks.data import read_task_records

        read_task_records(path, task)
        return
    from .train.data import read_records

    read_records(path)


def _probe_writable(path):
    """Create and remove a file in the nearest existing ancestor of ``path``."""
    probe = os.path.abspath(path)
    if os.path.isfile(probe):  # an output file that writing replaces: its directory must be writable
        probe = os.path.dirname(probe)
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        raise OutputError(f"{path}: cannot create it, {probe} is a file")
    try:
        fd, tmp = tempfile.mkstemp(prefix=".fastft-probe-", dir=probe)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise OutputError(f"{path}: output location is not writable ({e.strerror})") from None


def run_artifacts(output_dir) -> list[str]:
    """Names in output_dir that a fastft run wrote (marker, metrics, checkpoints, final model)."""
    if not os.path.isdir(output_dir):
        return []
    return sorted(n for n in os.listdir(output_dir) if n in RUN_FILES or n.startswith("checkpoint-"))


def check_output_dir(path, *, overwrite: bool = False, resume: bool = False) -> None:
    """Writable, a directory (or creatable), and not holding another run's outputs unless told."""
    path = os.fspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise OutputError(f"{path}: output_dir exists and is not a directory")
    _probe_writable(path)
    if not overwrite and not resume:
        found = run_artifacts(path)
        if found:
            raise OutputError(f"{path}: output_dir holds another run's outputs ({', '.join(found[:4])}); pass "
                              "--overwrite (overwrite_output_dir=True) to replace them or --resume "
                              "(resume_from_checkpoint=True) to continue that run")


def check_output_path(path, *, kind: str = "directory", empty: bool = False) -> None:
    """An output directory (or file) of merge / quantize / export: not the wrong kind, writable, and
    (``empty``) not holding anything that writing it would replace."""
    path = os.fspath(path)
    if kind == "directory" and os.path.exists(path) and not os.path.isdir(path):
        raise OutputError(f"{path}: exists and is not a directory")
    if empty and os.path.isdir(path) and os.listdir(path):
        raise OutputError(f"{path}: output directory exists and is not empty; choose a new one (nothing is "
                          "overwritten)")
    if kind == "file" and os.path.isdir(path):
        raise OutputError(f"{path}: is a directory, expected an output file")
    _probe_writable(path)
