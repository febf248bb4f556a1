"""Triton split-KV decode attention (fastft/kernels/attention_decode.py) against float64 gold.

Forward-only calls with few query rows per KV group (generation with a cache) take the decode
kernels through the triton backend (``fastft.ops.triton_backend.attention``); results are judged
as the dense kernel's (tests/attention_util.py). On CPU under the Triton interpreter.
"""
import pytest
import torch

from fastft.kernels import _common
from fastft.kernels import attention_decode
from fastft.ops import reference, triton_backend
from tests.attention_util import attn_math, make_kpm, make_qkv, parametrize_dtype
from tests.utils import assert_close_to_gold

pytestmark = pytest.mark.interpreter


pytest_generate_tests = parametrize_dtype  # (tests/attention_util.py)


# ------------------------------------------------------------------------------------- decode
@pytest.mark.parametrize("B,Hq,Hkv,T,S,D,causal,pad", [
    (2, 8, 1, 1, 97, 128, True, "both"),  # one new token, GQA 8, several key splits
    (2, 6, 2, 4, 300, 40, True, "left"),  # a few tokens (speculative decoding), causal within them
    (1, 4, 4, 3, 2, 64, True, None),  # T > S: the first row sees nothing
    (2, 3, 1, 1, 1, 80, False, "empty"),
])
def test_decode_path_matches_gold(B, Hq, Hkv, T, S, D, causal, pad, dtype, device):
    """Without autograd, few query rows take the split-KV decode kernels (GQA heads packed as rows)."""
    q, k, v = make_qkv(B, Hq, Hkv, T, S, D, dtype, device)
    kpm = make_kpm(B, S, pad, device)
    assert attention_decode.decode_eligible(q, k, v)
    with torch.no_grad(), _common.count_launches() as launches:
        out = triton_backend.attention(q, k, v, causal=causal, key_padding_mask=kpm)
    assert launches["_attn_decode_kernel"] == 1 and launches["_attn_combine_kernel"] == 1, "decode path not taken"
    assert launches["_attn_fwd_kernel"] == 0
    gold = attn_math(q.double(), k.double(), v.double(), causal=causal, kpm=kpm)
    assert_close_to_gold(out, gold, attn_math(q, k, v, causal=causal, kpm=kpm))
    allowed = reference.attention_mask_bias(T, S, causal=causal, key_padding_mask=kpm, device=device)
    assert (out[~allowed.any(-1).expand(B, Hq, T)] == 0).all()


def test_decode_path_needs_no_grad_and_no_dropout(device):
    """With autograd, dropout or too many rows per KV group the dense kernels run."""
    q, k, v = make_qkv(1, 8, 1, 1, 40, 64, torch.float16, device)
    assert attention_decode.decode_eligible(q, k, v)
    assert not attention_decode.decode_eligible(q, k, v, dropout_p=0.1)
    assert not attention_decode.decode_eligible(q.requires_grad_(), k, v)
    q2, k2, v2 = make_qkv(1, 8, 1, 9, 40, 64, torch.float16, device)  # 72 rows > DECODE_MAX_ROWS
    assert not attention_decode.decode_eligible(q2, k2, v2)
    with _common.count_launches() as launches:
        triton_backend.attention(q, k, v, causal=True)
    assert launches["_attn_fwd_kernel"] == 1 and launches["_attn_decode_kernel"] == 0
