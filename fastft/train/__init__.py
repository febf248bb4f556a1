"""Training: data loading, collators, TrainingArguments, Trainer, atomic resumable checkpoints.

See trainer.py for the loop's guarantees (token-normalised gradient accumulation, bit-exact resume)
and checkpoint.py for the on-disk layout.
"""
from .args import TrainingArguments
from .collators import DataCollatorForCLM, DataCollatorForMLM, DataCollatorForPacking, default_collator
from .data import IGNORE_INDEX, load_dataset, read_records, train_eval_split
from .trainer import Trainer, TrainResult, lr_lambda, set_seed

__all__ = [
    "TrainingArguments", "Trainer", "TrainResult", "load_dataset", "read_records", "train_eval_split",
    "DataCollatorForCLM", "DataCollatorForPacking", "DataCollatorForMLM", "default_collator", "IGNORE_INDEX",
    "lr_lambda", "set_seed",
]
