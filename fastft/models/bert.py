"""Native BERT-family masked LM (bert, roberta; MiniLM is a small bert) with transformers' paths.

Architecture (Devlin et al. 2019): word + absolute position + token-type embeddings -> LayerNorm
-> N x post-LN encoder layers [self-attention -> dense -> dropout -> LayerNorm(x + .) -> dense ->
GELU -> dense -> dropout -> LayerNorm(x + .)] -> MLM head [dense -> act -> LayerNorm -> decoder
tied to the word embeddings, + bias]. RoBERTa differs only in names (``roberta.``, ``lm_head``),
its position ids (counted from ``padding_idx + 1`` over non-pad tokens, as fairseq does) and a
head activation that is always GELU.

Attention is bidirectional through ``fastft.ops.attention`` with ``attention_mask`` as the key
padding mask (or ``attention_varlen`` for packed batches via ``cu_seqlens``); attention-probability
dropout from the config applies in training. A checkpoint without an MLM head (a bare BertModel
such as all-MiniLM-L6-v2) gets one initialised as transformers does (normal(0, initializer_range)
dense, LayerNorm 1/0, bias 0), decoder tied to the word embeddings. Checkpoint keys are accepted
with or without the ``bert.`` / ``roberta.`` prefix; a pooler, ``position_ids`` buffers and an NSP
head are ignored. Limits: absolute position embeddings only; encoder (not decoder) use only.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastft import ops
from fastft.ops.argcheck import check_async, host_value

from .base import NativeModel, attention_inputs


def _gelu_tanh(x):
    return F.gelu(x, approximate="tanh")


# "gelu" is the exact erf form: fastft.ops.gelu (Triton on CUDA, F.gelu elsewhere).
ACTIVATIONS = {"gelu": ops.gelu, "gelu_new": _gelu_tanh, "gelu_pytorch_tanh": _gelu_tanh, "gelu_fast": _gelu_tanh,
               "relu": F.relu, "silu": F.silu, "swish": F.silu}


def _act(config, name=None):
    a = name or config.hidden_act
    if a not in ACTIVATIONS:
        raise ValueError(f"{config.model_type}: hidden_act {a!r} is not supported (supported: {list(ACTIVATIONS)})")
    return ACTIVATIONS[a]


class LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` (same parameters, state dict and isinstance) run through
    ``fastft.ops.layer_norm`` (Triton on CUDA, F.layer_norm elsewhere)."""

    def forward(self, x):
        return ops.layer_norm(x, self.weight, self.bias, self.eps)


class BertEmbeddings(nn.Module):
    def __init__(self, config):
        super().__init__()
        pad = config.pad_token_id
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=pad)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size,
                                                padding_idx=pad if config.model_type == "roberta" else None)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids, token_type_ids, position_ids):
        e = self.word_embeddings(input_ids) + self.position_embeddings(position_ids)
        e = e + self.token_type_embeddings(token_type_ids)
        return self.dropout(self.LayerNorm(e))


class BertSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        h, n = config.hidden_size, config.num_attention_heads
        if h % n:
            raise ValueError(f"{config.model_type}: hidden_size {h} is not a multiple of num_attention_heads {n}")
        self.num_heads, self.head_dim = n, h // n
        self.query = nn.Linear(h, h)
        self.key = nn.Linear(h, h)
        self.value = nn.Linear(h, h)
        self.dropout_p = float(config.attention_probs_dropout_prob or 0.0)

    def forward(self, x, key_padding_mask=None, cu_seqlens=None, max_seqlen=None):
        B, T, _ = x.shape
        shape = (B, T, self.num_heads, self.head_dim)
        q, k, v = self.query(x).view(shape), self.key(x).view(shape), self.value(x).view(shape)
        p = self.dropout_p if self.training else 0.0
        q, k, v = attention_inputs(q, k, v)
        if cu_seqlens is not None:
            out = ops.attention_varlen(q[0], k[0], v[0], cu_seqlens, max_seqlen, causal=False, dropout_p=p)
            return out.reshape(B, T, -1)
        out = ops.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=False,
                            key_padding_mask=key_padding_mask, dropout_p=p)
        return out.transpose(1, 2).reshape(B, T, -1)


class BertSelfOutput(nn.Module):
    """dense -> dropout -> LayerNorm(residual + .): the post-LN residual (also BertOutput's shape)."""

    def __init__(self, config, d_in):
        super().__init__()
        self.dense = nn.Linear(d_in, config.hidden_size)
        self.LayerNorm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, h, residual):
        return self.LayerNorm(self.dropout(self.dense(h)) + residual)


class BertAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.self = BertSelfAttention(config)
        self.output = BertSelfOutput(config, config.hidden_size)

    def forward(self, x, key_padding_mask=None, cu_seqlens=None, max_seqlen=None):
        return self.output(self.self(x, key_padding_mask, cu_seqlens, max_seqlen), x)


class BertIntermediate(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = _act(config)

    def forward(self, x):
        return self.act(self.dense(x))


class BertLayer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.attention = BertAttention(config)
        self.intermediate = BertIntermediate(config)
        self.output = BertSelfOutput(config, config.intermediate_size)

    def forward(self, x, key_padding_mask=None, cu_seqlens=None, max_seqlen=None):
        a = self.attention(x, key_padding_mask, cu_seqlens, max_seqlen)
        return self.output(self.intermediate(a), a)


class BertEncoder(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(config) for _ in range(config.num_hidden_layers))


class BertModel(nn.Module):
    """The encoder without a head: ``embeddings`` + ``encoder`` (paths as transformers' BertModel)."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)


class BertPredictionHeadTransform(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.act = _act(config)
        self.LayerNorm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x):
        return self.LayerNorm(self.act(self.dense(x)))


class BertLMPredictionHead(nn.Module):
    """``cls.predictions``: transform, then the decoder whose weight is the word embedding."""

    def __init__(self, config):
        super().__init__()
        self.transform = BertPredictionHeadTransform(config)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))
        self.decoder.bias = self.bias

    def features(self, x):
        """The decoder's input."""
        return self.transform(x)

    def forward(self, x):
        return self.decoder(self.features(x))


class BertOnlyMLMHead(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.predictions = BertLMPredictionHead(config)

    def forward(self, x):
        return self.predictions(x)


class RobertaLMHead(nn.Module):
    """``lm_head``: dense -> GELU -> layer_norm -> decoder (tied) + bias."""

    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.layer_norm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))
        self.decoder.bias = self.bias

    def features(self, x):
        """The decoder's input."""
        return self.layer_norm(ops.gelu(self.dense(x)))

    def forward(self, x):
        return self.decoder(self.features(x))


_EMB_TABLE = ("embeddings.word_embeddings.weight", "embeddings.position_embeddings.weight",
              "embeddings.token_type_embeddings.weight", "embeddings.LayerNorm.weight", "embeddings.LayerNorm.bias")
_LAYER_LINEARS = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
                  "intermediate.dense", "output.dense")
_LAYER_NORMS = ("attention.output.LayerNorm", "output.LayerNorm")
_HEAD = {
    "bert": ("cls.predictions.transform.dense.weight", "cls.predictions.transform.dense.bias",
             "cls.predictions.transform.LayerNorm.weight", "cls.predictions.transform.LayerNorm.bias",
             "cls.predictions.bias"),
    "roberta": ("lm_head.dense.weight", "lm_head.dense.bias", "lm_head.layer_norm.weight", "lm_head.layer_norm.bias",
                "lm_head.bias"),
}


class BertEncoderBase(NativeModel):
    """What every BERT-family model shares: the encoder (``bert.`` / ``roberta.`` + embeddings +
    layers), its checkpoint names, positions and ``encode``. Heads subclass it (``BertForMaskedLM``
    here; classification, token classification and sentence embeddings in ``heads.py``)."""

    def _init_encoder(self, config, name: str):
        mt = config.model_type
        if mt not in _HEAD:
            raise ValueError(f"{name}: unsupported model_type {mt!r}")
        pe = getattr(config, "position_embedding_type", "absolute") or "absolute"
        if pe != "absolute":
            raise ValueError(f"{mt}: position_embedding_type {pe!r} is not supported (only 'absolute')")
        if getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False):
            raise ValueError(f"{mt}: decoder / cross-attention configurations are not supported")
        self.base_name = "bert" if mt == "bert" else "roberta"
        setattr(self, self.base_name, BertModel(config))

    @property
    def base_model_(self) -> BertModel:
        return getattr(self, self.base_name)

    @staticmethod
    def _prefix(config) -> str:
        return "bert." if config.model_type == "bert" else "roberta."

    @classmethod
    def key_prefix(cls, config) -> str:
        return cls._prefix(config)

    @classmethod
    def encoder_table(cls, config) -> list[str]:
        """Checkpoint names of the embeddings and the encoder layers (no head)."""
        p = cls.key_prefix(config)
        names = [p + n for n in _EMB_TABLE]
        for i in range(config.num_hidden_layers):
            for lin in _LAYER_LINEARS:
                names += [f"{p}encoder.layer.{i}.{lin}.weight", f"{p}encoder.layer.{i}.{lin}.bias"]
            for ln in _LAYER_NORMS:
                names += [f"{p}encoder.layer.{i}.{ln}.weight", f"{p}encoder.layer.{i}.{ln}.bias"]
        return names

    @classmethod
    def checkpoint_aliases(cls, name):
        al = []
        # Original Google/TF-converted checkpoints name LayerNorm parameters gamma / beta.
        if ".LayerNorm.weight" in name:
            al.append(name.replace(".LayerNorm.weight", ".LayerNorm.gamma"))
        if ".LayerNorm.bias" in name:
            al.append(name.replace(".LayerNorm.bias", ".LayerNorm.beta"))
        # The head bias is shared with the decoder; transformers may store either name.
        if name in ("cls.predictions.bias", "lm_head.bias"):
            al.append(name.replace(".bias", ".decoder.bias"))
        return tuple(al)

    @classmethod
    def quant_targets(cls, config):
        p = cls.key_prefix(config)
        return [f"{p}encoder.layer.{i}.{lin}" for i in range(config.num_hidden_layers) for lin in _LAYER_LINEARS]

    def get_input_embeddings(self):
        return self.base_model_.embeddings.word_embeddings

    # --- forward ----------------------------------------------------------------------------------
    def _positions(self, input_ids, position_ids, cu_seqlens):
        B, T = input_ids.shape
        dev = input_ids.device
        roberta = self.base_name == "roberta"
        pad = self.config.pad_token_id
        derived = position_ids is None
        if position_ids is None:
            if cu_seqlens is not None:
                lens = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
                starts = torch.repeat_interleave(cu_seqlens[:-1].long(), lens, output_size=T)  # no host sync
                position_ids = (torch.arange(T, device=dev) - starts)[None]
                if roberta:
                    position_ids = position_ids + pad + 1
            elif roberta:
                # fairseq: non-pad tokens count from padding_idx + 1, pads sit at padding_idx
                m = input_ids.ne(pad).long()
                position_ids = m.cumsum(1) * m + pad
            else:
                position_ids = torch.arange(T, device=dev)[None].expand(B, T)
        limit = self.config.max_position_embeddings
        if derived and T + (pad + 1 if roberta else 0) <= limit:
            return position_ids  # every derived position is below that host-side bound
        if not position_ids.numel():
            return position_ids
        top = host_value(position_ids.max())  # None on a device: checked there, no host synchronisation
        if top is None:
            check_async(position_ids.max() < limit,
                        f"{self.model_type}: a position id is >= max_position_embeddings={limit}")
        elif top + 1 > limit:
            raise ValueError(
                f"{self.model_type}: input needs position {top} but max_position_embeddings={limit} "
                f"(sequence of {T} tokens is too long)"
            )
        return position_ids

    def encode(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, cu_seqlens=None,
               max_seqlen=None, output_hidden_states=False):
        """Last hidden state (B, T, H) of the encoder (and all layers' outputs if asked)."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, seq), got shape {tuple(input_ids.shape)}")
        B, T = input_ids.shape
        kpm = None
        if cu_seqlens is not None:
            if B != 1:
                raise ValueError(f"packed batches (cu_seqlens) need input_ids of shape (1, total), got {(B, T)}")
            if max_seqlen is None:
                # the collator's host value normally; else exact from host offsets, or T as the bound
                top = host_value((cu_seqlens[1:] - cu_seqlens[:-1]).max())
                max_seqlen = T if top is None else int(top)
            cu_seqlens = cu_seqlens.to(device=input_ids.device, dtype=torch.int32, non_blocking=True)
        elif attention_mask is not None:
            if attention_mask.shape != (B, T):
                raise ValueError(f"attention_mask must be {(B, T)}, got {tuple(attention_mask.shape)}")
            am = attention_mask.to(torch.bool)
            # dropped when all ones, if that is known without waiting for a device (as in llama.py)
            if am.device.type == "cpu":
                all_real = host_value(am.all())
            elif not torch.is_grad_enabled():
                all_real = bool(am.all())
            else:
                all_real = False
            kpm = None if all_real else am
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        position_ids = self._positions(input_ids, position_ids, cu_seqlens)
        base = self.base_model_
        h = base.embeddings(input_ids, token_type_ids, position_ids)
        states = [h]
        for i, layer in enumerate(base.encoder.layer):
            h = self._run_block(i, layer, h, kpm, cu_seqlens, max_seqlen)
            states.append(h)
        return h, (tuple(states) if output_hidden_states else None)


class BertForMaskedLM(BertEncoderBase):
    """BERT / RoBERTa masked LM. ``forward`` returns ``MaskedLMOutput`` (labels unshifted)."""

    def __init__(self, config):
        super().__init__(config)
        self._init_encoder(config, "BertForMaskedLM")
        mt = config.model_type
        if mt == "bert":
            self.cls = BertOnlyMLMHead(config)
        else:
            self.lm_head = RobertaLMHead(config)
        # The decoder is tied to the word embeddings unless the config unties it.
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", True))
        self.tie_weights()

    @property
    def head(self):
        return self.cls.predictions if self.base_name == "bert" else self.lm_head

    @property
    def hf_architecture(self) -> str:
        return "BertForMaskedLM" if self.base_name == "bert" else "RobertaForMaskedLM"

    # --- checkpoint table -------------------------------------------------------------------------
    @classmethod
    def _decoder_name(cls, config):
        return "cls.predictions.decoder.weight" if config.model_type == "bert" else "lm_head.decoder.weight"

    @classmethod
    def weight_table(cls, config) -> list[str]:
        names = cls.encoder_table(config) + list(_HEAD[config.model_type])
        if not getattr(config, "tie_word_embeddings", True):
            names.append(cls._decoder_name(config))
        return names

    @classmethod
    def optional_groups(cls, config):
        head = list(_HEAD[config.model_type])
        if not getattr(config, "tie_word_embeddings", True):
            head.append(cls._decoder_name(config))
        return {"mlm_head": head}

    @classmethod
    def ignored_checkpoint_keys(cls, config):
        p = r"(bert\.|roberta\.)?"
        ign = (p + r"embeddings\.position_ids", p + r"embeddings\.token_type_ids", p + r"pooler\.dense\.(weight|bias)",
               r"cls\.seq_relationship\.(weight|bias)")
        if getattr(config, "tie_word_embeddings", True):
            ign += (r"cls\.predictions\.decoder\.weight", r"lm_head\.decoder\.weight")
        return ign

    def init_missing(self, group, device, dtype):
        """Initialise an absent MLM head the way transformers' ``_init_weights`` does."""
        assert group == "mlm_head", group
        self.mlm_head_initialised = True  # random: masked-token predictions mean nothing until trained
        std = self.config.initializer_range
        h = self.head
        dense = h.transform.dense if self.base_name == "bert" else h.dense
        norm = h.transform.LayerNorm if self.base_name == "bert" else h.layer_norm
        dense.weight = nn.Parameter(torch.empty(dense.weight.shape, device=device, dtype=dtype).normal_(0.0, std))
        dense.bias = nn.Parameter(torch.zeros(dense.bias.shape, device=device, dtype=dtype))
        norm.weight = nn.Parameter(torch.ones(norm.weight.shape, device=device, dtype=dtype))
        norm.bias = nn.Parameter(torch.zeros(norm.bias.shape, device=device, dtype=dtype))
        h.bias = nn.Parameter(torch.zeros(h.bias.shape, device=device, dtype=dtype))
        if not self.tie_word_embeddings:
            w = torch.empty(h.decoder.weight.shape, device=device, dtype=dtype).normal_(0.0, std)
            h.decoder.weight = nn.Parameter(w)

    def tied_aliases(self):
        head = "cls.predictions." if self.base_name == "bert" else "lm_head."
        al = {head + "decoder.bias": head + "bias"}
        if self.tie_word_embeddings:
            al[head + "decoder.weight"] = f"{self.base_name}.embeddings.word_embeddings.weight"
        return al

    def tie_weights(self):
        h = self.head
        h.decoder.bias = h.bias
        if self.tie_word_embeddings:
            h.decoder.weight = self.base_model_.embeddings.word_embeddings.weight

    def get_output_embeddings(self):
        return self.head.decoder

    # --- forward ----------------------------------------------------------------------------------
    def forward(self, input_ids, attention_mask=None, labels=None, position_ids=None, cu_seqlens=None,
                max_seqlen=None, num_items_in_batch=None, token_type_ids=None, output_hidden_states=False, **kwargs):
        from transformers.modeling_outputs import MaskedLMOutput

        if labels is not None and labels.shape != input_ids.shape:
            raise ValueError(f"labels shape {tuple(labels.shape)} does not match input_ids {tuple(input_ids.shape)}")
        h, states = self.encode(input_ids, attention_mask, token_type_ids, position_ids, cu_seqlens, max_seqlen,
                                output_hidden_states)
        decoder = self.head.decoder
        if labels is not None and self.training and torch.is_grad_enabled() and type(decoder) is nn.Linear:
            # Training with labels: the decoder and its cross-entropy in chunks
            # (fastft.ops.linear_cross_entropy); the (B, T, V) logits are never formed, `.logits` is None.
            logits = None
            total = ops.linear_cross_entropy(self.head.features(h), decoder.weight, labels.to(h.device),
                                             reduction="sum", bias=decoder.bias)
        else:
            logits = self.head(h)
        loss = None
        if labels is not None:
            if logits is not None:
                total = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                        ignore_index=-100, reduction="sum")
            denom = num_items_in_batch if num_items_in_batch is not None else (labels != -100).sum()
            if isinstance(denom, torch.Tensor):
                loss = total / denom.to(total.device).clamp_min(1)
            else:
                loss = total / max(denom, 1)
        return MaskedLMOutput(loss=loss, logits=logits, hidden_states=states)


__all__ = ["BertEncoderBase", "BertForMaskedLM", "BertModel", "LayerNorm"]
