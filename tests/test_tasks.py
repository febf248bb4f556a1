"""Task heads (fastft/models/heads.py): parity with transformers' classes after saving, for full
fine-tuning (save_pretrained -> AutoModelFor*), LoRA (adapter -> peft.PeftModel over the Auto class),
QLoRA and bottleneck adapters (reloaded by fastft), on tiny random BERT / RoBERTa / Llama checkpoints.

"Fine-tuning" here is a random perturbation of every trainable tensor: the saved files must carry
whatever the training changed, and a perturbation changes every tensor (LoRA B starts at zero, a
head starts random) so nothing can be missed by a test that happens to start from the initial values.
"""

import pytest
import torch

from models_util import one_thread, save_tiny_checkpoint  # noqa: F401
from utils import rel_err

import fastft
from fastft.models.heads import default_modules_to_save, mean_pool

TOL = 1e-5  # fp32, same ops in a different order (rel. err. of the logits)
LABELS = ["neg", "neu", "pos"]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("tasks")
    return {a: save_tiny_checkpoint(root / a, a) for a in ("bert", "roberta", "llama")}


def _batch(pad, lens=(9, 5, 7), seed=0):
    g = torch.Generator().manual_seed(seed)
    T = max(lens)
    ids = torch.full((len(lens), T), pad, dtype=torch.long)
    am = torch.zeros(len(lens), T, dtype=torch.long)
    for i, n in enumerate(lens):
        ids[i, :n] = torch.randint(3, 100, (n,), generator=g)
        am[i, :n] = 1
    return ids, am


def _perturb(model, seed=1, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * scale)


def _hf(cls_name, path, **kw):
    import transformers

    return getattr(transformers, cls_name).from_pretrained(path, dtype=torch.float32, **kw).eval()


def _logits(model, ids, am):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=am).logits


# --- full fine-tuning: save_pretrained -> transformers' classes -------------------------------------------------
@pytest.mark.parametrize("arch", ["bert", "roberta"])
def test_sequence_classification_full_ft_loads_in_transformers(ckpts, arch, tmp_path):
    m = fastft.from_pretrained(ckpts[arch], task="classify", labels=LABELS)
    assert type(m).__name__ == "BertForSequenceClassification" and m.pooling == "cls"
    _perturb(m)
    m.save_pretrained(tmp_path)
    hf = _hf("AutoModelForSequenceClassification", tmp_path)
    assert type(hf).__name__ == m.hf_architecture
    assert hf.config.id2label == {0: "neg", 1: "neu", 2: "pos"}
    ids, am = _batch(m.config.pad_token_id)
    a, b = _logits(m, ids, am), _logits(hf, ids, am)
    assert rel_err(a, b) <= TOL
    # and fastft reads its own save back as the same task, predictions unchanged
    again = fastft.from_pretrained(tmp_path)
    assert type(again) is type(m) and torch.equal(_logits(again, ids, am), a)


def test_token_classification_full_ft_loads_in_transformers(ckpts, tmp_path):
    m = fastft.from_pretrained(ckpts["bert"], task="ner", labels=["O", "B-PER", "I-PER"])
    _perturb(m)
    m.save_pretrained(tmp_path)
    hf = _hf("AutoModelForTokenClassification", tmp_path)
    assert type(hf).__name__ == "BertForTokenClassification"
    ids, am = _batch(0)
    a, b = _logits(m, ids, am), _logits(hf, ids, am)
    real = am.bool()
    assert rel_err(a[real], b[real]) <= TOL


def test_sentence_embedding_full_ft_loads_as_bert_model(ckpts, tmp_path):
    m = fastft.from_pretrained(ckpts["bert"], task="embed")
    assert not any(n.startswith("bert.") for n, _ in m.named_parameters())  # BertModel's layout
    _perturb(m)
    m.save_pretrained(tmp_path)
    hf = _hf("AutoModel", tmp_path)
    ids, am = _batch(0)
    with torch.no_grad():
        ours = m(ids, attention_mask=am).embeddings
        ref = torch.nn.functional.normalize(mean_pool(hf(ids, attention_mask=am).last_hidden_state, am), dim=-1)
    assert rel_err(ours, ref) <= TOL
    assert type(fastft.from_pretrained(tmp_path)).__name__ == "BertForSentenceEmbedding"


def test_llama_sequence_classification_matches_transformers(ckpts, tmp_path):
    m = fastft.from_pretrained(ckpts["llama"], task="classify", labels=LABELS)
    assert type(m).__name__ == "LlamaForSequenceClassification"
    assert not any("lm_head" in n for n, _ in m.named_parameters())
    _perturb(m)
    m.save_pretrained(tmp_path)
    hf = _hf("AutoModelForSequenceClassification", tmp_path)
    assert type(hf).__name__ == "LlamaForSequenceClassification"
    ids, am = _batch(m.config.pad_token_id)  # right padding: the last non-pad token differs per row
    assert rel_err(_logits(m, ids, am), _logits(hf, ids, am)) <= TOL


def test_mean_pooling_classifier_roundtrips_in_fastft(ckpts, tmp_path):
    m = fastft.from_pretrained(ckpts["bert"], task="classify", labels=LABELS, pooling="mean")
    assert not hasattr(m.bert, "pooler")
    _perturb(m)
    ids, am = _batch(0)
    with torch.no_grad():
        h, _ = m.encode(ids, am)
        want = m.classifier(mean_pool(h, am))
    assert torch.allclose(_logits(m, ids, am), want)
    with pytest.warns(UserWarning, match="transformers"):
        m.save_pretrained(tmp_path)
    again = fastft.from_pretrained(tmp_path)
    assert again.pooling == "mean" and torch.equal(_logits(again, ids, am), _logits(m, ids, am))


# --- LoRA: adapter (head in modules_to_save) -> peft.PeftModel over transformers' classes -------------------------
@pytest.mark.parametrize("task,auto,task_type", [
    ("classify", "AutoModelForSequenceClassification", "SEQ_CLS"),
    ("ner", "AutoModelForTokenClassification", "TOKEN_CLS"),
    ("embed", "AutoModel", "FEATURE_EXTRACTION"),
])
def test_lora_adapter_loads_with_peft(ckpts, task, auto, task_type, tmp_path):
    from peft import PeftModel

    base = ckpts["bert"]
    labels = None if task == "embed" else LABELS
    m = fastft.from_pretrained(base, task=task, labels=labels)
    mts = default_modules_to_save(m)
    assert mts == {"classify": ["classifier", "pooler"], "ner": ["classifier"], "embed": []}[task]
    pm = fastft.get_peft_model(m, fastft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"],
                                                    modules_to_save=mts or None, task_type=task_type))
    _perturb(pm)
    pm.eval()
    pm.save_pretrained(tmp_path / "adapter")
    kw = {} if task == "embed" else {"num_labels": 3}
    hf = PeftModel.from_pretrained(_hf(auto, base, **kw), tmp_path / "adapter").eval()
    ids, am = _batch(0)
    with torch.no_grad():
        if task == "embed":
            ours = pm(input_ids=ids, attention_mask=am).embeddings
            h = hf(input_ids=ids, attention_mask=am).last_hidden_state
            ref = torch.nn.functional.normalize(mean_pool(h, am), dim=-1)
            assert rel_err(ours, ref) <= TOL
        else:
            a, b = pm(input_ids=ids, attention_mask=am).logits, hf(input_ids=ids, attention_mask=am).logits
            real = am.bool() if task == "ner" else slice(None)
            assert rel_err(a[real], b[real]) <= TOL


def test_llama_lora_classifier_loads_with_peft(ckpts, tmp_path):
    from peft import PeftModel

    m = fastft.from_pretrained(ckpts["llama"], task="classify", labels=LABELS)
    assert default_modules_to_save(m) == ["score"]
    pm = fastft.get_peft_model(m, fastft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                    modules_to_save=["score"], task_type="SEQ_CLS"))
    assert "score" not in pm.lora_layers()
    _perturb(pm)
    pm.eval().save_pretrained(tmp_path)
    hf = PeftModel.from_pretrained(_hf("AutoModelForSequenceClassification", ckpts["llama"], num_labels=3),
                                   tmp_path).eval()
    ids, am = _batch(0)
    assert rel_err(_logits(pm, ids, am), _logits(hf, ids, am)) <= TOL


# --- QLoRA and bottleneck adapters: trained, saved, reloaded by fastft -----------------------------------------
@pytest.mark.parametrize("method,task", [("qlora", "classify"), ("adapter", "classify"), ("qlora", "ner"),
                                         ("adapter", "embed")])
def test_quantized_and_adapter_heads_train_and_reload(ckpts, method, task, tmp_path):
    quant = "nf4" if method == "qlora" else None
    kw = dict(task=task, labels=None if task == "embed" else LABELS, quantization=quant)
    m = fastft.from_pretrained(ckpts["bert"], **kw)
    mts = default_modules_to_save(m) or None
    cfg = (fastft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", modules_to_save=mts)
           if method == "qlora" else fastft.AdapterConfig(bottleneck_size=8, modules_to_save=mts))
    pm = fastft.get_peft_model(m, cfg)
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    if task != "embed":
        assert any(".classifier.modules_to_save." in n for n in trainable)
    assert not any("word_embeddings" in n for n in trainable)
    ids, am = _batch(0)
    batch = {"input_ids": ids, "attention_mask": am}
    if task == "classify":
        batch["labels"] = torch.tensor([0, 2, 1])
    elif task == "ner":
        batch["labels"] = torch.where(am.bool(), ids % 3, -100)
    else:
        batch["positive_input_ids"], batch["positive_attention_mask"] = _batch(0, seed=5)
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    pm.eval()  # no dropout: six steps on one batch must lower its loss
    losses = []
    for _ in range(6):
        loss = pm(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.detach().item())
    assert losses[-1] < losses[0]
    pm.eval().save_pretrained(tmp_path)
    again = fastft.load_adapter(fastft.from_pretrained(ckpts["bert"], **kw), tmp_path).eval()
    with torch.no_grad():
        a, b = pm(input_ids=ids, attention_mask=am), again(input_ids=ids, attention_mask=am)
    key = "embeddings" if task == "embed" else "logits"
    assert torch.equal(getattr(a, key), getattr(b, key))


def test_patched_transformers_classifier_trains_with_fastft(ckpts, tmp_path):
    """A transformers BertForSequenceClassification under fastft.patch: same logits, LoRA + head train."""
    from fastft.tasks.data import ClassificationCollator

    hf = _hf("AutoModelForSequenceClassification", ckpts["bert"], num_labels=3)
    ids, am = _batch(0)
    before = _logits(hf, ids, am)
    model = fastft.patch(hf)
    assert torch.allclose(_logits(model, ids, am), before, atol=1e-5)
    pm = fastft.get_peft_model(model, fastft.LoraConfig(r=4, target_modules=["query", "value"],
                                                        modules_to_save=["classifier"]))
    ds = [{"input_ids": ids[i][am[i].bool()].tolist(), "labels": int(i % 3)} for i in range(3)] * 4
    args = fastft.TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=3,
                                    gradient_accumulation_steps=2, learning_rate=1e-2, logging_steps=1,
                                    save_steps=None, plot_loss=False, disable_tqdm=True)
    res = fastft.Trainer(pm, ds, args=args, data_collator=ClassificationCollator(pad_token_id=0)).train()
    assert res.losses[-1] < res.losses[0]


def test_classification_loss_is_a_sum_over_num_items(ckpts):
    m = fastft.from_pretrained(ckpts["bert"], task="classify", labels=LABELS)
    ids, am = _batch(0)
    y = torch.tensor([0, -100, 1])
    with torch.no_grad():
        logits = _logits(m, ids, am)
        want = torch.nn.functional.cross_entropy(logits[[0, 2]], y[[0, 2]], reduction="sum")
        assert torch.allclose(m(ids, attention_mask=am, labels=y).loss, want / 2)
        assert torch.allclose(m(ids, attention_mask=am, labels=y, num_items_in_batch=8).loss, want / 8)


def test_contrastive_loss_against_hand_computation(ckpts):
    m = fastft.from_pretrained(ckpts["bert"], task="embed")
    q, qm = _batch(0, (6, 4, 5), seed=1)
    p, pmask = _batch(0, (3, 7, 5), seed=2)
    n, nm = _batch(0, (4, 4), seed=3)
    with torch.no_grad():
        out = m(q, qm, positive_input_ids=p, positive_attention_mask=pmask, negative_input_ids=n,
                negative_attention_mask=nm)
        eq, ep, en = m.embed(q, qm), m.embed(p, pmask), m.embed(n, nm)
    cands = torch.cat([ep, en])
    want = 0.0
    for i in range(3):
        s = [20.0 * float(eq[i] @ c) for c in cands]
        want += -s[i] + torch.logsumexp(torch.tensor(s), 0).item()
    assert abs(float(out.loss) - want / 3) <= 1e-5 * abs(want)
    assert out.scores.shape == (3, 5)


def test_bad_task_arguments_raise(ckpts):
    with pytest.raises(ValueError, match="task must be one of"):
        fastft.from_pretrained(ckpts["bert"], task="qa")
    with pytest.raises(ValueError, match="at least 2 labels"):
        fastft.from_pretrained(ckpts["bert"], task="classify", labels=["only"])
    with pytest.raises(ValueError, match="BERT family only"):
        fastft.from_pretrained(ckpts["llama"], task="ner", labels=LABELS)
    with pytest.raises(ValueError, match="pooling"):
        fastft.from_pretrained(ckpts["bert"], task="ner", labels=LABELS, pooling="mean")
