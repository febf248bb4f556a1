"""No host synchronisation in a training step (issue 15, memory part): a native-model step (forward,
backward, gradient clipping, optimizer) reads no device value on the host.

On CPU the step runs with every host-read pattern patched to record calls made from fastft's own code
(``.item()``, ``.tolist()``, ``bool(t)``, ``int(t)``, ``float(t)``, ``.cpu()``, ``.numpy()``,
``nonzero``, ``torch.equal``, ``repeat_interleave`` without ``output_size``, ``unique``,
``masked_select`` and indexing with a boolean tensor): on a GPU each would make the host wait for the
device. Three places may read tensors (``ALLOWED``): the C++ CPU backend (``fastft/ops/cpp.py``,
never used for a device tensor), ``fastft.ops.argcheck.host_value`` (None for a non-CPU tensor,
checked below) and the reference ``attention_varlen`` (the oracle's per-document loop; CUDA runs the
Triton kernel). With CUDA the same step runs under
``torch.cuda.set_sync_debug_mode("error")``.
"""
import os
import sys

import pytest
import torch

import fastft
import fastft.kernels
from fastft.ops.argcheck import check_async, host_value
from fastft.train import Trainer, TrainingArguments
from fastft.train.collators import DataCollatorForCLM, DataCollatorForPacking

ROOTS = tuple(os.path.dirname(m.__file__) + os.sep for m in (fastft, fastft.kernels))
# The C++ CPU backend (CPU tensors only), host_value (None for a device tensor), and the reference
# attention_varlen: the oracle loops over documents (so needs their offsets); on CUDA the triton
# backend runs varlen attention (kernels/attention.py, checked here through its CPU-offset branch).
ALLOWED = {("cpp.py", None), ("argcheck.py", "host_value"), ("reference.py", "attention_varlen")}


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _allowed(code) -> bool:
    base = os.path.basename(code.co_filename)
    return (base, None) in ALLOWED or (base, code.co_name) in ALLOWED


@pytest.fixture
def host_reads(monkeypatch):
    """Records (pattern, file:line, function) of every host-read pattern called from fastft code."""
    calls = []

    def caller():
        f = sys._getframe(2)
        code = f.f_code
        if code.co_filename.startswith(ROOTS) and not _allowed(code):
            return f"{os.path.relpath(code.co_filename, os.path.dirname(ROOTS[0].rstrip(os.sep)))}:{f.f_lineno}"
        return None

    def wrap(owner, name, when=None):
        orig = getattr(owner, name)

        def patched(*a, **k):
            where = caller()
            if where is not None and (when is None or when(*a, **k)):
                calls.append((name, where))
            return orig(*a, **k)

        monkeypatch.setattr(owner, name, patched)

    for n in ("item", "tolist", "__bool__", "__int__", "__float__", "cpu", "numpy", "nonzero"):
        wrap(torch.Tensor, n)
    for n in ("nonzero", "equal", "unique", "masked_select", "argwhere"):
        wrap(torch, n)
    wrap(torch, "repeat_interleave", when=lambda *a, **k: k.get("output_size") is None and len(a) >= 2
         and isinstance(a[1], torch.Tensor))

    def bool_index(t, idx, *rest):
        idx = idx if isinstance(idx, tuple) else (idx,)
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool and i.dim() > 0 for i in idx)

    wrap(torch.Tensor, "__getitem__", when=bool_index)
    wrap(torch.Tensor, "__setitem__", when=bool_index)
    return calls


def test_recorder_catches_the_patterns(host_reads):
    """The recorder itself: host reads made from fastft code are caught (no test that cannot fail)."""
    from fastft.ops import loss as L

    t = torch.tensor([1, 0, 2])
    code = compile("t.item() if t.numel() == 1 else t.tolist(); bool(t.any()); t[t > 0]; int(t.max())",
                   L.__file__, "exec")
    exec(code, {"t": t})
    assert [c[0] for c in host_reads] == ["tolist", "__bool__", "__getitem__", "__int__"]


def test_host_value_never_reads_a_device_tensor():
    assert host_value(torch.tensor(True)) is True
    assert host_value(torch.tensor(3)) == 3
    assert host_value(torch.tensor(True, device="meta")) is None
    with pytest.raises(ValueError, match="boom"):
        check_async(torch.tensor(False), "boom")
    check_async(torch.tensor(True), "never")


def _model(quant, device="cpu"):
    torch.manual_seed(0)
    m = fastft.from_config("tiny-llama", quantization=quant, seed=1, device=device)
    cfg = fastft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules="all-linear")
    return fastft.get_peft_model(m, cfg).train()


def _examples(n=3):
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": (ids := torch.randint(3, 512, (int(L),), generator=g).tolist()), "labels": ids}
            for L in torch.randint(4, 12, (n,), generator=g)]


def _trainer(model, packed, tmp_path, gc=False):
    a = TrainingArguments(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=3, save_steps=None,
                          plot_loss=False, save_final_model=False, disable_tqdm=True, gradient_checkpointing=gc)
    coll = DataCollatorForPacking() if packed else DataCollatorForCLM(pad_token_id=0)
    tr = Trainer(model, _examples(), args=a, data_collator=coll)
    if gc == "offload":
        model.gradient_checkpointing_enable(offload=True)
    elif gc:
        model.gradient_checkpointing_enable()
    tr.create_optimizer()
    return tr, coll


def _step(tr, coll, recorded=None):
    """One optimizer step; ``recorded`` (the host_reads list) is emptied where the step begins: the
    collation and the target count before it are host work on host tensors, as in the loop."""
    batch = coll(_examples())
    n = tr.count_targets(batch)
    if recorded is not None:
        recorded.clear()
    loss = tr.training_step([batch], n)
    gn = tr._grad_norm_and_clip()
    tr.optimizer.step()
    tr.optimizer.zero_grad(set_to_none=True)
    return loss, gn


@pytest.mark.parametrize("quant", [None, "nf4"], ids=["lora", "qlora"])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("gc", [False, "offload"], ids=["nogc", "offload"])
def test_training_step_reads_nothing_on_the_host(quant, packed, gc, tmp_path, host_reads):
    tr, coll = _trainer(_model(quant), packed, tmp_path, gc)
    loss, gn = _step(tr, coll, host_reads)
    assert host_reads == [], host_reads
    assert torch.isfinite(loss) and gn > 0  # (read after the check)


@pytest.mark.parametrize("quant", [None, "nf4"], ids=["lora", "qlora"])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_training_step_on_cuda_never_synchronises(quant, packed, tmp_path, device):
    """(``device``: the GPU check selects files whose tests take it and runs them with --device cuda.)"""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA (torch.cuda.set_sync_debug_mode)")
    tr, coll = _trainer(_model(quant, "cuda"), packed, tmp_path, gc="offload")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        _step(tr, coll)  # warm-up: autotuning and first-call allocations may synchronise
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, gn = _step(tr, coll)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss) and gn > 0


@pytest.mark.parametrize("arch", ["bert", "roberta"])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_encoder_training_step_reads_nothing_on_the_host(arch, packed, tmp_path, host_reads):
    """The native BERT / RoBERTa MLM step (QLoRA), padded and packed: the same rule."""
    sys.path.insert(0, os.path.dirname(__file__))
    from models_util import tiny_config

    torch.manual_seed(0)
    m = fastft.from_config(tiny_config(arch), quantization="nf4", seed=1)
    m = fastft.get_peft_model(m, fastft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules="all-linear"))
    g = torch.Generator().manual_seed(0)
    if packed:
        lens = [5, 9, 4]
        ids = torch.randint(5, 100, (1, sum(lens)), generator=g)
        batch = {"input_ids": ids, "labels": ids.masked_fill(torch.rand(ids.shape, generator=g) < 0.7, -100),
                 "cu_seqlens": torch.tensor([0, 5, 14, 18], dtype=torch.int32), "max_seqlen": 9}
    else:
        ids = torch.randint(5, 100, (3, 10), generator=g)
        mask = torch.ones_like(ids)
        mask[1, 7:] = 0
        labels = ids.masked_fill((torch.rand(ids.shape, generator=g) < 0.7) | (mask == 0), -100)
        batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    a = TrainingArguments(output_dir=str(tmp_path), max_steps=1, save_steps=None, plot_loss=False,
                          save_final_model=False, disable_tqdm=True)
    tr = Trainer(m.train(), [{"input_ids": [5, 6, 7]}], args=a, data_collator=lambda f: batch)
    tr.create_optimizer()
    n = tr.count_targets(batch)
    host_reads.clear()
    loss = tr.training_step([batch], n)
    tr._grad_norm_and_clip()
    tr.optimizer.step()
    assert host_reads == [], host_reads
    assert torch.isfinite(loss)
