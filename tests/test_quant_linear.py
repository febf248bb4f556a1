"""fastft.nn.QuantLinear: forward, device/dtype moves, state dicts (bitsandbytes layout for NF4),
memory accounting and input checks."""
import importlib
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastft.nn import QuantLinear
from fastft.quant import Int4Weight, NF4Weight
from tests.utils import assert_close_to_gold

CONFIGS = [
    ("nf4", dict(blocksize=64, double_quant=True)),
    ("nf4", dict(blocksize=128, double_quant=False)),
    ("int4", dict(group_size=32, symmetric=False)),
    ("int4", dict(group_size=64, symmetric=True)),
]
IDS = ["nf4-dq", "nf4", "int4-asym", "int4-sym"]


def make(kind, kw, in_f=192, out_f=37, bias=True, dtype=torch.float32):
    lin = nn.Linear(in_f, out_f, bias=bias, dtype=dtype)
    return lin, QuantLinear.from_linear(lin, kind, **kw)


def weight_tensors(q):
    return {k: v.clone() for k, v in q._tensors().items()}


@pytest.mark.parametrize("kind,kw", CONFIGS, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_equals_linear_on_dequantized_weight(kind, kw, dtype):
    lin, ql = make(kind, kw, dtype=dtype)
    assert ql.in_features == 192 and ql.out_features == 37 and ql.weight.dtype == dtype
    x = torch.randn(2, 3, 192).to(dtype)
    y = ql(x)
    deq = ql.weight.dequantize(dtype)
    gold = F.linear(x.double(), ql.weight.dequantize(torch.float64), lin.bias.double())
    assert_close_to_gold(y, gold, F.linear(x, deq, lin.bias), name="QuantLinear")


@pytest.mark.parametrize("kind,kw", CONFIGS, ids=IDS)
def test_weight_frozen_bias_trainable_only_if_asked(kind, kw):
    lin, ql = make(kind, kw)
    assert [n for n, _ in ql.named_parameters()] == ["bias"]
    assert not ql.bias.requires_grad and not ql.weight.requires_grad
    ql2 = QuantLinear.from_linear(lin, kind, train_bias=True, **kw)
    assert ql2.bias.requires_grad
    x = torch.randn(4, 192, requires_grad=True)
    dy = torch.randn(4, 37)
    ql2(x).backward(dy)
    assert torch.allclose(ql2.bias.grad, dy.sum(0))
    assert x.grad.shape == x.shape
    _, nb = make(kind, kw, bias=False)
    assert nb.bias is None and list(nb.parameters()) == []
    assert nb(torch.randn(3, 192)).shape == (3, 37)


@pytest.mark.parametrize("kind,kw", CONFIGS, ids=IDS)
def test_dtype_casts_leave_quantized_data_untouched(kind, kw):
    _, ql = make(kind, kw)
    before = weight_tensors(ql.weight)
    for cast in (lambda m: m.to(torch.float64), lambda m: m.half(), lambda m: m.bfloat16(),
                 lambda m: m.float(), lambda m: m.to("cpu", torch.float64)):
        cast(ql)
        for k, v in ql.weight._tensors().items():
            assert v.dtype == before[k].dtype and torch.equal(v, before[k]), k
    assert ql.bias.dtype == torch.float64
    x = torch.randn(5, 192, dtype=torch.float64)
    gold = F.linear(x, ql.weight.dequantize(torch.float64), ql.bias)
    assert_close_to_gold(ql(x), gold, gold, name="float64 forward")


@pytest.mark.parametrize("kind,kw", CONFIGS, ids=IDS)
def test_device_moves_carry_quantized_tensors(kind, kw, device):
    _, ql = make(kind, kw)
    before = weight_tensors(ql.weight)
    ql.to("meta")  # a real device move on any machine: every quantized tensor must follow
    assert all(v.device.type == "meta" for v in ql.weight._tensors().values())
    assert ql.bias.device.type == "meta" and ql.weight.data.dtype == torch.uint8
    assert ql.weight.data.shape == before["data"].shape

    _, ql = make(kind, kw)
    before = weight_tensors(ql.weight)
    ql.to(device)
    assert ql.weight.device.type == device
    ql.to("cpu")
    for k, v in ql.weight._tensors().items():
        assert v.device.type == "cpu" and torch.equal(v, before[k]), k


@pytest.mark.parametrize("kind,kw", CONFIGS, ids=IDS)
def test_state_dict_round_trip(kind, kw, tmp_path):
    from safetensors.torch import load_file, save_file

    _, ql = make(kind, kw)
    sd = ql.state_dict()
    if kind == "nf4":
        expect = {"weight", "bias", "weight.absmax", "weight.quant_map", "weight.quant_state.bitsandbytes__nf4"}
        if kw["double_quant"]:
            expect |= {"weight.nested_absmax", "weight.nested_quant_map"}
    else:
        expect = {"weight", "bias", "weight.scales", "weight.quant_state.fastft__int4"}
        if not kw["symmetric"]:
            expect.add("weight.zeros")
    assert set(sd) == expect
    save_file(sd, str(tmp_path / "q.safetensors"))
    _, fresh = make(kind, kw)  # different random weights
    fresh.load_state_dict(load_file(str(tmp_path / "q.safetensors")))
    for k, v in ql.weight._tensors().items():
        assert torch.equal(v, fresh.weight._tensors()[k]), k
    assert torch.equal(fresh.bias, ql.bias)
    x = torch.randn(3, 192)
    assert torch.equal(fresh(x), ql(x))


def test_nf4_state_dict_matches_bitsandbytes_linear4bit():
    bnb = importlib.import_module("bitsandbytes")
    w = torch.randn(64, 256, dtype=torch.bfloat16) * 0.05
    b = torch.randn(64, dtype=torch.bfloat16)
    ref = bnb.nn.Linear4bit(256, 64, bias=True, compress_statistics=True, quant_type="nf4")
    ref.weight = bnb.nn.Params4bit(w, requires_grad=False, compress_statistics=True, quant_type="nf4", module=ref)
    ref.bias = nn.Parameter(b.clone(), requires_grad=False)
    ref = ref.to("cpu")
    ref_sd = ref.state_dict()

    lin = nn.Linear(256, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        lin.weight.copy_(w)
        lin.bias.copy_(b)
    ql = QuantLinear.from_linear(lin, "nf4", blocksize=64, double_quant=True)
    sd = ql.state_dict()
    assert list(sd) == list(ref_sd)  # same keys in the same order
    for k in sd:
        assert sd[k].dtype == ref_sd[k].dtype and sd[k].shape == ref_sd[k].shape, k
        if k != "weight.absmax":  # 8-bit nested codes: see test_quant_formats.py (bitsandbytes' CPU LUT)
            assert torch.equal(sd[k], ref_sd[k]), k

    # bitsandbytes' own state dict loads into a QuantLinear and computes with its weight.
    fresh = QuantLinear.from_linear(nn.Linear(256, 64), "nf4")
    fresh.load_state_dict(ref_sd)
    deq = bnb.functional.dequantize_4bit(ref.weight.data, ref.weight.quant_state)
    assert torch.equal(fresh.weight.dequantize(), deq)
    x = torch.randn(3, 256, dtype=torch.bfloat16)
    gold = F.linear(x.double(), deq.double(), b.double())
    assert_close_to_gold(fresh(x), gold, F.linear(x, deq, b), name="loaded bnb layer")


@pytest.mark.parametrize("kind,kw", CONFIGS, ids=IDS)
def test_load_dense_linear_state_dict_quantizes(kind, kw):
    lin, ql = make(kind, kw)
    other = nn.Linear(192, 37)
    ql.load_state_dict(other.state_dict())
    expect = (NF4Weight.from_float(other.weight, blocksize=kw["blocksize"], double_quant=kw["double_quant"])
              if kind == "nf4" else
              Int4Weight.from_float(other.weight, group_size=kw["group_size"], symmetric=kw["symmetric"]))
    for k, v in expect._tensors().items():
        assert torch.equal(ql.weight._tensors()[k], v), k
    assert torch.equal(ql.bias, other.bias)


def test_load_state_dict_errors():
    _, ql = make("nf4", dict(blocksize=64, double_quant=True))
    sd = ql.state_dict()
    with pytest.raises(RuntimeError, match="Missing key.*weight"):
        ql.load_state_dict({"bias": sd["bias"]})
    _, wide = make("nf4", dict(blocksize=64, double_quant=True), in_f=256)
    with pytest.raises(RuntimeError, match="size mismatch for weight"):
        ql.load_state_dict(wide.state_dict())
    with pytest.raises(RuntimeError, match="Unexpected key.*extra"):
        ql.load_state_dict({**sd, "extra": torch.zeros(1)})
    broken = dict(sd)
    del broken["weight.nested_absmax"]
    with pytest.raises(RuntimeError, match="nested_absmax"):
        ql.load_state_dict(broken)


def test_nf4_double_quant_memory_vs_bf16():
    # 4096 x 4096 bf16 layer. Byte accounting: 4 bits per weight, one uint8 code per 64-block,
    # one fp32 scale per 256 blocks, the 16- and 256-entry fp32 codebooks.
    w = torch.empty(4096, 4096, dtype=torch.bfloat16).normal_(0, 0.02)
    q = NF4Weight.from_float(w, blocksize=64, double_quant=True)
    n = w.numel()
    assert q.nbytes == n // 2 + n // 64 + 4 * (n // 64 // 256) + 4 * 16 + 4 * 256
    bf16 = n * 2
    saving = 1 - q.nbytes / bf16
    # 4.127 bits per weight vs 16: 74.2% less. (A saving of 75% would need exactly 4 bits with no
    # scales at all, so no blockwise 4-bit format reaches it.)
    assert saving > 0.742
    assert QuantLinear(q).weight.nbytes == q.nbytes


def test_from_linear_rejects_bad_input():
    lin = nn.Linear(100, 8)
    for bs in (0, 100, 48, 8192):
        with pytest.raises(ValueError, match="blocksize"):
            QuantLinear.from_linear(lin, "nf4", blocksize=bs)
    with pytest.raises(ValueError, match="in_features"):
        QuantLinear.from_linear(lin, "int4", group_size=32)
    with pytest.raises(ValueError, match="quantization"):
        QuantLinear.from_linear(lin, "fp8")
    int_lin = nn.Linear(64, 8)
    int_lin.weight = nn.Parameter(torch.ones(8, 64, dtype=torch.int32), requires_grad=False)
    with pytest.raises(TypeError, match="floating point"):
        QuantLinear.from_linear(int_lin, "nf4")
    with pytest.raises(TypeError, match="nn.Linear"):
        QuantLinear.from_linear(nn.Conv1d(4, 4, 1), "nf4")
    with pytest.raises(TypeError, match="NF4Weight or Int4Weight"):
        QuantLinear(torch.randn(8, 64))
    with pytest.raises(ValueError, match="bias shape"):
        QuantLinear(NF4Weight.from_float(torch.randn(8, 64)), torch.zeros(7))
    _, ql = make("nf4", dict(blocksize=64, double_quant=True))
    with pytest.raises(ValueError, match="in_features"):
        ql(torch.randn(2, 191))


@pytest.mark.parametrize("kind,kw", CONFIGS, ids=IDS)
def test_extra_repr_and_dequantize_to_linear(kind, kw):
    lin, ql = make(kind, kw, dtype=torch.bfloat16)
    r = repr(ql)
    assert "in_features=192" in r and "out_features=37" in r and f"quantization={kind}" in r
    dense = ql.dequantize_to_linear()
    assert isinstance(dense, nn.Linear) and dense.weight.dtype == torch.bfloat16
    assert torch.equal(dense.weight, ql.weight.dequantize())
    assert torch.equal(dense.bias, lin.bias)
    x = torch.randn(4, 192, dtype=torch.bfloat16)
    gold = F.linear(x.double(), ql.weight.dequantize(torch.float64), lin.bias.double())
    assert_close_to_gold(dense(x), gold, ql(x), name="dequantized linear")


def test_autocast_forward():
    _, ql = make("nf4", dict(blocksize=64, double_quant=True))
    x = torch.randn(3, 192)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ql(x)
        ref = F.linear(x, ql.weight.dequantize(torch.float32), ql.bias)
    assert y.dtype == torch.bfloat16
    gold = F.linear(x.double(), ql.weight.dequantize(torch.float64), ql.bias.double())
    assert_close_to_gold(y, gold, ref, name="autocast forward")


@pytest.mark.parametrize("kind,kw", CONFIGS, ids=IDS)
def test_empty_on_meta_then_load_with_assign(kind, kw):
    _, ql = make(kind, kw)
    sd = ql.state_dict()
    shell = QuantLinear.empty(192, 37, bias=True, quantization=kind, device="meta", **kw)
    assert shell.weight.device.type == "meta"
    shell.load_state_dict(sd, assign=True)
    assert shell.weight.device.type == "cpu" and shell.bias.device.type == "cpu"
    for k, v in ql.weight._tensors().items():
        assert torch.equal(shell.weight._tensors()[k], v), k
    x = torch.randn(2, 192)
    assert torch.equal(shell(x), ql(x))
    # A CPU shell built with other settings takes the checkpoint's settings on load.
    other = QuantLinear.empty(192, 37, quantization=kind, blocksize=256, double_quant=False, group_size=192)
    other.load_state_dict(sd)
    assert torch.equal(other(x), ql(x))


@pytest.mark.parametrize("kind,kw", [CONFIGS[0], CONFIGS[2]], ids=[IDS[0], IDS[2]])
def test_torch_compile_traces_one_graph(kind, kw):
    # Dynamo must see QuantLinear's forward (quantized weight object included) as one graph;
    # backend="eager" checks the tracing without paying for code generation.
    torch._dynamo.reset()
    _, ql = make(kind, kw)
    x = torch.randn(4, 192, requires_grad=True)
    compiled = torch.compile(ql, backend="eager", fullgraph=True)
    y = compiled(x)
    y_ref = ql(x.detach())
    assert torch.equal(y, y_ref)
    y.sum().backward()
    x2 = x.detach().requires_grad_()
    ql(x2).sum().backward()
    assert torch.equal(x.grad, x2.grad)
