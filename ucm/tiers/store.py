"""TieredStore: the Store API over a host tier (G2, shared memory), an SSD tier (G3, slab files) and a
remote tier (Redis/Valkey, shared by a fleet).

The public API (DESIGN.md, docs/debugging.md), on tensors of page bytes:

    lookup(ids) -> list[bool]          committed and readable, per id
    lookup_prefix(ids) -> int          number of leading hits
    dump(ids, offset, src) -> Task     write row i of `src` into block ids[i]'s page at byte `offset`
    load(ids, offset, dst) -> Task     read each page's bytes [offset, offset + row size) into row i of `dst`
    wait(task) -> int                  number of failed blocks (0 = success); task.errors says why
    commit(ids, success)               publish dumped blocks (or drop failed ones)
    storage_path                       where the SSD tier lives (the host tier's directory if host-only)

is built on the primitives that the connector uses with its own copy engine (vLLM's prepare/complete
style; the caller moves the bytes, and synchronizes its device before completing):

    prepare_dump(ids) -> Task          reserve host pages for the ids not stored yet: task.placed
    commit(ids, success)               complete a dump: publish (or release) the pages
    prepare_load(ids) -> Task          pin host hits, start promotions of SSD/remote hits: task.ready()
    wait(task)                         complete a load: verify nothing reused a page mid-copy, unpin
    load_layers(ids, groups, dest)     SSD pages read by layer groups straight into caller memory

A page is one block's bytes (`page_size`). Dumps land in the host tier; committed blocks are flushed to
the SSD tier in the background (flush.py), so a dump never waits for the disk; committed blocks are also
queued for the remote tier, whose writer drops them rather than wait for a slow server. A load of a
block found only on SSD or on the server promotes it into the host tier (promotion.py).
A block is never visible half-written, and a failure is reported per block, never silently: a load
that fails (missing, corrupt, evicted mid-read) is an error in `task.errors`, and a dump that cannot be
placed or flushed is logged and simply not stored. No CUDA here: device work is the caller's.
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Sequence

import torch
import xxhash

from ucm.config import UCMConfig, check_writable
from ucm.logger import get_logger
from ucm.tiers.flush import Flusher, background_priority
from ucm.tiers.flush_process import FlushProcess
from ucm.tiers.promotion import Promoter
from ucm.tiers.ranged import Dest, PageRange, RangedLoad
from ucm.tiers.remote import RemoteTier, encode_page
from ucm.tiers.slab import SlabTier, TierError, TierSpec, round_up

log_store = get_logger("Store")
log_load = get_logger("Load")
log_save = get_logger("Save")

__all__ = ["Task", "TieredStore", "TierRoot", "close_shared", "shared_store", "tier_roots"]


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
    failed; `failed_ids` lists those blocks.

    Dumps (`prepare_dump`): `placed` lists (index in ids, host slot) pairs whose page the caller writes
    in `pages` (the host tier's [num_slots, slot_size] uint8 tensor) before `commit`. Loads
    (`prepare_load`): `ready()` yields the readable pages batch by batch (host hits first, then each
    promotion as it lands), so copies overlap the disk reads."""

    kind: str
    ids: list[bytes]
    errors: dict[int, str] = field(default_factory=dict)
    pages: torch.Tensor | None = None
    placed: list[tuple[int, int]] = field(default_factory=list)
    _hits: tuple[list[int], list[int]] = ((), ())  # loads: (indexes, host slots) pinned at prepare
    _promotions: dict = field(default_factory=dict)  # loads: future -> [(index, id)]
    _checks: list = field(default_factory=list)  # (slot, version, index) to validate, then unpin
    _done: bool = False
    nbytes: int = 0  # bytes per block moved by this task

    @property
    def failed_ids(self) -> list[bytes]:
        return [self.ids[i] for i in sorted(self.errors)]

    def fail(self, i: int, why: str) -> None:
        self.errors.setdefault(i, why)

    def ready(self) -> Iterator[tuple[torch.Tensor, list[int], list[int]]]:
        """Loads: (pages, slots, which) batches: block ids[which[k]] is readable at pages[slots[k]]
        (the host tier, or a private buffer where host memory had no room). Blocks that cannot be
        served are in `errors` and in no batch. Waits for the disk and the server."""
        hit_rows, hit_slots = self._hits
        if hit_rows:
            yield self.pages, list(hit_slots), list(hit_rows)
        pending, self._promotions = self._promotions, {}
        for fut in as_completed(pending):
            rows, slots, private = [], [], []
            for i, bid in pending[fut]:
                where = fut.result()[bid]
                if isinstance(where, Exception):
                    self.fail(i, str(where) if isinstance(where, TierError) else f"{type(where).__name__}: {where}")
                elif where[0] == "page":
                    private.append((i, where[1]))
                else:
                    _, slot, version = where
                    rows.append(i)
                    slots.append(slot)
                    self._checks.append((slot, version, i))
            if rows:
                yield self.pages, slots, rows
            if private:
                yield torch.stack([p for _, p in private]), list(range(len(private))), [i for i, _ in private]


@dataclass(frozen=True)
class TierRoot:
    """Where a tier of a configuration keeps its pages: `root`/p<page_size>/ per page size."""

    name: str  # "host" or "ssd"
    root: str
    capacity: int  # bytes

    def page_sizes(self) -> list[int]:
        """Page sizes that have a directory under the root."""
        if not os.path.isdir(self.root):
            return []
        return sorted(int(d[1:]) for d in os.listdir(self.root) if d.startswith("p") and d[1:].isdigit())

    def slot_size(self, page_size: int) -> int:
        return round_up(page_size)

    def tier_dir(self, page_size: int) -> str:
        return os.path.join(self.root, f"p{page_size}")


def _default_host_path(config: UCMConfig) -> str:
    base = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
    key = config.ssd.path if config.ssd else "host-only"
    return os.path.join(base, f"ucm-{os.getuid()}", xxhash.xxh64_hexdigest(key.encode())[:16])


def tier_roots(config: UCMConfig) -> list[TierRoot]:
    """The local tiers of a configuration, host first (the host path resolved when it is "auto")."""
    hc = config.host
    out = [TierRoot("host", _default_host_path(config) if hc.path == "auto" else hc.path, hc.capacity)]
    if config.ssd is not None:
        out.append(TierRoot("ssd", config.ssd.path, config.ssd.capacity))
    return out


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
    unflushed_evicted: int = 0  # blocks evicted from host memory before they reached the SSD (a slower disk)
    flushed_blocks: int = 0
    flush_failures: int = 0
    recent_errors: deque = field(default_factory=lambda: deque(maxlen=32))


def page_runs(rows: list[int], slots: list[int]):
    """(first row, first slot, length) of maximal runs where both rows and slots go up by one."""
    k = 0
    while k < len(rows):
        j = k + 1
        while j < len(rows) and rows[j] == rows[j - 1] + 1 and slots[j] == slots[j - 1] + 1:
            j += 1
        yield rows[k], slots[k], j - k
        k = j


class TieredStore:
    """The Store API; thread-safe; any number of processes may open the same paths. `readonly`: look
    at what the tiers hold (diagnostics) without creating, locking, writing or dropping anything."""

    def __init__(self, config: UCMConfig, page_size: int, readonly: bool = False):
        if page_size <= 0:
            raise ValueError(f"page_size must be a positive number of bytes, got {page_size}")
        self.config = config
        self.page_size = page_size
        self.readonly = readonly
        self.stats = StoreStats()
        hc = config.host
        roots = {r.name: r for r in tier_roots(config)}
        if not readonly:
            check_writable(roots["host"].root, config.source, "host.path")
        self.host = SlabTier(TierSpec("host", roots["host"].root, hc.capacity, "memory",
                                      keep_after_exit=hc.keep_after_exit, readonly=readonly,
                                      owned_parents=2 if hc.path == "auto" else 0), page_size)
        self.ssd: SlabTier | None = None
        if config.ssd is not None:
            sc = config.ssd
            if not readonly:
                check_writable(sc.path, config.source, "ssd.path")
            self.ssd = SlabTier(TierSpec("ssd", sc.path, sc.capacity, "file", slab_size=sc.slab_size,
                                         direct_io=sc.direct_io, fsync=sc.fsync, readonly=readonly), page_size)
        self.remote: RemoteTier | None = None
        if config.remote is not None:
            self.remote = RemoteTier(config.remote, page_size, self._remote_value, config.source)
        self._lock = threading.Lock()
        self._pending: dict[bytes, int] = {}  # dumped, not committed: id -> host slot
        self._closed = False
        self._io = self.flusher = self.promoter = None
        self._spare_unflushed: int | None = None  # no SSD: host blocks are never unflushed
        self._evict_warned = 0.0
        if readonly:
            return
        self._io = ThreadPoolExecutor(config.io_threads, thread_name_prefix="ucm-io", initializer=background_priority)
        if self.ssd is not None:
            write_back = config.write_policy == "write_back"
            local = lambda: Flusher(self.host, self.ssd, self._io, self.stats, write_back)  # noqa: E731
            self.flusher = (FlushProcess(self.host, self.ssd, config.io_threads, self.stats, write_back, local)
                            if config.ssd.writer == "process" else local())
            # a full host tier of unflushed blocks takes new saves in place of its oldest unflushed ones, but
            # not the writer's next runs (Flusher.RUN_PAGES per I/O thread)
            self._spare_unflushed = min(config.io_threads * Flusher.RUN_PAGES, self.host.num_slots // 4)
        self.promoter = Promoter(self.host, self.ssd, self.remote, self.flusher, self._io, config.io_threads,
                                 self.stats)
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
        host, ssd = self._local_entries()
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
        """Per id: 'host', 'ssd', 'remote' or 'none' (`remote=False`: local tiers only): the fastest
        tier holding it."""
        host, ssd = self._local_entries()
        out = ["host" if b in host else "ssd" if b in ssd else "none" for b in ids]
        if remote and self.remote is not None and "none" in out:
            missing = [k for k, w in enumerate(out) if w == "none"]
            for k, there in zip(missing, self.remote.exists([ids[k] for k in missing])):
                if there:
                    out[k] = "remote"
        return out

    def holders(self, ids: Sequence[bytes], remote: bool = True) -> list[tuple[str, ...]]:
        """Per id: every tier holding it, fastest first, e.g. ('host', 'ssd'); () where none does. For
        diagnostics: it asks the remote tier about every id (where() asks only about local misses)."""
        host, ssd = self._local_entries()
        there = self.remote.exists(list(ids)) if remote and self.remote is not None else [False] * len(ids)
        return [tuple(t for t, held in (("host", b in host), ("ssd", b in ssd), ("remote", r)) if held)
                for b, r in zip(ids, there)]

    def _local_entries(self) -> tuple[dict, dict]:
        """The host and SSD tiers' committed entries (id -> entry), refreshed from their logs."""
        self.host.refresh()
        if self.ssd is None:
            return self.host.index.entries, {}
        self.ssd.refresh()
        return self.host.index.entries, self.ssd.index.entries

    def _writable(self) -> None:
        if self.readonly:
            raise PermissionError(f"store {self.storage_path} is open read-only")

    # ---- dump / commit --------------------------------------------------------------------------
    def prepare_dump(self, ids: Sequence[bytes]) -> Task:
        """Reserve host pages for the ids not stored (or being stored) yet: `task.placed` lists the
        (index, slot) pairs whose page in `task.pages` the caller writes, then `commit(ids, ...)`.
        Ids already stored need nothing; ids that find no page are failed in `task.errors`."""
        self._writable()
        ids = list(ids)
        task = Task("dump", ids, pages=self.host.slots.tensor, nbytes=self.page_size)
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
            evicted = self.host.index.unflushed_evicted
            slots = self.host.reserve(len(fresh), self._spare_unflushed) if fresh else []
            evicted = self.host.index.unflushed_evicted - evicted
            placed = dict(zip(fresh, slots))
            self._pending.update(placed)
        if evicted:
            self.stats.unflushed_evicted += evicted
            if time.monotonic() - self._evict_warned > 10:
                self._evict_warned = time.monotonic()
                log_save.warning("the SSD writes slower than blocks are saved: %d blocks not yet on the SSD were "
                                 "evicted from host memory for newer ones (%d so far; ucm stats)", evicted,
                                 self.stats.unflushed_evicted)
        dropped = set(fresh[len(slots):])
        if dropped:
            self.stats.dump_failures += len(dropped)
            log_save.warning("host tier full of pages in use: %d of %d blocks not saved", len(dropped), len(fresh))
        for i, bid in enumerate(ids):
            if bid in dropped:
                task.fail(i, "host tier full (every page in use: being read or written, or the SSD writer's next)")
            elif bid in placed:
                task.placed.append((i, placed.pop(bid)))
        return task

    def _rows(self, t: torch.Tensor, n: int, offset: int, what: str) -> torch.Tensor:
        """`t` as n rows of bytes that fit in a page at `offset`."""
        rows = byte_rows(t, n, f"{what} {'source' if what == 'dump' else 'destination'}")
        if offset < 0 or offset + rows.shape[1] > self.page_size:
            raise ValueError(f"{what} of {rows.shape[1]} B at offset {offset} exceeds the page size {self.page_size} B")
        return rows

    def dump(self, ids: Sequence[bytes], offset: int, src: torch.Tensor) -> Task:
        ids = list(ids)
        if not ids:
            return Task("dump", ids)
        rows = self._rows(src, len(ids), offset, "dump")
        nbytes = rows.shape[1]
        task = self.prepare_dump(ids)
        task.nbytes = nbytes
        which, slots = [i for i, _ in task.placed], [s for _, s in task.placed]
        pages = task.pages[:, offset:offset + nbytes]
        for r, sl, k in page_runs(which, slots):
            pages[sl:sl + k].copy_(rows[r:r + k])
        return task

    def commit(self, ids: Sequence[bytes], success: bool | Iterable[bool] = True) -> None:
        ids = list(ids)
        oks = [bool(success)] * len(ids) if isinstance(success, bool) else [bool(s) for s in success]
        if len(oks) != len(ids):
            raise ValueError(f"commit got {len(ids)} ids but {len(oks)} success flags")
        fresh: list[bytes] = []
        with self._lock:
            publish, release = [], []
            for bid, ok in zip(ids, oks):
                slot = self._pending.pop(bid, None)
                if slot is None:
                    continue
                (publish if ok else release).append((bid, slot))
            if publish:
                # dirty: a host block is not evicted before it reached the SSD, unless the disk falls behind
                # the saves and a newer block needs the page (SlotIndex.reserve)
                flags = self.host.publish([(bid, slot, 0) for bid, slot in publish], dirty=self.ssd is not None)
                fresh = [bid for (bid, _), ok in zip(publish, flags) if ok]
                self.stats.dumped_blocks += len(fresh)
                self.stats.dump_bytes += len(fresh) * self.page_size
            self.host.release([slot for _, slot in release])
            pending = len(self._pending)
        if release:
            log_save.debug("dropped %d blocks committed as failed", len(release))
        if self.flusher is not None:
            self.flusher.committed(fresh)
            self.flusher.maybe_write_back(len(self.host.index.entries) + pending)
        if self.remote is not None:
            self.remote.submit(fresh)

    # ---- load -----------------------------------------------------------------------------------
    def prepare_load(self, ids: Sequence[bytes]) -> Task:
        """Pin the blocks found in host memory and start promotions of those on SSD or the server;
        the caller copies each batch of `task.ready()` out, synchronizes its device, then `wait(task)`."""
        self._writable()
        ids = list(ids)
        task = Task("load", ids, pages=self.host.slots.tensor, nbytes=self.page_size)
        if not ids:
            return task
        self.host.refresh()
        hit_rows, hit_slots, misses = [], [], []
        for i, pinned in enumerate(self.host.pin_many(ids)):
            if pinned is not None:
                slot, _, version = pinned
                hit_rows.append(i)
                hit_slots.append(slot)
                task._checks.append((slot, version, i))
            else:
                misses.append(i)
        self.stats.host_hits += len(hit_rows)
        task._hits = (hit_rows, hit_slots)
        if misses:
            futures = self.promoter.start([ids[i] for i in misses])
            for i in misses:
                fut = futures.get(ids[i])
                if fut is None:
                    task.fail(i, "not found in any tier")
                else:
                    task._promotions.setdefault(fut, []).append((i, ids[i]))
        return task

    def load(self, ids: Sequence[bytes], offset: int, dst: torch.Tensor) -> Task:
        ids = list(ids)
        task = Task("load", ids)
        if not ids:
            return task
        rows = self._rows(dst, len(ids), offset, "load")
        nbytes = rows.shape[1]
        task = self.prepare_load(ids)
        task.nbytes = nbytes
        for pages, slots, which in task.ready():
            src = pages[:, offset:offset + nbytes]
            for r, sl, k in page_runs(which, slots):
                rows[r:r + k].copy_(src[sl:sl + k])
        return task

    def load_layers(self, ids: Sequence[bytes], groups: Sequence[Sequence[PageRange]], dest: Dest,
                    pool: ThreadPoolExecutor) -> RangedLoad:
        """Read SSD pages group by group straight into caller memory (`ranged.RangedLoad`: wait_group
        as the forward pass reaches each group, then `finish`); its results count in this store's stats."""
        self._writable()
        if self.ssd is None:
            raise ValueError("layer-wise loads read the SSD tier; this store has none")
        return RangedLoad(self.ssd, list(ids), groups, dest, self.page_size, pool, on_finish=self._count_load)

    def _count_load(self, n: int, errors: dict[int, str], ids: list[bytes], nbytes: int, ssd: bool) -> None:
        ok = n - len(errors)
        self.stats.loaded_blocks += ok
        self.stats.load_bytes += ok * nbytes
        if ssd:
            self.stats.ssd_hits += ok
        if errors:
            self.stats.load_errors += len(errors)
            first = min(errors)
            self.stats.recent_errors.append((time.time(), "load", errors[first]))
            log_load.warning("%d of %d blocks failed to load; first: block %s: %s", len(errors), n,
                             ids[first].hex()[:12], errors[first])

    def wait(self, task: Task) -> int:
        """Finish a task; returns the number of failed blocks (0 = all succeeded). A load's pages must
        have been copied out (device work synchronized) before: nothing may reuse them after this."""
        if task._done:
            return len(task.errors)
        if task.kind == "load":
            if task._promotions:  # promotions the caller never consumed: take and release their pins
                for _ in task.ready():
                    pass
            checks = task._checks
            for (_, _, i), ok in zip(checks, self.host.release_checked([(s, v) for s, v, _ in checks])):
                if not ok:
                    task.fail(i, "host page reused by another process during the copy")
            self._count_load(len(task.ids), task.errors, task.ids, task.nbytes, ssd=False)
        task._checks, task._done = [], True
        return len(task.errors)

    # ---- background writes ----------------------------------------------------------------------
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

    def start_writer(self) -> None:
        """Start the SSD writer now (`ssd.writer: process` starts a helper process, ~1-3 s), not at the
        first block to write: a store that will save calls this while its engine starts."""
        if isinstance(self.flusher, FlushProcess):
            self.flusher.start()

    def flush(self, timeout: float | None = None) -> None:
        """Block until every committed block queued for SSD and the remote tier has been written (or
        failed, or dropped)."""
        if self.remote is not None and not self.remote.flush(timeout):
            raise TimeoutError("writes to the remote tier did not finish in time")
        if self.flusher is not None:
            self.flusher.drain(timeout)

    # ---- lifecycle ------------------------------------------------------------------------------
    def usage(self, remote: bool = True) -> dict:
        """Blocks and bytes per tier (live view, all processes); `remote=False`: local tiers only (no
        round trip to the server)."""
        out = {}
        for tier in (self.host, self.ssd):
            if tier is None:
                continue
            tier.refresh()
            out[tier.name] = {"blocks": len(tier.index.entries), "bytes": tier.used_bytes(),
                              "capacity": tier.num_slots * tier.slot_size, "path": tier.dir}
        if remote and self.remote is not None:
            out["remote"] = self.remote.usage()
        return out

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.flusher is not None:
            self.flusher.close()
        if self.remote is not None:
            self.remote.close()
        if self._io is not None:
            self._io.shutdown(wait=True)
        with self._lock:
            if self._pending:
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
