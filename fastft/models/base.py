"""What every native fastft model shares: the checkpoint name table, saving, device/dtype, checkpointing.

A native model's parameter paths are transformers' own (so PEFT adapter keys and saved checkpoints
match), and each model class declares the explicit table of tensor names it consumes
(:meth:`NativeModel.weight_table`), which the loader (``loader.py``) and ``save_pretrained`` both
use: loading is strict against it, saving writes exactly it.
"""
from __future__ import annotations

from ..fsutil import user_mode

import json
import os
import tempfile
import warnings

import torch
from torch import nn


def attention_inputs(q, k, v):
    """q, k, v in one dtype for ``fastft.ops.attention``: the autocast dtype when autocast is on
    (projections then mix fp32 LoRA / RoPE outputs with bf16 matmul outputs), else q's."""
    dev = q.device.type
    dt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else q.dtype
    return q.to(dt), k.to(dt), v.to(dt)


def _drop_tied_aliases(module, state_dict, prefix, local_metadata):
    for alias, src in module.tied_aliases().items():
        a, b = state_dict.get(prefix + alias), state_dict.get(prefix + src)
        if a is not None and b is not None and a.data_ptr() == b.data_ptr():
            del state_dict[prefix + alias]


def _allow_missing_tied_aliases(module, incompatible):
    # Keys carry the prefix of wherever the model sits (e.g. inside a PEFT wrapper): match the tail.
    aliases = tuple(module.tied_aliases())
    for k in list(incompatible.missing_keys):
        if any(k == a or k.endswith("." + a) for a in aliases):
            incompatible.missing_keys.remove(k)


class NativeModel(nn.Module):
    """Base of the native models (``LlamaForCausalLM``, ``BertForMaskedLM``)."""

    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    #: prefix of the bare base model's keys ("model.", "bert.", "roberta."); checkpoints of the base
    #: model alone (e.g. a sentence-transformers BertModel) store their keys without it.
    base_prefix = ""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.model_type = config.model_type
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        self.gradient_checkpointing = False
        self._gc_kwargs = {"use_reentrant": False}
        # Tied aliases (lm_head.weight = embed_tokens.weight, ...) stay out of state_dict, as in HF
        # checkpoints: safetensors refuses tensors that share memory (transformers.Trainer saves
        # a non-PreTrainedModel's state_dict with it), and load_state_dict does not miss them.
        self.register_state_dict_post_hook(_drop_tied_aliases)
        self.register_load_state_dict_post_hook(_allow_missing_tied_aliases)

    # --- checkpoint table -------------------------------------------------------------------------
    @classmethod
    def key_prefix(cls, config) -> str:
        return cls.base_prefix

    @classmethod
    def weight_table(cls, config) -> list[str]:
        """Names of the tensors a checkpoint provides (and ``save_pretrained`` writes), in order."""
        raise NotImplementedError

    @classmethod
    def checkpoint_aliases(cls, name: str) -> tuple[str, ...]:
        """Older spellings of a table name that checkpoints in the wild use (e.g. LayerNorm.gamma)."""
        return ()

    @classmethod
    def ignored_checkpoint_keys(cls, config) -> tuple[str, ...]:
        """Regexes of checkpoint tensors known to be derived or unused (inv_freq buffers, poolers)."""
        return ()

    @classmethod
    def optional_groups(cls, config) -> dict[str, list[str]]:
        """Named all-or-nothing groups of table names a checkpoint may lack (initialised instead)."""
        return {}

    @classmethod
    def quant_targets(cls, config) -> list[str]:
        """Module paths of the linear layers quantized when loading with ``quantization=``."""
        raise NotImplementedError

    def tied_aliases(self) -> dict[str, str]:
        """{alias name: source name} of parameters that are the same tensor as another one."""
        return {}

    def init_missing(self, group: str, device, dtype):
        raise NotImplementedError

    def init_buffers(self, device):
        """Materialise buffers derived from the config (rotary frequencies) after loading."""

    def tie_weights(self):
        """Point tied parameters at their source (after loading, or after swapping embeddings)."""

    # --- conveniences the ecosystem expects -------------------------------------------------------
    @property
    def device(self) -> torch.device:
        emb = self.get_input_embeddings()  # (a host-resident embedding: where its rows go; fastft.nn.offload)
        return getattr(emb, "compute_device", None) or emb.weight.device

    @property
    def dtype(self) -> torch.dtype:
        emb = self.get_input_embeddings()  # (a host-resident one stored narrower: the dtype of its rows)
        return getattr(emb, "compute_dtype", None) or emb.weight.dtype

    def get_input_embeddings(self) -> nn.Embedding:
        raise NotImplementedError

    def get_output_embeddings(self) -> nn.Module:
        raise NotImplementedError

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs=None, every_n_layers: int = 1,
                                        offload=False):
        """Recompute block activations in backward (``torch.utils.checkpoint``, non-reentrant).

        Same signature as transformers' (which ``transformers.Trainer`` calls): every
        ``every_n_layers``-th block is checkpointed; ``offload`` (True, or a
        ``fastft.nn.checkpointing.ActivationOffloader``) keeps the saved block inputs in pinned host
        memory, copied on a side stream without blocking the host (``fastft/nn/checkpointing.py``).
        """
        from fastft.nn.checkpointing import ActivationOffloader

        if every_n_layers < 1:
            raise ValueError(f"every_n_layers must be >= 1, got {every_n_layers}")
        kw = {"use_reentrant": False, **(activation_checkpointing_kwargs or {})}
        if offload and kw["use_reentrant"]:
            raise ValueError("activation offload needs use_reentrant=False")
        self.gradient_checkpointing = True
        self._gc_kwargs = kw
        self._gc_every = every_n_layers
        if isinstance(offload, ActivationOffloader):
            self._gc_offloader = offload
        else:
            self._gc_offloader = ActivationOffloader() if offload else None

    def tiled_mlp_enable(self, tile_tokens: int | None = 8192):
        """Run each MLP in tiles of ``tile_tokens`` tokens in training (``fastft.nn.checkpointing.
        tiled_rows``): its (tokens x intermediate) activations never exist whole, for one more MLP
        forward per step; for long sequences. ``None`` or 0 turns it off. Returns the number of MLPs."""
        if tile_tokens is not None and (isinstance(tile_tokens, bool) or int(tile_tokens) < 0):
            raise ValueError(f"tiled MLP: tile_tokens must be a positive number of tokens or None, got {tile_tokens!r}")
        mlps = [m for m in self.modules() if hasattr(type(m), "tile_tokens")]
        if not mlps:
            raise ValueError(f"{type(self).__name__}: no tiled MLP support in this architecture")
        for m in mlps:
            m.tile_tokens = int(tile_tokens) if tile_tokens else None
        return len(mlps)

    @property
    def activation_offloader(self):
        """The ``ActivationOffloader`` of checkpointed blocks (None without offload)."""
        return getattr(self, "_gc_offloader", None) if self.gradient_checkpointing else None

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None, **kwargs):
        """Alias of :meth:`activation_checkpointing_enable` (the older transformers name)."""
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs, **kwargs)

    def activation_checkpointing_disable(self):
        self.gradient_checkpointing = False

    gradient_checkpointing_disable = activation_checkpointing_disable

    @property
    def is_gradient_checkpointing(self) -> bool:
        return self.gradient_checkpointing

    def _run_block(self, index, block, *args):
        if (self.gradient_checkpointing and self.training and torch.is_grad_enabled()
                and index % getattr(self, "_gc_every", 1) == 0):
            from fastft.nn.checkpointing import checkpoint_block

            off = getattr(self, "_gc_offloader", None)
            if off is not None and index == 0:
                off.new_pass()
            return checkpoint_block(block, *args, offload=off, **self._gc_kwargs)
        return block(*args)

    def num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        """Parameter count (tied parameters once), as transformers' ``num_parameters``; quantized
        weights count their logical elements."""
        skip = set()
        if exclude_embeddings:
            skip = {id(m.weight) for m in self.modules() if isinstance(m, nn.Embedding)}
        seen, n = set(), 0
        for p in self.parameters():
            if id(p) in seen or id(p) in skip or (only_trainable and not p.requires_grad):
                continue
            seen.add(id(p))
            n += p.numel()
        if not only_trainable:
            for m in self.modules():
                w = getattr(m, "weight", None)
                if w is not None and not isinstance(w, torch.Tensor) and hasattr(w, "shape"):
                    n += int(w.shape[0]) * int(w.shape[1])
        return n

    def enable_input_require_grads(self):
        """For reentrant checkpointing with a frozen embedding (transformers' API)."""
        def hook(module, inputs, output):
            output.requires_grad_(True)

        self._input_grad_hook = self.get_input_embeddings().register_forward_hook(hook)

    # --- saving -----------------------------------------------------------------------------------
    def _tensor_for_save(self, name: str) -> torch.Tensor:
        mod_path, _, attr = name.rpartition(".")
        module = self.get_submodule(mod_path)
        if type(module).__name__ == "QuantLinear" and attr == "weight":
            # A quantized base saves as its dequantized weight: the file is then an ordinary
            # checkpoint, at the quantization's precision (not the original weights).
            return module.weight.dequantize(module.weight.dtype)
        t = getattr(module, attr, None)
        if "lora" in type(module).__name__.lower() or "adapter" in type(module).__name__.lower() or not isinstance(
            t, torch.Tensor
        ):
            raise ValueError(
                f"save_pretrained: module {mod_path!r} is a {type(module).__name__}; merge adapters first "
                "(merge_and_unload) or save the adapter with the PEFT model's save_pretrained"
            )
        if t.device.type == "meta":
            raise ValueError(f"save_pretrained: tensor {name!r} is not materialised")
        return t

    def save_pretrained(self, save_directory: str, **_ignored):
        """Write ``model.safetensors`` + ``config.json`` that transformers' ``from_pretrained`` loads.

        Each file is written to a temporary name and renamed into place, so an interrupted save never
        leaves a half-written file; other files in the directory (a tokenizer) are kept.
        """
        from .safetensors_io import save_safetensors_atomic

        tensors = {name: self._tensor_for_save(name).detach().to("cpu") for name in self.weight_table(self.config)}
        # A shared head bias (BERT's decoder.bias = predictions.bias) is written under both names:
        # transformers re-initialises the decoder's bias when the head is untied and only one exists.
        for alias, src in self.tied_aliases().items():
            if alias.endswith(".bias") and src in tensors and alias not in tensors:
                tensors[alias] = tensors[src].clone()
        if any(type(m).__name__ == "QuantLinear" for m in self.modules()):
            warnings.warn("save_pretrained: quantized layers are written dequantized", stacklevel=2)
        os.makedirs(save_directory, exist_ok=True)
        cfg = self.config.to_dict()
        cfg.pop("quantization_config", None)
        cfg.pop("torch_dtype", None)
        cfg["architectures"] = [self.hf_architecture]
        cfg["dtype"] = str(self.dtype).replace("torch.", "")
        save_safetensors_atomic(tensors, os.path.join(save_directory, "model.safetensors"))
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=save_directory)
        with os.fdopen(fd, "w") as f:
            json.dump(cfg, f, indent=2, sort_keys=True)
        user_mode(tmp)
        os.replace(tmp, os.path.join(save_directory, "config.json"))
        # A stale shard index from an earlier save would point transformers at other files.
        stale = os.path.join(save_directory, "model.safetensors.index.json")
        if os.path.exists(stale):
            os.unlink(stale)
