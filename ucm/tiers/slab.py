"""A tier: fixed-size slots in one directory, indexed by a `SlotIndex`, shared by every process.

Two backends hold the bytes:

* `MemorySlots`: one file in shared memory (/dev/shm), mapped into every process that opens the tier,
  so the scheduler process sees the worker's blocks and a restarted process finds them. Memory is
  reserved with posix_fallocate in 64 MiB chunks as slots are first used (a full /dev/shm makes slots
  unavailable, never a SIGBUS). Registering it with a device is the transfer layer's business.
* `FileSlots`: slab files on disk, read and written with pread/pwrite (optionally O_DIRECT), one
  checksum per page verified on every read.

Slots are `page_size` rounded up to 4 KiB, so every slot is aligned for O_DIRECT and DMA.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import shutil
import mmap
import os
import threading
from collections import Counter
from dataclasses import dataclass

import torch
import xxhash

from ucm.config import make_private_dirs
from ucm.logger import get_logger
from ucm.tiers.index import SlotIndex

ALIGN = 4096
log = get_logger("Tier")
log_load = get_logger("Load")


def round_up(n: int, align: int = ALIGN) -> int:
    return (n + align - 1) // align * align


_LIBC = ctypes.CDLL(None, use_errno=True)
_MADV_POPULATE_WRITE = 23  # Linux >= 5.14


def _populate(addr: int, length: int) -> None:
    """Fault in [addr, addr + length) for writing (MADV_POPULATE_WRITE), so the hot path takes no page
    faults. Through ctypes, which releases the GIL: mmap.madvise holds it for the whole call (tens of
    ms per chunk), stalling the engine's forward pass. A kernel without it just faults later."""
    _LIBC.madvise(ctypes.c_void_p(addr), ctypes.c_size_t(length), _MADV_POPULATE_WRITE)


def page_checksum(buf) -> int:
    """xxh3-64 of a page's bytes; never 0 (0 means 'not checksummed')."""
    return xxhash.xxh3_64_intdigest(buf) or 1


def aligned_empty(nbytes: int, align: int = ALIGN) -> torch.Tensor:
    """An uninitialised uint8 buffer whose address is a multiple of `align` (O_DIRECT reads need one)."""
    raw = torch.empty(nbytes + align, dtype=torch.uint8)
    skew = (-raw.data_ptr()) % align
    return raw[skew:skew + nbytes]


class TierError(OSError):
    def __str__(self) -> str:
        return self.strerror if not self.errno and self.strerror else super().__str__()


def filesystem_type(path: str) -> str:
    """Type of the filesystem holding `path` (longest matching mount point in /proc/mounts)."""
    best, fstype = "", "unknown"
    real = os.path.realpath(path)
    try:
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 3 and (real == parts[1] or real.startswith(parts[1].rstrip("/") + "/")):
                    if len(parts[1]) > len(best):
                        best, fstype = parts[1], parts[2]
    except OSError:
        pass
    return fstype


class MemorySlots:
    """Slots in one shared-memory file mapped into this process.

    The file is sparse; memory is reserved with posix_fallocate in CHUNK-sized pieces as slots are first
    used (`ensure`), so an idle or small cache does not hold the whole capacity (reserving it all at
    start cost the model's forward pass ~30% on a 2-core machine: it competes for huge pages), and a
    full tmpfs makes a slot unavailable instead of a SIGBUS on first touch."""

    CHUNK = 64 << 20

    def __init__(self, directory: str, num_slots: int, slot_size: int):
        self.path = os.path.join(directory, "pages.bin")
        self.slot_size = slot_size
        size = num_slots * slot_size
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            if os.fstat(self._fd).st_size < size:
                os.ftruncate(self._fd, size)
            self._mm = mmap.mmap(self._fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)  # explicit: mmap keeps a dup of fd, which would keep the lock
        self._ready: set[int] = set()  # chunks known to be allocated
        self.tensor = torch.frombuffer(self._mm, dtype=torch.uint8).view(num_slots, slot_size)
        # one thread prepares chunks ahead of use (a thread started per request would cost the engine a
        # GIL hand-over each); the first chunks while the caller is still starting up
        self._want, self._closed = 1, False
        self._wake = threading.Event()
        threading.Thread(target=self._prefault, name="ucm-prefault", daemon=True).start()
        self._wake.set()
        self.on_tmpfs = filesystem_type(self.path) in ("tmpfs", "hugetlbfs")  # where CUDA can pin it

    def _prepare(self, chunk: int) -> None:
        """Allocate one chunk (posix_fallocate) and map it in (MADV_POPULATE_WRITE, Linux >= 5.14)."""
        start = chunk * self.CHUNK
        length = min(self.CHUNK, len(self._mm) - start)
        os.posix_fallocate(self._fd, start, length)
        _populate(self.tensor.data_ptr() + start, length)
        self._ready.add(chunk)

    def _prefault(self) -> None:
        """The prefault thread: prepares every chunk up to `_want` whenever woken."""
        while True:
            self._wake.wait()
            self._wake.clear()
            if self._closed:
                return
            try:
                for chunk in range(self._want + 1):
                    if chunk * self.CHUNK >= len(self._mm):
                        break
                    if chunk not in self._ready:
                        self._prepare(chunk)
            except (OSError, ValueError):  # ValueError: the tier closed meanwhile
                pass  # the hot path reports it, for the slot that needs it

    def ensure(self, slots: list[int]) -> list[int]:
        """Allocate the memory behind these slots; returns the slots whose memory could not be had.
        Also has the prefault thread prepare the next two chunks, so later dumps and promotions find
        their memory ready."""
        bad, top = [], 0
        for slot in slots:
            first = slot * self.slot_size // self.CHUNK
            last = ((slot + 1) * self.slot_size - 1) // self.CHUNK
            top = max(top, last)
            for chunk in range(first, last + 1):
                if chunk in self._ready:
                    continue
                try:
                    self._prepare(chunk)
                except OSError as e:
                    log.warning("no memory for host tier slot %d in %s: %s", slot, self.path, e.strerror)
                    bad.append(slot)
                    break
        if slots and not bad and top + 2 > self._want:
            self._want = top + 2
            self._wake.set()
        return bad

    def page(self, slot: int) -> torch.Tensor:
        return self.tensor[slot]

    def close(self) -> None:
        self._closed = True
        self._wake.set()
        self.tensor = None
        try:
            self._mm.close()
        except BufferError:  # a view still alive somewhere; the mapping goes with the process
            pass
        os.close(self._fd)


class FileSlots:
    """Slots in slab files of `slots_per_slab` slots each."""

    def __init__(self, directory: str, slot_size: int, slots_per_slab: int, direct_io: bool, fsync: bool):
        self.dir = directory
        self.slot_size = slot_size
        self.slots_per_slab = slots_per_slab
        self.flags = os.O_RDWR | os.O_CREAT | (getattr(os, "O_DIRECT", 0) if direct_io else 0)
        self.fsync = fsync
        self._fds: dict[int, int] = {}
        self._lock = threading.Lock()

    def slab_path(self, slab: int) -> str:
        return os.path.join(self.dir, f"slab_{slab:05d}.bin")

    def _fd(self, slab: int) -> int:
        fd = self._fds.get(slab)
        if fd is None:
            with self._lock:
                fd = self._fds.get(slab)
                if fd is None:
                    try:
                        fd = os.open(self.slab_path(slab), self.flags, 0o600)
                    except OSError as e:
                        if e.errno != errno.EINVAL or not self.flags & getattr(os, "O_DIRECT", 0):
                            raise
                        log.warning("%s does not support O_DIRECT; using buffered I/O", self.dir)
                        self.flags &= ~os.O_DIRECT
                        fd = os.open(self.slab_path(slab), self.flags, 0o600)
                    self._fds[slab] = fd
        return fd

    @property
    def direct(self) -> bool:
        """True while the slab files are opened with O_DIRECT (reads need aligned memory)."""
        return bool(self.flags & getattr(os, "O_DIRECT", 0))

    def locate(self, slot: int) -> tuple[int, int]:
        """(file descriptor, byte offset) of a slot."""
        slab, i = divmod(slot, self.slots_per_slab)
        return self._fd(slab), i * self.slot_size

    def write_run(self, slot: int, bufs: list[memoryview]) -> None:
        """Write consecutive slots slot, slot + 1, ... (all in one slab file) with one pwritev: one
        system call, and one release of the GIL, for the run."""
        if (len(bufs) == 1 or (slot % self.slots_per_slab) + len(bufs) > self.slots_per_slab
                or any(len(b) != self.slot_size for b in bufs)):
            for k, buf in enumerate(bufs):
                self.write(slot + k, buf)
            return
        fd, off = self.locate(slot)
        total = sum(len(b) for b in bufs)
        n = os.pwritev(fd, bufs, off)
        if n != total:  # short: finish page by page, which retries and names the real errno
            for k, buf in enumerate(bufs):
                if n < (k + 1) * self.slot_size:
                    self.write(slot + k, buf)
            return
        if self.fsync:
            os.fdatasync(fd)

    def write(self, slot: int, buf: memoryview) -> None:
        fd, off = self.locate(slot)
        done = 0
        while done < len(buf):  # a short write is retried once more to surface the real errno
            n = os.pwrite(fd, buf[done:], off + done)
            if n <= 0:
                raise TierError(errno.ENOSPC, f"no space left writing slot {slot}")
            done += n
        if self.fsync:
            os.fdatasync(fd)

    def read(self, slot: int, buf: memoryview) -> None:
        fd, off = self.locate(slot)
        n = os.preadv(fd, [buf], off)
        if n != len(buf):
            raise TierError(errno.EIO, f"short read ({n} of {len(buf)} bytes): slab file truncated")

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()


@dataclass(frozen=True)
class TierSpec:
    name: str  # "host" or "ssd"
    path: str  # root directory; the tier lives in <path>/p<page_size>
    capacity: int  # bytes
    kind: str  # "memory" or "file"
    slab_size: int = 1 << 30
    direct_io: bool = False
    fsync: bool = False
    keep_after_exit: bool = True
    owned_parents: int = 0  # directories above <path>/p<page_size> that ucm made for it (removed when empty)
    readonly: bool = False  # inspect only: never create, lock, reserve, write or drop anything


TIER_FILES = ("pages.bin", "index.log", "index.lock", "index.log.compact")
USERS_LOCK = "users.lock"

def drop_if_unused(directory: str, owned_parents: int = 0, wait_s: float = 0.0) -> bool:
    """Delete a memory tier's files, its lock and the directories ucm made for it, if no process holds
    the tier's users lock (asked again for up to `wait_s` seconds: a process that just died may not have
    released it yet); True if it did. Safe against a process joining meanwhile (see `_join_users`)."""
    import time

    path = os.path.join(directory, USERS_LOCK)
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    return False  # another process still uses the tier
                time.sleep(0.02)
        try:
            if os.fstat(fd).st_ino != os.stat(path).st_ino:
                return False  # dropped by another while we waited, and made again since: not ours to drop
        except FileNotFoundError:
            return False  # dropped by another while we waited
        for f in TIER_FILES:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(directory, f))
        # a host-only store keeps the connector's journal here: it describes a cache that is gone now
        shutil.rmtree(os.path.join(directory, "journal"), ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # a joiner holding the old inode notices and retries
        d = directory
        for _ in range(owned_parents + 1):
            try:
                os.rmdir(d)
            except OSError:
                break
            d = os.path.dirname(d)
        return True
    finally:
        os.close(fd)


_REAPER_SOURCE: list[str] = []


def _reaper_source() -> str:
    """A script for `python -S`: fork (the watcher must not be a descendant of the tier's process: vLLM
    kills its processes' descendants when it stops), print the watcher's pid, and in the watcher wait
    until every copy of the pipe on stdin is closed (the tier's process closed it, exited or was
    killed), then `drop_if_unused`. Covers exits that skip atexit (os._exit, SIGKILL, SIGTERM)."""
    if not _REAPER_SOURCE:
        import inspect

        _REAPER_SOURCE.append("\n".join([
            "import contextlib, fcntl, os, shutil, sys", f"TIER_FILES = {TIER_FILES!r}", f"USERS_LOCK = {USERS_LOCK!r}",
            inspect.getsource(drop_if_unused),
            "pid = os.fork()",
            "if pid:",
            "    sys.stdout.write(str(pid))",
            "    sys.stdout.flush()",
            "    os._exit(0)",
            "os.close(1)",
            "sys.stdin.buffer.read()",
            # the dying process may close this pipe before its users lock: ask again for a while
            "drop_if_unused(sys.argv[1], int(sys.argv[2]), wait_s=3.0)"]))
    return _REAPER_SOURCE[0]


def _start_reaper(directory: str, owned_parents: int) -> tuple[int | None, int | None]:
    """The watcher process of a memory tier, an orphan in its own session; (its pid, the write end of
    its pipe), or (None, None)."""
    import subprocess
    import sys

    try:
        r, w = os.pipe()
        try:
            launcher = subprocess.Popen([sys.executable, "-S", "-c", _reaper_source(), directory, str(owned_parents)],
                                        stdin=r, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, close_fds=True,
                                        start_new_session=True)
            out, _ = launcher.communicate(timeout=30)
        finally:
            os.close(r)
        return int(out), w
    except (OSError, ValueError, subprocess.SubprocessError) as e:
        if "w" in locals():
            os.close(w)
        log.warning("no exit watcher for the host tier %s (%s): if this process is killed, the next process to "
                    "open the tier drops it", directory, e)
        return None, None


class SlabTier:
    """Slots holding pages of `page_size` bytes; thread-safe; shared with other processes.

    Every process using a tier holds a shared lock on its users.lock. A memory tier that is not kept
    after exit is dropped by the last process to leave it: at `close`, or, when a process dies without
    closing, by a watcher process; a tier found with no users by a new opener is stale (left by a
    process whose watcher died too) and is dropped before use, so it is never served against a
    different SSD state. A `readonly` tier (diagnostics) takes no part in any of this."""

    def __init__(self, spec: TierSpec, page_size: int):
        self.spec = spec
        self.name = spec.name
        self.page_size = page_size
        self.slot_size = round_up(page_size)
        self.num_slots = spec.capacity // self.slot_size
        if self.num_slots < 1:
            raise TierError(errno.EINVAL, f"{spec.name} tier capacity {spec.capacity} B holds no page of "
                            f"{page_size} B; raise {spec.name}.capacity")
        self.dir = os.path.join(spec.path, f"p{page_size}")
        self.lock = threading.RLock()
        self.pins: Counter[int] = Counter()  # slots this process is reading or writing
        self._users_fd = None
        self._reaper: int | None = None  # the exit watcher's pid
        self._reaper_fd = None
        self._close_hooks: list = []
        if spec.readonly:
            self.index = SlotIndex(self.dir, self.num_slots, readonly=True)
            self.slots = None
            return
        self._drops = spec.kind == "memory" and not spec.keep_after_exit
        self._join_users()
        self.index = SlotIndex(self.dir, self.num_slots)
        if spec.kind == "memory":
            self.slots = MemorySlots(self.dir, self.num_slots, self.slot_size)
        else:
            per_slab = max(1, spec.slab_size // self.slot_size)
            self.slots = FileSlots(self.dir, self.slot_size, per_slab, spec.direct_io, spec.fsync)
        if self._drops:
            self._reaper, self._reaper_fd = _start_reaper(self.dir, spec.owned_parents)

    def _join_users(self) -> None:
        """Hold a shared lock on the users lock at the tier's path (retried when a last user removed
        that file meanwhile); drop a stale memory tier found with no users."""
        path = os.path.join(self.dir, USERS_LOCK)
        while True:
            make_private_dirs(self.dir)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                alone = True
            except BlockingIOError:
                fcntl.flock(fd, fcntl.LOCK_SH)
                alone = False
            try:
                same = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # the file was dropped while we waited for the lock: join the new one
                os.close(fd)
                continue
            if alone and self._drops and any(os.path.exists(os.path.join(self.dir, f)) for f in TIER_FILES[:2]):
                log.warning("host tier %s was left by a process that did not close it; dropping it (stale: "
                            "its blocks may not match the SSD tier any more)", self.dir)
                for f in TIER_FILES:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(os.path.join(self.dir, f))
            if alone:
                fcntl.flock(fd, fcntl.LOCK_SH)  # nobody can drop files before we hold it: none exist yet
            self._users_fd = fd
            return

    @property
    def users_fd(self) -> int | None:
        """The descriptor holding this process's shared lock on the tier's users lock: a child process
        given a copy keeps the tier from being dropped until it exits, even if this process dies."""
        return self._users_fd

    def on_close(self, hook) -> None:
        """Call `hook()` before the tier's memory goes away (e.g. to unregister it from a device)."""
        self._close_hooks.append(hook)

    # ---- queries ------------------------------------------------------------------------------
    def refresh(self) -> None:
        with self.lock:
            self.index.refresh()

    def __contains__(self, block_id: bytes) -> bool:
        return block_id in self.index.entries

    def lookup(self, ids: list[bytes]) -> list[bool]:
        with self.lock:
            self.index.refresh()
            entries = self.index.entries
            return [i in entries for i in ids]

    def used_bytes(self) -> int:
        return len(self.index.entries) * self.slot_size

    # ---- pinning: a pinned slot is never evicted by this process --------------------------------
    def pin(self, block_id: bytes):
        """(slot, checksum, version) of a committed block, pinned; None if absent."""
        return self.pin_many([block_id])[0]

    def pin_many(self, block_ids: list[bytes]) -> list[tuple[int, int, int] | None]:
        """`pin` of each block, under one lock (a load's whole request at once)."""
        with self.lock:
            entries, index, pins = self.index.entries, self.index, self.pins
            out: list[tuple[int, int, int] | None] = []
            for bid in block_ids:
                e = entries.get(bid)
                if e is None:
                    out.append(None)
                    continue
                pins[e.slot] += 1
                index.touch(bid)
                out.append((e.slot, e.checksum, index.version(e.slot)))
            return out

    def release_checked(self, pinned: list[tuple[int, int]]) -> list[bool]:
        """For (slot, version) pairs pinned by `pin`: whether each slot is still unchanged (`still_valid`,
        one refresh for all), then unpin them."""
        with self.lock:
            self.index.refresh()
            ok = [self.index.version(slot) == version for slot, version in pinned]
            for slot, _ in pinned:
                self.pins[slot] -= 1
                if self.pins[slot] <= 0:
                    del self.pins[slot]
            return ok

    def unpin(self, slot: int) -> None:
        with self.lock:
            self.pins[slot] -= 1
            if self.pins[slot] <= 0:
                del self.pins[slot]

    def still_valid(self, slot: int, version) -> bool:
        """True if nobody freed the slot since `version` was taken (call after copying it)."""
        with self.lock:
            self.index.refresh()
            return self.index.version(slot) == version

    # ---- writes -------------------------------------------------------------------------------
    def reserve(self, count: int, spare_unflushed: int | None = None) -> list[int]:
        """Up to `count` slots reserved (and pinned) for this process; LRU clean blocks are evicted, and
        with `spare_unflushed` given, unflushed ones past the oldest `spare_unflushed` too (index.reserve)."""
        with self.lock:
            with self.index.locked():
                slots = self.index.reserve(count, set(self.pins), spare_unflushed)
            for s in slots:
                self.pins[s] += 1
        # memory for new slots is allocated outside the locks: the slots are reserved, nobody else uses them
        bad = self.slots.ensure(slots) if isinstance(self.slots, MemorySlots) else []
        if bad:
            self.release(bad)
            slots = [s for s in slots if s not in set(bad)]
        return slots

    def publish(self, items: list[tuple[bytes, int, int]], dirty: bool = False) -> list[bool]:
        """Make (id, slot, checksum) visible; unpins. False where the id was already stored elsewhere.
        `dirty` blocks are not evicted (while this process lives) until `mark_clean`, unless a save finds
        every page unflushed (SlotIndex.reserve)."""
        with self.lock:
            with self.index.locked():
                ok = [self.index.publish(bid, slot, cs, dirty) for bid, slot, cs in items]
            for _, slot, _ in items:
                self.unpin(slot)
            return ok

    def release(self, slots: list[int]) -> None:
        """Give back reserved slots whose writes failed or were aborted; unpins."""
        if not slots:
            return
        with self.lock:
            with self.index.locked():
                for s in slots:
                    self.index.release(s)
            for s in slots:
                self.unpin(s)

    def mark_clean(self, ids: list[bytes]) -> None:
        with self.lock:
            with self.index.locked():
                for bid in ids:
                    self.index.mark_clean(bid)

    def evict_corrupt(self, bad: dict[bytes, str]) -> None:
        """Blocks whose page failed verification (checksum, short read): logged and evicted, so lookups
        stop offering them and the next request that computes them stores them again."""
        if not bad:
            return
        for bid, why in bad.items():
            log_load.error("%s block %s in %s: %s; evicted", self.name.upper(), bid.hex()[:12], self.dir, why)
        self.evict(list(bad))

    def evict(self, ids: list[bytes]) -> None:
        with self.lock:
            with self.index.locked():
                for bid in ids:
                    self.index.evict(bid)

    def close(self) -> None:
        with self.lock:
            if self.spec.readonly:
                self.index.close()
                return
            for hook in self._close_hooks:
                with contextlib.suppress(Exception):
                    hook()
            self._close_hooks = []
            self.slots.close()
            self.index.close()
            if self._drops:
                fcntl.flock(self._users_fd, fcntl.LOCK_UN)
                drop_if_unused(self.dir, self.spec.owned_parents)
            os.close(self._users_fd)
            if self._reaper_fd is not None:
                os.close(self._reaper_fd)  # the watcher wakes, finds the tier dropped (or still used) and exits
                self._reaper = self._reaper_fd = None
