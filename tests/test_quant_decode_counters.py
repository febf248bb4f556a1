"""The decode kernel's split-K counters (fastft/kernels/quant_decode.py), under the interpreter.

The last program of an output tile to finish -- elected by an acq_rel counter per tile, which it
resets to 0 -- reduces the split partials. The counters are cached per device and stream and
shared by every launch, so a launch that stops part-way (an exception, an interrupted run) would
leave them non-zero and make every later launch on that stream elect the wrong program and reduce
partials that were never written. Checked: repeated launches, different shapes (tile counts
growing past the cached buffer), and a launch that dies after half its programs ran.
"""
import pytest
import torch

from fastft.kernels import quant_decode
from fastft.kernels import quant_matmul as qmm
from fastft.ops import reference_quant as R
from fastft.ops import triton_backend as tb
from tests.utils import assert_close_to_gold

pytestmark = [pytest.mark.interpreter, pytest.mark.usefixtures("triton_usable")]


def _check(qw, M, split_k, device, seed):
    g = torch.Generator().manual_seed(seed)
    N, K = qw.shape
    x = torch.randn(M, K, generator=g).to(device=device, dtype=torch.float16)
    y = qmm.quant_matmul(x, *tb.raw(qw), None, split_k=split_k)
    w = R.nf4_dequantize(qw, torch.float32)
    assert_close_to_gold(y, x.double() @ w.double().T, x @ w.half().T)
    return y


def _counters_zero(device):
    return all(int(c.abs().sum()) == 0 for c in quant_decode._counters.values())


def test_counters_across_repeats_and_shapes(device):
    shapes = [(40, 384), (72, 256), (40, 384), (200, 128), (40, 384)]
    for i, (N, K) in enumerate(shapes):
        qw = R.nf4_quantize(torch.randn(N, K, device=device), 64, True)
        for M, split in ((1, 3), (5, 2), (16, 4)):
            _check(qw, M, split, device, seed=10 * i + M)
            assert _counters_zero(device), (N, K, M, split)
    # more output tiles than the cached buffer holds: a new buffer, zeroed
    key = next(iter(quant_decode._counters))
    small = quant_decode._counters[key].numel()
    c = quant_decode.split_counters(torch.device(device), small + 1)
    assert c.numel() >= small + 1 and int(c.abs().sum()) == 0


def test_a_launch_that_dies_part_way_does_not_poison_the_next(device, monkeypatch):
    qw = R.nf4_quantize(torch.randn(40, 384, device=device), 64, True)
    _check(qw, 2, 3, device, seed=1)  # the counters exist and are zero
    real = quant_decode.launch
    dead = {}

    def dies(kernel, grid, *args, **kwargs):
        tiles, split = grid
        assert split == 3
        real(kernel, (tiles, split - 1), *args, **kwargs)  # two of three splits run, then the launch fails
        dead["counters"] = args[9]
        raise RuntimeError("injected: the launch stopped part-way")

    monkeypatch.setattr(quant_decode, "launch", dies)
    x = torch.randn(2, 384, device=device, dtype=torch.float16)
    with pytest.raises(RuntimeError, match="injected"):
        qmm.quant_matmul(x, *tb.raw(qw), None, split_k=3)
    assert int(dead["counters"].abs().sum()) > 0  # the stopped launch did leave counts behind ...
    monkeypatch.setattr(quant_decode, "launch", real)
    for seed in (2, 3):  # ... which no later launch sees
        _check(qw, 2, 3, device, seed=seed)
    assert _counters_zero(device)
