"""Parameter-efficient fine-tuning: LoRA / QLoRA and bottleneck adapters, PEFT-compatible.

``get_peft_model(model, config)`` works on transformers models and on fastft's native models alike
(their module paths are transformers'), with a ``fastft.LoraConfig``, a ``peft.LoraConfig`` or a
``fastft.AdapterConfig``. It swaps the targeted linears in place for ``fastft.nn.LoraLinear`` (or
wraps the adapter sites in ``LinearWithAdapter``), freezes everything else and returns a
``FastPeftModel`` whose layout mirrors PEFT's ``PeftModel`` (``.base_model.model`` is the model), so
parameter names equal PEFT's with its adapter-name segment (``.default``) removed, and saved files
are exactly what PEFT writes (see ``fastft.peft_io``). Configs live in ``fastft.peft_config``;
``load_adapter`` applies a saved adapter, ``merge_and_unload`` folds LoRA into the base weights.

Target matching follows PEFT (peft/tuners/tuners_utils.py ``check_target_module_exists``):
- a list of names matches a module whose full dotted path equals a name or ends with ``.<name>``;
- a string is a regular expression that must match the full path (``re.fullmatch``);
- "all-linear" means every ``nn.Linear`` / ``QuantLinear`` except the output layer
  (``get_output_embeddings()``);
- None means PEFT's per-architecture default (q/v projections);
- modules named in ``modules_to_save`` are never LoRA targets.
``modules_to_save`` entries match like list targets (exact or ``.name`` suffix); PEFT uses a bare
``str.endswith`` there, which for real module names selects the same modules.

Trainability follows PEFT's order: everything frozen, LoRA weights trainable, then biases per
``bias`` ("all": every parameter named ``*.bias``; "lora_only": the targeted layers' biases), then
each ``modules_to_save`` module is wrapped with a frozen ``original_module`` and a trainable copy
``modules_to_save`` used in the forward pass.
"""
from __future__ import annotations

import copy
import math
import os
import re
import warnings

import torch
from torch import nn

from fastft.nn.adapter import BottleneckAdapter, LinearWithAdapter
from fastft.nn.lora import LoraLinear, is_linear, is_quant_linear
from fastft.peft_config import (ADAPTER_SITES, LORA_DEFAULT_TARGETS, AdapterConfig, LoraConfig, model_type,
                                name_matches)
from fastft.peft_io import CONFIG_NAME, WEIGHTS_NAME, load_state_dict_into, read_adapter, save_adapter

# Module selection


def _output_layer_name(model: nn.Module) -> str | None:
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    if out is None:
        return None
    return next((n for n, m in model.named_modules() if m is out), None)


def _describe_linears(model: nn.Module, limit: int = 12) -> str:
    names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if is_linear(m)})
    paths = [n for n, m in model.named_modules() if is_linear(m)]
    head = ", ".join(paths[:limit]) + (f", ... ({len(paths)} in all)" if len(paths) > limit else "")
    return f"linear layer names in the model: {names}; paths: {head}"


def _excluded_by_modules_to_save(key: str, modules_to_save) -> bool:
    return bool(modules_to_save) and any(re.match(rf"(^|.*\.){re.escape(m)}($|\..*)", key) for m in modules_to_save)


def resolve_lora_targets(model: nn.Module, config: LoraConfig) -> list[str]:
    """Paths of the modules ``config`` targets in ``model``; raises if none or a non-linear matches."""
    tm = config.target_modules
    if tm is None:
        mt = model_type(model)
        if mt not in LORA_DEFAULT_TARGETS:
            raise ValueError(f"LoraConfig.target_modules is None and there is no default for model type {mt!r}; "
                             f"pass target_modules ({_describe_linears(model)})")
        tm = LORA_DEFAULT_TARGETS[mt]
    all_linear = isinstance(tm, str) and tm.lower() == "all-linear"
    excluded = {_output_layer_name(model)} if all_linear else set()
    found = []
    for key, module in model.named_modules():
        if not key or key in excluded or _excluded_by_modules_to_save(key, config.modules_to_save):
            continue
        if all_linear:
            hit = is_linear(module)
        elif isinstance(tm, str):
            hit = re.fullmatch(tm, key) is not None
        else:
            hit = any(name_matches(t, key) for t in tm)
        if not hit:
            continue
        if isinstance(module, (LoraLinear, LinearWithAdapter)):
            raise ValueError(f"module {key!r} already carries an adapter; apply get_peft_model to a clean model")
        if not is_linear(module):
            raise ValueError(f"LoRA target {key!r} is a {type(module).__name__}; fastft's LoRA supports nn.Linear "
                             "and fastft.nn.QuantLinear only (target its linear sublayers instead)")
        found.append(key)
    if not found:
        raise ValueError(f"LoraConfig.target_modules={tm!r} matches no module; {_describe_linears(model)}")
    return found


def resolve_adapter_sites(model: nn.Module, config: AdapterConfig) -> list[tuple[str, str]]:
    """(site, path) pairs for the bottleneck adapters, in model order."""
    table = config.target_modules
    if table is None:
        mt = model_type(model)
        if mt not in ADAPTER_SITES:
            raise ValueError(f"no bottleneck adapter site table for model type {mt!r} (known: {sorted(ADAPTER_SITES)});"
                             " pass AdapterConfig.target_modules={'attention': regex, 'mlp': regex}")
        table = ADAPTER_SITES[mt]
    found = []
    for site in config.sites:
        if site not in table:
            raise ValueError(f"AdapterConfig.placement={config.placement!r} needs a {site!r} pattern; "
                             f"target_modules has {sorted(table)}")
    for key, module in model.named_modules():
        for site in config.sites:
            if key and re.fullmatch(table[site], key):
                if not is_linear(module):
                    raise ValueError(f"adapter site {key!r} is a {type(module).__name__}, expected a linear layer")
                found.append((site, key))
    missing = [s for s in config.sites if not any(f[0] == s for f in found)]
    if missing:
        raise ValueError(f"bottleneck adapter sites {missing} (patterns {[table[s] for s in missing]}) match no "
                         f"module; {_describe_linears(model)}")
    paths = [p for _, p in found]
    twice = sorted({p for p in paths if paths.count(p) > 1})
    if twice:
        raise ValueError(f"modules {twice} match both the 'attention' and the 'mlp' adapter pattern")
    clash = [p for p in paths if _excluded_by_modules_to_save(p, config.modules_to_save)]
    if clash:
        raise ValueError(f"adapter sites {clash} lie inside modules_to_save {config.modules_to_save}")
    return found


def resolve_modules_to_save(model: nn.Module, names) -> list[str]:
    if not names:
        return []
    keys = [k for k, _ in model.named_modules() if k]
    found, used = [], set()
    for key in keys:
        hits = [n for n in names if name_matches(n, key)]
        if not hits or any(key.startswith(f + ".") for f in found):
            continue  # a module inside one already wrapped is saved with it
        found.append(key)
        used.update(hits)
    unused = [n for n in names if n not in used]
    if unused:
        top = sorted({k.split(".")[-1] for k in keys})
        raise ValueError(f"modules_to_save {unused} match no module; module names in the model: {top}")
    return found


def _get_parent(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent_path, _, child = path.rpartition(".")
    return (model.get_submodule(parent_path) if parent_path else model), child


# ----------------------------------------------------------------------------------------------
# Wrappers


class ModulesToSaveWrapper(nn.Module):
    """A fully trained module (e.g. ``lm_head``): the frozen original plus a trainable copy that runs.

    Mirrors PEFT's wrapper so names and saved keys agree: the copy's parameters are named
    ``<path>.modules_to_save.<param>`` here (PEFT: ``<path>.modules_to_save.default.<param>``) and
    saved as ``<path>.<param>``. Attributes not found on the wrapper resolve on the copy.
    """

    def __init__(self, module: nn.Module):
        super().__init__()
        self.original_module = module
        self.modules_to_save = copy.deepcopy(module)
        self.original_module.requires_grad_(False)
        self.modules_to_save.requires_grad_(True)

    def forward(self, *args, **kwargs):
        return self.modules_to_save(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("modules_to_save", "original_module") or "_modules" not in self.__dict__:
                raise
            return getattr(self._modules["modules_to_save"], name)


class _AdaptedModel(nn.Module):
    """Holder that makes the wrapped model ``.base_model.model``, as in PEFT's ``LoraModel``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)


def get_peft_model(model: nn.Module, config) -> "FastPeftModel":
    """Add LoRA (``LoraConfig`` / ``peft.LoraConfig``) or bottleneck adapters (``AdapterConfig``) to ``model``.

    The model is modified in place (targeted layers replaced, everything else frozen) and returned
    inside a ``FastPeftModel``. Every check runs before the first change.
    """
    if isinstance(model, FastPeftModel):
        raise ValueError("model already has adapters (it is a FastPeftModel); use the base model")
    if not isinstance(model, nn.Module):
        raise TypeError(f"get_peft_model expects a torch.nn.Module, got {type(model).__name__}")
    if any(type(m).__module__.split(".")[0] == "peft" for m in model.modules()):
        raise ValueError("model already carries PEFT adapter layers; pass the plain base model "
                         "(or PEFT's merge_and_unload() result)")
    if type(config).__module__.split(".")[0] == "peft":
        if type(config).__name__ != "LoraConfig":
            raise TypeError(f"fastft supports peft.LoraConfig only, got peft.{type(config).__name__}")
        config = LoraConfig.from_peft(config)
    if not isinstance(config, (LoraConfig, AdapterConfig)):
        raise TypeError(f"config must be a fastft.LoraConfig, fastft.AdapterConfig or peft.LoraConfig, "
                        f"got {type(config).__name__}")
    if any(isinstance(m, (LoraLinear, LinearWithAdapter, ModulesToSaveWrapper)) for m in model.modules()):
        raise ValueError("model already contains fastft adapter layers; apply get_peft_model to a clean model")
    config = copy.deepcopy(config)
    if config.base_model_name_or_path is None:
        config.base_model_name_or_path = _name_or_path(model)

    # Resolve everything first so a bad config leaves the model untouched.
    if isinstance(config, LoraConfig):
        targets = resolve_lora_targets(model, config)
        if isinstance(config.target_modules, str) and config.target_modules.lower() == "all-linear":
            config.target_modules = sorted(targets)  # what PEFT writes to adapter_config.json too
    else:
        sites = resolve_adapter_sites(model, config)
    mts = resolve_modules_to_save(model, config.modules_to_save)

    for p in model.parameters():
        p.requires_grad_(False)
    if isinstance(config, LoraConfig):
        for path in targets:
            parent, child = _get_parent(model, path)
            layer = LoraLinear(getattr(parent, child), config.r, config.lora_alpha, config.lora_dropout,
                               config.use_rslora, config.init_lora_weights)
            setattr(parent, child, layer)
        if config.bias == "all":
            for n, p in model.named_parameters():
                if n == "bias" or n.endswith(".bias"):
                    p.requires_grad_(True)
        elif config.bias == "lora_only":
            for m in model.modules():
                if isinstance(m, LoraLinear) and m.base_layer.bias is not None:
                    m.base_layer.bias.requires_grad_(True)
    else:
        for _, path in sites:
            parent, child = _get_parent(model, path)
            base = getattr(parent, child)
            w = base.weight
            adapter = BottleneckAdapter(base.out_features, config.bottleneck_size, config.non_linearity,
                                        config.scaling, config.dropout, device=w.device,
                                        dtype=w.dtype if isinstance(w, torch.Tensor) else None)
            setattr(parent, child, LinearWithAdapter(base, adapter))
    for path in mts:
        parent, child = _get_parent(model, path)
        setattr(parent, child, ModulesToSaveWrapper(getattr(parent, child)))
    # New modules start in training mode; keep the whole model in the mode it was given in (a model
    # in eval mode stays deterministic). PEFT leaves such a mix of modes; callers switch with .train().
    return FastPeftModel(model, config).train(model.training)


def _name_or_path(model: nn.Module) -> str | None:
    v = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
    return str(v) if v else None


class FastPeftModel(nn.Module):
    """A model with LoRA / bottleneck adapters, laid out like PEFT's ``PeftModel``.

    ``.base_model.model`` is the adapted model. ``forward``, ``generate``, ``config`` and any other
    attribute delegate to it.
    """

    def __init__(self, model: nn.Module, config):
        super().__init__()
        self.base_model = _AdaptedModel(model)
        self.adapter_config = config
        # PEFT keeps configs per adapter name; code written for PeftModel reads peft_config["default"].
        self.peft_config = {"default": config}
        self._expose_forward_signature(model)

    def _expose_forward_signature(self, model: nn.Module) -> None:
        """Give this instance's ``forward`` the wrapped model's signature.

        ``transformers.Trainer`` drops dataset columns that ``inspect.signature(model.forward)`` does
        not name (``remove_unused_columns``), and it sees through ``peft.PeftModel`` only. A bound
        method of a per-instance function copy carries the signature; deepcopy rebinds it to the copy.
        """
        import inspect
        import types

        try:
            sig = inspect.signature(model.forward)
        except (TypeError, ValueError):
            return
        base = FastPeftModel.forward
        fn = types.FunctionType(base.__code__, base.__globals__, base.__name__, base.__defaults__, base.__closure__)
        fn.__qualname__, fn.__doc__ = base.__qualname__, base.__doc__
        self_param = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
        fn.__signature__ = sig.replace(parameters=[self_param, *sig.parameters.values()])
        self.forward = types.MethodType(fn, self)

    # -- delegation ------------------------------------------------------------------------
    def forward(self, *args, **kwargs):
        return self.base_model.model(*args, **kwargs)

    def generate(self, *args, **kwargs):
        return self.base_model.model.generate(*args, **kwargs)

    def get_base_model(self) -> nn.Module:
        return self.base_model.model

    @property
    def loss_type(self) -> str | None:
        """transformers' loss family of the wrapped model. Trainer counts ``num_items_in_batch`` over
        ``labels[..., 1:]`` only for "ForCausalLM"; fastft's native causal LMs shift labels too."""
        model = self.base_model.model
        lt = getattr(model, "loss_type", None)
        if lt is None and str(getattr(model, "hf_architecture", "")).endswith("ForCausalLM"):
            lt = "ForCausalLM"
        return lt

    @property
    def accepts_loss_kwargs(self) -> bool:
        """Whether the wrapped model's forward takes ``num_items_in_batch`` (named or via ``**kwargs``):
        ``transformers.Trainer`` then passes it and stops dividing the loss by the accumulation steps."""
        import inspect

        model = self.base_model.model
        if hasattr(model, "accepts_loss_kwargs"):
            return bool(model.accepts_loss_kwargs)
        try:
            params = inspect.signature(model.forward).parameters
        except (TypeError, ValueError):
            return False
        return "num_items_in_batch" in params or any(p.kind == p.VAR_KEYWORD for p in params.values())

    @property
    def active_peft_config(self):
        return self.adapter_config

    def gradient_checkpointing_enable(self, *args, **kwargs):
        model = self.base_model.model
        # transformers 5 renamed it (the old name warns); fastft's native models keep the old name.
        fn = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        return fn(*args, **kwargs)

    def gradient_checkpointing_disable(self, *args, **kwargs):
        model = self.base_model.model
        fn = getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable
        return fn(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model" or "_modules" not in self.__dict__ or "base_model" not in self._modules:
                raise
            return getattr(self._modules["base_model"].model, name)

    # -- adapter bookkeeping ---------------------------------------------------------------
    def lora_layers(self) -> dict[str, LoraLinear]:
        return {n: m for n, m in self.base_model.model.named_modules() if isinstance(m, LoraLinear)}

    def adapter_layers(self) -> dict[str, LinearWithAdapter]:
        return {n: m for n, m in self.base_model.model.named_modules() if isinstance(m, LinearWithAdapter)}

    def modules_to_save_wrappers(self) -> dict[str, ModulesToSaveWrapper]:
        return {n: m for n, m in self.base_model.model.named_modules() if isinstance(m, ModulesToSaveWrapper)}

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, all) parameter counts; a quantized weight counts as its logical out·in elements."""
        trainable = total = 0
        for p in self.parameters():
            total += p.numel()
            trainable += p.numel() if p.requires_grad else 0
        for m in self.modules():
            if is_quant_linear(m) and not isinstance(m.weight, nn.Parameter):
                total += math.prod(m.weight.shape)
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || "
              f"trainable%: {100 * trainable / max(total, 1):.4f}")

    # -- files -----------------------------------------------------------------------------
    def save_pretrained(self, save_directory, safe_serialization: bool = True, state_dict=None, **kwargs) -> None:
        """Write ``adapter_config.json`` + ``adapter_model.safetensors`` (PEFT's format), atomically.

        ``state_dict`` and ``is_main_process``/``selected_adapters`` are accepted for drop-in use
        where PeftModel is expected; only safetensors is written.
        """
        unknown = set(kwargs) - {"is_main_process", "selected_adapters", "save_embedding_layers"}
        if unknown:
            raise TypeError(f"save_pretrained got unexpected arguments {sorted(unknown)}")
        if not safe_serialization:
            raise ValueError("fastft writes safetensors only (safe_serialization=False is not supported)")
        if state_dict is not None:
            warnings.warn("save_pretrained: the passed state_dict is ignored; the adapter is read from the model")
        if kwargs.get("is_main_process", True) is False:
            return
        save_adapter(self, save_directory)

    def merge_and_unload(self) -> nn.Module:
        """Fold every LoRA update into its base weight (fp32 math) and return the plain model.

        A QuantLinear base comes back as a dense ``nn.Linear`` in the weight's original dtype (the
        merged weight is not requantized). ``modules_to_save`` modules are replaced by their trained
        copies. Bottleneck adapters are nonlinear and cannot be merged: this raises for them.
        """
        return merge_and_unload(self)

    def unload(self) -> nn.Module:
        """Remove the adapters without merging; return the plain base model."""
        return unload(self)


# ----------------------------------------------------------------------------------------------
# Load / merge / unload


def load_adapter(model: nn.Module, adapter_dir, *, is_trainable: bool = False):
    """Apply the adapter in ``adapter_dir`` (written by fastft or PEFT) to ``model``.

    ``model`` is a plain model (transformers or fastft native; modified in place) and the result a
    ``FastPeftModel``. As with ``peft.PeftModel.from_pretrained``, the adapter comes back frozen
    for inference unless ``is_trainable=True``.
    """
    if isinstance(model, FastPeftModel):
        raise ValueError("load_adapter expects a model without adapters; this one is already a FastPeftModel")
    # Read before touching the model: a corrupt file leaves it unchanged.
    config, d, sd = read_adapter(adapter_dir)
    source = os.path.join(os.fspath(adapter_dir), CONFIG_NAME)
    if config.modules_to_save:
        # PEFT writes its task defaults (e.g. ["classifier", "score"] for SEQ_CLS) whether or not the
        # model has them; a name naming nothing has no tensors in the file either. Tensors in the
        # file that fit no module are still refused below.
        keys = [k for k, _ in model.named_modules() if k]
        config.modules_to_save = [n for n in config.modules_to_save if any(name_matches(n, k) for k in keys)] or None
    grad_flags = {id(p): p.requires_grad for p in model.parameters()}
    peft_model = get_peft_model(model, config)
    try:
        if isinstance(config, AdapterConfig) and d.get("adapter_modules") is not None:
            got = sorted(peft_model.adapter_layers())
            if got != sorted(d["adapter_modules"]):
                raise ValueError(f"{source}: adapter sites {sorted(d['adapter_modules'])} do not match the "
                                 f"model's {got}")
        load_state_dict_into(peft_model, sd, os.path.join(os.fspath(adapter_dir), WEIGHTS_NAME))
    except Exception:
        # Leave the caller's model as it was: original modules back, requires_grad flags restored.
        _unload(peft_model, keep_trained_copies=False)
        for p in model.parameters():
            p.requires_grad_(grad_flags.get(id(p), p.requires_grad))
        raise
    if not is_trainable:
        for p in peft_model.parameters():
            p.requires_grad_(False)
    _warn_on_other_base(d, model, source)
    return peft_model


def _warn_on_other_base(d: dict, model: nn.Module, source: str) -> None:
    """The adapter records its base (path, quantization): applying it to another one is allowed but
    changes what it computes, so it is said once, with both sides."""
    import warnings

    from fastft.peft_io import base_quantization

    if "fastft_base_quantization" in d:
        was, now = d["fastft_base_quantization"], base_quantization(model)
        if was != now:
            warnings.warn(f"{source}: adapter trained on a {was or 'unquantized'} base, applied to a "
                          f"{now or 'unquantized'} one: its outputs differ from training's", stacklevel=3)
    rec, cur = d.get("base_model_name_or_path"), _name_or_path(model)
    if rec and cur and os.path.basename(os.path.normpath(rec)) != os.path.basename(os.path.normpath(cur)):
        warnings.warn(f"{source}: adapter trained on base {rec!r}, applied to {cur!r}", stacklevel=3)


def _replace(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent_path) if parent_path else model, child, new)


def _adopt_trained_copy(model: nn.Module, path: str, wrapper) -> None:
    """Replace a modules_to_save wrapper by its trained copy, keeping parameter sharing meaningful.

    The original module's parameters may be shared with other modules: an output layer tied to the
    input embedding (Llama with tie_word_embeddings, BERT's decoder), or an alias of the same
    tensor (BERT's ``cls.predictions.bias`` is its decoder's bias). Training ran with the copy
    untied from them. A tie to the input embedding (a different computation, which was not trained)
    is broken and ``tie_word_embeddings`` turned off, so a saved merged model keeps both weights.
    An alias gets the trained values in a tensor of its own: transformers 5 saves a shared pair under
    one name only, and with tying off it would then load the other name as missing.
    """
    copy_ = wrapper.modules_to_save
    orig_names = {id(p): n for n, p in wrapper.original_module.named_parameters(remove_duplicate=False)}
    get_in = getattr(model, "get_input_embeddings", None)
    in_emb = get_in() if callable(get_in) else None
    untie = False
    for mname, m in model.named_modules(remove_duplicate=False):
        if mname == path or mname.startswith(path + "."):
            continue
        for attr, p in list(m._parameters.items()):
            if p is None or id(p) not in orig_names:
                continue
            if m is in_emb:
                untie = True
            else:
                trained = copy_.get_parameter(orig_names[id(p)]).detach().clone()
                setattr(m, attr, nn.Parameter(trained, requires_grad=p.requires_grad))
    if untie:
        for obj in (getattr(model, "config", None), model):
            if obj is not None and getattr(obj, "tie_word_embeddings", False):
                obj.tie_word_embeddings = False
    _replace(model, path, copy_)


def merge_and_unload(peft_model) -> nn.Module:
    """W ← W + s·B·A in fp32 for every LoRA layer; return the plain model (see FastPeftModel.merge_and_unload)."""
    adapters = peft_model.adapter_layers()
    if adapters:
        raise ValueError(f"bottleneck adapters are nonlinear and cannot be merged into weights "
                         f"({len(adapters)} adapted layers); use unload() or keep the adapters")
    model = peft_model.base_model.model
    for path, layer in peft_model.lora_layers().items():
        _replace(model, path, layer.merged_linear())
    for path, wrapper in peft_model.modules_to_save_wrappers().items():
        _adopt_trained_copy(model, path, wrapper)
    return model


def unload(peft_model) -> nn.Module:
    """Remove adapters without merging (trained modules_to_save copies stay, as in PEFT)."""
    return _unload(peft_model, keep_trained_copies=True)


def _unload(peft_model, keep_trained_copies: bool) -> nn.Module:
    model = peft_model.base_model.model
    for path, layer in peft_model.lora_layers().items():
        _replace(model, path, layer.base_layer)
    for path, wrapped in peft_model.adapter_layers().items():
        _replace(model, path, wrapped.base_layer)
    for path, wrapper in peft_model.modules_to_save_wrappers().items():
        if keep_trained_copies:
            _adopt_trained_copy(model, path, wrapper)
        else:
            _replace(model, path, wrapper.original_module)
    return model


__all__ = ["LoraConfig", "AdapterConfig", "get_peft_model", "FastPeftModel", "ModulesToSaveWrapper", "load_adapter",
           "merge_and_unload", "unload", "ADAPTER_SITES", "LORA_DEFAULT_TARGETS"]
