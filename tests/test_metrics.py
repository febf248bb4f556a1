"""Task metrics (fastft/tasks/metrics.py) against cases computed by hand, and the data formats'
errors (fastft/tasks/data.py): one line naming file:line for each kind of bad record."""
import json

import pytest

from fastft.tasks import metrics as M
from fastft.tasks.data import align_word_tags, labels_of, read_task_records, tokenize_task


def test_accuracy_and_macro_f1_by_hand():
    assert M.accuracy([1, 0, 2, 2], [1, 1, 2, 0]) == 0.5
    # a: tp1 fp0 fn1 -> 2/3; b: tp1 fp1 fn0 -> 2/3; c: tp1 -> 1
    assert M.macro_f1(["a", "b", "b", "c"], ["a", "a", "b", "c"]) == pytest.approx((2 / 3 + 2 / 3 + 1) / 3)
    # a label named but never seen scores 0 and counts in the mean (scikit-learn's labels= semantics)
    assert M.macro_f1([0, 0], [0, 0], labels=[0, 1]) == 0.5
    # a class only predicted (never gold) counts with F1 0
    assert M.macro_f1([0, 1], [0, 0]) == pytest.approx((2 / 3 + 0) / 2)
    with pytest.raises(ValueError, match="2 predictions but 1"):
        M.accuracy([0, 1], [0])


def test_bio_entities_follow_seqeval_default_rules():
    tags = ["B-PER", "I-PER", "O", "I-LOC", "I-LOC", "B-LOC", "I-PER", "B-ORG", "B-ORG"]
    assert M.bio_entities(tags) == {("PER", 0, 2), ("LOC", 3, 5), ("LOC", 5, 6), ("PER", 6, 7), ("ORG", 7, 8),
                                    ("ORG", 8, 9)}
    assert M.bio_entities(["I-X"]) == {("X", 0, 1)}  # I- without B- starts an entity
    assert M.bio_entities(["O", "O"]) == set()
    with pytest.raises(ValueError, match="not BIO"):
        M.bio_entities(["B-PER", "X-PER"])


def test_entity_f1_exact_span_match_by_hand():
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O"]]
    pred = [["B-PER", "O", "O", "B-LOC"], ["B-ORG", "B-LOC"]]
    # pred entities: PER(0,1) LOC(3,4) ORG(0,1) LOC(1,2) = 4; gold: PER(0,2) LOC(3,4) ORG(0,1) = 3; exact: 2
    r = M.entity_prf(pred, gold)
    assert (r["true_positives"], r["predicted"], r["gold"]) == (2, 4, 3)
    assert r["precision"] == 0.5 and r["recall"] == pytest.approx(2 / 3)
    assert r["f1"] == pytest.approx(2 * 0.5 * (2 / 3) / (0.5 + 2 / 3))
    assert M.entity_f1([["O"]], [["O"]]) == 0.0  # nothing to find, nothing found: 0 (seqeval's convention)
    with pytest.raises(ValueError, match="sentence 0"):
        M.entity_f1([["O"]], [["O", "O"]])


def test_recall_at_k_and_mrr_by_hand():
    scores = [[0.1, 0.9, 0.3], [0.5, 0.2, 0.5], [0.0, 0.1, 0.2]]
    targets = [1, 0, 0]
    assert M.ranks(scores, targets) == [1, 2, 3]  # the tie in row 1 ranks the target second
    assert M.recall_at_k(scores, targets, 1) == pytest.approx(1 / 3)
    assert M.recall_at_k(scores, targets, 2) == pytest.approx(2 / 3)
    assert M.recall_at_k(scores, targets, 3) == 1.0
    assert M.mrr(scores, targets) == pytest.approx((1 + 1 / 2 + 1 / 3) / 3)
    with pytest.raises(ValueError, match="target 3"):
        M.mrr([[0.1, 0.2]], [3])


# --- data formats -------------------------------------------------------------------------------
def _write(tmp_path, rows, name="d.jsonl"):
    p = tmp_path / name
    p.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(p)


@pytest.mark.parametrize("task,rows,msg", [
    ("ner", [{"tokens": ["a"], "tags": ["O"]}, {"tokens": [], "tags": []}], "empty tag sequence"),
    ("ner", [{"tokens": ["a", "b"], "tags": ["O"]}], "2 tokens but 1 tags"),
    ("ner", [{"tokens": ["a"], "tags": ["PER"]}], "not BIO"),
    ("classify", [{"text": "x", "label": "a"}, {"text": "", "label": "b"}], "'text' must be a non-empty"),
    ("classify", [{"text": "x"}], "missing \\['label'\\]"),
    ("embed", [{"query": "q", "positive": "p", "negative": ""}], "'negative' must be a non-empty"),
    ("classify", ['{"text": "x", "label": "a"}', '{"text": '], "malformed JSON"),
])
def test_bad_records_name_file_and_line(tmp_path, task, rows, msg):
    p = _write(tmp_path, rows)
    with pytest.raises(ValueError, match=msg) as e:
        read_task_records(p, task)
    assert f"{p}:{len(rows)}" in str(e.value)


def test_unknown_label_in_eval_data_names_file_and_line(tmp_path):
    from transformers import AutoTokenizer

    from fastft.models.convert import minilm_path

    tok = AutoTokenizer.from_pretrained(minilm_path())
    train = read_task_records(_write(tmp_path, [{"text": "hi", "label": "a"}, {"text": "yo", "label": "b"}]),
                              "classify")
    labels = labels_of(train, "classify")
    ev = _write(tmp_path, [{"text": "x", "label": "b"}, {"text": "y", "label": "c"}], "ev.jsonl")
    with pytest.raises(ValueError, match=f"{ev}:2: unknown label 'c'"):
        tokenize_task(read_task_records(ev, "classify"), tok, "classify", labels=labels, source=ev)
    ner = _write(tmp_path, [{"tokens": ["a"], "tags": ["B-MISC"]}], "ner.jsonl")
    with pytest.raises(ValueError, match=f"{ner}:1: unknown tag 'B-MISC'"):
        tokenize_task(read_task_records(ner, "ner"), tok, "ner", labels=["O", "B-PER", "I-PER"], source=ner)


def test_ner_labels_first_subword_only_real_tokenizer():
    from transformers import AutoTokenizer

    from fastft.models.convert import minilm_path

    tok = AutoTokenizer.from_pretrained(minilm_path())
    words, tags = ["Johanson", "visited", "Reykjavik", "."], ["B-PER", "O", "B-LOC", "O"]
    labels = ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"]
    ex = tokenize_task([(1, {"tokens": words, "tags": tags})], tok, "ner", labels=labels)[0]
    # transformers' own word alignment of the same words
    enc = tok(words, is_split_into_words=True)
    assert ex["input_ids"] == enc["input_ids"]
    want, prev = [], None
    for w in enc.word_ids():
        want.append(-100 if w is None or w == prev else labels.index(tags[w]))
        prev = w
    assert ex["labels"] == want
    assert sum(x != -100 for x in ex["labels"]) == len(words) < len(ex["input_ids"]) - 2  # sub-words exist


def test_align_word_tags_truncates_at_word_starts():
    ids, labs, kept = align_word_tags([[5, 6], [7], [8, 9, 10]], [1, 0, 2], prefix=1, suffix=1, max_length=6)
    assert ids == [5, 6, 7, 8] and labs == [1, -100, 0, 2] and kept == 3
    ids, labs, kept = align_word_tags([[5, 6], [7], [8, 9, 10]], [1, 0, 2], prefix=1, suffix=1, max_length=5)
    assert ids == [5, 6, 7] and kept == 2


def test_label_sets_from_training_records():
    recs = [(1, {"tokens": ["a", "b"], "tags": ["B-PER", "I-PER"]}), (2, {"tokens": ["c"], "tags": ["B-LOC"]})]
    assert labels_of(recs, "ner") == ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"]
    assert labels_of([(1, {"text": "x", "label": 3}), (2, {"text": "y", "label": "1"})], "classify") == ["1", "3"]
