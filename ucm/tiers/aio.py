"""Linux native AIO (io_submit / io_getevents) through ctypes, for O_DIRECT reads.

Used where Python I/O threads would be too slow: a thread that returns from a read must take the GIL
before it can issue the next one, and while a forward pass runs Python code that wait is milliseconds
(the interpreter's switch interval). With AIO the caller submits every read in one system call, the
disk works through them on its own, and completions are collected when the caller needs them.
Only O_DIRECT file descriptors are truly asynchronous; `available()` says whether the kernel has AIO.
"""

from __future__ import annotations

import ctypes
import os
import platform
import threading

_NR = {"x86_64": (206, 207, 208, 209), "aarch64": (0, 1, 4, 2)}  # io_setup, io_destroy, io_getevents, io_submit
IOCB_CMD_PREADV = 7


class IOVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


class IOCB(ctypes.Structure):  # struct iocb, little-endian layout
    _fields_ = [("data", ctypes.c_uint64), ("key", ctypes.c_uint32), ("rw_flags", ctypes.c_int32),
                ("opcode", ctypes.c_uint16), ("reqprio", ctypes.c_int16), ("fd", ctypes.c_uint32),
                ("buf", ctypes.c_uint64), ("nbytes", ctypes.c_uint64), ("offset", ctypes.c_int64),
                ("reserved2", ctypes.c_uint64), ("flags", ctypes.c_uint32), ("resfd", ctypes.c_uint32)]


class IOEvent(ctypes.Structure):
    _fields_ = [("data", ctypes.c_uint64), ("obj", ctypes.c_uint64), ("res", ctypes.c_int64),
                ("res2", ctypes.c_int64)]


_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long


def _nr():
    nr = _NR.get(platform.machine())
    if nr is None:
        raise OSError(f"no AIO syscall numbers for {platform.machine()}")
    return nr


def _check(ret: int, what: str) -> int:
    if ret < 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")
    return ret


class AIOContext:
    """An io_setup context for up to `depth` reads in flight. Not thread-safe; close() when done."""

    def __init__(self, depth: int):
        self.depth = depth
        self._ctx = ctypes.c_ulong(0)
        self._setup, self._destroy, self._getevents, self._submit = _nr()
        _check(_syscall(self._setup, ctypes.c_int(depth), ctypes.byref(self._ctx)), "io_setup")
        self._keep: dict[int, tuple] = {}  # tag -> (iocb, iovecs): alive until the read completes

    def submit_preadv(self, reads: list[tuple[int, int, int, list[tuple[int, int]]]]) -> int:
        """reads: (tag, fd, file offset, [(address, length), ...]). Returns how many were queued (in
        order); the rest must be submitted again after some complete."""
        if not reads:
            return 0
        cbs = (ctypes.POINTER(IOCB) * len(reads))()
        for k, (tag, fd, offset, iov) in enumerate(reads):
            vecs = (IOVec * len(iov))(*[IOVec(a, n) for a, n in iov])
            cb = IOCB(data=tag, opcode=IOCB_CMD_PREADV, fd=fd, buf=ctypes.addressof(vecs), nbytes=len(iov),
                      offset=offset)
            self._keep[tag] = (cb, vecs)
            cbs[k] = ctypes.pointer(cb)
        n = _syscall(self._submit, self._ctx, ctypes.c_long(len(reads)), cbs)
        if n < 0:
            e = ctypes.get_errno()
            for tag, *_ in reads:
                self._keep.pop(tag, None)
            if e == 11:  # EAGAIN: the queue is full
                return 0
            raise OSError(e, f"io_submit: {os.strerror(e)}")
        for tag, *_ in reads[n:]:
            self._keep.pop(tag, None)
        return n

    def reap(self, min_nr: int, max_nr: int) -> list[tuple[int, int]]:
        """Wait for at least min_nr completions; (tag, bytes read or -errno) of each."""
        events = (IOEvent * max_nr)()
        while True:
            n = _syscall(self._getevents, self._ctx, ctypes.c_long(min_nr), ctypes.c_long(max_nr), events, None)
            if n >= 0 or ctypes.get_errno() != 4:  # EINTR: retry
                break
        _check(n, "io_getevents")
        out = [(int(events[k].data), int(events[k].res)) for k in range(n)]
        for tag, _ in out:
            self._keep.pop(tag, None)
        return out

    @property
    def in_flight(self) -> int:
        return len(self._keep)

    def close(self) -> None:
        if self._ctx.value:
            if self._keep:  # never free buffers the kernel may still write: wait for them first
                self.reap(len(self._keep), len(self._keep))
            _syscall(self._destroy, self._ctx)
            self._ctx = ctypes.c_ulong(0)


_free: list[AIOContext] = []  # idle contexts: io_destroy waits for an RCU grace period (~30 ms), so reuse
_free_lock = threading.Lock()


def acquire(depth: int) -> AIOContext:
    """An idle context of this depth, or a new one; give it back with release()."""
    with _free_lock:
        for k, ctx in enumerate(_free):
            if ctx.depth == depth:
                return _free.pop(k)
    return AIOContext(depth)


def release(ctx: AIOContext) -> None:
    """Return a context whose reads have all been reaped (one with reads in flight is closed)."""
    if ctx.in_flight:
        ctx.close()
        return
    with _free_lock:
        if len(_free) < 8:
            _free.append(ctx)
            return
    ctx.close()


def available() -> bool:
    try:
        release(acquire(1))
        return True
    except OSError:
        return False
