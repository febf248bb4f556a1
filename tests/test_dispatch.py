"""``fastft.ops.backend_for(op, device, *args)`` names the backend that really runs the call.

Registrations carry predicates (``register(op, backend, supports=...)``): the calls a backend does
not take run the reference. Here every implementation of an op is wrapped in a spy, the op is run
through ``fastft.ops``, and the backend that computed the result must be the one ``backend_for``
named for those arguments -- for calls a predicate sends to the reference and for calls it keeps --
on CPU under the Triton interpreter (``FASTFT_BACKEND=triton``) and with the automatic CPU choice.
"""
import pytest
import torch

from fastft import ops
from fastft.kernels import _common
from fastft.ops import dispatch
from fastft.quant import Int4Weight, NF4Weight

pytestmark = pytest.mark.interpreter


@pytest.fixture
def ran(monkeypatch):
    """Spies on every registered implementation; ``ran`` lists the backends in call order (a
    backend handing a call to the reference appears, then "reference": the last one computed)."""
    calls = []

    def spy(backend, fn):
        def rec(*a, **kw):
            calls.append(backend)
            return fn(*a, **kw)

        if hasattr(fn, "supports"):  # keep what the dispatcher reads off a registration
            def rec_raw(*a, **kw):
                calls.append(backend)
                return fn.raw(*a, **kw)

            rec.supports, rec.raw = fn.supports, rec_raw
        return rec

    for b in dispatch.BACKENDS:
        try:
            dispatch.impl("quant_matmul", b)  # loads the backend's providers
        except NotImplementedError:
            pass
        for op, fn in list(dispatch._IMPLS[b].items()):
            monkeypatch.setitem(dispatch._IMPLS[b], op, spy(b, fn))
    return calls


def _check(ran, op, fn, args, kw=None, expect=None):
    kw = kw or {}
    device = args[0].device  # (a tensor or a quantized weight)
    said = ops.backend_for(op, device, *args, **kw)
    ran.clear()
    with _common.count_launches() as launches:
        fn(*args, **kw)
    assert ran, f"{op}: no implementation ran"
    assert ran[-1] == said, f"{op}: backend_for said {said!r}, {ran[-1]!r} ran ({ran})"
    if expect is not None:
        assert said == expect, f"{op}: {said!r}, expected {expect!r}"
    return said, launches


def test_backend_for_without_args_answers_per_device(monkeypatch):
    monkeypatch.setenv("FASTFT_BACKEND", "triton")
    assert ops.backend_for("quant_matmul", torch.device("cpu")) == "triton"
    assert ops.backend_for("quant_matmul", torch.device("cpu"),
                           torch.zeros(2, 64, dtype=torch.float64), None) == "reference"


def test_interpreted_triton_predicates_route_to_the_reference(monkeypatch, ran):
    monkeypatch.setenv("FASTFT_BACKEND", "triton")
    qw = NF4Weight.from_float(torch.randn(40, 128) * 0.1)
    # float64 activations: no fp64 kernel -> the reference runs, and no kernel is launched
    _, launches = _check(ran, "quant_matmul", ops.quant_matmul, [torch.randn(3, 128, dtype=torch.float64), qw],
                         expect="reference")
    assert not launches
    # fp32: the Triton kernel runs
    _, launches = _check(ran, "quant_matmul", ops.quant_matmul, [torch.randn(3, 128), qw], expect="triton")
    assert launches["_quant_matmul_fwd_kernel"] == 1
    # int4 group size 16: not a power of two >= 32 -> the reference quantizes (and dequantizes)
    w = torch.randn(8, 64)
    _check(ran, "int4_quantize", ops.int4_quantize, [w], {"group_size": 16}, expect="reference")
    _, launches = _check(ran, "int4_quantize", ops.int4_quantize, [w], {"group_size": 32}, expect="triton")
    assert launches["_int4_quantize_kernel"] == 1
    q16 = Int4Weight.from_float(w, group_size=16)
    _check(ran, "int4_dequantize", ops.int4_dequantize, [q16], expect="reference")


def test_cpu_auto_predicates_route_to_the_reference(monkeypatch, ran):
    monkeypatch.setenv("FASTFT_BACKEND", "auto")
    cpu = torch.device("cpu")
    fast = ops.backend_for("quant_matmul", cpu)
    assert fast in ("cpp", "torch")
    qw = NF4Weight.from_float(torch.randn(40, 128) * 0.1)
    _check(ran, "quant_matmul", ops.quant_matmul, [torch.randn(3, 128, dtype=torch.float64), qw], expect="reference")
    _check(ran, "quant_matmul", ops.quant_matmul, [torch.randn(3, 128), qw], expect=fast)
    # lora_linear: float64 (gold computations) -> the reference; fp32 -> the lean node
    x, W = torch.randn(4, 16), torch.randn(8, 16)
    A, B = torch.randn(2, 16), torch.randn(8, 2)
    _check(ran, "lora_linear", ops.lora_linear, [x.double(), W.double(), A.double(), B.double(), 0.5],
           expect="reference")
    _check(ran, "lora_linear", ops.lora_linear, [x, W, A, B, 0.5], expect=ops.backend_for("lora_linear", cpu))
    if ops.backend_for("rms_norm", cpu) == "cpp":  # the C++ extension is built: fp16 rows are not its
        h = torch.randn(3, 16, dtype=torch.float16)
        _check(ran, "rms_norm", ops.rms_norm, [h, torch.ones(16, dtype=torch.float16), 1e-6], expect="reference")
        _check(ran, "rms_norm", ops.rms_norm, [h.float(), torch.ones(16), 1e-6], expect="cpp")
