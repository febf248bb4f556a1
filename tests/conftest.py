"""Shared test setup: --device option, seeding, the Triton interpreter on CPU.

Triton decides between compiling and interpreting when a kernel is decorated, so on CPU the
interpreter is switched on here, before any test module imports ``fastft.kernels``. The automatic
backend choice never picks Triton for CPU tensors; Triton tests ask for it explicitly.
"""
import os
import random

import pytest


def pytest_addoption(parser):
    parser.addoption("--device", default="cpu", choices=["cpu", "cuda"], help="device for kernel tests")


def pytest_configure(config):
    if config.getoption("--device") == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    else:
        # fp32 tolerances are 2x torch's own fp32 error (tests/utils.py), and the kernels' fp32 dots
        # follow torch's precision setting (kernels/_common.py): the CUDA run holds torch's default,
        # IEEE fp32, so both sides are exact-fp32 (tests/test_fp32_precision.py checks TF32 apart).
        import torch

        torch.backends.cuda.matmul.fp32_precision = "ieee"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture
def device(request):
    return request.config.getoption("--device")


@pytest.fixture
def triton_usable(device):
    """Kernel tests: CPU runs need the interpreter; --device cuda needs a GPU."""
    import torch

    if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.fail("CPU kernel tests need TRITON_INTERPRET=1 (set by tests/conftest.py)")
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("--device cuda given but no CUDA device")


@pytest.fixture(autouse=True)
def _seed():
    import numpy as np
    import torch

    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


def pytest_collection_modifyitems(session, config, items):
    # Ahead-of-time compile tests (tests/aot.py) swap Triton's interpreted jit functions for
    # compilable ones and back. Triton 3.9's interpreter does not fully recover from that inside
    # one process (triton.language.random loses its interpreter binding: tl.rand then raises
    # NameError 'interpreter_semantic'), while compiling after interpreter runs is handled by
    # tests/aot.py. So the AOT tests run after all others (a stable sort keeps every other order).
    items.sort(key=lambda item: os.path.basename(str(item.fspath)).startswith("test_aot_"))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    # A CUDA error (an illegal address, say) poisons the process's CUDA context: every later test in
    # it would fail at setup and hide which kernel broke. Under pytest-xdist (the prepared GPU run,
    # benchmarks/gpu_check.sh) the worker prints the failure and exits, and xdist starts a
    # fresh one for the remaining tests.
    outcome = yield
    rep = outcome.get_result()
    if (call.excinfo is not None and rep.failed and os.environ.get("PYTEST_XDIST_WORKER")
            and "CUDA error" in str(call.excinfo.value)):
        import sys

        first = str(call.excinfo.value).strip().splitlines()[0]
        print(f"\n[conftest] {item.nodeid}: {first} -- worker exits for a fresh CUDA context",
              file=sys.__stderr__, flush=True)
        os._exit(3)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """The reliability figures of this run (issue 19; recorded in docs/reliability.md): bad inputs
    covered, SIGKILLs survived, fuzz examples per op and backend, and coverage a missing ISA or
    feature removed (recorded as skips, never dropped silently)."""
    import sys

    sys.path.insert(0, os.path.dirname(__file__))
    try:
        from reliability_figures import FIGURES
    except ImportError:  # pragma: no cover
        return
    skips = [r for r in terminalreporter.stats.get("skipped", []) if "coverage missing" in str(r.longrepr)]
    fuzz = FIGURES["fuzz_examples"]
    if not (FIGURES["bad_inputs"] or FIGURES["kills_survived"] or fuzz or skips):
        return
    w = terminalreporter.write_line
    terminalreporter.section("fastft reliability figures")
    w(f"bad inputs covered (one-line error, documented exit code): {FIGURES['bad_inputs']}")
    w(f"SIGKILLs during checkpoint saves survived (latest complete checkpoint resumed bit for bit): "
      f"{FIGURES['kills_survived']}")
    if fuzz:
        w(f"fuzz examples vs float64 (fwd + bwd): {sum(fuzz.values())} in all")
        ops = {}
        for key, n in sorted(fuzz.items()):
            op, backend = key.split("/")
            ops.setdefault(op, []).append(f"{backend} {n}")
        for op, parts in ops.items():
            w(f"  {op}: {', '.join(parts)}")
    w(f"coverage missing on this machine (recorded skips): {len(skips)}")
    reasons = {}
    for r in skips:
        msg = r.longrepr[2] if isinstance(r.longrepr, tuple) else str(r.longrepr)
        reasons[msg] = reasons.get(msg, 0) + 1
    for msg, n in sorted(reasons.items()):
        w(f"  {n} x {msg}")
