"""Cross-process index of one tier's slots: an append-only log of 64-byte records.

A tier is `num_slots` fixed-size slots. Which block lives in which slot is recorded in `index.log`:

    RES  slot owner host t   slot reserved by a writer (data being written, invisible to lookups)
    PUT  slot id checksum    slot holds block `id` completely (visible); flag DIRTY: not yet in the
                             next tier, so not evictable while its writer lives
    CLEAN slot id            the block reached the next tier (evictable)
    FREE slot                slot is free again (abort, eviction, or a dead writer's reservation)
    EPOCH slot n             (compacted logs) the slot has been freed n times
    MOVED                    the log was compacted; reopen the path

Writers append under an exclusive `flock` on `index.lock`, after replaying what others appended.
Readers never lock: each `refresh()` is one `pread` of the new tail, so a process sees other processes'
commits without rescanning the store. A record is written with one `write` of 64 bytes at a 64-byte
aligned offset, so a SIGKILL can never leave a torn record (the kernel stops a write at page
boundaries, which are record boundaries); each record also carries a CRC32.

Crash safety: data is written into a slot before its PUT is appended, so a PUT always names complete
bytes. A slot's `epoch` counts its FREE records: a reader that copies a slot checks afterwards that the
epoch did not move (the writer appends FREE before reusing a slot), so a concurrent eviction turns into
a reported load error, never into wrong bytes.

Shared filesystems (NFS, 3FS, Lustre): processes on several machines may share one SSD tier. A process
id means nothing on another machine (or in another container's pid namespace), so RES records carry the
writer's `host_tag()` and the time: a reservation from this host and pid namespace is reclaimed when its
process is gone; one from elsewhere only once it is older than `FOREIGN_LEASE_S` (a writer never holds a
reservation that long: it writes one page and publishes). Records written before this field existed
carry host 0 and are treated as local.
"""

from __future__ import annotations

import errno
import fcntl
import itertools
import os
import socket
import struct
import time
import zlib
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

RECORD = struct.Struct("<BBHIQ16sQQI8xI")  # type, flags, pad, slot, owner, id, checksum, host, time, pad, crc32
assert RECORD.size == 64
REC_RES, REC_PUT, REC_FREE, REC_MOVED, REC_EPOCH, REC_CLEAN = 1, 2, 3, 4, 5, 6
FLAG_DIRTY = 1
COMPACT_MIN_RECORDS = 4096  # compact when the log holds more than 4x live entries and this many records
FOREIGN_LEASE_S = 600  # seconds after which another machine's reservation is presumed abandoned
_NO_ID = b"\0" * 16


def _pack(kind: int, slot: int = 0, owner: int = 0, block_id: bytes = _NO_ID, checksum: int = 0,
          flags: int = 0, host: int = 0, stamp: int = 0) -> bytes:
    body = RECORD.pack(kind, flags, 0, slot, owner, block_id, checksum, host, stamp, 0)
    return body[:60] + struct.pack("<I", zlib.crc32(body[:60]))


def _host_tag() -> int:
    """64-bit tag of this machine boot and pid namespace (never 0): pids are comparable within it."""
    import xxhash

    parts = [socket.gethostname()]
    for path in ("/proc/sys/kernel/random/boot_id",):
        try:
            with open(path) as f:
                parts.append(f.read().strip())
        except OSError:
            pass
    try:
        parts.append(str(os.stat("/proc/self/ns/pid").st_ino))
    except OSError:
        pass
    return xxhash.xxh64_intdigest("|".join(parts).encode()) or 1


HOST_TAG = _host_tag()


def process_owner() -> int:
    """This process's owner tag: pid in the high 32 bits, its start time (clock ticks) in the low 32."""
    pid = os.getpid()
    return (pid << 32) | (_start_time(pid) & 0xFFFFFFFF)


def _start_time(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        return int(stat.rsplit(b")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return 0


def owner_alive(owner: int) -> bool:
    pid = owner >> 32
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    start = _start_time(pid)
    return start == 0 or (start & 0xFFFFFFFF) == (owner & 0xFFFFFFFF)


@dataclass
class Entry:
    slot: int
    checksum: int  # 0 = not checksummed (host tier)


class SlotIndex:
    """Replayed view of a tier's log, plus the writer operations (under `locked()`)."""

    def __init__(self, directory: str, num_slots: int, readonly: bool = False):
        """`readonly`: replay an existing log (none: empty), never create, lock or write anything."""
        self.dir = directory
        self.num_slots = num_slots
        self.log_path = os.path.join(directory, "index.log")
        self.owner = process_owner()
        self.readonly = readonly
        self._scan_from = 0  # free_slots resumes here
        self._lock_fd = -1 if readonly else os.open(os.path.join(directory, "index.lock"), os.O_RDWR | os.O_CREAT, 0o600)
        self._locked = False
        self.unflushed_evicted = 0  # dirty blocks this process evicted to make room (reserve)
        self._open_log()
        self.refresh()

    # ---- replay -------------------------------------------------------------------------------
    def _open_log(self) -> None:
        if self.readonly:
            try:
                self._fd = os.open(self.log_path, os.O_RDONLY)
            except FileNotFoundError:
                self._fd = -1
        else:
            self._fd = os.open(self.log_path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        self._offset = 0
        self.entries: dict[bytes, Entry] = {}  # committed blocks
        self.lru: OrderedDict[bytes, None] = OrderedDict()  # oldest first
        self.slot_ids: dict[int, bytes] = {}  # slot -> committed id
        self.reserved: dict[int, int] = {}  # slot -> owner
        self.reserved_by: dict[int, tuple[int, int]] = {}  # slot -> (writer's host tag, unix time)
        self.dirty: dict[bytes, int] = {}  # committed id not yet in the next tier -> its writer
        self.epoch = [0] * self.num_slots
        self.records = 0
        self._reopen = False

    def refresh(self) -> None:
        """Apply records appended since the last call (one pread when nothing is new)."""
        while self._fd >= 0:
            size = os.fstat(self._fd).st_size
            if size - self._offset < RECORD.size:
                break
            data = os.pread(self._fd, min(size - self._offset, 1 << 20), self._offset)
            usable = len(data) - len(data) % RECORD.size
            if usable == 0:
                break
            self._apply(memoryview(data)[:usable])
            if self._reopen:
                os.close(self._fd)
                self._open_log()
                continue

    def _apply(self, data: memoryview) -> None:
        n = len(data) // RECORD.size
        for i in range(n):
            rec = data[i * 64:(i + 1) * 64]
            kind, flags, _, slot, owner, bid, checksum, host, stamp, crc = RECORD.unpack(rec)
            if crc != zlib.crc32(rec[:60]) or (kind != REC_MOVED and slot >= self.num_slots):
                # a corrupt record (disk damage); skip it but keep our place in the log
                self._offset += 64
                continue
            self._offset += 64
            self.records += 1
            if kind == REC_PUT:
                self.reserved.pop(slot, None)
                old = self.slot_ids.get(slot)
                if old is not None:
                    self.entries.pop(old, None)
                    self.lru.pop(old, None)
                prev = self.entries.get(bid)
                if prev is not None:
                    self.slot_ids.pop(prev.slot, None)
                self.entries[bid] = Entry(slot, checksum)
                if flags & FLAG_DIRTY:
                    self.dirty[bid] = owner
                else:
                    self.dirty.pop(bid, None)
                self.lru[bid] = None
                self.lru.move_to_end(bid)
                self.slot_ids[slot] = bid
            elif kind == REC_RES:
                self.reserved[slot] = owner
                self.reserved_by[slot] = (host, stamp)
            elif kind == REC_FREE:
                self.reserved.pop(slot, None)
                old = self.slot_ids.pop(slot, None)
                if old is not None and self.entries.get(old, Entry(-1, 0)).slot == slot:
                    del self.entries[old]
                    self.lru.pop(old, None)
                    self.dirty.pop(old, None)
                self.epoch[slot] += 1
            elif kind == REC_CLEAN:
                if self.slot_ids.get(slot) == bid:
                    self.dirty.pop(bid, None)
            elif kind == REC_EPOCH:
                self.epoch[slot] = owner
            elif kind == REC_MOVED:
                self._reopen = True
                return

    def version(self, slot: int) -> int:
        """Changes whenever the slot may have been reused; compare before and after copying it."""
        return self.epoch[slot]

    def touch(self, block_id: bytes) -> None:
        """Mark a block as recently used in this process's LRU order."""
        if block_id in self.lru:
            self.lru.move_to_end(block_id)

    # ---- writers --------------------------------------------------------------------------------
    @contextmanager
    def locked(self) -> Iterator["SlotIndex"]:
        """Exclusive writer section: replays the log first; appends go to `append()`."""
        if self.readonly:
            raise PermissionError(f"index {self.dir} is open read-only")
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        self._locked = True
        try:
            size = os.fstat(self._fd).st_size
            if size % RECORD.size:  # a short append from a full disk: cut it back to whole records
                os.ftruncate(self._fd, size - size % RECORD.size)
            self.refresh()
            self._pending: list[bytes] = []
            yield self
            self._flush_records()
            if self.records > COMPACT_MIN_RECORDS and self.records > 4 * (len(self.entries) + len(self.reserved)):
                self._compact()
        finally:
            self._locked = False
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def _append(self, rec: bytes) -> None:
        assert self._locked, "index writes need locked()"
        self._pending.append(rec)

    def _flush_records(self) -> None:
        if not self._pending:
            return
        blob = b"".join(self._pending)
        self._pending = []
        written = os.write(self._fd, blob)
        if written != len(blob):  # a short append (disk full): drop the partial tail record
            raise OSError(errno.ENOSPC, "short write to the index log")
        self.refresh()

    def free_slots(self, limit: int | None = None) -> list[int]:
        """Slots neither committed nor reserved, at most `limit` of them, scanning on from where the last
        scan stopped (a save asks for a few slots of a tier with tens of thousands; a scan of all of
        them holds the GIL that the engine's forward pass runs on)."""
        used_ids, reserved, n = self.slot_ids, self.reserved, self.num_slots
        start = self._scan_from % max(n, 1)
        out: list[int] = []
        for s in itertools.chain(range(start, n), range(start)):
            if s not in used_ids and s not in reserved:
                out.append(s)
                if limit is not None and len(out) >= limit:
                    self._scan_from = s + 1
                    break
        return out

    def reserve(self, count: int, pinned: set[int], spare_unflushed: int | None = None) -> list[int]:
        """Inside locked(): up to `count` slots for this process, evicting LRU blocks if needed.

        Never evicted: `pinned` slots (in use by this process). Clean blocks go first, oldest first; dirty
        blocks (not yet in the next tier) whose writer lives go only when `spare_unflushed` is given and
        clean ones do not make room: the oldest dirty blocks past the first `spare_unflushed` (the writer
        is copying those now), counted in `unflushed_evicted`. A disk slower than the saves then costs the
        SSD its oldest unwritten blocks rather than host memory its newest ones; a writer whose block goes
        mid-copy finds the slot's version changed and drops its copy. Returns fewer slots than asked when
        nothing more can be freed.
        """
        alive: dict[int, bool] = {}
        free = self.free_slots(count)
        if len(free) < count:
            free += self._reclaim_dead()
        victims: list[int] = []
        unflushed: list[int] = []  # live writers' dirty blocks, oldest first
        if len(free) < count:
            for bid in list(self.lru):
                if len(free) + len(victims) >= count:
                    break
                slot = self.entries[bid].slot
                if slot in pinned:
                    continue
                writer = self.dirty.get(bid)
                if writer is not None:
                    if writer not in alive:
                        alive[writer] = writer == self.owner or owner_alive(writer)
                    if alive[writer]:
                        unflushed.append(slot)
                        continue
                victims.append(slot)
        if spare_unflushed is not None and len(free) + len(victims) < count:
            taken = unflushed[spare_unflushed:][:count - len(free) - len(victims)]
            victims += taken
            self.unflushed_evicted += len(taken)
        for slot in victims:
            self._append(_pack(REC_FREE, slot))
        got = (free + victims)[:count]
        now = int(time.time())
        for slot in got:
            self._append(_pack(REC_RES, slot, self.owner, host=HOST_TAG, stamp=now))
        self._flush_records()  # FREE must be durable in the log before anyone writes the slot
        return got

    def _reclaim_dead(self) -> list[int]:
        dead = [s for s, o in self.reserved.items() if o != self.owner and self._abandoned(s, o)]
        for s in dead:
            self._append(_pack(REC_FREE, s))
        return dead

    def _abandoned(self, slot: int, owner: int) -> bool:
        """A reservation whose writer is gone: a dead local process, or a foreign one past its lease."""
        host, stamp = self.reserved_by.get(slot, (0, 0))
        if host in (0, HOST_TAG):
            return not owner_alive(owner)
        return time.time() - stamp > FOREIGN_LEASE_S

    def publish(self, block_id: bytes, slot: int, checksum: int = 0, dirty: bool = False) -> bool:
        """Inside locked(): make a reserved slot hold `block_id`. False (slot freed) if the id is already
        committed elsewhere (two writers stored the same block: the first wins)."""
        if self.reserved.get(slot) != self.owner:
            return False  # our reservation was reclaimed; never publish over it
        if block_id in self.entries:
            self._append(_pack(REC_FREE, slot))
            return False
        self._append(_pack(REC_PUT, slot, self.owner, block_id, checksum, FLAG_DIRTY if dirty else 0))
        return True

    def mark_clean(self, block_id: bytes) -> None:
        """Inside locked(): the block reached the next tier; it may be evicted now."""
        e = self.entries.get(block_id)
        if e is not None and block_id in self.dirty:
            self._append(_pack(REC_CLEAN, e.slot, 0, block_id))

    def release(self, slot: int) -> None:
        """Inside locked(): give back a slot reserved by this process (abort)."""
        if self.reserved.get(slot) == self.owner:
            self._append(_pack(REC_FREE, slot))

    def evict(self, block_id: bytes) -> None:
        """Inside locked(): drop a committed block."""
        e = self.entries.get(block_id)
        if e is not None:
            self._append(_pack(REC_FREE, e.slot))

    def _compact(self) -> None:
        """Rewrite the log as the live state, rename it into place, and mark the old log MOVED."""
        tmp = self.log_path + ".compact"
        recs = [_pack(REC_EPOCH, s, e) for s, e in enumerate(self.epoch) if e]  # versions stay comparable
        recs += [_pack(REC_RES, s, o, host=self.reserved_by.get(s, (0, 0))[0], stamp=self.reserved_by.get(s, (0, 0))[1])
                 for s, o in self.reserved.items()]
        recs += [_pack(REC_PUT, self.entries[bid].slot, self.dirty.get(bid, 0), bid, self.entries[bid].checksum,
                       FLAG_DIRTY if bid in self.dirty else 0) for bid in self.lru]
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, b"".join(recs))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, self.log_path)
        os.write(self._fd, _pack(REC_MOVED))
        self.refresh()  # reads MOVED, reopens the compacted log

    def close(self) -> None:
        for fd in (self._fd, self._lock_fd):
            if fd < 0:
                continue
            try:
                os.close(fd)
            except OSError:
                pass
