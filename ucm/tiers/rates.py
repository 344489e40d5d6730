"""Measured rates that the load planner works from, shared through the store's directory.

<storage>/rates/tiers.json    per tier: load bandwidth (bytes/s) from the worker's whole loads
<storage>/rates/prefill.json  the engine's forward-pass seconds by tokens computed (StepCurve: measured
                              points), from the worker's timed passes (ForwardTimer in connector/planner.py)

Each bandwidth is an exponentially weighted mean over recent loads (the step-time curve is made of recent
medians already), so it follows a disk that gets slower or a page cache that gets warm; a fresh process
starts from what the last one measured. A figure older than `max_age_s` counts as unknown (the planner
then loads, which measures it again). Writing is best-effort: a file that cannot be written or read never
fails a request, it only leaves the planner without a figure.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass

import numpy as np

from ucm.config import make_private_dirs

WEIGHT = 0.3  # of a new measurement in the running mean
WRITE_EVERY_S = 2.0
MIN_LOAD_BYTES = 4 << 20  # smaller loads are mostly fixed cost: they do not measure a bandwidth


@dataclass
class Rate:
    """A running mean and when it was last updated (unix seconds)."""

    value: float
    time: float
    samples: int = 1

    def update(self, x: float, now: float) -> None:
        self.value += WEIGHT * (x - self.value)
        self.time, self.samples = now, self.samples + 1


@dataclass(frozen=True)
class StepCurve:
    """Forward-pass seconds by tokens computed, from measured points (tokens ascending): linear between
    points. Beyond either end, the line through the end point and an anchor at least twice (half) its
    tokens away: the nearest point that far, else the origin. Two near points (on vLLM's CPU build, the
    two chunks of an 8,000-token prompt: 3,904 and 4,096 tokens in about the same time) give no slope to
    extrapolate: their line priced a 64-token pass at 7.3 s. Never below 0; for fewer tokens than the
    first point never above its seconds, for more than the last never below its seconds."""

    points: tuple[tuple[float, float], ...]
    time: float  # unix seconds of the measurement

    def seconds(self, tokens: float) -> float:
        return float(self.seconds_of(np.array([tokens], dtype=np.float64))[0])

    def seconds_of(self, tokens: np.ndarray) -> np.ndarray:
        """`seconds` of each element (the load planner prices every k of a request's hits at once)."""
        ts = np.array([t for t, _ in self.points])
        ss = np.array([s for _, s in self.points])
        (t0, s0), (tn, sn) = self.points[0], self.points[-1]
        tl, sl = next(((t, s) for t, s in self.points if t >= 2 * t0), (0.0, 0.0))
        tr, sr = next(((t, s) for t, s in reversed(self.points) if t <= tn / 2), (0.0, 0.0))
        left = np.clip(s0 + (sl - s0) * (tokens - t0) / (tl - t0), 0.0, s0)
        right = np.maximum(sn + (sn - sr) * (tokens - tn) / (tn - tr), sn)
        inside = np.interp(tokens, ts, ss)
        return np.where(tokens < t0, left, np.where(tokens > tn, right, inside))

    @classmethod
    def of(cls, points, time: float) -> "StepCurve | None":
        """A curve from (tokens, seconds) pairs, or None if they make none (empty, not positive, or tokens
        repeated)."""
        pts = tuple(sorted((float(t), float(s)) for t, s in points))
        if not pts or any(t <= 0 or s <= 0 for t, s in pts) or len({t for t, _ in pts}) < len(pts):
            return None
        return cls(pts, time)


class Rates:
    """One process's view of the shared rates; `clock` is injectable for tests (unix seconds)."""

    def __init__(self, storage_path: str | None, max_age_s: float = 600.0, clock=time.time):
        self.dir = os.path.join(storage_path, "rates") if storage_path else None
        self.max_age_s, self.clock = max_age_s, clock
        self.tiers: dict[str, Rate] = {}  # tier -> bytes/s
        self.prefill: StepCurve | None = None  # forward-pass seconds by tokens
        self._dirty: set[str] = set()
        self._written = {"tiers": 0.0, "prefill": 0.0}
        self._read: dict[str, float] = {}  # file -> mtime read
        self.refresh(force=True)

    # ---- measurements -------------------------------------------------------------------------------
    def record_load(self, tier: str, nbytes: int, seconds: float) -> None:
        """A whole load of `nbytes` served by one tier in `seconds`."""
        if nbytes < MIN_LOAD_BYTES or seconds <= 0:
            return
        self._update(self.tiers, tier, nbytes / seconds)
        self._dirty.add("tiers")
        self._maybe_write("tiers")

    def record_prefill(self, points) -> None:
        """A new step-time curve, (tokens, seconds) points (a running estimate already: it replaces the last)."""
        curve = StepCurve.of(points, self.clock())
        if curve is None:
            return
        self.prefill = curve
        self._dirty.add("prefill")
        self._maybe_write("prefill")

    def _update(self, table: dict[str, Rate], key: str, x: float) -> None:
        now = self.clock()
        r = table.get(key)
        if r is None or not self._fresh(r):
            table[key] = Rate(x, now)
        else:
            r.update(x, now)

    # ---- figures ------------------------------------------------------------------------------------
    def _fresh(self, r: "Rate | StepCurve | None") -> bool:
        return r is not None and self.clock() - r.time <= self.max_age_s

    def bandwidth(self, tier: str) -> float | None:
        """Bytes/s of loads from `tier`, or None when not measured recently."""
        r = self.tiers.get(tier)
        return r.value if self._fresh(r) else None

    def prefill_curve(self) -> StepCurve | None:
        """The step-time curve, or None when not measured recently."""
        return self.prefill if self._fresh(self.prefill) else None

    def prefill_seconds(self, tokens: int) -> float | None:
        """Seconds the engine takes to compute `tokens` prompt tokens in one pass, or None when not measured."""
        c = self.prefill_curve()
        if c is None:
            return None
        return c.seconds(tokens) if tokens > 0 else 0.0

    # ---- sharing ------------------------------------------------------------------------------------
    def _path(self, name: str) -> str | None:
        return os.path.join(self.dir, f"{name}.json") if self.dir else None

    def refresh(self, force: bool = False) -> None:
        """Take in what other processes wrote (files whose mtime changed); keeps this process's newer
        figures."""
        for name in ("tiers", "prefill"):
            path = self._path(name)
            if path is None:
                continue
            try:
                mtime = os.stat(path).st_mtime
                if not force and self._read.get(name) == mtime:
                    continue
                with open(path, encoding="utf-8") as f:
                    data = json.load(f)
                self._read[name] = mtime
            except (OSError, ValueError):
                continue
            if name == "prefill":
                try:
                    theirs = StepCurve.of(data["points"], float(data["time"]))
                except (KeyError, TypeError, ValueError):
                    continue  # unreadable, or an older version's figures: unknown
                if theirs is not None and (self.prefill is None or theirs.time > self.prefill.time):
                    self.prefill = theirs
                continue
            for key, d in data.items():
                try:
                    theirs = Rate(float(d["value"]), float(d["time"]), int(d.get("samples", 1)))
                except (KeyError, TypeError, ValueError):
                    continue
                mine = self.tiers.get(key)
                if mine is None or theirs.time > mine.time:
                    self.tiers[key] = theirs

    def _maybe_write(self, name: str, force: bool = False) -> None:
        now = self.clock()
        if not force and now - self._written[name] < WRITE_EVERY_S:
            return
        self.write(name)

    def write(self, name: str | None = None) -> None:
        """Write this process's figures (all, or one file) for the others; best-effort."""
        for n in ([name] if name else sorted(self._dirty)):
            path = self._path(n)
            if path is None or n not in self._dirty:
                continue
            if n == "tiers":
                data = {k: {"value": r.value, "time": r.time, "samples": r.samples} for k, r in self.tiers.items()}
            else:
                data = {"points": [list(p) for p in self.prefill.points], "time": self.prefill.time}
            tmp = f"{path}.{os.getpid()}.tmp"
            try:
                make_private_dirs(self.dir)
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    json.dump(data, f)
                os.replace(tmp, path)
                self._written[n] = self.clock()
                self._dirty.discard(n)
            except OSError:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass

    def describe(self) -> dict:
        """Figures for stats and doctor: GB/s per tier, prefill ms per 1,000 tokens, and their age (s)."""
        now = self.clock()
        out: dict = {"tiers": {t: {"GBps": round(r.value / 1e9, 3), "age_s": round(now - r.time, 1),
                                   "samples": r.samples} for t, r in sorted(self.tiers.items())}}
        k = self.prefill_seconds(1000)
        if k is not None:
            out["prefill_ms_per_1k_tokens"] = round(1e3 * k, 2)
            out["prefill_age_s"] = round(now - self.prefill.time, 1)
        return out


_SHARED: dict[str, Rates] = {}


def shared_rates(storage_path: str) -> Rates:
    """This process's Rates for a store (one object for both sides of a single-process engine, so the
    scheduler sees the worker's loads at once; other processes see them through the files)."""
    r = _SHARED.get(storage_path)
    if r is None:
        r = _SHARED[storage_path] = Rates(storage_path)
    return r
