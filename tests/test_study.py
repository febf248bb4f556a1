"""benchmarks/study_forgetting.py --quick: every method on tiny stand-ins of both models, the table,
the rows and the plot (the full study runs the real models: `make study`)."""
import json

from benchmarks import study_forgetting as S


def test_intent_classification_data_is_the_shipped_task():
    train, test = S.intent_classification("train"), S.intent_classification("test")
    assert len(train) == 384 and len(test) == 64
    assert len({r["label"] for r in train}) == 8 and {r["label"] for r in test} <= {r["label"] for r in train}
    assert all("\n" not in r["text"] and "Intent" not in r["text"] for r in train)
    from fastft.data.make_intent_classification import convert

    assert convert("train") == train and convert("test") == test  # the shipped files are the generator's


def test_quick_study_runs_every_method(tmp_path):
    assert S.main(["--quick", "--out", str(tmp_path)]) == 0
    rows = [json.loads(x) for x in (tmp_path / "study.jsonl").read_text().splitlines()]
    assert [(r["kind"], r["method"], r["r"]) for r in rows] == [
        (k, m, r) for k in ("encoder", "generative") for m, r in S.METHODS]
    for r in rows:
        assert 0 < r["trainable_params"] <= r["total_params"]
        assert r["task_gain"] == r["task_after"] - r["task_before"]
        assert r["ref_metric"] == ("reference_perplexity" if r["kind"] == "generative"
                                   else "reference_masked_accuracy")
    full = [r for r in rows if r["method"] == "full"]
    lora = {r["r"]: r for r in rows if r["method"] == "lora" and r["kind"] == "encoder"}
    assert all(f["trainable_params"] == f["total_params"] for f in full)
    assert lora[8]["trainable_params"] < lora[16]["trainable_params"] < lora[32]["trainable_params"]
    assert "| lora r=16 |" in (tmp_path / "study.md").read_text()
    assert (tmp_path / "study.png").stat().st_size > 0
