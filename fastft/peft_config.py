"""Adapter configurations: ``LoraConfig`` (PEFT's field names and meaning) and ``AdapterConfig``
(bottleneck adapters), their validation, and conversion from PEFT's ``adapter_config.json`` dicts.

This module is the leaf of the adapter layer (``peft_config`` <- ``peft_io`` <- ``peft``): it knows
nothing of models beyond their ``model_type`` and of files beyond the JSON dicts they hold.

PEFT configs are accepted when every field fastft does not implement has its default value (DoRA,
rank/alpha patterns, layer selection, ...): anything else raises, naming the field, rather than
silently computing something different.
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from typing import Any

from fastft.nn.adapter import ACTIVATIONS

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."

# adapter_config.json fields that carry no semantics for fastft (bookkeeping written by PEFT).
_PEFT_METADATA = {"peft_version", "auto_mapping", "revision", "inference_mode", "base_model_name_or_path",
                  "megatron_core", "qalora_group_size", "fan_in_fan_out",
                  # written by fastft: the base's quantization at training time (load_adapter warns on a mismatch)
                  "fastft_base_quantization"}
_LORA_FIELDS = ("r", "lora_alpha", "lora_dropout", "target_modules", "bias", "use_rslora", "modules_to_save",
                "task_type", "init_lora_weights")

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

def name_matches(name: str, key: str) -> bool:
    """PEFT's list matching: ``key`` (a dotted module path) is ``name`` or ends with ``.<name>``."""
    return key == name or key.endswith("." + name)


def model_type(model) -> str | None:
    """``config.model_type`` of a transformers or fastft model (None when it has none)."""
    cfg = getattr(model, "config", None)
    return getattr(cfg, "model_type", None) or getattr(model, "model_type", None)


# ----------------------------------------------------------------------------------------------
# adapter_config.json dicts -> configs

def lora_config_from_dict(d: dict, source: str = CONFIG_NAME):
    """A fastft LoraConfig from PEFT's config dict; non-default unsupported features raise."""
    if d.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{source}: peft_type {d.get('peft_type')!r} is not LORA")
    unsupported = {}
    for k, v in d.items():
        if k in _LORA_FIELDS or k in _PEFT_METADATA or k == "peft_type":
            continue
        if v not in (None, False, {}, [], "", ()):
            unsupported[k] = v
    if d.get("fan_in_fan_out"):
        unsupported["fan_in_fan_out"] = True  # only for GPT-2's Conv1D, which fastft does not wrap
    if unsupported:
        raise ValueError(f"{source}: LoRA features not supported by fastft: {unsupported}")
    kw = {k: d[k] for k in _LORA_FIELDS if k in d and d[k] is not None}
    if d.get("base_model_name_or_path"):
        kw["base_model_name_or_path"] = d["base_model_name_or_path"]
    return LoraConfig(**kw)

def adapter_config_from_dict(d: dict, source: str = CONFIG_NAME):
    if d.get("format_version") != 1:
        raise ValueError(f"{source}: unknown bottleneck adapter format_version {d.get('format_version')!r}")
    names = {"bottleneck_size", "placement", "non_linearity", "scaling", "dropout", "target_modules",
             "modules_to_save", "task_type", "base_model_name_or_path"}
    return AdapterConfig(**{k: v for k, v in d.items() if k in names})


__all__ = ["LoraConfig", "AdapterConfig", "TASK_TYPES", "BIAS_MODES", "LORA_DEFAULT_TARGETS", "ADAPTER_SITES",
           "CONFIG_NAME", "WEIGHTS_NAME", "PREFIX", "name_matches", "model_type", "lora_config_from_dict",
           "adapter_config_from_dict"]
