"""GGUF for llama.cpp-family runtimes (llama.cpp, Ollama, LM Studio): names, layouts, q8_0, metadata.

What llama.cpp expects, checked against its converter (``convert_hf_to_gguf.py``: ``LlamaModel``,
``Qwen2Model``, ``TextModel.prepare_tensors``, ``get_vocab_base``) and loader
(``src/llama-model.cpp`` ``load_hparams``, ``src/llama-vocab.cpp``):

- **Architectures.** transformers ``llama`` and ``mistral`` are GGUF ``llama`` (Mistral without a
  sliding window is Llama); ``qwen2`` is GGUF ``qwen2`` (q/k/v biases, NeoX RoPE).
- **Tensor names** (``TENSOR_NAMES`` in gguf-py): ``token_embd``, ``blk.{i}.attn_norm``,
  ``attn_q|k|v|output``, ``ffn_norm``, ``ffn_gate|up|down``, ``output_norm``, ``output``; biases
  as ``.bias``. With tied embeddings there is no ``output``: llama.cpp reuses ``token_embd``.
  Shapes are written in ggml order (fastest dimension first), i.e. a (out, in) weight is ne=[in, out].
- **RoPE layout.** llama.cpp's ``llama`` graph rotates adjacent pairs (GPT-J style) while
  transformers' Llama rotates halves, so the converter permutes the rows of q_proj / k_proj (and
  their biases) within each head: ``w.reshape(n_head, 2, d/2, ...).swapaxes(1, 2)``, with
  n_head = num_key_value_heads for k. ``qwen2`` uses NeoX RoPE (halves) and is written unpermuted.
- **Tensor types.** 1-D tensors, norms and biases stay F32; 2-D weights take the file's type.
  q8_0 needs rows that are a multiple of 32; other rows fall back to F16, as the converter does.
- **q8_0** (ggml ``block_q8_0``, ``quantize_row_q8_0_ref``): blocks of 32 consecutive values of a
  row; d = max|x| / 127 in fp32, stored as fp16; q = roundf(x / d) (half away from zero, computed
  with the fp32 d) as int8; a block is 2 bytes of d then 32 bytes of q (34 bytes). Dequantized
  value: q · fp16(d). Per element |x − q·fp16(d)| ≤ d/2 + 127·|d − fp16(d)|, and fp16 rounding
  moves d by at most 2⁻¹¹·d, or 2⁻²⁵ (half fp16's subnormal spacing) for tiny d:
  ≤ (1/2 + 127·2⁻¹¹)·d + 127·2⁻²⁵ (``q8_0_error_bound``). A block with d > 65504 cannot be stored.
- **Metadata** llama.cpp requires for these architectures (``get_key`` without ``required=false``):
  ``general.architecture``, ``{arch}.context_length``, ``{arch}.embedding_length``,
  ``{arch}.block_count``, ``{arch}.attention.layer_norm_rms_epsilon``; it reads
  ``feed_forward_length``, ``attention.head_count``, ``attention.head_count_kv``,
  ``rope.freq_base``, ``rope.dimension_count`` and the RoPE-scaling keys when present (defaults
  would silently give a different model, so all are written). The vocabulary needs
  ``tokenizer.ggml.model`` and ``tokenizer.ggml.tokens``, and for BPE (``gpt2``) also
  ``tokenizer.ggml.merges``; ``tokenizer.ggml.pre`` picks the pre-tokenizer regex (missing: a
  generic default).
- **RoPE scaling**: ``linear`` → ``rope.scaling.type`` linear + ``rope.scaling.factor``; ``yarn``
  → type yarn, factor, ``rope.scaling.original_context_length`` (+ beta_fast / beta_slow);
  ``llama3`` → a ``rope_freqs.weight`` F32 tensor of per-frequency divisors (llama.cpp divides
  each inverse frequency by it). Dynamic NTK has no llama.cpp equivalent and is refused.
- **Pre-tokenizer.** llama.cpp identifies a byte-level BPE pre-tokenizer by the sha256 of the token
  ids the HF tokenizer produces for a fixed text (``get_vocab_base_pre``); a table of the hashes of
  the Llama-family tokenizers fastft trains is below. An unknown tokenizer is written as
  ``default`` with a warning (llama.cpp's own converter refuses it).
"""
from __future__ import annotations

import hashlib
import json
import math
import mmap
import os

import numpy as np
import torch

# model_type -> (GGUF architecture, permute q/k rows for llama.cpp's interleaved RoPE)
ARCHITECTURES = {"llama": ("llama", True), "mistral": ("llama", True), "qwen2": ("qwen2", False)}
QUANTS = ("f16", "q8_0")
ROPE_TYPES = ("default", "linear", "yarn", "llama3")

# Keys llama.cpp's loader reads without a default for these architectures ({arch} = the GGUF arch).
REQUIRED_KEYS = ("general.architecture", "{arch}.context_length", "{arch}.embedding_length", "{arch}.block_count",
                 "{arch}.attention.layer_norm_rms_epsilon", "tokenizer.ggml.model", "tokenizer.ggml.tokens")
# Keys with loader defaults that differ from the model unless written.
MODEL_KEYS = ("{arch}.feed_forward_length", "{arch}.attention.head_count", "{arch}.attention.head_count_kv",
              "{arch}.rope.freq_base", "{arch}.rope.dimension_count", "general.file_type")

Q8_0_BLOCK = 32
Q8_0_BYTES = 34


def q8_0_error_bound(d: torch.Tensor) -> torch.Tensor:
    """Largest per-element q8_0 error of a block with scale d = amax / 127 (module docstring)."""
    return d * (0.5 + 127 * 2.0 ** -11) + 127 * 2.0 ** -25

# GGUF names: global tensors, and per-block ones keyed by the transformers module path.
_GLOBAL = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
_BLOCK = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}

# llama.cpp's text whose token ids identify a BPE pre-tokenizer, and the hashes of the ones in this
# family (from convert_hf_to_gguf.py's get_vocab_base_pre).
CHKTXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n\U0001f680 (normal) \U0001f636\u200d\U0001f32b\ufe0f "
    "(multiple emojis concatenated) \u2705 \U0001f999\U0001f999 3 33 333 3333 33333 333333 3333333 33333333 3.3 "
    "3..3 3...3 \u1780\u17b6\u1793\u17cb\u178f\u17c2\u1796\u17b7\u179f\u17c1\u179f\u17a2\u17b6\u1785\U0001f601 "
    "?\u6211\u60f3\u5728apple\u5de5\u4f5c1314151\u5929\uff5e ------======= \u043d\u0435\u0449\u043e \u043d\u0430 "
    "\u0411\u044a\u043b\u0433\u0430\u0440\u0441\u043a\u0438 ''''''```````\"\"\"\"......!!!!!!?????? I've been "
    "'told he's there, 'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)
PRE_TOKENIZERS = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",    # Llama 3
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",        # Qwen 1.5 / 2
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",       # SmolLM / SmolLM2
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",       # Mistral Nemo
    "b3f499bb4255f8ca19fccd664443283318f2fd2414d5e0b040fbdd0cc195d6c5": "deepseek-r1-qwen",
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
    "c136ed14d01c2745d4f60a9596ae66800e2b61fa45643e72436041855ad4089d": "smaug-bpe",
}


# ----------------------------------------------------------------------------------------------
# Names and layouts
# ----------------------------------------------------------------------------------------------
def architecture(config) -> str:
    mt = getattr(config, "model_type", None)
    if mt not in ARCHITECTURES:
        raise ValueError(f"GGUF export: model_type {mt!r} is not supported; supported: {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[mt][0]


def gguf_name(hf_name: str) -> str:
    """``model.layers.3.self_attn.q_proj.weight`` -> ``blk.3.attn_q.weight``."""
    mod, _, suffix = hf_name.rpartition(".")
    if suffix not in ("weight", "bias"):
        raise ValueError(f"GGUF export: no GGUF name for tensor {hf_name!r}")
    if mod in _GLOBAL:
        return f"{_GLOBAL[mod]}.{suffix}"
    parts = mod.split(".", 3)
    if len(parts) == 4 and parts[0] == "model" and parts[1] == "layers" and parts[2].isdigit() and parts[3] in _BLOCK:
        return f"blk.{parts[2]}.{_BLOCK[parts[3]]}.{suffix}"
    raise ValueError(f"GGUF export: no GGUF name for tensor {hf_name!r}")


def qk_heads(config, hf_name: str) -> int | None:
    """Heads to permute over for llama.cpp's RoPE layout, or None when the tensor stays as is."""
    if not ARCHITECTURES[config.model_type][1]:
        return None
    if ".self_attn.q_proj." in hf_name:
        return config.num_attention_heads
    if ".self_attn.k_proj." in hf_name:
        return getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return None


def permute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Rows of each head from rotate-half order (x0..x_{d/2-1}, y0..) to pairs (x0, y0, x1, y1, ...)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def unpermute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def tensor_type(gname: str, shape, quant: str) -> str:
    """"F32" | "F16" | "Q8_0" for one tensor of a file written with ``quant``."""
    if len(shape) <= 1 or gname.endswith("_norm.weight") or not gname.endswith(".weight"):
        return "F32"
    if quant == "q8_0" and shape[-1] % Q8_0_BLOCK == 0:
        return "Q8_0"
    return "F16"


def type_nbytes(ttype: str, shape) -> int:
    n = math.prod(shape)
    return {"F32": 4 * n, "F16": 2 * n, "Q8_0": n // Q8_0_BLOCK * Q8_0_BYTES}[ttype]


# ----------------------------------------------------------------------------------------------
# Quantization
# ----------------------------------------------------------------------------------------------
def _roundf(v: np.ndarray) -> np.ndarray:
    # C roundf (half away from zero), exactly: floor(a) + floor(2·frac) is free of the rounding
    # that floor(a + 0.5) suffers just below .5. In place on one buffer besides v.
    a = np.abs(v)
    fl = np.floor(a)
    a -= fl
    a *= 2
    np.floor(a, out=a)
    a += fl
    return np.copysign(a, v, out=a)


# 1M values per step: the temporaries stay a few MB whatever the tensor size. numpy, not torch:
# these are many small memory-bound passes, and torch's intra-op threads pay a barrier per op
# (~16 ms each, measured, on this 2-core machine when other processes hold the cores).
_CHUNK_BLOCKS = 1 << 15


def q8_0_quantize(x) -> np.ndarray:
    """ggml block_q8_0 bytes of ``x`` (..., n) with n % 32 == 0: uint8 (..., n / 32 · 34)."""
    if x.shape[-1] % Q8_0_BLOCK:
        raise ValueError(f"q8_0: rows of {x.shape[-1]} values are not a multiple of {Q8_0_BLOCK}")
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float32).contiguous().numpy()
    blocks = np.ascontiguousarray(x, dtype=np.float32).reshape(-1, Q8_0_BLOCK)
    out = np.empty((blocks.shape[0], Q8_0_BYTES), dtype=np.uint8)
    for a in range(0, blocks.shape[0], _CHUNK_BLOCKS):
        b = blocks[a:a + _CHUNK_BLOCKS]
        d = np.abs(b).max(axis=1, keepdims=True) / np.float32(127)
        with np.errstate(divide="ignore"):
            inv = np.where(d == 0, np.float32(0), np.float32(1) / d)
        out[a:a + _CHUNK_BLOCKS, :2] = d.astype(np.float16).view(np.uint8)
        out[a:a + _CHUNK_BLOCKS, 2:] = _roundf(b * inv).astype(np.int8).view(np.uint8)
    return out.reshape(*x.shape[:-1], x.shape[-1] // Q8_0_BLOCK * Q8_0_BYTES)


def q8_0_dequantize(data: np.ndarray, shape) -> torch.Tensor:
    """fp32 values of block_q8_0 bytes, in ``shape`` (the logical (rows, n) shape)."""
    blocks = torch.from_numpy(np.ascontiguousarray(data).reshape(-1, Q8_0_BYTES))
    d = blocks[:, :2].contiguous().view(torch.float16).float()
    q = blocks[:, 2:].contiguous().view(torch.int8).float()
    return (q * d).reshape(shape)


_CHUNK_VALUES = 1 << 22  # rows converted per write step: at most ~4M values (16 MB fp32) in flight


def encode(t: torch.Tensor, ttype: str, name: str):
    """Yield the stored bytes of one tensor in row chunks (F32 / F16 numpy arrays, Q8_0 uint8
    blocks); concatenated they are the tensor's data. Checks the values fit the type first."""
    t = t.detach().to("cpu", torch.float32)
    lo, hi = (float(v) for v in t.aminmax()) if t.numel() else (0.0, 0.0)  # no temporaries of t's size
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"GGUF export: tensor {name!r} holds non-finite values")
    big = max(-lo, hi)
    if ttype == "F16" and big > 65504.0:
        raise ValueError(f"GGUF export: tensor {name!r} has |values| up to {big:.4g}, beyond fp16's 65504; "
                         "use quant='q8_0' or the hf format with bf16")
    if ttype == "Q8_0" and big / 127 > 65504.0:
        raise ValueError(f"GGUF export: tensor {name!r} has |values| up to {big:.4g}; a q8_0 block "
                         "scale beyond fp16's 65504 cannot be stored")
    if ttype not in ("F32", "F16", "Q8_0"):
        raise ValueError(f"unknown GGUF tensor type {ttype!r}")
    rows = t.reshape(-1, t.shape[-1]) if t.dim() > 1 else t.reshape(1, -1)
    step = max(1, _CHUNK_VALUES // max(1, rows.shape[1]))
    for a in range(0, rows.shape[0], step):
        part = rows[a:a + step]
        if ttype == "F32":
            yield part.contiguous().numpy()
        elif ttype == "F16":
            yield part.to(torch.float16).numpy()
        else:
            yield q8_0_quantize(part)


def roundtrip(t: torch.Tensor, ttype: str) -> torch.Tensor:
    """What the file holds for ``t`` read back as fp32: dequantize(quantize(t))."""
    if ttype == "F32":
        return t.float()
    if ttype == "F16":
        return t.to(torch.float16).float()
    return q8_0_dequantize(q8_0_quantize(t), t.shape)


# ----------------------------------------------------------------------------------------------
# RoPE
# ----------------------------------------------------------------------------------------------
def rope_freq_factors(config) -> torch.Tensor:
    """llama3 RoPE as llama.cpp's per-frequency divisors: base inv_freq / llama3 inv_freq."""
    from fastft.models.llama import rope_inv_freq, rope_parameters

    rp = rope_parameters(config)
    dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    base = float(rp["rope_theta"])
    plain = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float32) / dim))
    return (plain / rope_inv_freq(config)[0]).float()


def _rope_metadata(w, config) -> list[tuple[str, torch.Tensor]]:
    """RoPE keys; returns extra tensors (llama3's rope_freqs) to write."""
    import gguf

    from fastft.models.llama import rope_parameters

    rp = rope_parameters(config)
    kind = rp["rope_type"]
    if kind not in ROPE_TYPES:
        raise ValueError(f"GGUF export: rope_type {kind!r} has no llama.cpp equivalent; supported: "
                         f"{', '.join(ROPE_TYPES)}")
    if float(rp.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ValueError("GGUF export: partial_rotary_factor != 1 is not supported for these architectures")
    w.add_rope_freq_base(float(rp["rope_theta"]))
    if kind == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rp["factor"]))
    elif kind == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(float(rp.get("factor") or config.max_position_embeddings
                                        / rp["original_max_position_embeddings"]))
        w.add_rope_scaling_orig_ctx_len(int(rp.get("original_max_position_embeddings",
                                                   config.max_position_embeddings)))
        if rp.get("beta_fast"):
            w.add_rope_scaling_yarn_beta_fast(float(rp["beta_fast"]))
        if rp.get("beta_slow"):
            w.add_rope_scaling_yarn_beta_slow(float(rp["beta_slow"]))
        if rp.get("attention_factor") is not None:
            w.add_rope_scaling_attn_factors(float(rp["attention_factor"]))
    elif kind == "llama3":
        return [("rope_freqs.weight", rope_freq_factors(config))]
    return []


# ----------------------------------------------------------------------------------------------
# Vocabulary
# ----------------------------------------------------------------------------------------------
def _looks_special(tok: str) -> bool:
    # llama.cpp's does_token_look_special: added tokens that should be CONTROL though not flagged special.
    return tok in ("<pad>", "<mask>", "<2mass>", "[@BOS@]") or (tok.startswith("<|") and tok.endswith("|>")) or \
        (tok.startswith("<\uff5c") and tok.endswith("\uff5c>")) or (tok.startswith("<unused") and tok.endswith(">"))


def pre_tokenizer(tokenizer) -> str | None:
    """llama.cpp's name of the tokenizer's BPE pre-tokenizer, None when the hash is unknown."""
    h = hashlib.sha256(str(tokenizer.encode(CHKTXT)).encode()).hexdigest()
    return PRE_TOKENIZERS.get(h)


def _tokenizer_kind(tok_dir: str) -> str:
    path = os.path.join(tok_dir, "tokenizer.json")
    if not os.path.isfile(path):
        raise ValueError(f"GGUF export: no tokenizer.json in {tok_dir!r}; supported tokenizers: byte-level BPE "
                         "(GPT-2 / Llama 3 / Qwen2 / SmolLM style) and SentencePiece-style BPE with byte fallback "
                         "(Llama 2 / Mistral style), both as tokenizer.json")
    with open(path, encoding="utf-8") as f:
        model = json.load(f).get("model", {})
    if model.get("type") != "BPE":
        raise ValueError(f"GGUF export: tokenizer model type {model.get('type')!r} in {path} is not supported; "
                         "supported: BPE (byte-level, or SentencePiece-style with byte_fallback)")
    return "llama" if model.get("byte_fallback") else "gpt2"


def _special_ids(tokenizer) -> dict[str, int]:
    out = {}
    for kind in ("bos", "eos", "unk", "pad"):
        tid = getattr(tokenizer, f"{kind}_token_id", None)
        if isinstance(tid, int) and tid >= 0:
            out[kind] = tid
    return out


def _adds_bos_eos(tokenizer) -> tuple[bool, bool]:
    """Whether encoding adds BOS / EOS, read off the tokenizer's behaviour (what training saw)."""
    plain = tokenizer.encode("a", add_special_tokens=False)
    full = tokenizer.encode("a", add_special_tokens=True)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    add_bos = bos is not None and len(full) > len(plain) and full[0] == bos and (not plain or plain[0] != bos)
    add_eos = eos is not None and len(full) > len(plain) and full[-1] == eos and (not plain or plain[-1] != eos)
    return bool(add_bos), bool(add_eos)


class Vocab:
    """The tokenizer.ggml.* metadata of one HF tokenizer directory (see module docstring)."""

    def __init__(self, tok_dir: str, vocab_size: int, log=print, tokenizer=None):
        import gguf
        from transformers import AutoTokenizer

        self.kind = _tokenizer_kind(tok_dir)
        tok = tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(tok_dir)
        self.tokenizer = tok
        self.scores = None
        self.merges: list[str] = []
        self.pre = "default"
        if self.kind == "gpt2":
            vocab = tok.get_vocab()
            if max(vocab.values()) >= vocab_size:
                raise ValueError(f"GGUF export: the tokenizer in {tok_dir!r} has token id {max(vocab.values())}, "
                                 f"beyond the model's vocab_size {vocab_size}")
            self.pre = pre_tokenizer(tok) or "default"
            if self.pre == "default":
                log("WARNING: the tokenizer's BPE pre-tokenizer is not one llama.cpp knows by hash; written as "
                    "'default' (llama.cpp may split text differently from the HF tokenizer)")
            reverse = {i: t for t, i in vocab.items()}
            added = tok.get_added_vocab()
            decoder = tok.added_tokens_decoder
            tokens, types = [], []
            for i in range(vocab_size):
                if i not in reverse:
                    tokens.append(f"[PAD{i}]")
                    types.append(int(gguf.TokenType.UNUSED))
                    continue
                t = reverse[i]
                if t in added:
                    info = decoder.get(i)
                    if info is not None and not info.normalized:
                        t = tok.decode(tok.encode(t, add_special_tokens=False))
                    if (info is not None and info.special) or _looks_special(t):
                        types.append(int(gguf.TokenType.CONTROL))
                    else:
                        t = t.replace("\u2581", " ")
                        types.append(int(gguf.TokenType.USER_DEFINED))
                else:
                    types.append(int(gguf.TokenType.NORMAL))
                tokens.append(t)
            self.tokens, self.types = tokens, types
            self.merges = gguf.SpecialVocab(tok_dir, load_merges=True).merges
            if not self.merges:
                raise ValueError(f"GGUF export: no BPE merges found in {tok_dir!r}/tokenizer.json")
        else:
            from pathlib import Path

            hf = gguf.LlamaHfVocab(Path(tok_dir))
            self.tokens, self.scores, self.types = [], [], []
            for text, score, ttype in hf.all_tokens():
                self.tokens.append(text.decode("utf-8") if isinstance(text, bytes) else text)
                self.scores.append(float(score))
                self.types.append(int(ttype))
            while len(self.tokens) < vocab_size:
                self.tokens.append(f"[PAD{len(self.tokens)}]")
                self.scores.append(-1000.0)
                self.types.append(int(gguf.TokenType.UNUSED))
            if len(self.tokens) > vocab_size:
                raise ValueError(f"GGUF export: the tokenizer in {tok_dir!r} has {len(self.tokens)} tokens, more "
                                 f"than the model's vocab_size {vocab_size}")
        self.special = _special_ids(tok)
        self.add_bos, self.add_eos = _adds_bos_eos(tok)
        self.chat_template = getattr(tok, "chat_template", None)

    def add_to(self, w) -> None:
        w.add_tokenizer_model(self.kind)
        w.add_tokenizer_pre(self.pre)
        w.add_token_list(self.tokens)
        if self.scores is not None:
            w.add_token_scores(self.scores)
        w.add_token_types(self.types)
        if self.merges:
            w.add_token_merges(self.merges)
        for kind, tid in self.special.items():
            getattr(w, f"add_{kind}_token_id")(tid)
        w.add_add_bos_token(self.add_bos)
        w.add_add_eos_token(self.add_eos)
        if isinstance(self.chat_template, str) and self.chat_template:
            w.add_chat_template(self.chat_template)


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------
class Plan:
    """Every tensor of the file, in order: (gguf name, hf name or None, logical shape, type)."""

    def __init__(self, config, hf_shapes: dict[str, tuple[int, ...]], quant: str, extra: dict):
        self.entries = []
        for hf_name, shape in hf_shapes.items():
            g = gguf_name(hf_name)
            self.entries.append((g, hf_name, tuple(shape), tensor_type(g, shape, quant)))
        for g, t in extra.items():
            self.entries.append((g, None, tuple(t.shape), "F32"))
        self.fallback_f16 = [g for g, _, s, tt in self.entries if quant == "q8_0" and tt == "F16"]


def file_type(plan: Plan, quant: str) -> int:
    import gguf

    return int(gguf.LlamaFileType.MOSTLY_Q8_0 if quant == "q8_0" else gguf.LlamaFileType.MOSTLY_F16)


def write(path: str, config, tensors, get_tensor, vocab: Vocab, quant: str, name: str, log=print) -> Plan:
    """Write a GGUF file at ``path``, one tensor in memory at a time.

    ``tensors``: {hf name: shape} of the merged model in order; ``get_tensor(hf_name)`` returns it
    (fp32 or any float dtype, on any device).
    """
    import gguf

    arch = architecture(config)
    w = gguf.GGUFWriter(path, arch)
    try:
        w.add_type("model")
        w.add_name(name)
        w.add_vocab_size(int(config.vocab_size))
        w.add_context_length(int(config.max_position_embeddings))
        w.add_embedding_length(int(config.hidden_size))
        w.add_feed_forward_length(int(config.intermediate_size))
        w.add_block_count(int(config.num_hidden_layers))
        n_head = int(config.num_attention_heads)
        n_kv = int(getattr(config, "num_key_value_heads", None) or n_head)
        w.add_head_count(n_head)
        w.add_head_count_kv(n_kv)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
        if head_dim != config.hidden_size // n_head:
            w.add_key_length(int(head_dim))
            w.add_value_length(int(head_dim))
        w.add_rope_dimension_count(int(head_dim))
        w.add_layer_norm_rms_eps(float(config.rms_norm_eps))
        extra = dict(_rope_metadata(w, config))
        plan = Plan(config, tensors, quant, extra)
        w.add_file_type(file_type(plan, quant))
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        vocab.add_to(w)
        np_dtype = {"F32": np.float32, "F16": np.float16, "Q8_0": np.uint8}
        for g, _, shape, tt in plan.entries:
            raw = getattr(gguf.GGMLQuantizationType, tt)
            byte_shape = shape if tt != "Q8_0" else (*shape[:-1], shape[-1] // Q8_0_BLOCK * Q8_0_BYTES)
            w.add_tensor_info(g, byte_shape, np.dtype(np_dtype[tt]), type_nbytes(tt, shape), raw_dtype=raw)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for g, hf_name, shape, tt in plan.entries:
            t = extra[g] if hf_name is None else get_tensor(hf_name)
            heads = None if hf_name is None else qk_heads(config, hf_name)
            if heads is not None:
                t = permute_qk(t, heads)
            # Tensor data goes out in row chunks (gguf-py's write_tensor_data takes a whole array):
            # aligned start, the bytes, padding -- the layout write_tensor_data produces.
            fout = w.fout[0]
            w.write_padding(fout, fout.tell())
            written = 0
            for part in encode(t, tt, g):
                fout.write(part.data)
                written += part.nbytes
            del t
            if written != type_nbytes(tt, shape):
                raise RuntimeError(f"GGUF export: wrote {written} bytes for {g!r}, planned {type_nbytes(tt, shape)}")
            w.write_padding(fout, written)
        w.fout[0].flush()
        os.fsync(w.fout[0].fileno())
    finally:
        w.close()
    return plan


# ----------------------------------------------------------------------------------------------
# Reading back
# ----------------------------------------------------------------------------------------------
def field_value(reader, key):
    """A metadata value as Python (str, int, float, bool, or list), None when absent."""
    f = reader.fields.get(key)
    if f is None:
        return None
    return f.contents()


def open_reader(path: str):
    """gguf-py's reader, after fastft's strict header check (``fastft/models/gguf_io.py``)."""
    import gguf

    from fastft.models.gguf_io import check_gguf

    check_gguf(path)
    return gguf.GGUFReader(path)


def _reverse_names(n_layers: int) -> dict[str, str]:
    reverse = {}
    for i in range(n_layers):
        for hf_mod, g in _BLOCK.items():
            for s in ("weight", "bias"):
                reverse[f"blk.{i}.{g}.{s}"] = f"model.layers.{i}.{hf_mod}.{s}"
    for hf_mod, g in _GLOBAL.items():
        reverse[f"{g}.weight"] = f"{hf_mod}.weight"
    return reverse


def read_tensors(reader, config):
    """Yield (hf name or gguf name, gguf name, type name, fp32 tensor in transformers layout).

    Dequantization is gguf-py's own (``gguf.quants.dequantize``), so the file's bytes are read by
    the reference implementation, not by this module's encoder; one tensor is materialised at a time.
    """
    import gguf

    reverse = _reverse_names(int(config.num_hidden_layers))
    for t in reader.tensors:
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))  # ggml ne order -> torch order
        data = gguf.quants.dequantize(t.data, t.tensor_type)
        if not data.flags.writeable:  # F32 comes back as a view of the read-only file mapping
            data = np.array(data, dtype=np.float32)
        w = torch.from_numpy(data).reshape(shape)
        del data
        hf = reverse.get(t.name)
        if hf is not None:
            heads = qk_heads(config, hf)
            if heads is not None:
                w = unpermute_qk(w, heads)
        _drop_pages(reader, int(t.data_offset), int(t.n_bytes))
        yield (hf or t.name), t.name, t.tensor_type.name, w


def _drop_pages(reader, start: int, length: int) -> None:
    # The tensor was copied out: its file pages leave this process's RSS (they are clean page
    # cache), so reading a file back never holds the whole file on top of the model. Advisory only.
    mm = getattr(reader.data, "_mmap", None)  # numpy.memmap's mmap object
    if mm is None or not hasattr(mmap, "MADV_DONTNEED") or length <= 0:
        return
    lo = start // mmap.PAGESIZE * mmap.PAGESIZE
    try:
        mm.madvise(mmap.MADV_DONTNEED, lo, start + length - lo)
    except (OSError, ValueError):
        pass


def config_from_metadata(reader, original):
    """The transformers config a reader of the file rebuilds from its metadata alone (llama.cpp's
    view: sizes, heads, eps, RoPE base and scaling, tied output), for the reload check.

    llama3 RoPE is stored as a tensor of divisors, not as parameters; its parameters are taken from
    ``original`` once that tensor has been checked against them.
    """
    import transformers

    arch = field_value(reader, "general.architecture")
    names = {t.name for t in reader.tensors}
    get = lambda k: field_value(reader, k.format(arch=arch))  # noqa: E731
    n_head = int(get("{arch}.attention.head_count"))
    kw = dict(
        vocab_size=int(get("{arch}.vocab_size") or len(get("tokenizer.ggml.tokens"))),
        hidden_size=int(get("{arch}.embedding_length")),
        intermediate_size=int(get("{arch}.feed_forward_length")),
        num_hidden_layers=int(get("{arch}.block_count")),
        num_attention_heads=n_head,
        num_key_value_heads=int(get("{arch}.attention.head_count_kv") or n_head),
        max_position_embeddings=int(get("{arch}.context_length")),
        rms_norm_eps=float(get("{arch}.attention.layer_norm_rms_epsilon")),
        tie_word_embeddings="output.weight" not in names,
        head_dim=int(get("{arch}.attention.key_length") or get("{arch}.rope.dimension_count")
                     or int(get("{arch}.embedding_length")) // n_head),
    )
    rope = {"rope_type": "default", "rope_theta": float(get("{arch}.rope.freq_base") or 10000.0)}
    kind = get("{arch}.rope.scaling.type")
    if kind == "linear":
        rope.update(rope_type="linear", factor=float(get("{arch}.rope.scaling.factor")))
    elif kind == "yarn":
        rope.update(rope_type="yarn", factor=float(get("{arch}.rope.scaling.factor")),
                    original_max_position_embeddings=int(get("{arch}.rope.scaling.original_context_length")))
        for key, gk in (("beta_fast", "yarn_beta_fast"), ("beta_slow", "yarn_beta_slow"),
                        ("attention_factor", "attn_factor")):
            v = get("{arch}.rope.scaling." + gk)
            if v is not None:
                rope[key] = float(v)
    if "rope_freqs.weight" in names:
        from fastft.models.llama import rope_parameters

        rope = dict(rope_parameters(original))
    if arch == "qwen2":
        cfg = transformers.Qwen2Config(**kw, rope_parameters=rope)
    else:
        cfg = transformers.LlamaConfig(**kw, rope_parameters=rope,
                                       attention_bias="blk.0.attn_q.bias" in names,
                                       mlp_bias="blk.0.ffn_gate.bias" in names)
    return cfg
