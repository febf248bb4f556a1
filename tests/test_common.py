"""The kernel toolkit (fastft/kernels/_common.py): the one fp32 precision rule, the row-kernel launch
heuristics, the dropout mask shared by attention and LoRA, and the launch seams tests rely on
(count_launches, pinned_configs)."""
import pytest
import torch

from fastft.kernels import _common
from fastft.kernels import attention as triton_attention
from fastft.kernels import lora as triton_lora

pytestmark = pytest.mark.interpreter


def test_matmul_precision_follows_torch(monkeypatch):
    """fp32 dots use TF32 exactly when torch's own CUDA fp32 matmuls would, whichever of torch's
    APIs set it (mixing the legacy and the new one makes the legacy getters raise: the rule must not)."""
    matmul = torch.backends.cuda.matmul
    saved, saved_legacy = matmul.fp32_precision, torch.get_float32_matmul_precision()
    try:
        monkeypatch.setattr(_common, "interpreting", lambda: False)  # the GPU rule
        torch.set_float32_matmul_precision("highest")
        assert _common.matmul_precision(torch.float32) == "ieee"
        torch.set_float32_matmul_precision("high")
        assert _common.matmul_precision(torch.float32) == "tf32"
        matmul.allow_tf32 = False
        assert _common.matmul_precision(torch.float32) == "ieee"
        matmul.allow_tf32 = True
        assert _common.matmul_precision(torch.float32) == "tf32"
        matmul.fp32_precision = "ieee"  # the new API after the legacy one
        assert _common.matmul_precision(torch.float32) == "ieee"
        torch.backends.fp32_precision = "tf32"  # the global new setting, inherited by cuda matmuls
        matmul.fp32_precision = "none"
        assert _common.matmul_precision(torch.float32) == "tf32"
        assert _common.matmul_precision(torch.bfloat16) == "ieee"  # 16-bit operands: no choice to make
        monkeypatch.setattr(_common, "interpreting", lambda: True)
        assert _common.matmul_precision(torch.float32) == "ieee"
        assert _common.dot_flags(torch.bfloat16) == {"UPCAST": True, "PRECISION": "ieee"}
        assert _common.dot_flags(torch.float16) == {"UPCAST": False, "PRECISION": "ieee"}
    finally:  # back to one consistent state (the legacy getters raise after mixed use otherwise)
        torch.backends.fp32_precision = "none"
        matmul.fp32_precision = saved
        torch.set_float32_matmul_precision(saved_legacy)
        assert torch.get_float32_matmul_precision() == saved_legacy


def test_row_launch_heuristics():
    assert _common.row_settings(1) == (1, 4)
    assert _common.row_settings(576) == (1024, 4)
    assert _common.row_settings(4096) == (4096, 8)
    assert _common.row_settings(14336) == (16384, 32)
    with pytest.raises(ValueError, match="row"):
        _common.row_settings(1 << 20)
    assert _common.rows_per_program(64) == 64 and _common.rows_per_program(8192) == 1


def test_one_dropout_mask_for_attention_and_lora(device):
    """Both ops draw element (r, c) of a (rows, cols) matrix from Philox counter r * cols + c."""
    m = _common.keep_mask(5, 6 * 40, 33, 0.3, device)
    assert torch.equal(triton_lora.dropout_mask(5, (2, 3, 40, 33), 0.3, device), m.view(2, 3, 40, 33))
    assert torch.equal(triton_attention.dropout_keep_mask(5, 2, 3, 40, 33, 0.3, device), m.view(2, 3, 40, 33))
    assert _common.keep_mask(5, 0, 33, 0.3, device).shape == (0, 33)


def test_count_launches_and_pinned_configs(device):
    q = torch.randn(1, 2, 40, 32, device=device, dtype=torch.float16)
    with _common.count_launches() as outer:
        with _common.count_launches() as inner:
            triton_attention.attention(q, q, q, causal=True)
        with _common.pinned_configs({triton_attention.ATTN_FWD: dict(BLOCK_M=16, BLOCK_N=16)}):
            triton_attention.attention(q, q, q, causal=True)
    assert inner == {"_attn_fwd_kernel": 1} and outer == {"_attn_fwd_kernel": 2}
    assert _common._PINNED.get() == {}  # the pin ends with its block
