"""Helpers for tests/test_distributed.py: one training job, run in a single process (the reference)
or in every rank of a torchrun job (``python -m torch.distributed.run ... tests/dist_worker.py jobs.json``).

A job is a dict: name, model_dir, quantization (None | "nf4"), shard_quantization (None = the
loader's default | bool), strategy, per_device_train_batch_size,
gradient_accumulation_steps, max_steps, save_steps, resume (checkpoint dir | None), output_dir.
Rank 0 (or the single process) writes output_dir/result.json: per-step losses, the LoRA gradient
check of the last step and the tensor bytes this rank held (for ``fastft plan``).
"""
from __future__ import annotations

import json
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)


def worker_env() -> dict:
    """The environment of a torchrun job started by a test: this checkout first on PYTHONPATH, one
    OpenMP thread per worker unless set."""
    env = dict(os.environ)
    root = os.path.dirname(HERE)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def token_dataset(n, vocab=128, seed=0, lo=3, hi=14):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        L = int(torch.randint(lo, hi, (1,), generator=g))
        ids = torch.randint(3, vocab, (L,), generator=g).tolist()
        k = int(torch.randint(0, L // 2 + 1, (1,), generator=g))
        out.append({"input_ids": ids, "labels": [-100] * k + ids[k:]})
    return out


def build_model(job):
    import fastft
    from fastft.train import set_seed

    set_seed(job.get("seed", 0))
    if job.get("hf"):
        # The Hugging Face path: a transformers model patched by fastft (NF4 QuantLinear layers) with
        # PEFT's LoRA on top; under FSDP the Trainer converts the NF4 layers (make_shardable) and
        # shards each LlamaDecoderLayer, as accelerate's FSDP2 plugin would on GPUs.
        import peft

        import transformers

        model = transformers.AutoModelForCausalLM.from_pretrained(job["model_dir"])
        cfg = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"])
        return fastft.patch(peft.get_peft_model(model, cfg), quantization=job.get("quantization"))
    model = fastft.from_pretrained(job["model_dir"], quantization=job.get("quantization"),
                                   shard_quantization=job.get("shard_quantization"))
    cfg = fastft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear")
    return fastft.get_peft_model(model, cfg)


def run_job(job) -> dict:
    from fastft.train import Trainer, TrainingArguments
    from fastft.train import distributed as D

    class Probe(Trainer):
        """Records, at the last step, every LoRA gradient's finiteness and norm and the bytes held."""

        def _grad_norm_and_clip(self):
            if self.global_step + 1 == self.total_steps:
                stats = {}
                for n, p in self.trainable:
                    g = D.full_tensor(p.grad) if p.grad is not None else None
                    stats[n] = None if g is None else [bool(torch.isfinite(g).all()), float(g.norm())]
                self.grad_stats = stats
                # after a few steps: parameters, gradients and optimizer state all exist
                self.held_bytes = D.local_tensor_bytes(self.model, self.optimizer)
            return super()._grad_norm_and_clip()

        def _setup_distributed(self):
            super()._setup_distributed()
            if self.strategy == "ddp" and not hasattr(self, "reductions"):  # once (evaluate() may set up first)
                # Count DDP's gradient reductions (to check there is none on accumulation micro-steps).
                from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

                self.reductions = 0

                def hook(state, bucket):
                    self.reductions += 1
                    return allreduce_hook(state, bucket)

                self._wrapped.register_comm_hook(None, hook)

    model = build_model(job)
    from fastft.nn.sharded_quant_linear import pending_layers

    pending = len(pending_layers(model))  # NF4 layers left for per-rank quantization by the loader
    ds = token_dataset(job.get("n_examples", 25))
    args = TrainingArguments(
        output_dir=job["output_dir"], per_device_train_batch_size=job["per_device_train_batch_size"],
        gradient_accumulation_steps=job.get("gradient_accumulation_steps", 1), max_steps=job["max_steps"],
        learning_rate=job.get("learning_rate", 2e-3), lr_scheduler_type="constant", logging_steps=1,
        save_steps=job.get("save_steps"), disable_tqdm=True, plot_loss=False, seed=job.get("seed", 0),
        distributed_strategy=job.get("strategy"), resume_from_checkpoint=job.get("resume"),
        max_grad_norm=job.get("max_grad_norm", 1.0), gradient_checkpointing=job.get("gradient_checkpointing", False))
    t = Probe(model, ds, args=args)
    # evaluate() before train() (on a model loaded pending: the Trainer sets up the strategy first)
    pre_eval = t.evaluate(ds[:6])["eval_loss"] if job.get("eval_first") else None
    res = t.train()
    out = {"losses": res.losses, "grad_stats": getattr(t, "grad_stats", None), "world_size": t.world_size,
           "strategy": t.strategy, "held_bytes": getattr(t, "held_bytes", None),
           "reductions": getattr(t, "reductions", None), "pending_at_load": pending,
           "eval_first": pre_eval}
    # Every rank reports its own bytes (the plan is per device); rank 0 collects them.
    if t.world_size > 1:
        gathered = [None] * t.world_size
        torch.distributed.all_gather_object(gathered, out["held_bytes"])
        out["held_bytes_per_rank"] = gathered
    else:
        out["held_bytes_per_rank"] = [out["held_bytes"]]
    if t.is_main:
        with open(os.path.join(job["output_dir"], "result.json"), "w") as f:
            json.dump(out, f)
    return out


def main(path):
    from fastft.train import distributed as D

    D.init_from_env(timeout_s=120)
    with open(path) as f:
        jobs = json.load(f)
    for job in jobs:
        run_job(job)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
