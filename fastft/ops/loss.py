"""Causal-LM losses: the shifted-label cross-entropy and its chunked linear + cross-entropy form.

- ``causal_lm_loss(logits, labels, ...)``: token t's logits predict labels[t + 1]; -100 ignored;
  sum / (num_items_in_batch or the number of targets); in packed batches the target that would
  cross a document boundary (``cu_seqlens``) is ignored.
- ``chunked_causal_lm_loss(h, weight, labels, ...)``: the same value from the final hidden states and
  the LM head weight without building the (tokens x vocab) logits (``ChunkedLinearCrossEntropy``:
  about ``CE_CHUNK_BYTES`` of logits at a time, the gradient formed during the forward).
- ``hf_causal_lm_loss``: transformers' ``ForCausalLMLoss`` signature and value on fastft's fused
  cross-entropy rows (``fastft.ops.cross_entropy_grad_``), the ``loss_function`` that
  ``fastft.patch`` installs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fastft.ops import cpu_gemm, cross_entropy_grad_


def shifted_targets(labels, shape, cu_seqlens):
    if labels.shape != shape:
        raise ValueError(f"labels shape {tuple(labels.shape)} does not match input_ids {tuple(shape)}")
    targets = F.pad(labels, (0, 1), value=-100)[:, 1:]
    if cu_seqlens is not None and cu_seqlens.numel() > 2:
        # The last token of a document must not learn to predict the next document's first token.
        ends = cu_seqlens[1:-1].long() - 1
        ends = ends[ends >= 0]
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


# Rows of logits per chunk: about 32 MiB of logits in h's dtype at a time (2^23 fp32, 2^24 bf16
# logits; the larger bf16 chunk also runs the lm_head GEMMs nearer the CPU's peak).
CE_CHUNK_BYTES = 1 << 25


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Σ_t CE(h_t Wᵀ, target_t) over valid targets, never holding more than one chunk of logits.

    The gradient is produced during the forward (the loss is a scalar, so the backward only scales
    it): per chunk z = h_c Wᵀ (in h's dtype, then at least fp32 like ``causal_lm_loss``), lse = logsumexp(z),
    loss += Σ (lse − z[target]); dz = softmax(z) − onehot(target) (0 on ignored rows);
    dh_c = dz W, dW += dzᵀ h_c (only when W requires grad). Saved: dh (N, H) and dW.
    """

    @staticmethod
    def forward(ctx, h, weight, targets, chunk_rows):
        dev = h.device.type
        # The logits' matmul dtype: autocast's when it is on (as lm_head under autocast), else h's.
        mdt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else h.dtype
        with torch.autocast(dev, enabled=False):
            return ChunkedLinearCrossEntropy._forward(ctx, h, weight, targets, chunk_rows, mdt)

    @staticmethod
    def _forward(ctx, h, weight, targets, chunk_rows, mdt):
        N = h.shape[0]
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dh = torch.empty_like(h) if need_h else None
        cdt = torch.promote_types(h.dtype, torch.float32)  # fp32 logits for half / fp32, float64 stays
        dw = torch.zeros(weight.shape, dtype=cdt, device=weight.device) if need_w else None
        total = torch.zeros((), dtype=cdt, device=h.device)
        wm = weight.to(mdt)
        for a in range(0, N, chunk_rows):
            b = min(a + chunk_rows, N)
            hc, tc = h[a:b], targets[a:b]
            z = cpu_gemm.linear(hc.to(mdt), wm)  # (n, V) in the matmul dtype
            if not (need_h or need_w):
                z = z.to(cdt)
                valid = tc != -100
                lse = torch.logsumexp(z, dim=-1)
                zt = z.gather(1, torch.where(valid, tc, torch.zeros_like(tc))[:, None])[:, 0]
                total += torch.where(valid, lse - zt, torch.zeros_like(lse)).sum()
                continue
            # Loss rows and dz = softmax - onehot in one fused step (the C++ kernel on CPU).
            total += cross_entropy_grad_(z, tc, -100).to(cdt).sum()
            dz = z
            if need_h:  # cpu_gemm decides the GEMM (oneDNN for fp32 on CPU, torch.mm otherwise)
                dh[a:b] = cpu_gemm.mm(dz, wm)
            if need_w:
                dw.addmm_(dz.t().to(cdt), hc.to(cdt))
        ctx.save_for_backward(dh, dw)
        ctx.w_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad):
        dh, dw = ctx.saved_tensors
        gh = dh * grad.to(dh.dtype) if dh is not None else None
        gw = (dw * grad).to(ctx.w_dtype) if dw is not None else None
        return gh, gw, None, None


def chunked_causal_lm_loss(h, weight, labels, num_items_in_batch=None, cu_seqlens=None, chunk_rows=None):
    """``causal_lm_loss(F.linear(h, weight), ...)`` without materialising the logits.

    h (B, T, H) final hidden states, weight (V, H) the lm_head. Same value and gradients as the
    unchunked loss (up to summation order).
    """
    targets = shifted_targets(labels, h.shape[:2], cu_seqlens)
    if chunk_rows is None:
        dev = h.device.type
        mdt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else h.dtype
        cap = max(1, CE_CHUNK_BYTES // (weight.shape[0] * torch.empty((), dtype=mdt).element_size()))
        n = h.shape[0] * h.shape[1]
        chunk_rows = -(-n // -(-n // cap)) if n else cap  # equal chunks under the cap, no 1-row tail
    total = ChunkedLinearCrossEntropy.apply(h.reshape(-1, h.shape[-1]), weight, targets.reshape(-1).to(h.device),
                                            int(chunk_rows))
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


__all__ = ["causal_lm_loss", "chunked_causal_lm_loss", "hf_causal_lm_loss", "ChunkedLinearCrossEntropy",
           "LogitsCrossEntropy", "shifted_targets", "normalise_loss", "CE_CHUNK_BYTES"]
