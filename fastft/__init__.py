"""fastft: fast, memory-lean LoRA / QLoRA / full fine-tuning of Hugging Face language models.

The public names below are imported lazily so that ``import fastft`` stays cheap and never touches a
device. See DESIGN.md (shared) and README.md.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "from_pretrained": "fastft.models",
    "from_config": "fastft.models",
    "patch": "fastft.patching",
    "LoraConfig": "fastft.peft",
    "AdapterConfig": "fastft.peft",
    "get_peft_model": "fastft.peft",
    "load_adapter": "fastft.peft",
    "export": "fastft.exporting",
    "Trainer": "fastft.train",
    "TrainingArguments": "fastft.train",
    "ops": "fastft.ops",
    "quant": "fastft.quant",
    "nn": "fastft.nn",
    "data": "fastft.data",
}


def __getattr__(name):
    if name in _LAZY:
        mod = importlib.import_module(_LAZY[name])
        val = mod if mod.__name__ == f"fastft.{name}" else getattr(mod, name)
        globals()[name] = val
        return val
    raise AttributeError(f"module 'fastft' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))


__all__ = list(_LAZY)
