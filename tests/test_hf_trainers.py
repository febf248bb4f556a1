"""transformers.Trainer and TRL's SFTTrainer scripts run unchanged after fastft.patch(model): their loss
curves over 30 steps match the unpatched runs (fp32, 1e-4 relative per step), gradient accumulation
normalises by the accumulated batch's target tokens (num_items_in_batch), and fastft's PEFT wrapper
works under Trainer with its default remove_unused_columns=True."""
import importlib
import importlib.util
import os

import pytest
import torch
import torch.nn.functional as F

import fastft
import fastft.ops


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one intra-op thread is fastest, and it keeps shared CPUs from oversubscription."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 30
TOL = 1e-4


def _example(name):
    spec = importlib.util.spec_from_file_location(f"fastft_example_{name}", os.path.join(ROOT, "examples", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


hf_example = _example("hf_trainer")


def _assert_curves_match(got, ref):
    assert len(ref) == STEPS and len(got) == STEPS
    worst = max(abs(a - b) / abs(b) for a, b in zip(got, ref))
    assert worst <= TOL, f"worst per-step relative loss difference {worst:.2e}\n{got}\n{ref}"
    assert sum(ref[-5:]) < sum(ref[:5])  # it trains


@pytest.fixture
def attention_calls(monkeypatch):
    calls = []
    orig = fastft.ops.attention
    monkeypatch.setattr(fastft.ops, "attention", lambda *a, **k: calls.append(1) or orig(*a, **k))
    return calls


def _run(model, tmp_path, record_batches=None):
    trainer, rec = hf_example.make_trainer(model, str(tmp_path), steps=STEPS)
    assert trainer.args.remove_unused_columns  # the default, unchanged
    if record_batches is not None:
        collate = trainer.data_collator

        def recording(features):
            batch = collate(features)
            record_batches.append({k: v.clone() for k, v in batch.items()})
            return batch

        trainer.data_collator = recording
    trainer.train()
    return rec.losses


def test_trainer_loss_curve_matches_unpatched_with_token_normalised_ga(tmp_path, attention_calls):
    ref = _run(hf_example.tiny_llama(), tmp_path / "ref")
    assert not attention_calls
    batches = []
    got = _run(fastft.patch(hf_example.tiny_llama()), tmp_path / "patched", record_batches=batches)
    assert attention_calls
    _assert_curves_match(got, ref)

    # Step 1 = two micro-batches of different target counts: the logged loss is the CE summed over both,
    # divided by their total target count (num_items_in_batch), not the mean of the two batch means.
    model = hf_example.tiny_llama().eval()
    sums, counts = [], []
    with torch.no_grad():
        for b in batches[:2]:
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            tgt = b["labels"][:, 1:]
            sums.append(F.cross_entropy(logits[:, :-1].flatten(0, 1), tgt.flatten(), ignore_index=-100,
                                        reduction="sum").item())
            counts.append((tgt != -100).sum().item())
    assert counts[0] != counts[1]
    token_normalised = sum(sums) / sum(counts)
    mean_of_means = (sums[0] / counts[0] + sums[1] / counts[1]) / 2
    assert abs(got[0] - token_normalised) <= 1e-5 * token_normalised
    assert abs(mean_of_means - token_normalised) > 1e-4 * token_normalised  # 10x the tolerance above


def test_lora_under_trainer_fastft_wrapper_and_patched_peft_match_peft(tmp_path, attention_calls):
    peft = importlib.import_module("peft")
    cfg = dict(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"])

    def peft_model():
        return peft.get_peft_model(hf_example.tiny_llama(), peft.LoraConfig(**cfg))

    ref_model = peft_model()
    init = {k.replace(".default", ""): v.clone() for k, v in ref_model.state_dict().items() if "lora_" in k}
    ref = _run(ref_model, tmp_path / "ref")

    # 1. the same PEFT script with fastft.patch(model) added: fused LoRA op + fastft attention.
    patched = _run(fastft.patch(peft_model()), tmp_path / "patched_peft")
    _assert_curves_match(patched, ref)
    assert attention_calls

    # 2. fastft's own wrapper (a FastPeftModel), from the same initial adapter weights.
    pm = fastft.get_peft_model(fastft.patch(hf_example.tiny_llama()), fastft.LoraConfig(**cfg))
    missing, unexpected = pm.load_state_dict(init, strict=False)
    assert not unexpected and not [k for k in missing if "lora_" in k]
    ours = _run(pm, tmp_path / "fastft_peft")
    _assert_curves_match(ours, ref)


def test_example_script_qlora_runs(tmp_path):
    losses = hf_example.main(["--fastft", "--lora", "--quantization", "nf4", "--steps", "12",
                              "--output-dir", str(tmp_path)])
    assert len(losses) == 12 and all(l == l for l in losses)
    assert sum(losses[-3:]) < sum(losses[:3])


def test_trl_sft_trainer_loss_curve_matches_unpatched(tmp_path, attention_calls):
    pytest.importorskip("trl", reason="TRL is an optional extra (pip install trl); make test installs it")
    trl_example = _example("trl_sft")
    ref = trl_example.train(trl_example.tiny_llama(), str(tmp_path / "ref"), steps=STEPS)
    assert not attention_calls
    got = trl_example.train(fastft.patch(trl_example.tiny_llama()), str(tmp_path / "patched"), steps=STEPS)
    assert attention_calls
    _assert_curves_match(got, ref)


def _first_step_token_normalised_loss(model, batches):
    sums, counts = [], []
    with torch.no_grad():
        for b in batches:
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            tgt = b["labels"][:, 1:]
            sums.append(F.cross_entropy(logits[:, :-1].flatten(0, 1), tgt.flatten(), ignore_index=-100,
                                        reduction="sum").item())
            counts.append((tgt != -100).sum().item())
    return sum(sums) / sum(counts)


def test_native_fastft_lora_model_under_hf_trainer_normalises_by_tokens(tmp_path):
    """A native fastft model wrapped by fastft.get_peft_model: Trainer keeps the dataset's columns it
    needs (forward signature), passes num_items_in_batch, and the first step's loss is token-normalised."""
    hf_example.tiny_llama().save_pretrained(tmp_path / "ckpt")
    model = fastft.from_pretrained(tmp_path / "ckpt")
    pm = fastft.get_peft_model(model, fastft.LoraConfig(r=4, target_modules="all-linear"))
    assert pm.accepts_loss_kwargs
    batches = []
    trainer, rec = hf_example.make_trainer(pm, str(tmp_path / "run"), steps=2)
    assert trainer.model_accepts_loss_kwargs
    collate = trainer.data_collator
    trainer.data_collator = lambda f: batches.append(collate(f)) or batches[-1]
    trainer.train()
    assert len(rec.losses) == 2
    ref = _first_step_token_normalised_loss(fastft.from_pretrained(tmp_path / "ckpt").eval(), batches[:2])
    assert abs(rec.losses[0] - ref) <= 1e-5 * ref
