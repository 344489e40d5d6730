"""TieredStore: the Store API over a host tier (G2, shared memory), an SSD tier (G3, slab files) and a
remote tier (Redis/Valkey, shared by a fleet).

    lookup(ids) -> list[bool]          committed and readable, per id
    lookup_prefix(ids) -> int          number of leading hits
    dump(ids, offset, src) -> Task     write row i of `src` into block ids[i]'s page at byte `offset`
    load(ids, offset, dst) -> Task     read each page's bytes [offset, offset + row size) into row i of `dst`
    wait(task) -> int                  number of failed blocks (0 = success); task.errors says why
    commit(ids, success)               publish dumped blocks (or drop failed ones)
    storage_path                       where the SSD tier lives (the host tier's directory if host-only)

A page is one block's bytes (`page_size`). Dumps land in the host tier; committed blocks are flushed to
the SSD tier on I/O threads (write_through: every commit; write_back: when the host tier fills), so
`dump` never waits for the disk; committed blocks are also queued for the remote tier, whose writer
drops them rather than wait for a slow server. A load of a block found only on SSD or on the server
promotes it into the host tier (a remote hit is then written through to the SSD).
A block is never visible half-written, and a failure is reported per block, never silently: a load
that fails (missing, corrupt, evicted mid-read) is an error in `task.errors`, and a dump that cannot be
placed or flushed is logged and simply not stored.
"""

from __future__ import annotations

import os
import queue
import tempfile
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch
import xxhash

from ucm.config import UCMConfig, check_writable
from ucm.logger import get_logger
from ucm.tiers.remote import RemoteTier, encode_page
from ucm.tiers.slab import SlabTier, TierError, TierSpec, page_checksum

log_store = get_logger("Store")
log_load = get_logger("Load")
log_save = get_logger("Save")


def byte_rows(t: torch.Tensor, n: int, what: str) -> torch.Tensor:
    """View a contiguous tensor as `n` rows of bytes (row i belongs to block i)."""
    if not t.is_contiguous():
        raise ValueError(f"{what} must be contiguous (shape {tuple(t.shape)}, strides {t.stride()})")
    flat = t.reshape(-1)
    if flat.dtype != torch.uint8:
        flat = flat.view(torch.uint8)
    if n == 0 or flat.numel() % n:
        raise ValueError(f"{what} holds {flat.numel()} bytes, not a multiple of {n} blocks")
    return flat.view(n, -1)


@dataclass
class Task:
    """One dump or load. After `store.wait(task)`, `errors` maps a block's index in `ids` to why it
    failed; `failed_ids` lists those blocks."""

    kind: str
    ids: list[bytes]
    errors: dict[int, str] = field(default_factory=dict)
    _checks: list = field(default_factory=list)  # (tier, slot, version, index) to validate after copying
    _deferred: list = field(default_factory=list)  # (index, block id, promotion future, offset, dst row)
    _event: object = None
    _done: bool = False
    nbytes: int = 0  # bytes per block moved by this task

    @property
    def failed_ids(self) -> list[bytes]:
        return [self.ids[i] for i in sorted(self.errors)]

    def fail(self, i: int, why: str) -> None:
        self.errors.setdefault(i, why)


@dataclass
class _Promotion:
    """An SSD -> host promotion in flight, and how many loads wait for it."""

    future: Future | None = None
    consumers: int = 1


@dataclass
class StoreStats:
    dumped_blocks: int = 0
    dump_bytes: int = 0
    loaded_blocks: int = 0
    load_bytes: int = 0
    host_hits: int = 0
    ssd_hits: int = 0
    remote_hits: int = 0
    load_errors: int = 0
    dump_failures: int = 0
    flushed_blocks: int = 0
    flush_failures: int = 0
    recent_errors: deque = field(default_factory=lambda: deque(maxlen=32))


def background_priority() -> None:
    """Keep this thread off the model's cores: nice +10, and, when the main thread is bound to some of
    the allowed cores (vLLM's CPU backend binds its OpenMP threads), run on the others. On a small
    CPU machine the cache's copies, checksums and writes must not steal the forward pass's core."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
        mine, main = os.sched_getaffinity(0), os.sched_getaffinity(os.getpid())
        spare = mine - main
        if spare:
            os.sched_setaffinity(0, spare)
    except (OSError, AttributeError):
        pass


def _runs(rows: list[int], slots: list[int]):
    """(first row, first slot, length) of maximal runs where both rows and slots go up by one."""
    k = 0
    while k < len(rows):
        j = k + 1
        while j < len(rows) and rows[j] == rows[j - 1] + 1 and slots[j] == slots[j - 1] + 1:
            j += 1
        yield rows[k], slots[k], j - k
        k = j


def _default_host_path(config: UCMConfig) -> str:
    base = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
    key = config.ssd.path if config.ssd else "host-only"
    return os.path.join(base, f"ucm-{os.getuid()}", xxhash.xxh64_hexdigest(key.encode())[:16])


class TieredStore:
    """The Store API; thread-safe; any number of processes may open the same paths."""

    def __init__(self, config: UCMConfig, page_size: int):
        if page_size <= 0:
            raise ValueError(f"page_size must be a positive number of bytes, got {page_size}")
        self.config = config
        self.page_size = page_size
        self.stats = StoreStats()
        hc = config.host
        host_path = _default_host_path(config) if hc.path == "auto" else hc.path
        check_writable(host_path, config.source, "host.path")
        self.host = SlabTier(TierSpec("host", host_path, hc.capacity, "memory",
                                      keep_after_exit=hc.keep_after_exit), page_size)
        self.ssd: SlabTier | None = None
        if config.ssd is not None:
            sc = config.ssd
            check_writable(sc.path, config.source, "ssd.path")
            self.ssd = SlabTier(TierSpec("ssd", sc.path, sc.capacity, "file", slab_size=sc.slab_size,
                                         direct_io=sc.direct_io, fsync=sc.fsync), page_size)
        self.remote: RemoteTier | None = None
        if config.remote is not None:
            self.remote = RemoteTier(config.remote, page_size, self._remote_value, config.source)
        self._lock = threading.Lock()
        self._pending: dict[bytes, int] = {}  # dumped, not committed: id -> host slot
        self._unflushed: dict[bytes, None] = {}  # committed in host, not yet on SSD (oldest first)
        self._promoting: dict[bytes, _Promotion] = {}
        self._io = ThreadPoolExecutor(config.io_threads, thread_name_prefix="ucm-io", initializer=background_priority)
        self._flush_q: queue.Queue = queue.Queue()
        self._closed = False
        self._flusher = None
        if self.ssd is not None:
            self._flusher = threading.Thread(target=self._flush_loop, name="ucm-flush", daemon=True)
            self._flusher.start()
        log_store.info("store open: page %d B, host %d slots at %s%s, ssd %s, remote %s", page_size,
                       self.host.num_slots, self.host.dir, " (staging only)" if hc.staging else "",
                       f"{self.ssd.num_slots} slots at {self.ssd.dir}" if self.ssd else "off",
                       self.remote.where if self.remote else "off")

    # ---- queries --------------------------------------------------------------------------------
    @property
    def storage_path(self) -> str:
        return self.ssd.dir if self.ssd is not None else self.host.dir

    def lookup(self, ids: Sequence[bytes], remote: bool = True) -> list[bool]:
        """Per id: stored in some tier (`remote=False`: in a local tier; no round trip to the server)."""
        return [w != "none" for w in self.where(ids, remote)]

    def lookup_prefix(self, ids: Sequence[bytes]) -> int:
        ids = list(ids)
        self.host.refresh()
        if self.ssd is not None:
            self.ssd.refresh()
        host, ssd = self.host.index.entries, (self.ssd.index.entries if self.ssd else {})
        n = 0
        for bid in ids:
            if bid not in host and bid not in ssd:
                break
            n += 1
        if self.remote is not None and n < len(ids):
            for there in self.remote.exists(ids[n:]):  # one pipelined round trip
                if not there:
                    break
                n += 1
        return n

    def where(self, ids: Sequence[bytes], remote: bool = True) -> list[str]:
        """Per id: 'host', 'ssd', 'remote' or 'none' (`remote=False`: local tiers only)."""
        self.host.refresh()
        if self.ssd is not None:
            self.ssd.refresh()
        out = ["host" if b in self.host else "ssd" if self.ssd is not None and b in self.ssd else "none"
               for b in ids]
        if remote and self.remote is not None and "none" in out:
            missing = [k for k, w in enumerate(out) if w == "none"]
            for k, there in zip(missing, self.remote.exists([ids[k] for k in missing])):
                if there:
                    out[k] = "remote"
        return out

    # ---- dump / commit --------------------------------------------------------------------------
    def dump(self, ids: Sequence[bytes], offset: int, src: torch.Tensor) -> Task:
        ids = list(ids)
        if not ids:
            return Task("dump", ids)
        rows = byte_rows(src, len(ids), "dump source")
        nbytes = rows.shape[1]
        if offset < 0 or offset + nbytes > self.page_size:
            raise ValueError(f"dump of {nbytes} B at offset {offset} exceeds the page size {self.page_size} B")

        def fill(pages: torch.Tensor, slots: list[int], which: list[int]) -> None:
            self._copy_into_pages(rows, which, slots, offset)
        task = self.dump_into(ids, fill, cuda=rows.is_cuda)
        task.nbytes = nbytes
        self.stats.dump_bytes += nbytes * (len(ids) - len(task.errors))
        return task

    def dump_into(self, ids: Sequence[bytes], fill, cuda: bool = False) -> Task:
        """Zero-copy dump: reserve host pages for the ids not stored yet and call
        `fill(pages, slots, which)`, which must write block ids[which[k]] into pages[slots[k]]
        (pages: the host tier's [num_slots, slot_size] uint8 tensor; a kernel may write it through
        UVA). `cuda`: fill enqueued GPU work; wait() synchronizes it. Then `commit(ids)` as usual."""
        ids = list(ids)
        task = Task("dump", ids)
        if not ids:
            return task
        with self._lock:
            self.host.refresh()
            fresh: list[bytes] = []
            seen = set()
            for bid in ids:
                if bid in self._pending or bid in seen or bid in self.host or (self.ssd and bid in self.ssd):
                    continue
                seen.add(bid)
                fresh.append(bid)
            slots = self.host.reserve(len(fresh)) if fresh else []
            placed = dict(zip(fresh, slots))
            self._pending.update(placed)
        dropped = fresh[len(slots):]
        if dropped:
            self.stats.dump_failures += len(dropped)
            log_save.warning("host tier full of blocks not yet flushed: %d of %d blocks not saved",
                             len(dropped), len(fresh))
        dropped_set = set(dropped)
        which, where = [], []
        for i, bid in enumerate(ids):
            if bid in dropped_set:
                task.fail(i, "host tier full (every page holds a block not yet flushed to SSD)")
            elif bid in placed:
                which.append(i)
                where.append(placed.pop(bid))
        if which:
            fill(self.host.slots.tensor, where, which)
        if cuda:
            task._event = torch.cuda.Event()
            task._event.record()
        return task

    def commit(self, ids: Sequence[bytes], success: bool | Iterable[bool] = True) -> None:
        ids = list(ids)
        oks = [bool(success)] * len(ids) if isinstance(success, bool) else [bool(s) for s in success]
        if len(oks) != len(ids):
            raise ValueError(f"commit got {len(ids)} ids but {len(oks)} success flags")
        with self._lock:
            publish, release = [], []
            for bid, ok in zip(ids, oks):
                slot = self._pending.pop(bid, None)
                if slot is None:
                    continue
                (publish if ok else release).append((bid, slot))
            if publish:
                # dirty: a host block is not evicted (by any process) before it reached the SSD
                flags = self.host.publish([(bid, slot, 0) for bid, slot in publish], dirty=self.ssd is not None)
                fresh = [bid for (bid, _), ok in zip(publish, flags) if ok]
                self.stats.dumped_blocks += len(fresh)
                if self.ssd is not None:
                    for bid in fresh:
                        self._unflushed[bid] = None
                    if self.config.write_policy == "write_through" and fresh:
                        self._flush_q.put(fresh)
                if self.remote is not None:
                    self.remote.submit(fresh)
            self.host.release([slot for _, slot in release])
        if release:
            log_save.debug("dropped %d blocks committed as failed", len(release))
        if self.ssd is not None and self.config.write_policy == "write_back":
            self._flush_if_full()

    # ---- load -----------------------------------------------------------------------------------
    def load(self, ids: Sequence[bytes], offset: int, dst: torch.Tensor) -> Task:
        ids = list(ids)
        task = Task("load", ids)
        if not ids:
            return task
        rows = byte_rows(dst, len(ids), "load destination")
        nbytes = rows.shape[1]
        if offset < 0 or offset + nbytes > self.page_size:
            raise ValueError(f"load of {nbytes} B at offset {offset} exceeds the page size {self.page_size} B")
        hit_rows, hit_slots = self._pin_or_promote(ids, task, offset, rows)
        self._copy_from_pages(rows, hit_rows, hit_slots, offset)
        if rows.is_cuda:
            task._event = torch.cuda.Event()
            task._event.record()
        task.nbytes = nbytes
        return task

    def load_into(self, ids: Sequence[bytes], fill, cuda: bool = False) -> Task:
        """Zero-copy load: pin the blocks found in host memory, promote the ones found on SSD, and call
        `fill(pages, slots, which)` (once for the host hits, then once per promotion chunk as it
        completes, so copies overlap the disk reads); `fill` must read block ids[which[k]] from
        pages[slots[k]]. This waits for the disk. Blocks that cannot be served are in task.errors
        after wait(); no `which` names them."""
        ids = list(ids)
        task = Task("load", ids)
        if not ids:
            return task
        hit_rows, hit_slots = self._pin_or_promote(ids, task, None, None)
        if hit_rows:
            fill(self.host.slots.tensor, hit_slots, hit_rows)
        by_future: dict = {}
        for i, bid, fut, _, _ in task._deferred:
            by_future.setdefault(fut, []).append((i, bid))
        task._deferred = []
        for fut in as_completed(by_future):
            rows, slots = [], []
            for i, bid in by_future[fut]:
                where = fut.result()[bid]
                if isinstance(where, Exception) or where[0] != "host":
                    task.fail(i, str(where) if isinstance(where, Exception) else "no room in host memory to stage it")
                    continue
                _, slot, version = where
                rows.append(i)
                slots.append(slot)
                task._checks.append((self.host, slot, version, i))
            if rows:
                fill(self.host.slots.tensor, slots, rows)
        if cuda:
            task._event = torch.cuda.Event()
            task._event.record()
        task.nbytes = self.page_size
        return task

    def _pin_or_promote(self, ids: list[bytes], task: Task, offset, rows):
        """Pin host hits (returned as rows, slots); start promotions for SSD hits (task._deferred)."""
        self.host.refresh()
        hit_rows, hit_slots, misses = [], [], []
        for i, bid in enumerate(ids):
            pinned = self.host.pin(bid)
            if pinned is not None:
                slot, _, version = pinned
                hit_rows.append(i)
                hit_slots.append(slot)
                task._checks.append((self.host, slot, version, i))
                self.stats.host_hits += 1
            else:
                misses.append(i)
        if misses:
            futures = self._promotions([ids[i] for i in misses])
            for i in misses:
                fut = futures.get(ids[i])
                if fut is None:
                    task.fail(i, "not found in any tier")
                else:
                    task._deferred.append((i, ids[i], fut, offset, None if rows is None else rows[i]))
        return hit_rows, hit_slots

    def _copy_into_pages(self, rows: torch.Tensor, which: list[int], slots: list[int], offset: int) -> None:
        """pages[slots[k], offset:+n] = rows[which[k]]; consecutive runs move in one copy."""
        pages = self.host.slots.tensor[:, offset:offset + rows.shape[1]]
        for r, sl, k in _runs(which, slots):
            pages[sl:sl + k].copy_(rows[r:r + k], non_blocking=rows.is_cuda)

    def _copy_from_pages(self, rows: torch.Tensor, which: list[int], slots: list[int], offset: int) -> None:
        """rows[which[k]] = pages[slots[k], offset:+n]; consecutive runs move in one copy."""
        pages = self.host.slots.tensor[:, offset:offset + rows.shape[1]]
        for r, sl, k in _runs(which, slots):
            rows[r:r + k].copy_(pages[sl:sl + k], non_blocking=rows.is_cuda)

    PROMOTE_CHUNK = 8  # blocks per SSD promotion job: one reserve and one publish per chunk
    REMOTE_CHUNK = 16  # blocks per remote promotion job: one pipelined round trip

    def _promotions(self, ids: list[bytes]) -> dict[bytes, Future]:
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
                elif bid in out or bid in self._promoting:
                    continue
                elif self.ssd is not None and bid in self.ssd:
                    from_ssd.append(bid)
                elif self.remote is not None:
                    from_remote.append(bid)
                else:
                    continue
                self._promoting.setdefault(bid, _Promotion())
            for new, most, job in ((from_ssd, self.PROMOTE_CHUNK, self._promote_chunk),
                                   (from_remote, self.REMOTE_CHUNK, self._promote_remote)):
                per = max(1, min(most, -(-len(new) // self.config.io_threads)))
                for k in range(0, len(new), per):
                    chunk = new[k:k + per]
                    fut = self._io.submit(job, chunk)
                    for bid in chunk:
                        self._promoting[bid].future = out[bid] = fut
        return out

    def _promote_remote(self, ids: list[bytes]) -> dict:
        """Like `_promote_chunk`, from the remote tier (verified by `decode_page`). A promoted block is
        also written through to the SSD tier, so the next process on this machine finds it locally."""
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
                    page = torch.empty(self.page_size, dtype=torch.uint8)
                    results[bid] = ("page", page)
                memoryview(page.numpy())[:self.page_size] = payload
            self.stats.remote_hits += len(fetched)
            self._stage_in_host(good, results, dirty=self.ssd is not None)
            hslots = []
            return results
        except Exception as e:  # noqa: BLE001 - every id gets an answer
            self.host.release(hslots)
            for bid in ids:
                results.setdefault(bid, e)
            return results
        finally:
            with self._lock:
                for bid in ids:
                    self._promoting.pop(bid, None)

    def _stage_in_host(self, good: list[tuple[bytes, int]], results: dict, dirty: bool = False) -> None:
        """Publish promoted (id, reserved host slot) pairs and pin each once per waiting load (a large
        batch cannot evict itself); results[id] = ("host", slot, version). `dirty`: queue them for the
        SSD tier too."""
        if not good:
            return
        with self._lock, self.host.lock:
            flags = self.host.publish([(bid, slot, 0) for bid, slot in good], dirty=dirty)
            for (bid, _), fresh in zip(good, flags):
                if dirty and fresh:
                    self._unflushed[bid] = None
                pinned = self.host.pin(bid)
                if pinned is None:
                    results[bid] = TierError(0, "evicted from host memory right after promotion")
                    continue
                self.host.pins[pinned[0]] += self._promoting[bid].consumers - 1
                results[bid] = ("host", pinned[0], pinned[2])
        if dirty:
            self._flush_q.put([bid for bid, _ in good])

    def _promote_chunk(self, ids: list[bytes]) -> dict:
        """Read blocks from SSD, verify them, and place them in the host tier, pinned once per waiting
        load. Per id: ("host", slot, version), ("page", tensor) when the host tier had no room, or an
        exception saying why the block cannot be served."""
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
            good, bad = [], []
            for k, (bid, sslot, checksum, version) in enumerate(todo):
                if k < len(hslots):
                    page = self.host.slots.page(hslots[k])
                else:  # no room in host memory: serve from a private, O_DIRECT-aligned buffer
                    page = torch.empty(ssd.slot_size + 4096, dtype=torch.uint8)
                    skew = (-page.data_ptr()) % 4096
                    page = page[skew:skew + ssd.slot_size]
                why = None
                try:
                    ssd.slots.read(sslot, memoryview(page.numpy()))
                    if page_checksum(memoryview(page.numpy())[:self.page_size]) != checksum:
                        why = "checksum mismatch (corrupt page)"
                except OSError as e:
                    why = f"read failed: {e.strerror or e}"
                if not ssd.still_valid(sslot, version):
                    results[bid] = TierError(0, "evicted from SSD during the read")
                elif why is not None:
                    bad.append(bid)
                    log_load.error("SSD block %s in %s: %s; evicted", bid.hex()[:12], ssd.dir, why)
                    results[bid] = TierError(0, f"SSD {why}")
                elif k < len(hslots):
                    good.append((bid, hslots[k]))
                else:
                    results[bid] = ("page", page)
            if bad:
                ssd.evict(bad)  # drop bad blocks so lookups stop offering them
            self.stats.ssd_hits += len(good) + sum(1 for r in results.values() if isinstance(r, tuple))
            unused = [s for s in hslots if s not in {slot for _, slot in good}]
            self.host.release(unused)
            self._stage_in_host(good, results)
            return results
        except Exception as e:  # noqa: BLE001 - every id gets an answer
            for bid in ids:
                results.setdefault(bid, e)
            return results
        finally:
            for sslot in ssd_pins:
                ssd.unpin(sslot)
            with self._lock:
                for bid in ids:
                    self._promoting.pop(bid, None)

    def wait(self, task: Task) -> int:
        """Finish a task; returns the number of failed blocks (0 = all succeeded)."""
        if task._done:
            return len(task.errors)
        if task._event is not None:
            task._event.synchronize()
        for tier, slot, version, i in task._checks:
            if not tier.still_valid(slot, version):
                task.fail(i, f"{tier.name} page reused by another process during the copy")
            tier.unpin(slot)
        for i, bid, fut, offset, row in task._deferred:
            where = fut.result()[bid]
            if isinstance(where, Exception):
                task.fail(i, str(where) if isinstance(where, TierError) else f"{type(where).__name__}: {where}")
                continue
            if where[0] == "page":
                row.copy_(where[1][offset:offset + row.numel()])
                continue
            _, slot, version = where
            row.copy_(self.host.slots.page(slot)[offset:offset + row.numel()])
            if row.is_cuda:
                torch.cuda.current_stream().synchronize()
            if not self.host.still_valid(slot, version):
                task.fail(i, "host page reused by another process during the copy")
            self.host.unpin(slot)
        task._checks, task._deferred, task._done = [], [], True
        if task.kind == "load":
            ok = len(task.ids) - len(task.errors)
            self.stats.loaded_blocks += ok
            self.stats.load_bytes += ok * task.nbytes
            if task.errors:
                self.stats.load_errors += len(task.errors)
                first = min(task.errors)
                self.stats.recent_errors.append((time.time(), "load", task.errors[first]))
                log_load.warning("%d of %d blocks failed to load; first: block %s: %s", len(task.errors),
                                 len(task.ids), task.ids[first].hex()[:12], task.errors[first])
        return len(task.errors)

    # ---- flushing to SSD ------------------------------------------------------------------------
    def _flush_if_full(self) -> None:
        used = len(self.host.index.entries) + len(self._pending)
        if used >= 0.8 * self.host.num_slots and self._unflushed:
            with self._lock:
                batch = list(self._unflushed)[: max(1, self.host.num_slots // 4)]
            self._flush_q.put(batch)

    def _flush_loop(self) -> None:
        background_priority()
        while True:
            batches = [self._flush_q.get()]
            while batches[-1] is not None:  # coalesce what queued up: one reservation, one publish
                try:
                    batches.append(self._flush_q.get_nowait())
                except queue.Empty:
                    break
            try:
                ids = list(dict.fromkeys(b for batch in batches if batch for b in batch))
                if ids:
                    self._flush(ids)
            except Exception as e:  # noqa: BLE001 - the flusher must survive anything
                log_save.error("flush to SSD failed: %s: %s", type(e).__name__, e)
            finally:
                for _ in batches:
                    self._flush_q.task_done()
            if batches[-1] is None:
                return

    def _flush(self, ids: list[bytes]) -> None:
        ssd = self.ssd
        ssd.refresh()
        todo = [b for b in ids if b not in ssd]
        already = [b for b in ids if b in ssd]
        for b in already:
            self._unflushed.pop(b, None)
        self.host.mark_clean(already)
        if not todo:
            return
        try:
            slots = ssd.reserve(len(todo))
        except OSError as e:
            self._flush_failed(todo, f"cannot reserve SSD space: {e.strerror or e}")
            return
        if len(slots) < len(todo):
            self._flush_failed(todo[len(slots):], "SSD tier full of pages in use")
        results = list(self._io.map(self._write_one, todo[:len(slots)], slots))
        done = [(b, s, cs) for b, s, cs in zip(todo, slots, results) if isinstance(cs, int)]
        failed = [(b, s, why) for b, s, why in zip(todo, slots, results) if isinstance(why, str)]
        if done:
            ssd.publish(done)
        ssd.release([s for _, s, _ in failed])
        for b, _, _ in done:
            self._unflushed.pop(b, None)
        self.host.mark_clean([b for b, _, _ in done])
        self.stats.flushed_blocks += len(done)
        if failed:
            self._flush_failed([b for b, _, _ in failed], failed[0][2])

    def _flush_failed(self, ids: list[bytes], why: str) -> None:
        for b in ids:
            self._unflushed.pop(b, None)
        self.host.mark_clean(ids)  # stays in host memory, becomes evictable; never half-visible
        self.stats.flush_failures += len(ids)
        self.stats.recent_errors.append((time.time(), "flush", why))
        log_save.warning("%d blocks not written to SSD (%s): %s", len(ids), self.ssd.dir, why)

    def _write_one(self, bid: bytes, sslot: int):
        """Copy one host page to an SSD slot; its checksum, or a string saying why not."""
        pinned = self.host.pin(bid)
        if pinned is None:
            return "evicted from host memory before the flush"
        hslot, _, version = pinned
        try:
            view = memoryview(self.host.slots.page(hslot).numpy())
            self.ssd.slots.write(sslot, view)
            checksum = page_checksum(view[:self.page_size])
            if not self.host.still_valid(hslot, version):
                return "host page reused during the flush"
            return checksum
        except OSError as e:
            return f"{e.strerror or e}"
        finally:
            self.host.unpin(hslot)

    def _remote_value(self, bid: bytes):
        """For the remote writer: the stored value of a host-tier page, or None if it left host memory."""
        pinned = self.host.pin(bid)
        if pinned is None:
            return None
        hslot, _, version = pinned
        try:
            value = encode_page(bid, self.host.slots.page(hslot)[:self.page_size].numpy())
            return value if self.host.still_valid(hslot, version) else None
        finally:
            self.host.unpin(hslot)

    def flush(self, timeout: float | None = None) -> None:
        """Block until every committed block queued for SSD and the remote tier has been written (or
        failed, or dropped)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        if self.remote is not None and not self.remote.flush(timeout):
            raise TimeoutError("writes to the remote tier did not finish in time")
        if self.ssd is None:
            return
        if self.config.write_policy == "write_back" and self._unflushed:
            self._flush_q.put(list(self._unflushed))
        while self._flush_q.unfinished_tasks:
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError("flush to SSD did not finish in time")
            time.sleep(0.002)

    # ---- lifecycle ------------------------------------------------------------------------------
    def usage(self) -> dict:
        """Blocks and bytes per tier (live view, all processes)."""
        out = {}
        for tier in (self.host, self.ssd):
            if tier is None:
                continue
            tier.refresh()
            out[tier.name] = {"blocks": len(tier.index.entries), "bytes": tier.used_bytes(),
                              "capacity": tier.num_slots * tier.slot_size, "path": tier.dir}
        if self.remote is not None:
            out["remote"] = self.remote.usage()
        return out

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._flusher is not None:
            self.flush()
            self._flush_q.put(None)
            self._flusher.join()
        if self.remote is not None:
            self.remote.close()
        self._io.shutdown(wait=True)
        with self._lock:
            self.host.release(list(self._pending.values()))
            self._pending.clear()
        self.host.close()
        if self.ssd is not None:
            self.ssd.close()

    def __enter__(self) -> "TieredStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"TieredStore(page_size={self.page_size}, host={self.host.dir}, ssd={self.storage_path})"


_SHARED: dict = {}
_SHARED_LOCK = threading.Lock()


def shared_store(config: UCMConfig, page_size: int) -> TieredStore:
    """One TieredStore per (configuration, page size) in this process, closed at exit (in vLLM's
    single-process mode the scheduler and the worker share it)."""
    import atexit

    key = (config, page_size)  # UCMConfig is frozen and compares without its source
    with _SHARED_LOCK:
        store = _SHARED.get(key)
        if store is None or store._closed:
            store = _SHARED[key] = TieredStore(config, page_size)
            atexit.register(store.close)
        return store


def close_shared() -> None:
    """Close every shared store of this process (for processes that leave through os._exit)."""
    with _SHARED_LOCK:
        stores = list(_SHARED.values())
        _SHARED.clear()
    for store in stores:
        store.close()
