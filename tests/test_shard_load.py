"""Per-rank NF4 quantization at load for FSDP2 + QLoRA (issue 17, item 2).

``from_pretrained(quantization="nf4")`` inside a process group of N > 1 ranks leaves the NF4 layers
pending (no weight read); ``setup_fsdp`` then has each rank read and quantize only the blocks of its
own shard. Checked on 2 gloo processes (one real ``torchrun`` launch of tests/shard_load_worker.py)
against the old path (every rank quantizes the whole weight, then FSDP2 shards it):

* the local shards are bit-identical (codes, block scales, nested scales, offsets), for every layer
  of a checkpoint with awkward shapes (333-wide MLP: an odd number of blocks, blocks straddling
  rows, two nested groups; sharded safetensors files) and for standalone layers (1 block, so one
  rank has none; three nested groups; blocksize 128; no double quantization);
* each rank quantized exactly its own shards' elements and read exactly their bytes from the
  checkpoint -- about half the model -- where the old path quantized and read all of it; from a
  checkpoint already in NF4 (bitsandbytes' layout) each rank reads only its codes and scales;
* training gives the same losses, bit for bit; a DDP run of the same pending model (the Trainer
  quantizes the whole weights for DDP) matches them to reduction-order noise.
"""
import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from dist_worker import worker_env  # noqa: E402

import fastft  # noqa: E402
from fastft.errors import UsageError  # noqa: E402
from fastft.nn import QuantLinear  # noqa: E402
from fastft.nn.sharded_quant_linear import (ShardableNF4Linear, materialize_pending,  # noqa: E402
                                            pending_layers)

STEPS = 4


_env = worker_env


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory):
    from models_util import save_tiny_checkpoint

    # intermediate 333: the MLP weights have 333 blocks of 64 (167 + 166 over two ranks, two nested
    # groups of 256, blocks straddling rows); sharded safetensors (9 files).
    return save_tiny_checkpoint(tmp_path_factory.mktemp("shardq"), "llama", sharded=True, intermediate_size=333)


@pytest.fixture(scope="module")
def run(ckpt_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("shardq-runs")

    def job(name, **kw):
        return {**dict(model_dir=ckpt_dir, quantization="nf4", strategy="fsdp", per_device_train_batch_size=2,
                       gradient_accumulation_steps=2, max_steps=STEPS, save_steps=None, output_dir=str(root / name)),
                **kw}

    jobs = [job("old", shard_quantization=False, eval_first=True), job("new", eval_first=True),
            job("new-ddp", strategy="ddp", eval_first=True)]
    from fastft.models import save_quantized

    bnb_dir = str(root / "bnb")
    save_quantized(fastft.from_pretrained(ckpt_dir, quantization="nf4"), bnb_dir)
    save_quantized(fastft.from_pretrained(ckpt_dir, quantization="nf4", double_quant=False), str(root / "bnb-no-dq"))
    spec = {"model_dir": ckpt_dir, "bnb_dir": bnb_dir, "bnb_no_dq_dir": str(root / "bnb-no-dq"), "out_dir": str(root),
            "jobs": jobs}
    (root / "spec.json").write_text(json.dumps(spec))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           os.path.join(HERE, "shard_load_worker.py"), str(root / "spec.json")]
    r = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    ranks = [json.loads((root / f"rank{i}.json").read_text()) for i in range(2)]
    jobs = {j["output_dir"].rsplit(os.sep, 1)[-1]: json.loads((root / j["output_dir"] / "result.json").read_text())
            for j in jobs}
    return ranks, jobs


def test_shards_bit_identical_to_the_whole_tensor_path(run):
    ranks, _ = run
    for r in ranks:
        assert r["layers"] == {"1-block": True, "514-blocks": True, "bs128": True, "no-double-quant": True,
                               "1-block-no-double-quant": True}
        m = r["model"]
        assert m["new_pending"] == 14 and len(m["same"]) == 14  # 2 layers x 7 linears
        assert all(m["same"].values()), [k for k, v in m["same"].items() if not v]
        assert m["full_same"] and m["logits_same"]
        for b in (r["bnb"], r["bnb_no_dq"]):  # NF4 checkpoints: the same, read by block range
            assert b["new_pending"] == 14 and all(b["same"].values()) and b["full_same"] and b["logits_same"]


def test_each_rank_quantizes_and_reads_only_its_shard(run):
    """Counted at fastft.ops.nf4_quantize (every NF4 quantizer's entry) and at
    SafetensorsFile.read_range (every safetensors read) for the quantized layers' tensors."""
    ranks, _ = run
    total = ranks[0]["model"]["total_elements"]
    assert sum(r["model"]["own_elements"] for r in ranks) == total
    for r in ranks:
        m = r["model"]
        own = m["own_elements"]
        assert m["new_load"] == {"elements": 0, "bytes": 0}  # loading reads no quantized weight
        assert m["new_setup"] == {"elements": own, "bytes": own * 4}  # fp32 checkpoint
        # dim-0 shards of whole blocks: half of each tensor up to one block (64 elements) of 14 tensors
        assert abs(own - total / 2) <= 14 * 64 / 2
        # The old path (the same counters, the same rank) quantized and read the whole model: the
        # assertion above would fail on it.
        assert m["old_load"] == {"elements": total, "bytes": total * 4}
        assert m["new_setup"]["elements"] < 0.55 * m["old_load"]["elements"]
        # An NF4 checkpoint: nothing is quantized; each rank reads its codes (2 a byte) and its
        # block scales (1 byte a block of 64), where the old path read all of them.
        b = r["bnb"]
        own_b = b["own_elements"] // 2 + b["own_elements"] // 64
        # (before any weight, the strict header check reads every layer's small tensors, the block
        # scales among them: 1 byte per 64 weights, 1/32 of the codes)
        assert b["new_load"] == {"elements": 0, "bytes": total // 64}
        assert b["new_setup"] == {"elements": 0, "bytes": own_b}
        assert b["old_load"] == {"elements": 0, "bytes": total // 2 + total // 64}
        b = r["bnb_no_dq"]  # fp32 block scales: 4 bytes a block
        assert b["new_load"] == {"elements": 0, "bytes": total // 64 * 4}
        assert b["new_setup"] == {"elements": 0, "bytes": own // 2 + own // 64 * 4}


def test_training_identical_to_the_old_path(run):
    _, jobs = run
    assert jobs["old"]["pending_at_load"] == 0 and jobs["new"]["pending_at_load"] == 14
    assert jobs["new"]["strategy"] == "fsdp" and jobs["new"]["world_size"] == 2
    assert len(jobs["new"]["losses"]) == STEPS and min(jobs["new"]["losses"]) > 1.0
    assert jobs["new"]["losses"] == jobs["old"]["losses"]  # bit for bit: the same shards
    # evaluate() before train(): the pending model is set up (sharded) first, same loss
    assert jobs["new"]["eval_first"] == jobs["old"]["eval_first"] and jobs["new"]["eval_first"] > 1.0
    assert all(f and n > 0 for f, n in jobs["new"]["grad_stats"].values())
    # DDP on a model loaded pending: the Trainer quantizes the whole weights first (the old path).
    assert jobs["new-ddp"]["pending_at_load"] == 14 and jobs["new-ddp"]["strategy"] == "ddp"
    assert abs(jobs["new-ddp"]["eval_first"] - jobs["old"]["eval_first"]) <= 1e-5 * jobs["old"]["eval_first"]
    torch.testing.assert_close(torch.tensor(jobs["new-ddp"]["losses"], dtype=torch.float64),
                               torch.tensor(jobs["old"]["losses"], dtype=torch.float64), rtol=1e-5, atol=0)


# --- one process ------------------------------------------------------------------------------
class _Source:
    def __init__(self, w):
        self.w = w

    def read(self, start, stop, device):
        return self.w.reshape(-1)[start:stop].to(device, copy=True)

    def close(self):
        pass

    def __str__(self):
        return "test weight"


def test_pending_layer_metadata_and_whole_materialisation():
    w = torch.randn(40, 96) * torch.rand(40, 1)
    bias = nn.Parameter(torch.randn(40))
    layer = ShardableNF4Linear.pending(96, 40, _Source(w), bias=bias, blocksize=64, double_quant=True)
    pw = layer.weight
    assert layer.is_pending and tuple(pw.shape) == (40, 96) and pw.device == torch.device("cpu")
    assert pw.double_quant and pw.nblocks == 60 and pw.dtype == torch.float32
    assert not layer.bias.requires_grad
    with pytest.raises(RuntimeError, match="test weight.*not quantized yet.*materialize_pending"):
        pw.data
    with pytest.raises(RuntimeError, match="not quantized yet"):
        layer(torch.randn(2, 96))
    model = nn.Sequential(layer)
    assert [n for n, _ in pending_layers(model)] == ["0"]
    assert materialize_pending(model) == 1 and not layer.is_pending and materialize_pending(model) == 0
    lin = nn.Linear(96, 40)
    with torch.no_grad():
        lin.weight.copy_(w)
        lin.bias.copy_(bias)
    ref = ShardableNF4Linear.from_quant_linear(QuantLinear.from_linear(lin))
    for k in ("qdata", "qabsmax", "quant_map", "nested_absmax", "nested_quant_map"):
        assert torch.equal(getattr(layer, k), getattr(ref, k)), k
    assert layer._offset == ref._offset
    x = torch.randn(3, 96)
    assert torch.equal(layer(x), ref(x))


def test_pending_layer_needs_whole_blocks():
    with pytest.raises(ValueError, match=r"\(3, 20\) weight has 60 elements, not a multiple of the block size 64"):
        ShardableNF4Linear.pending(20, 3, _Source(torch.zeros(3, 20)))


def test_read_range_reads_only_the_range(ckpt_dir):
    from fastft.models.safetensors_io import SafetensorsFile

    idx = json.loads(open(os.path.join(ckpt_dir, "model.safetensors.index.json")).read())["weight_map"]
    key = "model.layers.0.mlp.down_proj.weight"
    f = SafetensorsFile(os.path.join(ckpt_dir, idx[key]))
    whole = f.read(key)
    f.bytes_read = 0
    for a, b in ((0, 0), (0, 64), (333 * 3 + 5, 333 * 7 + 1), (whole.numel() - 10, whole.numel())):
        got = f.read_range(key, a, b, dtype=torch.bfloat16)
        assert got.dtype == torch.bfloat16 and torch.equal(got, whole.reshape(-1)[a:b].to(torch.bfloat16))
    assert f.bytes_read == (64 + 333 * 4 - 4 + 10) * 4
    with pytest.raises(ValueError, match=r"element range \[5, 4\) is outside tensor"):
        f.read_range(key, 5, 4)
    f.close()


@pytest.fixture
def fake_group(monkeypatch):
    """The loader's view of an initialised 2-rank process group (loading itself needs no collective)."""
    import torch.distributed as dist

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)


def test_loader_default_only_inside_a_process_group(ckpt_dir):
    m = fastft.from_pretrained(ckpt_dir, quantization="nf4")
    assert not pending_layers(m)
    with pytest.raises(UsageError, match="shard_quantization=True cannot apply: no process group"):
        fastft.from_pretrained(ckpt_dir, quantization="nf4", shard_quantization=True)
    with pytest.raises(UsageError, match="applies to NF4 layers, not quantization='int4'"):
        fastft.from_pretrained(ckpt_dir, quantization="int4", shard_quantization=True)


def test_loader_leaves_nf4_layers_pending_in_a_group(ckpt_dir, fake_group):
    m = fastft.from_pretrained(ckpt_dir, quantization="nf4")
    names = [n for n, _ in pending_layers(m)]
    assert len(names) == 14 and names[0] == "model.layers.0.self_attn.q_proj"
    # everything else is loaded (embeddings, norms, head: whole); LoRA builds on the pending layers
    assert all(p.device.type == "cpu" for n, p in m.named_parameters() if not n.startswith(tuple(names)))
    peft = fastft.get_peft_model(m, fastft.LoraConfig(r=4, target_modules="all-linear"))
    a = [p for n, p in peft.named_parameters() if n.endswith("lora_A.weight")]
    assert len(a) == 14 and all(p.device.type == "cpu" and p.abs().sum() > 0 for p in a)
    assert not pending_layers(fastft.from_pretrained(ckpt_dir, quantization="nf4", shard_quantization=False))


def test_loader_falls_back_where_it_cannot_apply(tmp_path, ckpt_dir, fake_group):
    """A pickle checkpoint (no byte-range reads): the old path by default, one clear error with
    shard_quantization=True. An NF4 (bitsandbytes) checkpoint is left pending (read by range)."""
    import shutil

    from safetensors.torch import load_file

    from fastft.models import save_quantized

    d = tmp_path / "bin"
    shutil.copytree(ckpt_dir, d)
    sd = {}
    for fn in sorted(os.listdir(d)):
        if fn.endswith(".safetensors"):
            sd.update(load_file(str(d / fn)))
            os.unlink(d / fn)
    os.unlink(d / "model.safetensors.index.json")
    torch.save(sd, d / "pytorch_model.bin")
    assert not pending_layers(fastft.from_pretrained(d, quantization="nf4", allow_pickle=True))
    with pytest.raises(UsageError, match="pickle"):
        fastft.from_pretrained(d, quantization="nf4", allow_pickle=True, shard_quantization=True)
    q = tmp_path / "nf4"
    save_quantized(fastft.from_pretrained(ckpt_dir, quantization="nf4", shard_quantization=False), q)
    for quant in (None, "nf4"):
        assert len(pending_layers(fastft.from_pretrained(q, quantization=quant))) == 14
    assert not pending_layers(fastft.from_pretrained(q, shard_quantization=False))
    with pytest.raises(UsageError, match="cannot apply: nothing is NF4"):
        fastft.from_pretrained(ckpt_dir, shard_quantization=True)


@pytest.mark.parametrize("strategy,expected", [(None, None), ("fsdp", None), ("ddp", False)])
def test_cli_train_asks_for_per_rank_quantization_unless_ddp(tmp_path, monkeypatch, capsys, strategy, expected):
    """``fastft train --method qlora``: FSDP (the default for QLoRA on > 1 rank) loads with the
    loader's default (per-rank quantization inside a process group); --strategy ddp turns it off."""
    import shutil

    from models_util import save_tiny_checkpoint

    from fastft.cli import main
    from fastft.errors import UsageError as Stop
    from fastft.models.convert import smollm2_path

    d = save_tiny_checkpoint(tmp_path, "llama", vocab_size=49152, hidden_size=32, intermediate_size=64,
                             num_hidden_layers=1, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    for f in os.listdir(smollm2_path()):
        if f.startswith(("tokenizer", "special_tokens")):
            shutil.copy2(os.path.join(smollm2_path(), f), d)
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"prompt": "Q: 1 plus 1?\nA:", "completion": " 2"}) + "\n")
    seen = {}

    def record(path, **kw):
        seen.update(kw)
        raise Stop("recorded")

    monkeypatch.setattr(fastft, "from_pretrained", record)
    argv = ["train", "--model", d, "--data", str(data), "--method", "qlora", "--output-dir", str(tmp_path / "o")]
    rc = main(argv + (["--strategy", strategy] if strategy else []))
    assert rc != 0 and "recorded" in capsys.readouterr().err
    assert seen["quantization"] == "nf4" and seen["shard_quantization"] is expected
