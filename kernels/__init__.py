"""Triton kernels, installed as ``fastft.kernels``.

A leaf package: its modules import only torch, triton and each other (tests/test_layering.py), and
take tensors and plain descriptions; ``fastft.ops.triton_backend`` adapts fastft's objects to them
and registers the ops. One op per module (``kernels/<op>.py`` <-> ``tests/test_<op>.py`` <->
``benchmarks/bench_<op>.py``), in one order: ``@triton.jit`` helpers, kernels, configs, launchers,
the autograd Function, the public function. ``_common`` is the shared toolkit, ``_tma`` the Hopper
TMA rules, ``attention_configs`` the attention autotune spaces. Nothing here queries the device at
import time.
"""
