"""A plain ``transformers.Trainer`` script made faster by one line: ``fastft.patch(model)``.

    python examples/hf_trainer.py                 # unpatched transformers (the reference run)
    python examples/hf_trainer.py --fastft        # same script after fastft.patch(model)
    python examples/hf_trainer.py --fastft --lora --quantization nf4   # QLoRA through fastft

A tiny random Llama and a synthetic dataset keep it offline and CPU-sized; swap in
``AutoModelForCausalLM.from_pretrained(path)`` and your own tokenized data for real use. Sequences
have different lengths, so with gradient accumulation the loss is normalised by the target-token
count of the whole accumulated batch (transformers passes ``num_items_in_batch`` to the model).
"""
from __future__ import annotations

import argparse

import torch
import transformers

VOCAB = 101


def tiny_llama(seed: int = 0) -> transformers.PreTrainedModel:
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg)


def synthetic_dataset(n: int = 96, seed: int = 0) -> list[dict]:
    """Rows {"input_ids", "labels", "source"}; "source" is a column the model does not take, which
    Trainer drops because the model's forward signature does not name it."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        length = int(torch.randint(5, 17, (1,), generator=g))
        start = int(torch.randint(3, VOCAB - 20, (1,), generator=g))
        ids = [(start + 3 * j) % VOCAB for j in range(length)]  # a learnable pattern
        rows.append({"input_ids": ids, "labels": ids, "source": f"row{i}"})
    return rows


def collate(features: list[dict]) -> dict[str, torch.Tensor]:
    """Right padding with 0; labels -100 on padding."""
    width = max(len(f["input_ids"]) for f in features)
    ids = torch.zeros(len(features), width, dtype=torch.long)
    labels = torch.full((len(features), width), -100, dtype=torch.long)
    mask = torch.zeros(len(features), width, dtype=torch.long)
    for i, f in enumerate(features):
        n = len(f["input_ids"])
        ids[i, :n] = torch.tensor(f["input_ids"])
        labels[i, :n] = torch.tensor(f["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


class LossRecorder(transformers.TrainerCallback):
    def __init__(self):
        self.losses: list[float] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append(float(logs["loss"]))


def make_trainer(model, output_dir: str, *, steps: int = 30, grad_accum: int = 2, batch_size: int = 4,
                 learning_rate: float = 1e-3, seed: int = 0) -> tuple[transformers.Trainer, LossRecorder]:
    args = transformers.TrainingArguments(
        output_dir=output_dir, max_steps=steps, per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=grad_accum, learning_rate=learning_rate, logging_steps=1,
        save_strategy="no", report_to=[], seed=seed, data_seed=seed, use_cpu=True, disable_tqdm=True,
        dataloader_num_workers=0, warmup_steps=0, lr_scheduler_type="linear",
    )
    recorder = LossRecorder()
    trainer = transformers.Trainer(model=model, args=args, train_dataset=synthetic_dataset(), data_collator=collate,
                                   callbacks=[recorder])
    return trainer, recorder


def main(argv=None) -> list[float]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fastft", action="store_true", help="apply fastft.patch(model)")
    ap.add_argument("--quantization", choices=["nf4", "int4"], help="quantize the frozen base (with --lora)")
    ap.add_argument("--lora", action="store_true", help="train LoRA adapters (fastft.get_peft_model or peft)")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--output-dir", default="outputs/hf_trainer")
    a = ap.parse_args(argv)
    if a.quantization and not a.lora:
        ap.error("--quantization needs --lora (a quantized base is frozen)")
    if a.quantization and not a.fastft:
        ap.error("--quantization is applied by fastft.patch; add --fastft")

    model = tiny_llama()
    if a.fastft:
        import fastft

        model = fastft.patch(model, quantization=a.quantization)          # the one added line
        if a.lora:
            model = fastft.get_peft_model(model, fastft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    elif a.lora:
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    trainer, recorder = make_trainer(model, a.output_dir, steps=a.steps)
    trainer.train()
    for step, loss in enumerate(recorder.losses, 1):
        print(f"step {step:3d}  loss {loss:.6f}")
    return recorder.losses


if __name__ == "__main__":
    main()
