"""The forgetting report (fastft/tasks/forgetting.py): the shipped reference set, deterministic
masking, the metrics against direct computations, the base-head rule for task encoders, and the
Trainer's report (base row, periodic rows, final report, forgetting.md)."""
import json
import os
import platform
import shutil

import pytest
import torch

from models_util import one_thread, save_tiny_checkpoint  # noqa: F401

import fastft
from fastft.tasks.forgetting import REFERENCE, ForgettingProbe, encoder_states, reference_texts, report


def _with_tokenizer(d, src):
    for f in os.listdir(src):
        if f.startswith(("tokenizer", "special_tokens", "vocab")):
            shutil.copy2(os.path.join(src, f), d)
    return d


@pytest.fixture(scope="module")
def bert_dirs(tmp_path_factory):
    from fastft.models.convert import minilm_path

    root = tmp_path_factory.mktemp("fg")
    kw = dict(vocab_size=30522, num_hidden_layers=1)
    return {"mlm": _with_tokenizer(save_tiny_checkpoint(root, "bert", **kw), minilm_path()),
            "bare": _with_tokenizer(save_tiny_checkpoint(root, "bert", head=False, **kw), minilm_path())}


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    from fastft.models.convert import minilm_path

    return AutoTokenizer.from_pretrained(minilm_path())


def test_reference_set_is_small_documented_and_reproducible():
    assert os.path.getsize(REFERENCE) < 300_000
    rows = [json.loads(line) for line in open(REFERENCE, encoding="utf-8")]
    assert len(rows) >= 300 and all(len(r["text"]) >= 200 for r in rows)
    readme = open(os.path.join(os.path.dirname(REFERENCE), "README.md"), encoding="utf-8").read()
    assert "reference_stdlib.jsonl" in readme and "make_reference" in readme
    docs = reference_texts(48)
    assert len(docs) == 48 and len(set(docs)) == 48
    if rows[0]["python"] == platform.python_version():
        from fastft.data.make_reference import build

        assert [json.loads(x) for x in build()] == rows


def test_masked_accuracy_matches_direct_computation(bert_dirs, tok):
    m = fastft.from_pretrained(bert_dirs["mlm"])
    p1 = ForgettingProbe.build(m, tok, docs=8, max_length=32)
    p2 = ForgettingProbe.build(m, tok, docs=8, max_length=32)
    for (a, b, c), (x, y, z) in zip(p1.batches, p2.batches):  # the same masks every time
        assert torch.equal(a, x) and torch.equal(c, z)
    sel = torch.cat([lab[am.bool()] for _, am, lab in p1.batches])
    assert 0.08 < (sel != -100).float().mean() < 0.25
    got = p1.measure(m)
    hit = n = 0
    with torch.no_grad():
        for ids, am, lab in p1.batches:
            logits = m(ids, attention_mask=am).logits
            s = lab != -100
            hit += int((logits.argmax(-1)[s] == lab[s]).sum())
            n += int(s.sum())
    assert got["metric"] == "reference_masked_accuracy" and got["head"] == "model"
    assert got["tokens"] == n and got["value"] == hit / n


def test_task_encoder_is_scored_with_the_base_head(bert_dirs, tok):
    base = fastft.from_pretrained(bert_dirs["mlm"])
    clf = fastft.from_pretrained(bert_dirs["mlm"], task="classify", labels=["a", "b"])
    pb = ForgettingProbe.build(base, tok, docs=8, max_length=32)
    pc = ForgettingProbe.build(clf, tok, docs=8, max_length=32)
    assert pc.head_source == "base"
    ids, am, _ = pc.batches[0]
    with torch.no_grad():
        want = base(ids, attention_mask=am).logits
        # an untrained classifier's encoder is the base encoder: the base head gives the base logits
        assert torch.allclose(pc.head(encoder_states(clf, ids, am)), want, rtol=0, atol=1e-5)
        assert pc.measure(clf)["value"] == pb.measure(base)["value"]
        clf.bert.encoder.layer[0].output.dense.weight.mul_(-1.0)
        assert not torch.allclose(pc.head(encoder_states(clf, ids, am)), want, rtol=0, atol=1e-2)
        # the head is the base's own copy: training the classifier's embeddings does not move it
        clf.bert.embeddings.word_embeddings.weight.add_(1.0)
        assert torch.equal(pc.head.decoder.weight, base.bert.embeddings.word_embeddings.weight)


def test_bare_encoder_is_scored_by_reference_retrieval(bert_dirs, tok):
    from fastft.tasks.metrics import mrr

    clf = fastft.from_pretrained(bert_dirs["bare"], task="classify", labels=["a", "b"])
    p = ForgettingProbe.build(clf, tok, docs=12, max_length=32, batch_size=5)
    got = p.measure(clf)
    assert got["metric"] == "reference_retrieval_mrr" and got["tokens"] == 12
    texts = reference_texts(12)
    emb = fastft.from_pretrained(bert_dirs["bare"], task="embed")

    def e(t):
        enc = tok(t, truncation=True, max_length=32, return_tensors="pt")
        return emb(enc["input_ids"], attention_mask=enc["attention_mask"]).embeddings[0]

    with torch.no_grad():
        halves = [(" ".join(t.split()[: len(t.split()) // 2]), " ".join(t.split()[len(t.split()) // 2:]))
                  for t in texts]
        Q = torch.stack([e(a) for a, _ in halves])
        C = torch.stack([e(b) for _, b in halves])
    assert abs(got["value"] - mrr((Q @ C.T).tolist(), list(range(12)))) <= 1e-6


def test_perplexity_matches_the_models_own_loss():
    from fastft.models.convert import smollm2_path
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_path())
    import tempfile

    d = save_tiny_checkpoint(tempfile.mkdtemp(), "llama", vocab_size=49152, max_position_embeddings=64,
                             num_hidden_layers=1, pad_token_id=2)
    m = fastft.from_pretrained(d)
    p = ForgettingProbe.build(m, tok, docs=6, max_length=24, batch_size=4)
    got = p.measure(m)
    tot = n = 0.0
    with torch.no_grad():
        for ids, am, lab in p.batches:
            k = int((lab[:, 1:] != -100).sum())
            tot += float(m(ids, attention_mask=am, labels=lab).loss) * k
            n += k
    assert got["metric"] == "reference_perplexity" and got["tokens"] == n
    assert abs(got["value"] - torch.tensor(tot / n).exp().item()) <= 1e-5 * got["value"]


def test_report_table_and_signs():
    rep, table = report({"metric": "reference_perplexity", "value": 10.0, "tokens": 5},
                        {"metric": "reference_perplexity", "value": 12.0, "tokens": 5},
                        {"accuracy": 0.25}, {"accuracy": 0.75}, "accuracy")
    assert rep["forgetting"] == pytest.approx(0.2) and rep["task_fine_tuned"] == 0.75
    assert "task accuracy" in table and "{" not in table
    rep, _ = report({"metric": "reference_masked_accuracy", "value": 0.5, "tokens": 5},
                    {"metric": "reference_masked_accuracy", "value": 0.4, "tokens": 5})
    assert rep["forgetting"] == pytest.approx(0.1)


def test_trainer_reports_forgetting(bert_dirs, tok, tmp_path):
    from fastft.tasks.data import ClassificationCollator, tokenize_task
    from fastft.tasks.evaluate import evaluate_task

    recs = [(i, {"text": t, "label": lab}) for i, (t, lab) in enumerate(
        [("good movie", "pos"), ("bad film", "neg"), ("great plot", "pos"), ("awful acting", "neg")] * 2)]
    ds = tokenize_task(recs, tok, "classify", labels=["neg", "pos"])
    # the bare base: scored by reference retrieval, a measure a tiny random model does not score 0 on
    m = fastft.from_pretrained(bert_dirs["bare"], task="classify", labels=["neg", "pos"])
    args = fastft.TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4,
                                    learning_rate=5e-2, logging_steps=2, save_steps=None, plot_loss=False,
                                    disable_tqdm=True, forgetting_steps=2, forgetting_docs=6,
                                    forgetting_max_length=32)
    probe = ForgettingProbe.build(m, tok, docs=6, max_length=32, seed=args.seed, batch_size=8)
    before = probe.measure(m)["value"]
    tr = fastft.Trainer(m, ds, args=args, data_collator=ClassificationCollator(0), tokenizer=tok,
                        task_eval=lambda mm: evaluate_task(mm, ds, "classify", pad_token_id=0),
                        task_metric="accuracy")
    res = tr.train()
    rows = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
    assert rows[0]["step"] == 0 and rows[0]["forgetting_base"]["value"] == before
    assert [r["step"] for r in rows if "forgetting" in r] == [2, 4]
    final = rows[-1]["forgetting_report"]
    assert final == res.forgetting and final["base"] == before
    assert final["fine_tuned"] == probe.measure(m)["value"] != before  # full FT at a high LR moves the encoder
    assert final["task_metric"] == "accuracy" and final["task_fine_tuned"] is not None
    assert (tmp_path / "forgetting.md").read_text().startswith("forgetting report")


def test_trainer_forgetting_needs_a_tokenizer(bert_dirs, tmp_path):
    m = fastft.from_pretrained(bert_dirs["mlm"], task="classify", labels=["a", "b"])
    args = fastft.TrainingArguments(output_dir=str(tmp_path), max_steps=1, forgetting_report=True)
    with pytest.raises(ValueError, match="tokenizer"):
        fastft.Trainer(m, [{"input_ids": [1, 2], "labels": 0}], args=args)
