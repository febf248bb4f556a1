"""Native fastft models and their checkpoint loader.

``from_config(config_or_name, ...)`` builds one without a checkpoint, weights seeded by tensor name
(``synthetic.py``; named shapes in ``SHAPES``). ``from_pretrained(path, ...)`` loads a Hugging Face
checkpoint directory (llama, mistral, qwen2 ->
``LlamaForCausalLM``; bert, roberta -> ``BertForMaskedLM``) -- see ``loader.py``. ``convert`` turns
GGUF files into such directories and locates the bundled real checkpoints used by the tests
(``smollm2_path()``, ``minilm_path()``).
"""
from .bert import BertForMaskedLM
from .llama import LlamaForCausalLM
from .loader import ARCHITECTURES, from_pretrained, save_quantized
from .synthetic import SHAPES, from_config
from .safetensors_io import CheckpointError

__all__ = ["from_pretrained", "from_config", "SHAPES", "save_quantized", "ARCHITECTURES", "CheckpointError", "LlamaForCausalLM", "BertForMaskedLM"]
