"""`fastft demo` / `make demo`: QLoRA-tune SmolLM2-135M-Instruct on a shipped intent task.

The task (fastft/data/intents_*.jsonl, made by ``fastft.data.make_intents``) maps a request to one
of eight snake_case intent labels; the held-out split uses unseen templates and slot values. The
demo measures greedy exact match on the held-out split before and after training, so the number
that moves is the model's, not a loss on its own training data.
"""
from __future__ import annotations

import json
import os
import time

import torch

DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")


def _read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


@torch.no_grad()
def exact_match(model, tokenizer, data, max_new_tokens=6, batch_size=16):
    """Share of {prompt, completion} rows whose greedy continuation (first line, stripped) equals
    the completion (stripped). Prompts are left-padded and generated in batches."""
    rows = _read_jsonl(data) if isinstance(data, str) else list(data)
    was_training = model.training
    model.eval()
    hits = 0
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    for i in range(0, len(rows), batch_size):
        chunk = rows[i : i + batch_size]
        enc = [tokenizer(r["prompt"], add_special_tokens=False).input_ids for r in chunk]
        T = max(len(e) for e in enc)
        ids = torch.full((len(enc), T), pad, dtype=torch.long)
        mask = torch.zeros((len(enc), T), dtype=torch.long)
        for j, e in enumerate(enc):  # left padding so every prompt ends at the last column
            ids[j, T - len(e):] = torch.tensor(e)
            mask[j, T - len(e):] = 1
        out = model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=pad)
        for j, r in enumerate(chunk):
            text = tokenizer.decode(out[j, T:], skip_special_tokens=True)
            hits += text.strip().split("\n")[0].strip() == r["completion"].strip()
    model.train(was_training)
    return hits / max(len(rows), 1)


def run_demo(output_dir="outputs/demo", max_steps=None, quick=False):
    import fastft
    from fastft.models.convert import smollm2_path
    from fastft.train import TrainingArguments, default_collator, load_dataset
    from transformers import AutoTokenizer

    t0 = time.time()
    torch.manual_seed(0)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    print("fastft demo: QLoRA (NF4 + double quant, LoRA r=16 on all linear layers) on SmolLM2-135M-Instruct")
    path = smollm2_path()
    tok = AutoTokenizer.from_pretrained(path)
    model = fastft.from_pretrained(path, quantization="nf4", double_quant=True)
    train_file = os.path.join(DATA_DIR, "intents_train.jsonl")
    test_file = os.path.join(DATA_DIR, "intents_test.jsonl")
    test_rows = _read_jsonl(test_file)
    if quick:
        test_rows = test_rows[:8]
    before = exact_match(model, tok, test_rows)
    print(f"held-out exact match before fine-tuning: {before:.1%}  ({len(test_rows)} requests)")

    model = fastft.get_peft_model(model, fastft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear"))
    train_ds = load_dataset(train_file, tok, objective="clm", max_length=64)
    steps = max_steps if max_steps is not None else (3 if quick else 60)
    args = TrainingArguments(
        output_dir=output_dir, per_device_train_batch_size=8, gradient_accumulation_steps=1, learning_rate=1e-3,
        max_steps=steps, warmup_ratio=0.1, lr_scheduler_type="cosine", logging_steps=5, save_steps=10**9, seed=0,
        overwrite_output_dir=True,
    )
    trainer = fastft.Trainer(model, train_ds, args=args, data_collator=default_collator(tok, objective="clm"), tokenizer=tok)
    trainer.train()
    after = exact_match(model, tok, test_rows)
    adapter_dir = os.path.join(output_dir, "adapter")
    model.save_pretrained(adapter_dir)
    print()
    print(f"held-out exact match: {before:.1%} -> {after:.1%}   ({steps} QLoRA steps, {time.time() - t0:.0f} s)")
    print(f"adapter:   {adapter_dir}")
    print(f"loss plot: {os.path.join(output_dir, 'loss.png')}")
    print(f"metrics:   {os.path.join(output_dir, 'metrics.jsonl')}")
    return {"before": before, "after": after, "adapter_dir": adapter_dir}
