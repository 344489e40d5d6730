"""SSD writes in a helper process, so that none of their Python runs on the engine's GIL.

On the H200 (bench/results/gpu_e2e-diag.md), flushing a cold batch's pages to the SSD from threads of the
engine's process cost 10-20% of batch throughput, all of it in the decode steps, where vLLM's single
Python thread launches every kernel: each time the writers took the GIL (between writes, around
checksums, for index records) that thread waited. A host-tier-only store cost nothing measurable.

`FlushProcess` has Flusher's calls (`committed`, `maybe_write_back`, `drain`, `close`) and runs a
Flusher in a child process (`python -c ... child_main`), started by `start()` (a connector worker calls
it at registration, while vLLM warms up) or else at the first block to write.
The child opens the same host and SSD tiers as one more user (the tiers are shared between processes;
the host tier is shared memory; a copy of the engine's users lock keeps it from being dropped while
the child starts), pins, writes, checksums, publishes on the SSD and marks the host blocks
clean. The engine sends block ids down a pipe; the child reports its counts and errors back.

Until the child is up, blocks are written by an in-process Flusher. If the child cannot start or dies,
the engine's blocks still dirty in the host tier (the index says which: dirty, written by this process)
go to that Flusher too, so no committed block is left unflushed. The child finishes its queue before it
exits, also when the engine dies.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection
from typing import Callable

from ucm.logger import get_logger
from ucm.tiers.flush import Flusher, background_priority
from ucm.tiers.slab import SlabTier, TierSpec, drop_if_unused

log = get_logger("Save")


CHILD = "import sys; from ucm.tiers.flush_process import child_main; child_main(sys.argv[1])"


class FlushProcess:
    """Flusher's interface; the writes run in a child process once it is up. Thread-safe.

    Until the child has opened the tiers (1-3 s: it imports torch), and after it is gone, blocks are
    written by an in-process Flusher: a store never waits for its helper, and never loses a block to it."""

    def __init__(self, host: SlabTier, ssd: SlabTier, io_threads: int, stats, write_back: bool,
                 local: Callable[[], Flusher]):
        """`local()` makes the in-process Flusher (made when first needed)."""
        self.host, self.ssd, self.stats, self.write_back = host, ssd, stats, write_back
        self._io_threads, self._make_local = io_threads, local
        self._lock = threading.Lock()
        self._cv = threading.Condition(self._lock)
        self._proc: subprocess.Popen | None = None
        self._send: Connection | None = None  # open from the start of the child until it is gone
        self._reader: threading.Thread | None = None
        self._ready = False  # the child has opened the tiers: blocks go to it
        self._gone = False  # the child could not start or died: blocks stay in this process
        self._local: Flusher | None = None
        self._drained = 0  # the last drain sequence number the child answered
        self._seq = 0
        self._closed = False

    # ---- Flusher's calls --------------------------------------------------------------------------
    def committed(self, ids: list[bytes], now: bool = False) -> None:
        if ids:
            self._post(("commit", list(ids), now), lambda f: f.committed(ids, now))

    def maybe_write_back(self, host_used: int) -> None:
        if self.write_back:
            self._post(("pressure", host_used), lambda f: f.maybe_write_back(host_used))

    def drain(self, timeout: float | None = None) -> None:
        """Block until every block handed over so far is written (or failed)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        left = lambda: None if deadline is None else max(0.0, deadline - time.monotonic())  # noqa: E731
        with self._lock:
            self._seq += 1
            seq = self._seq
            sent = self._ready and self._send_locked(("drain", seq))
        if sent:
            with self._cv:
                if not self._cv.wait_for(lambda: self._drained >= seq or self._gone, left()):
                    raise TimeoutError("flush to SSD did not finish in time")
        local = self._local
        if local is not None:
            local.drain(left())

    def close(self) -> None:
        self.drain()
        with self._lock:
            self._closed = True
            proc, send = self._proc, self._send
            self._send = None
        if send is not None:
            send.close()  # EOF: the child closes its tiers and exits
        if proc is not None:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                log.warning("SSD writer process %d did not exit; killing it", proc.pid)
                proc.kill()
                proc.wait()
        if self._reader is not None:
            self._reader.join(timeout=10)
        if self._local is not None:
            self._local.close()

    def start(self) -> None:
        """Start the child now rather than at the first block to write (idempotent)."""
        with self._lock:
            self._start_once_locked()

    def wait_ready(self, timeout: float) -> bool:
        """Start the child and wait until blocks go to it; False if it is not up in time (or gone)."""
        self.start()
        with self._cv:
            return self._cv.wait_for(lambda: self._ready or self._gone, timeout) and self._ready

    @property
    def pid(self) -> int | None:
        """The child's pid from its start until it is gone (None before the first write)."""
        return self._proc.pid if self._proc is not None and not self._gone else None

    @property
    def local(self) -> Flusher | None:
        """The in-process Flusher, if blocks were written here (the child was starting, or is gone)."""
        return self._local

    # ---- the pipe ---------------------------------------------------------------------------------
    def _post(self, msg: tuple, here: Callable[[Flusher], None]) -> None:
        with self._lock:
            self._start_once_locked()
            if self._ready and self._send_locked(msg):
                return
            if self._local is None:
                self._local = self._make_local()
            local = self._local
        here(local)

    def _send_locked(self, msg: tuple) -> bool:
        if self._send is None:
            return False
        try:
            self._send.send(msg)
            return True
        except OSError as e:  # the child is gone
            self._fall_back_locked(f"pipe to it broke ({e})")
            return False

    def _start_once_locked(self) -> None:
        if self._proc is None and not self._gone and not self._closed:
            self._start_locked()

    def _start_locked(self) -> None:
        cmd_r, cmd_w = os.pipe()
        rep_r, rep_w = os.pipe()
        spec = {"host": dataclasses.asdict(self.host.spec), "ssd": dataclasses.asdict(self.ssd.spec),
                "page_size": self.host.page_size, "io_threads": self._io_threads, "write_back": self.write_back,
                "cmd_fd": cmd_r, "report_fd": rep_w, "users_fd": self.host.users_fd}
        package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p))
        try:
            self._proc = subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(spec)],
                                          pass_fds=(cmd_r, rep_w, self.host.users_fd), env=env, stdin=subprocess.DEVNULL)
        except OSError as e:
            for fd in (cmd_r, cmd_w, rep_r, rep_w):
                os.close(fd)
            self._fall_back_locked(f"could not start ({e})")
            return
        finally:
            if self._proc is not None:
                os.close(cmd_r)
                os.close(rep_w)
        self._send = Connection(cmd_w, readable=False)
        self._reader = threading.Thread(target=self._read, args=(Connection(rep_r, writable=False),),
                                        name="ucm-flush-reports", daemon=True)
        self._reader.start()

    def _read(self, conn: Connection) -> None:
        """The child's reports: counts and errors, and the drains it answered; EOF when it exits."""
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                break
            if msg[0] == "ready":
                with self._cv:
                    self._ready = True
                    self._cv.notify_all()
                log.info("SSD writes run in process %d (%s)", self._proc.pid, self.ssd.dir)
            elif msg[0] == "stats":
                _, flushed, failures, errors = msg
                self.stats.flushed_blocks += flushed
                self.stats.flush_failures += failures
                self.stats.recent_errors.extend(errors)
            elif msg[0] == "drained":
                with self._cv:
                    self._drained = max(self._drained, msg[1])
                    self._cv.notify_all()
        conn.close()
        with self._cv:
            if not self._closed:
                code = self._proc.poll() if self._proc is not None else None
                self._fall_back_locked(f"exited (code {code})")
            self._cv.notify_all()

    def _fall_back_locked(self, why: str) -> None:
        """The child cannot write: this process's blocks still dirty in the host tier (some were sent to
        it, some may be in the local Flusher's queue already: written once either way) are written here."""
        if self._gone:
            return
        self._gone, self._ready = True, False
        if self._send is not None:
            try:
                self._send.close()
            except OSError:
                pass
            self._send = None
        if self._local is None:
            self._local = self._make_local()
        with self.host.lock:
            self.host.index.refresh()
            mine = [b for b, writer in self.host.index.dirty.items() if writer == self.host.index.owner]
        log.error("SSD writer process %s; %d unflushed blocks are written from this process instead", why, len(mine))
        self.stats.recent_errors.append((time.time(), "flush", f"SSD writer process {why}"))
        self._local.committed(mine, now=True)
        self._cv.notify_all()


# ---- the child -------------------------------------------------------------------------------------
def child_main(arg: str) -> None:
    """The child's body: flush what the engine sends until its pipe closes, then finish and exit."""
    spec = json.loads(arg)
    background_priority()
    send = Connection(spec["report_fd"], readable=False)
    cmds = Connection(spec["cmd_fd"], writable=False)
    # the engine's users lock, inherited, kept the host tier from being dropped (had the engine died)
    # until this process joined it as a user of its own. The engine drops the tier when it leaves last;
    # this process has no exit watcher of its own, and drops it at the end only if it is the last user.
    host = SlabTier(TierSpec(**{**spec["host"], "keep_after_exit": True}), spec["page_size"])
    os.close(spec["users_fd"])
    ssd = SlabTier(TierSpec(**spec["ssd"]), spec["page_size"])
    io = ThreadPoolExecutor(spec["io_threads"], thread_name_prefix="ucm-io", initializer=background_priority)
    from ucm.tiers.store import StoreStats  # the store's own counters; what the Flusher adds is sent on

    counts = StoreStats()
    flusher = Flusher(host, ssd, io, counts, spec["write_back"])
    sent = [0, 0]  # flushed, failures: what the engine has been told
    engine = [True]  # its end of the pipe is open

    def tell(msg: tuple) -> None:
        if engine[0]:
            try:
                send.send(msg)
            except OSError:  # the engine is gone: the queue is still written, nobody to tell
                engine[0] = False

    def report() -> None:
        errors = []
        while counts.recent_errors:
            errors.append(counts.recent_errors.popleft())
        flushed, failures = counts.flushed_blocks - sent[0], counts.flush_failures - sent[1]
        if flushed or failures or errors:
            tell(("stats", flushed, failures, errors))
            sent[0] += flushed
            sent[1] += failures

    tell(("ready",))
    try:
        while True:
            if not cmds.poll(0.2):
                report()
                continue
            try:
                msg = cmds.recv()
            except EOFError:
                break
            if msg[0] == "commit":
                flusher.committed(msg[1], msg[2])
            elif msg[0] == "pressure":
                flusher.maybe_write_back(msg[1])
            elif msg[0] == "drain":
                flusher.drain()
                report()
                tell(("drained", msg[1]))
    finally:
        flusher.close()  # finishes the queue: the engine may be gone, its blocks are still worth writing
        io.shutdown(wait=True)
        report()
        host.close()
        ssd.close()
        if not spec["host"]["keep_after_exit"]:
            drop_if_unused(host.dir, spec["host"]["owned_parents"])  # the engine died before it: drop it here

