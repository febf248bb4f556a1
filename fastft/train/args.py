"""TrainingArguments: the knobs of ``fastft.Trainer``, named as in ``transformers.TrainingArguments``.

Only the subset fastft implements is accepted; an unknown name is an error (with a suggestion),
never silently ignored, because a misspelt ``learning_rat`` would otherwise train with the default.
Values are validated when the object is built, before any file is written.

Numbers given as strings are converted: YAML 1.1 (PyYAML) reads ``1e-4`` as the *string* "1e-4"
(it needs ``1.0e-4`` to be a float), and CLI/JSON configs written by hand hit this constantly.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
from dataclasses import dataclass
from typing import Any, Optional, Union

SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup")


@dataclass
class TrainingArguments:
    output_dir: str = "outputs/run"
    per_device_train_batch_size: int = 8
    per_device_eval_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    learning_rate: float = 5e-5
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    # 0 or None disables clipping (the grad norm is still logged).
    max_grad_norm: Optional[float] = 1.0
    num_train_epochs: float = 3.0
    # > 0 overrides num_train_epochs (HF convention: -1 = "use epochs").
    max_steps: int = -1
    warmup_ratio: float = 0.0
    # > 0 overrides warmup_ratio.
    warmup_steps: int = 0
    lr_scheduler_type: str = "linear"
    logging_steps: int = 10
    # None: evaluate once at the end of training (when an eval dataset is given).
    eval_steps: Optional[int] = None
    # None: no intermediate checkpoints.
    save_steps: Optional[int] = 500
    save_total_limit: Optional[int] = None
    bf16: bool = False
    gradient_checkpointing: bool = False
    seed: int = 42
    # A checkpoint directory, or True for the newest checkpoint-<step> in output_dir.
    resume_from_checkpoint: Optional[Union[str, bool]] = None
    packing: bool = False
    # Collators truncate longer examples to this many tokens (None: no limit).
    max_length: Optional[int] = None
    dataloader_drop_last: bool = False
    disable_tqdm: bool = False
    # Write output_dir/loss.png at the end of training.
    plot_loss: bool = True
    # Call model.save_pretrained(output_dir) (or save trainable params) at the end of training.
    save_final_model: bool = True
    # Forgetting report (fastft/tasks/forgetting.py; needs the Trainer's tokenizer): the reference
    # metric of the model before and after training, in metrics.jsonl and output_dir/forgetting.md.
    forgetting_report: bool = False
    # Also measure it every N optimizer steps (implies forgetting_report).
    forgetting_steps: Optional[int] = None
    # Reference documents scored and their length in tokens.
    forgetting_docs: int = 48
    forgetting_max_length: int = 128

    def __post_init__(self):
        self._coerce()
        self._validate()

    # --- construction from mappings and files -------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict, *, strict: bool = True, **overrides) -> "TrainingArguments":
        """Build from a mapping; ``strict`` rejects unknown keys (dashes count as underscores)."""
        if not isinstance(d, dict):
            raise TypeError(f"TrainingArguments.from_dict expects a dict, got {type(d).__name__}")
        d = {str(k).replace("-", "_"): v for k, v in {**d, **overrides}.items()}
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown and strict:
            hints = []
            for k in unknown:
                close = difflib.get_close_matches(k, names, n=1)
                hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            raise ValueError(f"unknown TrainingArguments option(s): {', '.join(hints)}")
        return cls(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def from_file(cls, path: str, *, strict: bool = True, **overrides) -> "TrainingArguments":
        """Read a YAML (.yaml/.yml) or JSON (.json) file holding a mapping of option: value."""
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise ValueError(f"TrainingArguments config file {path!r} does not exist")
        with open(path, encoding="utf-8") as f:
            text = f.read()
        ext = os.path.splitext(path)[1].lower()
        if ext in (".yaml", ".yml"):
            import yaml

            try:
                data = yaml.safe_load(text)
            except yaml.YAMLError as e:
                raise ValueError(f"{path}: cannot parse YAML: {e}") from None
        elif ext == ".json":
            try:
                data = json.loads(text)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{e.lineno}: cannot parse JSON: {e.msg}") from None
        else:
            raise ValueError(f"{path}: config files must end in .yaml, .yml or .json")
        if not isinstance(data, dict):
            raise ValueError(f"{path}: config must be a mapping of option: value, got {type(data).__name__}")
        try:
            return cls.from_dict(data, strict=strict, **overrides)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{path}: {e}") from e

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    # --- checks ---------------------------------------------------------------------------------
    def _coerce(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            kind = _base_kind(f.type)
            if v is None or kind is None:
                continue
            if kind is bool:
                if isinstance(v, str) and v.strip().lower() in ("true", "false", "1", "0", "yes", "no"):
                    v = v.strip().lower() in ("true", "1", "yes")
                elif not isinstance(v, bool):
                    raise TypeError(f"TrainingArguments.{f.name} must be a bool, got {v!r}")
            elif kind in (int, float):
                if isinstance(v, bool):
                    raise TypeError(f"TrainingArguments.{f.name} must be a number, got {v!r}")
                if isinstance(v, str):
                    try:
                        v = float(v.strip())
                    except ValueError:
                        raise TypeError(f"TrainingArguments.{f.name} must be a number, got {v!r}") from None
                if kind is int:
                    if isinstance(v, float):
                        if not v.is_integer():
                            raise TypeError(f"TrainingArguments.{f.name} must be an integer, got {v!r}")
                        v = int(v)
                    elif not isinstance(v, int):
                        raise TypeError(f"TrainingArguments.{f.name} must be an integer, got {v!r}")
                elif isinstance(v, (int, float)):
                    v = float(v)
                else:
                    raise TypeError(f"TrainingArguments.{f.name} must be a number, got {v!r}")
            setattr(self, f.name, v)
        if isinstance(self.output_dir, os.PathLike):
            self.output_dir = os.fspath(self.output_dir)
        r = self.resume_from_checkpoint
        if isinstance(r, os.PathLike):
            self.resume_from_checkpoint = os.fspath(r)
        elif isinstance(r, str) and r.strip().lower() in ("true", "false", ""):
            self.resume_from_checkpoint = True if r.strip().lower() == "true" else None
        elif r is False:
            self.resume_from_checkpoint = None

    def _validate(self):
        def bad(name, why):
            raise ValueError(f"TrainingArguments.{name}={getattr(self, name)!r}: {why}")

        if not isinstance(self.output_dir, str) or not self.output_dir.strip():
            bad("output_dir", "must be a non-empty path")
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                     "logging_steps"):
            if getattr(self, name) < 1:
                bad(name, "must be >= 1")
        for name in ("eval_steps", "save_steps", "save_total_limit", "max_length", "forgetting_steps"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                bad(name, "must be >= 1 or None")
        for name in ("learning_rate", "weight_decay", "adam_epsilon", "num_train_epochs", "warmup_ratio",
                     "adam_beta1", "adam_beta2"):
            if not math.isfinite(getattr(self, name)):
                bad(name, "must be finite")
        for name in ("forgetting_docs", "forgetting_max_length"):
            if getattr(self, name) < (8 if name == "forgetting_max_length" else 1):
                bad(name, "must be >= 8" if name == "forgetting_max_length" else "must be >= 1")
        if self.learning_rate < 0:
            bad("learning_rate", "must be >= 0")
        if self.weight_decay < 0:
            bad("weight_decay", "must be >= 0")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                bad(name, "must be in [0, 1)")
        if self.adam_epsilon <= 0:
            bad("adam_epsilon", "must be > 0")
        if self.max_grad_norm is not None and (not math.isfinite(self.max_grad_norm) or self.max_grad_norm < 0):
            bad("max_grad_norm", "must be >= 0 (0 or None disables clipping)")
        if self.max_steps == 0 or self.max_steps < -1:
            bad("max_steps", "must be > 0, or -1 to train for num_train_epochs")
        if self.max_steps == -1 and self.num_train_epochs <= 0:
            bad("num_train_epochs", "must be > 0 when max_steps is not set")
        if not 0.0 <= self.warmup_ratio <= 1.0:
            bad("warmup_ratio", "must be in [0, 1]")
        if self.warmup_steps < 0:
            bad("warmup_steps", "must be >= 0")
        if self.lr_scheduler_type not in SCHEDULERS:
            bad("lr_scheduler_type", f"must be one of {', '.join(SCHEDULERS)}")
        r = self.resume_from_checkpoint
        if r is not None and r is not True and not (isinstance(r, str) and r.strip()):
            bad("resume_from_checkpoint", "must be a checkpoint directory, True (latest in output_dir) or None")

    # Steps of linear warmup for a run of `total` optimizer steps.
    def num_warmup_steps(self, total: int) -> int:
        return self.warmup_steps if self.warmup_steps > 0 else math.ceil(self.warmup_ratio * total)


def _base_kind(tp: Any):
    """int / float / bool / None for a field annotation (given as a string under __future__ annotations)."""
    s = str(tp)
    if "Union[str, bool]" in s:
        return None
    for kind in (bool, int, float):
        if s in (kind.__name__, f"Optional[{kind.__name__}]"):
            return kind
    return None
