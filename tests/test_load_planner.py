"""The load planner's decision rules and the measured rates it works from, with given bandwidths and a
fake clock (no vLLM: the planner is arithmetic on measurements; its place in vLLM's path is covered in
test_vllm_connector.py)."""

import json
import os
import random

import pytest

from ucm.integration.vllm.connector.planner import (ASYNC_DELAY_S, MARGIN, ClockMarks, ForwardTimer, LoadPlanner,
                                                     StepTimes)
from ucm.tiers.rates import MIN_LOAD_BYTES, Rates, StepCurve

PAGE = 2 << 20  # Llama-3-8B, block 16, bf16: 2 MiB per block
BS = 16
GB = 1e9


class Clock:
    def __init__(self, t=1000.0):
        self.t = t

    def __call__(self):
        return self.t


def rates(tmp_path=None, host=None, ssd=None, fixed=0.02, per_token=23e-6, clock=None):
    """Rates with given figures (bytes/s; a step of T tokens takes fixed + per_token * T seconds; the
    defaults make 8,000 tokens take 206 ms as on the H200)."""
    r = Rates(str(tmp_path) if tmp_path else None, clock=clock or Clock())
    for tier, bw in (("host", host), ("ssd", ssd)):
        if bw:
            r.record_load(tier, 1 << 30, (1 << 30) / bw)
    if per_token:
        r.record_prefill(line(fixed, per_token))
    return r


def line(fixed, per_token, upto=1 << 17):
    """Step-time points of a pass costing fixed + per_token * tokens (exact from 1 to `upto` tokens)."""
    return [(1, fixed + per_token), (upto, fixed + per_token * upto)]


def planner(r, overlap="none", enabled=True, async_delay_s=0.0):
    return LoadPlanner(r, PAGE, BS, overlap, enabled, async_delay_s=async_delay_s)


def brute_force(p, tiers, tokens):
    """Predicted TTFT of every k, computed independently of the planner's loop."""
    out = []
    for k in range(len(tiers) + 1):
        host = sum(PAGE / p.rates.bandwidth(t) for t in tiers[:k] if t == "host")
        other = sum(PAGE / p.rates.bandwidth(t) for t in tiers[:k] if t != "host")
        c = p.compute_seconds(max(1, tokens - k * BS))
        fixed = p.async_delay_s if k else 0.0
        out.append(fixed + {"none": host + other + c, "ssd": host + max(other, c), "all": max(host + other, c)}[p.overlap])
    return out


def test_a_figure_not_measured_yet_loads_every_hit():
    d = planner(rates(host=None, ssd=None, per_token=None)).decide(["ssd"] * 10, 8000)
    assert d.load_blocks == 10 and d.reason == "not measured: prefill rate, ssd bandwidth"
    d = planner(rates(ssd=1.1 * GB)).decide(["host"] * 3 + ["ssd"] * 7, 8000)
    assert d.load_blocks == 10 and d.reason == "not measured: host bandwidth"


def test_fast_host_hits_are_loaded():
    d = planner(rates(host=50 * GB)).decide(["host"] * 500, 8000)
    assert d.load_blocks == 500 and d.reason == "load all"
    assert d.ttft_s < d.recompute_s


def test_a_slow_ssd_is_skipped_and_says_why():
    """The H200 figures: 1 GiB of KV from a 1.1 GB/s disk against 206 ms of recompute."""
    d = planner(rates(ssd=1.1 * GB)).decide(["ssd"] * 512, 8000)
    assert d.load_blocks == 0 and d.reason == "not worth loading"
    assert d.ttft_s == d.recompute_s == pytest.approx(0.204, abs=0.005)
    assert d.load_all_s > 0.95
    s = d.sentence()
    assert s.startswith("skipped 512 of 512 hit blocks: ssd 1.1 GB/s") and "recompute 204 ms" in s, s


def test_host_hits_load_and_the_slow_ssd_hits_after_them_do_not():
    d = planner(rates(host=50 * GB, ssd=0.5 * GB)).decide(["host"] * 100 + ["ssd"] * 400, 8000)
    assert d.load_blocks == 100 and d.reason == "partial"
    assert d.loaded_by_tier() == {"host": 100} and d.skipped_by_tier() == {"ssd": 400}
    costs = brute_force(planner(d_rates := rates(host=50 * GB, ssd=0.5 * GB)), ["host"] * 100 + ["ssd"] * 400, 8000)
    assert d.ttft_s == pytest.approx(min(costs)) and d_rates is not None


@pytest.mark.parametrize("overlap", ["all", "ssd"])
def test_with_layer_wise_overlap_a_partial_load_beats_both_extremes(overlap):
    """Loads overlapping compute: TTFT ~ max(load, compute of the rest). At 4 GB/s loading all 500
    blocks (1 GiB) takes 262 ms, recomputing 8,000 tokens 204 ms; loading about 44% of them balances
    the two near 115 ms."""
    p = planner(rates(ssd=4 * GB), overlap)
    tiers = ["ssd"] * 500
    d = p.decide(tiers, 8000)
    assert 0 < d.load_blocks < 500 and d.reason == "partial"
    assert d.ttft_s < 0.6 * d.recompute_s and d.ttft_s < 0.6 * d.load_all_s
    costs = brute_force(p, tiers, 8000)
    assert d.ttft_s == pytest.approx(min(costs)) and costs[d.load_blocks] == pytest.approx(d.ttft_s)


def test_a_saving_under_the_margin_is_not_worth_a_load():
    """Loading everything is predicted 5% faster than recomputing: within the margin, so nothing loads."""
    tokens, n = 8000, 100
    recompute = 0.02 + 23e-6 * tokens
    want = (1 - MARGIN / 2) * recompute  # predicted TTFT of loading all
    load_s = want - (0.02 + 23e-6 * (tokens - n * BS))
    d = planner(rates(ssd=n * PAGE / load_s)).decide(["ssd"] * n, tokens)
    assert d.load_all_s == pytest.approx(want) and d.load_blocks == 0
    d = planner(rates(ssd=n * PAGE / (load_s / 2))).decide(["ssd"] * n, tokens)
    assert d.load_blocks == n


def test_the_planner_never_picks_a_plan_predicted_slower_than_recompute():
    rng = random.Random(7)
    for _ in range(300):
        r = rates(host=rng.uniform(0.5, 60) * GB, ssd=rng.uniform(0.05, 8) * GB, fixed=rng.uniform(0, 0.05),
                  per_token=rng.uniform(2e-6, 2e-4))
        overlap = rng.choice(["none", "ssd", "all"])
        p = planner(r, overlap, async_delay_s=rng.choice([0.0, ASYNC_DELAY_S]) if overlap == "none" else 0.0)
        h = rng.randint(1, 300)
        cut = rng.randint(0, h)
        tiers = ["host"] * cut + ["ssd"] * (h - cut)
        tokens = h * BS + rng.randint(1, 2000)
        d = p.decide(tiers, tokens)
        costs = brute_force(p, tiers, tokens)
        assert d.ttft_s <= costs[0] + 1e-12
        if d.load_blocks:
            assert d.ttft_s <= (1 - MARGIN) * costs[0] + 1e-12
            assert d.ttft_s == pytest.approx(min(costs))


def test_an_async_load_of_the_last_block_vllm_lacks_is_not_worth_its_steps():
    """H200, vLLM 0.26, a repeated 8,000-token prompt: vLLM's prefix cache holds all but the last block
    (it computes the last token itself), ucm holds that block. Loading it spares 15 tokens of a pass
    that runs anyway, and an async load costs two engine steps: not loaded. The step curve of that run
    priced 16 tokens 3 ms above 1 (its buckets' passes ran over prompts of other lengths), more than the
    margin, and two of five such requests paid the two steps. A whole 2,000-token hit still loads."""
    r = Rates(None, clock=Clock())
    r.record_prefill([(1, 0.023), (16, 0.026), (2000, 0.050), (8000, 0.205)])
    r.record_load("host", 1 << 30, (1 << 30) / (50 * GB))
    assert planner(r).decide(["host"], 16).load_blocks == 1  # what the planner did without the delay
    d = planner(r, async_delay_s=ASYNC_DELAY_S).decide(["host"], 16)
    assert d.load_blocks == 0 and d.reason == "not worth loading"
    assert planner(r, async_delay_s=ASYNC_DELAY_S).decide(["host"] * 125, 2000).load_blocks == 125


def test_a_prompt_longer_than_a_step_is_priced_by_its_chunks():
    """vLLM computes at most max_num_batched_tokens per step: 32,000 tokens at 16,384 a step are two
    passes (on the H200: 1,173 ms; the curve's 32,000-token point alone, extrapolated from passes of at
    most 16,384 tokens, says about half)."""
    r = Rates(None, clock=Clock())
    r.record_prefill([(1, 0.018), (2000, 0.047), (8000, 0.21), (16384, 0.58)])
    r.record_load("ssd", 1 << 30, (1 << 30) / (1.4 * GB))
    chunked = LoadPlanner(r, PAGE, BS, step_tokens=16384)
    d = chunked.decide(["ssd"] * 2000, 32000)
    assert d.recompute_s == pytest.approx(0.58 + r.prefill_seconds(32000 - 16384))
    assert chunked.compute_seconds(2000) == r.prefill_seconds(2000)  # one step: as it is
    assert planner(r).decide(["ssd"] * 2000, 32000).recompute_s == pytest.approx(r.prefill_seconds(32000))


def test_switched_off_it_loads_every_hit():
    d = planner(rates(ssd=0.01 * GB), enabled=False).decide(["ssd"] * 50, 8000)
    assert d.load_blocks == 50 and d.reason == "load all"


def test_one_request_at_a_time_measures_an_unknown_slow_tier():
    """Async loads (no overlap), the SSD's bandwidth unknown: the first request loads every hit and
    measures it (its plan's probe); a request arriving meanwhile loads only its host hits before the
    first SSD block, and its own later lookups are not held back by it; once the probe's request is
    done, the next one probes; once the figure is measured, the rules decide as usual. Host memory is
    never probed, and a probe whose load measured nothing stops holding others after PROBE_S."""
    clock = Clock()
    r = rates(host=50 * GB, clock=clock)
    p = LoadPlanner(r, PAGE, BS, "none", clock=clock)
    hits = ["host"] * 100 + ["ssd"] * 100  # 1,600 tokens from host memory save more than the margin
    first = p.decide(hits, 8000, "r1")
    assert first.load_blocks == 200 and first.probe == ("ssd",) and first.reason == "not measured: ssd bandwidth"
    p.probe_started(first.probe, "r1")
    assert p.decide(hits, 8000, "r1").load_blocks == 200, "the probe's own request asks again"
    second = p.decide(hits, 8000, "r2")
    assert second.load_blocks == 100 and second.reason == "being measured: ssd" and not second.probe
    assert second.loaded_by_tier() == {"host": 100} and second.skipped_by_tier() == {"ssd": 100}
    assert second.sentence() == ("skipped 100 of 200 hit blocks: host 50 GB/s, ssd ? GB/s; ssd being measured by "
                                 "another request")
    assert p.decide(["ssd"] * 10, 8000, "r3").load_blocks == 0
    p.request_done("r1")
    third = p.decide(hits, 8000, "r3")
    assert third.load_blocks == 200 and third.probe == ("ssd",)
    p.probe_started(third.probe, "r3")
    clock.t += 31  # r3's load measured nothing (say it failed): after PROBE_S it no longer holds the SSD
    assert p.decide(hits, 8000, "r4").probe == ("ssd",)
    r.record_load("ssd", 1 << 30, (1 << 30) / (1.1 * GB))
    p.probe_started(("ssd",), "r4")
    d = p.decide(["ssd"] * 100, 8000, "r5")
    assert d.reason == "not worth loading" and not d.probe, "a measured figure: the rules decide"
    host_unknown = LoadPlanner(rates(ssd=1.1 * GB, clock=clock), PAGE, BS, "none", clock=clock)
    d = host_unknown.decide(["host"] * 50, 8000, "r6")
    assert d.load_blocks == 50 and not d.probe, "host memory is loaded while unknown, never probed"


@pytest.mark.parametrize("overlap", ["ssd", "all"])
def test_layer_wise_loads_are_not_probed(overlap):
    """With loads overlapping the forward pass they are not timed, so nothing but the request's end
    would end a probe: every request loads while the figure is unknown, as before."""
    p = planner(rates(host=50 * GB), overlap)
    d = p.decide(["ssd"] * 100, 8000, "r1")
    assert d.load_blocks == 100 and not d.probe
    assert p.decide(["ssd"] * 100, 8000, "r2").load_blocks == 100


def test_rates_follow_new_loads_and_ignore_small_ones():
    r = rates(ssd=2 * GB)
    r.record_load("ssd", 1 << 30, (1 << 30) / (1 * GB))
    assert 1.6 * GB < r.bandwidth("ssd") < 1.8 * GB  # a running mean moving toward 1 GB/s
    r.record_load("ssd", MIN_LOAD_BYTES - 1, 1.0)  # mostly fixed cost: not a bandwidth
    assert 1.6 * GB < r.bandwidth("ssd") < 1.8 * GB


def test_old_figures_count_as_unknown():
    clock = Clock()
    r = rates(ssd=1 * GB, clock=clock)
    clock.t += r.max_age_s + 1
    assert r.bandwidth("ssd") is None and r.prefill_seconds(100) is None
    assert planner(r).decide(["ssd"] * 5, 1000).reason.startswith("not measured")


def test_rates_are_shared_through_the_store_directory(tmp_path):
    clock = Clock()
    a = rates(tmp_path, ssd=1.5 * GB, clock=clock)
    a.write()
    b = Rates(str(tmp_path), clock=clock)
    assert b.bandwidth("ssd") == pytest.approx(1.5 * GB) and b.prefill_seconds(1000) == pytest.approx(0.043)
    assert oct(os.stat(tmp_path / "rates" / "tiers.json").st_mode & 0o777) == "0o600"
    clock.t += 10
    c = rates(tmp_path, host=40 * GB, ssd=3 * GB, clock=clock)  # another process: goes on from a's mean
    assert c.bandwidth("ssd") == pytest.approx(1.5 * GB + 0.3 * 1.5 * GB)
    c.write()
    b.refresh()  # b takes the newer figures
    assert b.bandwidth("ssd") == pytest.approx(c.bandwidth("ssd")) and b.bandwidth("host") == pytest.approx(40 * GB)


def test_a_broken_rates_file_leaves_the_figures_unknown(tmp_path):
    (tmp_path / "rates").mkdir()
    (tmp_path / "rates" / "tiers.json").write_text("{not json")
    (tmp_path / "rates" / "prefill.json").write_text(json.dumps({"fixed": {"value": "x"}}))
    r = Rates(str(tmp_path), clock=Clock())
    assert r.bandwidth("ssd") is None and r.prefill_seconds(10) is None


def test_the_step_curve_interpolates_and_extrapolates_from_points_far_enough_apart():
    one = StepCurve.of([(2000, 0.05)], 0.0)
    assert one.seconds(1000) == pytest.approx(0.025) and one.seconds(8000) == pytest.approx(0.2)  # through 0
    c = StepCurve.of([(2000, 0.05), (1, 0.015), (8000, 0.23)], 0.0)  # any order in, tokens ascending kept
    assert c.points[0] == (1.0, 0.015)
    assert c.seconds(1) == pytest.approx(0.015) and c.seconds(2000) == pytest.approx(0.05)
    assert c.seconds(5000) == pytest.approx(0.05 + 0.18 * 3000 / 6000)  # between points: linear
    assert c.seconds(14000) == pytest.approx(0.23 + 0.18)  # beyond the last: the last segment's line
    flat_left = StepCurve.of([(100, 0.01), (200, 0.03)], 0.0)
    assert flat_left.seconds(90) == pytest.approx(0.008) and flat_left.seconds(10) == 0.0  # never below 0
    near = StepCurve.of([(3904, 7.30), (4096, 7.31)], 0.0)  # two near points: no slope to extrapolate
    assert near.seconds(64) == pytest.approx(7.30 * 64 / 3904) and near.seconds(8192) == pytest.approx(7.31 * 2)
    assert StepCurve.of([], 0.0) is None and StepCurve.of([(0, 0.1)], 0.0) is None
    assert StepCurve.of([(5, 0.1), (5, 0.2)], 0.0) is None


def attention_cost(n):
    """A pass of n tokens: a fixed cost, a per-token cost and attention's growth with the square."""
    return 0.015 + 20e-6 * n + 1e-9 * n * n


def test_step_times_hold_the_fixed_cost_and_the_growth_of_attention():
    r = Rates(None, clock=Clock())
    times = StepTimes(r)
    times.add(300, 3.5)  # a fresh engine's first passes compile: seconds, not kept
    times.add(64, 0.9)
    sizes = [1, 64, 512, 2048, 4096, 8192, 16384, 32768]
    for _ in range(StepTimes.MIN_BUCKET):
        for n in sizes:
            times.add(n, attention_cost(n))
    for n in sizes:  # measured sizes: exact
        assert r.prefill_seconds(n) == pytest.approx(attention_cost(n), rel=1e-9)
    for n in (1000, 3000, 12000, 24000):  # between them: within 10% (a line fitted to them: 10-116% off)
        assert r.prefill_seconds(n) == pytest.approx(attention_cost(n), rel=0.1), n


def test_step_times_wait_for_prefill_passes_and_follow_recent_ones():
    r = Rates(None, clock=Clock())
    times = StepTimes(r)
    times._warmup = 0
    for _ in range(20):
        times.add(1, 0.01)  # decode passes alone say nothing of prefill
    times.add(2000, 0.05)
    times.add(2000, 0.05)
    assert r.prefill_seconds(1000) is None
    times.add(2000, 0.05)
    assert r.prefill_seconds(1) == pytest.approx(0.01) and r.prefill_seconds(2000) == pytest.approx(0.05)
    times.add(2000, 2.0)  # one stall (a collection, a page-fault storm): moves no median
    assert r.prefill_seconds(2000) == pytest.approx(0.05)
    for _ in range(StepTimes.KEEP // 2 + 1):  # twice as slow for good: followed within KEEP // 2 + 1 passes
        times.add(2000, 0.1)
    assert r.prefill_seconds(2000) == pytest.approx(0.1)


def test_a_new_shapes_first_pass_does_not_make_a_host_hit_look_not_worth_loading():
    """As on the H200 (2026-12-03, vLLM 0.26, eager): 2,000-token prefills take 47 ms, the first 1-token
    pass over a loaded 2,000-token prompt took 100 ms and the next ones 14-20 ms. A line fitted to these
    priced every pass at 43 ms or more, so the planner skipped 2K host hits (each worth ~20 ms: 49 ms
    against 30 when loaded). Here every decision along the way loads the hit."""
    r = Rates(None, clock=Clock())
    r.record_load("host", 1 << 30, (1 << 30) / (44.5 * GB))
    times = StepTimes(r)
    times._warmup = 0
    p = planner(r)
    for _ in range(5):
        times.add(2000, 0.047)
    for sec in (0.0998, 0.014, 0.020, 0.017, 0.018, 0.018):
        times.add(1, sec)
        d = p.decide(["host"] * 125, 2000)
        assert d.load_blocks == 125, (sec, d.sentence())
    assert r.prefill_seconds(1) == pytest.approx(0.018)


def test_a_host_hit_on_vllm_cpu_loads_whole_when_only_a_prompt_s_two_chunks_were_timed():
    """vLLM's CPU build, SmolLM2-135M, 8,000-token prompts in chunks of 4,096: the step times known are
    the two chunks (3,904 and 4,096 tokens, ~7.3 s each). A line through them is flat, and priced the 64
    tokens left after loading 62 host blocks at 7.3 s: the planner loaded 31 of 62 and the prompt took 22 s
    (an 81 ms load of all 62, and a 0.4 s pass, when loaded)."""
    r = Rates(None, clock=Clock())
    r.record_load("host", 1 << 30, (1 << 30) / (2.25 * GB))
    times = StepTimes(r)
    times._warmup = 0
    for _ in range(3):
        times.add(4096, 7.31)
        times.add(3904, 7.30)
    p = LoadPlanner(r, 2949120, 128, overlap="ssd", step_tokens=4096)
    d = p.decide(["host"] * 62, 8000)
    assert d.load_blocks == 62 and d.ttft_s < 0.5, d.sentence()


def test_a_pass_of_fewer_tokens_is_never_predicted_slower_than_one_of_more():
    r = Rates(None, clock=Clock())
    times = StepTimes(r)
    times._warmup = 0
    for _ in range(3):
        times.add(100, 0.08)  # slower than the larger passes (a cold shape, a busy host): capped
        times.add(2000, 0.05)
    assert r.prefill_seconds(100) == pytest.approx(0.05)
    assert times.points() == [(100, 0.05), (2000, 0.05)]


class LateMarks:
    """Marks like CUDA events: a moment is 'done' only once `done` has passed it (the GPU ran that far)."""

    def __init__(self):
        self.t, self.done = 0.0, -1.0

    def now(self):
        return self.t

    def elapsed(self, a, b):
        return b - a if b <= self.done else None


def test_the_forward_timer_times_passes_once_done_in_order_and_never_waits():
    r = Rates(None, clock=Clock())
    times = StepTimes(r)
    marks = LateMarks()
    times._warmup = 0
    timer = ForwardTimer(times, marks)
    for n in (1000, 2000) * StepTimes.MIN_BUCKET:
        timer.begin(n)
        marks.t += 0.01 + 20e-6 * n
        timer.end()
        marks.t += 0.5  # the rest of the step, outside the forward pass
    assert times._prefill_passes == 0 and len(timer._pending) == 6, "no pass is done on the 'GPU' yet"
    marks.done = marks.t
    timer.begin(0)  # a step without a forward pass is not timed
    marks.t += 5.0
    timer.end()
    timer.begin(4000)
    timer.exclude()  # nor one that waited for a synchronous load
    marks.t += 5.0
    timer.end()
    assert times._prefill_passes == 6 and not timer._pending
    assert r.prefill_seconds(1500) == pytest.approx(0.01 + 20e-6 * 1500, rel=1e-6)
    for _ in range(3 * ForwardTimer.MAX_PENDING):  # a GPU that never reports: a bounded queue
        timer.begin(500)
        timer.end()
    assert len(timer._pending) == ForwardTimer.MAX_PENDING


def test_the_forward_timer_on_a_clock():
    clock = Clock(0.0)
    r = Rates(None, clock=Clock())
    timer = ForwardTimer(StepTimes(r), ClockMarks(clock))
    for n in (300, 300) + (1000, 4000, 2000, 8000) * StepTimes.MIN_BUCKET:  # the first two warm the engine up
        timer.begin(n)
        clock.t += 0.01 + 20e-6 * n
        timer.end()
        clock.t += 3.0  # idle until the next request: never counted
    assert r.prefill_seconds(8000) == pytest.approx(0.01 + 20e-6 * 8000)

