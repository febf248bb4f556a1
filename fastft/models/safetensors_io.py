"""Memory-mapped safetensors reading with strict validation, and atomic safetensors writing.

The format (https://github.com/huggingface/safetensors): an 8-byte little-endian header length N,
N bytes of UTF-8 JSON mapping tensor names to ``{"dtype", "shape", "data_offsets": [begin, end]}``
(offsets relative to the end of the header) plus an optional ``__metadata__`` entry, then the raw
little-endian tensor bytes.

The header is parsed and validated here (rather than through ``safetensors.safe_open``) so that a
truncated or corrupt file is reported with its path and the offending tensor *before* any tensor is
read, and so that reading can control memory: each tensor is viewed zero-copy in a private mmap,
copied once into its final dtype/device, and its file pages are then dropped from this process
(``madvise(MADV_DONTNEED)``), so the resident set grows by the loaded model and not by the file.
Only little-endian hosts are supported (as by safetensors itself).
"""
from __future__ import annotations

from ..fsutil import user_mode

import json
import math
import mmap
import os
import sys
import tempfile

import torch

# safetensors dtype tag -> (torch dtype, bytes per element)
DTYPES = {
    "F64": (torch.float64, 8), "F32": (torch.float32, 4), "F16": (torch.float16, 2), "BF16": (torch.bfloat16, 2),
    "I64": (torch.int64, 8), "I32": (torch.int32, 4), "I16": (torch.int16, 2), "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1), "BOOL": (torch.bool, 1),
    "F8_E4M3": (torch.float8_e4m3fn, 1), "F8_E5M2": (torch.float8_e5m2, 1),
}
TAGS = {dt: tag for tag, (dt, _) in DTYPES.items()}
# A header bigger than this is not a plausible safetensors header (the reference reader caps it at
# 100 MB too); reading it would only waste memory on a corrupt file.
_MAX_HEADER = 100_000_000
_CHUNK_BYTES = 16 << 20


# A checkpoint file or directory that cannot be loaded; the message names the file and key
# (a ValueError, and a fastft user error: the CLI prints it as one line, exit code 3).
from ..errors import CheckpointError  # noqa: E402


class TensorInfo:
    __slots__ = ("name", "dtype", "shape", "begin", "end", "path")

    def __init__(self, name, dtype, shape, begin, end, path):
        self.name, self.dtype, self.shape, self.begin, self.end, self.path = name, dtype, shape, begin, end, path

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


class SafetensorsFile:
    """One safetensors file: validated header on open, zero-copy tensor views from a private mmap."""

    def __init__(self, path: str):
        self.path = path
        try:
            size = os.path.getsize(path)
            with open(path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
                n = int.from_bytes(head, "little")
                if n > _MAX_HEADER or 8 + n > size:
                    raise CheckpointError(
                        f"{path}: corrupt or truncated safetensors file (header length {n} but file has {size} bytes)"
                    )
                raw = f.read(n)
        except OSError as e:
            raise CheckpointError(f"{path}: cannot read safetensors file ({e})") from e
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from e
        if not isinstance(header, dict):
            raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
        self.metadata = header.pop("__metadata__", None) or {}
        self.data_start = 8 + n
        data_len = size - self.data_start
        self.tensors: dict[str, TensorInfo] = {}
        for name, e in header.items():
            try:
                tag, shape, (begin, end) = e["dtype"], [int(s) for s in e["shape"]], e["data_offsets"]
            except (KeyError, TypeError, ValueError) as err:
                raise CheckpointError(f"{path}: corrupt header entry for tensor {name!r}: {e!r}") from err
            if tag not in DTYPES:
                raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {tag!r}")
            dt, item = DTYPES[tag]
            if end - begin != math.prod(shape) * item or begin < 0:
                raise CheckpointError(
                    f"{path}: tensor {name!r} {tag}{shape} does not match its byte range [{begin}, {end})"
                )
            if end > data_len:
                raise CheckpointError(
                    f"{path}: truncated file: tensor {name!r} ends at byte {self.data_start + end} "
                    f"but the file has {size} bytes"
                )
            self.tensors[name] = TensorInfo(name, dt, tuple(shape), begin, end, path)
        # As the reference reader: the byte ranges tile the data buffer exactly, in order, no gap,
        # no overlap, nothing after the last tensor (a header that lies about any of it is refused).
        pos = 0
        for info in sorted(self.tensors.values(), key=lambda i: (i.begin, i.end)):
            if info.begin != pos:
                what = "overlaps the previous tensor" if info.begin < pos else f"leaves a gap at byte {pos}"
                raise CheckpointError(f"{path}: tensor {info.name!r} [{info.begin}, {info.end}) {what}")
            pos = info.end
        if pos != data_len:
            raise CheckpointError(f"{path}: {data_len - pos} bytes after the last tensor are not described by the "
                                  "header (corrupt or not a safetensors file)")
        self._mm = None
        self._fh = None
        self.bytes_read = 0

    def _map(self):
        if self._mm is None:
            self._fh = open(self.path, "rb")
            # ACCESS_COPY: a private, writable mapping, so torch.frombuffer gets a writable buffer (no
            # warning) while the file itself can never be modified.
            self._mm = mmap.mmap(self._fh.fileno(), 0, access=mmap.ACCESS_COPY)
        return self._mm

    def read(self, name: str, *, dtype=None, device=None) -> torch.Tensor:
        """Copy one tensor out of the file into a fresh tensor of ``dtype`` on ``device``."""
        info = self.tensors[name]
        n = info.nbytes // info.dtype.itemsize
        if info.nbytes == 0:
            target_dtype = info.dtype if dtype is None or not info.dtype.is_floating_point else dtype
            return torch.empty(info.shape, dtype=target_dtype, device=device)
        return self.read_range(name, 0, n, dtype=dtype, device=device).view(info.shape)

    def read_range(self, name: str, start: int, stop: int, *, dtype=None, device=None) -> torch.Tensor:
        """Elements ``[start, stop)`` of tensor ``name`` in row-major order, as a fresh 1-D tensor of
        ``dtype`` on ``device``: only that byte range of the file is read (e.g. the rows of one
        rank's shard). ``bytes_read`` counts the file bytes copied by this object."""
        info = self.tensors[name]
        if sys.byteorder != "little":  # pragma: no cover
            raise CheckpointError("safetensors loading needs a little-endian host")
        total = info.nbytes // info.dtype.itemsize
        if not 0 <= start <= stop <= total:
            raise ValueError(f"{self.path}: element range [{start}, {stop}) is outside tensor {name!r} "
                             f"of {total} elements")
        target_dtype = info.dtype if dtype is None or not info.dtype.is_floating_point else dtype
        item = info.dtype.itemsize
        out = torch.empty(stop - start, dtype=target_dtype, device=device or "cpu")
        if stop == start:
            return out
        mm = self._map()
        base = self.data_start + info.begin + start * item
        # Copy in chunks, dropping each chunk's file pages right after: the transient is one
        # chunk, not one tensor (an embedding alone can be a third of a small model).
        step = max(1, _CHUNK_BYTES // item)
        for a in range(0, stop - start, step):
            b = min(stop - start, a + step)
            view = torch.frombuffer(mm, dtype=info.dtype, count=b - a, offset=base + a * item)
            out[a:b].copy_(view)
            del view
            self._drop_pages(base + a * item, (b - a) * item)
        self.bytes_read += (stop - start) * item
        return out

    def _drop_pages(self, start: int, length: int):
        # The copied-from file pages would otherwise stay in this process's RSS until the mapping
        # closes, doubling peak memory; they are clean (never written), so dropping them is free.
        if hasattr(mmap, "MADV_DONTNEED"):
            page = mmap.PAGESIZE
            lo = (start // page) * page
            try:
                self._mm.madvise(mmap.MADV_DONTNEED, lo, start + length - lo)
            except (OSError, ValueError):  # pragma: no cover - advisory only
                pass

    def close(self):
        if self._mm is not None:
            self._mm.close()
            self._fh.close()
            self._mm = self._fh = None


def safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> bytes:
    """The safetensors file of ``tensors``, byte for byte the same for the same input: the library
    writes ``__metadata__`` from a hash map, whose order varies between calls once it holds two or
    more keys; the header is re-encoded here with sorted metadata (the data offsets are unchanged)."""
    from safetensors.torch import save

    raw = save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=metadata or {"format": "pt"})
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    if "__metadata__" in header:
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data start stays 8-byte aligned
    return len(text).to_bytes(8, "little") + text + raw[8 + n:]


def save_safetensors_atomic(tensors: dict[str, torch.Tensor], path: str, metadata: dict | None = None):
    """Write ``tensors`` to ``path`` via a temp file in the same directory and an atomic rename."""
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=d)
    os.close(fd)
    try:
        with open(tmp, "wb") as f:
            f.write(safetensors_bytes(tensors, metadata))
        user_mode(tmp)  # the temp file is 0600; the result gets the user's normal permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
