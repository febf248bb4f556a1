"""KV-cache generation of the native Llama family vs transformers' generate and logits warpers."""
import pytest
import torch

from models_util import one_thread, save_tiny_checkpoint  # noqa: F401
from utils import rel_err

import fastft
from fastft.models.generation import process_logits


def _hf(d):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32,
                                                             attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    # larger init than the default 0.02 so greedy paths are decisive (no near-ties between tokens)
    return save_tiny_checkpoint(tmp_path_factory.mktemp("gen"), "llama", initializer_range=0.2)


def test_cached_decoding_equals_full_forward(ckpt):
    m = fastft.from_pretrained(ckpt)
    ids = torch.randint(3, 128, (2, 14))
    with torch.no_grad():
        full = m(ids).logits
        cache = m.new_cache(2, 14)
        parts = [m(ids[:, :9], past_key_values=cache).logits]
        for t in range(9, 14):
            parts.append(m(ids[:, t:t + 1], past_key_values=cache).logits)
    assert cache.length == 14
    assert rel_err(torch.cat(parts, 1), full) <= 1e-5


def test_greedy_matches_transformers(ckpt):
    m, ref = fastft.from_pretrained(ckpt), _hf(ckpt)
    ids = torch.randint(3, 128, (2, 6))
    ours = m.generate(ids, max_new_tokens=12, eos_token_id=[])
    theirs = ref.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert ours.shape == (2, 18)
    assert torch.equal(ours, theirs)


def test_left_padded_batch_equals_single_rows(ckpt):
    m = fastft.from_pretrained(ckpt)
    rows = [torch.randint(3, 128, (n,)) for n in (7, 3, 5)]
    T = 7
    ids = torch.zeros(3, T, dtype=torch.long)
    mask = torch.zeros(3, T, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, T - len(r):] = r
        mask[i, T - len(r):] = 1
    batch = m.generate(ids, attention_mask=mask, max_new_tokens=8, eos_token_id=[])
    for i, r in enumerate(rows):
        alone = m.generate(r[None], max_new_tokens=8, eos_token_id=[])
        assert torch.equal(batch[i, T:], alone[0, len(r):]), f"row {i}"


def test_stops_at_eos_and_pads_finished_rows(ckpt):
    m = fastft.from_pretrained(ckpt)
    ids = torch.randint(3, 128, (2, 5))
    free = m.generate(ids, max_new_tokens=10, eos_token_id=[])
    eos = int(free[0, 5 + 2])  # row 0's third new token becomes the stop token
    out = m.generate(ids, max_new_tokens=10, eos_token_id=eos, pad_token_id=0)
    row0 = out[0, 5:]
    first = int((row0 == eos).nonzero()[0])
    assert first <= 2 and torch.equal(row0[:first + 1], free[0, 5:5 + first + 1])
    assert (row0[first + 1:] == 0).all()
    if not (out[1, 5:] == eos).any():  # row 1 never produced eos: it ran to max_new_tokens
        assert out.shape[1] == 15 and torch.equal(out[1], free[1])


def test_sampling_top_k1_is_greedy_and_seeded_sampling_is_reproducible(ckpt):
    m = fastft.from_pretrained(ckpt)
    ids = torch.randint(3, 128, (2, 4))
    greedy = m.generate(ids, max_new_tokens=6, eos_token_id=[])
    assert torch.equal(m.generate(ids, max_new_tokens=6, do_sample=True, top_k=1, eos_token_id=[]), greedy)
    a = m.generate(ids, max_new_tokens=6, do_sample=True, temperature=2.0,
                   generator=torch.Generator().manual_seed(1), eos_token_id=[])
    b = m.generate(ids, max_new_tokens=6, do_sample=True, temperature=2.0,
                   generator=torch.Generator().manual_seed(1), eos_token_id=[])
    assert torch.equal(a, b)
    # at temperature 2 over 128 tokens, 12 draws all landing on the argmax would be a bug
    assert not torch.equal(a, greedy)


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 5, None), (0.7, None, 0.9), (1.3, 20, 0.5),
                                                     (1.0, None, 0.01)])
def test_logits_processing_matches_transformers_warpers(temperature, top_k, top_p):
    from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper,
                                                        TopPLogitsWarper)

    logits = torch.randn(4, 50) * 3
    want = logits.clone()
    if temperature != 1.0:
        want = TemperatureLogitsWarper(temperature)(None, want)
    if top_k:
        want = TopKLogitsWarper(top_k)(None, want)
    if top_p:
        want = TopPLogitsWarper(top_p)(None, want)
    got = process_logits(logits, temperature, top_k, top_p)
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    fin = ~torch.isinf(want)
    assert torch.allclose(got[fin], want[fin])
    assert fin.sum(-1).min() >= 1


def test_bad_generation_arguments_raise(ckpt):
    m = fastft.from_pretrained(ckpt)
    ids = torch.randint(3, 128, (1, 4))
    with pytest.raises(ValueError, match="temperature"):
        m.generate(ids, do_sample=True, temperature=0.0)
    with pytest.raises(ValueError, match="top_p"):
        m.generate(ids, do_sample=True, top_p=1.5)
    with pytest.raises(TypeError, match="num_beams"):
        m.generate(ids, num_beams=2)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        m.generate(torch.randint(3, 128, (1, 60)), max_new_tokens=10)


@pytest.mark.slow
def test_smollm2_greedy_matches_transformers():
    import transformers

    from fastft.models.convert import smollm2_path

    d = smollm2_path()
    tok = transformers.AutoTokenizer.from_pretrained(d)
    m, ref = fastft.from_pretrained(d), _hf(d)
    msgs = [{"role": "user", "content": "Name three colours of the rainbow."}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    ours = m.generate(ids, max_new_tokens=20, eos_token_id=tok.eos_token_id)
    theirs = ref.generate(ids, max_new_tokens=20, do_sample=False, eos_token_id=tok.eos_token_id,
                          pad_token_id=tok.pad_token_id)
    assert ours.shape[1] > ids.shape[1] + 5
    assert torch.equal(ours, theirs), (tok.decode(ours[0]), tok.decode(theirs[0]))
