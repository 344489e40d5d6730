"""The load planner: how many of a request's leading hit blocks to load, so that its first token comes
soonest; the rest is recomputed. It never picks a plan predicted slower than recomputing everything.

For a request whose hits are blocks b_0..b_{h-1} (each in a tier: host, ssd, remote) after the tokens
vLLM already has, loading the first k blocks costs

    L(k) = sum over i < k of page_bytes / bandwidth(tier of b_i)          (measured, ucm/tiers/rates.py)
    C(k) = step times of (tokens to compute - k * block_size)              (measured, StepTimes below)
           summed over its steps: vLLM computes at most max_num_batched_tokens a step

and the predicted time to the first token is L + C where the load comes before the forward pass, and
max(L, C) where it overlaps it layer by layer (`overlap`: "none"; "ssd": SSD hits layer by layer, host
hits before, as on vLLM's CPU build; "all": every hit layer by layer, as a GPU's synchronous loads).
An asynchronous load also costs `async_delay_s` whatever its size: the request waits for the step that
reports the load and for the one vLLM's async scheduling had already planned (ASYNC_DELAY_S, from the
step trace). Without it the planner loaded a prompt's last block, 15 tokens, when vLLM's prefix cache
held the rest: nothing saved (a pass of 1 or 16 tokens costs the same) for two more steps.
The planner takes the k with the lowest prediction, and loads nothing unless that saves at least
MARGIN of the recompute time (figures drift; a tie is not worth a load). While a figure it needs is
unknown (nothing measured yet, or too old) it loads every hit, which measures it, with one exception:
where loads do not overlap the forward pass (async loads, vLLM's GPU default) and the unknown figure is
a tier slower than memory (SSD, remote), one request at a time measures it (the probe) and requests
arriving meanwhile load only the hits before that tier's first block. Otherwise a burst of requests
decided before any load was measured all loads from a disk slower than recompute (on the H200: 64
requests at once, 0.34x the throughput of recomputing them). The probe ends when its request finishes,
when the figure is measured, or after PROBE_S. Host memory is never probed: a host load costs a memory
copy, which beats recompute on any engine; with layer-wise loads (overlap "ssd", "all") the loads are
not timed, so nothing would end a probe but its request, and every hit loads as before.

The step time comes from the worker's own forward passes (`ForwardTimer`: CUDA events on the compute
stream on a GPU, the clock on a CPU; `StepTimes` keeps medians of them by the tokens each pass computed).
Two earlier designs skipped host-tier hits worth ~20 ms on the H200: timing the scheduler's steps (under
vLLM's async scheduling those intervals hold other steps, output processing and load handshakes: a
pass of one token priced at 57 ms), then a line fitted to the worker's passes (the first 1-token pass
over a 2,000-token prompt took 100 ms, and the line priced every pass at 43 ms or more).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from statistics import median

import numpy as np

from ucm.tiers.rates import Rates

MARGIN = 0.1  # a load must be predicted to save this share of the recompute time
ASYNC_DELAY_S = 0.003  # what an async load adds besides its copy: two engine steps (H200, vLLM 0.26: 2-4 ms)
OVERLAPS = ("none", "ssd", "all")
PROBE_S = 30.0  # a probe older than this no longer holds other requests back (its load did not measure)


@dataclass(frozen=True)
class LoadDecision:
    """What to load of a request's hits, and why (times in seconds; None where unknown)."""

    load_blocks: int  # leading hit blocks to load (the rest of the hits is recomputed)
    hit_blocks: int
    load_s: float | None  # predicted load time of the chosen blocks
    ttft_s: float | None  # predicted time to the first token with this plan
    recompute_s: float | None  # predicted time with nothing loaded
    load_all_s: float | None  # predicted time loading every hit
    reason: str  # "load all", "partial", "not worth loading", "not measured: ...", "being measured: ..."
    tiers: tuple[tuple[str, int, float | None], ...] = ()  # (tier, hit blocks, GB/s) in hit order
    probe: tuple[str, ...] = ()  # tiers whose bandwidth this plan's load measures for the others (the probe)

    @property
    def skipped_blocks(self) -> int:
        return self.hit_blocks - self.load_blocks

    def loaded_by_tier(self) -> dict[str, int]:
        """Blocks to load per tier (the loaded blocks lead the hit order)."""
        out, k = {}, self.load_blocks
        for tier, n, _ in self.tiers:
            taken = min(n, k)
            k -= taken
            if taken:
                out[tier] = out.get(tier, 0) + taken
        return out

    def skipped_by_tier(self) -> dict[str, int]:
        """Hit blocks not loaded, per tier."""
        out = {}
        for tier, n, _ in self.tiers:
            out[tier] = out.get(tier, 0) + n
        for tier, n in self.loaded_by_tier().items():
            out[tier] -= n
        return {t: n for t, n in out.items() if n}

    def sentence(self) -> str:
        """For logs and `ucm doctor`: e.g. 'skipped 500 of 500 hit blocks: ssd 1.1 GB/s, loading
        would take 760 ms, recompute 206 ms'."""
        rates = ", ".join(f"{t} {'?' if g is None else f'{g:.3g}'} GB/s" for t, _, g in self.tiers)
        if self.reason.startswith("not measured"):
            return f"loaded all {self.hit_blocks} hit blocks ({self.reason})"
        if self.reason.startswith("being measured"):
            return (f"skipped {self.skipped_blocks} of {self.hit_blocks} hit blocks: {rates}; "
                    f"{self.reason[len('being measured: '):]} being measured by another request")
        ms = lambda s: f"{1e3 * s:.0f} ms"  # noqa: E731
        if self.load_blocks == self.hit_blocks:
            return f"loaded all {self.hit_blocks} hit blocks: {rates}, predicted {ms(self.ttft_s)} against " \
                   f"recompute {ms(self.recompute_s)}"
        return (f"skipped {self.skipped_blocks} of {self.hit_blocks} hit blocks: {rates}, loading all would "
                f"take {ms(self.load_all_s)}, recompute {ms(self.recompute_s)}, chosen {ms(self.ttft_s)}")


class LoadPlanner:
    def __init__(self, rates: Rates, page_bytes: int, block_size: int, overlap: str = "none",
                 enabled: bool = True, clock=time.monotonic, step_tokens: int | None = None,
                 async_delay_s: float = 0.0):
        """`step_tokens`: the most tokens vLLM computes in one step (max_num_batched_tokens): a longer
        prompt is computed in chunks, and its time is theirs summed (None: one pass whatever its size).
        `async_delay_s`: the fixed cost of a load (seconds; ASYNC_DELAY_S where loads are asynchronous)."""
        if overlap not in OVERLAPS:
            raise ValueError(f"overlap must be one of {OVERLAPS}, got {overlap!r}")
        self.rates, self.page_bytes, self.block_size = rates, page_bytes, block_size
        self.overlap, self.enabled, self.clock = overlap, enabled, clock
        self.step_tokens, self.async_delay_s = step_tokens, async_delay_s
        self._probes: dict[str, tuple[str, float]] = {}  # tier -> (request measuring it, since when)

    # ---- probes: one request at a time measures an unknown slow tier --------------------------------
    def probe_started(self, tiers: tuple[str, ...], request_id: str) -> None:
        """vLLM accepted a plan whose load measures `tiers` (its `probe`)."""
        for t in tiers:
            self._probes[t] = (request_id, self.clock())

    def request_done(self, request_id: str) -> None:
        """The request finished: whatever it was measuring, it no longer holds others back."""
        for t in [t for t, (r, _) in self._probes.items() if r == request_id]:
            del self._probes[t]

    def _probing(self, tier: str, request_id: str | None) -> bool:
        """Another request than `request_id` has been measuring `tier` for at most PROBE_S."""
        p = self._probes.get(tier)
        return p is not None and p[0] != request_id and self.clock() - p[1] <= PROBE_S

    def compute_seconds(self, tokens):
        """Predicted seconds to compute `tokens` prompt tokens (a number or an array of them), step by step
        (known step time only)."""
        curve = self.rates.prefill_curve()
        x = np.asarray(tokens, dtype=np.float64)
        if not self.step_tokens:
            out = curve.seconds_of(x)
        else:
            m = float(self.step_tokens)
            full, rest = np.floor_divide(x, m), np.mod(x, m)
            out = full * curve.seconds(m) + np.where(rest > 0, curve.seconds_of(rest), 0.0)
        return float(out) if out.ndim == 0 else out

    def decide(self, tiers: list[str], compute_tokens: int, request_id: str | None = None) -> LoadDecision:
        """`tiers`: the tier of each leading hit block, in order; `compute_tokens`: the tokens vLLM
        computes when nothing is loaded (the prompt less what vLLM's own prefix cache has); `request_id`:
        whose plan (a probe never holds back its own request). Side-effect free: vLLM may ask again."""
        h = len(tiers)
        runs: list[tuple[str, int]] = []
        for t in tiers:
            if runs and runs[-1][0] == t:
                runs[-1] = (t, runs[-1][1] + 1)
            else:
                runs.append((t, 1))
        if self.enabled and h:
            self.rates.refresh()  # what other processes measured, before the figures are read
        bw = {t: self.rates.bandwidth(t) for t in {t for t, _ in runs}}
        shown = tuple((t, n, None if bw[t] is None else bw[t] / 1e9) for t, n in runs)
        if not self.enabled or not h:
            return LoadDecision(h, h, None, None, None, None, "load all", shown)
        probed = sorted(t for t, b in bw.items() if b is None and t != "host") if self.overlap == "none" else []
        busy = [t for t in probed if self._probing(t, request_id)]
        if busy:  # another request is measuring these tiers: only the hits before their first block may load
            cut = next(i for i, t in enumerate(tiers) if t in busy)
            before = self.decide(tiers[:cut], compute_tokens, request_id)
            return LoadDecision(before.load_blocks, h, before.load_s, None, before.recompute_s, None,
                                "being measured: " + ", ".join(busy), shown, before.probe)
        unknown = [f"{t} bandwidth" for t, b in bw.items() if b is None]
        if self.rates.prefill_curve() is None:
            unknown.append("prefill rate")
        if unknown:
            return LoadDecision(h, h, None, None, None, None, "not measured: " + ", ".join(sorted(unknown)), shown,
                                tuple(probed))
        # every k at once (k = 0..h): a Python loop over the hits cost 10 ms a 2,000-block lookup on the H200
        ks = np.arange(h + 1)
        compute = self.compute_seconds(np.maximum(1, compute_tokens - ks * self.block_size))
        cost = np.array([self.page_bytes / bw[t] for t, _ in runs]).repeat([n for _, n in runs])
        host = np.array([t == "host" for t, _ in runs]).repeat([n for _, n in runs])
        host_s = np.concatenate(([0.0], np.cumsum(np.where(host, cost, 0.0))))
        other_s = np.concatenate(([0.0], np.cumsum(np.where(host, 0.0, cost))))
        if self.overlap == "all":
            ttft = np.maximum(host_s + other_s, compute)
        elif self.overlap == "ssd":
            ttft = host_s + np.maximum(other_s, compute)
        else:
            ttft = host_s + other_s + compute
        ttft[1:] += self.async_delay_s
        recompute, load_all = float(compute[0]), float(ttft[h])
        k = int(np.flatnonzero(ttft == ttft.min())[-1])  # the most blocks among the best plans
        ttft_k, load_s = float(ttft[k]), float(host_s[k] + other_s[k])
        if k and ttft_k > (1 - MARGIN) * recompute:
            ttft_k, k, load_s = recompute, 0, 0.0
        reason = "load all" if k == h else "partial" if k else "not worth loading"
        return LoadDecision(k, h, load_s, ttft_k, recompute, load_all, reason, shown)


class StepTimes:
    """The engine's forward-pass time by the tokens a pass computes, handed to `rates` as a StepCurve.

    Passes are kept per power-of-two bucket of tokens, the last KEEP of each; a bucket with at least
    MIN_BUCKET passes gives one point, the median of its tokens and of its seconds, and the points are made
    monotone (a pass of fewer tokens is never predicted slower than one of more). Medians, not a fitted
    line: the first pass of a new shape (on the H200, a 1-token pass over a 2,000-token prompt took 100 ms
    once and 14-20 ms after) or a stall moves no median, an engine slower for good moves them within
    KEEP // 2 + 1 passes, and the curve holds both the fixed cost of a pass and attention's growth with the
    prompt (a line through 2K and 32K passes priced a 50 ms 2K prefill at 85 ms). A process's first passes
    are not kept (they compile and warm caches); no curve before MIN_SAMPLES prefill passes."""

    KEEP = 7  # passes kept per bucket
    MIN_BUCKET = 3  # passes a bucket needs to count (one odd pass never decides a median)
    MIN_PREFILL_TOKENS = 128  # passes with fewer tokens tell little about prefill
    MIN_SAMPLES = 3  # prefill passes before the first curve
    WARMUP_PASSES = 2  # a process's first passes, not kept

    def __init__(self, rates: Rates):
        self.rates = rates
        self._buckets: dict[int, deque[tuple[int, float]]] = {}
        self._prefill_passes = 0
        self._warmup = self.WARMUP_PASSES

    def add(self, tokens: int, seconds: float) -> None:
        """One forward pass that computed `tokens` tokens in `seconds`."""
        if tokens <= 0 or seconds <= 0:
            return
        if self._warmup:
            self._warmup -= 1
            return
        self._buckets.setdefault(tokens.bit_length(), deque(maxlen=self.KEEP)).append((tokens, seconds))
        if tokens >= self.MIN_PREFILL_TOKENS:
            self._prefill_passes += 1
        points = self.points() if self._prefill_passes >= self.MIN_SAMPLES else []
        if points:
            self.rates.record_prefill(points)

    def points(self) -> list[tuple[float, float]]:
        """(tokens, seconds) per bucket with MIN_BUCKET passes, tokens ascending, seconds not falling."""
        pts = [(median(t for t, _ in q), median(s for _, s in q))
               for _, q in sorted(self._buckets.items()) if len(q) >= self.MIN_BUCKET]
        for i in range(len(pts) - 2, -1, -1):  # from the largest down: a smaller pass costs at most a larger one
            pts[i] = (pts[i][0], min(pts[i][1], pts[i + 1][1]))
        return pts


class ClockMarks:
    """Marks of a forward pass that runs synchronously (vLLM's CPU build): the clock, in seconds."""

    def __init__(self, clock=time.perf_counter):
        self.clock = clock

    def now(self):
        return self.clock()

    def elapsed(self, a, b) -> float | None:
        return b - a


class CudaMarks:
    """Moments on a GPU: events recorded on the current (compute) stream, in seconds apart once the GPU
    has passed both (never waited for)."""

    def now(self):
        import torch

        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        return ev

    def elapsed(self, a, b) -> float | None:
        return a.elapsed_time(b) / 1e3 if b.query() else None


class ForwardTimer:
    """Times the worker's forward passes for the planner (StepTimes): `begin(tokens)` when vLLM
    binds a step's metadata (just before its forward pass), `end()` at `wait_for_save` (after it; vLLM
    0.32 calls `start_load_kv` after the forward pass too unless a load must precede it). A pass that
    waited for a synchronous load, whole or layer by layer, is not timed (`exclude()`): it would time
    the load. `marks` says what a moment is: the clock on a CPU, a CUDA event recorded on the compute
    stream on a GPU (`elapsed` is None until the GPU has passed both; the timer never waits for it)."""

    MAX_PENDING = 8  # passes issued but not yet done on the GPU; older ones are dropped

    def __init__(self, times: StepTimes, marks):
        self.times, self.marks = times, marks
        self._open: tuple[int, object] | None = None
        self._pending: list[tuple[int, object, object]] = []

    def begin(self, tokens: int) -> None:
        self.poll()
        self._open = (tokens, self.marks.now()) if tokens > 0 else None

    def exclude(self) -> None:
        self._open = None

    def end(self) -> None:
        if self._open is not None:
            self._pending = (self._pending + [(*self._open, self.marks.now())])[-self.MAX_PENDING:]
            self._open = None
        self.poll()

    def poll(self) -> None:
        """Hand the finished passes, in order, to the step times."""
        while self._pending:
            tokens, a, b = self._pending[0]
            seconds = self.marks.elapsed(a, b)
            if seconds is None:
                return
            self._pending.pop(0)
            self.times.add(tokens, seconds)
