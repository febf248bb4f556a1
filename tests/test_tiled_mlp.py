"""The tiled MLP (fastft/nn/checkpointing.py ``tiled_rows``, ``NativeModel.tiled_mlp_enable``): the same
loss and gradients as the untiled MLP (up to fp32 summation order), with and without layer
checkpointing and offload; one tile's MLP activations live at a time (accounted on real tensors)."""
import pytest
import torch
from torch import nn

import fastft
from fastft.memory import LiveBytes
from fastft.nn.checkpointing import ActivationOffloader, tiled_rows


def _model(quant, tile=None, checkpointing=None):
    torch.manual_seed(0)
    m = fastft.from_config("tiny-llama", quantization=quant, seed=1)
    if checkpointing == "on":
        m.gradient_checkpointing_enable()
    elif checkpointing == "offload":
        m.gradient_checkpointing_enable(offload=ActivationOffloader(copy_host=True, min_bytes=0))
    if tile:
        assert m.tiled_mlp_enable(tile) == m.config.num_hidden_layers
    m = fastft.get_peft_model(m, fastft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear",
                                                   init_lora_weights=False))
    return m.train()


def _step(m, batch):
    loss = m(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}


def _batch(packed):
    g = torch.Generator().manual_seed(3)
    if packed:
        ids = torch.randint(3, 512, (1, 29), generator=g)
        return {"input_ids": ids, "labels": ids.clone(), "cu_seqlens": torch.tensor([0, 11, 29], dtype=torch.int32),
                "max_seqlen": 18}
    ids = torch.randint(3, 512, (2, 23), generator=g)
    mask = torch.ones(2, 23, dtype=torch.long)
    mask[1, 17:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def _close(a, b):
    # fp32, only the summation order differs (per-tile partial sums of the adapters' gradients)
    tol = 64 * torch.finfo(torch.float32).eps * max(1.0, float(b.abs().max()))
    assert (a - b).abs().max() <= tol, float((a - b).abs().max())


@pytest.mark.parametrize("quant", [None, "nf4"])
@pytest.mark.parametrize("checkpointing", [None, "on", "offload"])
@pytest.mark.parametrize("packed", [False, True])
def test_tiled_mlp_gives_the_untiled_loss_and_gradients(quant, checkpointing, packed):
    batch = _batch(packed)
    loss0, ref = _step(_model(quant), batch)
    # 7 tokens per tile: 46 (or 29) rows in unequal-looking tiles, a short tail folded into equal tiles
    loss, got = _step(_model(quant, tile=7, checkpointing=checkpointing), batch)
    _close(loss, loss0)
    assert got.keys() == ref.keys()
    for n in ref:
        _close(got[n], ref[n])
    assert any(bool(g.abs().sum() > 0) for n, g in got.items() if "mlp" in n)


def test_tiled_rows_matches_the_function_and_its_gradient_in_float64():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(5, 13), nn.SiLU(), nn.Linear(13, 5)).double()
    x = torch.randn(3, 11, 5, dtype=torch.float64, requires_grad=True)
    for tile in (1, 4, 33, 100):
        y = tiled_rows(mlp, x, tile)
        y0 = mlp(x)
        torch.testing.assert_close(y, y0, rtol=1e-13, atol=1e-13)
        g = torch.randn_like(y)
        gx, gw = torch.autograd.grad(y, (x, mlp[0].weight), g)
        gx0, gw0 = torch.autograd.grad(y0, (x, mlp[0].weight), g)
        torch.testing.assert_close(gx, gx0, rtol=1e-13, atol=1e-13)
        torch.testing.assert_close(gw, gw0, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="tile_rows"):
        tiled_rows(mlp, x, 0)


def test_tiled_mlp_holds_one_tile_of_mlp_activations():
    """Peak live bytes of a training step's forward + backward on real tensors: tiling removes
    about the untiled MLP's (tokens x intermediate) activations."""
    cfg = fastft.models.synthetic.make_config("tiny-llama")
    cfg.intermediate_size = 1024  # the MLP dominates the activations
    T = 512

    def peak(tile):
        torch.manual_seed(0)
        m = fastft.from_config(cfg, seed=1).train()
        m.requires_grad_(False)
        if tile:
            m.tiled_mlp_enable(tile)
        for layer in m.model.layers:
            layer.mlp.down_proj.weight.requires_grad_(True)
        ids = torch.randint(3, 512, (1, T))
        mem = LiveBytes()
        with mem:
            m(input_ids=ids, labels=ids).loss.backward()
        return mem.peak["cpu"]

    untiled, tiled = peak(None), peak(64)
    mlp_acts = 3 * T * cfg.intermediate_size * 4  # gate, up, silu_mul output (fp32), per layer
    assert untiled - tiled >= 0.75 * mlp_acts, (untiled, tiled, mlp_acts)


def test_tiled_mlp_enable_checks_its_argument():
    m = fastft.from_config("tiny-llama")
    with pytest.raises(ValueError, match="tile_tokens"):
        m.tiled_mlp_enable(-1)
    assert m.tiled_mlp_enable(None) == 2 and all(layer.mlp.tile_tokens is None for layer in m.model.layers)


def _token_dataset(n, vocab):
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": (ids := torch.randint(3, vocab, (10,), generator=g).tolist()), "labels": ids}
            for _ in range(n)]


def test_trainer_memory_options_match_plain_training(tmp_path):
    """TrainingArguments(tiled_mlp=..., offload_embeddings=True, gradient_checkpointing="offload"): the
    same losses as plain training (fp32 summation order), the options really applied."""
    from fastft.nn.offload import HostEmbedding, HostLinear
    from fastft.train import Trainer, TrainingArguments

    runs = {}
    for lean in (False, True):
        m = _model("nf4")
        kw = dict(tiled_mlp=7, offload_embeddings=True, gradient_checkpointing="offload") if lean else {}
        a = TrainingArguments(output_dir=str(tmp_path / str(lean)), max_steps=3, per_device_train_batch_size=2,
                              learning_rate=1e-3, save_steps=None, plot_loss=False, save_final_model=False,
                              disable_tqdm=True, logging_steps=1, forgetting_report=False, **kw)
        runs[lean] = Trainer(m, _token_dataset(6, 512), args=a).train().losses
        base = m.base_model.model
        assert isinstance(base.model.embed_tokens, HostEmbedding) == lean
        assert isinstance(base.lm_head, HostLinear) == lean
        assert all(layer.mlp.tile_tokens == (7 if lean else None) for layer in base.model.layers)
    assert len(runs[True]) == len(runs[False]) == 3
    for a, b in zip(runs[True], runs[False]):
        assert abs(a - b) <= 1e-5 * max(1.0, abs(b)), (runs[True], runs[False])


def test_memory_option_flags_and_refusals(tmp_path):
    from fastft.cli import build_parser
    from fastft.errors import UsageError
    from fastft.train import Trainer, TrainingArguments

    p = build_parser()
    a = p.parse_args(["train", "--model", "m", "--data", "d", "--tiled-mlp", "4096", "--offload-embeddings"])
    assert a.tiled_mlp == 4096 and a.offload_embeddings is True
    with pytest.raises(ValueError, match="tiled_mlp"):
        TrainingArguments(output_dir=str(tmp_path), tiled_mlp=0)
    cfg = fastft.models.synthetic.make_config("tiny-llama")
    cfg.tie_word_embeddings = True
    m = fastft.get_peft_model(fastft.from_config(cfg), fastft.LoraConfig(r=2, target_modules="all-linear"))
    args = TrainingArguments(output_dir=str(tmp_path), offload_embeddings=True, max_steps=1)
    Trainer(m, _token_dataset(2, 512), args=args)  # a tied table: one host tensor for both modules
    base = m.base_model.model
    assert base.lm_head.weight is base.model.embed_tokens.weight and base.lm_head.host_resident
    m = fastft.get_peft_model(fastft.from_config("tiny-llama"), fastft.LoraConfig(r=2, target_modules="all-linear"))
    m.base_model.model.model.embed_tokens.weight.requires_grad_(True)
    with pytest.raises(UsageError, match="trainable"):
        Trainer(m, _token_dataset(2, 512), args=args)
