"""Native Llama-family causal LM (llama, mistral, qwen2) with transformers' module paths.

Architecture (Touvron et al. 2023): token embedding -> N x [RMSNorm -> attention with rotary
position embedding (RoPE) and grouped-query heads -> residual -> RMSNorm -> SiLU-gated MLP ->
residual] -> RMSNorm -> lm_head (optionally tied to the embedding).

Per-type differences (``FAMILY``): qwen2 has biases on q/k/v; llama has ``attention_bias`` /
``mlp_bias`` flags; mistral and qwen2 may declare a sliding window.

Supported:
- RoPE types default, linear, dynamic (NTK), llama3, yarn, with ``partial_rotary_factor``; the
  formulas follow transformers' ``modeling_rope_utils`` (cos/sin in fp32).
- GQA through ``fastft.ops.attention`` (K/V are never repeated here); padded batches through
  ``attention_mask`` (either side; left padding takes position ids from the mask's cumsum);
  packed batches through ``cu_seqlens`` -> ``fastft.ops.attention_varlen`` with positions
  restarting per document (or, as transformers' flattening collator sends them, one row whose
  ``position_ids`` restart at 0 per document); a KV cache for ``generate``.
- Loss: labels shifted inside (HF convention), sum over targets / (num_items_in_batch or count).
  In packed batches the target that would cross a document boundary is ignored. In training mode
  with labels (grad enabled, no logits_to_keep; under autocast the logits' matmul runs in its dtype) the
  loss is a chunked cross-entropy
  (``fastft.ops.linear_cross_entropy``: one chunk of logits at a time, gradient formed in the
  forward) and the output's ``.logits`` is None -- the full (B, T, V) logits are never built.
  Eval mode, ``labels=None`` or ``torch.no_grad()`` return the logits as before. A host-resident
  frozen LM head (``fastft.nn.offload_frozen_to_host``) is streamed to the device in vocabulary
  chunks inside the loss (docs/offload.md).
Limits: sliding-window attention is not implemented, so inputs longer than a declared window
raise; sequences longer than ``max_position_embeddings`` raise (dynamic RoPE excepted, since it
exists to extend that length).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from fastft import ops
from fastft.nn import fused_blocks
from fastft.nn.checkpointing import tiled_rows
from fastft.ops.argcheck import check_async, host_value
from fastft.ops.loss import causal_lm_loss, chunked_causal_lm_loss

from .base import NativeModel, attention_inputs

# model_type -> (q/k/v bias, o bias, mlp bias); None = read the llama config flag.
FAMILY = {
    "llama": (None, None, None),
    "mistral": (False, False, False),
    "qwen2": (True, False, False),
}


def _biases(config):
    qkv, o, mlp = FAMILY[config.model_type]
    attn = bool(getattr(config, "attention_bias", False))
    return (attn if qkv is None else qkv, attn if o is None else o,
            bool(getattr(config, "mlp_bias", False)) if mlp is None else mlp)


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


# ----------------------------------------------------------------------------------------------
# Rotary position embedding
# ----------------------------------------------------------------------------------------------
def rope_parameters(config) -> dict:
    """The config's RoPE dict in transformers 5 form ({rope_type, rope_theta, factor, ...})."""
    rp = dict(getattr(config, "rope_parameters", None) or {})
    legacy = getattr(config, "rope_scaling", None)  # transformers 4.x configs
    if legacy and not rp.get("factor"):
        rp.update(legacy)
    rp.setdefault("rope_type", rp.get("type", "default"))
    rp.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    return rp


SUPPORTED_ROPE = ("default", "linear", "dynamic", "llama3", "yarn")


def rope_inv_freq(config, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """(inv_freq (dim/2,) fp32 on CPU, attention_scaling) for the config's RoPE type.

    ``seq_len`` matters only for dynamic NTK scaling, whose base grows once a sequence is longer
    than ``max_position_embeddings``: base' = base · (f·L/L0 − (f − 1))^(d/(d−2)).
    """
    rp = rope_parameters(config)
    kind = rp["rope_type"]
    if kind not in SUPPORTED_ROPE:
        raise ValueError(f"{config.model_type}: rope_type {kind!r} is not supported (supported: {SUPPORTED_ROPE})")
    base = float(rp["rope_theta"])
    dim = int(_head_dim(config) * rp.get("partial_rotary_factor", 1.0))
    exps = torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float32) / dim
    inv = 1.0 / (base ** exps)
    scaling = 1.0
    if kind == "linear":  # position interpolation: positions / factor
        inv = inv / rp["factor"]
    elif kind == "dynamic":
        L0 = config.max_position_embeddings
        L = max(seq_len or L0, L0)
        f = rp["factor"]
        base = base * ((f * L / L0) - (f - 1)) ** (dim / (dim - 2))
        inv = 1.0 / (base ** exps)
    elif kind == "llama3":
        # Llama 3.1: long wavelengths divided by factor, short ones kept, a linear blend between.
        f, lo, hi = rp["factor"], rp["low_freq_factor"], rp["high_freq_factor"]
        L0 = rp.get("original_max_position_embeddings", config.max_position_embeddings)
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > L0 / lo, inv / f, inv)
        smooth = (L0 / wavelen - lo) / (hi - lo)
        blended = (1 - smooth) * scaled / f + smooth * scaled
        medium = ~(wavelen < L0 / hi) & ~(wavelen > L0 / lo)
        inv = torch.where(medium, blended, scaled)
    elif kind == "yarn":
        # YaRN (Peng et al. 2023): interpolate low frequencies, extrapolate high ones with a linear
        # ramp between the dims that rotate beta_slow and beta_fast times over the original length,
        # and scale cos/sin by the attention factor 0.1·ln(f) + 1.
        f = rp.get("factor") or config.max_position_embeddings / rp["original_max_position_embeddings"]
        L0 = rp.get("original_max_position_embeddings", config.max_position_embeddings)

        def mscale(s, m=1.0):
            return 1.0 if s <= 1 else 0.1 * m * math.log(s) + 1.0

        scaling = rp.get("attention_factor")
        if scaling is None:
            m, m_all = rp.get("mscale"), rp.get("mscale_all_dim")
            scaling = float(mscale(f, m) / mscale(f, m_all)) if (m and m_all) else mscale(f)
        beta_fast, beta_slow = rp.get("beta_fast") or 32, rp.get("beta_slow") or 1

        def corr_dim(rot):
            return (dim * math.log(L0 / (rot * 2 * math.pi))) / (2 * math.log(base))

        low, high = corr_dim(beta_fast), corr_dim(beta_slow)
        if rp.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001  # a zero-width ramp would divide by zero
        ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
        pos = base ** (torch.arange(0, dim, 2).to(torch.float32) / dim)
        extra = 1 - ramp
        inv = (1.0 / (f * pos)) * (1 - extra) + (1.0 / pos) * extra
    return inv, float(scaling)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for given position ids, computed in fp32 and cast to the activations' dtype."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.kind = rope_parameters(config)["rope_type"]
        inv, self.scaling = rope_inv_freq(config)  # validates the rope type at construction
        # Derived from the config, never read from checkpoints (built on meta by the loader, then reset).
        self.register_buffer("inv_freq", inv, persistent=False)

    def reset(self, device):
        inv, self.scaling = rope_inv_freq(self.config)
        self.inv_freq = inv.to(device)

    def forward(self, position_ids: torch.Tensor, dtype, seq_len: int):
        inv = self.inv_freq
        if self.kind == "dynamic" and seq_len > self.config.max_position_embeddings:
            inv = rope_inv_freq(self.config, seq_len)[0].to(inv.device)
        with torch.autocast(device_type=position_ids.device.type, enabled=False):
            freqs = position_ids[..., None].to(torch.float32) * inv  # (B, T, dim/2)
            emb = torch.cat((freqs, freqs), dim=-1)
            cos, sin = emb.cos() * self.scaling, emb.sin() * self.scaling
        return cos.to(dtype), sin.to(dtype)


# ----------------------------------------------------------------------------------------------
# KV cache
# ----------------------------------------------------------------------------------------------
class KVCache:
    """Preallocated per-layer K/V of shape (B, Hkv, max_len, D); ``length`` tokens are filled."""

    def __init__(self, config, batch: int, max_len: int, device, dtype):
        H, D = config.num_key_value_heads or config.num_attention_heads, _head_dim(config)
        n = config.num_hidden_layers
        self.k = [torch.empty(batch, H, max_len, D, device=device, dtype=dtype) for _ in range(n)]
        self.v = [torch.empty(batch, H, max_len, D, device=device, dtype=dtype) for _ in range(n)]
        self.max_len = max_len
        self.length = 0

    def update(self, layer: int, k, v):
        """Store k/v (B, Hkv, T, D) after the filled part; return the views of everything so far."""
        T = k.shape[2]
        end = self.length + T
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} tokens > capacity {self.max_len}")
        self.k[layer][:, :, self.length:end] = k
        self.v[layer][:, :, self.length:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


# ----------------------------------------------------------------------------------------------
# Blocks
# ----------------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    """y = w · x / sqrt(mean(x²) + eps), normalised in fp32 and cast back before the weight (as HF)."""

    def __init__(self, hidden: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden))
        self.variance_epsilon = eps

    def forward(self, x, residual=None):
        """norm(x); with ``residual``, (norm(x + residual), x + residual) in one pass
        (``fastft.ops.add_rms_norm``). Both go through the module call, so hooks see the weight."""
        if residual is None:
            return ops.rms_norm(x, self.weight, self.variance_epsilon)
        return ops.add_rms_norm(x, residual, self.weight, self.variance_epsilon)


class LlamaAttention(nn.Module):
    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads or config.num_attention_heads
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"{config.model_type}: num_attention_heads ({self.num_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})"
            )
        self.head_dim = _head_dim(config)
        self.scaling = self.head_dim ** -0.5
        self.attention_dropout = float(getattr(config, "attention_dropout", 0.0) or 0.0)
        qkv_bias, o_bias, _ = _biases(config)
        h = config.hidden_size
        self.q_proj = nn.Linear(h, self.num_heads * self.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(h, self.num_kv_heads * self.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(h, self.num_kv_heads * self.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, h, bias=o_bias)

    #: fused q/k/v LoRA block switch (``fastft.nn.fused_blocks``); None: the process setting
    fused_lora_blocks = None

    def _qkv(self, x):
        if fused_blocks.enabled(self.fused_lora_blocks, x):
            out = fused_blocks.qkv(self.q_proj, self.k_proj, self.v_proj, x)
            if out is not None:
                return out
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def forward(self, x, cos, sin, key_padding_mask=None, cache=None, cu_seqlens=None, max_seqlen=None):
        B, T, _ = x.shape
        q, k, v = self._qkv(x)
        # The projections are dead after the rotation: a backend may rotate them in place.
        q = ops.rope(q.view(B, T, self.num_heads, self.head_dim), cos, sin, inplace=True)
        k = ops.rope(k.view(B, T, self.num_kv_heads, self.head_dim), cos, sin, inplace=True)
        v = v.view(B, T, self.num_kv_heads, self.head_dim)
        p = self.attention_dropout if self.training else 0.0
        q, k, v = attention_inputs(q, k, v)
        if cu_seqlens is not None:  # packed: B == 1, (total, H, D) layout
            out = ops.attention_varlen(q[0], k[0], v[0], cu_seqlens, max_seqlen, causal=True, scale=self.scaling,
                                       dropout_p=p)
            return self.o_proj(out.reshape(B, T, -1))
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        out = ops.attention(q, k, v, causal=True, scale=self.scaling, key_padding_mask=key_padding_mask, dropout_p=p)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


class LlamaMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        act = getattr(config, "hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"{config.model_type}: hidden_act {act!r} is not supported (only 'silu')")
        bias = _biases(config)[2]
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=bias)

    #: fused gate/up + SwiGLU LoRA block switch (``fastft.nn.fused_blocks``); None: the process setting
    fused_lora_blocks = None

    #: tokens per MLP tile in training (``NativeModel.tiled_mlp_enable``); None: the whole batch at once
    tile_tokens = None

    def forward(self, x):
        n = self.tile_tokens
        if n and self.training and torch.is_grad_enabled() and x.numel() // x.shape[-1] > n:
            return tiled_rows(self._mlp, x, n)
        return self._mlp(x)

    def _mlp(self, x):
        if fused_blocks.enabled(self.fused_lora_blocks, x):
            h = fused_blocks.gate_up_swiglu(self.gate_proj, self.up_proj, x)
            if h is not None:
                return self.down_proj(h)
        return self.down_proj(ops.silu_mul(self.gate_proj(x), self.up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.self_attn = LlamaAttention(config, layer_idx)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, cos, sin, key_padding_mask=None, cache=None, cu_seqlens=None, max_seqlen=None):
        a = self.self_attn(self.input_layernorm(x), cos, sin, key_padding_mask, cache, cu_seqlens, max_seqlen)
        normed, x = self.post_attention_layernorm(a, x)  # residual add + norm in one pass
        return x + self.mlp(normed)


class LlamaModel(nn.Module):
    def __init__(self, config):
        super().__init__()
        pad = config.pad_token_id if getattr(config, "pad_token_id", None) is not None else None
        if pad is not None and not 0 <= pad < config.vocab_size:
            pad = None
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=pad)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)


def _sliding_windows(config) -> list[int | None]:
    """Per-layer sliding window (None = full attention), following transformers' config rules."""
    n = config.num_hidden_layers
    w = getattr(config, "sliding_window", None)
    if config.model_type == "llama" or not w:
        return [None] * n
    types = getattr(config, "layer_types", None)
    if types:
        return [w if t == "sliding_attention" else None for t in types]
    return [w] * n


# ----------------------------------------------------------------------------------------------
# The causal LM
# ----------------------------------------------------------------------------------------------
_LAYER_TABLE = (
    "self_attn.q_proj.weight", "self_attn.q_proj.bias", "self_attn.k_proj.weight", "self_attn.k_proj.bias",
    "self_attn.v_proj.weight", "self_attn.v_proj.bias", "self_attn.o_proj.weight", "self_attn.o_proj.bias",
    "mlp.gate_proj.weight", "mlp.gate_proj.bias", "mlp.up_proj.weight", "mlp.up_proj.bias",
    "mlp.down_proj.weight", "mlp.down_proj.bias", "input_layernorm.weight", "post_attention_layernorm.weight",
)
_LAYER_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                  "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


class LlamaForCausalLM(NativeModel):
    """Llama / Mistral / Qwen2 causal LM. ``forward`` returns ``CausalLMOutputWithPast``."""

    base_prefix = "model."

    def __init__(self, config):
        super().__init__(config)
        if config.model_type not in FAMILY:
            raise ValueError(f"LlamaForCausalLM: unsupported model_type {config.model_type!r}")
        self.model = LlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.sliding_windows = _sliding_windows(config)
        self.tie_weights()

    @property
    def hf_architecture(self) -> str:
        return {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}[
            self.model_type]

    # --- checkpoint table -------------------------------------------------------------------------
    @classmethod
    def weight_table(cls, config) -> list[str]:
        qkv, o, mlp = _biases(config)
        skip = set()
        if not qkv:
            skip |= {"self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"}
        if not o:
            skip.add("self_attn.o_proj.bias")
        if not mlp:
            skip |= {"mlp.gate_proj.bias", "mlp.up_proj.bias", "mlp.down_proj.bias"}
        names = ["model.embed_tokens.weight"]
        for i in range(config.num_hidden_layers):
            names += [f"model.layers.{i}.{n}" for n in _LAYER_TABLE if n not in skip]
        names.append("model.norm.weight")
        if not getattr(config, "tie_word_embeddings", False):
            names.append("lm_head.weight")
        return names

    @classmethod
    def ignored_checkpoint_keys(cls, config) -> tuple[str, ...]:
        ign = (r"(model\.)?layers\.\d+\.self_attn\.rotary_emb\.inv_freq", r"(model\.)?rotary_emb\.inv_freq")
        if getattr(config, "tie_word_embeddings", False):
            # Some tied checkpoints still carry a copy of the embedding as lm_head.
            ign += (r"lm_head\.weight",)
        return ign

    @classmethod
    def quant_targets(cls, config) -> list[str]:
        return [f"model.layers.{i}.{n}" for i in range(config.num_hidden_layers) for n in _LAYER_LINEARS]

    def init_buffers(self, device):
        self.model.rotary_emb.reset(device)

    def set_fused_lora_blocks(self, value) -> None:
        """Fused q/k/v and gate/up + SwiGLU LoRA blocks for this model: True, False, "auto" (today's
        measured path until a GPU measures them) or None (the process setting; ``fastft.nn.fused_blocks``)."""
        value = fused_blocks.normalise(value)
        for layer in self.model.layers:
            layer.self_attn.fused_lora_blocks = value
            layer.mlp.fused_lora_blocks = value

    def tied_aliases(self):
        return {"lm_head.weight": "model.embed_tokens.weight"} if self.tie_word_embeddings else {}

    def tie_weights(self):
        if self.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def get_output_embeddings(self):
        return self.lm_head

    # --- forward ----------------------------------------------------------------------------------
    def _check_length(self, total: int, position_ids, derived: bool):
        """Positions < max_position_embeddings. ``derived``: the position ids were made here from the
        shapes / masks / cu_seqlens (all < ``total``), so the host-side ``total`` decides; the
        caller's own position ids are checked on their device (no host synchronisation)."""
        limit = self.config.max_position_embeddings
        if self.model.rotary_emb.kind == "dynamic":
            return  # dynamic NTK scaling exists to run past max_position_embeddings
        if total > limit and (derived or position_ids is None):
            raise ValueError(
                f"{self.model_type}: input of {total} positions is longer than max_position_embeddings={limit}"
            )
        if not derived and position_ids is not None and position_ids.numel():
            check_async(position_ids.max() < limit,
                        f"{self.model_type}: a position id is >= max_position_embeddings={limit}")

    def _check_window(self, longest: int):
        for i, w in enumerate(self.sliding_windows):
            if w is not None and longest > w:
                raise ValueError(
                    f"{self.model_type}: sequence of {longest} tokens exceeds sliding_window={w} (layer {i}); "
                    "sliding-window attention is not implemented"
                )

    def forward(self, input_ids, attention_mask=None, labels=None, position_ids=None, cu_seqlens=None,
                max_seqlen=None, num_items_in_batch=None, token_type_ids=None, past_key_values=None,
                logits_to_keep: int = 0, **kwargs):
        from transformers.modeling_outputs import CausalLMOutputWithPast

        if kwargs.get("inputs_embeds") is not None:
            raise ValueError("inputs_embeds is not supported; pass input_ids")
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, seq), got shape {tuple(input_ids.shape)}")
        B, T = input_ids.shape
        dev = input_ids.device
        cache = past_key_values if past_key_values is not None else kwargs.get("cache")
        past = cache.length if cache is not None else 0
        kpm = None
        derived = position_ids is None
        if (cu_seqlens is None and position_ids is not None and B == 1 and cache is None
                and attention_mask is None and T > 1):
            # transformers' packing convention (DataCollatorWithFlattening): one row whose
            # position ids restart at 0 at every document start, no cu_seqlens. The document starts
            # are data (one host synchronisation on a device; fastft's packing collator sends
            # cu_seqlens and max_seqlen instead, and then nothing here reads the device).
            starts = (position_ids[0] == 0).nonzero()[:, 0]
            if starts.numel() > 1 and int(starts[0]) == 0:
                cu_seqlens = torch.cat([starts, starts.new_tensor([T])])
        if cu_seqlens is not None:
            if B != 1:
                raise ValueError(f"packed batches (cu_seqlens) need input_ids of shape (1, total), got {(B, T)}")
            if cache is not None:
                raise ValueError("packed batches (cu_seqlens) cannot use a KV cache")
            if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
                raise ValueError(f"cu_seqlens must be 1-D with at least 2 entries, got shape {tuple(cu_seqlens.shape)}")
            # Validated where the tensors live: at once on the CPU, as device asserts on a GPU.
            if attention_mask is not None:
                check_async(attention_mask.to(torch.bool).all(),
                            "packed batches (cu_seqlens) cannot also carry padding in attention_mask")
            lens = cu_seqlens[1:] - cu_seqlens[:-1]
            check_async((cu_seqlens[0] == 0) & (cu_seqlens[-1] == T) & (lens >= 0).all(),
                        f"cu_seqlens must start at 0, be non-decreasing and end at total={T}")
            if max_seqlen is None:  # (fastft's packing collator sends it, computed on the host)
                top = host_value(lens.max())  # host offsets: free
                if top is None and any(w is not None for w in self.sliding_windows):
                    top = int(lens.max())  # the window check needs the exact value: one synchronisation
                max_seqlen = T if top is None else int(top)  # T: an upper bound is all the kernels need
            else:
                max_seqlen = int(max_seqlen)
                check_async(lens.max() <= max_seqlen,
                            f"a document of cu_seqlens is longer than max_seqlen={max_seqlen}")
            cu_seqlens = cu_seqlens.to(device=dev, dtype=torch.int32, non_blocking=True)
            lens = lens.to(device=dev, non_blocking=True)
            if position_ids is None:
                # positions restart at 0 in every document (output_size: no host synchronisation)
                starts = torch.repeat_interleave(cu_seqlens[:-1].long(), lens.long(), output_size=T)
                position_ids = (torch.arange(T, device=dev) - starts)[None]
            self._check_window(max_seqlen)
        else:
            if attention_mask is not None:
                if attention_mask.shape != (B, past + T):
                    raise ValueError(
                        f"attention_mask must be (batch, past + seq) = {(B, past + T)}, "
                        f"got {tuple(attention_mask.shape)}"
                    )
                am = attention_mask.to(torch.bool)
                # An all-ones mask is dropped (the kernels skip the masking) when that is known
                # without waiting for a device: a CPU mask, or inference (one read per call); a
                # training step on a GPU hands the kernels the mask as it is.
                if am.device.type == "cpu":
                    all_real = host_value(am.all())
                elif not torch.is_grad_enabled():
                    all_real = bool(am.all())
                else:
                    all_real = False
                if not all_real:
                    kpm = am
                if position_ids is None:
                    # left padding: real tokens count from 0 wherever they start
                    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)[:, past:]
            if position_ids is None:
                position_ids = torch.arange(past, past + T, device=dev)[None].expand(B, T)
            self._check_window(past + T)
        self._check_length(past + T, position_ids, derived)

        m = self.model
        h = m.embed_tokens(input_ids)
        seq_len = int(position_ids.max()) + 1 if m.rotary_emb.kind == "dynamic" else 0
        cos, sin = m.rotary_emb(position_ids, h.dtype, seq_len)
        for i, layer in enumerate(m.layers):
            if cache is None:
                h = self._run_block(i, layer, h, cos, sin, kpm, None, cu_seqlens, max_seqlen)
            else:
                h = layer(h, cos, sin, kpm, cache, None, None)
        if cache is not None:
            cache.length += T
        h = m.norm(h)
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        head = self.lm_head
        host_head = getattr(head, "host_resident", False)  # fastft.nn.offload.HostLinear: streamed from the host
        dense_head = type(getattr(head, "modules_to_save", head)) is nn.Linear or host_head  # (LoRA'd: full logits)
        if labels is not None and self.training and torch.is_grad_enabled() and not logits_to_keep and dense_head:
            # Training with labels: the loss is computed chunk by chunk from h and the lm_head weight
            # (and bias); the full (B, T, V) logits are never formed, and `.logits` is None.
            loss = chunked_causal_lm_loss(h, self.lm_head.weight, labels, num_items_in_batch, cu_seqlens,
                                          bias=self.lm_head.bias, stream_weight=True if host_head else None)
            return CausalLMOutputWithPast(loss=loss, logits=None)
        logits = self.lm_head(h)

        loss = None
        if labels is not None:
            loss = causal_lm_loss(logits, labels, num_items_in_batch, cu_seqlens)
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    def generate(self, input_ids, attention_mask=None, **kwargs):
        """Autoregressive decoding with a KV cache; see ``fastft.models.generation.generate``."""
        from .generation import generate

        return generate(self, input_ids, attention_mask=attention_mask, **kwargs)

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        return KVCache(self.config, batch, max_len, self.device, self.dtype)
