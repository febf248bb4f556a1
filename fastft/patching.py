"""Make an existing transformers model use fastft: one generic mechanism, no per-architecture copies.

``fastft.patch`` is this module's ``patch`` function (``fastft.patch.register_attention`` and
``fastft.patch.from_pretrained`` are attributes of it).

``fastft.patch(model, quantization=None, attention=True, lora=None, loss=True)``:

* **attention** -- registers ``"fastft"`` with transformers' ``AttentionInterface`` (the attention
  function) *and* ``AttentionMaskInterface`` (the mask function). The mask function matters: a name
  unknown to the mask interface makes transformers skip mask creation, so padded batches would
  silently arrive with ``attention_mask=None``. Ours hands the attention function the 2-D padding
  mask (B, S) (None when there is no padding) and the attention function applies causality from
  ``module.is_causal``, aligned bottom-right so decoding with a KV cache works. Models whose config
  needs what fastft's kernel lacks (logit softcapping) or whose class does not route attention
  through the interface keep their attention, with one log line. Sliding-window attention runs as
  long as the keys fit in the window and raises a clear error beyond it.
* **quantization** -- ``"nf4"`` / ``"int4"`` replaces the ``nn.Linear`` (and GPT-2 style
  ``Conv1D``, whose weight is stored (in, out) and is transposed first) of the model with
  ``fastft.nn.QuantLinear``, one layer at a time, so peak memory grows by one layer, not a model.
  The output projection (``get_output_embeddings()``) stays in full precision, as in QLoRA, and so
  do adapter weights (PEFT's ``lora_A`` / ``lora_B``, ``modules_to_save``). Other leaf modules with
  2-D weights are left alone; one log line names their types. With ``quantization=None`` dense
  linears stay ``nn.Linear`` (a dense GEMM is already what fastft would run).
* **block ops** -- the RMSNorm and SiLU-gated MLP modules of the Llama / Mistral / Qwen2 / Qwen3
  classes (``RMSNORM_CLASSES``, ``SWIGLU_MLP_CLASSES``, whose forwards are exactly these ops) run
  through ``fastft.ops.rms_norm`` / ``fastft.ops.silu_mul``, and their attention modules
  (``ROPE_ATTENTION_CLASSES``) rotate q / k through ``fastft.ops.rope`` (transformers' own forward,
  a per-instance copy whose ``apply_rotary_pos_emb`` is fastft's; no global monkey-patch): the
  fused C++ rows on CPU, the Triton kernels on CUDA.
* **loss** -- a causal LM that would use transformers' ``ForCausalLMLoss`` gets fastft's
  ``fastft.ops.loss.hf_causal_lm_loss`` as its ``loss_function`` (same signature and value; the fused cross-entropy
  rows, one bf16 / fp32 copy of the logits in place of HF's fp32 upcast, log_softmax and onehot).
  For the Llama / Mistral / Qwen2 / Qwen3 causal LMs (``FUSED_LOSS_CLASSES``) a training forward
  with labels goes further: the backbone's hidden states go straight into
  ``fastft.ops.linear_cross_entropy`` (the LM head and the loss in chunks) and the (B, T, V)
  logits are never built (``.logits`` is None, as with Liger's fused linear cross-entropy).
  ``loss=False`` keeps HF's loss.
* **frozen linears** -- plain ``nn.Linear`` modules call ``fastft.ops.lean.frozen_linear``: with a
  frozen fp32 weight on CPU, fastft's GEMM (oneDNN's AVX-512 code, 2x MKL's fp32 rate on AMD
  CPUs); F.linear in every other case, decided per call.
* **PEFT LoRA layers** already in the model (a ``peft.PeftModel``) keep their parameters and
  state_dict keys; only their forward is rerouted through ``fastft.ops.lora_linear`` (single active
  adapter, no DoRA, no ``fan_in_fan_out``; anything else keeps PEFT's forward).
* **lora** -- a ``fastft.LoraConfig`` / ``peft.LoraConfig`` applied after patching
  (``fastft.get_peft_model``).

``from_pretrained(path)`` loads a checkpoint as a patched transformers model; a bitsandbytes 4-bit
NF4 checkpoint loads straight into fastft's NF4 weights without bitsandbytes
(``fastft.models.save_quantized`` writes that layout back).

``torch.compile``: every fastft op traces without graph breaks (the mask function skips its
all-ones shortcut while compiling; backends are resolved at patch time, not inside the graph).
"""
from __future__ import annotations

import functools
import inspect
import logging
import types

import torch
import torch.nn as nn

from fastft import ops
from fastft.ops.loss import hf_causal_lm_loss, hf_linear_causal_lm_loss

logger = logging.getLogger("fastft")
ATTN_NAME = "fastft"


def fastft_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                             **kwargs):
    """transformers attention function: query (B, Hq, L, D), key/value (B, Hkv, S, D) -> ((B, L, Hq, D), None)."""
    if kwargs.get("softcap") is not None:
        raise ValueError("fastft attention does not support attention logit softcapping (softcap)")
    if not (query.dtype == key.dtype == value.dtype):
        # Under autocast, rotary embeddings leave q/k in fp32 while v comes out of a bf16/fp16 linear;
        # eager attention's matmuls would run in the autocast dtype, so the kernel gets that dtype.
        dev = query.device.type
        dt = (torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev)
              else torch.promote_types(torch.promote_types(query.dtype, key.dtype), value.dtype))
        query, key, value = query.to(dt), key.to(dt), value.to(dt)
    p = dropout if module.training else 0.0
    if attention_mask is not None and attention_mask.dim() == 4 and attention_mask.dtype == torch.bool \
            and kwargs.get("cu_seq_lens_q") is None:
        cu = _packed_cu_seqlens(attention_mask, kwargs.get("position_ids"), query.shape[2], key.shape[2])
        if cu is None:
            return _sdpa_fallback(module, query, key, value, attention_mask, scaling, p)
        kwargs["cu_seq_lens_q"], kwargs["max_length_q"] = cu, int((cu[1:] - cu[:-1]).max())
    window = kwargs.get("sliding_window")
    if window is not None and key.shape[2] > window:
        raise ValueError(f"fastft attention: sliding_window={window} is shorter than the key length {key.shape[2]}; "
                         "the mask function should have handed a full mask")
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    cu = kwargs.get("cu_seq_lens_q")
    if cu is not None and query.shape[0] == 1 and causal:
        # Packed batch (transformers' flattening collator): documents never attend to each other.
        q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (total, H, D)
        out = ops.attention_varlen(q, k, v, cu, int(kwargs.get("max_length_q") or q.shape[0]), causal=True,
                                   scale=scaling, dropout_p=p)
        return out[None], None
    kpm = None
    if attention_mask is not None:
        if attention_mask.dim() != 2:
            raise ValueError(f"fastft attention expects a 2-D padding mask, got shape {tuple(attention_mask.shape)}")
        kpm = attention_mask[:, -key.shape[2]:].to(torch.bool)
    out = ops.attention(query, key, value, causal=causal, scale=scaling, key_padding_mask=kpm, dropout_p=p)
    return out.transpose(1, 2).contiguous(), None


def fastft_attention_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None,
                          attention_mask=None, **kwargs):
    """transformers mask function: the 2-D (B, kv_length) padding mask, or None without padding.

    Masks beyond causal/bidirectional + padding (packed sequences found from position_ids,
    sliding windows the keys exceed, blockwise or image-token overlays) are built in full by
    transformers' ``sdpa_mask`` as a (B, 1, q, kv) bool tensor; the attention function then runs
    them through torch's SDPA, so such models stay correct (one log line says so).
    """
    from transformers import masking_utils as mu

    plain = (mu.causal_mask_function, mu.bidirectional_mask_function)
    if mask_function is not None and mask_function not in plain:
        full = mu.sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                            kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask,
                            allow_is_causal_skip=False, device=kwargs.get("device"), use_vmap=kwargs.get("use_vmap", False))
        if torch.compiler.is_compiling():
            return full
        simple = mu.sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                              kv_offset=kv_offset, mask_function=mu.causal_mask_function,
                              attention_mask=attention_mask, allow_is_causal_skip=False,
                              device=kwargs.get("device"))
        if not torch.equal(full.expand_as(simple), simple):
            return full  # e.g. a sliding window the keys exceed: equal to causal otherwise
    if attention_mask is None:
        return None
    attention_mask = attention_mask[:, -kv_length:]
    # Dropping an all-ones mask saves the kernel its masking; under torch.compile that data-dependent
    # check would break the graph, and in a training step on a GPU it would make the host wait for
    # the device (the mask is exact either way, so those keep it).
    if (attention_mask.shape[1] == kv_length and not torch.compiler.is_compiling()
            and (attention_mask.device.type == "cpu" or not torch.is_grad_enabled())
            and bool(attention_mask.all())):
        return None
    return attention_mask


_logged_fallback = set()


def _packed_cu_seqlens(mask, position_ids, q_len, kv_len):
    """cu_seqlens (int32) when the full mask is exactly causal attention within documents that start
    where ``position_ids`` restart at 0 (one packed row, no cache), else None."""
    if (torch.compiler.is_compiling() or position_ids is None or mask.shape[0] != 1 or position_ids.shape[0] != 1
            or q_len != kv_len or position_ids.shape[-1] != q_len):
        return None
    pos = position_ids[0]
    start = pos == 0
    if not bool(start[0]):
        return None
    doc = torch.cumsum(start.to(torch.int32), 0)
    idx = torch.arange(q_len, device=pos.device)
    expected = (doc[:, None] == doc[None, :]) & (idx[None, :] <= idx[:, None])
    if not torch.equal(mask[0, 0].to(expected.device), expected):
        return None
    ends = torch.cat([start.nonzero().flatten()[1:], torch.tensor([q_len], device=pos.device)])
    return torch.cat([torch.zeros(1, dtype=torch.int32, device=pos.device), ends.to(torch.int32)])


def _sdpa_fallback(module, query, key, value, mask, scaling, p):
    """Attention under a full (B, 1, q, kv) bool mask, through torch's SDPA (rows with no visible key
    give 0, as fastft's kernels do)."""
    name = type(module).__name__
    if name not in _logged_fallback:
        _logged_fallback.add(name)
        logger.info("fastft attention: %s needs a mask beyond causal + padding (packed sequences, sliding "
                    "window, overlays); those calls run through torch SDPA", name)
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=mask.to(query.device), dropout_p=p, scale=scaling,
        enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2).contiguous(), None


def register_attention() -> str:
    """Register "fastft" with transformers; afterwards ``attn_implementation="fastft"`` works."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTN_NAME, fastft_attention_forward)
    AttentionMaskInterface.register(ATTN_NAME, fastft_attention_mask)
    return ATTN_NAME


def _unsupported_attention(model) -> str | None:
    """Why fastft attention cannot serve ``model`` (None when it can). Checked per config, not per class."""
    cfg = getattr(model, "config", None)
    if cfg is None:
        return "the model has no transformers config"
    if getattr(cfg, "attn_logit_softcapping", None) is not None:
        return "attention logit softcapping (attn_logit_softcapping)"
    can = getattr(model, "_can_set_attn_implementation", None)
    if callable(can) and not can():
        return f"{type(model).__name__} does not route attention through transformers' AttentionInterface"
    return None


def _set_attn_implementation(model) -> bool:
    """Select "fastft" attention on ``model`` (a PreTrainedModel, or a PEFT wrapper delegating to one)."""
    inner = model
    while not hasattr(inner, "config") or not hasattr(inner, "set_attn_implementation"):
        nxt = getattr(inner, "get_base_model", None)
        if not callable(nxt) or nxt() is inner:
            break
        inner = nxt()
    why = _unsupported_attention(inner)
    if why is None and hasattr(inner, "set_attn_implementation"):
        inner.set_attn_implementation(ATTN_NAME)
        if getattr(inner.config, "_attn_implementation", None) != ATTN_NAME:
            why = "transformers refused the attention implementation"
    elif why is None:
        why = "the model has no set_attn_implementation (not a transformers PreTrainedModel)"
    if why is not None:
        logger.info("fastft.patch: attention left unchanged (%s)", why)
        return False
    return True


def _peft_lora_forward(self, x, *args, **kwargs):
    """Forward of a peft LoRA Linear rerouted through fastft.ops.lora_linear (single active adapter)."""
    active = [a for a in self.active_adapters if a in self.lora_A]
    if self.disable_adapters or self.merged or len(active) != 1 or getattr(self, "use_dora", {}).get(active[0], False):
        return self._fastft_orig_forward(x, *args, **kwargs)
    a = active[0]
    base = self.get_base_layer()
    drop = self.lora_dropout[a]
    p = drop.p if isinstance(drop, nn.Dropout) and self.training else 0.0
    return ops.lora_linear(x, base.weight, self.lora_A[a].weight, self.lora_B[a].weight, self.scaling[a],
                           bias=base.bias, dropout_p=p)


def _is_peft_lora_linear(m) -> bool:
    """A peft ``lora.Linear`` on a plain (out, in) weight: the layers fastft's fused op can run."""
    if type(m).__module__.split(".")[0] != "peft" or not hasattr(m, "lora_A") or not hasattr(m, "get_base_layer"):
        return False
    try:
        from peft.tuners.lora import Linear as PeftLoraLinear
    except ImportError:  # pragma: no cover - peft without the lora tuner
        return False
    return isinstance(m, PeftLoraLinear) and not getattr(m, "fan_in_fan_out", False)


def _is_conv1d(m):
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf")


# Trained adapter parts under PEFT / fastft adapter layers: never quantized (only frozen bases are).
_ADAPTER_CHILDREN = {"lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector",
                     "modules_to_save", "adapter"}


def _as_linear(child) -> nn.Linear | None:
    """``child`` as an nn.Linear with an (out, in) weight, or None when it is no linear layer fastft knows."""
    if isinstance(child, nn.Linear):
        return child
    if _is_conv1d(child):  # GPT-2 Conv1D: weight (in, out), y = x W + b -> Linear with W transposed
        lin = nn.Linear(child.weight.shape[0], child.nf, bias=child.bias is not None, device="meta")
        lin.weight = nn.Parameter(child.weight.detach().t().contiguous(), requires_grad=False)
        if child.bias is not None:
            lin.bias = nn.Parameter(child.bias.detach(), requires_grad=False)
        return lin
    return None


def _quantize_linears(model, quantization, out_emb, kw) -> set[str]:
    """Replace each linear layer (except the output layer and adapter weights) by a QuantLinear, one at a
    time; returns the type names of other leaf modules holding 2-D weights, which stay as they are."""
    from fastft.nn.quant_linear import QuantLinear

    skipped = set()
    stack = [model]
    while stack:
        mod = stack.pop()
        for cname, child in list(mod.named_children()):
            if child is out_emb or cname in _ADAPTER_CHILDREN:
                continue
            lin = _as_linear(child)
            if lin is not None:
                setattr(mod, cname, QuantLinear.from_linear(lin, quantization, **kw))
                del lin, child
            elif next(child.children(), None) is not None:
                stack.append(child)
            elif any(p.dim() == 2 for p in child.parameters(recurse=False)) \
                    and not any(t in type(child).__name__ for t in ("Embedding", "Norm")):
                skipped.add(type(child).__name__)
    return skipped


def _load_backends(model) -> None:
    """Resolve fastft's backends for the model's device now: the dispatcher imports its providers on
    first use, and an import inside a ``torch.compile``d forward would break the graph there."""
    from fastft.ops import dispatch

    devices = {p.device for p in model.parameters()} or {torch.device("cpu")}
    for dev in devices:
        if dev.type == "meta":
            continue
        for op in ("attention", "attention_varlen", "lora_linear", "quant_matmul", "layer_norm", "gelu",
                   "linear_cross_entropy", "cross_entropy_grad_"):
            try:
                dispatch.backend_for(op, dev)
            except NotImplementedError:
                pass


# transformers classes whose forward is exactly fastft.ops.rms_norm / down(silu(gate(x)) * up(x)) (checked
# against transformers 5.x sources); their forward is rerouted so CPU runs use the fused row kernels.
RMSNORM_CLASSES = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm")
SWIGLU_MLP_CLASSES = ("LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP")


def _rmsnorm_forward(self, hidden_states):
    return ops.rms_norm(hidden_states, self.weight, self.variance_epsilon)


def _swiglu_forward(self, x):
    return self.down_proj(ops.silu_mul(self.gate_proj(x), self.up_proj(x)))


def _layer_norm_forward(self, x):
    return ops.layer_norm(x, self.weight, self.bias, self.eps)


def _gelu_forward(self, x):
    return ops.gelu(x)


def _is_layer_norm(mod) -> bool:
    """A plain ``nn.LayerNorm`` over the last dimension (HF BERT / RoBERTa / GPT-2's norms): its
    forward is exactly ``fastft.ops.layer_norm``."""
    return (type(mod) is nn.LayerNorm and len(mod.normalized_shape) == 1 and mod.elementwise_affine
            and getattr(mod, "bias", None) is not None)


def _is_exact_gelu(act) -> bool:
    """transformers' ``GELUActivation`` (ACT2FN["gelu"]: F.gelu or its Python erf formula, the same
    function) or ``nn.GELU()`` in its erf form."""
    if type(act) is nn.GELU:
        return act.approximate == "none"
    return type(act).__name__ == "GELUActivation"


def _is_silu(act) -> bool:
    return isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation"  # transformers' ACT2FN["silu"]


# transformers attention classes whose forward rotates q / k with their module's rotate-half
# ``apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)`` (checked against transformers 5.x)
ROPE_ATTENTION_CLASSES = ("LlamaAttention", "MistralAttention", "Qwen2Attention", "Qwen3Attention")
_HF_ROPE_PARAMS = ("q", "k", "cos", "sin", "unsqueeze_dim")


def _fastft_rotary(orig):
    """transformers' ``apply_rotary_pos_emb`` on ``fastft.ops.rope``: q / k (B, H, T, D) are rotated
    as (B, T, H, D) views (no copy), in place where the backend and autograd allow (the projections
    are dead after the rotation); other call forms run ``orig``."""

    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
        if unsqueeze_dim != 1 or q.dim() != 4 or k.dim() != 4 or cos.dim() != 3:
            return orig(q, k, cos, sin, unsqueeze_dim)
        q = ops.rope(q.transpose(1, 2), cos, sin, inplace=True).transpose(1, 2)
        k = ops.rope(k.transpose(1, 2), cos, sin, inplace=True).transpose(1, 2)
        return q, k

    apply_rotary_pos_emb._fastft_orig = orig
    return apply_rotary_pos_emb


def _with_globals(fn, replace: dict):
    """A copy of ``fn`` whose module globals read ``replace`` first; a decorator chain
    (``__wrapped__`` held in a closure cell) is copied down to the innermost function. None when
    the chain cannot be followed."""
    inner = getattr(fn, "__wrapped__", None)
    if inner is None:
        if not isinstance(fn, types.FunctionType) or not all(k in fn.__globals__ for k in replace):
            return None
        g = dict(fn.__globals__)
        g.update(replace)
        closure = fn.__closure__
    else:
        new_inner = _with_globals(inner, replace)
        cells = fn.__closure__ or ()
        if new_inner is None or not isinstance(fn, types.FunctionType) or \
                not any(c.cell_contents is inner for c in cells):
            return None
        g = fn.__globals__
        closure = tuple(types.CellType(new_inner) if c.cell_contents is inner else c for c in cells)
    out = types.FunctionType(fn.__code__, g, fn.__name__, fn.__defaults__, closure)
    out.__kwdefaults__, out.__qualname__, out.__module__ = fn.__kwdefaults__, fn.__qualname__, fn.__module__
    out.__dict__.update(fn.__dict__)
    if inner is not None:
        out.__wrapped__ = new_inner
    return out


_ROTARY_FORWARDS: dict = {}


def _rotary_forward(cls):
    """``cls.forward`` seeing fastft's ``apply_rotary_pos_emb`` (one copy per class), or None when
    its module's function is not the rotate-half form fastft implements."""
    if cls not in _ROTARY_FORWARDS:
        fwd = None
        orig = getattr(inspect.unwrap(cls.forward), "__globals__", {}).get("apply_rotary_pos_emb")
        try:
            params = tuple(inspect.signature(orig).parameters) if callable(orig) else ()
        except (TypeError, ValueError):
            params = ()
        if params == _HF_ROPE_PARAMS:
            fwd = _with_globals(cls.forward, {"apply_rotary_pos_emb": _fastft_rotary(orig)})
        _ROTARY_FORWARDS[cls] = fwd
    return _ROTARY_FORWARDS[cls]


def _patch_block_ops(model) -> int:
    """Reroute the known RMSNorm, SiLU-gated MLP and rotary attention modules (the attention modules keep
    transformers' forward, which now rotates q / k with ``ops.rope``), the plain LayerNorms and the exact
    GELU activations (BERT family) through fastft ops."""
    n = 0
    for mod in model.modules():
        cls = type(mod).__name__
        if hasattr(mod, "_fastft_orig_forward"):
            continue
        if cls in RMSNORM_CLASSES and hasattr(mod, "variance_epsilon") and getattr(mod, "weight", None) is not None:
            fwd = _rmsnorm_forward
        elif _is_layer_norm(mod):
            fwd = _layer_norm_forward
        elif _is_exact_gelu(mod):
            fwd = _gelu_forward
        elif (cls in SWIGLU_MLP_CLASSES and _is_silu(getattr(mod, "act_fn", None))
              and all(hasattr(mod, a) for a in ("gate_proj", "up_proj", "down_proj"))):
            fwd = _swiglu_forward
        elif cls in ROPE_ATTENTION_CLASSES and _rotary_forward(type(mod)) is not None:
            fwd = _rotary_forward(type(mod))
        else:
            continue
        mod._fastft_orig_forward = mod.forward
        mod.forward = types.MethodType(fwd, mod)
        n += 1
    return n


def _frozen_linear_forward(self, x):
    from fastft.ops.lean import frozen_linear

    return frozen_linear(x, self.weight, self.bias)


def _patch_frozen_linears(model) -> int:
    """Plain ``nn.Linear`` modules (e.g. the LM head, untargeted projections) run through
    ``fastft.ops.lean.frozen_linear``: fastft's fp32 CPU GEMM while their weight is frozen, F.linear
    otherwise (decided per call)."""
    n = 0
    for mod in model.modules():
        if type(mod) is nn.Linear and not hasattr(mod, "_fastft_orig_forward"):
            mod._fastft_orig_forward = mod.forward
            mod.forward = types.MethodType(_frozen_linear_forward, mod)
            n += 1
    return n


def _patch_causal_lm_loss(model) -> bool:
    """Set fastft's ``hf_causal_lm_loss`` as the loss of a transformers causal LM that would use
    ``ForCausalLMLoss`` (and has no loss function set already); True when set."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not type(base).__name__.endswith("ForCausalLM") or "_loss_function" in vars(base):
        return False
    if getattr(base, "loss_type", None) not in (None, "ForCausalLM") or not hasattr(type(base), "loss_function"):
        return False
    base.loss_function = hf_causal_lm_loss
    return True


# Causal LM classes whose forward is exactly "backbone -> lm_head on the kept positions -> loss_function"
# (transformers 5: the same source for all four); the fused forward below replaces only that tail.
FUSED_LOSS_CLASSES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")


def _output_linear(model):
    """The LM head as a dense nn.Linear (also inside a fastft / PEFT modules_to_save wrapper), else None."""
    head = model.get_output_embeddings()
    for attr in ("modules_to_save",):  # fastft's wrapper holds the trained copy as a module
        inner = getattr(head, attr, None)
        if isinstance(inner, nn.Module) and not isinstance(inner, nn.ModuleDict):
            head = inner
    if type(head).__name__ == "ModulesToSaveWrapper" and hasattr(head, "modules_to_save"):  # PEFT: per adapter
        active = getattr(head, "active_adapter", "default")
        active = active[0] if isinstance(active, (list, tuple)) else active
        head = head.modules_to_save[active] if active in head.modules_to_save else None
    return head if type(head) is nn.Linear else None


def _fused_causal_lm_forward(self, *args, **kwargs):
    """Training forward with labels: the backbone, then ``fastft.ops.linear_cross_entropy`` on the
    hidden states (the (B, T, V) logits are never built; ``.logits`` is None). Everything else --
    eval, no labels, ``torch.no_grad()``, ``logits_to_keep``, tuple outputs, a head that is not a
    dense linear -- runs the original forward."""
    orig = self._fastft_orig_forward
    bound = self._fastft_forward_sig.bind_partial(*args, **kwargs)
    named = dict(bound.arguments)
    named.update(named.pop("kwargs", {}) or {})
    labels = named.get("labels")
    head = _output_linear(self)
    if (labels is None or not self.training or not torch.is_grad_enabled() or head is None
            or named.get("logits_to_keep") not in (None, 0) or named.get("return_dict") is False
            or torch.compiler.is_compiling()):
        return orig(*args, **kwargs)
    named.pop("labels")
    named.pop("logits_to_keep", None)
    num_items = named.pop("num_items_in_batch", None)
    shift_labels = named.pop("shift_labels", None)
    ignore_index = named.pop("ignore_index", -100)
    outputs = self.base_model(**named)
    loss = hf_linear_causal_lm_loss(outputs.last_hidden_state, head.weight, labels, bias=head.bias,
                                    num_items_in_batch=num_items, ignore_index=ignore_index,
                                    shift_labels=shift_labels)
    from transformers.modeling_outputs import CausalLMOutputWithPast

    fields = CausalLMOutputWithPast.__dataclass_fields__
    extra = {k: getattr(outputs, k) for k in ("cache", "past_key_values", "hidden_states", "attentions")
             if k in fields and hasattr(outputs, k)}
    return CausalLMOutputWithPast(loss=loss, logits=None, **extra)


def _patch_fused_loss_forward(model) -> bool:
    """Install ``_fused_causal_lm_forward`` on a causal LM of ``FUSED_LOSS_CLASSES`` (instance-level,
    keeping the class's signature for transformers' column filtering and ``generate``)."""
    import functools
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if type(base).__name__ not in FUSED_LOSS_CLASSES or hasattr(base, "_fastft_orig_forward"):
        return False
    cfg = base.config.get_text_config() if hasattr(base.config, "get_text_config") else base.config
    if any(getattr(cfg, k, None) not in (None, 1.0) for k in ("final_logit_softcapping", "logit_scale")):
        return False
    base._fastft_orig_forward = base.forward
    base._fastft_forward_sig = inspect.signature(type(base).forward).replace(
        parameters=list(inspect.signature(type(base).forward).parameters.values())[1:])
    base.forward = types.MethodType(functools.wraps(type(base).forward)(_fused_causal_lm_forward), base)
    return True


def _fastft_activation_checkpointing_enable(self, activation_checkpointing_kwargs=None, every_n_layers: int = 1,
                                            offload=False, **kwargs):
    """transformers' ``activation_checkpointing_enable`` (what ``transformers.Trainer(gradient_checkpointing=True)``
    calls), with ``offload`` (the argument, or an ``"offload"`` key of the kwargs) through fastft's
    ``ActivationOffloader``: the saved block inputs go to pinned host memory on a side stream, without
    blocking the host (transformers' own offload copies on the compute stream)."""
    from fastft.nn.checkpointing import ActivationOffloader, offloading_checkpoint_function

    kw = dict(activation_checkpointing_kwargs or {})
    offload = kw.pop("offload", offload)
    type(self).activation_checkpointing_enable(self, kw or None, every_n_layers=every_n_layers, offload=False,
                                              **kwargs)
    self._fastft_offloader = None
    if not offload:
        return
    kw = {"use_reentrant": False, **kw}
    if kw["use_reentrant"]:
        raise ValueError("activation offload needs use_reentrant=False")
    offloader = offload if isinstance(offload, ActivationOffloader) else ActivationOffloader()
    fn = functools.partial(offloading_checkpoint_function(offloader), **kw)
    for m in self.modules():
        if hasattr(m, "_gradient_checkpointing_func"):
            m._gradient_checkpointing_func = fn
    self._fastft_offloader = offloader
    if getattr(self, "_fastft_offload_hook", None) is None:
        # A new forward cuts the prefetch chain of the previous one.
        self._fastft_offload_hook = self.register_forward_pre_hook(
            lambda mod, args: mod._fastft_offloader.new_pass() if mod._fastft_offloader is not None else None)


def _patch_checkpointing(model) -> bool:
    """Route a transformers model's activation checkpointing offload through fastft (instance-level)."""
    target = model
    while not hasattr(type(target), "_activation_checkpointing_enable"):
        inner = getattr(target, "base_model", None)
        inner = getattr(inner, "model", None) if inner is not None and inner is not target else None
        if inner is None or inner is target:
            return False
        target = inner
    if "activation_checkpointing_enable" in vars(target):
        return False
    target.activation_checkpointing_enable = types.MethodType(_fastft_activation_checkpointing_enable, target)
    return True


def patch(model, *, quantization=None, attention=True, lora=None, blocksize=64, double_quant=True, group_size=128,
          loss=True):
    """Patch a transformers (or peft) model in place to run on fastft ops; returns the model
    (or the PEFT-wrapped model when ``lora`` is given). ``loss``: a causal LM's loss runs on fastft's
    fused cross-entropy rows (``fastft.ops.loss.hf_causal_lm_loss``), and for the classes in
    ``FUSED_LOSS_CLASSES`` a training forward with labels never builds the logits
    (``fastft.ops.linear_cross_entropy``; ``.logits`` is then None)."""
    if quantization not in (None, "nf4", "int4"):
        raise ValueError(f"patch: quantization must be None, 'nf4' or 'int4', got {quantization!r}")
    if loss and _patch_causal_lm_loss(model):
        logger.info("fastft.patch: the causal LM loss now runs on fastft's fused cross-entropy rows")
    if loss and _patch_fused_loss_forward(model):
        logger.info("fastft.patch: training forwards with labels compute the loss with fastft.ops.linear_cross_entropy "
                    "(no full logits)")
    _patch_checkpointing(model)
    if attention:
        register_attention()
        _set_attn_implementation(model)
    _load_backends(model)
    n_block = _patch_block_ops(model)
    if n_block:
        logger.info("fastft.patch: %d RMSNorm / SwiGLU / rotary attention / LayerNorm / GELU modules now run "
                    "through fastft.ops", n_block)
    n_lin = _patch_frozen_linears(model)
    if n_lin:
        logger.info("fastft.patch: %d nn.Linear modules now use fastft's frozen-linear path while frozen", n_lin)
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    peft_lora = 0
    for name, mod in list(model.named_modules()):
        if _is_peft_lora_linear(mod) and not hasattr(mod, "_fastft_orig_forward"):
            mod._fastft_orig_forward = mod.forward
            mod.forward = types.MethodType(_peft_lora_forward, mod)
            peft_lora += 1
    if quantization:
        skipped = _quantize_linears(model, quantization, out_emb,
                                    dict(blocksize=blocksize, double_quant=double_quant, group_size=group_size))
        if skipped:
            logger.info("fastft.patch: left these module types unchanged (not nn.Linear / Conv1D): %s",
                        ", ".join(sorted(skipped)))
    if peft_lora:
        logger.info("fastft.patch: %d PEFT LoRA layers now run through fastft.ops.lora_linear", peft_lora)
    if lora is not None:
        import fastft

        return fastft.get_peft_model(model, lora)
    return model


def from_pretrained(path, *, model_class=None, attention=True, quantization=None, **patch_kwargs):
    """A transformers model from checkpoint directory ``path``, patched (see ``patch``).

    A checkpoint saved by transformers with bitsandbytes 4-bit NF4 (``quantization_config.quant_method
    == "bitsandbytes"``) loads straight into fastft's NF4 weights, without bitsandbytes: the model is
    built with empty parameters, each quantized layer becomes a ``QuantLinear`` from its
    ``weight``, ``weight.absmax``, ... tensors, and the rest loads as usual. Other checkpoints load with
    ``transformers`` and are then patched (``quantization`` quantizes them on the fly).
    ``model_class``: a transformers class (default: ``config.architectures[0]``).
    """
    import os

    import transformers

    from fastft.models.loader import Checkpoint, bnb_4bit_settings, bnb_quantized_prefixes

    path = os.fspath(path)
    config = transformers.AutoConfig.from_pretrained(path)
    if model_class is None:
        archs = getattr(config, "architectures", None) or []
        model_class = getattr(transformers, archs[0], None) if archs else None
        if model_class is None:
            raise ValueError(f"{path}: config.json names no transformers architecture ({archs}); pass model_class=")
    if bnb_4bit_settings(config, path) is None:
        model = model_class.from_pretrained(path)
        return patch(model, attention=attention, quantization=quantization, **patch_kwargs)
    if quantization not in (None, "nf4"):
        raise ValueError(f"{path}: the checkpoint is already NF4-quantized; quantization={quantization!r} "
                         "cannot apply")
    return patch(_load_bnb_model(path, config, model_class, Checkpoint, bnb_quantized_prefixes),
                 attention=attention, **patch_kwargs)


def _load_bnb_model(path, config, model_class, checkpoint_cls, prefixes_of):
    from accelerate import init_empty_weights

    from fastft.nn.quant_linear import QuantLinear
    from fastft.quant import NF4Weight
    from fastft.quant.nf4 import BNB_QS_KEY, check_bnb_header

    del config.quantization_config  # transformers would otherwise ask bitsandbytes to build the layers
    dtype = getattr(config, "dtype", None) or torch.float32
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    with init_empty_weights(include_buffers=False):  # parameters on meta; buffers (rotary) real
        model = model_class(config)
    ckpt = checkpoint_cls(path)
    try:
        # Every 4-bit layer's quant state and tensor headers are checked before any tensor is read.
        qs, where = {}, {}
        for prefix in prefixes_of(ckpt.infos):
            parent_path, _, child = prefix.rpartition(".")
            old = getattr(model.get_submodule(parent_path) if parent_path else model, child)
            if _as_linear_shape(old) is None:
                raise ValueError(f"{path}: {prefix}.weight is 4-bit quantized but {prefix} is a {type(old).__name__}")
            w = prefix + ".weight"
            where[prefix] = ckpt.where(w) if w in ckpt.infos else str(path)
            key = w + "." + BNB_QS_KEY
            qs[key] = ckpt.read(key)
            check_bnb_header(w, {k: (i.dtype, tuple(i.shape)) for k, i in ckpt.infos.items()
                                 if k == w or k.startswith(w + ".")}, qs[key], where[prefix], _as_linear_shape(old))
        sd = {k: qs[k] if k in qs else ckpt.read(k) for k in ckpt.infos}
    finally:
        ckpt.close()
    for prefix in prefixes_of(sd):
        parent_path, _, child = prefix.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        old = getattr(parent, child)
        qw = NF4Weight.from_bnb_state_dict(sd, prefix + ".", source=where[prefix], expected_shape=_as_linear_shape(old))
        for k in [k for k in sd if k.startswith(prefix + ".weight")]:
            del sd[k]
        bias = sd.pop(prefix + ".bias", None)
        setattr(parent, child, QuantLinear(qw, bias.to(dtype) if bias is not None else None))
    sd = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in sd.items()}
    missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
    model.tie_weights()
    left = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if unexpected or left:
        raise ValueError(f"{path}: checkpoint does not fit {model_class.__name__}: unexpected {unexpected[:8]}, "
                         f"missing {left[:8]}")
    return model.eval()


def _as_linear_shape(m):
    if isinstance(m, nn.Linear):
        return (m.out_features, m.in_features)
    if _is_conv1d(m):
        return (m.nf, m.weight.shape[0])
    return None


# ``fastft.patch`` (the public name) is this module's ``patch`` function; the two helpers the README
# calls through it are attributes of the function.
patch.register_attention = register_attention
patch.from_pretrained = from_pretrained
