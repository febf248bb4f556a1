"""A TRL ``SFTTrainer`` script made faster by one line: ``fastft.patch(model)``.

    python examples/trl_sft.py            # unpatched (the reference run)
    python examples/trl_sft.py --fastft   # the same script after fastft.patch(model)

Offline and CPU-sized: a tiny random Llama and a word-level tokenizer built in memory over a
synthetic text dataset. Needs ``pip install trl`` (an optional extra of fastft).
"""
from __future__ import annotations

import argparse

import torch
import transformers

VOCAB = 101


def tiny_tokenizer() -> transformers.PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                                eos_token="</s>")


def tiny_llama(seed: int = 0) -> transformers.PreTrainedModel:
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return transformers.LlamaForCausalLM(cfg)


def text_dataset(n: int = 96, seed: int = 0):
    import datasets

    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        length = int(torch.randint(4, 16, (1,), generator=g))
        start = int(torch.randint(3, VOCAB - 20, (1,), generator=g))
        rows.append({"text": " ".join(f"w{3 + (start + 3 * j - 3) % (VOCAB - 3)}" for j in range(length))})
    return datasets.Dataset.from_list(rows)


def train(model, output_dir: str, *, steps: int = 30, seed: int = 0) -> list[float]:
    import trl

    losses: list[float] = []

    class Recorder(transformers.TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    args = trl.SFTConfig(
        output_dir=output_dir, max_steps=steps, per_device_train_batch_size=4, gradient_accumulation_steps=2,
        learning_rate=1e-3, logging_steps=1, save_strategy="no", report_to=[], seed=seed, data_seed=seed,
        use_cpu=True, disable_tqdm=True, max_length=32, dataloader_num_workers=0,
        bf16=False,  # SFTConfig defaults to bf16 autocast; this example (and its parity test) runs fp32
    )
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=text_dataset(), processing_class=tiny_tokenizer(),
                             callbacks=[Recorder()])
    trainer.train()
    return losses


def main(argv=None) -> list[float]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fastft", action="store_true", help="apply fastft.patch(model)")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--output-dir", default="outputs/trl_sft")
    a = ap.parse_args(argv)
    model = tiny_llama()
    if a.fastft:
        import fastft

        model = fastft.patch(model)  # the one added line
    losses = train(model, a.output_dir, steps=a.steps)
    for step, loss in enumerate(losses, 1):
        print(f"step {step:3d}  loss {loss:.6f}")
    return losses


if __name__ == "__main__":
    main()
