"""Causal-LM losses: the shifted-label cross-entropy and its chunked linear + cross-entropy form.

- ``causal_lm_loss(logits, labels, ...)``: token t's logits predict labels[t + 1]; -100 ignored;
  sum / (num_items_in_batch or the number of targets); in packed batches the target that would
  cross a document boundary (``cu_seqlens``) is ignored.
- ``linear_cross_entropy`` (the "torch" backend of ``fastft.ops.linear_cross_entropy``): the LM head
  and its cross-entropy without keeping the (tokens x vocab) logits (``LinearCrossEntropyFunction``:
  one chunk of logits at a time, sized from the vocabulary and the device's memory, the gradient
  formed during the forward); ``chunked_causal_lm_loss(h, weight, labels, ...)`` is the causal loss on it.
- ``hf_causal_lm_loss``: transformers' ``ForCausalLMLoss`` signature and value on fastft's fused
  cross-entropy rows (``fastft.ops.cross_entropy_grad_``), the ``loss_function`` that
  ``fastft.patch`` installs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fastft.ops import cpu_gemm, cross_entropy_grad_
from fastft.ops.argcheck import check_linear_cross_entropy_args, check_targets
from fastft.ops.dispatch import register


def shifted_targets(labels, shape, cu_seqlens):
    if labels.shape != shape:
        raise ValueError(f"labels shape {tuple(labels.shape)} does not match input_ids {tuple(shape)}")
    targets = F.pad(labels, (0, 1), value=-100)[:, 1:]
    if cu_seqlens is not None and cu_seqlens.numel() > 2:
        # The last token of a document must not learn to predict the next document's first token.
        # An empty first document gives index -1: the last position, whose target is already -100
        # (no boolean mask, so no data-dependent shape and no host synchronisation).
        ends = cu_seqlens[1:-1].to(device=targets.device, dtype=torch.long) - 1
        targets = targets.clone()
        targets[0, ends] = -100
    return targets


def normalise_loss(total, targets, num_items_in_batch):
    denom = num_items_in_batch if num_items_in_batch is not None else (targets != -100).sum()
    if isinstance(denom, torch.Tensor):
        denom = denom.to(total.device)
        return total / denom.clamp_min(1)
    return total / max(denom, 1)


def causal_lm_loss(logits, labels, num_items_in_batch=None, cu_seqlens=None):
    """Token t's logits predict labels[t + 1]; -100 ignored; sum / (num_items_in_batch or count)."""
    targets = shifted_targets(labels, logits.shape[:2], cu_seqlens)
    total = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100,
                            reduction="sum")
    return normalise_loss(total, targets, num_items_in_batch)


# Logits per chunk of the linear + cross-entropy: on CPU about 32 MiB (2^23 fp32 / 2^24 bf16
# logits: L2/L3-sized rows, and the larger bf16 chunk runs the lm_head GEMMs nearer the CPU's peak);
# on a GPU up to 1 GiB of fp32-equivalent logits or 1/8 of the free memory, whichever is smaller, so
# each chunk's GEMMs are large (at a 128k vocabulary 1 GiB is 2048 rows per chunk).
CE_CHUNK_BYTES = 1 << 25
CE_CHUNK_BYTES_GPU = 1 << 30


def _chunk_budget(device: torch.device) -> int:
    if device.type != "cuda":
        return CE_CHUNK_BYTES
    try:  # cudaMemGetInfo: a driver query, no stream synchronisation
        free = torch.cuda.mem_get_info(device)[0]
    except Exception:  # fake CUDA tensors (memory estimates) or no driver: the cap alone
        return CE_CHUNK_BYTES_GPU
    return max(min(CE_CHUNK_BYTES_GPU, free // 8), 1 << 20)


def chunk_rows_for(n_rows: int, vocab: int, device: torch.device, element_size: int = 4) -> int:
    """Rows per chunk: equal chunks of at most the device's budget of ``vocab``-wide logits (no
    one-row tail chunk)."""
    cap = max(1, _chunk_budget(device) // max(1, vocab * element_size))
    return -(-n_rows // -(-n_rows // cap)) if n_rows else cap


def _matmul_dtype(h: torch.Tensor) -> torch.dtype:
    dev = h.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else h.dtype


class LinearCrossEntropyFunction(torch.autograd.Function):
    """Σ over rows with target != ignore_index of CE(h Wᵀ + b, target), one chunk of logits at a time.

    The gradient is produced during the forward (the loss is a scalar, so the backward only scales
    it): per chunk z = h_c Wᵀ + b (in the matmul dtype: autocast's when it is on, else h's),
    loss_rows = lse(z) − z[target] in at least fp32, z ← softmax(z) − onehot(target) in place (0 on
    ignored rows; ``fastft.ops.cross_entropy_grad_``: the C++ rows on CPU, Triton on CUDA), then
    dh_c = z W, dW += zᵀ h_c and db += Σ_rows z only for the inputs that require grad. Saved: dh
    (N, H) and, for full fine-tuning, dW / db -- never the (N, V) logits. No host synchronisation:
    the loop bounds come from shapes only.
    """

    @staticmethod
    def forward(ctx, h, weight, bias, targets, ignore_index, chunk_rows):
        dev = h.device.type
        mdt = _matmul_dtype(h)
        with torch.autocast(dev, enabled=False):
            return LinearCrossEntropyFunction._forward(ctx, h, weight, bias, targets, ignore_index, chunk_rows, mdt)

    @staticmethod
    def _forward(ctx, h, weight, bias, targets, ignore_index, chunk_rows, mdt):
        N = h.shape[0]
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        cdt = torch.promote_types(h.dtype, torch.float32)  # fp32 loss for half / fp32, float64 stays
        dh = torch.empty_like(h) if need_h else None
        dw = torch.zeros(weight.shape, dtype=cdt, device=weight.device) if need_w else None
        db = torch.zeros(bias.shape, dtype=cdt, device=bias.device) if need_b else None
        total = torch.zeros((), dtype=cdt, device=h.device)
        wm = weight.to(mdt)
        bm = None if bias is None else bias.to(mdt)
        for a in range(0, N, chunk_rows):
            b = min(a + chunk_rows, N)
            hc, tc = h[a:b].to(mdt), targets[a:b]
            z = cpu_gemm.linear(hc, wm, bm)  # (n, V)
            if not (need_h or need_w or need_b):
                z = z.to(cdt)
                valid = tc != ignore_index
                zt = z.gather(1, torch.where(valid, tc, torch.zeros_like(tc))[:, None])[:, 0]
                total += torch.where(valid, torch.logsumexp(z, dim=-1) - zt, torch.zeros_like(zt)).sum()
                continue
            total += cross_entropy_grad_(z, tc, ignore_index).to(cdt).sum()  # z is now dz
            if need_h:  # cpu_gemm decides the GEMM (oneDNN for fp32 on CPU, torch.mm otherwise)
                dh[a:b] = cpu_gemm.mm(z, wm)
            if need_w:
                if z.dtype == cdt:
                    dw.addmm_(z.t(), hc.to(cdt))
                else:  # half GEMM with fp32 accumulation inside, one rounding per chunk
                    dw += torch.mm(z.t(), hc).to(cdt)
            if need_b:
                db += z.sum(0, dtype=cdt)
        ctx.save_for_backward(dh, dw, db)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx, grad):
        dh, dw, db = ctx.saved_tensors
        gh = dh * grad.to(dh.dtype) if dh is not None else None
        gw = (dw * grad).to(ctx.dtypes[0]) if dw is not None else None
        gb = (db * grad).to(ctx.dtypes[1]) if db is not None else None
        return gh, gw, gb, None, None, None


@register("linear_cross_entropy", "torch")
def linear_cross_entropy(hidden, weight, labels, *, ignore_index=-100, reduction="mean", bias=None,
                         chunk_rows=None):
    """The LM head and its cross-entropy in chunks (``LinearCrossEntropyFunction``); any device."""
    check_linear_cross_entropy_args(hidden, weight, labels, ignore_index, reduction, bias)
    h = hidden.reshape(-1, hidden.shape[-1])
    t = labels.reshape(-1).to(device=h.device, dtype=torch.int64)
    check_targets(t, weight.shape[0], ignore_index, "linear_cross_entropy")
    # the chunk's logits are in the matmul dtype (softmax − onehot is written over them in place)
    esize = torch.finfo(_matmul_dtype(h)).bits // 8
    rows = int(chunk_rows) if chunk_rows else chunk_rows_for(h.shape[0], weight.shape[0], h.device, esize)
    total = LinearCrossEntropyFunction.apply(h, weight, bias, t, int(ignore_index), rows)
    if reduction == "sum":
        return total
    return total / (t != ignore_index).sum()  # torch's mean: NaN when every target is ignored


def chunked_causal_lm_loss(h, weight, labels, num_items_in_batch=None, cu_seqlens=None, chunk_rows=None, bias=None):
    """``causal_lm_loss(F.linear(h, weight, bias), ...)`` without materialising the logits.

    h (B, T, H) final hidden states, weight (V, H) the lm_head (bias (V,) or None). Same value and
    gradients as the unchunked loss (up to summation order): ``fastft.ops.linear_cross_entropy`` on
    the shifted targets.
    """
    from fastft import ops

    targets = shifted_targets(labels, h.shape[:2], cu_seqlens)
    total = ops.linear_cross_entropy(h, weight, targets.to(h.device), reduction="sum", bias=bias,
                                     chunk_rows=chunk_rows)
    return normalise_loss(total, targets, num_items_in_batch)


class LogitsCrossEntropy(torch.autograd.Function):
    """Σ CE(logits_i, target_i) over rows whose target is not ignore_index; logits (n, V).

    Forward: one copy of the logits, turned in place into softmax − onehot by the fused row op
    (``fastft.ops.cross_entropy_grad_``: the C++ AVX-512 kernel on CPU, three passes per L2-resident
    row, fp32 inside), which is saved; backward scales it. transformers' ``ForCausalLMLoss`` instead
    upcasts the logits to fp32, writes log_softmax, and in backward builds a zero-filled onehot,
    the log_softmax gradient and the cast back: ~4x the memory traffic and 2x the saved bytes for
    bf16 logits."""

    @staticmethod
    def forward(ctx, logits, targets, ignore_index):
        g = logits.detach().clone(memory_format=torch.contiguous_format)
        rows = cross_entropy_grad_(g, targets, ignore_index)
        ctx.save_for_backward(g)
        return rows.sum()

    @staticmethod
    def backward(ctx, grad):
        (g,) = ctx.saved_tensors
        return g * grad.to(torch.promote_types(g.dtype, torch.float32)), None, None


def hf_causal_lm_loss(logits, labels, vocab_size=None, num_items_in_batch=None, ignore_index=-100, shift_labels=None,
                   **kwargs):
    """transformers' ``ForCausalLMLoss`` (same signature, same value: token t predicts labels[t + 1],
    ``ignore_index`` skipped, sum / num_items_in_batch or the mean), on fastft's fused CE rows.
    ``fastft.patch`` installs it as a transformers causal LM's ``loss_function``."""
    # Under torch.compile the traced HF composition stays (the compiler fuses it itself).
    if logits.dtype not in (torch.float32, torch.bfloat16, torch.float16) or torch.compiler.is_compiling():
        from transformers.loss.loss_utils import ForCausalLMLoss

        return ForCausalLMLoss(logits, labels, vocab_size, num_items_in_batch=num_items_in_batch,
                               ignore_index=ignore_index, shift_labels=shift_labels, **kwargs)
    V = logits.shape[-1] if vocab_size is None else vocab_size
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    targets = shift_labels.reshape(-1).to(logits.device)
    z = logits.reshape(-1, V)
    if z.dtype == torch.float16:  # the fused rows take fp32 / bf16; fp16 goes through fp32 like HF's
        z = z.float()
    total = LogitsCrossEntropy.apply(z, targets, int(ignore_index))
    if num_items_in_batch is not None:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(total.device)
        return total / num_items_in_batch
    return total / (targets != ignore_index).sum()  # HF's mean (NaN when every target is ignored)


def hf_linear_causal_lm_loss(hidden, weight, labels, *, bias=None, num_items_in_batch=None, ignore_index=-100,
                             shift_labels=None):
    """``hf_causal_lm_loss(F.linear(hidden, weight, bias), labels, ...)`` -- transformers'
    ``ForCausalLMLoss`` value -- without building the logits: ``fastft.ops.linear_cross_entropy``
    on the shifted labels. The fused forward of ``fastft.patch``ed causal LMs uses it."""
    from fastft import ops

    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    targets = shift_labels.to(hidden.device)
    total = ops.linear_cross_entropy(hidden, weight, targets, ignore_index=int(ignore_index), reduction="sum",
                                     bias=bias)
    if num_items_in_batch is not None:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(total.device)
        return total / num_items_in_batch
    return total / (targets != ignore_index).sum()  # HF's mean (NaN when every target is ignored)


__all__ = ["causal_lm_loss", "chunked_causal_lm_loss", "hf_causal_lm_loss", "hf_linear_causal_lm_loss",
           "linear_cross_entropy",
           "LinearCrossEntropyFunction", "LogitsCrossEntropy", "shifted_targets", "normalise_loss", "chunk_rows_for",
           "CE_CHUNK_BYTES", "CE_CHUNK_BYTES_GPU"]
