"""Task heads on the native models: sequence classification, token classification (NER) and
sentence embeddings for the BERT family, sequence classification for the Llama family.

Each class keeps transformers' module paths and checkpoint names, so a full fine-tune saved with
``save_pretrained`` loads in ``AutoModelForSequenceClassification`` / ``AutoModelForTokenClassification``
/ ``AutoModel`` and a LoRA adapter (head in ``modules_to_save``, as PEFT's SEQ_CLS / TOKEN_CLS task
types do) loads with ``peft.PeftModel`` -- giving the same predictions (tests/test_tasks.py).

- ``BertForSequenceClassification`` (``task="classify"``). ``pooling="cls"`` is transformers'
  computation: bert -- the pooler (dense + tanh on [CLS]) -> dropout -> ``classifier``; roberta --
  ``classifier.dense`` -> tanh -> ``classifier.out_proj`` on <s>. ``pooling="mean"`` -- the mean of
  the last hidden states over real tokens -> dropout -> ``classifier`` (a Linear); transformers has
  no such class, so a mean-pooled classifier is read back by fastft only (``config.fastft_pooling``).
- ``BertForTokenClassification`` (``task="ner"``): dropout -> ``classifier`` on every token.
- ``BertForSentenceEmbedding`` (``task="embed"``): the bare encoder, laid out as transformers'
  ``BertModel`` (``embeddings.*``, ``encoder.*`` with no ``bert.`` prefix, as sentence-transformers
  checkpoints store it), mean pooling over real tokens, L2-normalised. With ``positive_input_ids``
  the loss is the in-batch-negatives contrastive loss (InfoNCE, "multiple negatives ranking"):
  for query i the candidates are every positive of the batch (and every hard negative given as
  ``negative_input_ids``), scores are ``scale`` x cosine similarity (``config.fastft_scale``,
  default 20), the target is positive i.
- ``LlamaForSequenceClassification``: the decoder, ``score`` (no bias) on every position, logits
  taken at the last token that is not ``pad_token_id`` (transformers' rule: pad_token_id must be
  set in the config for batches > 1).

Losses are sums over the targets divided by ``num_items_in_batch`` (else their count), like the LM
heads, so gradient accumulation is exact (``fastft.Trainer``). A head absent from the checkpoint
(a base model) is initialised as transformers does: normal(0, initializer_range) weights, zero bias.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .bert import BertEmbeddings, BertEncoder, BertEncoderBase
from .llama import LlamaForCausalLM

TASKS = ("classify", "ner", "embed")
POOLINGS = ("cls", "mean")
# transformers architecture name -> (family, task): a saved task model loads back as that task.
ARCHITECTURE_TASKS = {
    "BertForSequenceClassification": ("bert", "classify"), "RobertaForSequenceClassification": ("bert", "classify"),
    "BertForTokenClassification": ("bert", "ner"), "RobertaForTokenClassification": ("bert", "ner"),
    "LlamaForSequenceClassification": ("llama", "classify"), "MistralForSequenceClassification": ("llama", "classify"),
    "Qwen2ForSequenceClassification": ("llama", "classify"),
}
_BERT_BUFFERS = (r"(bert\.|roberta\.)?embeddings\.position_ids", r"(bert\.|roberta\.)?embeddings\.token_type_ids")
_MLM_HEADS = (r"cls\.predictions\..*", r"cls\.seq_relationship\..*", r"lm_head\..*")


def set_labels(config, labels) -> None:
    """Write ``labels`` (a list of names) into ``config.id2label`` / ``label2id`` / ``num_labels``."""
    labels = [str(x) for x in labels]
    if len(labels) < 2:
        raise ValueError(f"a classifier needs at least 2 labels, got {labels}")
    if len(set(labels)) != len(labels):
        raise ValueError(f"duplicate label names in {labels}")
    config.id2label = {i: n for i, n in enumerate(labels)}
    config.label2id = {n: i for i, n in enumerate(labels)}


def label_names(config) -> list[str]:
    return [config.id2label[i] for i in range(config.num_labels)]


def mean_pool(h: torch.Tensor, attention_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Mean of ``h`` (B, T, H) over the positions where ``attention_mask`` is 1 (fp32 sums)."""
    if attention_mask is None:
        return h.float().mean(1).to(h.dtype)
    m = attention_mask.to(torch.float32).unsqueeze(-1)
    return ((h.float() * m).sum(1) / m.sum(1).clamp_min(1e-9)).to(h.dtype)


def _normal_linear(linear: nn.Linear, std: float, device, dtype) -> None:
    linear.weight = nn.Parameter(torch.empty(linear.weight.shape, device=device, dtype=dtype).normal_(0.0, std))
    if linear.bias is not None:
        linear.bias = nn.Parameter(torch.zeros(linear.bias.shape, device=device, dtype=dtype))


def _sum_loss(total: torch.Tensor, count, num_items_in_batch):
    denom = num_items_in_batch if num_items_in_batch is not None else count
    if isinstance(denom, torch.Tensor):
        return total / denom.to(total.device).clamp_min(1)
    return total / max(int(denom), 1)


def _classification_loss(logits, labels, num_items_in_batch):
    logits2 = logits.float().reshape(-1, logits.shape[-1])
    labels1 = labels.reshape(-1).to(logits.device)
    total = F.cross_entropy(logits2, labels1, ignore_index=-100, reduction="sum")
    return _sum_loss(total, (labels1 != -100).sum(), num_items_in_batch)


def _dropout_p(config) -> float:
    p = getattr(config, "classifier_dropout", None)
    return float(config.hidden_dropout_prob if p is None else p)


class BertPooler(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, h):
        return torch.tanh(self.dense(h[:, 0]))


class RobertaClassificationHead(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout = nn.Dropout(_dropout_p(config))
        self.out_proj = nn.Linear(config.hidden_size, config.num_labels)

    def forward(self, x):
        return self.out_proj(self.dropout(torch.tanh(self.dense(self.dropout(x)))))


class _BertTask(BertEncoderBase):
    task: str = ""
    #: the loss follows the num_items_in_batch convention (fastft.Trainer passes it)
    fastft_task = True

    @classmethod
    def ignored_checkpoint_keys(cls, config):
        return _BERT_BUFFERS + _MLM_HEADS

    def get_output_embeddings(self):
        return None

    def tie_weights(self):
        pass


class BertForSequenceClassification(_BertTask):
    """Sequence classification on a BERT / RoBERTa encoder (see the module doc for the pooling)."""

    task = "classify"

    def __init__(self, config):
        super().__init__(config)
        self._init_encoder(config, "BertForSequenceClassification")
        self.pooling = getattr(config, "fastft_pooling", None) or "cls"
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if config.num_labels < 2:
            raise ValueError(f"sequence classification needs num_labels >= 2, got {config.num_labels}")
        roberta_cls = self.base_name == "roberta" and self.pooling == "cls"
        if self.base_name == "bert" and self.pooling == "cls":
            self.bert.pooler = BertPooler(config)
        self.dropout = nn.Dropout(0.0 if roberta_cls else _dropout_p(config))
        self.classifier = (RobertaClassificationHead(config) if roberta_cls
                           else nn.Linear(config.hidden_size, config.num_labels))

    @property
    def hf_architecture(self) -> str:
        return "BertForSequenceClassification" if self.base_name == "bert" else "RobertaForSequenceClassification"

    @classmethod
    def _head_table(cls, config):
        pooling = getattr(config, "fastft_pooling", None) or "cls"
        if config.model_type == "roberta" and pooling == "cls":
            head = ["classifier.dense.weight", "classifier.dense.bias", "classifier.out_proj.weight",
                    "classifier.out_proj.bias"]
        else:
            head = ["classifier.weight", "classifier.bias"]
        pooler = ["bert.pooler.dense.weight", "bert.pooler.dense.bias"] if (
            config.model_type == "bert" and pooling == "cls") else []
        return pooler, head

    @classmethod
    def weight_table(cls, config):
        pooler, head = cls._head_table(config)
        return cls.encoder_table(config) + pooler + head

    @classmethod
    def optional_groups(cls, config):
        pooler, head = cls._head_table(config)
        return {"classifier": head, **({"pooler": pooler} if pooler else {})}

    @classmethod
    def ignored_checkpoint_keys(cls, config):
        ign = super().ignored_checkpoint_keys(config)
        if not cls._head_table(config)[0]:
            ign += (r"(bert\.|roberta\.)?pooler\.dense\.(weight|bias)",)
        return ign

    def init_missing(self, group, device, dtype):
        std = self.config.initializer_range
        if group == "pooler":
            self.pooler_initialised = True
            _normal_linear(self.bert.pooler.dense, std, device, dtype)
        else:
            mods = [m for m in self.classifier.modules() if isinstance(m, nn.Linear)]
            for m in mods:
                _normal_linear(m, std, device, dtype)

    def save_pretrained(self, save_directory, **kwargs):
        if self.pooling == "mean":
            import warnings

            warnings.warn("a mean-pooled classifier is saved with fastft_pooling='mean': fastft.from_pretrained "
                          "reads it back; transformers' BertForSequenceClassification would pool with [CLS] "
                          "instead and predict differently", stacklevel=2)
        return super().save_pretrained(save_directory, **kwargs)

    def pooled(self, h, attention_mask):
        if self.pooling == "mean":
            return mean_pool(h, attention_mask)
        if self.base_name == "bert":
            return self.bert.pooler(h)
        return h[:, 0]

    def forward(self, input_ids, attention_mask=None, labels=None, token_type_ids=None, position_ids=None,
                num_items_in_batch=None, output_hidden_states=False, **kwargs):
        from transformers.modeling_outputs import SequenceClassifierOutput

        h, states = self.encode(input_ids, attention_mask, token_type_ids, position_ids,
                                output_hidden_states=output_hidden_states)
        logits = self.classifier(self.dropout(self.pooled(h, attention_mask)))
        loss = None
        if labels is not None:
            if labels.shape != (input_ids.shape[0],):
                raise ValueError(f"labels must be ({input_ids.shape[0]},) class ids, got {tuple(labels.shape)}")
            loss = _classification_loss(logits, labels, num_items_in_batch)
        return SequenceClassifierOutput(loss=loss, logits=logits, hidden_states=states)


class BertForTokenClassification(_BertTask):
    """Per-token classification (NER): dropout -> ``classifier`` on the last hidden states."""

    task = "ner"

    def __init__(self, config):
        super().__init__(config)
        self._init_encoder(config, "BertForTokenClassification")
        if config.num_labels < 2:
            raise ValueError(f"token classification needs num_labels >= 2, got {config.num_labels}")
        self.dropout = nn.Dropout(_dropout_p(config))
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)

    @property
    def hf_architecture(self) -> str:
        return "BertForTokenClassification" if self.base_name == "bert" else "RobertaForTokenClassification"

    @classmethod
    def weight_table(cls, config):
        return cls.encoder_table(config) + ["classifier.weight", "classifier.bias"]

    @classmethod
    def optional_groups(cls, config):
        return {"classifier": ["classifier.weight", "classifier.bias"]}

    @classmethod
    def ignored_checkpoint_keys(cls, config):
        return super().ignored_checkpoint_keys(config) + (r"(bert\.|roberta\.)?pooler\.dense\.(weight|bias)",)

    def init_missing(self, group, device, dtype):
        _normal_linear(self.classifier, self.config.initializer_range, device, dtype)

    def forward(self, input_ids, attention_mask=None, labels=None, token_type_ids=None, position_ids=None,
                num_items_in_batch=None, output_hidden_states=False, **kwargs):
        from transformers.modeling_outputs import TokenClassifierOutput

        h, states = self.encode(input_ids, attention_mask, token_type_ids, position_ids,
                                output_hidden_states=output_hidden_states)
        logits = self.classifier(self.dropout(h))
        loss = None
        if labels is not None:
            if labels.shape != input_ids.shape:
                raise ValueError(f"labels shape {tuple(labels.shape)} does not match input_ids {tuple(input_ids.shape)}")
            loss = _classification_loss(logits, labels, num_items_in_batch)
        return TokenClassifierOutput(loss=loss, logits=logits, hidden_states=states)


def _embedding_output_class():
    from transformers.utils import ModelOutput

    @dataclass
    class EmbeddingOutput(ModelOutput):
        loss: Optional[torch.Tensor] = None
        embeddings: Optional[torch.Tensor] = None  # (B, H), L2-normalised
        scores: Optional[torch.Tensor] = None  # (B, candidates) scaled cosine similarities, when trained

    return EmbeddingOutput


_EMBEDDING_OUTPUT = None


class BertForSentenceEmbedding(BertEncoderBase):
    """Sentence embeddings: mean pooling, L2 normalisation, in-batch-negatives contrastive loss."""

    task = "embed"
    fastft_task = True

    def __init__(self, config):
        super().__init__(config)
        mt = config.model_type
        # Same checks as the other heads, then the encoder at the top level (BertModel's layout).
        self._init_encoder(config, "BertForSentenceEmbedding")
        delattr(self, self.base_name)
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)
        self.scale = float(getattr(config, "fastft_scale", None) or 20.0)
        assert mt in ("bert", "roberta")

    @property
    def base_model_(self):
        return self

    @property
    def hf_architecture(self) -> str:
        return "BertModel" if self.base_name == "bert" else "RobertaModel"

    @classmethod
    def key_prefix(cls, config) -> str:
        return ""

    @classmethod
    def weight_table(cls, config):
        return cls.encoder_table(config)

    @classmethod
    def checkpoint_aliases(cls, name):
        forms = (name,) + tuple(super().checkpoint_aliases(name))
        # A masked-LM / classifier checkpoint stores the encoder under its base prefix.
        return forms[1:] + tuple(p + f for p in ("bert.", "roberta.") for f in forms)

    @classmethod
    def ignored_checkpoint_keys(cls, config):
        return _BERT_BUFFERS + _MLM_HEADS + (r"(bert\.|roberta\.)?pooler\.dense\.(weight|bias)", r"classifier\..*")

    def get_output_embeddings(self):
        return None

    def embed(self, input_ids, attention_mask=None, token_type_ids=None):
        """L2-normalised mean-pooled embeddings (B, H) in fp32."""
        h, _ = self.encode(input_ids, attention_mask, token_type_ids)
        return F.normalize(mean_pool(h, attention_mask).float(), dim=-1)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, positive_input_ids=None,
                positive_attention_mask=None, negative_input_ids=None, negative_attention_mask=None,
                num_items_in_batch=None, **kwargs):
        global _EMBEDDING_OUTPUT
        if _EMBEDDING_OUTPUT is None:
            _EMBEDDING_OUTPUT = _embedding_output_class()
        q = self.embed(input_ids, attention_mask, token_type_ids)
        if positive_input_ids is None:
            return _EMBEDDING_OUTPUT(embeddings=q)
        if positive_input_ids.shape[0] != q.shape[0]:
            raise ValueError(f"{q.shape[0]} queries but {positive_input_ids.shape[0]} positives")
        cands = [self.embed(positive_input_ids, positive_attention_mask)]
        if negative_input_ids is not None:
            cands.append(self.embed(negative_input_ids, negative_attention_mask))
        scores = self.scale * q @ torch.cat(cands).T
        target = torch.arange(q.shape[0], device=q.device)
        total = F.cross_entropy(scores, target, reduction="sum")
        return _EMBEDDING_OUTPUT(loss=_sum_loss(total, q.shape[0], num_items_in_batch), embeddings=q, scores=scores)


class LlamaForSequenceClassification(LlamaForCausalLM):
    """Llama / Mistral / Qwen2 sequence classifier: ``score`` at the last non-pad token."""

    task = "classify"
    fastft_task = True

    def __init__(self, config):
        if config.num_labels < 2:
            raise ValueError(f"sequence classification needs num_labels >= 2, got {config.num_labels}")
        super().__init__(config)
        del self.lm_head  # the causal forward runs `score` where it would run the LM head
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=False)

    @property
    def lm_head(self):
        return self.score

    @property
    def hf_architecture(self) -> str:
        return {"llama": "LlamaForSequenceClassification", "mistral": "MistralForSequenceClassification",
                "qwen2": "Qwen2ForSequenceClassification"}[self.model_type]

    @classmethod
    def weight_table(cls, config):
        return [n for n in super().weight_table(config) if n != "lm_head.weight"] + ["score.weight"]

    @classmethod
    def optional_groups(cls, config):
        return {"score": ["score.weight"]}

    @classmethod
    def ignored_checkpoint_keys(cls, config):
        return super().ignored_checkpoint_keys(config) + (r"lm_head\.weight",)

    def init_missing(self, group, device, dtype):
        _normal_linear(self.score, self.config.initializer_range, device, dtype)

    def tied_aliases(self):
        return {}

    def tie_weights(self):
        pass

    def get_output_embeddings(self):
        return None

    def last_token_index(self, input_ids):
        pad = self.config.pad_token_id
        B, T = input_ids.shape
        if pad is None:
            if B != 1:
                raise ValueError("sequence classification of batches > 1 needs config.pad_token_id "
                                 "(the last non-pad token is classified)")
            return torch.full((1,), T - 1, dtype=torch.long, device=input_ids.device)
        non_pad = (input_ids != pad).to(torch.int32)
        return (torch.arange(T, device=input_ids.device, dtype=torch.int32) * non_pad).argmax(-1)

    def forward(self, input_ids, attention_mask=None, labels=None, position_ids=None, num_items_in_batch=None,
                **kwargs):
        from transformers.modeling_outputs import SequenceClassifierOutputWithPast

        out = super().forward(input_ids, attention_mask=attention_mask, position_ids=position_ids, labels=None)
        idx = self.last_token_index(input_ids)
        logits = out.logits[torch.arange(input_ids.shape[0], device=idx.device), idx]
        loss = None
        if labels is not None:
            if labels.shape != (input_ids.shape[0],):
                raise ValueError(f"labels must be ({input_ids.shape[0]},) class ids, got {tuple(labels.shape)}")
            loss = _classification_loss(logits, labels, num_items_in_batch)
        return SequenceClassifierOutputWithPast(loss=loss, logits=logits)

    def generate(self, *args, **kwargs):
        raise TypeError("a sequence classifier does not generate text")


def task_class(family: str, task: str):
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if family == "llama":
        if task != "classify":
            raise ValueError(f"task {task!r} is implemented for the BERT family only (Llama: 'classify')")
        return LlamaForSequenceClassification
    return {"classify": BertForSequenceClassification, "ner": BertForTokenClassification,
            "embed": BertForSentenceEmbedding}[task]


def default_modules_to_save(model) -> list[str]:
    """The head a LoRA / adapter run trains fully (PEFT's ``modules_to_save``): the classifier (and
    a BERT pooler the checkpoint did not have, which is as untrained as the classifier)."""
    inner = model
    task = getattr(inner, "task", None)
    if task is None or task == "embed":
        return []
    if isinstance(inner, LlamaForSequenceClassification):
        return ["score"]
    mts = ["classifier"]
    if getattr(inner, "pooler_initialised", False):
        mts.append("pooler")
    return mts


__all__ = ["BertForSequenceClassification", "BertForTokenClassification", "BertForSentenceEmbedding",
           "LlamaForSequenceClassification", "TASKS", "POOLINGS", "ARCHITECTURE_TASKS", "task_class", "set_labels",
           "label_names", "mean_pool", "default_modules_to_save"]
