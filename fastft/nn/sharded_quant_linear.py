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
"""
from __future__ import annotations

import torch
from torch import nn

from fastft.quant import NF4Weight

from .quant_linear import QuantLinear


class ShardableNF4Linear(QuantLinear):
    """See the module docstring. Build with ``ShardableNF4Linear.from_quant_linear(layer)``."""

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


__all__ = ["ShardableNF4Linear", "make_shardable"]
