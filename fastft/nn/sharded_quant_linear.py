"""ShardableNF4Linear: a QuantLinear whose NF4 storage is frozen Parameters, so FSDP2 can shard it.

FSDP2 (``torch.distributed.fsdp.fully_shard``) shards a module's *Parameters* on dim 0 and
all-gathers them before the module's forward. A ``QuantLinear`` keeps its ``NF4Weight`` as a plain
attribute, which FSDP2 would replicate. This layer stores the same bytes as two frozen uint8
Parameters laid out one row per quantization block:

* ``qdata``   uint8 (nblocks, blocksize/2): the packed 4-bit codes of each block;
* ``qabsmax`` uint8 (nblocks, 1) with double quantization (the 8-bit code of each block's absmax),
  or (nblocks, 4) without it (the fp32 absmax viewed as its 4 bytes).

So dim 0 is the block index for both: any dim-0 shard holds whole blocks and their scales, the
all-gathers move the compact 4-bit bytes (4.125 bits per weight at blocksize 64 with double quant),
and mixed precision never casts them (FSDP2 leaves non-floating parameters alone; fp32 scales are
kept as bytes for that reason). The small per-tensor pieces -- the NF4 and nested code books and
the nested absmax (one fp32 per 256 blocks) -- are buffers, replicated. ``weight`` rebuilds the
``NF4Weight`` from the current (all-gathered) tensors, without copying, and the forward is
QuantLinear's: the fused kernels dequantize after the all-gather, inside the matmul.

Requires the element count to be a multiple of the block size (true for every real model:
in_features is a multiple of 64); anything else raises, naming the layer's shape.

**Per-rank quantization at load** (``ShardableNF4Linear.pending``): the loader can build the layer
without reading its weight -- ``qdata`` / ``qabsmax`` are meta-device Parameters of the full shape
and the layer keeps a *source* (an object with ``read(start, stop, device)`` returning elements
``[start, stop)`` of the row-major dense weight, e.g. a safetensors byte range). After
``fully_shard`` has cut the meta Parameters, ``materialize_shard`` reads only the elements of the
blocks FSDP2 gave this rank (``torch.chunk`` on dim 0: ceil(blocks/N) per rank, the last ones
shorter or empty), quantizes only those and installs them as the local shards (``DTensor.from_local``;
FSDP2's lazy init re-pads them, as after ``load_state_dict(assign=True)``). Blocks are independent,
so the codes and fp32 block scales are exactly those of the whole-tensor quantizer; double
quantization depends on the whole tensor (the offset is the mean of all block scales, nested groups
of 256 blocks), so the ranks all-gather the fp32 block scales (4 bytes per block: 1/32 of a bf16
weight) and each computes the double quantization of the whole vector -- bit-identical to the
whole-tensor path -- and keeps its slice. A checkpoint already in NF4 (bitsandbytes' layout) has a
``prequantized`` source instead (``read_codes`` / ``read_absmax`` by block range; code books, nested
scales and offset read at load): each rank reads its codes and scales and quantizes nothing.
``materialize_whole`` is the old path (read and quantize
the whole tensor), for a model that is not sharded after all (DDP, single use). Until one of the two
runs, the layer's ``weight`` is a ``PendingNF4Weight``: its metadata (shape, dtype, device, ...)
answers, any access to its data raises, naming the layer.
"""
from __future__ import annotations

import torch
from torch import nn

from fastft.quant import NF4Weight
from fastft.quant.nf4 import NESTED_BLOCKSIZE, double_quantize_absmax, dynamic_map, nf4_code

from .quant_linear import QuantLinear


class PendingNF4Weight(NF4Weight):
    """The metadata of an NF4 weight that is not quantized yet (see the module docstring): shape,
    blocksize, dtype, double_quant, device. Reading its tensors raises, naming the layer."""

    def __init__(self, shape, blocksize, dtype, double_quant, device, where):
        self.shape = torch.Size(shape)
        self.blocksize, self.dtype, self.nested_blocksize = int(blocksize), dtype, NESTED_BLOCKSIZE
        self.offset = 0.0 if double_quant else None
        self._double_quant, self._device, self._where = bool(double_quant), torch.device(device), where

    def _missing(self):
        raise RuntimeError(
            f"{self._where}: this NF4 weight is not quantized yet (it was loaded for per-rank quantization under "
            "FSDP: fastft.train.distributed.setup_fsdp quantizes each rank's shard). To use the model unsharded, "
            "call fastft.nn.sharded_quant_linear.materialize_pending(model) first, or load it with "
            "from_pretrained(..., shard_quantization=False)")

    data = property(lambda self: self._missing())
    absmax = property(lambda self: self._missing())
    quant_map = property(lambda self: self._missing())
    nested_absmax = property(lambda self: self._missing())
    nested_quant_map = property(lambda self: self._missing())

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def double_quant(self) -> bool:
        return self._double_quant

    @property
    def nblocks(self) -> int:
        return -(-self.numel // self.blocksize)

    def _tensors(self) -> dict:
        self._missing()

    def __repr__(self) -> str:
        return (f"PendingNF4Weight(shape={tuple(self.shape)}, blocksize={self.blocksize}, dtype={self.dtype}, "
                f"device={self.device}, double_quant={self.double_quant}, source={self._where})")


class ShardableNF4Linear(QuantLinear):
    """See the module docstring. Build with ``ShardableNF4Linear.from_quant_linear(layer)``, or
    ``ShardableNF4Linear.pending(...)`` for per-rank quantization at load."""

    _source = None  # set on a pending layer: where its dense weight is read from

    @classmethod
    def pending(cls, in_features: int, out_features: int, source, *, bias=None, blocksize: int = 64,
                double_quant: bool = True, dtype=torch.float32, device=None) -> "ShardableNF4Linear":
        """A layer whose (out, in) weight is not read yet: meta ``qdata`` / ``qabsmax`` of the full
        shape, to be cut by ``fully_shard`` and filled by ``materialize_shard`` (or ``materialize_whole``).
        ``source.read(start, stop, device)`` returns elements [start, stop) of the dense weight in
        ``dtype``; ``str(source)`` names it in messages. ``bias``: a loaded Parameter or None."""
        n = in_features * out_features
        if n % blocksize:
            raise ValueError(f"ShardableNF4Linear: a {(out_features, in_features)} weight has {n} elements, not a "
                             f"multiple of the block size {blocksize}: blocks would straddle shard boundaries")
        device = torch.device(device) if device is not None else torch.device("cpu")
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        nb = n // blocksize
        new.in_features, new.out_features = in_features, out_features
        new._shape, new._blocksize, new._dtype = torch.Size((out_features, in_features)), blocksize, dtype
        new._offset, new._nested_blocksize = (0.0 if double_quant else None), NESTED_BLOCKSIZE
        new._source, new._device = source, device
        new.qdata = nn.Parameter(torch.empty(nb, blocksize // 2, dtype=torch.uint8, device="meta"), requires_grad=False)
        new.qabsmax = nn.Parameter(torch.empty(nb, 1 if double_quant else 4, dtype=torch.uint8, device="meta"),
                                   requires_grad=False)
        new.register_buffer("quant_map", nf4_code(device))
        ng = -(-nb // NESTED_BLOCKSIZE)
        new.register_buffer("nested_absmax", torch.empty(ng, dtype=torch.float32, device="meta") if double_quant else None)
        new.register_buffer("nested_quant_map", dynamic_map(True, device) if double_quant else None)
        if bias is None:
            new.register_parameter("bias", None)
        else:  # frozen, as QuantLinear.from_linear leaves it
            new.bias = nn.Parameter(bias.detach().to(device), requires_grad=False)
        return new

    @property
    def is_pending(self) -> bool:
        return self._source is not None

    @torch.no_grad()
    def materialize_whole(self) -> None:
        """Read and quantize the whole weight (the path without per-rank quantization)."""
        if self._source is None:
            return
        if getattr(self._source, "prequantized", False):
            nb = self._shape.numel() // self._blocksize
            self._install(self._source.read_codes(0, nb, self._device), self._source.read_absmax(0, nb, self._device))
            self._source.close()
            self._source = None
            return
        w = self._source.read(0, self._shape.numel(), self._device).view(self._shape)
        qw = NF4Weight.from_float(w, blocksize=self._blocksize, double_quant=self.nested_absmax is not None)
        del w
        nb = qw.nblocks
        self.qdata = nn.Parameter(qw.data.reshape(nb, self._blocksize // 2), requires_grad=False)
        absmax = qw.absmax if qw.double_quant else qw.absmax.contiguous().view(torch.uint8)
        self.qabsmax = nn.Parameter(absmax.reshape(nb, -1), requires_grad=False)
        self.quant_map, self.nested_absmax, self.nested_quant_map = qw.quant_map, qw.nested_absmax, qw.nested_quant_map
        self._offset = qw.offset
        self._source.close()
        self._source = None

    @torch.no_grad()
    def materialize_shard(self) -> tuple[int, int]:
        """After ``fully_shard``: quantize only the blocks of this rank's shard (see the module
        docstring); a collective over the mesh when double quantization is on, so every rank of
        the mesh calls it for the same layers in the same order. Returns the blocks [b0, b1)."""
        import torch.distributed as dist
        from torch.distributed.tensor import DTensor, Shard

        p = self.qdata
        if self._source is None:
            raise RuntimeError("ShardableNF4Linear.materialize_shard: the layer is not pending")
        if not isinstance(p, DTensor) or tuple(p.placements) != (Shard(0),) or p.device_mesh.ndim != 1:
            raise RuntimeError(f"{self._source}: materialize_shard needs qdata sharded by fully_shard on a 1-D mesh "
                               f"(Shard(0)), got {type(p).__name__} {getattr(p, 'placements', None)}")
        mesh = p.device_mesh
        world, r = mesh.size(), mesh.get_local_rank()
        bs, nb = self._blocksize, self._shape.numel() // self._blocksize
        c = -(-nb // world)  # torch.chunk's chunk size, FSDP2's dim-0 shard rule

        def span(i):
            b0 = min(i * c, nb)
            return b0, min(nb, b0 + c)

        b0, b1 = span(r)
        if p.to_local().shape[0] != b1 - b0:  # FSDP changed its rule: refuse rather than mis-place blocks
            raise RuntimeError(f"{self._source}: FSDP2 gave rank {r} {p.to_local().shape[0]} of {nb} blocks, "
                               f"expected {b1 - b0} (blocks [{b0}, {b1}))")
        dev, dq = self._device, self.nested_absmax is not None
        if getattr(self._source, "prequantized", False):
            # An NF4 checkpoint: this rank's codes and stored scales, as they are (nested scales,
            # offset and code books were read at load: they are whole-tensor values).
            self._install(self._source.read_codes(b0, b1, dev), self._source.read_absmax(b0, b1, dev), mesh)
            self._source.close()
            self._source = None
            return b0, b1
        if b1 > b0:
            flat = self._source.read(b0 * bs, b1 * bs, dev)
            local = NF4Weight.from_float(flat.view(1, -1), blocksize=bs, double_quant=False)
            del flat
            codes, absmax = local.data.reshape(b1 - b0, bs // 2), local.absmax
        else:
            codes = torch.empty(0, bs // 2, dtype=torch.uint8, device=dev)
            absmax = torch.empty(0, dtype=torch.float32, device=dev)
        if dq:
            # The whole tensor's block scales (fp32, 4 bytes a block), to double-quantize them
            # exactly as the whole-tensor quantizer does; each rank keeps its slice.
            padded = torch.zeros(c, dtype=torch.float32, device=dev)
            padded[:b1 - b0] = absmax
            parts = [torch.empty_like(padded) for _ in range(world)]
            dist.all_gather(parts, padded, group=mesh.get_group())
            full = torch.cat([parts[i][:span(i)[1] - span(i)[0]] for i in range(world)])
            q, nested_absmax, offset = double_quantize_absmax(full, self._nested_blocksize)
            del parts, padded, full
            qabsmax = q[b0:b1].reshape(-1, 1).clone()
            self.nested_absmax, self._offset = nested_absmax, offset
        else:
            qabsmax = absmax
        self._install(codes, qabsmax, mesh)
        self._source.close()
        self._source = None
        return b0, b1

    def _install(self, codes, absmax, mesh=None):
        """Set ``qdata`` / ``qabsmax`` from codes (blocks, blocksize/2) and the stored block scales
        (uint8 codes with double quantization, else fp32): whole Parameters, or with ``mesh`` this
        rank's Shard(0) DTensors of the full shapes."""
        n = codes.shape[0]
        qabsmax = (absmax.reshape(n, 1) if absmax.dtype == torch.uint8
                   else absmax.contiguous().view(torch.uint8).reshape(n, 4))
        if mesh is None:
            self.qdata = nn.Parameter(codes, requires_grad=False)
            self.qabsmax = nn.Parameter(qabsmax, requires_grad=False)
            return
        from torch.distributed.tensor import DTensor, Shard

        nb = self._shape.numel() // self._blocksize

        def shard(local):
            width = local.shape[1]
            return nn.Parameter(DTensor.from_local(local, mesh, [Shard(0)], run_check=False, shape=(nb, width),
                                                   stride=(width, 1)), requires_grad=False)

        self.qdata, self.qabsmax = shard(codes), shard(qabsmax)

    @classmethod
    def from_quant_linear(cls, layer: QuantLinear) -> "ShardableNF4Linear":
        if isinstance(layer, cls):
            return layer
        w = layer.weight
        if not isinstance(w, NF4Weight):
            raise TypeError(f"ShardableNF4Linear: only NF4 weights can be sharded, got {type(w).__name__}")
        if w.numel % w.blocksize:
            raise ValueError(f"ShardableNF4Linear: a {tuple(w.shape)} weight has {w.numel} elements, not a multiple "
                             f"of the block size {w.blocksize}: blocks would straddle shard boundaries")
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        nb = w.nblocks
        new.in_features, new.out_features = layer.in_features, layer.out_features
        new._shape, new._blocksize, new._dtype = w.shape, w.blocksize, w.dtype
        new._offset, new._nested_blocksize = w.offset, w.nested_blocksize
        new.qdata = nn.Parameter(w.data.reshape(nb, w.blocksize // 2), requires_grad=False)
        absmax = w.absmax if w.double_quant else w.absmax.contiguous().view(torch.uint8)
        new.qabsmax = nn.Parameter(absmax.reshape(nb, -1), requires_grad=False)
        new.register_buffer("quant_map", w.quant_map)
        new.register_buffer("nested_absmax", w.nested_absmax)
        new.register_buffer("nested_quant_map", w.nested_quant_map)
        if layer.bias is None:
            new.register_parameter("bias", None)
        else:
            new.bias = layer.bias
        return new

    @property
    def weight(self) -> NF4Weight:
        if self._source is not None:
            return PendingNF4Weight(self._shape, self._blocksize, self._dtype, self.nested_absmax is not None,
                                    self._device, str(self._source))
        absmax = self.qabsmax.reshape(-1) if self.nested_absmax is not None else self.qabsmax.view(torch.float32)
        return NF4Weight(self.qdata.reshape(-1, 1), self._shape, self._blocksize, self._dtype, self.quant_map, absmax,
                         self.nested_absmax, self.nested_quant_map, self._offset, self._nested_blocksize)

    def _apply(self, fn, recurse=True):
        # Plain Module._apply: the storage is ordinary tensors (uint8 ones ignore dtype casts).
        return nn.Module._apply(self, fn, recurse)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        # The same keys as QuantLinear (bitsandbytes' layout), not the sharding layout.
        ws = self.weight.to_bnb_state_dict(prefix)
        destination[prefix + "weight"] = ws.pop(prefix + "weight")
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()
        destination.update(ws)

    def _load_from_state_dict(self, *args, **kwargs):
        raise NotImplementedError("ShardableNF4Linear does not load state dicts; load into a QuantLinear and convert")


def make_shardable(model: nn.Module) -> int:
    """Replace every NF4 ``QuantLinear`` in ``model`` by a ``ShardableNF4Linear`` (in place); returns
    how many were replaced. Other layers (int4 included) are left as they are."""
    count = 0
    for name, mod in list(model.named_modules()):
        for child_name, child in list(mod.named_children()):
            if type(child) is QuantLinear and isinstance(child.weight, NF4Weight):
                setattr(mod, child_name, ShardableNF4Linear.from_quant_linear(child))
                count += 1
    return count


def pending_layers(model: nn.Module) -> list[tuple[str, ShardableNF4Linear]]:
    """(name, layer) of every NF4 layer whose weight is not quantized yet, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, ShardableNF4Linear) and m.is_pending]


def materialize_pending(model: nn.Module) -> int:
    """Quantize every pending NF4 layer's whole weight (for a model that is not sharded after all:
    DDP, one process, inference); returns how many. A no-op on a model without pending layers."""
    layers = pending_layers(model)
    for _, m in layers:
        m.materialize_whole()
    return len(layers)


__all__ = ["ShardableNF4Linear", "PendingNF4Weight", "make_shardable", "pending_layers", "materialize_pending"]
