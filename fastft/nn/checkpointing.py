"""Activation checkpointing per block, with the saved block inputs optionally offloaded to host memory.

``checkpoint_block(fn, *args, offload=None, **checkpoint_kwargs)`` runs ``fn(*args)`` under
``torch.utils.checkpoint`` (non-reentrant): only the block's inputs are kept for backward, and the
block is recomputed there. With an ``ActivationOffloader`` the kept inputs live in host memory:

* the non-reentrant checkpoint saves its inputs through a save-for-backward node *outside* its own
  saved-tensor hooks, so an offloader's ``saved_tensors_hooks`` around the call sees exactly the block
  inputs (the tensors inside the block are the checkpoint's business);
* CUDA tensors of at least ``min_bytes`` (the hidden states; the small shared cos/sin tables stay) are
  copied device -> pinned host on a side stream: the side stream waits for the compute stream (an
  event), the copy is ``non_blocking``, the source's memory is kept from reuse until the copy is done
  (``record_stream``), and an event marks the end of the copy. The host never waits;
* in backward, unpacking block k's input waits (on the device, through the event) for its
  device -> host copy and copies it back ``non_blocking`` on the side stream; it also starts the copy
  of block k - 1's input, which the recompute of block k - 1 will need next, so the transfer overlaps
  with block k's recompute and backward. The compute stream waits on the copy's event before use;
* tensors on the CPU (CPU-only machines) have nothing to move: by default they are kept as they are
  (no copy); ``copy_host=True`` copies them (the test path of the pack / unpack logic).

``stats`` counts what was packed (tensors, bytes, and where the stored copies live), for tests and
memory accounting.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch


@dataclass
class OffloadStats:
    packed: int = 0  # tensors handed to the offloader
    offloaded: int = 0  # of those, stored in host memory away from their device
    offloaded_bytes: int = 0
    kept: int = 0  # left where they were (small, or already on the host)
    unpacked: int = 0
    prefetched: int = 0
    stored_devices: dict = field(default_factory=dict)  # device type -> count of the stored tensors

    def reset(self):
        self.__init__()


def _has_streams() -> bool:
    return torch.cuda.is_available()


class _Packed:
    """One saved tensor: its host copy (or the tensor itself), the copy's event, and a weak link to
    the offloaded tensor packed before it (whose block is recomputed next in backward)."""

    __slots__ = ("host", "device", "event", "prev", "fetched", "fetch_event", "kept", "__weakref__")

    def __init__(self, host, device, event, prev, kept):
        self.host, self.device, self.event, self.prev, self.kept = host, device, event, prev, kept
        self.fetched = None
        self.fetch_event = None


class ActivationOffloader(torch.autograd.graph.saved_tensors_hooks):
    """Saved-tensor hooks that keep block inputs in (pinned) host memory; see the module docstring.

    One instance per model: ``with offloader:`` around each checkpointed block of a forward.
    ``new_pass()`` at the start of a forward cuts the prefetch chain from the previous pass.
    """

    def __init__(self, *, min_bytes: int = 1 << 20, copy_host: bool = False, prefetch: bool = True):
        self.min_bytes = int(min_bytes)
        self.copy_host = bool(copy_host)
        self.prefetch = bool(prefetch)
        self.stats = OffloadStats()
        self._last = None  # weakref to the last offloaded _Packed of the current forward
        self._streams = {}
        super().__init__(self._pack, self._unpack)

    def new_pass(self):
        self._last = None

    def _side_stream(self, device):
        s = self._streams.get(device)
        if s is None:
            s = self._streams[device] = torch.cuda.Stream(device)
        return s

    # -- pack: device -> host ------------------------------------------------------------------
    def _pack(self, t: torch.Tensor):
        st = self.stats
        st.packed += 1
        nbytes = t.numel() * t.element_size()
        if t.device.type == "cuda" and nbytes >= self.min_bytes and not t.is_sparse and not _has_streams():
            # fake CUDA tensors without a CUDA runtime (fastft.memory's traces): the same residency
            # (a host copy; a device copy again in backward), without streams or events
            rec = _Packed(t.to("cpu"), t.device, None, self._last, kept=False)
            st.offloaded += 1
            st.offloaded_bytes += nbytes
            st.stored_devices["cpu"] = st.stored_devices.get("cpu", 0) + 1
        elif t.device.type == "cuda" and nbytes >= self.min_bytes and not t.is_sparse:
            side = self._side_stream(t.device)
            side.wait_stream(torch.cuda.current_stream(t.device))
            with torch.cuda.stream(side):
                host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                host.copy_(t, non_blocking=True)
                ev = torch.cuda.Event()
                ev.record(side)
            t.record_stream(side)  # t's memory is not reused before the copy on `side` finishes
            rec = _Packed(host, t.device, ev, self._last, kept=False)
            st.offloaded += 1
            st.offloaded_bytes += nbytes
            st.stored_devices["cpu"] = st.stored_devices.get("cpu", 0) + 1
        elif t.device.type == "cpu" and self.copy_host and nbytes and nbytes >= self.min_bytes:
            host = t.detach().clone()
            rec = _Packed(host, t.device, None, self._last, kept=False)
            st.offloaded += 1
            st.offloaded_bytes += nbytes
            st.stored_devices["cpu"] = st.stored_devices.get("cpu", 0) + 1
        else:
            rec = _Packed(t, t.device, None, self._last, kept=True)
            st.kept += 1
            st.stored_devices[t.device.type] = st.stored_devices.get(t.device.type, 0) + 1
        if not rec.kept:
            self._last = weakref.ref(rec)
        return rec

    # -- unpack: host -> device, prefetching the previous block's input ------------------------
    def _fetch(self, rec: _Packed):
        """Start the host -> device copy of ``rec`` on the side stream (once)."""
        if rec.fetched is not None or rec.kept:
            return
        if rec.device.type != "cuda":
            rec.fetched = rec.host
            return
        if rec.event is None:  # traced without a CUDA runtime (see _pack)
            rec.fetched = rec.host.to(rec.device)
            return
        side = self._side_stream(rec.device)
        side.wait_event(rec.event)  # the device -> host copy has landed
        with torch.cuda.stream(side):
            dev = torch.empty_strided(rec.host.size(), rec.host.stride(), dtype=rec.host.dtype, device=rec.device)
            dev.copy_(rec.host, non_blocking=True)
            ev = torch.cuda.Event()
            ev.record(side)
        rec.fetched, rec.fetch_event = dev, ev

    def _unpack(self, rec: _Packed):
        self.stats.unpacked += 1
        if rec.kept:
            return rec.host
        self._fetch(rec)
        out = rec.fetched
        if rec.fetch_event is not None:
            cur = torch.cuda.current_stream(rec.device)
            cur.wait_event(rec.fetch_event)
            out.record_stream(cur)  # allocated on the side stream, used on the compute stream
        if self.prefetch and rec.prev is not None:
            prev = rec.prev()
            if prev is not None and prev.fetched is None and not prev.kept:
                self._fetch(prev)
                self.stats.prefetched += 1
        rec.fetched = rec.fetch_event = None  # the graph holds the result now; drop our reference
        return out


def checkpoint_block(fn, *args, offload: ActivationOffloader | None = None, **checkpoint_kwargs):
    """``torch.utils.checkpoint.checkpoint(fn, *args)`` (non-reentrant unless told otherwise), the saved
    inputs in host memory when ``offload`` is an ``ActivationOffloader``."""
    from torch.utils.checkpoint import checkpoint

    kw = {"use_reentrant": False, **checkpoint_kwargs}
    if offload is None:
        return checkpoint(fn, *args, **kw)
    if kw["use_reentrant"]:
        raise ValueError("activation offload needs non-reentrant checkpointing (use_reentrant=False)")
    with offload:
        return checkpoint(fn, *args, **kw)


def tiled_rows(fn, x: torch.Tensor, tile_rows: int) -> torch.Tensor:
    """``fn(x)`` for a row-wise ``fn`` (each row of the last dimension independent of the others: an
    MLP, not attention), in tiles of about ``tile_rows`` rows, each under a non-reentrant checkpoint:
    forward holds one tile's intermediates at a time and backward recomputes tile by tile, so the
    (rows x intermediate) activations of an MLP never exist whole (the tiled MLP of long-sequence
    training). Saved for backward: the tiles' inputs (views of ``x``). Costs one more forward of
    ``fn``. Tiles are equal (no small tail)."""
    from torch.utils.checkpoint import checkpoint

    if tile_rows < 1:
        raise ValueError(f"tiled_rows: tile_rows must be >= 1, got {tile_rows}")
    xf = x.reshape(-1, x.shape[-1])
    n = xf.shape[0]
    tiles = max(1, -(-n // int(tile_rows)))
    # split / cat, not slicing into a preallocated output: their backward moves tile-sized
    # gradients (a slice's or a slice assignment's backward allocates a full-sized one per tile)
    ys = [checkpoint(fn, t, use_reentrant=False) for t in xf.split(-(-n // tiles))]
    out = ys[0] if len(ys) == 1 else torch.cat(ys)
    del ys
    return out.view(*x.shape[:-1], out.shape[-1])


def offloading_checkpoint_function(offloader: ActivationOffloader):
    """A ``checkpoint``-compatible function (transformers' ``_gradient_checkpointing_func``) whose saved
    block inputs go through ``offloader``."""

    def fn(function, *args, **kwargs):
        return checkpoint_block(function, *args, offload=offloader, **kwargs)

    fn.offloader = offloader
    return fn


__all__ = ["ActivationOffloader", "OffloadStats", "checkpoint_block", "offloading_checkpoint_function", "tiled_rows"]
