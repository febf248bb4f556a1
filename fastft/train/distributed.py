"""Data-parallel (DDP) and sharded (FSDP2) training on PyTorch's own distributed engine.

Nothing here is home-made: processes come from ``torchrun`` (or ``fastft train --nproc N``, which
calls torchrun's launcher), the process group is ``torch.distributed`` (NCCL on GPUs, gloo on
CPUs), data parallelism is ``DistributedDataParallel`` and sharding is FSDP2's ``fully_shard``.
This module holds the small glue the Trainer needs:

* ``init_from_env`` -- start the process group of a torchrun worker (rank/world from the env);
* ``setup_fsdp`` -- NF4 layers -> ``ShardableNF4Linear`` (their 4-bit bytes and scales become
  frozen uint8 Parameters sharded on quantization-block boundaries), then ``fully_shard`` on every
  block of every ``nn.ModuleList`` (a transformer layer with its LoRA A/B: one FSDP unit, so the
  fused kernels see the adapters whole) and on the root, with a ``MixedPrecisionPolicy``; NF4
  layers the loader left pending (``from_pretrained(shard_quantization=...)``) are then quantized
  shard by shard, each rank reading only its own blocks from the checkpoint;
* full <-> sharded conversions for checkpoints (``full_tensor``, ``load_full_into``), so a
  checkpoint is the same files whatever N wrote it and any N can resume it.
"""
from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist
from torch import nn

STRATEGIES = ("ddp", "fsdp")


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def env_world_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def init_from_env(timeout_s: float = 1800.0) -> bool:
    """In a torchrun worker (WORLD_SIZE > 1), initialise the default process group: NCCL when CUDA
    is available (one device per LOCAL_RANK), else gloo. Returns whether a group is active."""
    if not dist.is_available() or env_world_size() <= 1:
        return False
    if dist.is_initialized():
        return True
    backend = "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "nccl"
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return True


def has_quantized_layers(model: nn.Module) -> bool:
    from fastft.nn.lora import is_quant_linear

    return any(is_quant_linear(m) for m in model.modules())


def default_strategy(model: nn.Module) -> str:
    """FSDP when the base is quantized (QLoRA: the case of models that do not fit), else DDP."""
    return "fsdp" if has_quantized_layers(model) else "ddp"


def all_reduce_sum(values, device) -> list[float]:
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def barrier():
    if is_distributed():
        dist.barrier()


# --- FSDP2 -------------------------------------------------------------------------------------
def _is_dtensor(t) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover
        return False
    return isinstance(t, DTensor)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor (an all-gather, on every rank, for a sharded DTensor; else ``t``)."""
    return t.full_tensor() if _is_dtensor(t) else t


def like_param(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``full`` laid out like ``param``: this rank's shard as a DTensor when ``param`` is sharded.
    Every rank holds the whole ``full`` (read from the same checkpoint), so no data moves."""
    if not _is_dtensor(param):
        return full
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full.to(param.device), param.device_mesh, param.placements, src_data_rank=None)


@torch.no_grad()
def load_full_into(param: torch.Tensor, full: torch.Tensor):
    if _is_dtensor(param):
        param.to_local().copy_(like_param(full, param).to_local())
    else:
        param.copy_(full)


def fsdp_units(model: nn.Module) -> list[nn.Module]:
    """The blocks to shard one by one: the elements of every nn.ModuleList (transformer layers)."""
    units = []
    for m in model.modules():
        if isinstance(m, nn.ModuleList):
            units.extend(m)
    return units


@torch.no_grad()
def broadcast_trainables(model: nn.Module, src: int = 0):
    """Every rank starts from rank ``src``'s trainable weights (DDP does this itself; FSDP does not)."""
    for p in model.parameters():
        if p.requires_grad:
            dist.broadcast(p.data, src)


def setup_fsdp(model: nn.Module, *, param_dtype=None, reduce_dtype=torch.float32) -> nn.Module:
    """Shard ``model`` in place with FSDP2 (see the module docstring); returns it."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from fastft.nn.sharded_quant_linear import make_shardable, pending_layers

    make_shardable(model)
    broadcast_trainables(model)
    # (a pending NF4 layer's Parameters are on meta until materialize_shard; its code books are not)
    dev = next(t.device for t in (*model.parameters(), *model.buffers()) if t.device.type != "meta")
    mesh = init_device_mesh(dev.type, (dist.get_world_size(),))
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    for unit in fsdp_units(model):
        if any(True for _ in unit.parameters()):
            fully_shard(unit, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    # NF4 layers loaded for per-rank quantization (from_pretrained's shard_quantization): fully_shard
    # cut their meta Parameters; each rank now reads and quantizes only its own blocks.
    for _, layer in pending_layers(model):
        layer.materialize_shard()
    return model


def local_tensor_bytes(model: nn.Module, optimizer=None) -> dict:
    """Bytes this rank holds in tensors: parameters (local shards), buffers, gradients and optimizer
    state -- what ``fastft plan`` predicts (see fastft/plan.py)."""
    def nbytes(t):
        t = t.to_local() if _is_dtensor(t) else t
        return t.numel() * t.element_size()

    out = {"params_trainable": 0, "params_frozen": 0, "buffers": 0, "grads": 0, "optimizer": 0}
    for p in model.parameters():
        out["params_trainable" if p.requires_grad else "params_frozen"] += nbytes(p)
        if p.grad is not None:
            out["grads"] += nbytes(p.grad)
    from fastft.nn.quant_linear import QuantLinear
    from fastft.nn.sharded_quant_linear import ShardableNF4Linear

    for m in model.modules():
        if isinstance(m, QuantLinear) and not isinstance(m, ShardableNF4Linear):
            # A QuantLinear's weight is not a Parameter: its codes and block scales count as
            # frozen parameters (as they are once sharded), the code books as buffers.
            for k, t in m.weight._tensors().items():
                out["params_frozen" if k in ("data", "absmax", "scales", "zeros") else "buffers"] += nbytes(t)
    seen = set()
    for b in model.buffers():
        if id(b) not in seen:
            seen.add(id(b))
            out["buffers"] += nbytes(b)
    if optimizer is not None:
        for st in optimizer.state.values():
            for v in st.values():
                if isinstance(v, torch.Tensor) and v.dim() > 0:
                    out["optimizer"] += nbytes(v)
    return out


_COLLECTIVE_HINTS = ("gloo", "nccl", "connection closed", "connection reset", "timed out", "timeout",
                     "broken pipe", "collective", "process group", "socket")


def describe_failure(e: BaseException, timeout_s: float) -> str:
    """One clear line for a worker's failure; a failed or timed-out collective says what it means."""
    first = (str(e).strip().splitlines() or [""])[0]
    where = f"rank {rank()}/{world_size()}"
    dist_error = getattr(dist, "DistError", ())
    if (dist_error and isinstance(e, dist_error)) or any(h in first.lower() for h in _COLLECTIVE_HINTS):
        return (f"{where}: a collective operation failed ({type(e).__name__}: {first}). Another rank "
                f"probably died or hung (the launcher names it); collectives give up after {timeout_s:g}s "
                "(--ddp-timeout / TrainingArguments.ddp_timeout)")
    return f"{where} failed: {type(e).__name__}: {first}"
