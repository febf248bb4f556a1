"""Helpers for tests/test_shard_load.py, run in every rank of a 2-process torchrun job
(``python -m torch.distributed.run ... tests/shard_load_worker.py spec.json``).

spec: {"model_dir", "bnb_dir" / "bnb_no_dq_dir" (the same model saved in bitsandbytes' NF4 layout,
with / without double quantization), "out_dir",
"jobs": [dist_worker jobs]}. Each rank writes out_dir/rank<r>.json:

* ``layers``: for awkward standalone NF4 layers (1 block: one rank gets none; 514 blocks over three
  nested groups; blocksize 128; without double quantization) whether this rank's shard built by
  per-rank quantization equals, bit for bit, its shard of the whole-tensor path;
* ``model``: the same for every NF4 layer of the checkpoint loaded both ways, plus, per path, the
  elements this rank quantized (counted at ``fastft.ops.nf4_quantize``, the one entry of every NF4
  quantizer) and the bytes it read of the quantized layers' tensors (at ``SafetensorsFile.read_range``,
  through which every safetensors read goes), and the elements of its own shards;
* ``bnb``: the same for the NF4 checkpoint (nothing quantized; codes and scales read by range);
* then the dist_worker training jobs (rank 0 writes their result.json).
"""
from __future__ import annotations

import json
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

COUNT = {"elements": 0, "bytes": 0}
QUANT_KEYS: set = set()


def _instrument():
    import fastft.ops as ops
    from fastft.models.safetensors_io import SafetensorsFile

    quantize, read_range = ops.nf4_quantize, SafetensorsFile.read_range

    def counting_quantize(w, *a, **k):
        COUNT["elements"] += w.numel()
        return quantize(w, *a, **k)

    def counting_read(self, name, start, stop, **k):
        if name in QUANT_KEYS:
            COUNT["bytes"] += (stop - start) * self.tensors[name].dtype.itemsize
        return read_range(self, name, start, stop, **k)

    ops.nf4_quantize = counting_quantize
    SafetensorsFile.read_range = counting_read


def _reset() -> dict:
    """The counts since the last reset; resets them."""
    got = dict(COUNT)
    COUNT.update(elements=0, bytes=0)
    return got


def _shards(model) -> dict:
    """Every ShardableNF4Linear's local tensors (this rank's shards and the replicated buffers)."""
    from fastft.nn.sharded_quant_linear import ShardableNF4Linear

    out = {}
    for name, m in model.named_modules():
        if isinstance(m, ShardableNF4Linear):
            assert not m.is_pending, name
            t = {k: getattr(m, k) for k in ("qdata", "qabsmax", "quant_map", "nested_absmax", "nested_quant_map")}
            out[name] = ({k: (v.to_local() if hasattr(v, "to_local") else v) for k, v in t.items() if v is not None},
                         m._offset)
    return out


def _same(a: dict, b: dict) -> dict:
    """name -> True when the two paths' local tensors and offsets are identical (bit for bit)."""
    res = {}
    for name in a:
        (ta, oa), (tb, ob) = a[name], b[name]
        res[name] = (set(ta) == set(tb) and oa == ob and all(
            ta[k].dtype == tb[k].dtype and ta[k].shape == tb[k].shape and torch.equal(ta[k], tb[k]) for k in ta))
    return res


class _Source:
    """An in-memory dense weight, read by element range (what the loader's safetensors source does)."""

    def __init__(self, w):
        self.w = w

    def read(self, start, stop, device):
        COUNT["bytes"] += (stop - start) * self.w.element_size()
        return self.w.reshape(-1)[start:stop].to(device, copy=True)

    def close(self):
        pass

    def __str__(self):
        return f"in-memory {tuple(self.w.shape)}"


def standalone_layers():
    """Awkward single layers, each in its own FSDP root: per-rank shards vs the whole-tensor path."""
    from torch import nn

    from fastft.nn import QuantLinear
    from fastft.nn.sharded_quant_linear import ShardableNF4Linear
    from fastft.train.distributed import setup_fsdp

    cases = {"1-block": (1, 64, 64, True), "514-blocks": (257, 128, 64, True), "bs128": (24, 80, 128, True),
             "no-double-quant": (33, 64, 64, False), "1-block-no-double-quant": (1, 64, 64, False)}
    out = {}
    for tag, (o, i, bs, dq) in cases.items():
        g = torch.Generator().manual_seed(len(tag))
        w = torch.randn(o, i, generator=g) * torch.rand(o, 1, generator=g) * 3  # scales vary by row
        old = nn.Sequential(QuantLinear.from_linear(_linear(w), blocksize=bs, double_quant=dq))
        setup_fsdp(old)
        new = nn.Sequential(ShardableNF4Linear.pending(i, o, _Source(w), blocksize=bs, double_quant=dq))
        setup_fsdp(new)
        out[tag] = all(_same(_shards(old), _shards(new)).values())
    return out


def _linear(w):
    from torch import nn

    lin = nn.Linear(w.shape[1], w.shape[0], bias=False)
    with torch.no_grad():
        lin.weight.copy_(w)
    return lin


def checkpoint_both_ways(model_dir):
    import fastft
    from fastft.nn.sharded_quant_linear import pending_layers
    from fastft.train.distributed import setup_fsdp

    rows = {}
    old = fastft.from_pretrained(model_dir, quantization="nf4", shard_quantization=False)
    rows["old_load"] = _reset()  # everything is read and quantized here
    setup_fsdp(old)
    rows["old_setup"] = _reset()
    new = fastft.from_pretrained(model_dir, quantization="nf4")  # the default inside a process group
    rows["new_pending"] = len(pending_layers(new))
    rows["new_load"] = _reset()
    setup_fsdp(new)
    rows["new_setup"] = _reset()
    a, b = _shards(old), _shards(new)
    rows["same"] = _same(a, b)
    rows["own_elements"] = sum(t["qdata"].numel() * 2 for t, _ in b.values())  # 2 codes a byte
    rows["total_elements"] = sum(m.qdata.numel() * 2 for _, m in _named_nf4(new))
    # The whole (gathered) codes agree too, and a forward pass gives the same logits.
    rows["full_same"] = all(torch.equal(m1.qdata.full_tensor(), m2.qdata.full_tensor())
                            for (_, m1), (_, m2) in zip(_named_nf4(old), _named_nf4(new)))
    ids = torch.arange(3, 19).reshape(2, 8)
    with torch.no_grad():
        rows["logits_same"] = bool(torch.equal(old(input_ids=ids).logits, new(input_ids=ids).logits))
    return rows


def _named_nf4(model):
    from fastft.nn.sharded_quant_linear import ShardableNF4Linear

    return [(n, m) for n, m in model.named_modules() if isinstance(m, ShardableNF4Linear)]


def main(path):
    import fastft
    from fastft.train import distributed as D

    D.init_from_env(timeout_s=120)
    with open(path) as f:
        spec = json.load(f)
    model = fastft.from_pretrained(spec["model_dir"], quantization="nf4", shard_quantization=False)
    # the quantized layers' tensors: dense weights, or an NF4 checkpoint's codes and block scales
    QUANT_KEYS.update(n + k for n, m in _named_quant(model) for k in (".weight", ".weight.absmax"))
    del model
    _instrument()
    res = {"layers": standalone_layers()}
    _reset()
    res["model"] = checkpoint_both_ways(spec["model_dir"])
    res["bnb"] = checkpoint_both_ways(spec["bnb_dir"])  # already NF4: read by block range, not quantized
    res["bnb_no_dq"] = checkpoint_both_ways(spec["bnb_no_dq_dir"])  # fp32 block scales
    with open(os.path.join(spec["out_dir"], f"rank{D.rank()}.json"), "w") as f:
        json.dump(res, f)
    from dist_worker import run_job

    for job in spec["jobs"]:
        run_job(job)
    torch.distributed.destroy_process_group()


def _named_quant(model):
    from fastft.nn import QuantLinear

    return [(n, m) for n, m in model.named_modules() if isinstance(m, QuantLinear)]


if __name__ == "__main__":
    main(sys.argv[1])
