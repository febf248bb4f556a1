"""Bad input -> one clear line, the documented exit code, nothing heavy loaded first (issue 19, item 1).

``CASES`` is the table of docs/errors.md: each row is run here (CLI rows through ``fastft.cli.main``
in-process, API rows through the Python API) and ``test_docs_errors_md_in_sync`` checks that the
document is exactly the rendering of this list (regenerate it with ``FASTFT_UPDATE_DOCS=1``).

A CLI row passes when the command exits with the row's code, prints exactly one line on stderr of
the form ``fastft <cmd>: error: ...`` containing every expected fragment (with the real paths),
and no traceback. An API row passes when the call raises a ``fastft.errors.FastftUserError`` whose
``exit_code`` is the row's and whose message holds the fragments. The fake model directories have
valid-looking files but no real weights: every row must fail before any model is loaded, so a
check that came too late shows up as an internal error (exit 1) instead of the row's code.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import pytest
import torch
from safetensors.torch import save_file

import reliability_figures
from fastft.cli import build_parser, main
from fastft.errors import EXIT_CODES, FastftUserError

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "errors.md"


@dataclass
class Case:
    id: str
    input: str  # what the user did (markdown)
    setup: Callable  # E -> (argv, placeholders) for the CLI, or (callable, placeholders) for the API
    expect: tuple  # message fragments; {name} is a placeholder for a path (rendered <name> in the doc)
    code: int
    api: bool = False


def C(id, input, setup, expect, code, api=False):
    return Case(id, input, setup, (expect,) if isinstance(expect, str) else tuple(expect), code, api)


# --- environment: fake-but-valid-looking inputs, built once per test in tmp_path ------------------
def _safetensors(path, tensors=None):
    save_file(tensors or {"w": torch.zeros(2, 2)}, str(path))
    return str(path)


def make_env(tmp: Path):
    E = SimpleNamespace(tmp=tmp)

    def write(name, content):
        p = tmp / name
        p.parent.mkdir(parents=True, exist_ok=True)
        (p.write_bytes if isinstance(content, bytes) else p.write_text)(content)
        return str(p)

    def mkdir(name, files=None):
        d = tmp / name
        d.mkdir(parents=True, exist_ok=True)
        for f, c in (files or {}).items():
            write(f"{name}/{f}", c)
        return str(d)

    E.write, E.mkdir = write, mkdir
    E.model = mkdir("model", {"config.json": json.dumps({"model_type": "llama"}), "tokenizer.json": "{}"})
    _safetensors(tmp / "model" / "model.safetensors")
    E.adapter = mkdir("adapter", {"adapter_config.json": json.dumps({"peft_type": "LORA", "r": 2})})
    _safetensors(tmp / "adapter" / "adapter_model.safetensors")
    E.data = write("train.jsonl", '{"text": "hello"}\n{"prompt": "a", "completion": " b"}\n')
    E.out = str(tmp / "out")
    return E


def train(E, *extra):
    return ["train", "--model", E.model, "--data", E.data, "--output-dir", E.out, *extra]


def model_variant(E, name, files, weights=True):
    d = E.mkdir(name, files)
    if weights:
        _safetensors(Path(d) / "model.safetensors")
    return d


def adapter_variant(E, name, config=True, weights="ok"):
    files = {"adapter_config.json": json.dumps({"peft_type": "LORA", "r": 2})} if config else {}
    if config == "bad":
        files = {"adapter_config.json": "{r: 2"}
    d = E.mkdir(name, files)
    if weights == "ok":
        _safetensors(Path(d) / "adapter_model.safetensors")
    elif weights == "truncated":
        raw = Path(_safetensors(Path(d) / "adapter_model.safetensors")).read_bytes()
        (Path(d) / "adapter_model.safetensors").write_bytes(raw[:-3])
    return d


def cfg(E, name, text):
    p = E.write(name, text)
    return ["train", "--config", p], {"cfg": p}


def data(E, name, text, flag="--data"):
    p = E.write(name, text)
    argv = train(E) if flag == "--data" else train(E, flag, p)
    if flag == "--data":
        argv[argv.index(E.data)] = p
    return argv, {"data": p}


# --- API helpers --------------------------------------------------------------------------------
class TinyLM(torch.nn.Module):
    """Just enough of a causal LM for the Trainer: embedding -> linear, mean CE over targets."""

    def __init__(self, vocab=16, nan=False):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, 8)
        self.head = torch.nn.Linear(8, vocab)
        self.nan = nan

    def forward(self, input_ids, labels=None, attention_mask=None, num_items_in_batch=None):
        h = self.emb(input_ids)
        if self.nan:
            h = h * float("nan")
        logits = self.head(h)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                 labels[:, 1:].reshape(-1), ignore_index=-100,
                                                 reduction="sum") / max(1, num_items_in_batch or 1)
        return SimpleNamespace(loss=loss, logits=logits)


def _ds(n=4, masked=False):
    return [{"input_ids": [1, 2, 3, 4], "labels": [-100] * 4 if masked else [1, 2, 3, 4]} for _ in range(n)]


def _targs(E, **kw):
    from fastft.train import TrainingArguments

    base = dict(output_dir=E.out, per_device_train_batch_size=2, max_steps=2, save_steps=1, logging_steps=1,
                disable_tqdm=True, plot_loss=False, save_final_model=False, seed=0)
    base.update(kw)
    return TrainingArguments(**base)


def api_trainer(E, model=None, ds=None, **kw):
    from fastft.train import Trainer

    return lambda: Trainer(model or TinyLM(), ds or _ds(), args=_targs(E, **kw)).train()


def api_prior_run(E):
    """A finished run in E.out (2 checkpoints)."""
    from fastft.train import Trainer

    Trainer(TinyLM(), _ds(), args=_targs(E)).train()
    return E.out


def api_corrupt_ckpt(E, fname, content):
    api_prior_run(E)
    p = Path(E.out) / "checkpoint-2" / fname
    p.write_bytes(content(p.read_bytes())) if callable(content) else p.write_text(content)
    return api_trainer(E, resume_from_checkpoint=True), {"path": str(p)}


def api_other_run_resume(E):
    api_prior_run(E)
    other = str(E.tmp / "other")
    from fastft.train import Trainer

    Trainer(TinyLM(), _ds(), args=_targs(E, output_dir=other)).train()
    # a checkpoint of run "other" copied into E.out, newest: resume=True must refuse it
    import shutil

    shutil.copytree(Path(other) / "checkpoint-2", Path(E.out) / "checkpoint-9")
    return api_trainer(E, resume_from_checkpoint=True, max_steps=10), {"ck": str(Path(E.out) / "checkpoint-9")}


def api_op(fn):
    return lambda E: (fn, {})


import fastft.ops as _ops  # noqa: E402

_x = torch.randn(2, 3, 8)

# --- the table ------------------------------------------------------------------------------------
CASES = [
    # command line: options
    C("cli-unknown-command", "`fastft trian`", lambda E: (["trian"], {}), "invalid choice: 'trian'", 2),
    C("cli-unknown-flag", "`fastft train --learnin-rate 1e-4` (misspelt flag)",
      lambda E: (train(E, "--learnin-rate", "1e-4"), {}), "unrecognized arguments: --learnin-rate", 2),
    C("cli-abbreviated-flag", "`--learning-rat 1e-4` (abbreviations are not accepted)",
      lambda E: (train(E, "--learning-rat", "1e-4"), {}), "unrecognized arguments: --learning-rat", 2),
    C("cli-bad-float", "`--learning-rate fast`", lambda E: (train(E, "--learning-rate", "fast"), {}),
      "argument --learning-rate: invalid float value: 'fast'", 2),
    C("cli-bad-int", "`--max-steps 2.5`", lambda E: (train(E, "--max-steps", "2.5"), {}),
      "argument --max-steps: invalid int value: '2.5'", 2),
    C("cli-bad-method", "`--method lorra`", lambda E: (train(E, "--method", "lorra"), {}),
      "argument --method: invalid choice: 'lorra'", 2),
    C("cli-bad-scheduler", "`--lr-scheduler-type cosin`", lambda E: (train(E, "--lr-scheduler-type", "cosin"), {}),
      "invalid choice: 'cosin'", 2),
    C("cli-missing-model", "`fastft train --data d.jsonl` (no model)", lambda E: (["train", "--data", E.data], {}),
      "--model is required", 2),
    C("cli-missing-data", "`fastft train --model m` (no data)", lambda E: (["train", "--model", E.model], {}),
      "--data is required", 2),
    C("cli-rank-zero", "`--r 0`", lambda E: (train(E, "--r", "0"), {}), "--r must be >= 1, got 0", 2),
    C("cli-alpha-negative", "`--lora-alpha -1`", lambda E: (train(E, "--lora-alpha", "-1"), {}),
      "--lora-alpha must be a positive number", 2),
    C("cli-dropout-one", "`--lora-dropout 1.0`", lambda E: (train(E, "--lora-dropout", "1.0"), {}),
      "--lora-dropout must be in [0, 1)", 2),
    C("cli-max-length-1", "`--max-length 1`", lambda E: (train(E, "--max-length", "1"), {}),
      "--max-length must be >= 2", 2),
    C("cli-full-quantized", "`--method full --quantization nf4`",
      lambda E: (train(E, "--method", "full", "--quantization", "nf4"), {}),
      "full fine-tuning cannot train a quantized base", 2),
    C("cli-bottleneck-lora", "`--bottleneck-size 8` with method lora",
      lambda E: (train(E, "--bottleneck-size", "8"), {}), "--bottleneck-size applies to --method adapter only", 2),
    C("cli-lr-negative", "`--learning-rate -1`", lambda E: (train(E, "--learning-rate", "-1"), {}),
      "TrainingArguments.learning_rate=-1.0: must be >= 0", 2),
    C("cli-max-steps-zero", "`--max-steps 0`", lambda E: (train(E, "--max-steps", "0"), {}),
      "TrainingArguments.max_steps=0: must be > 0, or -1", 2),
    C("cli-warmup-ratio", "`--warmup-ratio 2`", lambda E: (train(E, "--warmup-ratio", "2"), {}),
      "TrainingArguments.warmup_ratio=2.0: must be in [0, 1]", 2),
    C("cli-batch-zero", "`--per-device-train-batch-size 0`",
      lambda E: (train(E, "--per-device-train-batch-size", "0"), {}),
      "TrainingArguments.per_device_train_batch_size=0: must be >= 1", 2),
    C("cli-ga-zero", "`--gradient-accumulation-steps 0`", lambda E: (train(E, "--gradient-accumulation-steps", "0"), {}),
      "TrainingArguments.gradient_accumulation_steps=0: must be >= 1", 2),
    C("cli-grad-norm-negative", "`--max-grad-norm -1`", lambda E: (train(E, "--max-grad-norm", "-1"), {}),
      "TrainingArguments.max_grad_norm=-1.0: must be >= 0", 2),
    C("cli-save-steps-zero", "`--save-steps 0`", lambda E: (train(E, "--save-steps", "0"), {}),
      "TrainingArguments.save_steps=0: must be >= 1 or None", 2),
    C("cli-eval-steps-zero", "`--eval-steps 0`", lambda E: (train(E, "--eval-steps", "0"), {}),
      "TrainingArguments.eval_steps=0: must be >= 1 or None", 2),
    C("cli-epochs-zero", "`--num-train-epochs 0` without --max-steps", lambda E: (train(E, "--num-train-epochs", "0"), {}),
      "TrainingArguments.num_train_epochs=0.0: must be > 0", 2),
    C("cli-lr-nan", "`--learning-rate nan`", lambda E: (train(E, "--learning-rate", "nan"), {}),
      "TrainingArguments.learning_rate=nan: must be finite", 2),
    # command line: config files
    C("cfg-missing", "`--config nope.yaml` (no such file)", lambda E: (["train", "--config", str(E.tmp / "nope.yaml")],
                                                                       {"cfg": str(E.tmp / "nope.yaml")}),
      "{cfg}: config file does not exist", 2),
    C("cfg-directory", "`--config` given a directory", lambda E: (["train", "--config", E.mkdir("cfgdir")],
                                                                 {"cfg": str(E.tmp / "cfgdir")}),
      "{cfg}: is a directory, expected a config file", 2),
    C("cfg-extension", "`--config run.toml`", lambda E: cfg(E, "run.toml", "a = 1\n"),
      "{cfg}: config files must end in .yaml, .yml or .json", 2),
    C("cfg-yaml-syntax", "YAML syntax error on line 3", lambda E: cfg(E, "run.yaml", "max_steps: 3\nseed: 1\nr: [1, 2\n"),
      "{cfg}:4: YAML syntax error", 2),
    C("cfg-json-syntax", "JSON syntax error on line 2", lambda E: cfg(E, "run.json", '{"max_steps": 3,\n "seed": }\n'),
      "{cfg}:2: JSON syntax error: Expecting value", 2),
    C("cfg-empty", "empty config file", lambda E: cfg(E, "run.yaml", "# nothing\n"), "{cfg}: config file is empty", 2),
    C("cfg-list", "config holding a list", lambda E: cfg(E, "run.yaml", "- max_steps\n- 3\n"),
      "{cfg}: config must be a mapping of option: value, got list", 2),
    C("cfg-unknown-key", "unknown key `learning_rat` (line 2)", lambda E: cfg(E, "run.yaml", "seed: 1\nlearning_rat: 0.1\n"),
      ["{cfg}:2: unknown option 'learning_rat'", "did you mean 'learning_rate'?"], 2),
    C("cfg-unknown-key-json", "unknown key in JSON (line 3)", lambda E: cfg(E, "run.json", '{\n "seed": 1,\n "lora_rank": 8\n}\n'),
      "{cfg}:3: unknown option 'lora_rank'", 2),
    C("cfg-wrong-type-number", "`learning_rate: fast`", lambda E: cfg(E, "run.yaml", "seed: 1\nlearning_rate: fast\n"),
      "{cfg}:2: learning_rate: expected a number, got 'fast'", 2),
    C("cfg-wrong-type-int", "`max_steps: 2.5`", lambda E: cfg(E, "run.yaml", "max_steps: 2.5\n"),
      "{cfg}:1: max_steps: expected an integer, got 2.5", 2),
    C("cfg-wrong-type-bool", "`bf16: maybe`", lambda E: cfg(E, "run.yaml", "bf16: maybe\n"),
      "{cfg}:1: bf16: expected true or false, got 'maybe'", 2),
    C("cfg-wrong-choice", "`method: lorra` in a config", lambda E: cfg(E, "run.yaml", "method: lorra\n"),
      "{cfg}:1: method: 'lorra' is not one of lora, qlora, full, adapter", 2),
    C("cfg-wrong-type-list", "`seed: [1, 2]`", lambda E: cfg(E, "run.json", '{"seed": [1, 2]}'),
      "{cfg}:1: seed: expected an integer, got [1, 2]", 2),
    C("cfg-empty-targets", "`target_modules: []`", lambda E: cfg(E, "run.yaml", "target_modules: []\n"),
      "{cfg}:1: target_modules: expected a non-empty list of module names", 2),
    C("cfg-not-utf8", "config file that is not UTF-8", lambda E: cfg(E, "run.yaml", b"seed: \xff\xfe\n"),
      "{cfg}: not UTF-8 text", 2),
    C("cfg-bad-value", "`learning_rate: -0.1` in a config", lambda E: ([*cfg(E, "run.yaml", "learning_rate: -0.1\n")[0],
                                                                        "--model", E.model, "--data", E.data], {}),
      "TrainingArguments.learning_rate=-0.1: must be >= 0", 2),
    # model directories
    C("model-missing", "`--model` path does not exist",
      lambda E: (train(E)[:2] + [str(E.tmp / "nomodel")] + train(E)[3:], {"m": str(E.tmp / "nomodel")}),
      "{m}: model directory does not exist", 3),
    C("model-is-file", "`--model` given a file", lambda E: (["train", "--model", E.data, "--data", E.data], {"m": E.data}),
      "{m}: is a file, expected a model directory", 3),
    C("model-no-config", "model directory without config.json",
      lambda E: (["train", "--model", model_variant(E, "m1", {"tokenizer.json": "{}"}), "--data", E.data],
                 {"m": str(E.tmp / "m1")}), "{m}: no config.json", 3),
    C("model-bad-config", "config.json that is not JSON",
      lambda E: (["train", "--model", model_variant(E, "m2", {"config.json": "{model_type", "tokenizer.json": "{}"}),
                  "--data", E.data], {"m": str(E.tmp / "m2")}), "{m}/config.json: cannot parse config", 3),
    C("model-unsupported", "config.json with model_type gpt2",
      lambda E: (["train", "--model", model_variant(E, "m3", {"config.json": '{"model_type": "gpt2"}',
                                                               "tokenizer.json": "{}"}), "--data", E.data],
                 {"m": str(E.tmp / "m3")}), "{m}/config.json: model_type 'gpt2' is not supported", 3),
    C("model-no-weights", "model directory without weights",
      lambda E: (["train", "--model", model_variant(E, "m4", {"config.json": '{"model_type": "llama"}',
                                                               "tokenizer.json": "{}"}, weights=False),
                  "--data", E.data], {"m": str(E.tmp / "m4")}), "{m}: no weights (*.safetensors)", 3),
    C("model-pickle-only", "model directory with only pytorch_model.bin",
      lambda E: (["train", "--model", model_variant(E, "m5", {"config.json": '{"model_type": "llama"}',
                                                               "tokenizer.json": "{}", "pytorch_model.bin": "x"},
                                                     weights=False), "--data", E.data], {"m": str(E.tmp / "m5")}),
      ["{m}: holds only pickle (*.bin) weights", "--allow-pickle"], 3),
    C("model-no-tokenizer", "model directory without tokenizer files",
      lambda E: (["train", "--model", model_variant(E, "m6", {"config.json": '{"model_type": "llama"}'}),
                  "--data", E.data], {"m": str(E.tmp / "m6")}), "{m}: no tokenizer files", 3),
    C("eval-model-missing", "`fastft eval --model` path does not exist",
      lambda E: (["eval", "--model", str(E.tmp / "nm"), "--data", E.data], {"m": str(E.tmp / "nm")}),
      "{m}: model directory does not exist", 3),
    C("quantize-model-file", "`fastft quantize --model` given a file",
      lambda E: (["quantize", "--model", E.data, "--out", E.out], {"m": E.data}), "{m}: is a file", 3),
    C("export-tokenizer-missing", "`fastft export --tokenizer` directory without tokenizer files",
      lambda E: (["export", "--model", E.model, "--format", "hf", "--out", E.out, "--tokenizer", E.mkdir("tk")],
                 {"t": str(E.tmp / "tk")}), "{t}: no tokenizer files", 3),
    # data files
    C("data-missing", "`--data` path does not exist", lambda E: (train(E)[:4] + [str(E.tmp / "no.jsonl")] + train(E)[5:],
                                                                 {"d": str(E.tmp / "no.jsonl")}),
      "{d}: training data file does not exist", 3),
    C("data-directory", "`--data` given a directory",
      lambda E: (train(E)[:4] + [E.mkdir("dd")] + train(E)[5:], {"d": str(E.tmp / "dd")}),
      "{d}: is a directory, expected a training data file", 3),
    C("data-empty", "empty data file", lambda E: data(E, "e.jsonl", ""), "{data}:1: empty data file", 3),
    C("data-bad-json", "malformed JSON on line 2", lambda E: data(E, "b.jsonl", '{"text": "a"}\n{"text": \n'),
      "{data}:2: malformed JSON", 3),
    C("data-not-object", "a line holding a JSON list", lambda E: data(E, "l.jsonl", '{"text": "a"}\n[1, 2]\n'),
      "{data}:2: expected a JSON object, got list", 3),
    C("data-no-fields", "a record without text / prompt+completion / messages",
      lambda E: data(E, "f.jsonl", '{"txt": "a"}\n'), "{data}:1: missing field", 3),
    C("data-prompt-only", "a record with prompt but no completion", lambda E: data(E, "p.jsonl", '{"prompt": "a"}\n'),
      "{data}:1: has 'prompt' but no 'completion' field", 3),
    C("data-text-not-string", "`{\"text\": 5}`", lambda E: data(E, "t.jsonl", '{"text": 5}\n'),
      "{data}:1: 'text' must be a string, got int", 3),
    C("data-blank-line", "a blank line inside a .jsonl", lambda E: data(E, "bl.jsonl", '{"text": "a"}\n\n{"text": "b"}\n'),
      "{data}:2: empty line", 3),
    C("data-extension", "`--data train.csv`", lambda E: data(E, "train.csv", "text\nhello\n"),
      "{data}: unsupported data file type '.csv'", 3),
    C("data-not-utf8", "data file that is not UTF-8", lambda E: data(E, "u.jsonl", b'{"text": "\xff"}\n'),
      "{data}: not UTF-8 text", 3),
    C("data-messages-empty", "`{\"messages\": []}`", lambda E: data(E, "m.jsonl", '{"messages": []}\n'),
      "{data}:1: 'messages' must be a non-empty list", 3),
    C("data-no-assistant", "a conversation without an assistant turn",
      lambda E: data(E, "na.jsonl", '{"messages": [{"role": "user", "content": "hi"}]}\n'),
      "{data}:1: no assistant message", 3),
    C("eval-data-bad", "`--eval-data` with malformed JSON", lambda E: data(E, "ev.jsonl", "{oops}\n", flag="--eval-data"),
      "{data}:1: malformed JSON", 3),
    C("eval-cmd-data-missing", "`fastft eval --data` path does not exist",
      lambda E: (["eval", "--model", E.model, "--data", str(E.tmp / "x.jsonl")], {"d": str(E.tmp / "x.jsonl")}),
      "{d}: data file does not exist", 3),
    # adapters, checkpoints
    C("adapter-missing", "`fastft merge --adapter` path does not exist",
      lambda E: (["merge", "--model", E.model, "--adapter", str(E.tmp / "na"), "--out", E.out], {"a": str(E.tmp / "na")}),
      "{a}: adapter directory does not exist", 3),
    C("adapter-is-file", "`--adapter` given a file",
      lambda E: (["merge", "--model", E.model, "--adapter", E.data, "--out", E.out], {"a": E.data}),
      "{a}: is a file, expected an adapter directory", 3),
    C("adapter-no-config", "adapter directory without adapter_config.json",
      lambda E: (["merge", "--model", E.model, "--adapter", adapter_variant(E, "a1", config=False), "--out", E.out],
                 {"a": str(E.tmp / "a1")}), "no adapter_config.json in '{a}'", 3),
    C("adapter-bad-config", "adapter_config.json that is not JSON",
      lambda E: (["merge", "--model", E.model, "--adapter", adapter_variant(E, "a2", config="bad"), "--out", E.out],
                 {"a": str(E.tmp / "a2")}), "{a}/adapter_config.json is not valid JSON", 3),
    C("adapter-no-weights", "adapter directory without adapter_model.safetensors",
      lambda E: (["eval", "--model", E.model, "--adapter", adapter_variant(E, "a3", weights=None), "--data", E.data],
                 {"a": str(E.tmp / "a3")}), "{a}: no adapter_model.safetensors", 3),
    C("adapter-truncated", "truncated adapter_model.safetensors",
      lambda E: (["generate", "--model", E.model, "--adapter", adapter_variant(E, "a4", weights="truncated"),
                  "--prompt", "hi"], {"a": str(E.tmp / "a4")}), "{a}/adapter_model.safetensors: truncated file", 3),
    C("adapter-unsupported", "adapter_config.json asking for a LoRA feature fastft lacks (`use_dora: true`)",
      lambda E: (["merge", "--model", E.model, "--adapter",
                  E.mkdir("a5", {"adapter_config.json": json.dumps({"peft_type": "LORA", "r": 2, "use_dora": True})})
                  and _safetensors(E.tmp / "a5" / "adapter_model.safetensors") and str(E.tmp / "a5"), "--out", E.out],
                 {"a": str(E.tmp / "a5")}), "{a}/adapter_config.json: LoRA features not supported by fastft", 3),
    C("adapter-lying-header", "adapter_model.safetensors whose header leaves bytes undescribed",
      lambda E: (["merge", "--model", E.model, "--adapter", (lambda d: (Path(d, "adapter_model.safetensors").write_bytes(
          Path(d, "adapter_model.safetensors").read_bytes() + b"\0" * 8), d)[1])(adapter_variant(E, "a6")),
          "--out", E.out], {"a": str(E.tmp / "a6")}),
      "{a}/adapter_model.safetensors: 8 bytes after the last tensor are not described by the header", 3),
    C("resume-missing", "`--resume-from-checkpoint` path does not exist",
      lambda E: (train(E, "--resume-from-checkpoint", str(E.tmp / "ck")), {"c": str(E.tmp / "ck")}),
      "{c}: checkpoint directory does not exist", 3),
    C("resume-not-checkpoint", "`--resume-from-checkpoint` directory without trainer_state.json",
      lambda E: (train(E, "--resume-from-checkpoint", E.mkdir("ck2")), {"c": str(E.tmp / "ck2")}),
      "{c}: not a fastft checkpoint (no trainer_state.json)", 3),
    C("convert-gguf-missing", "`fastft convert --gguf` path does not exist",
      lambda E: (["convert", "--gguf", str(E.tmp / "m.gguf"), "--out", E.out], {"g": str(E.tmp / "m.gguf")}),
      "{g}: GGUF file does not exist", 3),
    C("convert-not-gguf", "`fastft convert --gguf` given a non-GGUF file",
      lambda E: (["convert", "--gguf", E.data, "--out", E.out], {"g": E.data}), "{g}: not a GGUF file (bad magic)", 3),
    C("convert-no-out", "`fastft convert --gguf m.gguf` without --out",
      lambda E: (["convert", "--gguf", E.data], {}), "--out is required with --gguf", 2),
    # other commands' options
    C("eval-batch-zero", "`fastft eval --batch-size 0`",
      lambda E: (["eval", "--model", E.model, "--data", E.data, "--batch-size", "0"], {}), "--batch-size must be >= 1", 2),
    C("generate-top-p", "`fastft generate --top-p 1.5`",
      lambda E: (["generate", "--model", E.model, "--prompt", "hi", "--top-p", "1.5"], {}), "--top-p must be in (0, 1]", 2),
    C("generate-temperature", "`fastft generate --temperature -1`",
      lambda E: (["generate", "--model", E.model, "--prompt", "hi", "--temperature", "-1"], {}),
      "--temperature must be >= 0", 2),
    C("generate-max-new-zero", "`fastft generate --max-new-tokens 0`",
      lambda E: (["generate", "--model", E.model, "--prompt", "hi", "--max-new-tokens", "0"], {}),
      "--max-new-tokens must be >= 1", 2),
    C("generate-no-prompt", "`fastft generate` without --prompt", lambda E: (["generate", "--model", E.model], {}),
      "the following arguments are required: --prompt", 2),
    C("quantize-blocksize", "`fastft quantize --blocksize 7`",
      lambda E: (["quantize", "--model", E.model, "--out", E.out, "--blocksize", "7"], {}),
      "argument --blocksize: invalid choice: 7", 2),
    C("export-format", "`fastft export --format onnx`",
      lambda E: (["export", "--model", E.model, "--format", "onnx", "--out", E.out], {}),
      "argument --format: invalid choice: 'onnx'", 2),
    C("demo-steps-zero", "`fastft demo --max-steps 0`", lambda E: (["demo", "--max-steps", "0"], {}),
      "--max-steps must be >= 1", 2),
    # output locations
    C("out-is-file", "`--output-dir` is an existing file",
      lambda E: (train(E)[:6] + [E.write("o.txt", "x")], {"o": str(E.tmp / "o.txt")}),
      "{o}: output_dir exists and is not a directory", 4),
    C("out-under-file", "`--output-dir` inside a file (o.txt/run)",
      lambda E: (train(E)[:6] + [E.write("o2.txt", "x") + "/run"], {"o": str(E.tmp / "o2.txt")}),
      "cannot create it, {o} is a file", 4),
    C("out-not-writable", "`--output-dir` on a read-only location (/sys/fastft-run)",
      lambda E: (train(E)[:6] + ["/sys/fastft-run"], {}), "/sys/fastft-run: output location is not writable", 4),
    C("out-other-run", "`--output-dir` holding another run's metrics and checkpoints",
      lambda E: (train(E)[:6] + [E.mkdir("prev", {"metrics.jsonl": "{}\n", "checkpoint-2/trainer_state.json": "{}"})],
                 {"o": str(E.tmp / "prev")}),
      ["{o}: output_dir holds another run's outputs (checkpoint-2, metrics.jsonl)", "--overwrite"], 4),
    C("merge-out-file", "`fastft merge --out` is an existing file",
      lambda E: (["merge", "--model", E.model, "--adapter", E.adapter, "--out", E.data], {"o": E.data}),
      "{o}: exists and is not a directory", 4),
    C("export-gguf-out-dir", "`fastft export --format gguf --out` is a directory",
      lambda E: (["export", "--model", E.model, "--format", "gguf", "--out", E.mkdir("gd")], {"o": str(E.tmp / "gd")}),
      "{o}: is a directory, expected an output file", 4),
    # Python API
    C("api-args-type", "`TrainingArguments(learning_rate=\"fast\")`",
      api_op(lambda: __import__("fastft.train", fromlist=["x"]).TrainingArguments(learning_rate="fast")),
      "TrainingArguments.learning_rate must be a number, got 'fast'", 2, api=True),
    C("api-args-unknown", "`TrainingArguments.from_dict({\"learning_rat\": 1})`",
      api_op(lambda: __import__("fastft.train", fromlist=["x"]).TrainingArguments.from_dict({"learning_rat": 1})),
      "'learning_rat' (did you mean 'learning_rate'?)", 2, api=True),
    C("api-args-file-line", "`TrainingArguments.from_file` on a JSON file with a syntax error",
      lambda E: ((lambda p: lambda: __import__("fastft.train", fromlist=["x"]).TrainingArguments.from_file(p))(
          E.write("a.json", '{\n "seed": ,\n}')), {"f": str(E.tmp / "a.json")}), "{f}:2: cannot parse JSON", 2, api=True),
    C("api-all-masked", "a dataset whose every label is -100", lambda E: (api_trainer(E, ds=_ds(masked=True)), {}),
      "train_dataset: no example has a target token", 3, api=True),
    C("api-empty-dataset", "an empty train_dataset",
      lambda E: ((lambda: __import__("fastft.train", fromlist=["x"]).Trainer(TinyLM(), [], args=_targs(E))), {}),
      "train_dataset is empty", 3, api=True),
    C("api-other-run", "`Trainer.train()` into an output_dir holding a finished run",
      lambda E: (api_prior_run(E) and api_trainer(E), {"o": E.out}), "{o}: output_dir holds another run's outputs", 4,
      api=True),
    C("api-resume-other-run", "resume=True when the newest checkpoint belongs to another run",
      api_other_run_resume, "{ck}: belongs to run", 3, api=True),
    C("api-corrupt-trainer-state", "resume from a checkpoint whose trainer_state.json is corrupt",
      lambda E: api_corrupt_ckpt(E, "trainer_state.json", "{global_step"), "{path}: corrupt checkpoint file", 3,
      api=True),
    C("api-corrupt-optimizer", "resume from a checkpoint whose optimizer.safetensors is truncated",
      lambda E: api_corrupt_ckpt(E, "optimizer.safetensors", lambda b: b[: len(b) // 2]), "{path}: truncated", 3,
      api=True),
    C("api-corrupt-params", "resume from a checkpoint whose trainable_params.safetensors has a lying header",
      lambda E: api_corrupt_ckpt(E, "trainable_params.safetensors", lambda b: b + b"\0" * 16),
      "{path}: 16 bytes after the last tensor are not described by the header", 3, api=True),
    C("api-nan-loss", "a model whose loss is NaN", lambda E: (api_trainer(E, model=TinyLM(nan=True)), {}),
      ["loss became nan at step 1 (examples", "no checkpoint was saved yet"], 5, api=True),
    C("api-nan-anomaly", "a NaN loss with `detect_anomaly=True`",
      lambda E: (api_trainer(E, model=TinyLM(nan=True), detect_anomaly=True), {}),
      "first non-finite module output: head", 5, api=True),
    C("op-dropout-range", "`fastft.ops.lora_linear(..., dropout_p=1.0)`",
      api_op(lambda: _ops.lora_linear(_x, torch.randn(4, 8), torch.randn(2, 8), torch.randn(4, 2), 1.0,
                                      dropout_p=1.0)), "lora_linear: dropout_p must be in [0, 1), got 1.0", 2, api=True),
    C("op-rms-norm-shape", "`fastft.ops.rms_norm` with a weight of the wrong size",
      api_op(lambda: _ops.rms_norm(_x, torch.ones(7), 1e-6)), "rms_norm: weight must be (8,)", 2, api=True),
    C("op-ce-target-range", "`fastft.ops.linear_cross_entropy` with a label >= vocab",
      api_op(lambda: _ops.linear_cross_entropy(torch.randn(3, 8), torch.randn(5, 8), torch.tensor([0, 5, 1]))),
      "outside [0, 5)", 2, api=True),
]


def _fmt(s, ph):
    return s.format(**ph)


def _run_cli(argv, capsys):
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse: usage errors
        rc = e.code
    err = capsys.readouterr().err
    return rc, err


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case, tmp_path, capsys, monkeypatch):
    E = make_env(tmp_path)
    monkeypatch.chdir(tmp_path)
    target, ph = case.setup(E)
    want = [_fmt(f, ph) for f in case.expect]
    if case.api:
        with pytest.raises(FastftUserError) as ei:
            target()
        msg = str(ei.value)
        assert ei.value.exit_code == case.code, (type(ei.value), msg)
        for w in want:
            assert w in msg, (w, msg)
    else:
        rc, err = _run_cli(target, capsys)
        lines = [x for x in err.splitlines() if x.strip()]
        assert "Traceback" not in err, err
        assert len(lines) == 1, err
        assert re.match(r"fastft( \w+)?: error: ", lines[0]), lines[0]
        for w in want:
            assert w in lines[0], (w, lines[0])
        assert rc == case.code, (rc, err)
    reliability_figures.add("bad_inputs")


# --- the document ---------------------------------------------------------------------------------
def doc_rows() -> list:
    """The rows of docs/errors.md: ``CASES`` (run by ``test_bad_input``), then the lying bitsandbytes
    and GGUF files of tests/test_strict_formats.py (``ROWS``, run there with nothing-loaded checks)."""
    import test_strict_formats

    return CASES + test_strict_formats.ROWS


def render_doc() -> str:
    rows = doc_rows()
    head = [
        "# Bad inputs: what fastft says, and its exit code",
        "",
        "Generated from `tests/test_errors.py` (`CASES`) and `tests/test_strict_formats.py` (`ROWS`: files whose",
        "header lies); every row is run by `test_bad_input` or `test_lying_file_is_refused_and_nothing_loaded`,",
        "and `test_docs_errors_md_in_sync` keeps this file equal to the lists (regenerate it with",
        "`FASTFT_UPDATE_DOCS=1 python -m pytest tests/test_errors.py -k docs`).",
        "",
        "A user error is one line on stderr, `fastft <command>: error: <path>: <problem>`, with no traceback",
        "(`--debug` or `FASTFT_DEBUG=1` shows it). Anything else is a bug in fastft: its traceback is",
        "printed and the exit code is 1. In Python the same errors are raised as `fastft.errors`",
        "classes (`FastftUserError` and its subclasses, each also a `ValueError`, `TypeError`, `OSError` or",
        "`FloatingPointError`), whose `exit_code` is the code below. `<name>` stands for the path given.",
        "",
        "## Exit codes",
        "",
        "| code | meaning |",
        "|---|---|",
    ]
    head += [f"| {k} | {v} |" for k, v in EXIT_CODES.items()]
    head += ["", f"## Bad inputs ({len(rows)} rows, each a test)", "", "| # | where | input | message contains | exit code |",
             "|---|---|---|---|---|"]
    for i, c in enumerate(rows, 1):
        msg = " ... ".join(re.sub(r"\{(\w+)\}", r"<\1>", f) for f in c.expect).replace("|", "\\|")
        where = "Python" if c.api else "CLI"
        head.append(f"| {i} | {where} | {c.input.replace('|', chr(92) + '|')} | `{msg}` | {c.code} |")
    return "\n".join(head) + "\n"


def test_docs_errors_md_in_sync():
    text = render_doc()
    if os.environ.get("FASTFT_UPDATE_DOCS"):
        DOC.write_text(text)
    assert DOC.is_file() and DOC.read_text() == text, "docs/errors.md is stale: FASTFT_UPDATE_DOCS=1 regenerates it"
    rows = doc_rows()
    assert len(rows) >= 60
    assert len({c.id for c in rows}) == len(rows)


# --- the CLI itself ---------------------------------------------------------------------------------
def _all_actions():
    ap = build_parser()
    sub = ap._subparsers._group_actions[0]
    for name, p in sub.choices.items():
        for a in p._actions:
            if a.dest not in ("help",):
                yield name, a


def test_every_option_has_help_with_its_default():
    missing = []
    for cmd, a in _all_actions():
        h = a.help or ""
        if not h:
            missing.append(f"{cmd} {a.option_strings}: no help")
        elif not (a.required or a.nargs == 0 or "default" in h or "required" in h or a.default not in (None,)):
            missing.append(f"{cmd} {a.option_strings}: help does not say the default: {h!r}")
    assert not missing, "\n".join(missing)


def test_help_defaults_match_training_arguments():
    import dataclasses

    from fastft.cli import _TRAIN_DEFAULTS
    from fastft.train import TrainingArguments

    real = {f.name: f.default for f in dataclasses.fields(TrainingArguments)}
    assert {k: real[k] for k in _TRAIN_DEFAULTS} == _TRAIN_DEFAULTS


def test_learning_rate_default_follows_the_method():
    from fastft.cli import DEFAULT_LR, _training_arguments

    for method, lr in DEFAULT_LR.items():
        assert _training_arguments({"method": method}).learning_rate == lr
    assert DEFAULT_LR["lora"] >= 5 * DEFAULT_LR["full"]
    assert _training_arguments({"method": "full", "learning_rate": 0.1}).learning_rate == 0.1


def test_debug_shows_the_traceback(tmp_path, capsys):
    rc = main(["train", "--debug", "--model", str(tmp_path / "nope"), "--data", "x.jsonl"])
    err = capsys.readouterr().err
    assert rc == 3 and "Traceback" in err and err.strip().splitlines()[-1].startswith("fastft train: error: ")


def test_internal_error_keeps_traceback_and_exit_1(tmp_path, capsys, monkeypatch):
    import fastft.cli as cli

    def boom(args):
        raise ValueError("a bug, not the user's fault")  # a plain ValueError is not a user error

    monkeypatch.setitem(cli.COMMANDS, "demo", boom)
    assert main(["demo"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "internal error" in err


def test_full_disk_is_an_output_error(tmp_path, capsys, monkeypatch):
    import errno

    import fastft.cli as cli

    def full(args):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "out" / "x.safetensors"))

    monkeypatch.setitem(cli.COMMANDS, "demo", full)
    assert main(["demo"]) == 4
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "No space left on device" in err[0] and "x.safetensors" in err[0]


def test_user_errors_fail_before_heavy_imports(tmp_path):
    """A typo in a path is reported without importing transformers or loading a model."""
    import subprocess
    import sys

    code = ("import sys; from fastft.cli import main; rc = main(['train', '--model', 'nope', '--data', 'x.jsonl']);"
            "print(rc, 'transformers' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert r.stdout.split() == ["3", "False"], r.stdout + r.stderr
