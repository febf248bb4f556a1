"""Activation checkpointing per decoder layer, with the saved layer inputs offloaded to host memory
(fastft/nn/checkpointing.py): same gradients as no checkpointing, the saved inputs really stored on the
host, reachable from TrainingArguments / the CLI / transformers.Trainer on a fastft.patch'ed model."""
import pytest
import torch

import fastft
from fastft.nn.checkpointing import ActivationOffloader, checkpoint_block
from fastft.train import Trainer, TrainingArguments


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _lora_model(quant, dropout=0.1):
    torch.manual_seed(0)  # the adapters' initialisation
    m = fastft.from_config("tiny-llama", quantization=quant, seed=1)
    m = fastft.get_peft_model(m, fastft.LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules="all-linear",
                                                   init_lora_weights=False))
    return m.train()


def _grads(mode, quant, batch, offloader=None):
    m = _lora_model(quant)
    if mode == "on":
        m.gradient_checkpointing_enable()
    elif mode == "offload":
        m.gradient_checkpointing_enable(offload=offloader if offloader is not None else True)
    torch.manual_seed(123)  # the LoRA dropout masks
    loss = m(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}


def _padded_batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 512, (2, 12), generator=g)
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 9:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _packed_batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 512, (1, 14), generator=g)
    return {"input_ids": ids, "labels": ids.clone(), "cu_seqlens": torch.tensor([0, 5, 14], dtype=torch.int32),
            "max_seqlen": 9}


@pytest.mark.parametrize("quant", [None, "nf4"])
@pytest.mark.parametrize("packed", [False, True])
def test_checkpointing_and_offload_give_the_same_gradients(quant, packed):
    batch = _packed_batch() if packed else _padded_batch()
    loss0, ref = _grads("off", quant, batch)
    for mode in ("on", "offload"):
        # copy_host=True: on a CPU-only machine the offloader still copies (the pack / unpack path runs)
        off = ActivationOffloader(copy_host=True, min_bytes=0) if mode == "offload" else None
        loss, got = _grads(mode, quant, batch, off)
        assert torch.equal(loss, loss0), mode  # the recompute runs the same ops on the same inputs: bit-exact
        assert got.keys() == ref.keys()
        for n in ref:
            assert torch.equal(got[n], ref[n]), (mode, n)
        if off is not None:
            assert off.stats.offloaded > 0 and off.stats.unpacked == off.stats.packed
    assert any(g.abs().sum() > 0 for g in ref.values())


def test_offload_keeps_exactly_the_layer_inputs_on_the_host():
    batch = _padded_batch()
    m = _lora_model("nf4")
    cfg = m.config
    h_bytes = batch["input_ids"].numel() * cfg.hidden_size * 4
    seen = []

    class Recording(ActivationOffloader):
        def _pack(self, t):
            rec = super()._pack(t)
            seen.append((t, rec))
            return rec

    off = Recording(copy_host=True, min_bytes=h_bytes)  # the (B, T, hidden) layer inputs, not cos/sin
    m.gradient_checkpointing_enable(offload=off)
    assert m.activation_offloader is off
    loss = m(**batch).loss
    n_layers = cfg.num_hidden_layers
    assert off.stats.offloaded == n_layers
    offloaded = [(t, rec) for t, rec in seen if not rec.kept]
    assert len(offloaded) == n_layers
    for t, rec in offloaded:
        assert tuple(t.shape) == (*batch["input_ids"].shape, cfg.hidden_size)
        assert rec.host.device.type == "cpu" and torch.equal(rec.host, t)
        assert rec.host.data_ptr() != t.data_ptr()  # a stored copy, not the tensor the forward made
    # the prefetch chain links each layer input to the previous one
    assert offloaded[1][1].prev() is offloaded[0][1]
    loss.backward()
    assert off.stats.unpacked == off.stats.packed
    assert off.stats.prefetched == n_layers - 1


def test_default_offloader_on_cpu_copies_nothing():
    off = ActivationOffloader()
    lin = torch.nn.Linear(8, 8)
    x = torch.randn(4, 8, requires_grad=True)
    y = checkpoint_block(lin, x, offload=off)
    y.sum().backward()
    assert off.stats.packed >= 1 and off.stats.offloaded == 0 and off.stats.kept == off.stats.packed
    with pytest.raises(ValueError, match="non-reentrant"):
        checkpoint_block(lin, x, offload=off, use_reentrant=True)


def test_offload_on_cuda_stores_pinned_host_copies_and_matches(device):
    """(``device``: the GPU check selects files whose tests take it and runs them with --device cuda.)"""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    torch.manual_seed(0)
    layer = torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.GELU(), torch.nn.Linear(512, 512)).cuda()
    x = torch.randn(1024, 512, device="cuda", requires_grad=True)

    def run(off):
        layer.zero_grad()
        x.grad = None
        h = x * 2
        for _ in range(3):
            h = checkpoint_block(layer, h, offload=off) if off is not False else layer(h)
        h.square().sum().backward()
        return x.grad.clone(), [p.grad.clone() for p in layer.parameters()]

    ref = run(False)
    off = ActivationOffloader()
    got = run(off)
    torch.cuda.synchronize()
    assert off.stats.offloaded == 3 and off.stats.stored_devices.get("cpu") == 3
    assert off.stats.prefetched == 2
    for a, b in zip([ref[0], *ref[1]], [got[0], *got[1]]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# --- reachability -------------------------------------------------------------------------------------
@pytest.mark.parametrize("value,mode", [(False, False), (True, True), ("on", True), ("off", False),
                                        ("offload", "offload"), ("OFFLOAD", "offload"), ("true", True)])
def test_training_arguments_modes(value, mode, tmp_path):
    assert TrainingArguments(output_dir=str(tmp_path), gradient_checkpointing=value).gradient_checkpointing == mode


def test_training_arguments_bad_mode_is_named(tmp_path):
    with pytest.raises(ValueError, match="gradient_checkpointing='sometimes'.*off, on, offload"):
        TrainingArguments(output_dir=str(tmp_path), gradient_checkpointing="sometimes")


def test_cli_flag_spellings():
    from fastft.cli import build_parser

    p = build_parser()
    base = ["train", "--model", "m", "--data", "d"]
    assert p.parse_args(base).gradient_checkpointing is None
    assert p.parse_args(base + ["--gradient-checkpointing"]).gradient_checkpointing == "on"
    for v in ("on", "off", "offload"):
        assert p.parse_args(base + ["--gradient-checkpointing", v]).gradient_checkpointing == v
    with pytest.raises(SystemExit):
        p.parse_args(base + ["--gradient-checkpointing", "maybe"])
    assert p.parse_args(base + ["--fused-lora-blocks", "on"]).fused_lora_blocks == "on"
    assert TrainingArguments(fused_lora_blocks="on").fused_lora_blocks is True


def _token_dataset(n, vocab):
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": (ids := torch.randint(3, vocab, (10,), generator=g).tolist()), "labels": ids}
            for _ in range(n)]


def test_trainer_offload_matches_plain(tmp_path):
    runs = {}
    for mode in (False, "offload"):
        torch.manual_seed(0)
        m = _lora_model("nf4", dropout=0.0)
        a = TrainingArguments(output_dir=str(tmp_path / str(mode)), max_steps=2, per_device_train_batch_size=2,
                              learning_rate=1e-3, save_steps=None, plot_loss=False, save_final_model=False,
                              disable_tqdm=True, gradient_checkpointing=mode, logging_steps=1)
        runs[mode] = Trainer(m, _token_dataset(4, 512), args=a).train().losses
        if mode:
            off = m.base_model.model.activation_offloader
            assert off is not None and off.stats.packed > 0
    assert runs["offload"] == runs[False]


def test_hf_trainer_offload_on_patched_model(tmp_path):
    import transformers

    def build():
        torch.manual_seed(0)
        cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
        return fastft.patch(transformers.LlamaForCausalLM(cfg))

    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": (ids := torch.randint(3, 128, (12,), generator=g).tolist()), "labels": ids}
            for _ in range(8)]

    def collate(fs):
        ids = torch.tensor([f["input_ids"] for f in fs])
        return {"input_ids": ids, "labels": ids.clone()}

    losses = {}
    for gc in (None, {"offload": True}):
        model = build()
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path / str(bool(gc))), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-3,
            logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, seed=0,
            gradient_checkpointing=gc is not None, gradient_checkpointing_kwargs=gc)
        tr = transformers.Trainer(model=model, args=args, train_dataset=rows, data_collator=collate)
        tr.train()
        losses[bool(gc)] = [r["loss"] for r in tr.state.log_history if "loss" in r]
        if gc:
            off = model._fastft_offloader
            assert off is not None and off.stats.packed >= 2 * 2  # two layers, two steps
            funcs = [m._gradient_checkpointing_func for m in model.modules()
                     if hasattr(m, "_gradient_checkpointing_func")]
            assert funcs and all(f.func.offloader is off for f in funcs)
    assert losses[True] == losses[False]
