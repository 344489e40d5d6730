"""The load planner: how many of a request's leading hit blocks to load, so that its first token comes
soonest; the rest is recomputed. It never picks a plan predicted slower than recomputing everything.

For a request whose hits are blocks b_0..b_{h-1} (each in a tier: host, ssd, remote) after the tokens
vLLM already has, loading the first k blocks costs

    L(k) = sum over i < k of page_bytes / bandwidth(tier of b_i)          (measured, ucm/tiers/rates.py)
    C(k) = fixed + per_token * (tokens to compute - k * block_size)        (the engine's step time, fitted)

and the predicted time to the first token is L + C where the load comes before the forward pass, and
max(L, C) where it overlaps it layer by layer (`overlap`: "none"; "ssd": SSD hits layer by layer, host
hits before, as on vLLM's CPU build; "all": every hit layer by layer, as a GPU's synchronous loads).
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
stream on a GPU, the clock on a CPU; `PrefillFit` fits it against the tokens each pass computed). An
earlier design timed the scheduler's steps instead; under vLLM's async scheduling those intervals hold
other steps, output processing and load handshakes, and on the H200 its fit priced a pass of one token
at 57 ms and 2,000 more tokens at about 1 ms, so the planner skipped a host-tier hit worth ~15 ms.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from ucm.tiers.rates import Rates

MARGIN = 0.1  # a load must be predicted to save this share of the recompute time
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
                 enabled: bool = True, clock=time.monotonic):
        if overlap not in OVERLAPS:
            raise ValueError(f"overlap must be one of {OVERLAPS}, got {overlap!r}")
        self.rates, self.page_bytes, self.block_size = rates, page_bytes, block_size
        self.overlap, self.enabled, self.clock = overlap, enabled, clock
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

    def _ttft(self, host_s: float, other_s: float, compute_s: float) -> float:
        """Predicted time to the first token: host loads `host_s`, SSD and remote loads `other_s`."""
        if self.overlap == "all":
            return max(host_s + other_s, compute_s)
        if self.overlap == "ssd":
            return host_s + max(other_s, compute_s)
        return host_s + other_s + compute_s

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
        if self.rates.prefill_seconds(1) is None:
            unknown.append("prefill rate")
        if unknown:
            return LoadDecision(h, h, None, None, None, None, "not measured: " + ", ".join(sorted(unknown)), shown,
                                tuple(probed))
        bs, page = self.block_size, self.page_bytes
        compute = lambda k: self.rates.prefill_seconds(max(1, compute_tokens - k * bs))  # noqa: E731
        recompute = compute(0)
        best = (recompute, 0, 0.0)
        host_s = other_s = 0.0
        for k, t in enumerate(tiers, start=1):
            cost = page / bw[t]
            if t == "host":
                host_s += cost
            else:
                other_s += cost
            ttft = self._ttft(host_s, other_s, compute(k))
            if ttft <= best[0]:
                best = (ttft, k, host_s + other_s)
        load_all = self._ttft(host_s, other_s, compute(h))
        ttft, k, load_s = best
        if k and ttft > (1 - MARGIN) * recompute:
            ttft, k, load_s = recompute, 0, 0.0
        reason = "load all" if k == h else "partial" if k else "not worth loading"
        return LoadDecision(k, h, load_s, ttft, recompute, load_all, reason, shown)


class PrefillFit:
    """Fits forward-pass seconds = fixed + per_token * tokens over recent passes (older ones decay) and
    hands each new fit to `rates`. A process's first passes are not fitted (they compile and warm caches:
    seconds where later passes take milliseconds), nor a pass far slower than the fit predicts (a stall),
    unless such passes keep coming (then the engine is slower now, and the fit follows)."""

    DECAY = 0.95  # weight of the older passes per new pass
    MIN_PREFILL_TOKENS = 128  # passes with fewer tokens tell little about prefill
    MIN_SAMPLES = 3  # prefill passes before the first fit
    WARMUP_PASSES = 2  # a process's first passes, not fitted
    STALL = 4.0  # a pass this many times slower than predicted, and STALL_S slower, is a stall...
    STALL_S = 0.1
    STALLS_TO_FOLLOW = 3  # ...unless this many come in a row

    def __init__(self, rates: Rates):
        self.rates = rates
        self._sums = [0.0] * 5  # decayed sums of w, x, y, xx, xy
        self._prefill_passes = 0
        self._warmup = self.WARMUP_PASSES
        self._stalls: list[tuple[int, float]] = []  # the stalls in a row so far

    def add(self, tokens: int, seconds: float) -> None:
        """One forward pass that computed `tokens` tokens in `seconds`."""
        if tokens <= 0 or seconds <= 0:
            return
        if self._warmup:
            self._warmup -= 1
            return
        fit = self.fit() if self._prefill_passes >= self.MIN_SAMPLES else None
        predicted = None if fit is None else fit[0] + fit[1] * tokens
        if predicted is not None and seconds > max(self.STALL * predicted, predicted + self.STALL_S):
            self._stalls.append((tokens, seconds))
            if len(self._stalls) < self.STALLS_TO_FOLLOW:
                return
            stalls, self._stalls = self._stalls, []  # slower for good: the fit starts over from these
            self._sums, self._prefill_passes = [0.0] * 5, 0
            for t, sec in stalls:
                self._add(t, sec)
            return
        if tokens >= self.MIN_PREFILL_TOKENS:
            self._stalls = []  # the run of stalls ends (decode passes between them do not end it)
        self._add(tokens, seconds)

    def _add(self, tokens: int, seconds: float) -> None:
        x, y = float(tokens), seconds
        s = self._sums = [v * self.DECAY for v in self._sums]
        for i, v in enumerate((1.0, x, y, x * x, x * y)):
            s[i] += v
        if x >= self.MIN_PREFILL_TOKENS:
            self._prefill_passes += 1
        if self._prefill_passes >= self.MIN_SAMPLES:
            fit = self.fit()
            if fit is not None:
                self.rates.record_prefill(*fit)

    def fit(self) -> tuple[float, float] | None:
        """(fixed seconds per pass, seconds per token), or None."""
        w, sx, sy, sxx, sxy = self._sums
        if w <= 0 or sx <= 0:
            return None
        mx, my = sx / w, sy / w
        var = sxx / w - mx * mx
        if var > 1e-9 * mx * mx:
            per_token = (sxy / w - mx * my) / var
            fixed = my - per_token * mx
            if per_token > 0 and fixed >= 0:
                return fixed, per_token
        return 0.0, sxy / sxx  # through the origin: all passes of one size, or a negative intercept


class ClockMarks:
    """Marks of a forward pass that runs synchronously (vLLM's CPU build): the clock, in seconds."""

    def __init__(self, clock=time.perf_counter):
        self.clock = clock

    def now(self):
        return self.clock()

    def elapsed(self, a, b) -> float | None:
        return b - a


class ForwardTimer:
    """Times the worker's forward passes for the planner's step-time fit: `begin(tokens)` when vLLM
    binds a step's metadata (just before its forward pass), `end()` at `wait_for_save` (after it; vLLM
    0.32 calls `start_load_kv` after the forward pass too unless a load must precede it). A pass that
    waited for a synchronous load, whole or layer by layer, is not timed (`exclude()`): it would time
    the load. `marks` says what a moment is: the clock on a CPU, a CUDA event recorded on the compute
    stream on a GPU (`elapsed` is None until the GPU has passed both; the timer never waits for it)."""

    MAX_PENDING = 8  # passes issued but not yet done on the GPU; older ones are dropped

    def __init__(self, fit: PrefillFit, marks):
        self.fit, self.marks = fit, marks
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
        """Hand the finished passes, in order, to the fit."""
        while self._pending:
            tokens, a, b = self._pending[0]
            seconds = self.marks.elapsed(a, b)
            if seconds is None:
                return
            self._pending.pop(0)
            self.fit.add(tokens, seconds)
