"""Flushing: committed host-tier pages written to the SSD tier on I/O threads.

A committed block is *unflushed* until its page is on the SSD (or the write failed). While unflushed it
is dirty in the host tier's index: no process evicts it, unless the disk falls behind the saves and a
newer block needs its page (index.SlotIndex.reserve); the flusher then finds it gone and moves on. `write_through`
queues every commit; `write_back` queues the oldest unflushed blocks when the host tier is 80% full.
Batches that queued up meanwhile are coalesced: one SSD reservation and one publish for all of them.
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from ucm.logger import get_logger
from ucm.tiers.slab import SlabTier, page_checksum

log = get_logger("Save")

EVICTED = "evicted from host memory before the flush"
REUSED = "host page reused during the flush"


def background_priority() -> None:
    """Keep this thread off the model's cores: nice +10, and, when the main thread is bound to some of
    the allowed cores (vLLM's CPU backend binds its OpenMP threads), run on the others. On a small
    CPU machine the cache's copies, checksums and writes must not steal the forward pass's core."""
    import os

    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
        mine, main = os.sched_getaffinity(0), os.sched_getaffinity(os.getpid())
        spare = mine - main
        if spare:
            os.sched_setaffinity(0, spare)
    except (OSError, AttributeError):
        pass


def _runs(ids: list[bytes], slots: list[int], most: int):
    """(ids, first slot) of the runs of consecutive slots, at most `most` pages each."""
    k = 0
    while k < len(ids):
        j = k + 1
        while j < len(ids) and j - k < most and slots[j] == slots[j - 1] + 1:
            j += 1
        yield ids[k:j], slots[k]
        k = j


class Flusher:
    """Writes host pages to the SSD tier in the background; thread-safe."""

    RUN_PAGES = 16  # pages per write: a 2 MiB page's run is 32 MiB, a few ms of the disk

    def __init__(self, host: SlabTier, ssd: SlabTier, io: ThreadPoolExecutor, stats, write_back: bool):
        self.host, self.ssd, self._io, self.stats = host, ssd, io, stats
        self.write_back = write_back
        self._lock = threading.Lock()
        self._unflushed: dict[bytes, None] = {}  # committed in host memory, not yet on SSD (oldest first)
        self._q: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="ucm-flush", daemon=True)
        self._thread.start()

    # ---- producers ------------------------------------------------------------------------------
    def committed(self, ids: list[bytes], now: bool = False) -> None:
        """Blocks just published dirty in the host tier: queued now (write_through, or `now`) or later."""
        if not ids:
            return
        with self._lock:
            for bid in ids:
                self._unflushed[bid] = None
        if now or not self.write_back:
            self._q.put(list(ids))

    def maybe_write_back(self, host_used: int) -> None:
        """write_back: queue the oldest quarter of the host tier once `host_used` slots reach 80%."""
        if self.write_back and host_used >= 0.8 * self.host.num_slots and self._unflushed:
            with self._lock:
                batch = list(self._unflushed)[: max(1, self.host.num_slots // 4)]
            self._q.put(batch)

    def drain(self, timeout: float | None = None) -> None:
        """Block until every queued block has been written (or failed); write_back queues them all."""
        deadline = None if timeout is None else time.monotonic() + timeout
        if self.write_back and self._unflushed:
            with self._lock:
                self._q.put(list(self._unflushed))
        while self._q.unfinished_tasks:
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError("flush to SSD did not finish in time")
            time.sleep(0.002)

    def close(self) -> None:
        self.drain()
        self._q.put(None)
        self._thread.join()

    # ---- the flushing thread --------------------------------------------------------------------
    def _loop(self) -> None:
        background_priority()
        while True:
            batches = [self._q.get()]
            while batches[-1] is not None:  # coalesce what queued up: one reservation, one publish
                try:
                    batches.append(self._q.get_nowait())
                except queue.Empty:
                    break
            try:
                ids = list(dict.fromkeys(b for batch in batches if batch for b in batch))
                if ids:
                    self._flush(ids)
            except Exception as e:  # noqa: BLE001 - the flusher must survive anything
                log.error("flush to SSD failed: %s: %s", type(e).__name__, e)
            finally:
                for _ in batches:
                    self._q.task_done()
            if batches[-1] is None:
                return

    def _done(self, ids: list[bytes]) -> None:
        with self._lock:
            for b in ids:
                self._unflushed.pop(b, None)
        self.host.mark_clean(ids)

    def _flush(self, ids: list[bytes]) -> None:
        ssd = self.ssd
        ssd.refresh()
        self.host.refresh()
        todo = [b for b in ids if b not in ssd and b in self.host]
        self._done([b for b in ids if b in ssd])
        self._evicted([b for b in ids if b not in ssd and b not in self.host])
        if not todo:
            return
        try:
            slots = ssd.reserve(len(todo))
        except OSError as e:
            self._failed(todo, f"cannot reserve SSD space: {e.strerror or e}")
            return
        if len(slots) < len(todo):
            self._failed(todo[len(slots):], "SSD tier full of pages in use")
        results: list = []
        for part in self._io.map(self._write_run, _runs(todo[:len(slots)], slots, self.RUN_PAGES)):
            results += part
        done = [(b, s, cs) for b, s, cs in zip(todo, slots, results) if isinstance(cs, int)]
        gone = [(b, s) for b, s, why in zip(todo, slots, results) if why in (EVICTED, REUSED)]
        failed = [(b, s, why) for b, s, why in zip(todo, slots, results) if isinstance(why, str) and why not in (EVICTED, REUSED)]
        if done:
            ssd.publish(done)
        ssd.release([s for _, s, _ in failed] + [s for _, s in gone])
        self._done([b for b, _, _ in done])
        self.stats.flushed_blocks += len(done)
        self._evicted([b for b, _ in gone])
        if failed:
            self._failed([b for b, _, _ in failed], failed[0][2])

    def _evicted(self, ids: list[bytes]) -> None:
        """Blocks evicted from host memory before (or while) they were written: a newer save took their
        page (index.reserve, when the disk falls behind). Not a failure: the store counted the eviction."""
        if ids:
            self._done(ids)
            log.debug("%d blocks left host memory before they reached the SSD", len(ids))

    def _failed(self, ids: list[bytes], why: str) -> None:
        self._done(ids)  # stays in host memory, becomes evictable; never half-visible on SSD
        self.stats.flush_failures += len(ids)
        self.stats.recent_errors.append((time.time(), "flush", why))
        log.warning("%d blocks not written to SSD (%s): %s", len(ids), self.ssd.dir, why)

    def _write_run(self, run: tuple[list[bytes], int]) -> list:
        """Copy host pages to consecutive SSD slots (one write); per block its checksum, or a string
        saying why not. Few Python steps per page: they hold the GIL the engine runs on."""
        ids, first = run
        out: list = [EVICTED] * len(ids)
        pinned = self.host.pin_many(ids)
        try:
            live = [k for k, p in enumerate(pinned) if p is not None]
            views = {k: memoryview(self.host.slots.page(pinned[k][0]).numpy()) for k in live}
            try:
                if len(live) == len(ids):
                    self.ssd.slots.write_run(first, [views[k] for k in live])
                else:
                    for k in live:
                        self.ssd.slots.write(first + k, views[k])
            except OSError as e:
                return [f"{e.strerror or e}"] * len(ids)
            size = self.ssd.page_size
            for k in live:
                hslot, _, version = pinned[k]
                checksum = page_checksum(views[k][:size])
                out[k] = checksum if self.host.still_valid(hslot, version) else REUSED
            return out
        finally:
            for p in pinned:
                if p is not None:
                    self.host.unpin(p[0])
