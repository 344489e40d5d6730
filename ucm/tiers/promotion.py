"""Promotion: blocks found only on the SSD or the remote tier, read, verified and placed in the host tier.

A load asks for the promotions of the blocks it misses in host memory. Each block is promoted once,
however many loads wait for it: a promotion pins the host page once per waiting load, so a large
batch cannot evict its own pages before they are copied out. Results per block id:

    ("host", slot, version)   in the host tier, pinned for the caller (unpin after copying)
    ("page", tensor)          no room in host memory: a private page buffer
    an exception              why the block cannot be served (missing, corrupt, evicted mid-read, ...)

A remote hit is also written through to the SSD tier, so the next process on this host finds it locally.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from ucm.tiers.flush import Flusher
from ucm.tiers.remote import RemoteTier
from ucm.tiers.slab import SlabTier, TierError, aligned_empty, page_checksum


@dataclass
class _Promotion:
    """A promotion in flight, and how many loads wait for it."""

    future: Future | None = None
    consumers: int = 1


class Promoter:
    """Starts and shares promotions; thread-safe."""

    SSD_CHUNK = 8  # blocks per SSD promotion job: one reserve and one publish per chunk
    REMOTE_CHUNK = 16  # blocks per remote promotion job: one pipelined round trip

    def __init__(self, host: SlabTier, ssd: SlabTier | None, remote: RemoteTier | None, flusher: Flusher | None,
                 io: ThreadPoolExecutor, io_threads: int, stats):
        self.host, self.ssd, self.remote, self.flusher = host, ssd, remote, flusher
        self._io, self._threads, self.stats = io, io_threads, stats
        self._lock = threading.Lock()
        self._promoting: dict[bytes, _Promotion] = {}

    def start(self, ids: list[bytes]) -> dict[bytes, Future]:
        """Futures of promotions for the ids found on SSD, or (all others) asked of the remote tier;
        shared with loads already waiting for the same blocks. Ids no tier can hold are absent."""
        out: dict[bytes, Future] = {}
        if self.ssd is None and self.remote is None:
            return out
        with self._lock:
            if self.ssd is not None:
                self.ssd.refresh()
            from_ssd: list[bytes] = []
            from_remote: list[bytes] = []
            for bid in ids:
                promo = self._promoting.get(bid)
                if promo is not None:
                    promo.consumers += 1
                    out[bid] = promo.future
                    continue
                if bid in out:
                    continue
                if self.ssd is not None and bid in self.ssd:
                    from_ssd.append(bid)
                elif self.remote is not None:
                    from_remote.append(bid)
                else:
                    continue
                self._promoting[bid] = _Promotion()
            for new, most, job in ((from_ssd, self.SSD_CHUNK, self._from_ssd),
                                   (from_remote, self.REMOTE_CHUNK, self._from_remote)):
                per = max(1, min(most, -(-len(new) // self._threads)))
                for k in range(0, len(new), per):
                    chunk = new[k:k + per]
                    fut = self._io.submit(job, chunk)
                    for bid in chunk:
                        self._promoting[bid].future = out[bid] = fut
        return out

    def _finished(self, ids: list[bytes]) -> None:
        with self._lock:
            for bid in ids:
                self._promoting.pop(bid, None)

    def _stage(self, good: list[tuple[bytes, int]], results: dict, dirty: bool = False) -> None:
        """Publish promoted (id, reserved host slot) pairs and pin each once per waiting load;
        results[id] = ("host", slot, version). `dirty`: they are written to the SSD tier now."""
        if not good:
            return
        with self._lock, self.host.lock:
            flags = self.host.publish([(bid, slot, 0) for bid, slot in good], dirty=dirty)
            for (bid, _), _fresh in zip(good, flags):
                pinned = self.host.pin(bid)
                if pinned is None:
                    results[bid] = TierError(0, "evicted from host memory right after promotion")
                    continue
                self.host.pins[pinned[0]] += self._promoting[bid].consumers - 1
                results[bid] = ("host", pinned[0], pinned[2])
        if dirty and self.flusher is not None:
            self.flusher.committed([bid for (bid, _), fresh in zip(good, flags) if fresh], now=True)

    def _from_ssd(self, ids: list[bytes]) -> dict:
        """Read blocks from SSD, verify them and place them in the host tier."""
        ssd, results = self.ssd, {}
        ssd_pins: list[int] = []
        hslots: list[int] = []
        try:
            todo = []
            for bid in ids:
                pinned = ssd.pin(bid)
                if pinned is None:
                    results[bid] = TierError(0, "evicted from SSD before it could be read")
                else:
                    ssd_pins.append(pinned[0])
                    todo.append((bid, *pinned))
            hslots = self.host.reserve(len(todo))
            good, bad = [], {}
            for k, (bid, sslot, checksum, version) in enumerate(todo):
                # no room in host memory: a private, O_DIRECT-aligned page
                page = self.host.slots.page(hslots[k]) if k < len(hslots) else aligned_empty(ssd.slot_size)
                why = None
                try:
                    ssd.slots.read(sslot, memoryview(page.numpy()))
                    if page_checksum(memoryview(page.numpy())[:ssd.page_size]) != checksum:
                        why = "checksum mismatch (corrupt page)"
                except OSError as e:
                    why = f"read failed: {e.strerror or e}"
                if not ssd.still_valid(sslot, version):
                    results[bid] = TierError(0, "evicted from SSD during the read")
                elif why is not None:
                    bad[bid] = why
                    results[bid] = TierError(0, f"SSD {why}")
                elif k < len(hslots):
                    good.append((bid, hslots[k]))
                else:
                    results[bid] = ("page", page)
            ssd.evict_corrupt(bad)
            self.stats.ssd_hits += len(good) + sum(1 for r in results.values() if isinstance(r, tuple))
            used = {slot for _, slot in good}
            self.host.release([s for s in hslots if s not in used])
            self._stage(good, results)
            return results
        except Exception as e:  # noqa: BLE001 - every id gets an answer
            for bid in ids:
                results.setdefault(bid, e)
            return results
        finally:
            for sslot in ssd_pins:
                ssd.unpin(sslot)
            self._finished(ids)

    def _from_remote(self, ids: list[bytes]) -> dict:
        """Like `_from_ssd`, from the remote tier (verified by `decode_page`), written through to SSD."""
        results: dict = {}
        hslots: list[int] = []
        try:
            fetched = list(zip(ids, self.remote.get(ids)))
            for bid, p in fetched:
                if isinstance(p, Exception):
                    results[bid] = p
            fetched = [(bid, p) for bid, p in fetched if not isinstance(p, Exception)]
            hslots = self.host.reserve(len(fetched))
            good = []
            for k, (bid, payload) in enumerate(fetched):
                if k < len(hslots):
                    page = self.host.slots.page(hslots[k])
                    good.append((bid, hslots[k]))
                else:  # no room in host memory: serve from a private buffer
                    page = torch.empty(self.host.slot_size, dtype=torch.uint8)
                    results[bid] = ("page", page)
                memoryview(page.numpy())[:self.host.page_size] = payload
            self.stats.remote_hits += len(fetched)
            self._stage(good, results, dirty=self.ssd is not None)
            hslots = []
            return results
        except Exception as e:  # noqa: BLE001 - every id gets an answer
            self.host.release(hslots)
            for bid in ids:
                results.setdefault(bid, e)
            return results
        finally:
            self._finished(ids)
