"""The fastft command line: every subcommand answers --help; bad configs fail with one clear line."""
import json
import subprocess
import sys

import pytest

from fastft.cli import build_parser, main

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


def test_train_config_file_unknown_key(tmp_path):
    cfg = tmp_path / "run.json"
    cfg.write_text(json.dumps({"model": "x", "data": "y", "learning_rte": 1e-4}))
    with pytest.raises(SystemExit, match="learning_rte"):
        main(["train", "--config", str(cfg)])


def test_train_requires_model_and_data(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("learning_rate: 0.001\n")
    with pytest.raises(SystemExit, match="--model"):
        main(["train", "--config", str(cfg)])


def test_train_missing_config_file(tmp_path):
    with pytest.raises(SystemExit, match="does not exist"):
        main(["train", "--config", str(tmp_path / "nope.yaml")])


def test_parser_flags_match_training_arguments():
    # every TrainingArguments flag the CLI exposes is a real TrainingArguments field
    import dataclasses

    from fastft.cli import _BOOL_TRAIN_FLAGS, _TRAIN_FLAGS
    from fastft.train import TrainingArguments

    fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    missing = (set(_TRAIN_FLAGS) | set(_BOOL_TRAIN_FLAGS)) - fields
    assert not missing, missing
