"""Parameter-efficient fine-tuning: LoRA / QLoRA and bottleneck adapters, PEFT-compatible.

``get_peft_model(model, config)`` works on transformers models and on fastft's native models alike
(their module paths are transformers'), with a ``fastft.LoraConfig``, a ``peft.LoraConfig`` or a
``fastft.AdapterConfig``. It swaps the targeted linears in place for ``fastft.nn.LoraLinear`` (or
wraps the adapter sites in ``LinearWithAdapter``), freezes everything else and returns a
``FastPeftModel`` whose layout mirrors PEFT's ``PeftModel`` (``.base_model.model`` is the model), so
parameter names equal PEFT's with its adapter-name segment (``.default``) removed, and saved files
are exactly what PEFT writes (see ``fastft.peft_io``).

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

import math
import re
import warnings
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from fastft.nn.adapter import ACTIVATIONS, BottleneckAdapter, LinearWithAdapter
from fastft.nn.lora import LoraLinear, is_linear, is_quant_linear

TASK_TYPES = ("CAUSAL_LM", "SEQ_CLS", "SEQ_2_SEQ_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")
BIAS_MODES = ("none", "all", "lora_only")

# PEFT's defaults when target_modules is None (peft/utils/constants.py), for the families fastft supports.
LORA_DEFAULT_TARGETS = {
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
}

# Where bottleneck adapters go, per architecture: full-match regexes on module paths for the
# attention output projection and the MLP's last projection. BERT's MLP output ("layer.N.output.dense")
# is a suffix of its attention output ("layer.N.attention.output.dense"), hence anchored patterns.
_LLAMA_SITES = {"attention": r"(.*\.)?layers\.\d+\.self_attn\.o_proj", "mlp": r"(.*\.)?layers\.\d+\.mlp\.down_proj"}
_BERT_SITES = {"attention": r"(.*\.)?layer\.\d+\.attention\.output\.dense", "mlp": r"(.*\.)?layer\.\d+\.output\.dense"}
ADAPTER_SITES = {"llama": _LLAMA_SITES, "mistral": _LLAMA_SITES, "qwen2": _LLAMA_SITES,
                 "bert": _BERT_SITES, "roberta": _BERT_SITES}


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@dataclass
class LoraConfig:
    """LoRA hyperparameters (field names and meaning as in ``peft.LoraConfig``)."""

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: list[str] | str | None = None
    bias: str = "none"
    use_rslora: bool = False
    modules_to_save: list[str] | None = None
    task_type: str | None = None
    init_lora_weights: bool | str = True
    base_model_name_or_path: str | None = None

    peft_type = "LORA"

    def __post_init__(self):
        if not _is_int(self.r) or self.r <= 0:
            raise ValueError(f"LoraConfig.r must be a positive integer, got {self.r!r}")
        if not _is_number(self.lora_alpha) or self.lora_alpha <= 0:
            raise ValueError(f"LoraConfig.lora_alpha must be a positive number, got {self.lora_alpha!r}")
        if not _is_number(self.lora_dropout) or not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"LoraConfig.lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.bias not in BIAS_MODES:
            raise ValueError(f"LoraConfig.bias must be one of {BIAS_MODES}, got {self.bias!r}")
        if not isinstance(self.use_rslora, bool):
            raise ValueError(f"LoraConfig.use_rslora must be a bool, got {self.use_rslora!r}")
        if not (self.init_lora_weights is True or self.init_lora_weights is False
                or self.init_lora_weights == "gaussian"):
            raise ValueError(f"LoraConfig.init_lora_weights must be True, False or 'gaussian', "
                             f"got {self.init_lora_weights!r}")
        tm = self.target_modules
        if isinstance(tm, (list, tuple, set, frozenset)):
            if not tm or not all(isinstance(t, str) and t for t in tm):
                raise ValueError(f"LoraConfig.target_modules must be non-empty names, got {tm!r}")
            # Sets (PEFT writes "all-linear" expanded as one) are sorted so saved configs are reproducible.
            self.target_modules = sorted(tm) if isinstance(tm, (set, frozenset)) else list(tm)
        elif isinstance(tm, str):
            if tm.lower() != "all-linear":
                try:
                    re.compile(tm)
                except re.error as e:
                    raise ValueError(f"LoraConfig.target_modules regex {tm!r} does not compile: {e}") from None
        elif tm is not None:
            raise ValueError(f"LoraConfig.target_modules must be a list of names, a regex string, 'all-linear' "
                             f"or None, got {type(tm).__name__}")
        _check_modules_to_save(self)
        self.task_type = _check_task_type(self)

    @property
    def scaling(self) -> float:
        return self.lora_alpha / math.sqrt(self.r) if self.use_rslora else self.lora_alpha / self.r

    def to_dict(self) -> dict[str, Any]:
        return {"peft_type": self.peft_type, **asdict(self)}

    @classmethod
    def from_peft(cls, cfg) -> "LoraConfig":
        """Convert a ``peft.LoraConfig``; PEFT features fastft does not implement raise."""
        from fastft.peft_io import lora_config_from_dict

        d = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(vars(cfg))
        for k in ("peft_type", "task_type"):  # PEFT stores enums; the JSON form is their value
            if d.get(k) is not None:
                d[k] = str(getattr(d[k], "value", d[k]))
        return lora_config_from_dict(d, source="peft.LoraConfig")


@dataclass
class AdapterConfig:
    """Bottleneck adapters h + s·up(act(down(h))) after attention and/or MLP outputs.

    ``placement``: "attention", "mlp" or "both". ``target_modules`` overrides the per-architecture
    site table (``ADAPTER_SITES``): a dict {"attention": regex, "mlp": regex} of full-match patterns
    on module paths, for architectures not in the table.
    """

    bottleneck_size: int = 64
    placement: str = "both"
    non_linearity: str = "relu"
    scaling: float = 1.0
    dropout: float = 0.0
    target_modules: dict[str, str] | None = None
    modules_to_save: list[str] | None = None
    task_type: str | None = None
    base_model_name_or_path: str | None = None

    peft_type = "BOTTLENECK"

    def __post_init__(self):
        if not _is_int(self.bottleneck_size) or self.bottleneck_size <= 0:
            raise ValueError(f"AdapterConfig.bottleneck_size must be a positive integer, got {self.bottleneck_size!r}")
        if self.placement not in ("attention", "mlp", "both"):
            raise ValueError(f"AdapterConfig.placement must be 'attention', 'mlp' or 'both', got {self.placement!r}")
        if self.non_linearity not in ACTIVATIONS:
            raise ValueError(f"AdapterConfig.non_linearity must be one of {sorted(ACTIVATIONS)}, "
                             f"got {self.non_linearity!r}")
        if not _is_number(self.scaling):
            raise ValueError(f"AdapterConfig.scaling must be a finite number, got {self.scaling!r}")
        if not _is_number(self.dropout) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"AdapterConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if self.target_modules is not None:
            tm = self.target_modules
            if not isinstance(tm, dict) or not set(tm) <= {"attention", "mlp"} or not tm:
                raise ValueError("AdapterConfig.target_modules must be a dict with keys 'attention' and/or 'mlp' "
                                 f"mapping to full-match regexes, got {tm!r}")
            for k, pat in tm.items():
                try:
                    re.compile(pat)
                except (re.error, TypeError) as e:
                    raise ValueError(f"AdapterConfig.target_modules[{k!r}] = {pat!r} is not a valid regex: {e}") from None
        _check_modules_to_save(self)
        self.task_type = _check_task_type(self)

    @property
    def sites(self) -> list[str]:
        return ["attention", "mlp"] if self.placement == "both" else [self.placement]

    def to_dict(self) -> dict[str, Any]:
        return {"peft_type": self.peft_type, **asdict(self)}


def _check_task_type(cfg) -> str | None:
    tt = getattr(cfg.task_type, "value", cfg.task_type)  # peft.TaskType members carry the string as value
    if tt is not None and tt not in TASK_TYPES:
        raise ValueError(f"{type(cfg).__name__}.task_type must be None or one of {TASK_TYPES}, got {cfg.task_type!r}")
    return tt


def _check_modules_to_save(cfg) -> None:
    mts = cfg.modules_to_save
    if mts is None:
        return
    if isinstance(mts, str) or not all(isinstance(m, str) and m for m in mts):
        raise ValueError(f"{type(cfg).__name__}.modules_to_save must be a list of module names, got {mts!r}")
    cfg.modules_to_save = list(mts)


# ----------------------------------------------------------------------------------------------
# Module selection


def _name_matches(name: str, key: str) -> bool:
    return key == name or key.endswith("." + name)


def _model_type(model: nn.Module) -> str | None:
    cfg = getattr(model, "config", None)
    return getattr(cfg, "model_type", None) or getattr(model, "model_type", None)


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
        mt = _model_type(model)
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
            hit = any(_name_matches(t, key) for t in tm)
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
        mt = _model_type(model)
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
        hits = [n for n in names if _name_matches(n, key)]
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
        import copy

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
    import copy

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
        from fastft.peft_io import save_adapter

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
        from fastft.peft_io import merge_and_unload

        return merge_and_unload(self)

    def unload(self) -> nn.Module:
        """Remove the adapters without merging; return the plain base model."""
        from fastft.peft_io import unload

        return unload(self)


__all__ = ["LoraConfig", "AdapterConfig", "get_peft_model", "FastPeftModel", "ModulesToSaveWrapper",
           "ADAPTER_SITES", "LORA_DEFAULT_TARGETS"]
