"""The fused LoRA blocks one switch away (fastft/nn/fused_blocks.py): with the switch on, a native Llama
decoder layer runs q/k/v through ``lora_qkv`` and gate/up + SwiGLU through ``lora_gate_up_swiglu``
(Triton, under the interpreter on CPU), and its output and LoRA gradients match the switch-off path
(within 2x the unfused fp32 path's own error against a float64 run); "auto" and off keep today's
path; QLoRA bases and mismatched dropout are never fused."""
import pytest
import torch
import transformers

import fastft
from fastft.models.llama import LlamaDecoderLayer
from fastft.nn import fused_blocks
from fastft.ops import triton_backend
from utils import assert_close_to_gold

pytestmark = pytest.mark.interpreter


@pytest.fixture(autouse=True)
def _reset_switch(monkeypatch):
    monkeypatch.delenv(fused_blocks.ENV, raising=False)
    fused_blocks.set_fused_lora_blocks(None)
    yield
    fused_blocks.set_fused_lora_blocks(None)


@pytest.fixture
def interpreted():
    """CPU tensors through the Triton kernels: only under the interpreter (a --device cuda run skips)."""
    import os

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("runs the kernels on CPU tensors: needs TRITON_INTERPRET=1")


@pytest.fixture
def calls(monkeypatch):
    seen = []
    for name in ("lora_qkv", "lora_gate_up_swiglu"):
        orig = getattr(triton_backend, name)
        monkeypatch.setattr(triton_backend, name, lambda *a, _o=orig, _n=name, **k: seen.append(_n) or _o(*a, **k))
    return seen


def _config(bias=False):
    return transformers.LlamaConfig(vocab_size=64, hidden_size=48, intermediate_size=80, num_hidden_layers=1,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=12,
                                    max_position_embeddings=64, attention_bias=bias, mlp_bias=bias)


def _layer(dtype, bias=False, dropout=0.0, seed=0):
    """A decoder layer with LoRA (r 4 / 8, init away from the base) on its five fusable projections."""
    from fastft.nn.lora import LoraLinear

    torch.manual_seed(seed)
    layer = LlamaDecoderLayer(_config(bias), 0).to(dtype)
    for mod, names in ((layer.self_attn, ("q_proj", "k_proj", "v_proj")), (layer.mlp, ("gate_proj", "up_proj"))):
        for i, n in enumerate(names):
            lin = getattr(mod, n)
            with torch.no_grad():
                lin.weight.normal_(0, lin.in_features ** -0.5)
                if lin.bias is not None:
                    lin.bias.normal_(0, 0.1)
            ll = LoraLinear(lin, r=4 * (1 + i % 2), lora_alpha=8, lora_dropout=dropout, init_lora_weights=False)
            setattr(mod, n, ll.to(dtype))
    return layer.train()


def _run(layer, x, cos, sin, switch):
    layer.self_attn.fused_lora_blocks = switch
    layer.mlp.fused_lora_blocks = switch
    layer.zero_grad(set_to_none=True)
    xi = x.detach().clone().requires_grad_(True)
    y = layer(xi, cos, sin)
    (y.double() * torch.linspace(-1, 1, y.shape[-1], dtype=torch.float64)).sum().backward()
    grads = {n: p.grad.detach().clone() for n, p in layer.named_parameters() if p.requires_grad}
    return y.detach(), xi.grad.detach(), grads


def _inputs(dtype, B=2, T=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, 48, generator=g, dtype=torch.float64).to(dtype)
    pos = torch.arange(T, dtype=torch.float64)[:, None] * (1.0 / 10000 ** (torch.arange(0, 12, 2) / 12))[None]
    emb = torch.cat([pos, pos], -1)[None].expand(B, T, 12)
    return x, emb.cos().to(dtype), emb.sin().to(dtype)


@pytest.mark.parametrize("bias", [False, True])
def test_fused_decoder_layer_matches_the_unfused_path(bias, calls, device, triton_usable):
    layer32 = _layer(torch.float32, bias).to(device)
    layer64 = _layer(torch.float64, bias).to(device)
    layer64.load_state_dict({k: v.double() for k, v in layer32.state_dict().items()})
    x, cos, sin = (t.to(device) for t in _inputs(torch.float32))
    gold = _run(layer64, x.double(), cos.double(), sin.double(), False)
    off = _run(layer32, x, cos, sin, False)
    assert calls == []
    on = _run(layer32, x, cos, sin, True)
    assert calls == ["lora_qkv", "lora_gate_up_swiglu"]
    assert_close_to_gold(on[0], gold[0], off[0], name="output")
    assert_close_to_gold(on[1], gold[1], off[1], name="dX")
    assert on[2].keys() == off[2].keys() and any("lora_A" in n for n in on[2])
    for n in on[2]:
        assert_close_to_gold(on[2][n], gold[2][n], off[2][n], name=n)


def test_switch_resolution(monkeypatch, calls, interpreted):
    layer = _layer(torch.float32)
    x, cos, sin = _inputs(torch.float32, B=1, T=3)
    _run(layer, x, cos, sin, None)  # default "auto": today's path
    assert calls == [] and fused_blocks.fused_lora_setting() == "auto"
    monkeypatch.setenv(fused_blocks.ENV, "1")
    _run(layer, x, cos, sin, None)
    assert calls == ["lora_qkv", "lora_gate_up_swiglu"]
    calls.clear()
    _run(layer, x, cos, sin, False)  # the module's own setting wins over the environment
    assert calls == []
    fused_blocks.set_fused_lora_blocks("off")  # the process setting wins over the environment
    _run(layer, x, cos, sin, None)
    assert calls == []
    with pytest.raises(ValueError, match="fused_lora_blocks='sometimes'"):
        fused_blocks.set_fused_lora_blocks("sometimes")
    monkeypatch.setenv(fused_blocks.ENV, "maybe")
    fused_blocks.set_fused_lora_blocks(None)
    with pytest.raises(ValueError, match="FASTFT_FUSED_LORA='maybe'"):
        _run(layer, x, cos, sin, None)


def test_not_fusable_blocks_keep_the_per_projection_path(calls, interpreted):
    layer = _layer(torch.float32, dropout=0.1)
    layer.self_attn.k_proj.lora_dropout = 0.2  # q/k/v dropout differs: q/k/v not fused; gate/up still are
    x, cos, sin = _inputs(torch.float32, B=1, T=3)
    _run(layer, x, cos, sin, True)
    assert calls == ["lora_gate_up_swiglu"]
    calls.clear()
    layer.mlp.up_proj.register_forward_hook(lambda *a: None)  # a hook must see its module run
    layer.eval()  # no dropout: q/k/v fusable again
    _run(layer, x, cos, sin, True)
    assert calls == ["lora_qkv"]


def test_qlora_model_is_not_fused_and_trainer_sets_the_switch(tmp_path, calls):
    from fastft.train import Trainer, TrainingArguments

    m = fastft.from_config("tiny-llama", quantization="nf4", seed=1)
    m = fastft.get_peft_model(m, fastft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": (ids := torch.randint(3, 512, (6,), generator=g).tolist()), "labels": ids} for _ in range(2)]
    a = TrainingArguments(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2, save_steps=None,
                          plot_loss=False, save_final_model=False, disable_tqdm=True, fused_lora_blocks=True)
    Trainer(m, rows, args=a).train()
    layer = m.base_model.model.model.layers[0]
    assert layer.self_attn.fused_lora_blocks is True and layer.mlp.fused_lora_blocks is True
    assert calls == []  # 4-bit bases: the fused kernels take dense weights only
    assert TrainingArguments(output_dir=str(tmp_path), fused_lora_blocks="off").fused_lora_blocks is False
    assert TrainingArguments(output_dir=str(tmp_path)).fused_lora_blocks == "auto"
    with pytest.raises(ValueError, match="fused_lora_blocks"):
        TrainingArguments(output_dir=str(tmp_path), fused_lora_blocks="fast")


def test_native_model_switch_runs_a_dense_lora_step(calls, interpreted):
    m = fastft.from_config("tiny-llama", seed=1)
    m = fastft.get_peft_model(m, fastft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                   init_lora_weights=False)).train()
    ids = torch.randint(3, 512, (1, 5), generator=torch.Generator().manual_seed(0))
    losses = []
    for on in (False, True):
        m.base_model.model.set_fused_lora_blocks(on)
        m.zero_grad(set_to_none=True)
        loss = m(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append(loss.detach())
    assert calls.count("lora_qkv") == m.config.num_hidden_layers
    torch.testing.assert_close(losses[1], losses[0])


def test_benchmark_rows_run_on_tiny_widths(monkeypatch, interpreted):
    """benchmarks/bench_lora_fused.py (the GPU check's rows comparing both paths) runs end to end on
    tiny widths under the interpreter: every variant gives a row, the fused ones name the baseline."""
    from fastft.benchmarks import bench_lora_fused as blf

    monkeypatch.setattr(blf, "DIMS", (32, 16, 48))
    monkeypatch.setattr(blf.common, "bench", lambda fn, device=None: (fn(), 1e-3)[1])
    monkeypatch.setattr(blf, "_saved_bytes", lambda fn, params: 0)  # (one interpreted run per variant)
    rows = blf._block_rows(torch.device("cpu"), 4, 2, 0.0)
    by = {(r["case"].split()[2], r["impl"]): r for r in rows}
    for block in ("qkv", "gate_up"):
        assert "error" not in by[(block, "fused")], by[(block, "fused")]
        assert by[(block, "fused")]["baseline"] == "unfused" and "speedup" in by[(block, "fused")]
