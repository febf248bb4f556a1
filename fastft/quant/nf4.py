"""NF4 weights in bitsandbytes' layout (QLoRA, Dettmers et al. 2023, arXiv:2305.14314).

Format (bit-compatible with bitsandbytes >= 0.43 ``quantize_4bit(quant_type="nf4")``):

* The (out, in) weight is flattened row-major and cut into blocks of ``blocksize`` consecutive
  elements (32 ... 4096, a power of two); the last block may be short. Blocks may straddle rows.
* Per block, ``absmax`` = max |x| in fp32. Each element becomes ``scaled = x * (1/absmax)`` (fp32,
  the reciprocal taken of ``max(absmax, 1e-38)`` so all-zero blocks give 0, not NaN), clamped to
  [-1, 1], and is coded as the index of the nearest NF4 value, decided against the fp32 midpoints
  of adjacent codes with a strict ``>`` (a value exactly on a midpoint takes the lower code).
* Two codes per byte, the first element in the HIGH nibble; ``data`` is uint8 ((n+1)//2, 1). An
  odd element count is padded with code 7 (the code of 0.0), as bitsandbytes does.
* Dequantization is ``quant_map[code] * absmax`` in fp32 followed by one cast to the target dtype.
* Double quantization (``double_quant=True``, bitsandbytes' ``compress_statistics``): with
  ``offset = mean(absmax)`` (fp32), ``absmax - offset`` is quantized in groups of 256 blocks to
  bitsandbytes' signed 8-bit dynamic map, with an fp32 absmax per group (``nested_absmax``). The
  8-bit code is the exactly nearest map value (ties to the lower code), as the CUDA kernels pick it;
  bitsandbytes' CPU path uses a lookup table that misses the nearest code for a few values per
  tensor, so fastft's nested codes can differ from CPU-bitsandbytes' there (and are closer). If
  the fp32 sum behind the mean overflows (absmax near fp32's max), the mean is taken in float64;
  bitsandbytes would store inf. The format is relative to the largest block: in a tensor whose
  block scales span many decades, small blocks' absmax decode coarsely (inherent to 8-bit codes).
  Decoding: ``absmax = nested_quant_map[q] * nested_absmax[group] + offset`` in fp32.

Memory: 4 bits per weight + 8 bits per block (+ 32 bits per 256 blocks) with double quant, i.e.
4.127 bits per weight at blocksize 64 -- 25.8% of bf16. Quantizing and dequantizing work in chunks
of 2^18 elements, so a 4096 x 14336 weight never has a full-size fp32 temporary.

The algorithms live behind ``fastft.ops.nf4_quantize`` / ``nf4_dequantize`` (reference in
``fastft/ops/reference_quant.py``); this module holds the frozen container and its serialization.
bitsandbytes is never imported here.
"""
from __future__ import annotations

import json
import math

import torch

from .base import QuantizedWeight
from .codebooks import dynamic_map, dynamic_map_midpoints_f64, nf4_code

VALID_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCKSIZE = 256
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# bitsandbytes' safetensors key for the JSON quant state of an NF4 weight.
BNB_QS_KEY = "quant_state.bitsandbytes__nf4"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def dtype_from_name(name: str, key: str) -> torch.dtype:
    dt = getattr(torch, str(name), None)
    if not isinstance(dt, torch.dtype):
        raise ValueError(f"{key}: unknown dtype {name!r}")
    return dt


def pack_json(obj: dict) -> torch.Tensor:
    """A dict as UTF-8 JSON bytes in a uint8 tensor (bitsandbytes' ``pack_dict_to_tensor``)."""
    return torch.tensor(list(json.dumps(obj).encode("utf-8")), dtype=torch.uint8)


def unpack_json(t: torch.Tensor, key: str) -> dict:
    if not isinstance(t, torch.Tensor) or t.dtype != torch.uint8:
        raise ValueError(f"{key}: expected a uint8 tensor holding UTF-8 JSON")
    try:
        return json.loads(bytes(t.cpu().numpy().tobytes()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{key}: not UTF-8 JSON ({e})") from None


def check_nf4_args(w, blocksize) -> None:
    """Shared argument checks for every nf4_quantize backend."""
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"nf4_quantize: weight must be a torch.Tensor, got {type(w).__name__}")
    if w.dtype not in FLOAT_DTYPES:
        raise TypeError(f"nf4_quantize: weight dtype must be one of {FLOAT_DTYPES}, got {w.dtype}")
    if w.dim() != 2:
        raise ValueError(f"nf4_quantize: weight must be 2-D (out_features, in_features), got shape {tuple(w.shape)}")
    if w.numel() == 0:
        raise ValueError(f"nf4_quantize: weight is empty (shape {tuple(w.shape)})")
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize not in VALID_BLOCKSIZES:
        raise ValueError(f"nf4_quantize: blocksize must be one of {VALID_BLOCKSIZES}, got {blocksize!r}")


def double_quant_offset(absmax: torch.Tensor) -> torch.Tensor:
    """The double-quant offset: mean(absmax) as a 0-dim fp32 tensor, exactly what bitsandbytes
    computes -- except when the fp32 sum overflows (absmax near fp32's max): the mean itself is
    representable, so it is then taken in float64 (bitsandbytes would store inf)."""
    offset = absmax.float().mean()
    if not torch.isfinite(offset):
        offset = absmax.double().mean().float()
    return offset


def double_quantize_absmax(absmax: torch.Tensor, nested_blocksize: int = NESTED_BLOCKSIZE):
    """Double quantization of the per-block absmax (shared by all nf4_quantize backends).

    absmax fp32 (nblocks,) -> (qabsmax uint8 (nblocks,), nested_absmax fp32 (ceil(nblocks/256),),
    offset float). See the module docstring for the format. The input is small (n/blocksize), so
    this runs in plain torch on the weight's device.
    """
    absmax = absmax.float().reshape(-1)
    nb = absmax.numel()
    offset = double_quant_offset(absmax)
    centered = absmax - offset
    ng = -(-nb // nested_blocksize)
    pad = ng * nested_blocksize - nb
    # Padding with 0 changes neither a group's max |.| nor the real elements' codes.
    groups = torch.nn.functional.pad(centered, (0, pad)).view(ng, nested_blocksize)
    nested_absmax = groups.abs().amax(dim=1)
    inv = 1.0 / nested_absmax.clamp(min=1e-38)
    scaled = (groups * inv[:, None]).clamp_(-1, 1).reshape(-1)[:nb]
    mids = dynamic_map_midpoints_f64(absmax.device)
    q = torch.bucketize(scaled.double(), mids).to(torch.uint8)
    return q, nested_absmax, float(offset.item())


# -- strict reading of bitsandbytes' layout ------------------------------------------------------
# The JSON keys bitsandbytes' QuantState.as_dict(packed=True) writes (its from_dict refuses others).
BNB_QS_REQUIRED = ("quant_type", "blocksize", "dtype", "shape")
BNB_QS_NESTED = ("nested_blocksize", "nested_dtype", "nested_offset")
BNB_QS_TYPES = ("nf4", "fp4")  # bitsandbytes' quant_state.bitsandbytes__<type> suffixes
BNB_DTYPES = {dtype_name(d): d for d in FLOAT_DTYPES}


def _bad(where, source, problem):
    from fastft.errors import CheckpointError

    return CheckpointError(f"{source + ': ' if source else ''}{where}: {problem}")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def parse_bnb_quant_state(t, key: str, source: str | None = None) -> dict:
    """The JSON object held by ``<weight>.quant_state.bitsandbytes__nf4``, its fields checked
    (bitsandbytes' ``QuantState.from_dict`` fields, types and ranges); CheckpointError otherwise."""
    if not isinstance(t, torch.Tensor) or t.dtype != torch.uint8 or t.dim() != 1:
        got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
        raise _bad(key, source, f"must be a 1-D uint8 tensor holding UTF-8 JSON, got {got}")
    try:
        meta = json.loads(bytes(t.cpu().numpy().tobytes()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _bad(key, source, f"quant state is not UTF-8 JSON ({e})") from None
    if not isinstance(meta, dict):
        raise _bad(key, source, f"quant state must be a JSON object, got {type(meta).__name__}")
    missing = [k for k in BNB_QS_REQUIRED if k not in meta]
    if missing:
        raise _bad(key, source, f"quant state lacks {', '.join(map(repr, missing))}")
    unknown = sorted(set(meta) - set(BNB_QS_REQUIRED) - set(BNB_QS_NESTED))
    if unknown:
        raise _bad(key, source, f"quant state has unknown keys {unknown} (bitsandbytes writes "
                                f"{list(BNB_QS_REQUIRED + BNB_QS_NESTED)})")
    qt = meta["quant_type"]
    if qt == "fp4":
        raise _bad(key, source, "quant_type 'fp4': FP4 weights are not supported: only NF4")
    if qt != "nf4":
        raise _bad(key, source, f"unknown quant_type {qt!r} (bitsandbytes writes 'nf4' or 'fp4')")
    if not key.endswith("." + BNB_QS_KEY):
        raise _bad(key, source, f"quant_type 'nf4' stored under a key not ending in {BNB_QS_KEY!r}")
    bs = meta["blocksize"]
    if not _is_int(bs) or bs not in VALID_BLOCKSIZES:
        raise _bad(key, source, f"blocksize {bs!r} is not one of {VALID_BLOCKSIZES}")
    if not isinstance(meta["dtype"], str) or meta["dtype"] not in BNB_DTYPES:
        raise _bad(key, source, f"unknown dtype {meta['dtype']!r} (expected one of {sorted(BNB_DTYPES)})")
    shape = meta["shape"]
    if (not isinstance(shape, list) or len(shape) != 2 or not all(_is_int(d) for d in shape)
            or min(shape) < 1):
        raise _bad(key, source, f"shape must be [out_features, in_features] (positive integers), got {shape!r}")
    nested = [k for k in BNB_QS_NESTED if k in meta]
    if nested and len(nested) != len(BNB_QS_NESTED):
        missing = [k for k in BNB_QS_NESTED if k not in meta]
        raise _bad(key, source, f"quant state has {nested} but lacks {missing} (double quantization needs all three)")
    if nested:
        if not _is_int(meta["nested_blocksize"]) or meta["nested_blocksize"] != NESTED_BLOCKSIZE:
            raise _bad(key, source, f"nested_blocksize {meta['nested_blocksize']!r} is not {NESTED_BLOCKSIZE} "
                                    "(bitsandbytes' only nested block size)")
        if meta["nested_dtype"] != "float32":
            raise _bad(key, source, f"nested_dtype {meta['nested_dtype']!r} is not 'float32'")
        off = meta["nested_offset"]
        if isinstance(off, bool) or not isinstance(off, (int, float)) or not math.isfinite(off):
            raise _bad(key, source, f"nested_offset {off!r} is not a finite number")
    return meta


def check_bnb_header(p: str, infos: dict, qs, source: str | None = None, expected_shape=None) -> dict:
    """Check one bitsandbytes 4-bit weight from its tensors' dtypes and shapes alone (no data read
    except the quant state's JSON bytes ``qs``; None: only the key set is checked).

    ``p``: the weight's key (``<module>.weight``); ``infos``: {key: (dtype, shape)} of ``p`` and
    every ``p + ".*"`` key. Returns the parsed quant state. Every lie raises CheckpointError.
    """
    states = sorted(k for k in infos if k.startswith(p + ".quant_state."))
    if len(states) != 1:
        raise _bad(p, source, f"expected exactly one quant state key, found {states}")
    qs_key = states[0]
    suffix = qs_key[len(p + ".quant_state."):]
    if suffix not in [f"bitsandbytes__{t}" for t in BNB_QS_TYPES]:
        raise _bad(qs_key, source,
                   f"unknown quant state type {suffix!r} (expected bitsandbytes__nf4 or bitsandbytes__fp4)")
    if suffix != "bitsandbytes__nf4":
        raise _bad(qs_key, source, "FP4 weights are not supported: only NF4")
    if qs is None:
        raise _bad(qs_key, source, "quant state tensor missing")
    meta = parse_bnb_quant_state(qs, qs_key, source)
    shape = tuple(meta["shape"])
    if expected_shape is not None and shape != tuple(expected_shape):
        raise _bad(qs_key, source, f"quant state shape {list(shape)} does not match the layer's "
                                   f"(out_features, in_features) = {tuple(expected_shape)}")
    nested = "nested_offset" in meta
    allowed = {p, qs_key, p + ".absmax", p + ".quant_map"}
    if nested:
        allowed |= {p + ".nested_absmax", p + ".nested_quant_map"}
    extra = sorted(set(infos) - allowed)
    if extra:
        why = " (the quant state has no nested_* fields: not double-quantized)" if not nested and any(
            "nested" in k for k in extra) else ""
        raise _bad(extra[0], source, f"unexpected tensor next to a bitsandbytes NF4 weight{why}")
    for k in sorted(allowed):
        if k not in infos:
            raise _bad(k, source, f"missing: the quant state {qs_key!r} needs it")
    n = shape[0] * shape[1]
    nb = -(-n // meta["blocksize"])

    def expect(k, dtype, count, what):
        dt, shp = infos[k]
        if dt != dtype:
            raise _bad(k, source, f"dtype {dtype_name(dt)}, expected {dtype_name(dtype)} ({what})")
        numel = math.prod(shp)
        if numel != count:
            raise _bad(k, source, f"{numel} entries, expected {count} ({what})")

    dt, shp = infos[p]
    if dt not in BNB_QUANT_STORAGE:
        raise _bad(p, source, "packed 4-bit data must be stored as uint8 (or the bytes viewed as "
                              f"bnb_4bit_quant_storage float16 / bfloat16 / float32), got {dtype_name(dt)}")
    if not (len(shp) == 2 and shp[1] == 1):
        raise _bad(p, source, f"packed 4-bit data must have shape (bytes, 1), got {tuple(shp)}")
    # a wider quant_storage (FSDP) holds the same bytes: itemsize bytes per entry
    size = torch.empty((), dtype=dt).element_size()
    why = f"two 4-bit codes per byte for shape {list(shape)}: ceil({n}/2)"
    if size > 1:
        why += f" bytes, {size} per {dtype_name(dt)} entry"
        if ((n + 1) // 2) % size:
            raise _bad(p, source, f"{(n + 1) // 2} packed bytes do not fill whole {dtype_name(dt)} entries "
                                  "(bnb_4bit_quant_storage needs a byte count divisible by its size)")
    expect(p, dt, (n + 1) // 2 // size, why)
    expect(p + ".quant_map", torch.float32, 16, "the 16 NF4 values")
    if nested:
        expect(p + ".absmax", torch.uint8, nb, f"one 8-bit code per block: ceil({n}/{meta['blocksize']})")
        ng = -(-nb // meta["nested_blocksize"])
        expect(p + ".nested_absmax", torch.float32, ng,
               f"one per {meta['nested_blocksize']} blocks: ceil({nb}/{meta['nested_blocksize']})")
        expect(p + ".nested_quant_map", torch.float32, 256, "the 8-bit dynamic map")
    else:
        expect(p + ".absmax", torch.float32, nb, f"one per block: ceil({n}/{meta['blocksize']})")
    return meta


def check_bnb_values(p: str, sd: dict, meta: dict, source: str | None = None) -> None:
    """Checks that need the small tensors' values: finite scales and codebooks, and the NF4 code
    book itself (bitsandbytes' kernels use their built-in NF4 values, not ``quant_map``: a
    different map would decode differently in fastft and bitsandbytes)."""
    names = ["absmax", "quant_map"] if "nested_offset" not in meta else ["nested_absmax", "nested_quant_map",
                                                                          "quant_map"]
    for name in names:
        t = sd[f"{p}.{name}"]
        if t.device.type == "meta":  # a placeholder (per-rank loading reads it later, checked by the loader first)
            continue
        bad = (~torch.isfinite(t)).sum().item()
        if bad:
            raise _bad(f"{p}.{name}", source, f"{bad} non-finite value(s) (NaN or inf)")
        if name.endswith("absmax") and (t < 0).any():
            raise _bad(f"{p}.{name}", source,
                       f"{int((t < 0).sum())} negative value(s): a block's absmax is max |x| >= 0")
    if not torch.equal(sd[p + ".quant_map"].reshape(-1).cpu(), nf4_code()):
        raise _bad(p + ".quant_map", source, "is not the NF4 code book (bitsandbytes decodes with the NF4 "
                                             "values whatever this tensor holds)")


# bitsandbytes' quant_storage dtypes: the packed bytes, viewed as one of these (uint8 by default)
BNB_QUANT_STORAGE = (torch.uint8, torch.float16, torch.bfloat16, torch.float32)


class NF4Weight(QuantizedWeight):
    """A frozen NF4-quantized (out, in) weight in bitsandbytes' layout (see module docstring).

    Fields: ``data`` uint8 ((n+1)//2, 1); ``shape`` torch.Size (out, in); ``blocksize``; ``dtype``
    (the original float dtype, the default of ``dequantize``); ``quant_map`` fp32 (16,); and either
    ``absmax`` fp32 (nblocks,) or, with double quant, ``absmax`` uint8 (nblocks,) +
    ``nested_absmax`` fp32 (ceil(nblocks/256),) + ``nested_quant_map`` fp32 (256,) + ``offset``
    (float) + ``nested_blocksize`` (256). Not a Parameter: it never receives a gradient.
    """

    quant_type = "nf4"
    _dequantize_op = "nf4_dequantize"

    def __init__(self, data, shape, blocksize, dtype, quant_map, absmax, nested_absmax=None,
                 nested_quant_map=None, offset=None, nested_blocksize=NESTED_BLOCKSIZE):
        shape = torch.Size(shape)
        if len(shape) != 2:
            raise ValueError(f"NF4Weight: shape must be (out_features, in_features), got {tuple(shape)}")
        if blocksize not in VALID_BLOCKSIZES:
            raise ValueError(f"NF4Weight: blocksize must be one of {VALID_BLOCKSIZES}, got {blocksize!r}")
        if dtype not in FLOAT_DTYPES:
            raise TypeError(f"NF4Weight: dtype must be one of {FLOAT_DTYPES}, got {dtype}")
        n = shape.numel()
        nblocks = -(-n // blocksize)
        if data.dtype != torch.uint8 or tuple(data.shape) != ((n + 1) // 2, 1):
            raise ValueError(
                f"NF4Weight: data must be uint8 of shape ({(n + 1) // 2}, 1) for shape {tuple(shape)}, "
                f"got {data.dtype} {tuple(data.shape)}"
            )
        if quant_map.dtype != torch.float32 or quant_map.numel() != 16:
            raise ValueError(f"NF4Weight: quant_map must be fp32 (16,), got {quant_map.dtype} {tuple(quant_map.shape)}")
        if absmax.numel() != nblocks:
            raise ValueError(f"NF4Weight: absmax must have {nblocks} entries (one per block), got {absmax.numel()}")
        if nested_absmax is None:
            if absmax.dtype != torch.float32:
                raise ValueError(f"NF4Weight: absmax must be fp32 without double quant, got {absmax.dtype}")
        else:
            ng = -(-nblocks // nested_blocksize)
            if absmax.dtype != torch.uint8:
                raise ValueError(f"NF4Weight: double-quantized absmax must be uint8, got {absmax.dtype}")
            if nested_absmax.dtype != torch.float32 or nested_absmax.numel() != ng:
                raise ValueError(
                    f"NF4Weight: nested_absmax must be fp32 with {ng} entries, got {nested_absmax.dtype} "
                    f"{tuple(nested_absmax.shape)}"
                )
            if nested_quant_map is None or nested_quant_map.dtype != torch.float32 or nested_quant_map.numel() != 256:
                raise ValueError("NF4Weight: nested_quant_map must be fp32 (256,) with double quant")
            if offset is None:
                raise ValueError("NF4Weight: offset is required with double quant")
        self.data = data
        self.shape = shape
        self.blocksize = int(blocksize)
        self.dtype = dtype
        self.quant_map = quant_map.reshape(16)
        self.absmax = absmax.reshape(nblocks)
        self.nested_absmax = None if nested_absmax is None else nested_absmax.reshape(-1)
        self.nested_quant_map = None if nested_quant_map is None else nested_quant_map.reshape(256)
        self.offset = None if offset is None else float(offset)
        self.nested_blocksize = int(nested_blocksize)

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def from_float(cls, w: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> "NF4Weight":
        """Quantize a float (out, in) weight (fp16/bf16/fp32/fp64; computed in fp32) to NF4."""
        from fastft import ops

        check_nf4_args(w, blocksize)
        return ops.nf4_quantize(w.detach(), blocksize=blocksize, double_quant=double_quant)

    @classmethod
    def empty(cls, shape, blocksize: int = 64, double_quant: bool = True, dtype=torch.float32,
              device=None) -> "NF4Weight":
        """An uninitialized weight of the right layout (e.g. on the meta device, to be filled by
        ``load_state_dict``)."""
        shape = torch.Size(shape)
        if blocksize not in VALID_BLOCKSIZES:
            raise ValueError(f"NF4Weight: blocksize must be one of {VALID_BLOCKSIZES}, got {blocksize!r}")
        n = shape.numel()
        nb = -(-n // blocksize)
        data = torch.empty(((n + 1) // 2, 1), dtype=torch.uint8, device=device)
        qmap = nf4_code(device)
        if not double_quant:
            return cls(data, shape, blocksize, dtype, qmap, torch.empty(nb, dtype=torch.float32, device=device))
        ng = -(-nb // NESTED_BLOCKSIZE)
        return cls(data, shape, blocksize, dtype, qmap, torch.empty(nb, dtype=torch.uint8, device=device),
                   torch.empty(ng, dtype=torch.float32, device=device), dynamic_map(True, device), 0.0)

    # -- properties --------------------------------------------------------------------------
    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def numel(self) -> int:
        return self.shape.numel()

    @property
    def nblocks(self) -> int:
        return self.absmax.numel()

    def _tensors(self) -> dict:
        t = {"data": self.data, "quant_map": self.quant_map, "absmax": self.absmax}
        if self.double_quant:
            t["nested_absmax"] = self.nested_absmax
            t["nested_quant_map"] = self.nested_quant_map
        return t

    def _with_tensors(self, t: dict) -> "NF4Weight":
        return NF4Weight(t["data"], self.shape, self.blocksize, self.dtype, t["quant_map"], t["absmax"],
                         t.get("nested_absmax"), t.get("nested_quant_map"), self.offset, self.nested_blocksize)

    # -- decoding ----------------------------------------------------------------------------
    def absmax_fp32(self) -> torch.Tensor:
        """Per-block absmax as fp32 (nblocks,), decoding the double quantization if present."""
        if not self.double_quant:
            return self.absmax
        nb, g = self.nblocks, self.nested_blocksize
        scale = self.nested_absmax.repeat_interleave(g)[:nb]
        return self.nested_quant_map[self.absmax.long()] * scale + self.offset

    # -- bitsandbytes serialization ----------------------------------------------------------
    def to_bnb_state_dict(self, prefix: str = "") -> dict:
        """The tensors bitsandbytes' ``Linear4bit`` writes for its weight, keys ``prefix + "weight..."``.

        ``weight`` uint8 ((n+1)//2, 1), ``weight.absmax``, ``weight.quant_map``, with double quant
        ``weight.nested_absmax`` and ``weight.nested_quant_map``, and
        ``weight.quant_state.bitsandbytes__nf4`` (UTF-8 JSON: quant_type, blocksize, dtype, shape,
        [nested_blocksize, nested_dtype, nested_offset]). The codebooks are copies, so that
        safetensors (which refuses tensors sharing memory) can save many layers at once.
        """
        p = prefix + "weight"
        sd = {p: self.data, p + ".absmax": self.absmax, p + ".quant_map": self.quant_map.clone()}
        meta = {"quant_type": "nf4", "blocksize": self.blocksize, "dtype": dtype_name(self.dtype),
                "shape": list(self.shape)}
        if self.double_quant:
            sd[p + ".nested_absmax"] = self.nested_absmax
            sd[p + ".nested_quant_map"] = self.nested_quant_map.clone()
            meta.update({"nested_blocksize": self.nested_blocksize, "nested_dtype": "float32",
                         "nested_offset": self.offset})
        sd[p + "." + BNB_QS_KEY] = pack_json(meta)
        return sd

    @staticmethod
    def is_bnb_state_dict(sd: dict, prefix: str = "") -> bool:
        return (prefix + "weight." + BNB_QS_KEY) in sd

    @classmethod
    def from_bnb_state_dict(cls, sd: dict, prefix: str = "", *, source: str | None = None,
                            expected_shape=None) -> "NF4Weight":
        """Read the keys written by bitsandbytes' Linear4bit (or ``to_bnb_state_dict``), no bitsandbytes.

        Every field is checked first (``check_bnb_header`` and ``check_bnb_values``): a quant state
        that lies about the tensors next to it raises ``fastft.errors.CheckpointError`` naming
        ``source`` (the file), the key and the problem. ``expected_shape``: the layer's (out, in).
        """
        p = prefix + "weight"
        qs_key = p + "." + BNB_QS_KEY
        if qs_key not in sd:
            other = [k for k in sd if k.startswith(p + ".quant_state.")]
            if other:
                check_bnb_header(p, {k: (v.dtype, tuple(v.shape)) for k, v in sd.items()
                                     if k == p or k.startswith(p + ".")}, None, source)
            raise KeyError(f"missing key {qs_key!r}: not a bitsandbytes NF4 state dict")
        infos = {k: (v.dtype, tuple(v.shape)) for k, v in sd.items() if k == p or k.startswith(p + ".")}
        meta = check_bnb_header(p, infos, sd[qs_key], source, expected_shape)
        check_bnb_values(p, sd, meta, source)
        nested = "nested_offset" in meta
        kw = {}
        if nested:
            kw = dict(nested_absmax=sd[p + ".nested_absmax"], nested_quant_map=sd[p + ".nested_quant_map"],
                      offset=float(meta["nested_offset"]), nested_blocksize=int(meta["nested_blocksize"]))
        data = sd[p]
        if data.dtype != torch.uint8:  # a wider bnb_4bit_quant_storage (FSDP): the same bytes
            data = data.contiguous().view(torch.uint8)
        return cls(data.reshape(-1, 1), meta["shape"], int(meta["blocksize"]), getattr(torch, meta["dtype"]),
                   sd[p + ".quant_map"], sd[p + ".absmax"], **kw)

    # -- misc --------------------------------------------------------------------------------
    def __repr__(self) -> str:
        dq = f", double_quant=True, offset={self.offset:.6g}" if self.double_quant else ""
        return (f"NF4Weight(shape={tuple(self.shape)}, blocksize={self.blocksize}, dtype={self.dtype}, "
                f"device={self.device}{dq})")


__all__ = ["NF4Weight", "double_quantize_absmax", "check_bnb_header", "check_bnb_values",
           "parse_bnb_quant_state", "check_nf4_args", "VALID_BLOCKSIZES", "NESTED_BLOCKSIZE",
           "nf4_code", "dynamic_map"]
