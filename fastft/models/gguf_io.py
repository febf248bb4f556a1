"""Strict GGUF header reading: every field checked before any tensor data is touched.

fastft reads GGUF files in two places: ``fastft convert --gguf`` (``convert.convert_gguf``, which
then hands the file to transformers' GGUF loader) and the read-back check of ``fastft export
--format gguf`` (``export_gguf.open_reader``, then gguf-py's ``GGUFReader``). Both call
``check_gguf`` first, so a file whose header lies in any way is refused with one
``fastft.errors.CheckpointError`` naming the file and the field, before those readers (which check
much less) see it.

The format (GGUF v2 / v3, little-endian; https://github.com/ggml-org/ggml/blob/master/docs/gguf.md):
``"GGUF"``, uint32 version, uint64 tensor count, uint64 key/value count; then each key/value
(string key = uint64 length + UTF-8 bytes, uint32 value type, value; an array is uint32 element
type + uint64 count + elements); then each tensor info (string name, uint32 n_dims, n_dims
uint64 dims in ggml order (fastest first), uint32 ggml type, uint64 data offset); then, from the
header's end rounded up to ``general.alignment`` (uint32, default 32), the data section.

What is refused, as llama.cpp's ``gguf_init_from_file`` (the reference reader) refuses it, and a bit
more: a bad magic; a version other than 2 or 3 (a byte-swapped one is named big-endian); counts
that cannot fit in the file; a string, array or value running past the end of the file; an
unknown value type; a bool that is neither 0 nor 1; an empty, non-UTF-8 or duplicate key; a
``general.alignment`` that is not a uint32 power of two; an empty, over-long (>= 64 bytes,
ggml's ``GGML_MAX_NAME``), non-UTF-8 or duplicate tensor name; n_dims outside 1..4; a zero dimension;
an unknown ggml type; a row length that is not a multiple of the type's block size; a data offset
that is not aligned, not where the previous tensor's (padded) data ends -- llama.cpp requires the
tensors to tile the data section in order, which also rules out overlaps and gaps and ties each
tensor's byte size (type size x elements / block size) to its neighbour's offset -- or data that
runs past the end of the file.
"""
from __future__ import annotations

import mmap
import os
import struct

from ..errors import CheckpointError

MAGIC = b"GGUF"
VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_NAME = 64  # GGML_MAX_NAME: a tensor name must be shorter (it is stored NUL-terminated)

# GGUF value types: id -> (name, struct format or None for string / array)
VALUE_TYPES = {
    0: ("UINT8", "<B"), 1: ("INT8", "<b"), 2: ("UINT16", "<H"), 3: ("INT16", "<h"), 4: ("UINT32", "<I"),
    5: ("INT32", "<i"), 6: ("FLOAT32", "<f"), 7: ("BOOL", "<B"), 8: ("STRING", None), 9: ("ARRAY", None),
    10: ("UINT64", "<Q"), 11: ("INT64", "<q"), 12: ("FLOAT64", "<d"),
}
T_UINT32, T_BOOL, T_STRING, T_ARRAY = 4, 7, 8, 9

# ggml tensor types: id -> (name, elements per block, bytes per block) -- ggml's type traits
# (ggml/src/ggml.c); tests/test_strict_formats.py checks the table against gguf-py's.
GGML_TYPES = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 40), 10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210), 15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74), 18: ("IQ3_XXS", 256, 98), 19: ("IQ1_S", 256, 50),
    20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110), 22: ("IQ2_S", 256, 82), 23: ("IQ4_XS", 256, 136),
    24: ("I8", 1, 1), 25: ("I16", 1, 2), 26: ("I32", 1, 4), 27: ("I64", 1, 8), 28: ("F64", 1, 8),
    29: ("IQ1_M", 256, 56), 30: ("BF16", 1, 2), 34: ("TQ1_0", 256, 54), 35: ("TQ2_0", 256, 66),
    39: ("MXFP4", 32, 17), 40: ("NVFP4", 64, 36), 41: ("Q1_0", 128, 18),
}

# Smallest possible encodings, for the count-vs-file-size sanity check.
_MIN_KV = 8 + 1 + 4 + 1  # key length, a 1-byte key, value type, a 1-byte value
_MIN_TENSOR = 8 + 1 + 4 + 8 + 4 + 8  # name length, a 1-byte name, n_dims, one dim, type, offset


class GGUFTensor:
    __slots__ = ("name", "dims", "type", "offset", "nbytes", "pos")

    def __init__(self, name, dims, ttype, offset, nbytes, pos):
        self.name, self.dims, self.type, self.offset, self.nbytes, self.pos = name, dims, ttype, offset, nbytes, pos

    @property
    def type_name(self) -> str:
        return GGML_TYPES[self.type][0]


class GGUFHeader:
    """A checked header: ``version``, ``kv`` {key: (value type, value)} (value None for arrays),
    ``kv_pos`` {key: {"key": .., "type": .., "value": ..}} (byte positions, for tests that corrupt one
    field), ``tensors`` (``GGUFTensor``: name, dims in ggml order, type, offset relative to the data
    section, nbytes, pos), ``alignment``, ``data_start``, ``size`` (the file's)."""

    def __init__(self, path):
        self.path = path
        self.version = None
        self.kv = {}
        self.kv_pos = {}
        self.tensors = []
        self.alignment = DEFAULT_ALIGNMENT
        self.data_start = None
        self.size = None


class _Cursor:
    def __init__(self, buf, size, path):
        self.buf, self.size, self.path, self.pos = buf, size, path, 0

    def fail(self, problem):
        return CheckpointError(f"{self.path}: {problem}")

    def need(self, n, what):
        if n < 0 or self.pos + n > self.size:
            raise self.fail(f"{what} at byte {self.pos} needs {n} bytes, runs past the end of the file "
                            f"({self.size} bytes)")

    def unpack(self, fmt, what):
        n = struct.calcsize(fmt)
        self.need(n, what)
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return v

    def string(self, what) -> bytes:
        n = self.unpack("<Q", f"length of {what}")
        self.need(n, f"{what} ({n} bytes)")
        b = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return b

    def skip_string(self, what):
        n = self.unpack("<Q", f"length of {what}")
        self.need(n, f"{what} ({n} bytes)")
        self.pos += n


def _utf8(cur, raw: bytes, what) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise cur.fail(f"{what} {raw[:40]!r} is not UTF-8") from None


def _value(cur, vtype: int, key: str, depth: int = 0):
    """Read (and check) one value of type ``vtype``; returns it (None for arrays and strings)."""
    if vtype not in VALUE_TYPES:
        raise cur.fail(f"key {key!r}: unknown value type {vtype} (known: 0..12)")
    name, fmt = VALUE_TYPES[vtype]
    if fmt is not None:
        v = cur.unpack(fmt, f"value of {key!r} ({name})")
        if vtype == T_BOOL and v > 1:
            raise cur.fail(f"key {key!r}: bool value {v} is neither 0 nor 1")
        return v
    if vtype == T_STRING:
        return _utf8(cur, cur.string(f"string value of {key!r}"), f"key {key!r}: string value")
    # array: element type, count, elements
    etype = cur.unpack("<I", f"array element type of {key!r}")
    count = cur.unpack("<Q", f"array length of {key!r}")
    if etype not in VALUE_TYPES:
        raise cur.fail(f"key {key!r}: array of unknown value type {etype} (known: 0..12)")
    if etype == T_ARRAY and depth >= 8:
        raise cur.fail(f"key {key!r}: arrays nested more than 8 deep")
    efmt = VALUE_TYPES[etype][1]
    left = cur.size - cur.pos
    min_size = struct.calcsize(efmt) if efmt is not None else (8 if etype == T_STRING else 12)
    if count * min_size > left:
        raise cur.fail(f"key {key!r}: array of {count} {VALUE_TYPES[etype][0]} values cannot fit in the "
                       f"{left} bytes left in the file")
    if efmt is not None:
        n = count * min_size
        if etype == T_BOOL and count and max(cur.buf[cur.pos:cur.pos + n]) > 1:
            raise cur.fail(f"key {key!r}: bool array holds a value that is neither 0 nor 1")
        cur.pos += n
    elif etype == T_STRING:
        for i in range(count):
            cur.skip_string(f"element {i} of {key!r}")
    else:
        for _ in range(count):
            _value(cur, T_ARRAY, key, depth + 1)
    return None


def check_gguf(path) -> GGUFHeader:
    """Read and check the header of the GGUF file ``path`` (module docstring); no tensor data is read.

    Returns the header; raises ``CheckpointError`` (``InputNotFoundError`` if there is no file)
    naming the file and the first field that lies."""
    from ..errors import InputNotFoundError

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise InputNotFoundError(f"{path}: GGUF file does not exist")
    size = os.path.getsize(path)
    h = GGUFHeader(path)
    h.size = size
    with open(path, "rb") as f:
        head = f.read(24)
        if head[:4] != MAGIC:
            raise CheckpointError(f"{path}: not a GGUF file (bad magic): it starts with {head[:4]!r}")
        if size < 24:
            raise CheckpointError(f"{path}: truncated GGUF file ({size} bytes; the fixed header needs 24)")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            _parse(h, _Cursor(mm, size, path))
    return h


def _parse(h: GGUFHeader, cur: _Cursor) -> None:
    cur.pos = 4
    version = cur.unpack("<I", "version")
    if version not in VERSIONS:
        swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
        if swapped in VERSIONS:
            raise cur.fail(f"big-endian GGUF (version {swapped} byte-swapped) is not supported")
        raise cur.fail(f"unsupported GGUF version {version} (supported: 2, 3)")
    h.version = version
    n_tensors = cur.unpack("<Q", "tensor count")
    n_kv = cur.unpack("<Q", "key/value count")
    if 24 + n_kv * _MIN_KV + n_tensors * _MIN_TENSOR > cur.size:
        raise cur.fail(f"header claims {n_tensors} tensors and {n_kv} key/value pairs, which cannot fit in "
                       f"a file of {cur.size} bytes")
    for i in range(n_kv):
        p_key = cur.pos
        raw = cur.string(f"key {i}")
        if not raw:
            raise cur.fail(f"key {i} (at byte {p_key}) is empty")
        key = _utf8(cur, raw, f"key {i}")
        if key in h.kv:
            raise cur.fail(f"duplicate key {key!r}")
        p_type = cur.pos
        vtype = cur.unpack("<I", f"value type of {key!r}")
        p_val = cur.pos
        h.kv[key] = (vtype, _value(cur, vtype, key))
        h.kv_pos[key] = {"key": p_key, "type": p_type, "value": p_val}
    if "general.alignment" in h.kv:
        vtype, a = h.kv["general.alignment"]
        if vtype != T_UINT32:
            raise cur.fail(f"general.alignment must be a UINT32, got {VALUE_TYPES[vtype][0]}")
        if a == 0 or a & (a - 1):
            raise cur.fail(f"general.alignment {a} is not a power of two")
        h.alignment = a
    names = set()
    for i in range(n_tensors):
        pos = {"name": cur.pos}
        raw = cur.string(f"name of tensor {i}")
        if not raw:
            raise cur.fail(f"tensor {i} has an empty name")
        if len(raw) >= MAX_NAME:
            raise cur.fail(f"tensor {i}: name of {len(raw)} bytes is too long (ggml's limit is {MAX_NAME - 1})")
        name = _utf8(cur, raw, f"name of tensor {i}")
        if name in names:
            raise cur.fail(f"duplicate tensor name {name!r}")
        names.add(name)
        pos["n_dims"] = cur.pos
        n_dims = cur.unpack("<I", f"n_dims of tensor {name!r}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise cur.fail(f"tensor {name!r}: n_dims {n_dims} is not in 1..{MAX_DIMS}")
        pos["dims"] = cur.pos
        dims = tuple(cur.unpack("<Q", f"dimension {d} of tensor {name!r}") for d in range(n_dims))
        if min(dims) < 1:
            raise cur.fail(f"tensor {name!r}: dimensions {list(dims)} include 0")
        pos["type"] = cur.pos
        ttype = cur.unpack("<I", f"type of tensor {name!r}")
        if ttype not in GGML_TYPES:
            raise cur.fail(f"tensor {name!r}: unknown ggml type {ttype}")
        tname, blck, tsize = GGML_TYPES[ttype]
        if dims[0] % blck:
            raise cur.fail(f"tensor {name!r}: row length {dims[0]} is not a multiple of {tname}'s block size {blck}")
        pos["offset"] = cur.pos
        offset = cur.unpack("<Q", f"data offset of tensor {name!r}")
        numel = 1
        for d in dims:
            numel *= d
        if numel >= 1 << 63:
            raise cur.fail(f"tensor {name!r}: {list(dims)} has more elements than ggml can index")
        h.tensors.append(GGUFTensor(name, dims, ttype, offset, numel // blck * tsize, pos))
    a = h.alignment
    h.data_start = -(-cur.pos // a) * a
    expected = 0
    for t in h.tensors:
        if t.offset % a:
            raise cur.fail(f"tensor {t.name!r}: data offset {t.offset} is not a multiple of the alignment {a}")
        if t.offset != expected:
            raise cur.fail(f"tensor {t.name!r}: data offset {t.offset}, expected {expected} (tensors follow each "
                           f"other in order, each {GGML_TYPES[t.type][0]} x {list(t.dims)} tensor's bytes padded "
                           f"to {a}: an overlap, a gap or a wrong size)")
        end = h.data_start + t.offset + t.nbytes
        if end > cur.size:
            raise cur.fail(f"tensor {t.name!r}: data [{h.data_start + t.offset}, {end}) runs past the end of the "
                           f"file ({cur.size} bytes)")
        expected += -(-t.nbytes // a) * a


__all__ = ["check_gguf", "GGUFHeader", "GGUFTensor", "GGML_TYPES", "VALUE_TYPES"]
