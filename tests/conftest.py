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
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture
def device(request):
    return request.config.getoption("--device")


@pytest.fixture(autouse=True)
def _seed():
    import numpy as np
    import torch

    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield
