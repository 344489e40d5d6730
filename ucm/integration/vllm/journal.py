"""What the connector leaves next to the store for `ucm doctor` and `ucm stats`.

<storage>/journal/lookups.jsonl  one line per scheduler lookup: the prompt's first block id, full
                                 blocks, blocks ucm had, blocks vLLM's own prefix cache had, tokens
                                 loaded, whether a cache_salt was used (never the salt itself), and
                                 where the load planner skipped hits, its `plan` (blocks loaded of
                                 the hits, predicted ms, the sentence ucm doctor shows)
<storage>/journal/<role>-<pid>.json  cumulative counters and recent errors of one process, rewritten
                                 at most once a second and at shutdown (the newest 8 stopped
                                 processes are kept)
<storage>/journal/seed-<root>.json   the HashSeed (model, dtype, layout, block size, TP) of each chain root

Writing is best-effort: a journal that cannot be written never fails a request. Files are created
readable by their owner only (0600), like everything else the store creates.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time

from ucm.config import make_private_dirs
from ucm.logger import get_logger

log = get_logger("Connector")
LOOKUPS = "lookups.jsonl"
MAX_LOOKUP_BYTES = 4 << 20  # then lookups.jsonl becomes lookups.jsonl.1
KEEP_STOPPED = 8  # counter files of stopped processes kept


def _private(path: str, mode: str):
    """open() of a text file created with mode 0600 whatever the umask."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if mode == "a" else os.O_TRUNC)
    return os.fdopen(os.open(path, flags, 0o600), mode, buffering=1, encoding="utf-8")


def journal_dir(storage_path: str) -> str:
    return os.path.join(storage_path, "journal")


class Journal:
    def __init__(self, storage_path: str, role: str):
        self.dir = journal_dir(storage_path)
        self.counters_path = os.path.join(self.dir, f"{role}-{os.getpid()}.json")
        self._lookups = None
        self._started = time.time()  # unix seconds: when this process opened the journal
        self._last_counters = 0.0
        self._broken = False
        try:
            make_private_dirs(self.dir)
            self._prune()
        except OSError as e:
            self._disable(e)

    def _prune(self) -> None:
        """Drop the counters of stopped processes beyond the newest KEEP_STOPPED."""
        stopped = sorted((r for r in read_counters(os.path.dirname(self.dir)) if not r["alive"]),
                         key=lambda r: r.get("time", 0))
        for r in stopped[:-KEEP_STOPPED] if len(stopped) > KEEP_STOPPED else ():
            with contextlib.suppress(OSError):
                os.unlink(r["path"])

    def _disable(self, e: OSError) -> None:
        if not self._broken:
            self._broken = True
            log.warning("journal in %s not written (ucm doctor and stats will know less): %s", self.dir, e)

    def lookup(self, record: dict) -> None:
        if self._broken:
            return
        try:
            if self._lookups is None:
                self._lookups = _private(os.path.join(self.dir, LOOKUPS), "a")
            if self._lookups.tell() > MAX_LOOKUP_BYTES:
                self._lookups.close()
                path = os.path.join(self.dir, LOOKUPS)
                os.replace(path, path + ".1")
                self._lookups = _private(path, "a")
            self._lookups.write(json.dumps(record, separators=(",", ":")) + "\n")
        except OSError as e:
            self._disable(e)

    def counters(self, data: dict, force: bool = False) -> None:
        now = time.monotonic()
        if self._broken or (not force and now - self._last_counters < 1.0):
            return
        self._last_counters = now
        tmp = self.counters_path + ".tmp"
        try:
            with _private(tmp, "w") as f:
                json.dump({"pid": os.getpid(), "started": self._started, "time": time.time(), **data}, f)
            os.replace(tmp, self.counters_path)
        except OSError as e:
            self._disable(e)

    def seed(self, seed) -> None:
        """Record a HashSeed (what the block ids of this store were made from), once per root."""
        path = os.path.join(self.dir, f"seed-{seed.root().hex()[:16]}.json")
        if self._broken or os.path.exists(path):
            return
        try:
            with _private(path + f".{os.getpid()}", "w") as f:
                json.dump(dataclasses.asdict(seed), f)
            os.replace(path + f".{os.getpid()}", path)
        except OSError as e:
            self._disable(e)

    def close(self) -> None:
        if self._lookups is not None:
            self._lookups.close()
            self._lookups = None


def read_lookups(storage_path: str) -> list[dict]:
    """Every lookup record still kept, oldest first."""
    out = []
    d = journal_dir(storage_path)
    for name in (LOOKUPS + ".1", LOOKUPS):
        try:
            with open(os.path.join(d, name), encoding="utf-8") as f:
                for line in f:
                    try:
                        out.append(json.loads(line))
                    except ValueError:
                        continue  # a line cut by a crash
        except OSError:
            continue
    return out


def read_seeds(storage_path: str) -> dict[str, dict]:
    """Root id prefix (16 hex digits) -> the HashSeed fields recorded for it."""
    d = journal_dir(storage_path)
    out = {}
    for name in sorted(os.listdir(d)) if os.path.isdir(d) else ():
        if name.startswith("seed-") and name.endswith(".json"):
            try:
                with open(os.path.join(d, name), encoding="utf-8") as f:
                    out[name[5:-5]] = json.load(f)
            except (OSError, ValueError):
                continue
    return out


def read_counters(storage_path: str) -> list[dict]:
    """Counter snapshots of every process that wrote one; `alive` says whether it still runs."""
    d = journal_dir(storage_path)
    out = []
    for name in sorted(os.listdir(d)) if os.path.isdir(d) else ():
        if not name.endswith(".json") or name.startswith("seed-"):
            continue
        try:
            with open(os.path.join(d, name), encoding="utf-8") as f:
                rec = json.load(f)
        except (OSError, ValueError):
            continue
        rec["role"] = name.rsplit("-", 1)[0]
        rec["path"] = os.path.join(d, name)
        try:
            os.kill(int(rec.get("pid", -1)), 0)
            rec["alive"] = True
        except (OSError, ValueError):
            rec["alive"] = False
        out.append(rec)
    return out
