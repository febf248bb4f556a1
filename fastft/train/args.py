"""TrainingArguments: the knobs of ``fastft.Trainer``, named as in ``transformers.TrainingArguments``.

Only the subset fastft implements is accepted; an unknown name is an error (with a suggestion),
never silently ignored, because a misspelt ``learning_rat`` would otherwise train with the default.
Values are validated when the object is built, before any file is written.

Numbers given as strings are converted: YAML 1.1 (PyYAML) reads ``1e-4`` as the *string* "1e-4"
(it needs ``1.0e-4`` to be a float), and CLI/JSON configs written by hand hit this constantly.
"""
from __future__ import annotations

from ..errors import ArgumentTypeError, ConfigError, UsageError

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
    # False / "off", True / "on", or "offload" (checkpointed block inputs kept in pinned host memory,
    # copied on a side stream): normalised to False, True or "offload".
    gradient_checkpointing: Union[bool, str] = False
    # Fused q/k/v and gate/up + SwiGLU LoRA blocks in native Llama-family layers (dense bases, CUDA):
    # True, False or "auto" (FASTFT_FUSED_LORA, else today's measured per-projection path).
    fused_lora_blocks: Union[bool, str] = "auto"
    # Tokens per MLP tile (native models): the MLP's (tokens x intermediate) activations never exist
    # whole, for one more MLP forward per step; for long sequences. None: untiled.
    tiled_mlp: Optional[int] = None
    # The frozen input embedding and LM head (a tied table once) in host memory (native Llama-family
    # models; the LM head streamed through the loss in vocabulary chunks; an fp32 table whose values
    # are bf16's stored in bf16, exact): fastft.nn.offload_frozen_to_host.
    offload_embeddings: bool = False
    # Training on the CPU: glibc's large blocks (>= 1 MiB) mapped and unmapped per allocation, so freed
    # activations return to the OS and peak RSS approaches the live tensor bytes (process-wide; +18-28 %
    # step time in docs/memory.md's 1B rows): fastft.train.allocator.lean_cpu_allocator. Ignored on a GPU.
    lean_cpu_allocator: bool = False
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
    # A fresh run refuses an output_dir holding another run's outputs unless this is True (the old
    # run's checkpoints and metrics are then removed, so resume can never pick them up).
    overwrite_output_dir: bool = False
    # Forward hooks check every module's output; a non-finite one stops training naming the module.
    detect_anomaly: bool = False
    # Under torchrun (an initialised process group with > 1 ranks): "ddp" or "fsdp" (FSDP2
    # fully_shard); None picks FSDP for a quantized base (QLoRA), DDP otherwise.
    distributed_strategy: Optional[str] = None
    # Seconds before a collective (all-reduce, all-gather, barrier) gives up (HF's name).
    ddp_timeout: int = 1800
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
            raise ArgumentTypeError(f"TrainingArguments.from_dict expects a dict, got {type(d).__name__}")
        d = {str(k).replace("-", "_"): v for k, v in {**d, **overrides}.items()}
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown and strict:
            hints = []
            for k in unknown:
                close = difflib.get_close_matches(k, names, n=1)
                hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            raise UsageError(f"unknown TrainingArguments option(s): {', '.join(hints)}")
        return cls(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def from_file(cls, path: str, *, strict: bool = True, **overrides) -> "TrainingArguments":
        """Read a YAML (.yaml/.yml) or JSON (.json) file holding a mapping of option: value."""
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise ConfigError(f"TrainingArguments config file {path!r} does not exist")
        with open(path, encoding="utf-8") as f:
            text = f.read()
        ext = os.path.splitext(path)[1].lower()
        if ext in (".yaml", ".yml"):
            import yaml

            try:
                data = yaml.safe_load(text)
            except yaml.YAMLError as e:
                raise ConfigError(f"{path}: cannot parse YAML: {e}") from None
        elif ext == ".json":
            try:
                data = json.loads(text)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}:{e.lineno}: cannot parse JSON: {e.msg}") from None
        else:
            raise ConfigError(f"{path}: config files must end in .yaml, .yml or .json")
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: config must be a mapping of option: value, got {type(data).__name__}")
        try:
            return cls.from_dict(data, strict=strict, **overrides)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"{path}: {e}") from e

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
                    raise ArgumentTypeError(f"TrainingArguments.{f.name} must be a bool, got {v!r}")
            elif kind in (int, float):
                if isinstance(v, bool):
                    raise ArgumentTypeError(f"TrainingArguments.{f.name} must be a number, got {v!r}")
                if isinstance(v, str):
                    try:
                        v = float(v.strip())
                    except ValueError:
                        raise ArgumentTypeError(f"TrainingArguments.{f.name} must be a number, got {v!r}") from None
                if kind is int:
                    if isinstance(v, float):
                        if not v.is_integer():
                            raise ArgumentTypeError(f"TrainingArguments.{f.name} must be an integer, got {v!r}")
                        v = int(v)
                    elif not isinstance(v, int):
                        raise ArgumentTypeError(f"TrainingArguments.{f.name} must be an integer, got {v!r}")
                elif isinstance(v, (int, float)):
                    v = float(v)
                else:
                    raise ArgumentTypeError(f"TrainingArguments.{f.name} must be a number, got {v!r}")
            setattr(self, f.name, v)
        self.gradient_checkpointing = _checkpointing_mode(self.gradient_checkpointing)
        from fastft.nn.fused_blocks import normalise

        self.fused_lora_blocks = normalise(self.fused_lora_blocks, "TrainingArguments.fused_lora_blocks")
        if self.fused_lora_blocks is None:
            self.fused_lora_blocks = "auto"
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
            raise UsageError(f"TrainingArguments.{name}={getattr(self, name)!r}: {why}")

        if not isinstance(self.output_dir, str) or not self.output_dir.strip():
            bad("output_dir", "must be a non-empty path")
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                     "logging_steps"):
            if getattr(self, name) < 1:
                bad(name, "must be >= 1")
        for name in ("eval_steps", "save_steps", "save_total_limit", "max_length", "forgetting_steps", "tiled_mlp"):
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
        if self.distributed_strategy not in (None, "ddp", "fsdp"):
            bad("distributed_strategy", "must be 'ddp', 'fsdp' or None (automatic)")
        if self.ddp_timeout < 1:
            bad("ddp_timeout", "must be >= 1 second")
        r = self.resume_from_checkpoint
        if r is not None and r is not True and not (isinstance(r, str) and r.strip()):
            bad("resume_from_checkpoint", "must be a checkpoint directory, True (latest in output_dir) or None")

    # Steps of linear warmup for a run of `total` optimizer steps.
    def num_warmup_steps(self, total: int) -> int:
        return self.warmup_steps if self.warmup_steps > 0 else math.ceil(self.warmup_ratio * total)


GRADIENT_CHECKPOINTING = ("off", "on", "offload")


def _checkpointing_mode(v):
    """False / True / "offload" from a bool or one of off|on|offload (also true/false/yes/no/1/0)."""
    if isinstance(v, bool):
        return v
    if isinstance(v, str):
        k = v.strip().lower()
        if k in ("on", "true", "1", "yes"):
            return True
        if k in ("off", "false", "0", "no", ""):
            return False
        if k == "offload":
            return "offload"
    raise ValueError(f"TrainingArguments.gradient_checkpointing={v!r}: must be a bool or one of "
                     f"{', '.join(GRADIENT_CHECKPOINTING)}")


def _base_kind(tp: Any):
    """int / float / bool / None for a field annotation (given as a string under __future__ annotations)."""
    s = str(tp)
    if "Union[str, bool]" in s or "Union[bool, str]" in s:
        return None
    for kind in (bool, int, float):
        if s in (kind.__name__, f"Optional[{kind.__name__}]"):
            return kind
    return None
