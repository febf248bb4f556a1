"""fastft.train.allocator.lean_cpu_allocator: glibc's fixed mmap / trim thresholds return freed CPU
activations to the OS. Each case runs in a child process (the setting is process-wide)."""
import json
import subprocess
import sys

import pytest

from fastft.train import allocator

# A child: raise glibc's dynamic mmap threshold the way a training step does (one 16 MiB block
# mapped and freed), then 40 x 16 MiB blocks interleaved with small live ones, the big ones freed:
# RSS kept after the frees, in MiB.
_CHILD = r"""
import json, sys
import torch
lean = sys.argv[1] == "lean"
if lean:
    from fastft.train.allocator import lean_cpu_allocator, applied_threshold
    assert lean_cpu_allocator() and applied_threshold() == 1 << 20
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
n = 4 * 2**20  # fp32 elements: 16 MiB
t = torch.ones(n); del t
base = rss()
big, small = [], []
for i in range(40):
    big.append(torch.ones(n))
    small.append(torch.ones(16 * 1024))  # 64 KiB blocks that stay
peak = rss()
del big
print(json.dumps({"kept": rss() - base, "peak": peak - base}))
"""


def _run(mode):
    r = subprocess.run([sys.executable, "-c", _CHILD, mode], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(allocator._glibc() is None, reason="glibc's malloc only (Linux, no allocator preloaded)")
def test_lean_allocator_returns_freed_blocks_to_the_os():
    default, lean = _run("default"), _run("lean")
    assert default["peak"] >= 600 and lean["peak"] >= 600  # the 640 MiB were resident in both
    # lean: the freed 16 MiB blocks were unmapped (the small live ones and allocator slack remain)
    assert lean["kept"] <= 32, lean
    # default glibc: the dynamic threshold put them in the heap behind live small blocks, kept
    assert default["kept"] > lean["kept"] + 300, (default, lean)


def test_bad_threshold_is_refused():
    for bad in (0, 100, 1 << 26, 1.5, True, "1M"):
        with pytest.raises(ValueError, match="threshold"):
            allocator.lean_cpu_allocator(bad)


def test_trainer_applies_it_on_the_cpu_only_when_asked(tmp_path, monkeypatch):
    import fastft
    from fastft.cli import build_parser
    from fastft.train import Trainer, TrainingArguments
    from test_tiled_mlp import _token_dataset

    a = build_parser().parse_args(["train", "--model", "m", "--data", "d", "--lean-cpu-allocator"])
    assert a.lean_cpu_allocator is True
    calls = []
    monkeypatch.setattr(allocator, "lean_cpu_allocator", lambda: calls.append(1) or ok)
    m = fastft.get_peft_model(fastft.from_config("tiny-llama"), fastft.LoraConfig(r=2, target_modules="all-linear"))
    ok = True
    Trainer(m, _token_dataset(2, 512), args=TrainingArguments(output_dir=str(tmp_path), max_steps=1))
    assert calls == []  # off by default
    Trainer(m, _token_dataset(2, 512), args=TrainingArguments(output_dir=str(tmp_path), max_steps=1,
                                                              lean_cpu_allocator=True))
    assert calls == [1]
    ok = False  # not glibc: a warning, training goes on
    with pytest.warns(UserWarning, match="not glibc"):
        Trainer(m, _token_dataset(2, 512), args=TrainingArguments(output_dir=str(tmp_path), max_steps=1,
                                                                  lean_cpu_allocator=True))


@pytest.mark.skipif(allocator._glibc() is None, reason="glibc's malloc only (Linux, no allocator preloaded)")
def test_trim_reaches_glibc_here():
    assert allocator.trim() is True  # the export's release of freed memory goes through it
