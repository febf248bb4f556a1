"""The fastft command line: every subcommand answers --help; bad configs fail with one clear line."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fastft.cli import main

SUBCOMMANDS = ["train", "eval", "generate", "merge", "convert", "quantize", "demo", "bench"]


@pytest.mark.parametrize("cmd", SUBCOMMANDS)
def test_help(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([cmd, "--help"])
    assert e.value.code == 0
    assert cmd in capsys.readouterr().out


def test_console_script_help():
    out = subprocess.run([sys.executable, "-m", "fastft.cli", "--help"], capture_output=True, text=True, check=True)
    for cmd in SUBCOMMANDS:
        assert cmd in out.stdout


def test_train_config_file_unknown_key(tmp_path, capsys):
    cfg = tmp_path / "run.json"
    cfg.write_text(json.dumps({"model": "x", "data": "y", "learning_rte": 1e-4}))
    assert main(["train", "--config", str(cfg)]) == 2
    assert "learning_rte" in capsys.readouterr().err


def test_train_requires_model_and_data(tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("learning_rate: 0.001\n")
    assert main(["train", "--config", str(cfg)]) == 2
    assert "--model" in capsys.readouterr().err


def test_train_missing_config_file(tmp_path, capsys):
    assert main(["train", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_parser_flags_match_training_arguments():
    # every TrainingArguments flag the CLI exposes is a real TrainingArguments field
    import dataclasses

    from fastft.cli import _BOOL_TRAIN_FLAGS, _TRAIN_FLAGS
    from fastft.train import TrainingArguments

    fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    missing = (set(_TRAIN_FLAGS) | set(_BOOL_TRAIN_FLAGS)) - fields
    assert not missing, missing


# --- end to end on a tiny Llama with the real SmolLM2 tokenizer ---------------------------------
import math  # noqa: E402
import shutil  # noqa: E402


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory):
    from models_util import save_tiny_checkpoint

    from fastft.models.convert import smollm2_path

    tok_src = smollm2_path()
    d = save_tiny_checkpoint(tmp_path_factory.mktemp("cli"), "llama", vocab_size=49152, max_position_embeddings=128,
                             bos_token_id=1, eos_token_id=2, pad_token_id=2, num_hidden_layers=1)
    for f in os.listdir(tok_src):
        if f.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy2(os.path.join(tok_src, f), d)
    return d


@pytest.fixture(scope="module")
def pc_data(tmp_path_factory):
    p = tmp_path_factory.mktemp("data") / "train.jsonl"
    rows = [{"prompt": f"Q: {a} plus {b}?\nA:", "completion": f" {a + b}"} for a in range(4) for b in range(4)]
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(p)


def _run(capsys, argv):
    rc = main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.mark.parametrize("method", ["lora", "qlora", "full"])
def test_train_eval_generate_merge(tiny_llama_dir, pc_data, tmp_path, capsys, method):
    import torch
    import transformers

    import fastft

    out_dir = tmp_path / f"run-{method}"
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"model: {tiny_llama_dir}\ndata: {pc_data}\nmethod: {method}\nmax_steps: 3\n"
                   f"per_device_train_batch_size: 4\nlearning_rate: 0.01\noutput_dir: {out_dir}\nlogging_steps: 1\n")
    rc, out, err = _run(capsys, ["train", "--config", str(cfg), "--r", "4"])
    assert rc == 0, err
    res = json.loads(out[out.index("{"):])
    assert res["output_dir"] == str(out_dir)
    lines = [json.loads(x) for x in (out_dir / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "loss" in x][:3] == [1, 2, 3]
    assert (out_dir / "loss.png").stat().st_size > 0
    if method == "full":
        # a full fine-tune saves an HF checkpoint that transformers loads
        hf = transformers.AutoModelForCausalLM.from_pretrained(str(out_dir))
        assert hf.config.vocab_size == 49152
        return
    assert (out_dir / "adapter_config.json").exists() and (out_dir / "adapter_model.safetensors").exists()

    rc, out, err = _run(capsys, ["eval", "--model", tiny_llama_dir, "--adapter", str(out_dir), "--data", pc_data])
    assert rc == 0, err
    ev = json.loads(out)
    from fastft.train import load_dataset
    from transformers import AutoTokenizer

    ds = load_dataset(pc_data, AutoTokenizer.from_pretrained(tiny_llama_dir), objective="clm", max_length=512)
    assert ev["tokens"] == sum(sum(t != -100 for t in ex["labels"][1:]) for ex in ds) >= 2 * len(ds)
    assert abs(ev["perplexity"] - math.exp(ev["loss"])) <= 1e-6 * ev["perplexity"]

    rc, out, err = _run(capsys, ["generate", "--model", tiny_llama_dir, "--adapter", str(out_dir), "--prompt",
                                 "Q: 1 plus 2?\nA:", "--max-new-tokens", "3"])
    assert rc == 0, err
    if method == "lora":
        merged = tmp_path / "merged"
        rc, out, err = _run(capsys, ["merge", "--model", tiny_llama_dir, "--adapter", str(out_dir), "--out", str(merged)])
        assert rc == 0, err
        ids = torch.tensor([[1, 5, 9, 200, 3000]])
        with torch.no_grad():
            ref = fastft.load_adapter(fastft.from_pretrained(tiny_llama_dir), str(out_dir))(input_ids=ids).logits
            hf = transformers.AutoModelForCausalLM.from_pretrained(str(merged)).eval()(input_ids=ids).logits
        assert ((hf - ref).norm() / ref.norm()).item() <= 1e-5


def test_train_bad_data_names_file_and_line(tiny_llama_dir, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": \n')
    out_dir = tmp_path / "never"
    rc, out, err = _run(capsys, ["train", "--model", tiny_llama_dir, "--data", str(bad), "--output-dir", str(out_dir),
                                 "--max-steps", "1"])
    assert rc == 3  # bad input data (docs/errors.md)
    assert f"{bad}:2" in err
    assert not out_dir.exists()


def test_train_rejects_full_finetune_of_quantized_base(tiny_llama_dir, pc_data, tmp_path, capsys):
    assert main(["train", "--model", tiny_llama_dir, "--data", pc_data, "--method", "full", "--quantization", "nf4",
                 "--output-dir", str(tmp_path / "x")]) == 2
    assert "quantized" in capsys.readouterr().err


@pytest.mark.slow
def test_bench_runs_from_an_installed_package(tmp_path):
    """`fastft bench` from a regular (non-editable) install, run outside the checkout: the benchmarks
    ship as fastft.benchmarks and a tiny suite (the CPU ceilings, small shapes) really runs and records
    its rows under the working directory (not inside the installed package)."""
    repo = Path(__file__).resolve().parents[1]
    target = tmp_path / "site"
    env = {**os.environ, "FASTFT_BUILD_EXT": "0", "PIP_NO_INDEX": "1"}
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                        "--target", str(target), str(repo)], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (target / "fastft" / "benchmarks" / "run.py").is_file()
    assert not (target / "fastft" / "benchmarks" / "results").exists()  # recorded rows are not shipped
    work = tmp_path / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("FASTFT_RESULTS_DIR",)}
    env.update(PYTHONPATH=str(target), FASTFT_BENCH_QUICK="1")
    r = subprocess.run([sys.executable, "-m", "fastft.cli", "bench", "--suite", "cpu", "--only", "ceilings"],
                       cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    where = subprocess.run([sys.executable, "-c", "import fastft.benchmarks.run as m; print(m.__file__)"],
                           cwd=work, env=env, capture_output=True, text=True, timeout=120).stdout.strip()
    assert Path(where).is_relative_to(target)  # the run above used the installed copy, not the checkout
    rows = [json.loads(line) for line in (work / "fastft-bench-results" / "cpu.jsonl").read_text().splitlines()]
    cases = {row["case"] for row in rows}
    assert any(c.startswith("ceiling: copy_") for c in cases) and any(c.startswith("ceiling: matmul") for c in cases)
    assert all(row["median_ms"] > 0 for row in rows if "median_ms" in row)
