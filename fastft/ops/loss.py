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


def chunked_causal_lm_loss(h, weight, labels, num_items_in_batch=None, cu_seqlens=None, chunk_rows=None, bias=None,
                           stream_weight=None):
    """``causal_lm_loss(F.linear(h, weight, bias), ...)`` without materialising the logits.

    h (B, T, H) final hidden states, weight (V, H) the lm_head (bias (V,) or None). Same value and
    gradients as the unchunked loss (up to summation order): ``fastft.ops.linear_cross_entropy`` on
    the shifted targets (``stream_weight``: a frozen weight streamed from the host, as there).
    """
    from fastft import ops

    targets = shifted_targets(labels, h.shape[:2], cu_seqlens)
    total = ops.linear_cross_entropy(h, weight, targets.to(h.device), reduction="sum", bias=bias,
                                     chunk_rows=chunk_rows, stream_weight=stream_weight)
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


# --- the LM head streamed from the host ---------------------------------------------------------
# A frozen (V, H) LM head kept in (pinned) host memory and copied to the device one vocabulary chunk
# at a time: the loss runs an online log-sum-exp over the chunks (forward) and recomputes each
# chunk's logits for dh (backward), so the device holds at most two weight chunks (the one in use
# and the next, prefetched on a side stream on CUDA) and one (token chunk x vocab chunk) block of
# logits. docs/offload.md has the cost (the weight crosses PCIe once per forward and once per
# backward).
VOCAB_CHUNK_BYTES = 1 << 22       # weight bytes per vocabulary chunk on the CPU (L2/L3-sized)
VOCAB_CHUNK_BYTES_GPU = 1 << 25   # 32 MiB per chunk on a GPU: 4096 rows of an 8B bf16 head
STREAM_LOGITS_BYTES_GPU = 1 << 28  # a (tokens x vocab chunk) fp32 block at most 256 MiB on a GPU


def vocab_chunk_for(vocab: int, hidden: int, device: torch.device, element_size: int = 2) -> int:
    """Vocabulary rows per streamed chunk of the weight (equal chunks of at most the budget)."""
    budget = VOCAB_CHUNK_BYTES_GPU if device.type == "cuda" else VOCAB_CHUNK_BYTES
    cap = max(1, budget // max(1, hidden * element_size))
    return -(-vocab // -(-vocab // cap)) if vocab else cap


def _stream_rows_for(n_rows: int, vchunk: int, device: torch.device) -> int:
    """Token rows per (rows x vocab chunk) block of fp32 logits."""
    budget = _chunk_budget(device)
    if device.type == "cuda":
        budget = min(budget, STREAM_LOGITS_BYTES_GPU)
    cap = max(1, budget // max(1, vchunk * 4))
    return -(-n_rows // -(-n_rows // cap)) if n_rows else cap


def _is_fake(t: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import is_fake

    return is_fake(t)


def _weight_chunks(weight, bias, vchunk: int, device: torch.device, mdt: torch.dtype):
    """Yield (v0, v1, W[v0:v1], b[v0:v1] or None) on ``device`` in ``mdt``. On a real CUDA device
    the copy of chunk k + 1 (non-blocking, from pinned memory when the weight is pinned) is issued
    on a side stream while chunk k is used; the compute stream waits on an event, never the host."""
    V = weight.shape[0]
    starts = list(range(0, V, vchunk))

    def take(v0, stream=None):
        v1 = min(V, v0 + vchunk)
        w = weight[v0:v1].to(device, non_blocking=True).to(mdt)
        b = None if bias is None else bias[v0:v1].to(device, non_blocking=True).to(mdt)
        return v0, v1, w, b

    if not (device.type == "cuda" and torch.cuda.is_available() and weight.device.type == "cpu"
            and not _is_fake(weight)):
        for v0 in starts:
            yield take(v0)
        return
    main = torch.cuda.current_stream(device)
    side = _side_stream(device)

    def issue(v0):
        side.wait_stream(main)  # the side stream's allocations follow the compute stream's frees
        with torch.cuda.stream(side):
            chunk = take(v0)
            ev = torch.cuda.Event()
            ev.record(side)
        return chunk, ev

    nxt = issue(starts[0]) if starts else None
    for i in range(len(starts)):
        (v0, v1, w, b), ev = nxt
        main.wait_event(ev)
        for t in (w, b):
            if t is not None:
                t.record_stream(main)  # freed for reuse only after the compute stream is done with it
        nxt = issue(starts[i + 1]) if i + 1 < len(starts) else None
        yield v0, v1, w, b


_SIDE_STREAMS: dict = {}


def _side_stream(device: torch.device):
    key = torch.device(device).index if torch.device(device).index is not None else torch.cuda.current_device()
    if key not in _SIDE_STREAMS:
        _SIDE_STREAMS[key] = torch.cuda.Stream(device=torch.device("cuda", key))
    return _SIDE_STREAMS[key]


def check_streamed_weight(op: str, weight, bias) -> None:
    """A weight streamed from the host is frozen: the gradient would have to be formed on the host."""
    from fastft.errors import UsageError

    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.requires_grad:
            raise UsageError(f"{op}: a {name} streamed from the host must be frozen (requires_grad=False); "
                             f"keep a trainable LM head on the device")


class StreamedLinearCrossEntropyFunction(torch.autograd.Function):
    """Σ over rows with target != ignore_index of CE(h Wᵀ + b, target) with a frozen W (and b)
    streamed to h's device one vocabulary chunk at a time.

    Forward: per vocabulary chunk (outer loop: the weight crosses once) and token chunk, z = h_c W_vᵀ
    + b_v in the matmul dtype, then in at least fp32 the running max m, the running Σ exp(z − m)
    s (rescaled when m grows) and the target's logit. Saved: h (an input), m and s (N floats each),
    the targets -- no (N x V) tensor. Backward: the chunks again; p = exp(z − m) / s (the softmax,
    as the float64 reference forms it), minus onehot(target), times the row's output gradient (0 on
    ignored rows), rounded once to the matmul dtype; dh += p W_v accumulated in at least fp32. No
    host synchronisation: the loop bounds come from shapes only.
    """

    @staticmethod
    def forward(ctx, h, weight, bias, targets, ignore_index, chunk_rows, vocab_chunk):
        dev = h.device.type
        mdt = _matmul_dtype(h)
        with torch.autocast(dev, enabled=False):
            N = h.shape[0]
            cdt = torch.promote_types(h.dtype, torch.float32)
            m = torch.full((N,), float("-inf"), dtype=cdt, device=h.device)
            s = torch.zeros((N,), dtype=cdt, device=h.device)
            zt = torch.zeros((N,), dtype=cdt, device=h.device)
            hm = h.to(mdt)  # once, not once per vocabulary chunk
            for v0, v1, w, b in _weight_chunks(weight, bias, vocab_chunk, h.device, mdt):
                for a in range(0, N, chunk_rows):
                    e = min(a + chunk_rows, N)
                    z = cpu_gemm.linear(hm[a:e], w, b).to(cdt)  # (n, v1 - v0)
                    local = targets[a:e] - v0
                    inside = (local >= 0) & (local < v1 - v0)
                    g = z.gather(1, local.clamp(0, v1 - v0 - 1)[:, None])[:, 0]
                    zt[a:e] = torch.where(inside, g, zt[a:e])
                    m_old = m[a:e]
                    m_new = torch.maximum(m_old, z.amax(dim=-1))
                    s[a:e] = s[a:e] * torch.exp(m_old - m_new) + z.sub_(m_new[:, None]).exp_().sum(dim=-1)
                    m[a:e] = m_new
            valid = targets != ignore_index
            rows = torch.where(valid, m + s.log() - zt, torch.zeros_like(zt))
            total = rows.sum()
        ctx.save_for_backward(h, m, s, targets)
        ctx.stream = (weight, bias, ignore_index, chunk_rows, vocab_chunk, mdt)
        return total

    @staticmethod
    def backward(ctx, grad):
        h, m, s, targets = ctx.saved_tensors
        weight, bias, ignore_index, chunk_rows, vocab_chunk, mdt = ctx.stream
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None, None, None
        with torch.autocast(h.device.type, enabled=False):
            N = h.shape[0]
            cdt = m.dtype
            valid = targets != ignore_index
            scale = torch.where(valid, grad.to(cdt), torch.zeros((), dtype=cdt, device=h.device))  # (N,)
            dh = torch.zeros(h.shape, dtype=cdt, device=h.device)
            hm = h.to(mdt)
            for v0, v1, w, b in _weight_chunks(weight, bias, vocab_chunk, h.device, mdt):
                for a in range(0, N, chunk_rows):
                    e = min(a + chunk_rows, N)
                    p = cpu_gemm.linear(hm[a:e], w, b).to(cdt)
                    p.sub_(m[a:e, None]).exp_().div_(s[a:e, None]).mul_(scale[a:e, None])
                    local = targets[a:e] - v0
                    inside = (local >= 0) & (local < v1 - v0)
                    hit = torch.where(inside, scale[a:e], torch.zeros_like(scale[a:e]))
                    p.scatter_add_(1, local.clamp(0, v1 - v0 - 1)[:, None], -hit[:, None])
                    pm = p.to(mdt)
                    if pm.dtype == cdt:
                        dh[a:e].addmm_(pm, w)
                    else:  # half GEMM with fp32 accumulation inside, one rounding per chunk
                        dh[a:e] += cpu_gemm.mm(pm, w)
        return dh.to(h.dtype), None, None, None, None, None, None


@register("linear_cross_entropy_streamed", "torch")
def streamed_linear_cross_entropy(hidden, weight, labels, *, ignore_index=-100, reduction="mean", bias=None,
                                  chunk_rows=None, vocab_chunk=None):
    """``linear_cross_entropy`` with a frozen ``weight`` (V, H) (and ``bias``) that may live on another
    device than ``hidden`` -- the host, typically pinned -- streamed to hidden's device one vocabulary
    chunk of ``vocab_chunk`` rows at a time (``StreamedLinearCrossEntropyFunction``); ``chunk_rows``
    token rows per block of logits. Same value and ``hidden`` gradient as the dense op up to
    summation order. ``weight`` / ``bias`` requiring grad is refused (a UsageError)."""
    from fastft.ops.argcheck import check_linear_cross_entropy_args

    check_linear_cross_entropy_args(hidden, weight, labels, ignore_index, reduction, bias, weight_on_host=True)
    check_streamed_weight("linear_cross_entropy", weight, bias)
    h = hidden.reshape(-1, hidden.shape[-1])
    t = labels.reshape(-1).to(device=h.device, dtype=torch.int64)
    V = weight.shape[0]
    esize = torch.finfo(_matmul_dtype(h)).bits // 8
    vchunk = int(vocab_chunk) if vocab_chunk else vocab_chunk_for(V, h.shape[-1], h.device, esize)
    rows = int(chunk_rows) if chunk_rows else _stream_rows_for(h.shape[0], min(vchunk, max(V, 1)), h.device)
    total = StreamedLinearCrossEntropyFunction.apply(h, weight, bias, t, int(ignore_index), rows, vchunk)
    if reduction == "sum":
        return total
    return total / (t != ignore_index).sum()  # torch's mean: NaN when every target is ignored


class StreamedLinearFunction(torch.autograd.Function):
    """h Wᵀ + b (the full logits) with a frozen W streamed to h's device in vocabulary chunks, each
    written into the (..., V) output; backward streams the chunks again for dh = Σ_v g_v W_v."""

    @staticmethod
    def forward(ctx, h, weight, bias, vocab_chunk):
        mdt = _matmul_dtype(h)
        with torch.autocast(h.device.type, enabled=False):
            out = torch.empty(h.shape[:-1] + (weight.shape[0],), dtype=mdt, device=h.device)
            hm = h.to(mdt)
            for v0, v1, w, b in _weight_chunks(weight, bias, vocab_chunk, h.device, mdt):
                out[..., v0:v1] = cpu_gemm.linear(hm, w, b)
        ctx.save_for_backward(h)
        ctx.stream = (weight, vocab_chunk, mdt)
        return out

    @staticmethod
    def backward(ctx, g):
        (h,) = ctx.saved_tensors
        weight, vocab_chunk, mdt = ctx.stream
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        with torch.autocast(h.device.type, enabled=False):
            cdt = torch.promote_types(h.dtype, torch.float32)
            dh = torch.zeros(h.shape, dtype=cdt, device=h.device)
            gm = g.to(mdt)
            for v0, v1, w, _ in _weight_chunks(weight, None, vocab_chunk, h.device, mdt):
                dh += torch.matmul(gm[..., v0:v1], w)
        return dh.to(h.dtype), None, None, None


def streamed_linear(hidden, weight, bias=None, *, vocab_chunk=None):
    """``F.linear(hidden, weight, bias)`` (the full (..., V) logits, in autocast's dtype when it is on)
    with a frozen ``weight`` that may live on the host, streamed to hidden's device in vocabulary
    chunks: the device never holds the whole weight (it holds the logits). Generation and inference
    through a host-resident LM head use it; each call copies the whole weight once (twice with a
    backward)."""
    check_streamed_weight("streamed_linear", weight, bias)
    if weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        from fastft.errors import UsageError

        raise UsageError(f"streamed_linear: hidden (..., H) and weight (V, H) must agree on H, got "
                         f"{tuple(hidden.shape)} and {tuple(weight.shape)}")
    esize = torch.finfo(_matmul_dtype(hidden)).bits // 8
    vchunk = int(vocab_chunk) if vocab_chunk else vocab_chunk_for(weight.shape[0], weight.shape[1], hidden.device,
                                                                  esize)
    return StreamedLinearFunction.apply(hidden, weight, bias, vchunk)


__all__ = ["causal_lm_loss", "chunked_causal_lm_loss", "hf_causal_lm_loss", "hf_linear_causal_lm_loss",
           "linear_cross_entropy",
           "LinearCrossEntropyFunction", "LogitsCrossEntropy", "shifted_targets", "normalise_loss", "chunk_rows_for",
           "CE_CHUNK_BYTES", "CE_CHUNK_BYTES_GPU", "StreamedLinearCrossEntropyFunction", "StreamedLinearFunction",
           "streamed_linear_cross_entropy", "streamed_linear", "vocab_chunk_for", "check_streamed_weight",
           "VOCAB_CHUNK_BYTES", "VOCAB_CHUNK_BYTES_GPU", "STREAM_LOGITS_BYTES_GPU"]
