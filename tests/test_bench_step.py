"""benchmarks/bench_step.py (the end-to-end training step) and benchmarks/gpu_check.sh --dry-run.

No timing is asserted: the smoke run checks that every variant runs in its own process and that their
first-step losses and LoRA gradient norms agree with the gold within the derived tolerance."""
import json
import os
import subprocess
import sys

import pytest

from benchmarks import bench_step

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env():
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # the bench's own processes decide (Liger skips on CPU)
    env.pop("FASTFT_BENCH_STREAM", None)
    return env


@pytest.mark.slow
def test_tiny_step_variants_agree(tmp_path):
    out = tmp_path / "rows.jsonl"
    pytest.importorskip("peft")
    r = subprocess.run([sys.executable, "-m", "benchmarks.bench_step", "--case", "tiny-qlora", "--case", "tiny-lora",
                        "--spawn", "fork", "--threads", "1", "--json", str(out), "--check"],
                       cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    for case in ("tiny-qlora", "tiny-lora"):
        mine = {x["variant"]: x for x in rows if x["case"].endswith(f"[{case}]")}
        has_bnb = bench_step.skip_reason("hf", bench_step.CASES[case]) is None
        expect = {"fastft", "fastft-lean", "fastft-patch", "gold", "ref"} | ({"hf"} if has_bnb else set())
        ran = {v for v, x in mine.items() if "error" not in x and "skipped" not in x}
        assert expect <= ran, {v: x.get("error") or x.get("skipped") for v, x in mine.items()}
        gold = mine["gold"]
        for v in expect - {"gold", "ref"}:
            x = mine[v]
            assert x["agree"] is True, x
            assert x["trainable_params"] == gold["trainable_params"]
            assert abs(x["first_loss"] - gold["first_loss"]) <= x["loss_tol"]
            assert x["grad_norm"] > 0
            assert x.get("peak_rss_mb") and x.get("tokens_per_s")  # measured (not asserted on)
        # the tolerance is the tests' rule: 2 x torch's own error (the reference model in fp32) + the
        # fp32 floor at the loss's scale
        tol = 2 * abs(mine["ref"]["first_loss"] - gold["first_loss"]) + 1e-6 * max(abs(gold["first_loss"]), 1)
        assert mine["fastft"]["loss_tol"] == pytest.approx(tol)
        assert "liger" in mine["hf-liger"].get("skipped", "liger") or "error" not in mine["hf-liger"]


def _res(v, loss, gn, t=None, rnd=0, **kw):
    d = {"variant": v, "first_loss": loss, "grad_norm": gn, "trainable_params": 10, "round": rnd, **kw}
    if t is not None:
        d["median_s"] = t
    return d


def test_summary_agreement_tolerance():
    case = dict(bench_step.CASES["tiny-qlora"])
    results = {
        "fastft": [_res("fastft", 6.0001, 1.0, 1.0, 0, peak_rss_mb=50.0)],
        "hf": [_res("hf", 6.00005, 1.0, 3.0, 0, peak_rss_mb=100.0)],
        "fastft-patch": [_res("fastft-patch", 6.1, 1.0, 1.0, 0)],  # does different work
        "gold": [_res("gold", 6.0, 1.0)],
    }
    by = {r["variant"]: r for r in bench_step.summarize("tiny-qlora", case, "t", results, {})}
    tol = 2 * 5e-5 + 1e-6 * 6.0  # 2 x torch's own error + the fp32 floor at the loss's scale
    assert by["fastft"]["loss_tol"] == pytest.approx(tol)
    assert by["fastft"]["loss_err_vs_gold"] == pytest.approx(1e-4)
    assert by["fastft"]["agree"] is True  # 1e-4 <= 1.06e-4
    assert by["fastft-patch"]["agree"] is False
    assert by["fastft"]["mem_ratio_vs_baseline"] == 0.5
    assert by["fastft"]["speedup"] == 3.0
    assert "agree" not in by["gold"]


def test_paired_speedup_is_the_median_over_rounds():
    case = dict(bench_step.CASES["tiny-qlora"])
    results = {
        "fastft": [_res("fastft", 6.0, 1.0, 1.0, 0), _res("fastft", 6.0, 1.0, 2.0, 1), _res("fastft", 6.0, 1.0, 1.0, 2)],
        "hf": [_res("hf", 6.0, 1.0, 3.0, 0), _res("hf", 6.0, 1.0, 3.0, 1), _res("hf", 6.0, 1.0, 1.5, 2)],
        "gold": [_res("gold", 6.0, 1.0)],
    }
    by = {r["variant"]: r for r in bench_step.summarize("tiny-qlora", case, "t", results, {})}
    # ratios per round: 3.0, 1.5, 1.5 -> median 1.5 (not the ratio of medians, 3/1 = 3)
    assert by["fastft"]["speedup"] == 1.5
    assert by["fastft"]["speedup_min"] == 1.5 and by["fastft"]["speedup_max"] == 3.0
    assert by["fastft"]["agree"] is True and by["hf"]["agree"] is True


def test_the_reference_row_sets_the_tolerance_when_present():
    """The transformers + PEFT baseline may differ in more than precision (its own quantizer): the
    reference row (the gold's model in the variants' dtype) is the yardstick when it ran."""
    case = dict(bench_step.CASES["tiny-qlora"])
    results = {"fastft": [_res("fastft", 6.00002, 1.0, 1.0)], "hf": [_res("hf", 6.01, 1.0, 1.0)],
               "ref": [_res("ref", 6.00001, 1.0)], "gold": [_res("gold", 6.0, 1.0)]}
    by = {r["variant"]: r for r in bench_step.summarize("tiny-qlora", case, "t", results, {})}
    assert by["fastft"]["loss_tol"] == pytest.approx(2e-5 + 6e-6)
    assert by["fastft"]["agree"] is True and by["hf"]["agree"] is False
    assert "agree" not in by["ref"]


def test_a_variant_doing_other_work_disagrees():
    case = dict(bench_step.CASES["tiny-lora"])
    results = {"fastft": [_res("fastft", 6.01, 1.0, 1.0)], "hf": [_res("hf", 6.0000001, 1.0, 1.0)],
               "gold": [_res("gold", 6.0, 1.0)], "fastft-patch": [{"variant": "fastft-patch", "error": "boom"}]}
    rows = bench_step.summarize("tiny-lora", case, "t", results, {})
    by = {r["variant"]: r for r in rows}
    assert by["fastft"]["agree"] is False and by["hf"]["agree"] is True
    assert by["fastft-patch"]["error"] == "boom"
    assert [line.split(":")[0] for line in bench_step.disagreements(rows)] == ["fastft"]


def test_without_gold_agreement_is_unknown_not_true():
    case = dict(bench_step.CASES["tiny-lora"])
    results = {"fastft": [_res("fastft", 6.0, 1.0, 1.0)], "hf": [_res("hf", 6.0, 1.0, 1.0)]}
    by = {r["variant"]: r for r in bench_step.summarize("tiny-lora", case, "t", results, {})}
    assert by["fastft"]["agree"] is None


def test_skip_reasons_and_case_table():
    cpu = bench_step.CASES["tiny-qlora"]
    if not bench_step.liger_available():
        assert "not installed" in bench_step.skip_reason("hf-liger", cpu)
    assert bench_step.skip_reason("nope", cpu).startswith("unknown variant")
    for name, c in bench_step.CASES.items():
        assert set(c["variants"]) <= set(bench_step.VARIANTS), name
        assert bench_step.case_title(name, c).endswith(f"[{name}]")
    assert bench_step.gold_dtype(bench_step.CASES["gpu-8b-qlora"]) == "float32"
    assert bench_step.gold_dtype(cpu) == "float64"
    with pytest.raises(ValueError, match="fork"):
        bench_step.run_case("gpu-8b-qlora", spawn="fork")


@pytest.mark.slow
def test_gpu_check_dry_run(tmp_path):
    """Every stage of the prepared GPU check runs tiny on the CPU or names why it skips, and the summary
    prints (a broken script would burn a GPU lease)."""
    env = _env()
    env.update(OUT=str(tmp_path), PYTHON=sys.executable)
    r = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--dry-run"], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=400)
    out = r.stdout + r.stderr
    assert "== gpu_check summary (DRY RUN, CPU)" in r.stdout, out[-4000:]
    lines = (tmp_path / "summary.tsv").read_text().splitlines()
    stages = {ln.split("\t")[0]: ln.split("\t") for ln in lines}
    for st in ("install", "env", "step_8b", "step_1b", "tests", "unvalidated", "bench_quant_matmul", "bench_quant_decode",
               "bench_quant_pack", "bench_attention", "bench_attention_decode", "profile",
               "bench_lora", "bench_rms_norm", "bench_rope", "bench_silu_mul", "bench_ceilings"):
        assert st in stages, (st, lines)
        status, detail = stages[st][1], stages[st][3]
        assert status == "ok" or (status == "skipped" and detail), (st, stages[st], out[-3000:])
    assert r.returncode == 0, out[-4000:]
    step = [json.loads(x) for x in (tmp_path / "step_8b.jsonl").read_text().splitlines()]
    assert any(x["variant"] == "fastft" and x.get("agree") in (True, None) for x in step)
    assert "collected" in stages["tests"][3]
    assert (tmp_path / "summary.txt").read_text().strip()
