"""fastft.Trainer / TrainingArguments / checkpoints.

Most tests drive a tiny pure-torch LM that honours the model forward contract of docs/CONTRACTS.md
(labels shifted inside for CLM, loss = sum / (num_items_in_batch or count), packed batches via
cu_seqlens), so the trainer's arithmetic is checked independently of the native models; the last
tests run the native tiny Llama / BERT (with and without LoRA).
"""
import json
import math
import os
import types
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fastft.train import (
    DataCollatorForCLM,
    DataCollatorForMLM,
    DataCollatorForPacking,
    Trainer,
    TrainingArguments,
    lr_lambda,
)
from fastft.train import checkpoint as ckpt

VOCAB = 37


class TinyLM(nn.Module):
    """Embedding -> prefix-mean mixing (causal) or full mean (bidirectional) -> MLP -> head.

    Causal mixing only looks left, so right padding never changes a real position and packing with
    per-document segments matches the unpacked computation: the properties the trainer relies on.
    """

    def __init__(self, causal=True, dim=16, dropout=0.0, vocab=VOCAB):
        super().__init__()
        self.causal = causal
        self.embed = nn.Embedding(vocab, dim)
        self.mix = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)
        self.drop = nn.Dropout(dropout)
        self.gc_enabled = False
        self.seen_autocast = []

    def gradient_checkpointing_enable(self):
        self.gc_enabled = True

    def _mix(self, h, mask):
        if self.causal:
            c = h.cumsum(1) / torch.arange(1, h.shape[1] + 1, device=h.device, dtype=h.dtype)[None, :, None]
        else:
            m = mask[..., None].to(h.dtype)
            c = (h * m).sum(1, keepdim=True) / m.sum(1, keepdim=True)
            c = c.expand_as(h)
        return c

    def forward(self, input_ids, attention_mask=None, labels=None, position_ids=None, cu_seqlens=None,
                max_seqlen=None, num_items_in_batch=None):
        self.seen_autocast.append(torch.is_autocast_enabled("cpu"))
        h = self.embed(input_ids)  # (B, T, D)
        mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        if cu_seqlens is not None:
            parts = [self._mix(h[:, a:b], mask[:, a:b]) for a, b in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist())]
            c = torch.cat(parts, 1)
        else:
            c = self._mix(h, mask)
        h = self.norm(h + torch.tanh(self.mix(c)))
        logits = self.head(self.drop(h))
        loss = None
        if labels is not None:
            lg, lb = (logits[:, :-1], labels[:, 1:]) if self.causal else (logits, labels)
            total = F.cross_entropy(lg.reshape(-1, lg.shape[-1]).float(), lb.reshape(-1), ignore_index=-100,
                                    reduction="sum")
            n = num_items_in_batch if num_items_in_batch is not None else (lb != -100).sum()
            loss = total / n
        return types.SimpleNamespace(loss=loss, logits=logits)


def tiny_model(seed=0, **kw):
    torch.manual_seed(seed)
    return TinyLM(**kw)


def clm_dataset(n=10, seed=0, lengths=None):
    g = torch.Generator().manual_seed(seed)
    lengths = lengths or [int(x) for x in torch.randint(3, 15, (n,), generator=g)]
    out = []
    for L in lengths:
        ids = torch.randint(1, VOCAB, (L,), generator=g).tolist()
        labels = list(ids)
        k = int(torch.randint(0, L // 2 + 1, (1,), generator=g))  # a "prompt" of k ignored tokens
        labels[:k] = [-100] * k
        out.append({"input_ids": ids, "labels": labels})
    return out


def args(tmp_path, name="run", **kw):
    base = dict(output_dir=str(tmp_path / name), per_device_train_batch_size=2, learning_rate=1e-2, max_steps=4,
                logging_steps=1, save_steps=None, disable_tqdm=True, plot_loss=False, save_final_model=False, seed=0,
                max_grad_norm=1.0)
    base.update(kw)
    return TrainingArguments(**base)


def params_of(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def token_mean_loss(model, examples):
    """Independent gold: mean CE over all shifted targets of the examples, one at a time."""
    tot, cnt = 0.0, 0
    with torch.no_grad():
        for ex in examples:
            ids = torch.tensor([ex["input_ids"]])
            lab = torch.tensor([ex["labels"]])
            out = model(ids, labels=lab, num_items_in_batch=1)
            tot += float(out.loss)
            cnt += int((lab[:, 1:] != -100).sum())
    return tot / cnt


# --- gradient accumulation normalisation --------------------------------------------------------
def test_grad_accumulation_matches_big_batch(tmp_path):
    ds = clm_dataset(n=8, lengths=[3, 14, 5, 11, 4, 13, 6, 9])
    runs = {}
    for name, bs, ga in (("big", 4, 1), ("acc", 1, 4)):
        model = tiny_model()
        a = args(tmp_path, name, per_device_train_batch_size=bs, gradient_accumulation_steps=ga, max_steps=4,
                 weight_decay=0.1, warmup_steps=1, lr_scheduler_type="linear")
        t = Trainer(model, ds, args=a)
        first_group = [ds[i] for idx in t._step_batches(0) for i in idx]
        gold0 = token_mean_loss(tiny_model(), first_group)
        res = t.train()
        runs[name] = (res.losses, params_of(model), gold0, first_group)
    (l_big, w_big, gold_big, g_big), (l_acc, w_acc, gold_acc, g_acc) = runs["big"], runs["acc"]
    assert [ex["input_ids"] for ex in g_big] == [ex["input_ids"] for ex in g_acc], "same data order per step"
    # The step loss is the token-weighted mean, checked against an independent computation.
    assert l_big[0] == pytest.approx(gold_big, rel=1e-6)
    assert l_acc[0] == pytest.approx(gold_acc, rel=1e-6)
    # Per-micro-batch means would give a different number on these unequal lengths.
    per_seq = [token_mean_loss(tiny_model(), [ex]) for ex in g_acc]
    assert abs(sum(per_seq) / len(per_seq) - gold_acc) > 1e-3
    torch.testing.assert_close(torch.tensor(l_acc), torch.tensor(l_big), rtol=1e-6, atol=1e-6)
    for n in w_big:
        torch.testing.assert_close(w_acc[n], w_big[n], rtol=1e-5, atol=1e-6, msg=n)
    assert not torch.equal(w_big["head.weight"], tiny_model().head.weight), "training changed the weights"


def test_model_without_num_items_kwarg_is_rescaled(tmp_path):
    class NoKwarg(TinyLM):
        def forward(self, input_ids, attention_mask=None, labels=None):
            return super().forward(input_ids, attention_mask=attention_mask, labels=labels)

    ds = clm_dataset(n=4, lengths=[3, 12, 5, 9])
    losses = []
    for name, cls in (("kw", TinyLM), ("nokw", NoKwarg)):
        torch.manual_seed(0)
        res = Trainer(cls(), ds, args=args(tmp_path, name, per_device_train_batch_size=1,
                                           gradient_accumulation_steps=4, max_steps=2)).train()
        losses.append(res.losses)
    torch.testing.assert_close(torch.tensor(losses[1]), torch.tensor(losses[0]), rtol=1e-6, atol=1e-6)


# --- resume ---------------------------------------------------------------------------------------
class CrashAt(Trainer):
    crash_step = None

    def training_step(self, micro_batches, num_items):
        if self.global_step + 1 == self.crash_step:
            raise KeyboardInterrupt("simulated crash")
        return super().training_step(micro_batches, num_items)


@pytest.mark.parametrize("objective", ["clm", "mlm"])
def test_resume_reproduces_uninterrupted_run(tmp_path, objective):
    causal = objective == "clm"
    ds = clm_dataset(n=9)
    if not causal:
        ds = [{"input_ids": ex["input_ids"]} for ex in ds]

    def collator():
        if causal:
            return DataCollatorForCLM(pad_token_id=0)
        return DataCollatorForMLM(mask_token_id=VOCAB - 1, pad_token_id=0, vocab_size=VOCAB, special_token_ids=[0],
                                  mlm_probability=0.3, seed=5)

    kw = dict(per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=8, save_steps=3,
              lr_scheduler_type="cosine", warmup_ratio=0.25, weight_decay=0.01, logging_steps=2)
    full_model = tiny_model(causal=causal, dropout=0.2)
    full = Trainer(full_model, ds, args=args(tmp_path, "full", **kw), data_collator=collator()).train()
    assert len(full.losses) == 8

    crashing = CrashAt(tiny_model(causal=causal, dropout=0.2), ds, args=args(tmp_path, "crash", **kw),
                       data_collator=collator())
    crashing.crash_step = 5
    with pytest.raises(KeyboardInterrupt):
        crashing.train()
    out = tmp_path / "crash"
    assert sorted(os.listdir(out)) == ["checkpoint-3", "fastft_run.json", "metrics.jsonl"]

    # A fresh process: different initial weights and RNG state, everything must come from disk.
    torch.manual_seed(1234)
    resumed_model = tiny_model(seed=99, causal=causal, dropout=0.2)
    resumed = Trainer(resumed_model, ds, args=args(tmp_path, "crash", **kw),
                      data_collator=collator()).train(resume_from_checkpoint=True)
    assert resumed.losses == full.losses  # bit for bit
    for n, p in params_of(full_model).items():
        assert torch.equal(params_of(resumed_model)[n], p), n
    def rows(path):  # minus the wall-clock throughput, which no two runs share
        lines = path.read_text().splitlines()
        return [{k: v for k, v in json.loads(x).items() if k != "tokens_per_second"} for x in lines]

    assert rows(out / "metrics.jsonl") == rows(tmp_path / "full" / "metrics.jsonl")
    assert sorted(os.listdir(out)) == ["checkpoint-3", "checkpoint-6", "fastft_run.json", "metrics.jsonl"]


def test_resume_rejects_other_run_and_missing_checkpoint(tmp_path):
    ds = clm_dataset(n=6)
    Trainer(tiny_model(), ds, args=args(tmp_path, "a", save_steps=2, max_steps=2)).train()
    with pytest.raises(ValueError, match="per_device_train_batch_size"):
        Trainer(tiny_model(), ds, args=args(tmp_path, "b", per_device_train_batch_size=3,
                                            resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2")))
    with pytest.raises(ValueError, match="holds no checkpoint"):
        Trainer(tiny_model(), ds, args=args(tmp_path, "c", resume_from_checkpoint=True))
    with pytest.raises(ValueError, match="not a directory"):
        Trainer(tiny_model(), ds, args=args(tmp_path, "d", resume_from_checkpoint=str(tmp_path / "nope")))
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists() and not (tmp_path / "d").exists()


# --- checkpoints ----------------------------------------------------------------------------------
def test_failed_save_leaves_no_partial_checkpoint(tmp_path, monkeypatch):
    ds = clm_dataset(n=6)
    model = tiny_model()
    t = Trainer(model, ds, args=args(tmp_path, save_steps=2, max_steps=6))
    real = ckpt.save_optimizer
    calls = []

    def failing(optimizer, d):
        calls.append(d)
        if len(calls) == 2:
            real(optimizer, d)  # the files are there, half the checkpoint is written...
            raise OSError("disk full")  # ...then the save dies
        return real(optimizer, d)

    monkeypatch.setattr(ckpt, "save_optimizer", failing)
    with pytest.raises(OSError, match="disk full"):
        t.train()
    out = tmp_path / "run"
    assert sorted(os.listdir(out)) == ["checkpoint-2", "fastft_run.json", "metrics.jsonl"], "no checkpoint-4, no temp dir"
    state = ckpt.read_trainer_state(str(out / "checkpoint-2"))
    assert state["global_step"] == 2 and len(state["losses"]) == 2
    # A hard kill (no except clause runs) would leave the temp dir: the next run clears it.
    (out / f"{ckpt.TMP_PREFIX}checkpoint-4-999").mkdir()
    # The surviving checkpoint is complete and loadable.
    monkeypatch.setattr(ckpt, "save_optimizer", real)
    res = Trainer(tiny_model(seed=5), ds, args=args(tmp_path, save_steps=2, max_steps=6, resume_from_checkpoint=True)).train()
    assert res.global_step == 6
    assert sorted(os.listdir(out)) == ["checkpoint-2", "checkpoint-4", "checkpoint-6", "fastft_run.json", "metrics.jsonl"]


def test_checkpoint_contents_and_rotation(tmp_path):
    ds = clm_dataset(n=6)
    model = tiny_model()
    Trainer(model, ds, args=args(tmp_path, save_steps=1, max_steps=4, save_total_limit=2, save_final_model=True)).train()
    out = tmp_path / "run"
    assert [s for s, _ in ckpt.list_checkpoints(str(out))] == [3, 4]
    files = set(os.listdir(out / "checkpoint-4"))
    assert {"trainable_params.safetensors", "optimizer.safetensors", "optimizer.json", "scheduler.json",
            "rng_state.safetensors", "rng_state.json", "trainer_state.json"} <= files
    from safetensors.torch import load_file

    saved = load_file(str(out / "checkpoint-4" / "trainable_params.safetensors"))
    for n, p in model.named_parameters():
        assert torch.equal(saved[n], p.detach()), n
    # No save_pretrained on this model: the final save writes its trainable params.
    final = load_file(str(out / "model.safetensors"))
    assert set(final) == set(saved)


def test_atomic_save_dir_replaces_existing(tmp_path):
    target = tmp_path / "checkpoint-1"

    def write(v):
        return lambda d: (Path(d) / "x.txt").write_text(v)

    ckpt.atomic_save_dir(str(target), write("one"))
    ckpt.atomic_save_dir(str(target), write("two"))
    assert (target / "x.txt").read_text() == "two"
    assert os.listdir(tmp_path) == ["checkpoint-1"]


# --- schedules ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind,expected", [
    ("linear", [0.0, 0.5, 1.0, 0.75, 0.5, 0.25]),
    ("cosine", [0.0, 0.5, 1.0, 0.5 * (1 + math.cos(math.pi / 4)), 0.5, 0.5 * (1 + math.cos(3 * math.pi / 4))]),
    ("constant_with_warmup", [0.0, 0.5, 1.0, 1.0, 1.0, 1.0]),
    ("constant", [1.0] * 6),
])
def test_schedules(tmp_path, kind, expected):
    assert [lr_lambda(s, kind=kind, warmup=2, total=6) for s in range(6)] == pytest.approx(expected, abs=1e-12)
    lr = 0.01
    Trainer(tiny_model(), clm_dataset(n=4), args=args(tmp_path, lr_scheduler_type=kind, learning_rate=lr,
                                                      warmup_steps=2, max_steps=6)).train()
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["learning_rate"] for r in rows] == pytest.approx([lr * e for e in expected], abs=1e-12)


def test_warmup_ratio_rounds_up():
    a = TrainingArguments(warmup_ratio=0.1)
    assert a.num_warmup_steps(25) == 3
    assert TrainingArguments(warmup_ratio=0.1, warmup_steps=7).num_warmup_steps(25) == 7


# --- evaluation, metrics, plot --------------------------------------------------------------------
def test_evaluate_perplexity_and_rng_isolation(tmp_path):
    train, ev = clm_dataset(n=6), clm_dataset(n=5, seed=1)
    model = tiny_model(dropout=0.3)
    t = Trainer(model, train, args=args(tmp_path, per_device_eval_batch_size=2), eval_dataset=ev)
    state = torch.get_rng_state()
    m = t.evaluate()
    assert torch.equal(torch.get_rng_state(), state), "evaluation must not move the training RNG"
    model.eval()
    assert m["eval_loss"] == pytest.approx(token_mean_loss(model, ev), rel=1e-6)
    assert m["eval_perplexity"] == pytest.approx(math.exp(m["eval_loss"]), rel=1e-12)
    assert model.training is False  # evaluate restores the mode it found
    assert not (tmp_path / "run").exists(), "evaluate alone writes nothing"


def test_metrics_jsonl_and_plot(tmp_path):
    train, ev = clm_dataset(n=8), clm_dataset(n=3, seed=1)
    a = args(tmp_path, max_steps=6, logging_steps=2, eval_steps=3, plot_loss=True, disable_tqdm=False)
    res = Trainer(tiny_model(), train, args=a, eval_dataset=ev).train()
    rows = [json.loads(x) for x in Path(res.metrics_path).read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    eval_rows = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in train_rows] == [2, 4, 6]
    assert [r["step"] for r in eval_rows] == [3, 6]
    assert train_rows[-1]["loss"] == pytest.approx(sum(res.losses[4:6]) / 2, rel=1e-12)
    for r in train_rows:
        assert {"epoch", "learning_rate", "grad_norm", "num_target_tokens"} <= set(r)
        assert math.isfinite(r["grad_norm"]) and r["tokens_per_second"] > 0
    for r in eval_rows:
        assert r["eval_perplexity"] == pytest.approx(math.exp(r["eval_loss"]))
    assert res.eval_loss == eval_rows[-1]["eval_loss"]
    assert res.final_loss == res.losses[-1] and res.train_loss == pytest.approx(sum(res.losses) / 6)
    with open(res.plot_path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert res.losses[-1] < res.losses[0], "a few steps at lr 1e-2 must lower the loss"


# --- precision, gradient checkpointing, packing ---------------------------------------------------
def test_bf16_autocast_on_cpu(tmp_path):
    ds = clm_dataset(n=4)
    ref_model, bf_model = tiny_model(), tiny_model()
    ref = Trainer(ref_model, ds, args=args(tmp_path, "fp32", max_steps=2)).train()
    bf = Trainer(bf_model, ds, args=args(tmp_path, "bf16", max_steps=2, bf16=True)).train()
    assert all(bf_model.seen_autocast) and not any(ref_model.seen_autocast)
    # bf16 has 8 mantissa bits: a few 2^-8 relative on a loss of O(1), not the fp32 answer exactly.
    assert bf.losses[0] == pytest.approx(ref.losses[0], rel=3e-2)
    assert bf.losses[0] != ref.losses[0]


def test_gradient_checkpointing_flag(tmp_path):
    model = tiny_model()
    Trainer(model, clm_dataset(n=2), args=args(tmp_path, max_steps=1, gradient_checkpointing=True)).train()
    assert model.gc_enabled

    class Plain(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Linear(2, 2)

    with pytest.raises(ValueError, match="gradient_checkpointing_enable"):
        Trainer(Plain(), clm_dataset(n=2), args=args(tmp_path, "x", gradient_checkpointing=True))


def test_packed_batch_gives_same_loss_as_unpacked_toy():
    ds = clm_dataset(n=5, lengths=[4, 9, 3, 12, 6])
    model = tiny_model()
    packed = DataCollatorForPacking()(ds)
    padded = DataCollatorForCLM()(ds)
    with torch.no_grad():
        lp = model(**packed).loss
        # Packing drops each document's first label, which the shift drops anyway when unpacked.
        lu = model(**padded).loss
    torch.testing.assert_close(lp, lu, rtol=1e-6, atol=1e-6)
    assert float(lu) == pytest.approx(token_mean_loss(model, ds), rel=1e-6)


def test_packing_trains_like_padding(tmp_path):
    ds = clm_dataset(n=6)
    runs = []
    for name, packing in (("pad", False), ("pack", True)):
        model = tiny_model()
        runs.append((Trainer(model, ds, args=args(tmp_path, name, packing=packing, max_steps=3)).train(),
                     params_of(model)))
    torch.testing.assert_close(torch.tensor(runs[1][0].losses), torch.tensor(runs[0][0].losses), rtol=1e-5, atol=1e-6)
    for n, p in runs[0][1].items():
        torch.testing.assert_close(runs[1][1][n], p, rtol=1e-4, atol=1e-6, msg=n)


# --- arguments and input validation ---------------------------------------------------------------
@pytest.mark.parametrize("bad,match", [
    (dict(per_device_train_batch_size=0), "per_device_train_batch_size"),
    (dict(gradient_accumulation_steps=-1), "gradient_accumulation_steps"),
    (dict(learning_rate=-1e-3), "learning_rate"),
    (dict(learning_rate=float("nan")), "learning_rate"),
    (dict(max_steps=0), "max_steps"),
    (dict(num_train_epochs=0), "num_train_epochs"),
    (dict(warmup_ratio=1.5), "warmup_ratio"),
    (dict(lr_scheduler_type="triangle"), "lr_scheduler_type"),
    (dict(adam_beta2=1.0), "adam_beta2"),
    (dict(save_steps=0), "save_steps"),
    (dict(output_dir=""), "output_dir"),
    (dict(max_grad_norm=-1.0), "max_grad_norm"),
])
def test_training_arguments_validation(bad, match):
    with pytest.raises(ValueError, match=match):
        TrainingArguments(**bad)


def test_training_arguments_types_and_files(tmp_path):
    with pytest.raises(TypeError, match="learning_rate"):
        TrainingArguments(learning_rate="fast")
    with pytest.raises(TypeError, match="max_steps"):
        TrainingArguments(max_steps=2.5)
    with pytest.raises(ValueError, match="did you mean 'learning_rate'"):
        TrainingArguments.from_dict({"learning_rat": 1e-4})
    y = tmp_path / "cfg.yaml"
    # PyYAML reads 1e-4 (no dot) as a string: it must still become a float.
    y.write_text("learning_rate: 1e-4\nmax-steps: 20\nbf16: true\nlr_scheduler_type: cosine\n")
    a = TrainingArguments.from_file(str(y), output_dir=str(tmp_path / "o"))
    assert a.learning_rate == 1e-4 and a.max_steps == 20 and a.bf16 is True and a.lr_scheduler_type == "cosine"
    j = tmp_path / "cfg.json"
    j.write_text(json.dumps(a.to_dict()))
    assert TrainingArguments.from_file(str(j)) == a
    (tmp_path / "bad.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="bad.yaml.*mapping"):
        TrainingArguments.from_file(str(tmp_path / "bad.yaml"))
    (tmp_path / "broken.json").write_text('{"seed": 1,\n "bf16": }')
    with pytest.raises(ValueError, match="broken.json:2: cannot parse JSON"):
        TrainingArguments.from_file(str(tmp_path / "broken.json"))
    (tmp_path / "broken.yaml").write_text("seed: [1\n")
    with pytest.raises(ValueError, match="broken.yaml: cannot parse YAML"):
        TrainingArguments.from_file(str(tmp_path / "broken.yaml"))
    (tmp_path / "typo.json").write_text('{"warmup_ration": 0.1}')
    with pytest.raises(ValueError, match="typo.json.*warmup_ratio"):
        TrainingArguments.from_file(str(tmp_path / "typo.json"))


@pytest.mark.parametrize("ds,match", [
    ([], "train_dataset is empty"),
    ([{"input_ids": []}], r"train_dataset\[0\]"),
    ([{"text": "raw"}], r"train_dataset\[0\]"),
])
def test_trainer_rejects_bad_data_before_writing(tmp_path, ds, match):
    with pytest.raises(ValueError, match=match):
        Trainer(tiny_model(), ds, args=args(tmp_path))
    assert not (tmp_path / "run").exists()


def test_trainer_rejects_other_nonsense(tmp_path):
    ds = clm_dataset(n=3)
    with pytest.raises(ValueError, match="fewer than one batch"):
        Trainer(tiny_model(), ds, args=args(tmp_path, per_device_train_batch_size=4, dataloader_drop_last=True))
    frozen = tiny_model()
    frozen.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        Trainer(frozen, ds, args=args(tmp_path))
    with pytest.raises(ValueError, match="tokenizer"):
        Trainer(tiny_model(), [{"input_ids": [1, 2, 3]}], args=args(tmp_path))
    with pytest.raises(ValueError, match="eval_dataset"):
        Trainer(tiny_model(), ds, args=args(tmp_path)).evaluate()
    assert not (tmp_path / "run").exists()


def test_epochs_and_partial_last_step(tmp_path):
    # 5 examples, batch 2 -> 3 micro-batches per epoch -> 2 optimizer steps (the last with one).
    t = Trainer(tiny_model(), clm_dataset(n=5), args=args(tmp_path, max_steps=-1, num_train_epochs=2,
                                                          gradient_accumulation_steps=2))
    assert t.steps_per_epoch == 2 and t.total_steps == 4
    seen = [i for s in range(2) for idx in t._step_batches(s) for i in idx]
    assert sorted(seen) == list(range(5)), "one epoch visits every example once"
    assert t._step_batches(2) != t._step_batches(0), "each epoch reshuffles"
    assert t.train().global_step == 4


# --- native fastft models -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory):
    from models_util import save_tiny_checkpoint

    return save_tiny_checkpoint(tmp_path_factory.mktemp("llama"), "llama")


@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory):
    from models_util import save_tiny_checkpoint

    return save_tiny_checkpoint(tmp_path_factory.mktemp("bert"), "bert")


def token_dataset(n, vocab, seed=0, lo=3, hi=14, prompt=True):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        L = int(torch.randint(lo, hi, (1,), generator=g))
        ids = torch.randint(3, vocab, (L,), generator=g).tolist()
        k = int(torch.randint(0, L // 2 + 1, (1,), generator=g)) if prompt else 0
        out.append({"input_ids": ids, "labels": [-100] * k + ids[k:]})
    return out


def native_lora_llama(path, dropout=0.0):
    import fastft

    torch.manual_seed(0)
    model = fastft.from_pretrained(path)
    cfg = fastft.LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=["q_proj", "v_proj", "down_proj"])
    return fastft.get_peft_model(model, cfg)


def test_native_llama_lora_ga_and_resume(tiny_llama_dir, tmp_path):
    ds = token_dataset(6, 128)
    # GA=3 x B=1 equals GA=1 x B=3 on the native model (padding and token normalisation).
    res = {}
    for name, bs, ga in (("big", 3, 1), ("acc", 1, 3)):
        model = native_lora_llama(tiny_llama_dir)
        res[name] = (Trainer(model, ds, args=args(tmp_path, name, per_device_train_batch_size=bs,
                                                  gradient_accumulation_steps=ga, max_steps=2)).train().losses,
                     {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
    torch.testing.assert_close(torch.tensor(res["acc"][0]), torch.tensor(res["big"][0]), rtol=1e-5, atol=1e-6)
    for n, p in res["big"][1].items():
        torch.testing.assert_close(res["acc"][1][n], p, rtol=1e-4, atol=1e-6, msg=n)

    # Crash after the step-2 checkpoint, resume in a "new process": identical to the full run.
    kw = dict(per_device_train_batch_size=2, max_steps=4, save_steps=2, lr_scheduler_type="cosine", warmup_steps=1,
              save_final_model=True)
    full_model = native_lora_llama(tiny_llama_dir, dropout=0.1)
    full = Trainer(full_model, ds, args=args(tmp_path, "full", **kw)).train()
    crashing = CrashAt(native_lora_llama(tiny_llama_dir, dropout=0.1), ds, args=args(tmp_path, "crash", **kw))
    crashing.crash_step = 3
    with pytest.raises(KeyboardInterrupt):
        crashing.train()
    torch.manual_seed(77)
    resumed_model = native_lora_llama(tiny_llama_dir, dropout=0.1)
    resumed = Trainer(resumed_model, ds, args=args(tmp_path, "crash", resume_from_checkpoint=True, **kw)).train()
    assert resumed.losses == full.losses
    full_p = dict(full_model.named_parameters())
    for n, p in resumed_model.named_parameters():
        assert torch.equal(p, full_p[n]), n
    # PEFT checkpoints carry the adapter; the final save is the adapter too.
    ck = tmp_path / "crash" / "checkpoint-2"
    from safetensors.torch import load_file

    import fastft

    loaded = fastft.load_adapter(fastft.from_pretrained(tiny_llama_dir), str(ck))
    saved = load_file(str(ck / "trainable_params.safetensors"))
    lora = {n: p for n, p in loaded.named_parameters() if "lora_" in n}
    assert len(lora) == len(saved) == 12
    for n, p in saved.items():
        assert torch.equal(lora[n], p), n
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(tmp_path / "full"))


def test_default_collator_follows_model_family(tiny_llama_dir, tiny_bert_dir, tmp_path):
    import fastft

    class Tok:
        mask_token_id, pad_token_id, all_special_ids = 2, 0, [0, 1, 2]

        def __len__(self):
            return 100

    unlabeled = [{"input_ids": [5, 6, 7, 8]}] * 2
    # A causal LM with label-less examples trains on every token (CLM), it is not MLM data.
    t = Trainer(fastft.from_pretrained(tiny_llama_dir), unlabeled, args=args(tmp_path, packing=True))
    assert t.objective == "clm" and isinstance(t.data_collator, DataCollatorForPacking)
    with pytest.raises(ValueError, match="tokenizer"):
        Trainer(fastft.from_pretrained(tiny_bert_dir), unlabeled, args=args(tmp_path))
    with pytest.raises(ValueError, match="packing"):
        Trainer(fastft.from_pretrained(tiny_bert_dir), unlabeled, args=args(tmp_path, packing=True),
                tokenizer=Tok())
    assert not (tmp_path / "run").exists()


def test_native_llama_gradient_checkpointing_matches(tiny_llama_dir, tmp_path):
    import fastft

    ds = token_dataset(4, 128)
    runs = []
    for name, gc in (("plain", False), ("gc", True)):
        torch.manual_seed(0)
        model = fastft.from_pretrained(tiny_llama_dir)
        runs.append(Trainer(model, ds, args=args(tmp_path, name, max_steps=2, learning_rate=1e-3,
                                                 gradient_checkpointing=gc)).train().losses)
        assert model.is_gradient_checkpointing is gc
    torch.testing.assert_close(torch.tensor(runs[1]), torch.tensor(runs[0]), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("packing", [False, True])
def test_native_llama_lora_bf16_autocast(tiny_llama_dir, tmp_path, packing):
    ds = token_dataset(4, 128)
    runs = []
    for name, bf16 in (("fp32", False), ("bf16", True)):
        model = native_lora_llama(tiny_llama_dir)
        runs.append(Trainer(model, ds, args=args(tmp_path, name, max_steps=2, bf16=bf16, packing=packing)).train().losses)
    # bf16 matmuls carry 8 mantissa bits: the loss agrees to about 1e-2 relative, not exactly.
    assert runs[1] == pytest.approx(runs[0], rel=3e-2)
    assert runs[1] != runs[0]


def test_native_bert_mlm_trains_and_evaluates(tiny_bert_dir, tmp_path):
    import fastft

    torch.manual_seed(0)
    model = fastft.from_pretrained(tiny_bert_dir)
    train = [{"input_ids": ex["input_ids"]} for ex in token_dataset(4, 100, prompt=False, lo=10, hi=20)]
    coll = DataCollatorForMLM(mask_token_id=2, pad_token_id=0, vocab_size=100, special_token_ids=[0, 1, 2],
                              mlm_probability=0.3, seed=0)
    t = Trainer(model, train, args=args(tmp_path, per_device_train_batch_size=4, max_steps=12, learning_rate=5e-3),
                eval_dataset=train, data_collator=coll)  # random tokens: only memorisation can lower eval loss
    assert t.objective == "mlm"
    before = t.evaluate()
    assert t.evaluate() == before, "eval masks are drawn from a fixed seed"
    res = t.train()
    assert res.eval_loss < before["eval_loss"]
    assert res.eval_perplexity == pytest.approx(math.exp(res.eval_loss))
    assert sum(res.losses[-3:]) < sum(res.losses[:3])


def test_native_llama_under_transformers_trainer(tiny_llama_dir, tmp_path):
    import fastft
    import transformers

    torch.manual_seed(0)
    model = fastft.from_pretrained(tiny_llama_dir)
    ds = token_dataset(4, 128, prompt=False)
    ta = transformers.TrainingArguments(output_dir=str(tmp_path / "hf"), max_steps=8, per_device_train_batch_size=4,
                                        learning_rate=3e-3, report_to=[], save_strategy="no", logging_steps=1,
                                        use_cpu=True, disable_tqdm=True, seed=0)
    tr = transformers.Trainer(model=model, args=ta, train_dataset=ds, data_collator=DataCollatorForCLM(0))
    tr.train()
    losses = [h["loss"] for h in tr.state.log_history if "loss" in h]
    assert len(losses) == 8 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-2:]) / 2 < losses[0] - 0.3, f"loss did not decrease: {losses}"
