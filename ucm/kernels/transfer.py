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
"""

from __future__ import annotations

from typing import Sequence

import torch

from ucm.kernels.copy_blocks import pack, unpack
from ucm.kernels.layout import KVLayout

MODES = ("staged", "direct")


def _runs(values: Sequence[int]):
    """(start index, length) of runs of consecutive values."""
    k = 0
    while k < len(values):
        j = k + 1
        while j < len(values) and values[j] == values[j - 1] + 1:
            j += 1
        yield k, j - k
        k = j


class HostTransfer:
    def __init__(self, layout: KVLayout, mode: str = "staged", programs: int = 8, ring_bytes: int = 256 << 20):
        """`programs`: persistent grid of the direct kernel; `ring_bytes`: GPU staging for `staged`."""
        if mode not in MODES:
            raise ValueError(f"gpu_transfer must be one of {MODES}, got {mode!r}")
        self.layout = layout
        self.mode = mode
        self.programs = programs
        self.gpu = layout.device.type == "cuda"
        self._registered: list[int] = []
        self._ring_pages = max(1, ring_bytes // layout.page_size)
        self._rings: dict[bool, torch.Tensor] = {}  # to_host -> GPU staging, made at first use

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

    def _move(self, block_ids, pages, slots, to_host: bool) -> None:
        if len(block_ids) == 0:
            return
        dev = self.layout.device
        # direct: the kernel reaches pinned host memory only; unpinned pages are staged like `staged`
        direct = self.mode == "direct" and (not self.gpu or pages.is_pinned())
        if not self.gpu or direct:
            idx = torch.as_tensor(list(block_ids), dtype=torch.int64)
            where = torch.as_tensor(list(slots), dtype=torch.int64)
            if self.gpu:
                idx, where = idx.to(dev, non_blocking=True), where.to(dev, non_blocking=True)
            kw = {"num_programs": self.programs} if self.gpu else {}
            (pack if to_host else unpack)(self.layout, idx, pages, where, **kw)
            return
        ring = self._rings.get(to_host)
        if ring is None:
            ring = self._rings[to_host] = torch.empty((self._ring_pages, self.layout.page_size), dtype=torch.uint8,
                                                      device=dev)
        cap = ring.shape[0]
        ids, slots = list(block_ids), list(slots)
        size = self.layout.page_size
        for c in range(0, len(ids), cap):
            chunk_ids, chunk_slots = ids[c:c + cap], slots[c:c + cap]
            idx = torch.tensor(chunk_ids, dtype=torch.int64).to(dev, non_blocking=True)
            n = len(chunk_ids)
            if to_host:
                pack(self.layout, idx, ring[:n])
            for k, length in _runs(chunk_slots):
                host = pages[chunk_slots[k]:chunk_slots[k] + length, :size]
                if to_host:
                    host.copy_(ring[k:k + length], non_blocking=True)
                else:
                    ring[k:k + length].copy_(host, non_blocking=True)
            if not to_host:
                unpack(self.layout, idx, ring[:n])
