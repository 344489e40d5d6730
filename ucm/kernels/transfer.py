"""HostTransfer: move blocks between vLLM's paged KV cache and host pages (the host tier's slots).

Two designs for a GPU cache, chosen by `mode` (config key `gpu_transfer`):

* `staged` (default): a full-grid pack kernel gathers blocks into a GPU staging ring in a fraction of a
  millisecond, then one DMA copy per run of consecutive host slots moves them. The copy engine does the
  PCIe transfer, so a matrix product running beside it keeps its SMs (bench/results/kernels.md: 1.05x
  the longer of the two, against 1.28-1.32x for direct with 4-8 programs).
* `direct`: the kernel writes (reads) pinned host memory itself through UVA, with a persistent grid of
  `programs` programs; no staging memory.

For a CPU cache (vLLM's CPU backend) both are the vectorised torch path straight into the pages.
All work is enqueued on the current stream; `synchronize()` waits for it. Saves and loads may run at
once on two streams (two threads), so each direction stages through its own ring. The transfer layer alone
touches the device: it registers host memory with CUDA (`register_host`) and owns the events.

Layer-wise loads (`from_host_groups`): a load's pages go in layer groups (spans of each page), group
after group on the current stream, with an event after each, so the forward pass can start on layer 0
while later layers are in flight. `staged`: per group, one strided DMA per run of consecutive host slots
(dma.py) into the ring, then the kernel scatters that group's segments; `direct`, or host pages too
scattered for few DMAs: the kernel reads each group straight from pinned host memory.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Sequence

import torch

from ucm.kernels import dma
from ucm.kernels.copy_blocks import pack, unpack
from ucm.kernels.layout import KVLayout

MODES = ("staged", "direct")
RUN_LIMIT = 64  # runs of host slots per batch above which a layer group is read by the kernel, not DMA


def _runs(values: Sequence[int]):
    """(start index, length) of runs of consecutive values."""
    k = 0
    while k < len(values):
        j = k + 1
        while j < len(values) and values[j] == values[j - 1] + 1:
            j += 1
        yield k, j - k
        k = j


def _recorded(stream) -> torch.cuda.Event:
    """An event recorded on `stream` now."""
    ev = torch.cuda.Event()
    ev.record(stream)
    return ev


class GroupCopies:
    """One load's copies, enqueued layer group by layer group on one stream."""

    def __init__(self, events: list):
        self.events = events  # one per group, in order (none on a CPU: copies there are done on return)

    def wait(self, group: int) -> None:
        """Make the current stream wait until `group` has landed (the host does not wait)."""
        if self.events:
            torch.cuda.current_stream().wait_event(self.events[group])

    def synchronize(self) -> None:
        """Wait on the host until every group has landed."""
        if self.events:
            self.events[-1].synchronize()


class HostTransfer:
    def __init__(self, layout: KVLayout, mode: str = "staged", programs: int = 8, ring_bytes: int = 256 << 20,
                 staging: bool | None = None):
        """`programs`: persistent grid of the direct kernel; `ring_bytes`: GPU staging for `staged`;
        `staging`: go through the ring (default: on a GPU; tests force it on a CPU to check its logic)."""
        if mode not in MODES:
            raise ValueError(f"gpu_transfer must be one of {MODES}, got {mode!r}")
        self.layout = layout
        self.mode = mode
        self.programs = programs
        self.gpu = layout.device.type == "cuda"
        self.staging = self.gpu if staging is None else staging
        self._registered: list[int] = []
        self._ring_pages = max(1, ring_bytes // layout.page_size)
        self._rings: dict[tuple[bool, int], torch.Tensor] = {}  # (to_host, stream) -> staging, made at first use
        self._spans: dict[tuple[int, int], KVLayout] = {}  # (page offset, bytes) -> the layout of that span
        self._sides: dict[int, torch.cuda.Stream] = {}  # a load's stream -> the stream of its scatters
        self._arange: torch.Tensor | None = None  # 0, 1, ... on the device (_rows)
        self.host_copies = 0  # host<->device copies enqueued so far, one per run of consecutive host slots

    def register_host(self, pages: torch.Tensor) -> bool:
        """Pin host memory the kernels read and write (the host tier's pages) with cudaHostRegister, so
        DMA and UVA reach it; True if it is pinned. Call `unregister_host` before the memory goes."""
        if not self.gpu or pages.is_pinned():
            return pages.is_pinned()
        rc = torch.cuda.cudart().cudaHostRegister(pages.data_ptr(), pages.numel() * pages.element_size(), 0)
        if int(rc) != 0:
            return False
        self._registered.append(pages.data_ptr())
        return True

    def unregister_host(self) -> None:
        for ptr in self._registered:
            torch.cuda.cudart().cudaHostUnregister(ptr)
        self._registered = []

    def synchronize(self) -> None:
        """Wait until the copies enqueued so far (on the current stream) are done."""
        if self.gpu:
            torch.cuda.current_stream().synchronize()

    def save(self, task, block_ids: Sequence[int]) -> None:
        """Fill a prepared dump (the store's `prepare_dump` task: `pages`, `placed` (index, slot) pairs)
        from KV blocks block_ids[index], and wait for the copies; then the caller commits."""
        if task.placed:
            self.to_host([block_ids[i] for i, _ in task.placed], task.pages, [s for _, s in task.placed])
        self.synchronize()

    def restore(self, task, block_ids: Sequence[int]) -> None:
        """Copy a prepared load (the store's `prepare_load` task) into KV blocks block_ids[index], batch by
        batch as its pages become readable, and wait for the copies; then the caller waits on the task."""
        for pages, slots, which in task.ready():
            self.from_host([block_ids[i] for i in which], pages, slots)
        self.synchronize()

    def to_host(self, block_ids: Sequence[int], pages: torch.Tensor, slots: Sequence[int]) -> None:
        """pages[slots[k]] <- KV block block_ids[k] (all layers)."""
        self._move(block_ids, pages, slots, True)

    def from_host(self, block_ids: Sequence[int], pages: torch.Tensor, slots: Sequence[int]) -> None:
        """KV block block_ids[k] <- pages[slots[k]]."""
        self._move(block_ids, pages, slots, False)

    def _index(self, values: Sequence[int]) -> torch.Tensor:
        """int64 indices on the layout's device (uploaded without a host wait)."""
        t = torch.tensor(list(values), dtype=torch.int64)
        return t.pin_memory().to(self.layout.device, non_blocking=True) if self.gpu else t

    def _ring(self, to_host: bool) -> torch.Tensor:
        """The staging ring of this direction on the current stream (work on one stream runs in order,
        so a ring is reused safely; loads on two streams get two rings)."""
        key = (to_host, torch.cuda.current_stream().cuda_stream if self.gpu else 0)
        ring = self._rings.get(key)
        if ring is None:
            ring = self._rings[key] = torch.empty((self._ring_pages, self.layout.page_size), dtype=torch.uint8,
                                                  device=self.layout.device)
        return ring

    def _direct(self, pages: torch.Tensor) -> bool:
        """The kernel reaches these pages itself: a CPU cache, or `direct` and pinned pages (the kernel
        reaches pinned host memory only; unpinned pages are staged)."""
        return not self.staging or (self.mode == "direct" and (not self.gpu or pages.is_pinned()))

    def _move(self, block_ids, pages, slots, to_host: bool) -> None:
        if len(block_ids) == 0:
            return
        if self._direct(pages):
            kw = {"num_programs": self.programs} if self.gpu else {}
            (pack if to_host else unpack)(self.layout, self._index(block_ids), pages, self._index(slots), **kw)
            return
        ring = self._ring(to_host)
        if not to_host and ring.shape[0] >= 2:
            self._load_in_halves(list(block_ids), pages, list(slots), ring)
            return
        cap = ring.shape[0]
        ids, slots = list(block_ids), list(slots)
        size = self.layout.page_size
        for c in range(0, len(ids), cap):
            chunk_ids, chunk_slots = ids[c:c + cap], slots[c:c + cap]
            idx = self._index(chunk_ids)
            n = len(chunk_ids)
            if to_host:
                pack(self.layout, idx, ring[:n])
            for k, length in _runs(chunk_slots):
                self.host_copies += 1
                host = pages[chunk_slots[k]:chunk_slots[k] + length, :size]
                if to_host:
                    host.copy_(ring[k:k + length], non_blocking=True)
                else:
                    ring[k:k + length].copy_(host, non_blocking=True)
            if not to_host:
                unpack(self.layout, idx, ring[:n])

    def _load_in_halves(self, ids: list[int], pages: torch.Tensor, slots: list[int], ring: torch.Tensor) -> None:
        """A staged load through the two halves of the ring: the DMA into one half runs while a second
        stream scatters the other, so the copy engine never waits for the kernel. The caller's stream
        waits for the scatters at the end."""
        half = ring.shape[0] // 2
        halves = (ring[:half], ring[half:2 * half])
        size = self.layout.page_size
        cur = torch.cuda.current_stream() if self.gpu else None
        side = self._side_stream(cur)
        idx = self._index(ids)
        freed: list = [None, None]  # the scatter that last read each half
        for c, start in enumerate(range(0, len(ids), half)):
            buf, part = halves[c % 2], slots[start:start + half]
            if freed[c % 2] is not None:
                cur.wait_event(freed[c % 2])
            for k, length in _runs(part):
                self.host_copies += 1
                buf[k:k + length].copy_(pages[part[k]:part[k] + length, :size], non_blocking=True)
            if side is None:
                unpack(self.layout, idx[start:start + len(part)], buf[:len(part)])
                continue
            side.wait_event(_recorded(cur))
            with torch.cuda.stream(side):
                unpack(self.layout, idx[start:start + len(part)], buf[:len(part)])
                freed[c % 2] = _recorded(side)
        if side is not None:
            idx.record_stream(side)  # its memory is not reused before the scatters are done
            cur.wait_stream(side)

    def _side_stream(self, cur):
        """The scatter stream paired with stream `cur` (None on a CPU)."""
        if cur is None:
            return None
        side = self._sides.get(cur.cuda_stream)
        if side is None:
            side = self._sides[cur.cuda_stream] = torch.cuda.Stream(device=self.layout.device)
        return side

    # ---- layer-wise loads -------------------------------------------------------------------------
    def span_layout(self, offset: int, nbytes: int) -> KVLayout:
        """The layout of page bytes [offset, offset + nbytes) (whole segments): a page of that span."""
        key = (offset, nbytes)
        sub = self._spans.get(key)
        if sub is None:
            segs = tuple(replace(s, page_offset=s.page_offset - offset) for s in self.layout.segments
                         if offset <= s.page_offset < offset + nbytes)
            if sum(s.length for s in segs) != nbytes:
                raise ValueError(f"page bytes [{offset}, {offset + nbytes}) are not whole segments of "
                                 f"{self.layout.describe()}")
            sub = self._spans[key] = replace(self.layout, segments=segs, page_size=nbytes)
        return sub

    def from_host_groups(self, batches: Sequence[tuple[Sequence[int], torch.Tensor, Sequence[int]]],
                         spans: Sequence[tuple[int, int]]) -> GroupCopies:
        """For each (block_ids, pages, slots) batch, KV block block_ids[k] <- pages[slots[k]], span by span
        (`spans`: (page offset, bytes) of each layer group, in layer order), enqueued on the current
        stream with an event after each span; returns at once on a GPU."""
        work = [_HostBatch(self, ids, pages, slots) for ids, pages, slots in batches if ids]
        events = []
        for offset, nbytes in spans:
            sub = self.span_layout(offset, nbytes)
            for batch in work:
                self._group_in(sub, offset, batch)
            if self.gpu:
                events.append(_recorded(torch.cuda.current_stream()))
        return GroupCopies(events)

    def _rows(self, n: int) -> torch.Tensor:
        """0..n-1 on the device: the ring rows of a chunk, as the scatter's page index."""
        if self._arange is None or self._arange.numel() < n:
            self._arange = torch.arange(max(n, self._ring_pages), device=self.layout.device)
        return self._arange[:n]

    def _group_in(self, sub: KVLayout, offset: int, batch: "_HostBatch") -> None:
        """One span of one batch: one strided copy per run of slots into the ring, then the scatter kernel;
        straight from the pages when the kernel reaches them (or they are too scattered for few copies)."""
        nbytes, pages = sub.page_size, batch.pages
        view = pages[:, offset:offset + nbytes]
        if batch.direct or (self.gpu and batch.pinned and len(batch.runs) > RUN_LIMIT):
            unpack(sub, batch.idx, view, batch.where, **({"num_programs": self.programs} if self.gpu else {}))
            return
        flat = self._ring(False).view(-1)
        cap = flat.numel() // nbytes
        for c, part, runs in batch.chunks(cap):
            rows = flat[:part * nbytes].view(part, nbytes)
            self.host_copies += dma.copy_runs(rows, view, ((k, batch.slots[c + k], length) for k, length in runs))
            unpack(sub, batch.idx[c:c + cap], rows, self._rows(part))


class _HostBatch:
    """One batch of a layer-wise load, with what each of its layer groups reuses: the indices on the
    device, whether the kernel reads the pages itself, and the runs of consecutive host slots (on the
    H200, passes over the slots in every group cost ~12 ms of a 2,000-block load's 32 ms of enqueueing)."""

    def __init__(self, xfer: HostTransfer, ids: Sequence[int], pages: torch.Tensor, slots: Sequence[int]):
        self.pages, self.slots = pages, list(slots)
        self.idx, self.where = xfer._index(ids), xfer._index(self.slots)
        self.pinned = pages.is_pinned()
        self.direct = xfer._direct(pages)
        self.runs = list(_runs(self.slots))
        self._chunks: dict[int, list[tuple[int, int, list[tuple[int, int]]]]] = {}

    def chunks(self, cap: int) -> list[tuple[int, int, list[tuple[int, int]]]]:
        """(first index, slots, runs (index within, length)) of each chunk of at most `cap` slots."""
        out = self._chunks.get(cap)
        if out is None:
            out = self._chunks[cap] = [(c, len(part), list(_runs(part)))
                                       for c in range(0, len(self.slots), cap) for part in (self.slots[c:c + cap],)]
        return out
