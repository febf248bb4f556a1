"""fastft.Trainer: a small, exact training loop for native fastft models, PEFT-wrapped ones and any
module whose ``forward(**batch)`` returns ``.loss`` (the contract in docs/CONTRACTS.md).

Loss normalisation under gradient accumulation. The loss of an optimizer step is the mean over
*all* target tokens of all its micro-batches. The trainer collates the step's micro-batches first,
counts their targets N (CLM: labels[..., 1:] != -100, since the model shifts; MLM: labels != -100)
and passes ``num_items_in_batch=N`` so each micro-batch returns sum(token losses) / N; the summed
gradients are then exactly those of one big batch. Averaging per-micro-batch means instead would
over-weight tokens of short sequences (the bug fixed in transformers 4.46).

Reproducibility. The data order is a pure function of (seed, epoch): a seeded permutation per
epoch, cut into micro-batches, grouped into optimizer steps. The global step is therefore the
whole data position, and a checkpoint (checkpoint.py) with weights, optimizer, scheduler and RNG
states lets ``resume_from_checkpoint`` continue the run bit for bit (CPU, fp32). Evaluation runs
under a forked, fixed-seed RNG so it neither changes training nor varies between evaluations.

Several processes (torchrun; see docs/distributed.md). When a process group with N > 1 ranks is
initialised, the same permutation is cut into *global* micro-batches of N x B examples and rank r
takes the r-th slice of each, so every optimizer step sees exactly the examples of one process with
batch N x B. The target count N is all-reduced and every rank's loss is its own token-loss sum over
that global count; DDP / FSDP average gradients over ranks, so the backward runs on N x loss and the
summed gradient is that of the one big batch (no gradient sync on accumulation micro-steps:
DDP's ``no_sync`` / FSDP2's ``set_requires_gradient_sync``). Metrics are all-reduced; rank 0 alone
writes logs, the plot, checkpoints and the adapter. Checkpoints hold full (unsharded) tensors in
the single-process layout, so a run resumes on any N with the same global batch.
"""
from __future__ import annotations

from .. import validate
from ..errors import ArgumentTypeError, CheckpointError, DataError, NonFiniteError, OutputError, UsageError

import inspect
import json
import math
import os
import random
import shutil
import signal
import threading
import time
import uuid
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from typing import Optional

import numpy as np
import torch

from . import checkpoint as ckpt
from . import distributed as dist_util
from .args import TrainingArguments
from .collators import default_collator
from .data import IGNORE_INDEX

# When neither the collator nor the model names its objective, config.model_type decides: these
# families are masked LMs (unshifted labels), every other model with a config is taken as causal.
# Task collators (fastft.tasks.data) name these: targets are class labels != -100 (classify, ner,
# unshifted) or queries (embed, one per row of input_ids).
TASK_OBJECTIVES = ("classify", "ner", "embed")
_MLM_MODEL_TYPES = {"bert", "roberta", "xlm-roberta", "distilbert", "electra", "albert", "deberta", "deberta-v2",
                    "camembert", "mpnet", "modernbert"}


def set_seed(seed: int):
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def lr_lambda(step: int, *, kind: str, warmup: int, total: int) -> float:
    """Multiplier of the peak learning rate for optimizer step ``step`` (0-based), as in HF."""
    if kind != "constant" and step < warmup:
        return step / max(1, warmup)
    if kind in ("constant", "constant_with_warmup"):
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    if kind == "cosine":
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))
    raise UsageError(f"unknown lr_scheduler_type {kind!r}")


@dataclass
class TrainResult:
    global_step: int
    final_loss: float  # loss of the last optimizer step
    train_loss: float  # mean step loss over the whole run
    metrics_path: str
    output_dir: str
    plot_path: Optional[str] = None
    eval_loss: Optional[float] = None
    eval_perplexity: Optional[float] = None
    train_runtime: float = 0.0
    forgetting: Optional[dict] = None  # the forgetting report (TrainingArguments.forgetting_report)
    forgetting_table: Optional[str] = None
    losses: list = field(default_factory=list)  # per optimizer step, from step 1

    def __getitem__(self, k):
        return getattr(self, k)

    def to_dict(self) -> dict:
        return asdict(self)


def _device_of(model) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _accepts_kwarg(fn, name) -> bool:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return True
    return any(p.name == name or p.kind == inspect.Parameter.VAR_KEYWORD for p in params)


class Trainer:
    def __init__(self, model, train_dataset, args: Optional[TrainingArguments] = None, eval_dataset=None,
                 data_collator=None, tokenizer=None, task_eval=None, task_metric: Optional[str] = None,
                 forgetting_base_path: Optional[str] = None):
        """``task_eval(model) -> dict`` (optional) computes task metrics; the forgetting report puts
        ``task_metric`` of it before and after training beside the reference metric.
        ``forgetting_base_path``: the base checkpoint, whose MLM head scores a BERT task model
        (default: the directory fastft.from_pretrained loaded the model from)."""
        # Everything that can be wrong is checked here, before output_dir is created.
        self.args = args if args is not None else TrainingArguments()
        if not isinstance(self.args, TrainingArguments):
            raise ArgumentTypeError(f"args must be a fastft TrainingArguments, got {type(self.args).__name__}")
        a = self.args
        self.model = model
        self.tokenizer = tokenizer
        self.train_dataset = self._check_dataset(train_dataset, "train_dataset")
        self.eval_dataset = self._check_dataset(eval_dataset, "eval_dataset") if eval_dataset is not None else None
        self.data_collator = data_collator if data_collator is not None else self._default_collator()
        if not callable(self.data_collator):
            raise ArgumentTypeError("data_collator must be callable")
        self.objective = self._objective()
        self._check_targets(self.train_dataset, "train_dataset")
        if os.path.exists(a.output_dir) and not os.path.isdir(a.output_dir):
            raise OutputError(f"output_dir {a.output_dir} exists and is not a directory")
        validate._probe_writable(a.output_dir)
        self.trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not self.trainable:
            raise UsageError("the model has no trainable parameters (requires_grad=False everywhere)")
        self.device = _device_of(model)
        # Distributed: an initialised process group with more than one rank (torchrun).
        self.rank, self.world_size = dist_util.rank(), dist_util.world_size()
        self.is_main = self.rank == 0
        self.strategy = None
        if self.world_size > 1:
            self.strategy = a.distributed_strategy or dist_util.default_strategy(model)
        self._wrapped = model  # what forward() is called on: the DDP wrapper under DDP
        self._dist_ready = False
        if a.bf16 and self.device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise UsageError("bf16=True but this GPU does not support bfloat16")
        if a.gradient_checkpointing and not hasattr(model, "gradient_checkpointing_enable"):
            raise UsageError("gradient_checkpointing=True but the model has no gradient_checkpointing_enable()")
        if a.offload_embeddings:
            if self.world_size > 1:
                raise UsageError("offload_embeddings is not supported with several processes (DDP / FSDP)")
            from fastft.nn.offload import offload_frozen_to_host

            offload_frozen_to_host(model)  # refuses (UsageError, nothing changed) trainable / non-plain tables
        if a.lean_cpu_allocator and self.device.type == "cpu":
            from fastft.train.allocator import lean_cpu_allocator

            if not lean_cpu_allocator():
                warnings.warn("lean_cpu_allocator: this process's malloc is not glibc's; the allocator is unchanged",
                              stacklevel=2)
        if a.tiled_mlp is not None and not any(hasattr(type(m), "tile_tokens") for m in model.modules()):
            raise UsageError("tiled_mlp is set but the model has no tiled MLP (native fastft Llama-family models have one)")
        self._pass_num_items = _accepts_kwarg(model.forward, "num_items_in_batch")
        if self.objective in TASK_OBJECTIVES and not getattr(model, "fastft_task", False):
            # transformers' task heads take **kwargs but average their loss over their own batch:
            # rescale that mean instead (compute_loss).
            self._pass_num_items = False
        n_micro = self._micro_batches_per_epoch()
        if n_micro == 0:
            raise DataError(f"train_dataset has {len(self.train_dataset)} examples, fewer than one batch of "
                             f"{a.per_device_train_batch_size} with dataloader_drop_last=True")
        self.steps_per_epoch = math.ceil(n_micro / a.gradient_accumulation_steps)
        self.total_steps = a.max_steps if a.max_steps > 0 else max(1, math.ceil(a.num_train_epochs * self.steps_per_epoch))
        self.resume_dir = self._resolve_resume()
        self.metrics_path = os.path.join(a.output_dir, "metrics.jsonl")
        self.task_eval, self.task_metric, self.forgetting_base_path = task_eval, task_metric, forgetting_base_path
        if task_eval is not None and not callable(task_eval):
            raise TypeError("task_eval must be callable (model -> dict of metrics)")
        self.forgetting = bool(a.forgetting_report or a.forgetting_steps)
        if self.forgetting and tokenizer is None:
            raise ValueError("forgetting_report / forgetting_steps need the tokenizer (Trainer(tokenizer=...))")
        self.optimizer = None
        self.scheduler = None
        self.global_step = 0
        self._groups_cache: dict[int, list] = {}
        self.run_id: Optional[str] = None
        self._stop_requested = False
        self._anomaly: Optional[str] = None
        self._last_grad_norm: Optional[float] = None  # the latest read gradient norm (logged)

    # --- setup helpers ----------------------------------------------------------------------------
    @staticmethod
    def _check_dataset(ds, name):
        try:
            n = len(ds)
        except TypeError:
            raise ArgumentTypeError(f"{name} must be a sized sequence of examples (e.g. a list of dicts)") from None
        if n == 0:
            raise DataError(f"{name} is empty")
        for i in range(n):
            ex = ds[i]
            if not isinstance(ex, dict) or "input_ids" not in ex or len(ex["input_ids"]) == 0:
                raise DataError(f"{name}[{i}] must be a dict with a non-empty 'input_ids'")
        return ds

    def _check_targets(self, ds, name):
        """A dataset whose every label is ignore_index would train at loss 0: an error, not a run."""
        if "labels" not in ds[0]:
            return
        skip = 1 if self.objective == "clm" else 0
        for i in range(len(ds)):
            labels = ds[i].get("labels")
            if labels is not None and not isinstance(labels, (list, tuple, torch.Tensor)):
                labels = [labels]  # a class label (sequence classification)
            elif labels is not None and isinstance(labels, torch.Tensor) and labels.dim() == 0:
                labels = labels.reshape(1)
            if labels is None or any(int(x) != IGNORE_INDEX for x in list(labels)[skip:]):
                return
        raise DataError(f"{name}: no example has a target token (every label is {IGNORE_INDEX}, e.g. prompts "
                        "without completions, or max_length cutting every completion); training would run at loss 0")

    def _default_collator(self):
        a = self.args
        has_labels = "labels" in self.train_dataset[0]
        # The model family decides; for an unknown model, examples without labels mean MLM.
        objective = self._model_objective() or ("clm" if has_labels else "mlm")
        if objective == "mlm" and self.tokenizer is None:
            raise UsageError("examples without labels need the mlm collator, which needs a tokenizer: "
                             "pass tokenizer= or data_collator=")
        return default_collator(self.tokenizer, objective=objective, packing=a.packing, max_length=a.max_length)

    def _model_objective(self):
        obj = getattr(self.model, "objective", None)
        if obj is None:
            model_type = getattr(getattr(self.model, "config", None), "model_type", None)
            if model_type:
                obj = "mlm" if model_type in _MLM_MODEL_TYPES else "clm"
        return obj

    def _objective(self):
        obj = getattr(self.data_collator, "objective", None) or self._model_objective() or "clm"
        if obj not in ("clm", "mlm") + TASK_OBJECTIVES:
            raise UsageError(f"unknown objective {obj!r}")
        return obj

    def _micro_batches_per_epoch(self):
        n, b = len(self.train_dataset), self.args.per_device_train_batch_size * self.world_size
        return n // b if self.args.dataloader_drop_last else math.ceil(n / b)

    def _resolve_resume(self, r=None):
        r = self.args.resume_from_checkpoint if r is None else r
        if r is None or r is False:
            return None
        if r is True:
            path = ckpt.latest_checkpoint(self.args.output_dir)
            if path is None:
                raise CheckpointError(f"resume_from_checkpoint=True but {self.args.output_dir} holds no checkpoint")
            marker = read_run_marker(self.args.output_dir)
            got = ckpt.read_trainer_state(path).get("run_id")
            if marker and got and marker.get("run_id") != got:
                raise CheckpointError(f"{path}: belongs to run {got}, but {self.args.output_dir} holds run "
                                      f"{marker.get('run_id')}; refusing to resume from another run's checkpoint")
        else:
            path = r
            if not os.path.isdir(path):
                raise CheckpointError(f"resume_from_checkpoint: {path} is not a directory")
        state = ckpt.read_trainer_state(path)
        # The data position only means something for the same data order.
        want = self._run_identity()
        got = dict(state.get("run", {}))
        if "global_micro_batch_size" not in got and "per_device_train_batch_size" in got:
            got["global_micro_batch_size"] = got["per_device_train_batch_size"]  # single-process checkpoints
        label = {"global_micro_batch_size": "global_micro_batch_size (per_device_train_batch_size x ranks)"}
        diff = [f"{label.get(k, k)}: checkpoint {got.get(k)!r} vs now {v!r}" for k, v in want.items() if got.get(k) != v]
        if diff:
            raise CheckpointError(f"{path}: cannot resume a different run ({'; '.join(diff)})")
        if state["global_step"] > self.total_steps:
            raise CheckpointError(f"{path}: checkpoint is at step {state['global_step']}, past this run's "
                             f"{self.total_steps} steps")
        return path

    def _run_identity(self):
        a = self.args
        # The global micro-batch (ranks x per-device batch) fixes the data order, not how it is split.
        return {"train_dataset_size": len(self.train_dataset),
                "global_micro_batch_size": a.per_device_train_batch_size * self.world_size,
                "gradient_accumulation_steps": a.gradient_accumulation_steps, "seed": a.seed,
                "dataloader_drop_last": a.dataloader_drop_last, "trainable_params": len(self.trainable)}

    # --- output directory ownership ---------------------------------------------------------------
    def _claim_output_dir(self, state: Optional[dict]):
        """Fresh run: refuse another run's outputs (or remove them with overwrite_output_dir), then
        write a new run id. Resume: keep the checkpoint's run id (refusing a mismatching directory).
        Rank 0 alone owns output_dir in a distributed run (the others wait for it at a barrier)."""
        a = self.args
        if not self.is_main:
            self.run_id = (state or {}).get("run_id")
            return
        if state is None:
            found = validate.run_artifacts(a.output_dir)
            if found and not a.overwrite_output_dir:
                validate.check_output_dir(a.output_dir)  # raises, naming what it found
            if found:
                for name in found:
                    p = os.path.join(a.output_dir, name)
                    if name.startswith(ckpt.PREFIX) and os.path.isdir(p):
                        shutil.rmtree(p)
                    elif name in ("metrics.jsonl", validate.RUN_MARKER):
                        os.remove(p)
            self.run_id = uuid.uuid4().hex
        else:
            marker = read_run_marker(a.output_dir)
            self.run_id = state.get("run_id") or (marker or {}).get("run_id") or uuid.uuid4().hex
            if marker and marker.get("run_id") != self.run_id:
                raise CheckpointError(f"{self.resume_dir}: belongs to run {self.run_id}, but {a.output_dir} holds "
                                      f"run {marker.get('run_id')}; use a fresh output_dir to branch from it")
        write_run_marker(a.output_dir, {"run_id": self.run_id, "run": self._run_identity()})

    # --- interrupts, anomalies ---------------------------------------------------------------------
    @contextmanager
    def _sigint_saves(self):
        """While training, the first Ctrl-C asks for a clean stop at the end of the current step (a
        checkpoint is saved there); a second one interrupts at once."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum, frame):
            if self._stop_requested:
                raise KeyboardInterrupt("interrupted twice: stopped without saving")
            self._stop_requested = True

        old = signal.signal(signal.SIGINT, handler)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, old)

    @contextmanager
    def _anomaly_hooks(self):
        if not self.args.detect_anomaly:
            yield
            return

        def hook(name):
            def fn(module, inputs, output):
                if self._anomaly is not None:
                    return
                outs = output if isinstance(output, (tuple, list)) else (getattr(output, "logits", output),)
                for o in outs:
                    if isinstance(o, torch.Tensor) and o.is_floating_point() and not bool(torch.isfinite(o).all()):
                        self._anomaly = name or type(module).__name__
                        return
            return fn

        handles = [m.register_forward_hook(hook(n)) for n, m in self.model.named_modules() if n]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def _stop_nonfinite(self, what, value, step, idx):
        examples = sorted(i for batch in idx for i in batch)
        where = f"; first non-finite module output: {self._anomaly}" if self._anomaly else (
            "; rerun with detect_anomaly=True (--detect-anomaly) to name the first module with a non-finite output"
            if not self.args.detect_anomaly else "")
        last = ckpt.latest_checkpoint(self.args.output_dir)
        kept = f"; the last good checkpoint is {last}" if last else "; no checkpoint was saved yet"
        raise NonFiniteError(f"{what} became {value} at step {step + 1} (examples {examples[:16]}"
                             f"{'...' if len(examples) > 16 else ''}){where}{kept}; stopping (try a lower "
                             "learning_rate or max_grad_norm)")

    def create_optimizer(self):
        a = self.args
        # No weight decay on biases and norm weights (the 1-D parameters), as in GPT-2/HF practice.
        decay = [p for _, p in self.trainable if p.ndim >= 2]
        no_decay = [p for _, p in self.trainable if p.ndim < 2]
        groups = [g for g in ({"params": decay, "weight_decay": a.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
        self.optimizer = torch.optim.AdamW(groups, lr=a.learning_rate, betas=(a.adam_beta1, a.adam_beta2),
                                           eps=a.adam_epsilon)
        warmup = a.num_warmup_steps(self.total_steps)

        def fn(step, kind=a.lr_scheduler_type, warmup=warmup, total=self.total_steps):
            return lr_lambda(step, kind=kind, warmup=warmup, total=total)

        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, fn)
        return self.optimizer, self.scheduler

    # --- data order -------------------------------------------------------------------------------
    def _step_groups(self, epoch):
        if epoch not in self._groups_cache:
            a = self.args
            n, b = len(self.train_dataset), a.per_device_train_batch_size * self.world_size
            g = torch.Generator().manual_seed(a.seed * 1_000_003 + epoch)
            perm = torch.randperm(n, generator=g).tolist()
            batches = [perm[i : i + b] for i in range(0, n, b)]
            if a.dataloader_drop_last and len(batches[-1]) < b:
                batches.pop()
            if self.world_size > 1:
                batches = [self._rank_slice(gb) for gb in batches]
            ga = a.gradient_accumulation_steps
            self._groups_cache = {epoch: [batches[i : i + ga] for i in range(0, len(batches), ga)]}
        return self._groups_cache[epoch]

    def _rank_slice(self, global_batch):
        """This rank's contiguous share of a global micro-batch: B examples each when it is full; a
        short last batch is split as evenly as possible (a rank may get none: see _collate)."""
        n, w, r = len(global_batch), self.world_size, self.rank
        lo = r * (n // w) + min(r, n % w)
        return global_batch[lo : lo + n // w + (1 if r < n % w else 0)]

    def _collate(self, idx):
        if idx:
            return self.data_collator([self.train_dataset[i] for i in idx])
        # A rank without examples in a short last micro-batch still runs forward/backward (every
        # rank must join the gradient reduction): one example with every label ignored adds 0.
        batch = self.data_collator([self.train_dataset[0]])
        batch["labels"] = torch.full_like(batch["labels"], IGNORE_INDEX)
        return batch

    def _step_batches(self, step):
        """Index lists of the micro-batches of optimizer step ``step`` (0-based)."""
        epoch, k = divmod(step, self.steps_per_epoch)
        return self._step_groups(epoch)[k]

    # --- one step ---------------------------------------------------------------------------------
    def count_targets(self, batch) -> int:
        if self.objective == "embed":
            return int(batch["input_ids"].shape[0])
        labels = batch["labels"]
        if self.objective == "clm":
            labels = labels[..., 1:]
        return int((labels != IGNORE_INDEX).sum())

    @staticmethod
    def _input_tokens(batch) -> int:
        mask = batch.get("attention_mask")
        return int(mask.sum()) if mask is not None else batch["input_ids"].numel()

    def _to_device(self, batch):
        return {k: (v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}

    def _autocast(self):
        if not self.args.bf16:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)

    def compute_loss(self, batch, num_items: int, batch_targets: Optional[int] = None):
        """sum of this batch's token losses / num_items. ``batch_targets``: the batch's target count
        when the caller counted it on the host (else it is counted here)."""
        with self._autocast():
            if self._pass_num_items:
                return self._wrapped(**batch, num_items_in_batch=num_items).loss.float()
            # A model without num_items_in_batch averages over its own targets: rescale that mean.
            loss = self._wrapped(**batch).loss.float()
        n = self.count_targets(batch) if batch_targets is None else batch_targets
        return loss * (n / num_items)

    def training_step(self, micro_batches: list, num_items: int) -> torch.Tensor:
        """Forward+backward every micro-batch of one optimizer step; returns the step's mean loss as a
        device tensor. Nothing in it reads a device value on the host (counts come from the host batch)."""
        total = torch.zeros((), dtype=torch.float32, device=self.device)
        for i, batch in enumerate(micro_batches):
            n = None if self._pass_num_items else self.count_targets(batch)  # on the host batch
            with self._grad_sync(i == len(micro_batches) - 1):
                loss = self.compute_loss(self._to_device(batch), num_items, n)
                # DDP/FSDP average the ranks' gradients; each rank's loss is already over the global
                # target count, so scale by N to get their sum (N is a power of two in practice: exact).
                (loss * self.world_size if self.world_size > 1 else loss).backward()
            total += loss.detach()
        if self.world_size > 1:
            torch.distributed.all_reduce(total)
        return total

    def _grad_sync(self, last: bool):
        """No gradient reduction on accumulation micro-steps, only on the last one."""
        if self.strategy == "ddp" and not last:
            return self._wrapped.no_sync()
        if self.strategy == "fsdp":
            self.model.set_requires_gradient_sync(last)
        return nullcontext()

    def _grad_norm_and_clip(self) -> torch.Tensor:
        """The total gradient norm (clipped to max_grad_norm when set), as a device tensor: clipping
        scales on the device, nothing is read on the host (FSDP: the norm over every rank's shards)."""
        params = [p for _, p in self.trainable if p.grad is not None]
        if not params:
            return torch.zeros((), device=self.device)
        mgn = self.args.max_grad_norm
        if mgn:
            norm = torch.nn.utils.clip_grad_norm_(params, mgn)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        return dist_util.full_tensor(norm)

    def _check_pending(self, pending: list, losses: list, window: list) -> None:
        """Read the pending steps' losses and gradient norms in one transfer, stop on the first
        non-finite one (naming its step and examples), and add them to ``losses`` / ``window``."""
        if not pending:
            return
        vals = torch.stack([torch.stack([loss.float().reshape(()), gn.float().reshape(()).to(loss.device)])
                            for _, loss, gn, _ in pending]).tolist()
        steps = [(st, idx) for st, _, _, idx in pending]
        pending.clear()
        for (st, idx), (loss, gn) in zip(steps, vals):
            if not math.isfinite(loss) or self._anomaly is not None:
                self._stop_nonfinite("loss", loss, st, idx)
            if not math.isfinite(gn):
                self._stop_nonfinite("the gradient norm", gn, st, idx)
            losses.append(loss)
            window[0] += loss
            window[1] += 1
            self._last_grad_norm = gn

    # --- metrics ----------------------------------------------------------------------------------
    def _log(self, row: dict):
        if not self.is_main:
            return
        with open(self.metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")

    def _truncate_metrics(self, upto_step: Optional[int]):
        """Fresh run: empty the file. Resume: keep rows up to the checkpoint's step."""
        if not self.is_main:
            return
        keep = []
        if upto_step is not None and os.path.isfile(self.metrics_path):
            with open(self.metrics_path, encoding="utf-8") as f:
                for line in f:
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError:
                        continue  # a line torn by the crash we are resuming from
                    if row.get("step", 0) <= upto_step:
                        keep.append(line if line.endswith("\n") else line + "\n")
        tmp = self.metrics_path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(keep)
        os.replace(tmp, self.metrics_path)

    # --- evaluation -------------------------------------------------------------------------------
    @contextmanager
    def _eval_rng(self):
        coll_gen = getattr(self.data_collator, "generator", None)
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.args.seed)
            if coll_gen is not None:
                self.data_collator.generator = torch.Generator().manual_seed(self.args.seed)
            try:
                yield
            finally:
                if coll_gen is not None:
                    self.data_collator.generator = coll_gen

    def evaluate(self, eval_dataset=None) -> dict:
        """Token-weighted mean loss over the eval set and perplexity = exp(loss)."""
        ds = self._check_dataset(eval_dataset, "eval_dataset") if eval_dataset is not None else self.eval_dataset
        if ds is None:
            raise UsageError("evaluate() needs an eval_dataset (none was given to the Trainer)")
        if self.world_size > 1:
            from fastft.nn.sharded_quant_linear import pending_layers

            if pending_layers(self.model):  # called before train(): quantize (per rank) and wrap now
                self._setup_distributed()
        bs = self.args.per_device_eval_batch_size
        was_training = self.model.training
        self.model.eval()
        total, count = 0.0, 0
        try:
            with self._eval_rng(), torch.no_grad():
                for i in range(0, len(ds), bs):
                    batch = self.data_collator([ds[j] for j in range(i, min(i + bs, len(ds)))])
                    n = self.count_targets(batch)
                    if n == 0:
                        continue
                    total += float(self.compute_loss(self._to_device(batch), n)) * n
                    count += n
        finally:
            self.model.train(was_training)
        if count == 0:
            raise DataError("eval_dataset has no target tokens")
        loss = total / count
        ppl = math.exp(loss) if loss < 700 else float("inf")
        return {"eval_loss": loss, "eval_perplexity": ppl, "eval_tokens": count}

    # --- the loop ---------------------------------------------------------------------------------
    def train(self, resume_from_checkpoint=None) -> TrainResult:
        """Run the loop; ``resume_from_checkpoint`` (a directory, or True for the newest in
        output_dir) overrides the argument of the same name, as in transformers."""
        from tqdm.auto import tqdm

        a = self.args
        if resume_from_checkpoint is not None:
            self.resume_dir = self._resolve_resume(resume_from_checkpoint)
        t0 = time.time()
        os.makedirs(a.output_dir, exist_ok=True)
        if self.is_main:
            ckpt.remove_stale_tmp(a.output_dir)
        set_seed(a.seed)
        if a.gradient_checkpointing == "offload":
            self.model.gradient_checkpointing_enable(offload=True)
        elif a.gradient_checkpointing:
            self.model.gradient_checkpointing_enable()
        if a.tiled_mlp is not None:
            for m in self.model.modules():
                if hasattr(type(m), "tile_tokens"):
                    m.tile_tokens = a.tiled_mlp or None
        if a.fused_lora_blocks != "auto":
            # explicit True / False: the native layers' switch ("auto" leaves FASTFT_FUSED_LORA to decide)
            for m in self.model.modules():
                if hasattr(type(m), "fused_lora_blocks"):
                    m.fused_lora_blocks = a.fused_lora_blocks
        self.model.train()
        self._setup_distributed()
        self.create_optimizer()
        losses: list[float] = []
        window = [0.0, 0]  # loss sum and step count since the last log row
        start = 0
        if self.resume_dir is not None:
            state = ckpt.load_checkpoint(self.resume_dir, model=self.model, optimizer=self.optimizer,
                                         scheduler=self.scheduler, collator=self.data_collator)
            start, losses, window = state["global_step"], list(state["losses"]), list(state["log_window"])
            self._claim_output_dir(state)
            self._truncate_metrics(start)
        else:
            self._claim_output_dir(None)
            self._truncate_metrics(None)
        dist_util.barrier()  # rank 0 has claimed output_dir (a refusal there stops the job)
        self.global_step = start
        eval_metrics = None
        probe = base_ref = task_base = None
        if self.forgetting:
            probe, base_ref, task_base = self._forgetting_start(start)
        self.optimizer.zero_grad(set_to_none=True)
        seen_tokens, t_window = 0, time.perf_counter()  # input tokens (pads excluded) for throughput
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        bar = tqdm(total=self.total_steps, initial=start, desc="train", disable=a.disable_tqdm or not self.is_main,
                   dynamic_ncols=True)
        self._stop_requested, self._anomaly = False, None
        last_saved = start if self.resume_dir is not None else None
        # The step's loss and gradient norm stay on the device until the loop logs, evaluates or saves
        # (one transfer then), so a GPU step never waits for the host. On the CPU reading them costs
        # nothing, so they are checked before the update: a non-finite gradient is never applied.
        eager = self.device.type == "cpu"
        pending = []  # (step index, loss, grad norm, example indices), read at the next log / eval / save
        try:
            with self._sigint_saves(), self._anomaly_hooks():
                for step in range(start, self.total_steps):
                    idx = self._step_batches(step)
                    micro = [self._collate(b) for b in idx]
                    num_items = sum(self.count_targets(b) for b in micro)
                    n_input = sum(self._input_tokens(b) for b in micro)
                    if self.world_size > 1:  # the step's global target count normalises every rank's loss
                        num_items, n_input = (int(v) for v in dist_util.all_reduce_sum([num_items, n_input],
                                                                                        self.device))
                    lr = self.scheduler.get_last_lr()[0]
                    loss_t = self.training_step(micro, max(1, num_items)).detach()
                    grad_norm_t = self._grad_norm_and_clip().detach()
                    pending.append((step, loss_t, grad_norm_t, idx))
                    if eager or self._anomaly is not None:
                        self._check_pending(pending, losses, window)
                    self.optimizer.step()
                    self.scheduler.step()
                    self.optimizer.zero_grad(set_to_none=True)
                    self.global_step = gs = step + 1
                    seen_tokens += n_input
                    bar.update(1)
                    log_now = gs % a.logging_steps == 0 or gs == self.total_steps
                    eval_now = self.eval_dataset is not None and a.eval_steps and gs % a.eval_steps == 0
                    save_now = a.save_steps and gs % a.save_steps == 0
                    if log_now or eval_now or save_now or self._stop_requested:
                        self._check_pending(pending, losses, window)
                        bar.set_postfix(loss=f"{losses[-1]:.4f}", lr=f"{lr:.2e}")
                    if log_now:
                        now = time.perf_counter()
                        row = {"step": gs, "epoch": round(gs / self.steps_per_epoch, 4), "loss": window[0] / window[1],
                               "learning_rate": lr, "grad_norm": self._last_grad_norm, "num_target_tokens": num_items,
                               # Wall-clock figures: the only fields that differ between identical runs.
                               "tokens_per_second": seen_tokens / max(now - t_window, 1e-9)}
                        if self.device.type == "cuda":
                            row["peak_memory_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
                        self._log(row)
                        window[:] = [0.0, 0]
                        seen_tokens, t_window = 0, now
                    pause = time.perf_counter()
                    if eval_now:
                        eval_metrics = self.evaluate()
                        self._log({"step": gs, **eval_metrics})
                    if probe is not None and a.forgetting_steps and gs % a.forgetting_steps == 0:
                        with self._eval_rng():
                            self._log({"step": gs, "forgetting": probe.measure(self.model)})
                    if save_now:
                        self.save_checkpoint(losses, window)
                        last_saved = gs
                    t_window += time.perf_counter() - pause  # throughput counts training time only
                    if self._stop_requested:
                        path = self.save_checkpoint(losses, window) if last_saved != gs else os.path.join(
                            a.output_dir, f"{ckpt.PREFIX}{gs}")
                        raise TrainingInterrupted(
                            f"interrupted at step {gs}/{self.total_steps}; resumable checkpoint saved to {path}; to "
                            "resume, rerun the same command with --resume-from-checkpoint latest (Python: "
                            "trainer.train(resume_from_checkpoint=True))", path)
        finally:
            bar.close()
        if self.eval_dataset is not None and not (a.eval_steps and self.global_step % a.eval_steps == 0):
            eval_metrics = self.evaluate()
            self._log({"step": self.global_step, **eval_metrics})
        forgetting = table = None
        if probe is not None:
            forgetting, table = self._forgetting_end(probe, base_ref, task_base)
        plot_path = None
        if a.plot_loss and self.is_main:
            from .plot import plot_loss_curve

            plot_path = plot_loss_curve(self.metrics_path, os.path.join(a.output_dir, "loss.png"), step_losses=losses)
        if a.save_final_model:
            self.save_model(a.output_dir)
        dist_util.barrier()  # every rank returns once rank 0 has written everything
        return TrainResult(
            global_step=self.global_step, final_loss=losses[-1] if losses else float("nan"),
            train_loss=sum(losses) / len(losses) if losses else float("nan"), metrics_path=self.metrics_path,
            output_dir=a.output_dir, plot_path=plot_path,
            eval_loss=eval_metrics["eval_loss"] if eval_metrics else None,
            eval_perplexity=eval_metrics["eval_perplexity"] if eval_metrics else None,
            train_runtime=time.time() - t0, losses=losses, forgetting=forgetting, forgetting_table=table,
        )

    # --- forgetting report ----------------------------------------------------------------------
    def _forgetting_start(self, start: int):
        """Prepare the probe and measure the base model (a resumed run reads the base row back)."""
        from fastft.tasks.forgetting import ForgettingProbe

        a = self.args
        with self._eval_rng():
            probe = ForgettingProbe.build(self.model, self.tokenizer, docs=a.forgetting_docs,
                                          max_length=a.forgetting_max_length, seed=a.seed,
                                          batch_size=a.per_device_eval_batch_size,
                                          base_path=self.forgetting_base_path)
            if start > 0 and os.path.isfile(self.metrics_path):
                with open(self.metrics_path, encoding="utf-8") as f:
                    for line in f:
                        row = json.loads(line)
                        if row.get("step") == 0 and "forgetting_base" in row:
                            return probe, row["forgetting_base"], row.get("task_base")
            base = probe.measure(self.model)
            if start > 0:
                base["note"] = f"measured at resume (step {start}), not before training"
            task_base = self.task_eval(self.model) if self.task_eval is not None else None
        self._log({"step": 0, "forgetting_base": base, "task_base": task_base})
        return probe, base, task_base

    def _forgetting_end(self, probe, base, task_base):
        from fastft.tasks.forgetting import report

        with self._eval_rng():
            tuned = probe.measure(self.model)
            task_tuned = self.task_eval(self.model) if self.task_eval is not None else None
        rep, table = report(base, tuned, task_base, task_tuned, self.task_metric)
        self._log({"step": self.global_step, "forgetting_report": rep, "task": task_tuned})
        with open(os.path.join(self.args.output_dir, "forgetting.md"), "w", encoding="utf-8") as f:
            f.write(table + "\n")
        return rep, table

    # --- saving -----------------------------------------------------------------------------------
    def save_checkpoint(self, losses, window) -> str:
        state = {"global_step": self.global_step, "total_steps": self.total_steps, "losses": list(losses),
                 "run_id": self.run_id,
                 "log_window": list(window), "run": self._run_identity(), "args": _jsonable(self.args.to_dict())}
        path = os.path.join(self.args.output_dir, f"{ckpt.PREFIX}{self.global_step}")
        if self.strategy == "fsdp":
            # Every rank joins the all-gathers of the shards; rank 0 writes the full tensors.
            full = {"params": {n: dist_util.full_tensor(p).detach().cpu() for n, p in self.trainable},
                    "optimizer_state": ckpt.optimizer_state_full(self.optimizer, dist_util.full_tensor),
                    "adapter_tensors": self._full_adapter_tensors()}
        else:
            full = {}
        if self.is_main:
            ckpt.save_checkpoint(path, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler,
                                 trainer_state=state, collator=self.data_collator, **full)
            ckpt.rotate_checkpoints(self.args.output_dir, self.args.save_total_limit)
        dist_util.barrier()
        return path

    def _full_adapter_tensors(self):
        if not ckpt._is_peft(self.model) or not hasattr(self.model, "adapter_config"):
            return None
        from fastft.peft_io import adapter_state_dict

        return {k: dist_util.full_tensor(v).detach().cpu() for k, v in adapter_state_dict(self.model).items()}

    def _setup_distributed(self):
        """Wrap the model for the strategy, once: DDP around it, or FSDP2 shards in place."""
        if self.world_size == 1 or self._dist_ready:
            return
        if self.strategy == "ddp":
            from torch.nn.parallel import DistributedDataParallel as DDP

            from fastft.nn.sharded_quant_linear import materialize_pending

            materialize_pending(self.model)  # NF4 layers left for per-rank quantization: whole, as DDP replicates

            ids = [self.device.index] if self.device.type == "cuda" else None
            self._wrapped = DDP(self.model, device_ids=ids)
        else:
            dist_util.setup_fsdp(self.model, param_dtype=torch.bfloat16 if self.args.bf16 else None)
            # fully_shard replaced the parameters by sharded DTensors (same names).
            self.trainable = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        self._dist_ready = True

    def save_model(self, output_dir: str):
        """model.save_pretrained(output_dir) when the model has it, else its trainable params.
        Distributed: rank 0 writes (under FSDP from the gathered full tensors)."""
        if self.strategy == "fsdp":
            adapter = self._full_adapter_tensors()
            params = None if adapter is not None else {n: dist_util.full_tensor(p).detach().cpu()
                                                       for n, p in self.trainable}
            if self.is_main:
                from safetensors.torch import save_file

                if adapter is not None:
                    from fastft.peft_io import save_adapter

                    save_adapter(self.model, output_dir, tensors=adapter)
                elif hasattr(self.model, "peft_config") and hasattr(self.model, "save_pretrained"):
                    # a peft.PeftModel: it saves the given (gathered) state dict in its own format
                    self.model.save_pretrained(output_dir, state_dict=params)
                else:
                    os.makedirs(output_dir, exist_ok=True)
                    save_file(params, os.path.join(output_dir, "model.safetensors"))
            return
        if not self.is_main:
            return
        if hasattr(self.model, "save_pretrained"):
            self.model.save_pretrained(output_dir)
        else:
            from safetensors.torch import save_file

            os.makedirs(output_dir, exist_ok=True)
            save_file(ckpt.trainable_state(self.model), os.path.join(output_dir, "model.safetensors"))


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during ``train()``: raised after the resumable checkpoint ``checkpoint_dir`` was saved."""

    def __init__(self, message, checkpoint_dir=None):
        super().__init__(message)
        self.checkpoint_dir = checkpoint_dir


def read_run_marker(output_dir) -> Optional[dict]:
    path = os.path.join(output_dir, validate.RUN_MARKER)
    if not os.path.isfile(path):
        return None
    return validate.json_object(path, CheckpointError, "run marker (corrupt: remove it or use --overwrite)")


def write_run_marker(output_dir, d: dict):
    path = os.path.join(output_dir, validate.RUN_MARKER)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(d, f)
    os.replace(tmp, path)


def _jsonable(d):
    return {k: v for k, v in d.items() if isinstance(v, (int, float, str, bool, type(None)))}
