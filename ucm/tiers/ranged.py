"""Layer-ordered reads of SSD pages straight into caller memory.

A page holds one block across all layers, layer after layer. `RangedLoad` reads the pages of many
blocks group by group (a group is a set of byte ranges of the page, e.g. the segments of a few layers):
every block's group 0 first, then every block's group 1, ... With the destination being the KV cache
itself, a forward pass can run layer 0 while later layers are still on the disk, and no CPU copies
the bytes (the device DMAs them into place under O_DIRECT).

Each page is verified against its stored checksum (streamed over the ranges in page order as the groups
arrive) and its slot version after the reads; a block that fails either is reported by `finish()`, so
the caller can have it recomputed.

Two engines: with O_DIRECT and 4 KiB aligned destinations, every read is submitted at once through
Linux AIO and completions are collected by `wait_group` in the caller's thread (no I/O thread has to
win the GIL from a busy forward pass to issue its next read); otherwise I/O threads read, through an
aligned bounce buffer where O_DIRECT cannot target the destination. Checksums are fed as groups
arrive (on one checksum thread for AIO, on the I/O threads otherwise).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Sequence

import xxhash

from ucm.logger import get_logger
from ucm.tiers import aio
from ucm.tiers.slab import aligned_empty

log = get_logger("Load")
DIRECT_ALIGN = 4096  # bytes; covers 512 B and 4 KiB logical sectors
AIO_WINDOW = 32  # reads in flight: enough to keep a disk busy, few enough that group 0 comes first


@dataclass(frozen=True)
class PageRange:
    """Bytes [page_offset, page_offset + length) of a page."""

    page_offset: int
    length: int


Dest = Callable[[int, PageRange], int]  # (block index, range) -> byte address where the range goes


def _runs(ranges: Sequence[PageRange]) -> list[list[PageRange]]:
    """Ranges grouped into runs that are contiguous in the page (one preadv each)."""
    out: list[list[PageRange]] = []
    for r in sorted(ranges, key=lambda r: r.page_offset):
        if out and out[-1][-1].page_offset + out[-1][-1].length == r.page_offset:
            out[-1].append(r)
        else:
            out.append([r])
    return out


_AIO: list[bool] = []
# one thread feeds the checksums of AIO loads: off the caller's critical path, without a crowd of
# threads taking turns at the GIL (xxh3 itself runs without it)
_HASHER = ThreadPoolExecutor(1, thread_name_prefix="ucm-checksum")


def _aio_ok() -> bool:
    if not _AIO:
        _AIO.append(aio.available())
        if not _AIO[0]:
            log.info("Linux AIO unavailable: layer-wise reads use I/O threads")
    return _AIO[0]


def _view(addr: int, length: int) -> memoryview:
    return memoryview((ctypes.c_char * length).from_address(addr)).cast("B")


class RangedLoad:
    """Read `ids` (blocks committed to `ssd`, a SlabTier) into memory given by `dest`, group by group.

    groups: per group, the page ranges it covers; together they must tile the page [0, page_size).
    Call `wait_group(g)` before using group g's bytes, and `finish()` once: it returns
    {block index: why} for the blocks whose bytes must not be used.
    """

    def __init__(self, ssd, ids: Sequence[bytes], groups: Sequence[Sequence[PageRange]], dest: Dest,
                 page_size: int, pool: ThreadPoolExecutor, on_finish=None):
        """`on_finish(n, errors, ids, page_size, ssd=True)`: told the outcome once (the store's stats)."""
        covered = sorted((r for g in groups for r in g), key=lambda r: r.page_offset)
        pos = 0
        for r in covered:
            if r.page_offset != pos:
                raise ValueError(f"page ranges leave a gap or overlap at byte {pos} (next range {r})")
            pos += r.length
        if pos != page_size:
            raise ValueError(f"page ranges cover {pos} B of a {page_size} B page")
        self.ssd, self.ids, self.dest, self.page_size = ssd, list(ids), dest, page_size
        self._on_finish = on_finish
        self.groups = [_runs(g) for g in groups]
        self.errors: dict[int, str] = {}
        self._pins: list[tuple[int, int, object] | None] = []
        self._lock = threading.Lock()
        self._left = [len(self.ids)] * len(groups)  # reads outstanding per group
        self._done = [threading.Event() for _ in groups]
        self._arrived = [set() for _ in self.ids]  # groups read, per block
        self._hashed = [0] * len(self.ids)  # groups fed to the checksum, in order
        self._hashers = [xxhash.xxh3_64() for _ in self.ids]
        self._block_locks = [threading.Lock() for _ in self.ids]
        self._order = sorted(range(len(groups)), key=lambda g: min(r.page_offset for r in groups[g]))
        self._finished = False
        ssd.refresh()
        for i, bid in enumerate(self.ids):
            pinned = ssd.pin(bid)
            self._pins.append(pinned)
            if pinned is None:
                self.errors[i] = "not in the SSD tier (evicted, or never stored)"
        self._pool = pool
        try:
            self._aio = self._start_aio()
        except Exception:
            for pinned in self._pins:  # nothing was submitted: give the slots back before failing
                if pinned is not None:
                    ssd.unpin(pinned[0])
            raise
        if self._aio is None:
            self._futures = [pool.submit(self._read, i, g) for g in range(len(groups)) for i in range(len(self.ids))]

    # ---- AIO engine -----------------------------------------------------------------------------
    def _start_aio(self) -> "aio.AIOContext | None":
        """Submit every read (group 0 of every block first) when AIO applies; None when it does not."""
        if not self.ssd.slots.direct or not _aio_ok():
            return None
        reads, self._runs_left = [], {}
        for g, runs in enumerate(self.groups):
            for i, pinned in enumerate(self._pins):
                if pinned is None:
                    continue
                fd, base = self.ssd.slots.locate(pinned[0])
                self._runs_left[(i, g)] = len(runs)
                for run in runs:
                    iov = [(self.dest(i, r), r.length) for r in run]
                    if any(a % DIRECT_ALIGN or n % DIRECT_ALIGN for a, n in iov):
                        return None
                    reads.append((len(reads), fd, base + run[0].page_offset, iov, i, g, sum(n for _, n in iov)))
        try:
            ctx = aio.acquire(AIO_WINDOW)
        except OSError as e:  # e.g. the system-wide aio-max-nr is used up: I/O threads instead
            log.warning("no AIO context (%s); layer-wise reads use I/O threads", e)
            return None
        self._reads, self._next, self._futures = reads, 0, []
        for g in range(len(self.groups)):  # groups with nothing to read (every block failed) are done
            self._left[g] = sum(1 for (_, gg) in self._runs_left if gg == g)
            if self._left[g] == 0:
                self._done[g].set()
        self._aio = ctx
        self._submit_more()
        return ctx

    def _submit_more(self) -> None:
        room = self._aio.depth - self._aio.in_flight
        batch = self._reads[self._next:self._next + room]
        try:
            self._next += self._aio.submit_preadv([(tag, fd, off, iov) for tag, fd, off, iov, *_ in batch])
        except OSError as e:  # the reads not submitted fail their blocks; nothing waits for them
            self._fail_unsubmitted(f"read failed: {e}")

    def _fail_unsubmitted(self, why: str) -> None:
        for _, _, _, _, i, g, _ in self._reads[self._next:]:
            self.errors.setdefault(i, why)
            self._runs_left[(i, g)] -= 1
            if self._runs_left[(i, g)] == 0:
                self._left[g] -= 1
                if self._left[g] == 0:
                    self._done[g].set()
        self._next = len(self._reads)

    def _reap(self, min_nr: int) -> None:
        for tag, res in self._aio.reap(min_nr, self._aio.depth):
            _, _, _, _, i, g, want = self._reads[tag]
            if res != want and i not in self.errors:
                self.errors[i] = (f"read failed: {os.strerror(-res)}" if res < 0 else
                                  f"read failed: short read ({res} of {want} bytes): slab file truncated")
            self._runs_left[(i, g)] -= 1
            if self._runs_left[(i, g)] == 0:
                self._left[g] -= 1
                if i not in self.errors:
                    self._futures.append(_HASHER.submit(self._arrived_group, i, g))
                if self._left[g] == 0:
                    self._done[g].set()
        if self._next < len(self._reads):
            self._submit_more()

    # ---- I/O threads ----------------------------------------------------------------------------
    def _read(self, i: int, g: int) -> None:
        try:
            if self._pins[i] is not None and i not in self.errors:
                slot = self._pins[i][0]
                fd, base = self.ssd.slots.locate(slot)
                for run in self.groups[g]:
                    self._read_run(fd, base, i, run)
                self._arrived_group(i, g)
        except Exception as e:  # noqa: BLE001 - a failed read is a failed block, never a crash
            with self._lock:
                self.errors.setdefault(i, f"read failed: {getattr(e, 'strerror', None) or e}")
        finally:
            with self._lock:
                self._left[g] -= 1
                if self._left[g] == 0:
                    self._done[g].set()

    def _read_run(self, fd: int, base: int, i: int, run: list[PageRange]) -> None:
        addrs = [self.dest(i, r) for r in run]
        total = sum(r.length for r in run)
        offset = base + run[0].page_offset
        direct = all(a % DIRECT_ALIGN == 0 and r.length % DIRECT_ALIGN == 0 for a, r in zip(addrs, run))
        if direct or not self.ssd.slots.direct:
            n = os.preadv(fd, [_view(a, r.length) for a, r in zip(addrs, run)], offset)
        else:  # O_DIRECT needs aligned memory: read into a bounce buffer, then place the bytes
            bounce = aligned_empty(total, DIRECT_ALIGN)
            n = os.preadv(fd, [memoryview(bounce.numpy())], offset)
            src = bounce.data_ptr()
            for a, r in zip(addrs, run):
                ctypes.memmove(a, src, r.length)
                src += r.length
        if n != total:
            raise OSError(f"short read ({n} of {total} bytes): slab file truncated")

    def _arrived_group(self, i: int, g: int) -> None:
        """Feed block i's groups to its checksum in page order, as far as they have arrived."""
        with self._block_locks[i]:  # one feeder per block at a time keeps the order; xxh3 drops the GIL
            self._arrived[i].add(g)
            while self._hashed[i] < len(self._order) and self._order[self._hashed[i]] in self._arrived[i]:
                for run in self.groups[self._order[self._hashed[i]]]:
                    for r in run:
                        self._hashers[i].update(_view(self.dest(i, r), r.length))
                self._hashed[i] += 1

    # ---- caller ---------------------------------------------------------------------------------
    def wait_group(self, g: int) -> None:
        """Block until group g's reads are done (failed ones included: finish() reports them)."""
        try:
            if self._aio is not None and self._aio.in_flight:
                self._reap(0)  # collect what finished meanwhile and refill the window
            while self._aio is not None and not self._done[g].is_set():
                if self._aio.in_flight == 0 and self._next >= len(self._reads):
                    raise RuntimeError("reads accounted wrongly: nothing in flight, group not done")
                self._reap(1)
        except Exception as e:  # noqa: BLE001 - never raise into the forward pass; fail what is left
            log.error("layer-wise read failed: %s: %s", type(e).__name__, e)
            ctx, self._aio = self._aio, None
            if ctx is not None:
                with contextlib.suppress(OSError):  # the kernel must not write after we report failure
                    while ctx.in_flight:
                        ctx.reap(ctx.in_flight, ctx.depth)
                aio.release(ctx)
            for (i, _), left in self._runs_left.items():
                if left:
                    self.errors.setdefault(i, f"read failed: {e}")
            for ev in self._done:
                ev.set()
        self._done[g].wait()

    def finish(self) -> dict[int, str]:
        """Wait for every read, verify each page, unpin; {block index: why} of unusable blocks."""
        if self._finished:
            return self.errors
        if self._aio is not None:
            for g in range(len(self.groups)):
                self.wait_group(g)
            if self._aio is not None:
                aio.release(self._aio)
                self._aio = None
        for f in self._futures:
            f.result()
        bad: dict[bytes, str] = {}
        for i, pinned in enumerate(self._pins):
            if pinned is None:
                continue
            slot, checksum, version = pinned
            if i not in self.errors:
                if (self._hashers[i].intdigest() or 1) != checksum:
                    self.errors[i] = "checksum mismatch (corrupt page)"
                    bad[self.ids[i]] = self.errors[i]
                elif not self.ssd.still_valid(slot, version):
                    self.errors[i] = "evicted from SSD during the read"
            elif self.errors[i].startswith("read failed"):
                bad[self.ids[i]] = self.errors[i]
            self.ssd.unpin(slot)
        self.ssd.evict_corrupt(bad)
        if self._on_finish is not None:
            self._on_finish(len(self.ids), self.errors, self.ids, self.page_size, ssd=True)
        self._finished = True
        return self.errors
