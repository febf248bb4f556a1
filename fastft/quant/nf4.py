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
    def from_bnb_state_dict(cls, sd: dict, prefix: str = "") -> "NF4Weight":
        """Read the keys written by bitsandbytes' Linear4bit (or ``to_bnb_state_dict``), no bitsandbytes."""
        p = prefix + "weight"
        qs_key = p + "." + BNB_QS_KEY
        if qs_key not in sd:
            other = [k for k in sd if k.startswith(p + ".quant_state.")]
            if other:
                raise ValueError(f"{other[0]}: only NF4 quant states are supported (expected {qs_key})")
            raise KeyError(f"missing key {qs_key!r}: not a bitsandbytes NF4 state dict")
        meta = unpack_json(sd[qs_key], qs_key)
        for k in ("quant_type", "blocksize", "dtype", "shape"):
            if k not in meta:
                raise ValueError(f"{qs_key}: JSON lacks {k!r}")
        if meta["quant_type"] != "nf4":
            raise ValueError(f"{qs_key}: quant_type {meta['quant_type']!r} is not 'nf4'")
        shape = meta["shape"]
        if shape is None or len(shape) != 2:
            raise ValueError(f"{qs_key}: shape must be [out_features, in_features], got {shape}")

        def need(key):
            if key not in sd:
                raise KeyError(f"missing key {key!r} for the NF4 weight {p!r}")
            return sd[key]

        data = need(p)
        if data.dtype != torch.uint8:  # bitsandbytes' quant_storage may be a wider dtype (FSDP)
            data = data.contiguous().view(torch.uint8)
        data = data.reshape(-1, 1)
        dtype = dtype_from_name(meta["dtype"], qs_key)
        nested = "nested_offset" in meta
        kw = {}
        if nested:
            for k in ("nested_blocksize", "nested_dtype"):
                if k not in meta:
                    raise ValueError(f"{qs_key}: JSON lacks {k!r}")
            if meta["nested_dtype"] != "float32":
                raise ValueError(f"{qs_key}: nested_dtype {meta['nested_dtype']!r} is not 'float32'")
            kw = dict(nested_absmax=need(p + ".nested_absmax").float(),
                      nested_quant_map=need(p + ".nested_quant_map").float(),
                      offset=float(meta["nested_offset"]), nested_blocksize=int(meta["nested_blocksize"]))
        return cls(data, shape, int(meta["blocksize"]), dtype, need(p + ".quant_map").float(),
                   need(p + ".absmax"), **kw)

    # -- misc --------------------------------------------------------------------------------
    def __repr__(self) -> str:
        dq = f", double_quant=True, offset={self.offset:.6g}" if self.double_quant else ""
        return (f"NF4Weight(shape={tuple(self.shape)}, blocksize={self.blocksize}, dtype={self.dtype}, "
                f"device={self.device}{dq})")


__all__ = ["NF4Weight", "double_quantize_absmax", "check_nf4_args", "VALID_BLOCKSIZES", "NESTED_BLOCKSIZE",
           "nf4_code", "dynamic_map"]
