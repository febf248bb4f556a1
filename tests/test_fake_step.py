"""Every fastft kernel launch is a torch.library custom op with a fake implementation, and a whole
training step (forward, loss, backward, AdamW) runs on fake CUDA tensors without a GPU, following
the CUDA code path (fastft/memory.py)."""
import pytest
import torch

from fastft.kernels import _common
from fastft.memory import LiveBytes, fake_trace, run_traced
from fastft.ops import triton_backend  # noqa: F401  (binds the kernel entry points)
from fastft.ops.library import registered


def test_every_kernel_entry_point_is_a_custom_op_with_a_fake():
    ops = registered()
    entries = _common.entries()
    assert len(entries) >= 19
    for name, e in entries.items():
        assert name in ops, name
        assert e.impl is ops[name], f"{name} is not bound to its custom op"
        assert getattr(torch.ops.fastft, name).default._schema.name == f"fastft::{name}"


def test_opcheck_on_a_dequantize_launch():
    # the cheapest launch (one tiny kernel under the interpreter): schema, fake and real agree
    from fastft.quant import NF4Weight

    q = NF4Weight.from_float(torch.randn(8, 64), blocksize=64, double_quant=False)
    args = (q.data, q.absmax, q.quant_map, [8, 64], 64, torch.float32, None, None, None)
    torch.library.opcheck(torch.ops.fastft.triton_nf4_dequantize.default, args,
                          test_utils=("test_schema", "test_faketensor"))


def test_fake_shapes_on_fake_cuda_match_the_cpu_launch():
    x2 = torch.randn(5, 32)
    A = torch.randn(4, 32)
    real = _common.entries()["triton_lora_down"].impl(x2, [A], [0], 0.0)
    with fake_trace():
        fx = torch.empty(5, 32, device="cpu")
        fake = _common.entries()["triton_lora_down"].impl(fx, [torch.empty(4, 32)], [0], 0.0)
    assert [t.shape for t in fake] == [t.shape for t in real] and fake[0].dtype == real[0].dtype


def test_live_bytes_counts_storages_once_and_frees_them():
    with fake_trace() as mem:
        a = torch.empty(1000, dtype=torch.float32)
        v = a[10:]  # a view: same storage
        b = a.add_(1)  # in place: same storage
        assert mem.live["cpu"] == 4000
        c = torch.empty(250, dtype=torch.bfloat16)
        assert mem.live["cpu"] == 4500
        del a, b
        assert mem.live["cpu"] == 4500  # the view keeps the storage
        del v, c
        assert mem.live["cpu"] == 0 and mem.peak["cpu"] == 4500
    assert isinstance(mem, LiveBytes)


def test_whole_step_on_fake_cuda_follows_the_cuda_path():
    base = {"model": "tiny-llama", "seq": 64, "batch": 2, "device": "cuda", "steps": 2}
    specs = [{**base, "stack": "fastft", "quant": "nf4"},
             {**base, "stack": "fastft", "quant": "nf4", "env": {"FASTFT_BACKEND": "triton"}},
             {**base, "stack": "fastft", "quant": None, "env": {"FASTFT_BACKEND": "triton"}},
             {**base, "stack": "hf", "quant": "nf4"}]
    res = run_traced(specs, timeout=300)
    for r in res:
        assert "error" not in r, r.get("stderr_tail", r)
        assert r["peak_bytes"] > r["weights_bytes"] > 0
        assert r["step_peaks"][1] >= r["step_peaks"][0]  # step 2 holds the AdamW state too
    auto, triton_q, triton_dense, hf = (r["ops"] for r in res)
    # CUDA default: Triton attention and NF4 dequantize under the lean cuBLAS LoRA node; 2 layers
    # x 2 steps x (forward + checkpoint recompute) attention forwards, one backward per layer-step
    assert auto["triton_attn_fwd"] == 2 * 2 * 2 and auto["triton_attn_bwd"] == 2 * 2
    assert auto["triton_nf4_dequantize"] > 0 and "triton_lora_down" not in auto
    # FASTFT_BACKEND=triton: the fused LoRA kernels over the fused quant-matmul, forward and backward
    for op in ("triton_lora_down", "triton_lora_fwd_add_", "triton_lora_mm", "triton_lora_dA", "triton_lora_dx",
               "triton_quant_matmul_fwd_", "triton_quant_matmul_bwd", "triton_attn_fwd", "triton_attn_bwd"):
        assert triton_q.get(op, 0) > 0, op
    assert triton_dense.get("triton_lora_fwd", 0) > 0 and "triton_nf4_dequantize" not in triton_dense
    # transformers + PEFT (+ bitsandbytes' memory) runs no fastft op, and SDPA's FlashAttention (as on
    # an H100 / H200), not the math kernel's (T x T) scores
    assert hf == {"_scaled_dot_product_flash_attention": 2 * 2 * 2}


@pytest.mark.parametrize("quant", ["nf4", None])
def test_cpu_path_traces_on_fake_cpu_tensors(quant):
    from fastft.memory import estimate

    r = estimate({"stack": "fastft", "model": "tiny-llama", "seq": 32, "batch": 1, "device": "cpu",
                  "dtype": "float32", "autocast": False, "quant": quant, "steps": 1})
    assert r["peak_bytes"] > r["weights_bytes"] > 0
    assert r["ops"].get("attn_fwd", 0) > 0, r["ops"]  # the C++ CPU ops, through their registered fakes
    if quant:
        assert any(k.startswith("nf4_") for k in r["ops"]), r["ops"]


def test_offload_and_tiled_mlp_lower_the_traced_cuda_peak():
    """The memory options on the CUDA path (fake tensors): offloaded layer inputs leave the device
    (the trace copies them to fake host tensors and back, as the side-stream copies do), and the
    tiled MLP holds one tile's (tokens x intermediate) activations."""
    from fastft.models.synthetic import SHAPES

    layers = 6
    shape = {**SHAPES["tiny-llama"], "num_hidden_layers": layers}
    base = {"stack": "fastft", "model": shape, "quant": "nf4", "seq": 4096, "batch": 2, "device": "cuda", "steps": 1}
    plain, off, tiled = run_traced([base, {**base, "offload": True}, {**base, "offload": True, "tile_tokens": 1024}],
                                   timeout=300)
    for r in (plain, off, tiled):
        assert "error" not in r, r.get("stderr_tail", r)
    layer_input = 2 * 4096 * 64 * 2  # (batch, seq, hidden) bf16: 1 MiB, the offloader's threshold
    # backward of the last layer: without offload every layer's input is on the device; with it, the
    # one being recomputed and the prefetched one before it (the peak moves by up to one input)
    assert plain["peak_bytes"] - off["peak_bytes"] >= (layers - 3) * layer_input
    mlp = 2 * 4096 * 160 * 2  # one (tokens x intermediate) bf16 activation
    assert off["peak_bytes"] - tiled["peak_bytes"] >= 2 * mlp
