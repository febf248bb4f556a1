"""`fastft train --task classify|ner|embed` and `fastft eval` (task metrics, --forgetting) end to end
on a tiny BERT with the real all-MiniLM-L6-v2 tokenizer."""
import json
import os
import shutil

import pytest

from models_util import save_tiny_checkpoint

from fastft.cli import main

CLS = [("what a great movie", "pos"), ("terrible and boring", "neg"), ("i loved every minute", "pos"),
       ("a waste of time", "neg"), ("brilliant acting", "pos"), ("the plot made no sense", "neg")]
NER = [(["Alice", "lives", "in", "Paris"], ["B-PER", "O", "O", "B-LOC"]),
       (["Bob", "Smith", "visited", "New", "York"], ["B-PER", "I-PER", "O", "B-LOC", "I-LOC"]),
       (["They", "met", "Carol"], ["O", "O", "B-PER"])]
EMB = [("capital of france", "paris is the capital of france", "berlin is in germany"),
       ("how to boil an egg", "put the egg in boiling water for eight minutes", "eggs are laid by hens"),
       ("python list sort", "use sorted or list.sort to order a list", "pythons are large snakes")]


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    from fastft.models.convert import minilm_path

    d = save_tiny_checkpoint(tmp_path_factory.mktemp("tcli"), "bert", vocab_size=30522, num_hidden_layers=1)
    for f in os.listdir(minilm_path()):
        if f.startswith(("tokenizer", "special_tokens", "vocab")):
            shutil.copy2(os.path.join(minilm_path(), f), d)
    return d


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _run(capsys, argv):
    rc = main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


def _json_tail(out):
    return json.loads(out[out.index("\n{") + 1:] if not out.startswith("{") else out)


@pytest.mark.parametrize("task,method,rows,metric", [
    ("classify", "lora", [{"text": t, "label": y} for t, y in CLS], "accuracy"),
    ("ner", "full", [{"tokens": t, "tags": y} for t, y in NER], "entity_f1"),
    ("embed", "adapter", [{"query": q, "positive": p, "negative": n} for q, p, n in EMB], "mrr"),
])
def test_train_then_eval_task(tiny_bert, tmp_path, capsys, task, method, rows, metric):
    data = _jsonl(tmp_path / "d.jsonl", rows)
    out_dir = tmp_path / "run"
    rc, out, err = _run(capsys, ["train", "--model", tiny_bert, "--data", data, "--eval-data", data, "--task", task,
                                 "--method", method, "--max-steps", "2", "--per-device-train-batch-size", "3",
                                 "--learning-rate", "1e-3", "--output-dir", str(out_dir), "--r", "4",
                                 *(["--bottleneck-size", "8"] if method == "adapter" else []), "--save-steps", "100"])
    assert rc == 0, err
    assert "forgetting report" in out
    res = _json_tail(out)
    assert res["forgetting"]["reference_metric"] == "reference_masked_accuracy"
    assert res["forgetting"]["task_metric"] == metric
    rows_ = [json.loads(x) for x in (out_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows_[0]["step"] == 0 and "forgetting_base" in rows_[0]
    assert rows_[-1]["forgetting_report"] == res["forgetting"]
    info = json.loads((out_dir / "task.json").read_text())
    assert info["task"] == task and info["base_model"] == os.path.abspath(tiny_bert)

    model_args = ["--model", str(out_dir)] if method == "full" else ["--model", tiny_bert, "--adapter", str(out_dir)]
    rc, out2, err = _run(capsys, ["eval", *model_args, "--data", data, "--forgetting"])
    assert rc == 0, err
    ev = _json_tail(out2)
    # the same model on the same data: the training run's final task metrics and forgetting numbers
    assert ev[metric] == res["task_metrics"][metric]
    assert ev["forgetting"]["fine_tuned"] == res["forgetting"]["fine_tuned"]
    assert ev["forgetting"]["base"] == res["forgetting"]["base"]


def test_bad_ner_data_fails_with_file_and_line(tiny_bert, tmp_path, capsys):
    bad = _jsonl(tmp_path / "bad.jsonl", [{"tokens": ["a", "b"], "tags": ["O", "O"]},
                                          {"tokens": ["a", "b"], "tags": ["O"]}])
    out_dir = tmp_path / "never"
    rc, out, err = _run(capsys, ["train", "--model", tiny_bert, "--data", bad, "--task", "ner",
                                 "--output-dir", str(out_dir), "--max-steps", "1"])
    assert rc == 3 and f"{bad}:2: 2 tokens but 1 tags" in err  # exit code 3: bad input data
    assert len(err.strip().splitlines()) == 1 and not out_dir.exists()


def test_labels_and_pooling_need_a_task(tiny_bert, tmp_path, capsys):
    rc, _, err = _run(capsys, ["train", "--model", tiny_bert, "--data", "x.jsonl", "--labels", "a,b"])
    assert rc == 2 and "--labels / --pooling need --task" in err
