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
- ``offload_frozen_to_host(model, embedding=True, lm_head=True)``: the switch for fastft's native
  Llama-family causal LM (a ``FastPeftModel`` around one is accepted). Frozen, untied tables only:
  a tied embedding / LM head, a trainable one or one that is not a plain ``nn.Embedding`` /
  ``nn.Linear`` (a LoRA'd or ``modules_to_save`` head) is refused with a UsageError. Off by default.

The host tables are persistent buffers named ``weight`` (and ``bias``), so ``state_dict`` keys stay
``model.embed_tokens.weight`` / ``lm_head.weight``, optimizers (built from ``parameters()``) never see
them and ``model.to(device)`` / ``.cuda()`` leave them on the host (a dtype cast is applied there);
the module remembers the device its outputs go to (``compute_device``). docs/offload.md has the cost.
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
        return t.detach().contiguous()
    if not _can_pin(t):
        return t.detach().to("cpu").contiguous()
    out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)  # one host copy, straight into pinned memory
    return out.copy_(t.detach())


class _HostResident(nn.Module):
    """Common part: host buffers that ``Module.to`` / ``_apply`` keep on the host."""

    host_resident = True  # read by the native models' forward (duck-typed: no import of this module there)

    def _apply(self, fn, recurse=True):
        # Where would fn send this module's tensors? An empty probe answers without moving the table.
        probe = fn(torch.empty(0, dtype=self.weight.dtype))
        self.compute_device = probe.device
        for name, t in list(self._buffers.items()):
            if t is not None and t.is_floating_point() and t.dtype != probe.dtype:
                self._buffers[name] = _to_host(t.to(probe.dtype))
        return self


class HostEmbedding(_HostResident):
    """``nn.Embedding`` (frozen) whose (V, H) table lives on the host; outputs go to the ids' device
    (or ``compute_device`` for host ids)."""

    def __init__(self, weight: torch.Tensor, padding_idx: int | None = None, compute_device=None):
        super().__init__()
        if weight.requires_grad:
            raise UsageError("HostEmbedding: the embedding must be frozen (requires_grad=False); a trainable "
                             "embedding stays on the device")
        if weight.dim() != 2:
            raise UsageError(f"HostEmbedding: weight must be (num_embeddings, embedding_dim), got {tuple(weight.shape)}")
        self.num_embeddings, self.embedding_dim = weight.shape
        self.padding_idx = padding_idx
        self.compute_device = torch.device(compute_device if compute_device is not None else weight.device)
        self.register_buffer("weight", _to_host(weight), persistent=True)

    @classmethod
    def from_embedding(cls, emb: nn.Embedding) -> "HostEmbedding":
        if type(emb) is not nn.Embedding:
            raise UsageError(f"offload: the input embedding must be a plain nn.Embedding, got {type(emb).__name__}")
        if emb.max_norm is not None:
            raise UsageError("offload: an nn.Embedding with max_norm (renormalised in place) cannot live on the host")
        return cls(emb.weight, emb.padding_idx, emb.weight.device)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        dev = input_ids.device if input_ids.device.type != "cpu" else self.compute_device
        ids = input_ids.to("cpu")  # a device-to-host copy when the ids are on a device (docs/offload.md)
        if dev.type == "cpu" or not _can_pin(self.weight):
            rows = F.embedding(ids, self.weight, self.padding_idx)
            return rows.to(dev, non_blocking=True)
        rows = torch.empty(ids.shape + (self.embedding_dim,), dtype=self.weight.dtype, pin_memory=True)
        torch.index_select(self.weight, 0, ids.reshape(-1), out=rows.view(-1, self.embedding_dim))
        return rows.to(dev, non_blocking=True)  # (the pinned block is recycled after the copy's event)

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, padding_idx={self.padding_idx}, host, "
                f"compute_device={self.compute_device}")


class HostLinear(_HostResident):
    """A frozen ``nn.Linear`` (the LM head) whose weight (and bias) live on the host; a call streams
    them to the input's device in vocabulary chunks (``fastft.ops.loss.streamed_linear``)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, compute_device=None,
                 vocab_chunk: int | None = None):
        super().__init__()
        for name, t in (("weight", weight), ("bias", bias)):
            if t is not None and t.requires_grad:
                raise UsageError(f"HostLinear: the LM head's {name} must be frozen (requires_grad=False); a trainable "
                                 "LM head stays on the device")
        if weight.dim() != 2:
            raise UsageError(f"HostLinear: weight must be (out_features, in_features), got {tuple(weight.shape)}")
        self.out_features, self.in_features = weight.shape
        self.vocab_chunk = vocab_chunk
        self.compute_device = torch.device(compute_device if compute_device is not None else weight.device)
        self.register_buffer("weight", _to_host(weight), persistent=True)
        self.register_buffer("bias", None if bias is None else _to_host(bias), persistent=True)

    @classmethod
    def from_linear(cls, lin: nn.Linear) -> "HostLinear":
        if type(lin) is not nn.Linear:
            raise UsageError(f"offload: the LM head must be a plain frozen nn.Linear, got {type(lin).__name__} "
                             "(a LoRA'd, quantized or modules_to_save head stays on the device)")
        return cls(lin.weight, lin.bias, lin.weight.device)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        from fastft.ops.loss import streamed_linear

        return streamed_linear(h, self.weight, self.bias, vocab_chunk=self.vocab_chunk)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"host, compute_device={self.compute_device}")


def _native_llama(model):
    from fastft.models.llama import LlamaForCausalLM

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not isinstance(base, LlamaForCausalLM):
        raise UsageError(f"offload_frozen_to_host: supports fastft's native Llama-family causal LM (llama, mistral, "
                         f"qwen2), got {type(base).__name__}")
    return base


def offload_frozen_to_host(model, embedding: bool = True, lm_head: bool = True):
    """Move the frozen token embedding and / or the untied frozen LM head of a native Llama-family
    model (or a ``FastPeftModel`` around one) to host memory (``HostEmbedding`` / ``HostLinear``), in
    place; returns ``model``. Apply it after ``get_peft_model`` (which freezes them) and after moving
    the model to its device. Refused (UsageError, nothing changed): a tied embedding / LM head, a
    table that requires grad, a head that is not a plain ``nn.Linear``. Every check runs first."""
    base = _native_llama(model)
    emb, head = base.model.embed_tokens, base.lm_head
    if not (embedding or lm_head):
        return model
    tied = getattr(base, "tie_word_embeddings", False) or (
        isinstance(getattr(head, "weight", None), torch.Tensor) and head.weight is getattr(emb, "weight", None))
    if tied:
        raise UsageError("offload_frozen_to_host: the embedding and the LM head are tied (one table); offloading "
                         "supports untied frozen tables only -- the model is left unchanged")
    new_emb = new_head = None
    if embedding and not isinstance(emb, HostEmbedding):
        if getattr(emb, "weight", None) is not None and emb.weight.requires_grad:
            raise UsageError("offload_frozen_to_host: the input embedding is trainable (requires_grad=True); only a "
                             "frozen embedding can live on the host (apply get_peft_model first, which freezes it)")
        new_emb = HostEmbedding.from_embedding(emb)
    if lm_head and not isinstance(head, HostLinear):
        w = getattr(head, "weight", None)
        if type(head) is nn.Linear and (w.requires_grad or (head.bias is not None and head.bias.requires_grad)):
            raise UsageError("offload_frozen_to_host: the LM head is trainable (requires_grad=True); only a frozen "
                             "LM head can live on the host (apply get_peft_model first, which freezes it)")
        new_head = HostLinear.from_linear(head)
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
    if isinstance(emb, HostEmbedding):
        dev = device if device is not None else emb.compute_device
        new = nn.Embedding(emb.num_embeddings, emb.embedding_dim, emb.padding_idx, device="meta")
        new.weight = nn.Parameter(emb.weight.to(dev, copy=True), requires_grad=False)
        base.model.embed_tokens = new
    if isinstance(head, HostLinear):
        dev = device if device is not None else head.compute_device
        new = nn.Linear(head.in_features, head.out_features, bias=head.bias is not None, device="meta")
        new.weight = nn.Parameter(head.weight.to(dev, copy=True), requires_grad=False)
        if head.bias is not None:
            new.bias = nn.Parameter(head.bias.to(dev, copy=True), requires_grad=False)
        base.lm_head = new
    return model


__all__ = ["HostEmbedding", "HostLinear", "offload_frozen_to_host", "restore_frozen_to_device"]
