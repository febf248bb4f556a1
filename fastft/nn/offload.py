"""Frozen token embedding and LM head kept in host memory (exact: no quantization).

In LoRA / QLoRA fine-tuning the (V, H) token embedding and the untied (V, H) LM head are frozen,
yet a device keeps both in bf16: 2 x 0.98 GiB at Llama-3.1-8B's 128k vocabulary. Here they stay in
(pinned, when CUDA is present) host memory:

- ``HostEmbedding``: the lookup runs on the host (the ids are copied to the host -- a device-to-host
  copy of B x T int64, which waits for the device when the ids are already there; the rows of
  ``F.embedding`` are gathered into pinned memory and copied to the compute device non-blocking).
  Same values as ``nn.Embedding`` (for a frozen table ``padding_idx`` is only a lookup).
- ``HostLinear``: the LM head. The training loss of the native Llama streams its weight through
  ``fastft.ops.linear_cross_entropy`` (vocabulary chunks, online log-sum-exp; the weight crosses
  PCIe once in the forward and once in the backward); a call (inference / generation without
  labels) streams it through ``fastft.ops.loss.streamed_linear`` to form the full logits on the
  device -- the whole weight crosses PCIe on every call, so decoding is bound by the host link
  (``restore_frozen_to_device`` moves the two tables back for fast generation).
- ``offload_frozen_to_host(model, embedding=True, lm_head=True, storage_dtype="auto")``: the switch
  for fastft's native Llama-family causal LM (a ``FastPeftModel`` around one is accepted). Frozen
  tables only: a trainable one or one that is not a plain ``nn.Embedding`` / ``nn.Linear`` (a LoRA'd
  or ``modules_to_save`` head) is refused with a UsageError. A tied embedding / LM head (one table)
  moves as one host tensor shared by both modules (both must be switched). Off by default.
- **Storage dtype.** ``storage_dtype="auto"`` keeps a float32 table in bfloat16 (else float16) when
  that dtype holds every value exactly -- a bf16 checkpoint loaded in fp32 for CPU training, as
  Llama's are -- and otherwise as it is; the lookup and the streamed head upcast to the compute dtype
  (``compute_dtype``), so values and gradients are those of the fp32 table, bit for bit, at half the
  bytes. On a CPU the table is already "on the host": there the switch is this compaction (and the
  streamed head), 0.5 GiB at Llama-3.2-1B's tied 128k x 2048 table. ``None`` keeps the dtype; a
  dtype casts (rounding, like loading the model in that dtype).

The host tables are persistent buffers named ``weight`` (and ``bias``), so ``state_dict`` keys stay
``model.embed_tokens.weight`` / ``lm_head.weight``, optimizers (built from ``parameters()``) never see
them and ``model.to(device)`` / ``.cuda()`` leave them on the host; a dtype cast changes the compute
dtype (the outputs') and narrows the table when the new dtype is narrower than its storage, never
widens it. The module remembers the device and dtype its outputs go to (``compute_device``,
``compute_dtype``). docs/offload.md has the cost.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastft.errors import UsageError


def _can_pin(t: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import is_fake

    return torch.cuda.is_available() and not is_fake(t)


def _to_host(t: torch.Tensor) -> torch.Tensor:
    """A detached host copy (pinned when CUDA is present: non-blocking copies to the device)."""
    if t.device.type == "cpu" and (t.is_pinned() or not _can_pin(t)):
        if not t.requires_grad and t.is_contiguous() and not isinstance(t, nn.Parameter):
            return t  # already a plain host tensor (a tied table's second module takes the same object)
        return t.detach().contiguous()
    if not _can_pin(t):
        return t.detach().to("cpu").contiguous()
    out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)  # one host copy, straight into pinned memory
    return out.copy_(t.detach())


def exact_storage_dtype(t: torch.Tensor) -> torch.dtype:
    """The narrowest of bfloat16 / float16 that holds every value of the float32 / float64 ``t``
    exactly (``t.dtype`` itself when neither does, or when ``t`` has no values: a fake or meta tensor)."""
    from torch._subclasses.fake_tensor import is_fake

    if t.dtype not in (torch.float32, torch.float64) or t.device.type == "meta" or is_fake(t):
        return t.dtype
    flat = t.detach().reshape(-1)
    step = 1 << 22  # checked in 4M-element slices: no whole-table round-trip copy at setup
    for dt in (torch.bfloat16, torch.float16):
        # a value survives the round trip iff the narrower dtype holds it (NaN compares unequal: kept wide)
        if all(torch.equal(c.to(dt).to(t.dtype), c) for c in flat.split(step)):
            return dt
    return t.dtype


def _narrower(a: torch.dtype, b: torch.dtype) -> bool:
    return torch.finfo(a).bits < torch.finfo(b).bits


class _HostResident(nn.Module):
    """Common part: host buffers that ``Module.to`` / ``_apply`` keep on the host; outputs in
    ``compute_dtype`` (the table's own dtype unless it was stored narrower)."""

    host_resident = True  # read by the native models' forward (duck-typed: no import of this module there)

    def _init_common(self, compute_device, compute_dtype, weight):
        self.compute_device = torch.device(compute_device if compute_device is not None else weight.device)
        self.compute_dtype = compute_dtype if compute_dtype is not None else weight.dtype
        self._tied_peer = None  # (plain attribute) the other module of a tied table: shares its buffer

    def _apply(self, fn, recurse=True):
        # Where would fn send this module's tensors? An empty probe answers without moving the table.
        probe = fn(torch.empty(0, dtype=self.compute_dtype))
        self.compute_device = probe.device
        self.compute_dtype = probe.dtype
        for name, t in list(self._buffers.items()):
            if t is not None and t.is_floating_point() and probe.dtype.is_floating_point \
                    and _narrower(probe.dtype, t.dtype):
                new = _to_host(t.to(probe.dtype))
                self._buffers[name] = new
                peer = self._tied_peer
                if peer is not None and peer._buffers.get(name) is t:  # one table: the peer keeps sharing it
                    peer._buffers[name] = new
        return self


class HostEmbedding(_HostResident):
    """``nn.Embedding`` (frozen) whose (V, H) table lives on the host; outputs go to the ids' device
    (or ``compute_device`` for host ids)."""

    def __init__(self, weight: torch.Tensor, padding_idx: int | None = None, compute_device=None,
                 compute_dtype: torch.dtype | None = None):
        super().__init__()
        if weight.requires_grad:
            raise UsageError("HostEmbedding: the embedding must be frozen (requires_grad=False); a trainable "
                             "embedding stays on the device")
        if weight.dim() != 2:
            raise UsageError(f"HostEmbedding: weight must be (num_embeddings, embedding_dim), got {tuple(weight.shape)}")
        self.num_embeddings, self.embedding_dim = weight.shape
        self.padding_idx = padding_idx
        self._init_common(compute_device, compute_dtype, weight)
        self.register_buffer("weight", _to_host(weight), persistent=True)

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, storage: torch.Tensor | None = None) -> "HostEmbedding":
        """``storage``: the host table to use (e.g. a narrower exact copy); default: emb's weight."""
        cls.check_plain(emb)
        return cls(emb.weight if storage is None else storage, emb.padding_idx, emb.weight.device, emb.weight.dtype)

    @staticmethod
    def check_plain(emb) -> None:
        if type(emb) is not nn.Embedding:
            raise UsageError(f"offload: the input embedding must be a plain nn.Embedding, got {type(emb).__name__}")
        if emb.max_norm is not None:
            raise UsageError("offload: an nn.Embedding with max_norm (renormalised in place) cannot live on the host")

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        dev = input_ids.device if input_ids.device.type != "cpu" else self.compute_device
        ids = input_ids.to("cpu")  # a device-to-host copy when the ids are on a device (docs/offload.md)
        if dev.type == "cpu" or not _can_pin(self.weight):
            rows = F.embedding(ids, self.weight, self.padding_idx)
            return rows.to(dev, self.compute_dtype, non_blocking=True)
        rows = torch.empty(ids.shape + (self.embedding_dim,), dtype=self.weight.dtype, pin_memory=True)
        torch.index_select(self.weight, 0, ids.reshape(-1), out=rows.view(-1, self.embedding_dim))
        # (the pinned block is recycled after the copy's event; an upcast runs on the device)
        return rows.to(dev, non_blocking=True).to(self.compute_dtype)

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, padding_idx={self.padding_idx}, host, "
                f"storage={self.weight.dtype}, compute_device={self.compute_device}, compute_dtype={self.compute_dtype}")


class HostLinear(_HostResident):
    """A frozen ``nn.Linear`` (the LM head) whose weight (and bias) live on the host; a call streams
    them to the input's device in vocabulary chunks (``fastft.ops.loss.streamed_linear``)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, compute_device=None,
                 vocab_chunk: int | None = None, compute_dtype: torch.dtype | None = None):
        super().__init__()
        for name, t in (("weight", weight), ("bias", bias)):
            if t is not None and t.requires_grad:
                raise UsageError(f"HostLinear: the LM head's {name} must be frozen (requires_grad=False); a trainable "
                                 "LM head stays on the device")
        if weight.dim() != 2:
            raise UsageError(f"HostLinear: weight must be (out_features, in_features), got {tuple(weight.shape)}")
        self.out_features, self.in_features = weight.shape
        self.vocab_chunk = vocab_chunk
        self._init_common(compute_device, compute_dtype, weight)
        self.register_buffer("weight", _to_host(weight), persistent=True)
        self.register_buffer("bias", None if bias is None else _to_host(bias), persistent=True)

    @classmethod
    def from_linear(cls, lin: nn.Linear, storage: torch.Tensor | None = None,
                    bias_storage: torch.Tensor | None = None) -> "HostLinear":
        """``storage`` / ``bias_storage``: the host tensors to use (e.g. narrower exact copies, or the
        tied embedding's host table); default: lin's own."""
        cls.check_plain(lin)
        return cls(lin.weight if storage is None else storage, lin.bias if bias_storage is None else bias_storage,
                   lin.weight.device, compute_dtype=lin.weight.dtype)

    @staticmethod
    def check_plain(lin) -> None:
        if type(lin) is not nn.Linear:
            raise UsageError(f"offload: the LM head must be a plain frozen nn.Linear, got {type(lin).__name__} "
                             "(a LoRA'd, quantized or modules_to_save head stays on the device)")

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        from fastft.ops.loss import streamed_linear

        # the chunks are cast to h's matmul dtype (a narrower stored table is upcast chunk by chunk)
        return streamed_linear(h, self.weight, self.bias, vocab_chunk=self.vocab_chunk)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"host, storage={self.weight.dtype}, compute_device={self.compute_device}")


def _native_llama(model):
    from fastft.models.llama import LlamaForCausalLM

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not isinstance(base, LlamaForCausalLM):
        raise UsageError(f"offload_frozen_to_host: supports fastft's native Llama-family causal LM (llama, mistral, "
                         f"qwen2), got {type(base).__name__}")
    return base


STORAGE_DTYPES = ("auto", None)


def _storage(t: torch.Tensor, storage_dtype) -> torch.Tensor:
    """The host table for ``t``: ``t`` itself, or a copy in the storage dtype ("auto": exact only)."""
    dt = exact_storage_dtype(t) if storage_dtype == "auto" else (storage_dtype or t.dtype)
    return _to_host(t) if dt == t.dtype else _to_host(t.detach().to(dt))


def offload_frozen_to_host(model, embedding: bool = True, lm_head: bool = True, storage_dtype="auto"):
    """Move the frozen token embedding and / or the frozen LM head of a native Llama-family model (or
    a ``FastPeftModel`` around one) to host memory (``HostEmbedding`` / ``HostLinear``), in place;
    returns ``model``. Apply it after ``get_peft_model`` (which freezes them) and after moving the
    model to its device. A tied embedding / LM head becomes one host table shared by both modules
    (switch both: ``embedding`` and ``lm_head`` True). ``storage_dtype``: "auto" (a float32 table in
    bfloat16 / float16 when that holds it exactly; module docstring), None (as it is) or a floating
    dtype (a rounding cast). Refused (UsageError, nothing changed): a table that requires grad, a
    head that is not a plain ``nn.Linear``, one half of a tied table. Every check runs first."""
    base = _native_llama(model)
    emb, head = base.model.embed_tokens, base.lm_head
    if not (storage_dtype in STORAGE_DTYPES or (isinstance(storage_dtype, torch.dtype) and storage_dtype.is_floating_point)):
        raise UsageError(f"offload_frozen_to_host: storage_dtype must be 'auto', None or a floating torch.dtype, "
                         f"got {storage_dtype!r}")
    if not (embedding or lm_head):
        return model
    tied = getattr(base, "tie_word_embeddings", False) or (
        isinstance(getattr(head, "weight", None), torch.Tensor) and head.weight is getattr(emb, "weight", None))
    if tied and not (embedding and lm_head):
        raise UsageError("offload_frozen_to_host: the embedding and the LM head are tied (one table); switch both "
                         "(embedding=True, lm_head=True) -- the model is left unchanged")
    if tied and isinstance(emb, HostEmbedding) != isinstance(head, HostLinear):
        raise UsageError("offload_frozen_to_host: one half of the tied table is already on the host -- the model is "
                         "left unchanged")
    switch_emb = embedding and not isinstance(emb, HostEmbedding)
    switch_head = lm_head and not isinstance(head, HostLinear)
    if switch_emb:
        if type(emb) is nn.Embedding and emb.weight.requires_grad:
            raise UsageError("offload_frozen_to_host: the input embedding is trainable (requires_grad=True); only a "
                             "frozen embedding can live on the host (apply get_peft_model first, which freezes it)")
        HostEmbedding.check_plain(emb)
    if switch_head:
        w = getattr(head, "weight", None)
        if type(head) is nn.Linear and (w.requires_grad or (head.bias is not None and head.bias.requires_grad)):
            raise UsageError("offload_frozen_to_host: the LM head is trainable (requires_grad=True); only a frozen "
                             "LM head can live on the host (apply get_peft_model first, which freezes it)")
        HostLinear.check_plain(head)
    new_emb = new_head = None
    if switch_emb:
        new_emb = HostEmbedding.from_embedding(emb, storage=_storage(emb.weight, storage_dtype))
    if switch_head:
        table = new_emb.weight if tied else _storage(head.weight, storage_dtype)
        bias = None if head.bias is None else _storage(head.bias, storage_dtype)
        new_head = HostLinear.from_linear(head, storage=table, bias_storage=bias)
    if tied:  # one host tensor: a narrowing dtype cast of either module re-points the other
        new_emb.__dict__["_tied_peer"] = new_head  # (not a submodule: a plain reference)
        new_head.__dict__["_tied_peer"] = new_emb
    if new_emb is not None:
        base.model.embed_tokens = new_emb
    if new_head is not None:
        base.lm_head = new_head
    return model


def restore_frozen_to_device(model, device=None):
    """Undo ``offload_frozen_to_host``: plain frozen ``nn.Embedding`` / ``nn.Linear`` on ``device``
    (default: each module's ``compute_device``), e.g. for fast generation. Returns ``model``."""
    base = _native_llama(model)
    emb, head = base.model.embed_tokens, base.lm_head
    new_emb = None
    if isinstance(emb, HostEmbedding):
        dev = device if device is not None else emb.compute_device
        new_emb = nn.Embedding(emb.num_embeddings, emb.embedding_dim, emb.padding_idx, device="meta")
        new_emb.weight = nn.Parameter(emb.weight.to(dev, emb.compute_dtype, copy=True), requires_grad=False)
        base.model.embed_tokens = new_emb
    if isinstance(head, HostLinear):
        dev = device if device is not None else head.compute_device
        new = nn.Linear(head.in_features, head.out_features, bias=head.bias is not None, device="meta")
        if new_emb is not None and head.weight is emb.weight:  # a tied table: tied again, one tensor
            new.weight = new_emb.weight
        else:
            new.weight = nn.Parameter(head.weight.to(dev, head.compute_dtype, copy=True), requires_grad=False)
        if head.bias is not None:
            new.bias = nn.Parameter(head.bias.to(dev, head.compute_dtype, copy=True), requires_grad=False)
        base.lm_head = new
    return model


__all__ = ["HostEmbedding", "HostLinear", "offload_frozen_to_host", "restore_frozen_to_device"]
