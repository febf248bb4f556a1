"""fastft modules: quantized linear, LoRA linear, bottleneck adapters (all call ``fastft.ops``)."""
import importlib

_LAZY = {
    "QuantLinear": "fastft.nn.quant_linear",
    "LoraLinear": "fastft.nn.lora",
    "BottleneckAdapter": "fastft.nn.adapter",
    "HostEmbedding": "fastft.nn.offload",
    "HostLinear": "fastft.nn.offload",
    "offload_frozen_to_host": "fastft.nn.offload",
    "restore_frozen_to_device": "fastft.nn.offload",
}


def __getattr__(name):
    if name in _LAZY:
        val = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = val
        return val
    raise AttributeError(f"module 'fastft.nn' has no attribute {name!r}")


__all__ = list(_LAZY)
