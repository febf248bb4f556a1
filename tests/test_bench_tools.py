"""The benchmark plumbing the time-boxed GPU check relies on: the autotune cap, row streaming and
ingesting a streamed run into the results files."""
import json

import pytest

from benchmarks import common, run
from fastft.kernels import _common


def test_autotune_cap(monkeypatch):
    items = list(range(7))
    monkeypatch.delenv("FASTFT_AUTOTUNE_MAX", raising=False)
    assert _common.cap(items) == items
    monkeypatch.setenv("FASTFT_AUTOTUNE_MAX", "0")
    assert _common.cap(items) == items
    monkeypatch.setenv("FASTFT_AUTOTUNE_MAX", "3")
    assert _common.cap(items) == [0, 1, 2]
    for bad in ("-1", "three"):
        monkeypatch.setenv("FASTFT_AUTOTUNE_MAX", bad)
        with pytest.raises(ValueError, match="FASTFT_AUTOTUNE_MAX"):
            _common.cap(items)


def test_streamed_rows_are_ingested(tmp_path, monkeypatch):
    stream = tmp_path / "rows.jsonl"
    monkeypatch.setenv("FASTFT_BENCH_STREAM", str(stream))
    env = {"date": "2026-11-28T00:00:00+00:00", "suite": "gpu", "commit": "abc", "machine": {"gpu": "test"},
           "versions": {"torch": "x"}}
    stream.write_text(json.dumps({"_env": env}) + "\n")
    monkeypatch.setattr(common, "CURRENT_BENCH", "quant")
    r1 = common.row("case a", "fastft", 2e-3, baseline="dense", baseline_s=3e-3)
    monkeypatch.setattr(common, "CURRENT_BENCH", "lora")
    common.row("case b", "fastft", 1e-3)
    with open(stream, "a") as f:
        f.write('{"case": "cut off mid-wri')  # what a killed run leaves
    lines = [json.loads(x) for x in stream.read_text().splitlines()[1:3]]
    assert lines[0] == {**r1, "bench": "quant"} and lines[0]["speedup"] == 1.5
    assert lines[1]["bench"] == "lora"

    out = tmp_path / "results"
    assert run.ingest(str(stream), results_dir=str(out)) == 0
    rows = [json.loads(x) for x in (out / "gpu.jsonl").read_text().splitlines()]
    assert sorted(r["case"] for r in rows) == ["case a", "case b"]
    assert all(r["commit"] == "abc" and r["machine"] == {"gpu": "test"} for r in rows)
    assert "case a" in (out / "gpu.md").read_text()


def test_ingest_needs_the_environment_line(tmp_path):
    p = tmp_path / "rows.jsonl"
    p.write_text(json.dumps({"case": "a", "impl": "b", "median_ms": 1.0}) + "\n")
    with pytest.raises(SystemExit, match="no environment line"):
        run.ingest(str(p), results_dir=str(tmp_path / "r"))


def test_gpu_scripts_parse_and_profile_needs_cuda(monkeypatch, capsys):
    """The prepared device scripts must at least parse here: a syntax error would burn a GPU lease."""
    import os
    import subprocess

    import torch

    from benchmarks import profile_gpu

    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for script in ("benchmarks/gpu_check.sh", "benchmarks/prepare_gpu_site.sh"):
        r = subprocess.run(["bash", "-n", os.path.join(here, script)], capture_output=True, text=True)
        assert r.returncode == 0, (script, r.stderr)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert profile_gpu.main() == 0
    assert "no CUDA device" in capsys.readouterr().out


def test_saved_activation_count_of_a_lora_block():
    """bench_lora's block-level count on small widths: without dropout both stacks save the same
    inputs (1.0x); with dropout PEFT keeps a dropout copy and mask per projection, fastft only x."""
    import torch

    from benchmarks import bench_lora

    rows = bench_lora.saved_activation_rows(torch.device("cpu"), M=8, r=4, dims=(64, 16, 224))
    ratio = {r["case"].rsplit("dropout=", 1)[1]: r["saved_vs_peft"] for r in rows if r["impl"] == "fastft"}
    assert ratio["0.0"] == 1.0
    assert ratio["0.1"] < 0.5
    assert all("median_ms" not in r for r in rows)  # a count, not a timing


def test_quick_mode_reads_the_environment(monkeypatch):
    monkeypatch.delenv("FASTFT_BENCH_QUICK", raising=False)
    assert not common.quick()
    monkeypatch.setenv("FASTFT_BENCH_QUICK", "1")
    assert common.quick()
    monkeypatch.setenv("FASTFT_BENCH_QUICK", "0")
    assert not common.quick()
