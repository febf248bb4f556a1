"""The autotuning policy (fastft/kernels/_autotune.py) under the interpreter, with a fake timer:
unvalidated configs stay out unless switched on, tuning stops at its time budget, picks persist on
disk per kernel / device / versions and are reused without tuning."""
import json
import os

import pytest
import torch
import triton
import triton.language as tl

from fastft.kernels import _autotune as A


@triton.jit
def _write_block(x_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(x_ptr + offs, tl.full([BLOCK], BLOCK, tl.int32), mask=offs < n)


CONFIGS = (16, 32, 64)
TIMES = {16: 3.0, 32: 1.0, 64: 2.0}  # fake milliseconds: 32 wins


def _tuner(bench, configs=None):
    cfgs = configs or [triton.Config({"BLOCK": b}, num_warps=1) for b in CONFIGS]
    return triton.autotune(configs=cfgs, key=["n"], do_bench=bench)(_write_block)


class FakeBench:
    """Stands in for do_bench: runs the kernel once, reads which BLOCK ran, returns its fake time."""

    def __init__(self, x, clock=None, step=0.0):
        self.x, self.calls, self.clock, self.step = x, [], clock, step

    def __call__(self, fn, quantiles=None, **kw):
        fn()
        block = int(self.x[0])
        self.calls.append(block)
        if self.clock is not None:
            self.clock[0] += self.step
        t = TIMES[block]
        return [t, t, t] if quantiles else t


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTFT_AUTOTUNE_CACHE", str(tmp_path))
    monkeypatch.delenv("FASTFT_UNVALIDATED_CONFIGS", raising=False)
    monkeypatch.delenv("FASTFT_AUTOTUNE_MAX", raising=False)
    monkeypatch.delenv("FASTFT_AUTOTUNE_BUDGET", raising=False)
    return tmp_path


def _launch(kernel, x, n=8):
    kernel[(1,)](x, n)
    return int(x[0])


def test_gate_drops_unvalidated_unless_switched_on(monkeypatch, cache):
    a, b, c = (triton.Config({"BLOCK": v}) for v in CONFIGS)
    A.unvalidated(b, "TMA")
    assert A.gate([a, b, c]) == [a, c]
    assert A.gate([b]) == [b]  # never empty
    monkeypatch.setenv("FASTFT_UNVALIDATED_CONFIGS", "1")
    assert A.gate([a, b, c]) == [a, b, c]
    monkeypatch.setenv("FASTFT_AUTOTUNE_MAX", "1")
    assert A.gate([b, a, c]) == [b]
    monkeypatch.setenv("FASTFT_UNVALIDATED_CONFIGS", "maybe")
    with pytest.raises(ValueError, match="FASTFT_UNVALIDATED_CONFIGS"):
        A.gate([a])


def test_unvalidated_config_is_never_run_by_default(cache, monkeypatch):
    x = torch.zeros(64, dtype=torch.int32)
    cfgs = [triton.Config({"BLOCK": b}, num_warps=1) for b in CONFIGS]
    A.unvalidated(cfgs[1], "new tile")  # the fastest one, 32
    bench = FakeBench(x)
    kernel = A.policy(_tuner(bench, cfgs), "write_block")
    assert _launch(kernel, x) == 64  # 16 (3.0) vs 64 (2.0); 32 never compiled nor run
    assert sorted(bench.calls) == [16, 64]
    monkeypatch.setenv("FASTFT_UNVALIDATED_CONFIGS", "1")
    bench2 = FakeBench(x)
    kernel2 = A.policy(_tuner(bench2, cfgs), "write_block")
    assert _launch(kernel2, x) == 32
    assert sorted(bench2.calls) == [16, 32, 64]


def test_tuning_stops_at_its_budget(cache, monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(A.time, "perf_counter", lambda: clock[0])
    monkeypatch.setenv("FASTFT_AUTOTUNE_BUDGET", "10")
    x = torch.zeros(64, dtype=torch.int32)
    bench = FakeBench(x, clock, step=6.0)  # each candidate takes 6 s to compile and time
    kernel = A.policy(_tuner(bench), "write_block")
    # 16 at t=0, 32 at t=6, 64 would start at t=12 > 10: not compiled
    assert _launch(kernel, x) == 32
    assert bench.calls == [16, 32]
    monkeypatch.setenv("FASTFT_AUTOTUNE_BUDGET", "bad")
    with pytest.raises(ValueError, match="FASTFT_AUTOTUNE_BUDGET"):
        A.budget_s()


def test_picks_persist_per_key_and_are_reused(cache):
    x = torch.zeros(64, dtype=torch.int32)
    bench = FakeBench(x)
    kernel = A.policy(_tuner(bench), "write_block")
    assert _launch(kernel, x, n=8) == 32
    path = A.cache_file("write_block")
    assert path.startswith(str(cache)) and os.path.isfile(path)
    picks = json.load(open(path))["picks"]
    assert len(picks) == 1 and list(picks.values())[0]["kwargs"] == {"BLOCK": 32}

    def no_bench(fn, quantiles=None, **kw):
        raise AssertionError("a cached key must not be tuned again")

    fresh = A.policy(_tuner(no_bench), "write_block")  # a new process, in effect
    x.zero_()
    assert _launch(fresh, x, n=8) == 32
    # another key (n) is tuned and added to the same file
    bench3 = FakeBench(x)
    other = A.policy(_tuner(bench3), "write_block")
    _launch(other, x, n=8)
    assert bench3.calls == []
    _launch(other, x, n=9)
    assert sorted(bench3.calls) == [16, 32, 64]
    assert len(json.load(open(path))["picks"]) == 2


def test_cache_file_keys_and_damage(cache, monkeypatch):
    k0 = A.device_key()
    assert "torch" in k0 and "triton" in k0 and "fastft" in k0
    monkeypatch.setenv("FASTFT_UNVALIDATED_CONFIGS", "1")
    assert A.device_key() != k0  # picks made with unvalidated configs never serve the default
    monkeypatch.delenv("FASTFT_UNVALIDATED_CONFIGS")
    path = A.cache_file("k")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write("{ not json")
    assert A.load(path) == {}
    A.store(path, {"[1]": {"kwargs": {"BLOCK": 16}}})
    A.store(path, {"[2]": {"kwargs": {"BLOCK": 32}}})
    assert sorted(A.load(path)) == ["[1]", "[2]"]
    assert [p for p in os.listdir(os.path.dirname(path)) if p.startswith(".autotune-")] == []
    monkeypatch.setenv("FASTFT_AUTOTUNE_CACHE", "off")
    assert A.cache_file("k") is None


def test_policy_leaves_other_objects_alone():
    def f():
        return 1

    assert A.policy(f) is f


def test_kernel_config_lists_mark_what_never_ran_on_a_gpu(monkeypatch):
    """The attention forward's TMA / software-pipelined / 128x128 configs and the LoRA GEMMs'
    128x256 tile and TMA twins are marked; the autotuner a kernel builds leaves them out unless
    FASTFT_UNVALIDATED_CONFIGS=1, and carries the policy (budget, disk cache)."""
    from fastft.kernels import attention as attn
    from fastft.kernels import attention_configs as AC
    from fastft.kernels import lora as L

    fwd = AC.fwd_configs()
    marked = [c for c in fwd if A.is_unvalidated(c)]
    assert any(c.kwargs["USE_TMA"] for c in marked) and any(c.kwargs["PIPE"] for c in marked)
    assert all(c.kwargs["USE_TMA"] or c.kwargs["PIPE"] or (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) == (128, 128)
               for c in marked)
    gemm = L.gemm_configs(tma=True)
    assert {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs.get("USE_TMA", False)) for c in gemm
            if A.is_unvalidated(c)} >= {(128, 256, False), (128, 256, True), (128, 128, True)}
    monkeypatch.delenv("FASTFT_UNVALIDATED_CONFIGS", raising=False)
    monkeypatch.setattr(attn.ATTN_FWD, "_autotuner", None)
    tuner = attn.ATTN_FWD.autotuner()
    assert tuner._fastft_policy
    assert tuner.configs and not any(A.is_unvalidated(c) for c in tuner.configs)
    assert len(tuner.configs) == len(fwd) - len(marked)
    monkeypatch.setenv("FASTFT_UNVALIDATED_CONFIGS", "1")
    monkeypatch.setattr(attn.ATTN_FWD, "_autotuner", None)
    assert len(attn.ATTN_FWD.autotuner().configs) == len(fwd)
    monkeypatch.setattr(attn.ATTN_FWD, "_autotuner", None)  # the next user builds its own
