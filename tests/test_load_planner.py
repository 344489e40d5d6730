"""The load planner's decision rules and the measured rates it works from, with given bandwidths and a
fake clock (no vLLM: the planner is arithmetic on measurements; its place in vLLM's path is covered in
test_vllm_connector.py)."""

import json
import os
import random

import pytest

from ucm.integration.vllm.connector.planner import MARGIN, LoadPlanner, StepTimer
from ucm.tiers.rates import MIN_LOAD_BYTES, Rates

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
        r.record_prefill(fixed, per_token)
    return r


def planner(r, overlap="none", enabled=True):
    return LoadPlanner(r, PAGE, BS, overlap, enabled)


def brute_force(p, tiers, tokens):
    """Predicted TTFT of every k, computed independently of the planner's loop."""
    out = []
    for k in range(len(tiers) + 1):
        host = sum(PAGE / p.rates.bandwidth(t) for t in tiers[:k] if t == "host")
        other = sum(PAGE / p.rates.bandwidth(t) for t in tiers[:k] if t != "host")
        c = p.rates.prefill_seconds(max(1, tokens - k * BS))
        out.append({"none": host + other + c, "ssd": host + max(other, c), "all": max(host + other, c)}[p.overlap])
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
        p = planner(r, rng.choice(["none", "ssd", "all"]))
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


def test_switched_off_it_loads_every_hit():
    d = planner(rates(ssd=0.01 * GB), enabled=False).decide(["ssd"] * 50, 8000)
    assert d.load_blocks == 50 and d.reason == "load all"


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


def test_the_step_timer_fits_fixed_and_per_token_time_from_busy_steps():
    clock = Clock(0.0)
    r = Rates(None, clock=clock)
    timer = StepTimer(r, clock=clock)
    rng = random.Random(3)
    for i in range(40):
        tokens = {"a": rng.choice([1, 512, 2048, 4096]), "b": 1}
        timer.step(tokens)
        clock.t += 0.015 + 40e-6 * sum(tokens.values())
    assert r.prefill_seconds(1000) == pytest.approx(0.015 + 40e-6 * 1000, rel=1e-6)


def test_the_step_timer_ignores_the_wait_of_an_idle_engine():
    clock = Clock(0.0)
    r = Rates(None, clock=clock)
    timer = StepTimer(r, clock=clock)
    for i in range(6):
        timer.step({f"r{i}": 1000})  # each step a new request: the engine went idle between them
        clock.t += 5.0
    assert r.prefill_seconds(1000) is None
    for i in range(4):
        timer.step({"x": 1000})
        clock.t += 0.05
    assert r.prefill_seconds(1000) == pytest.approx(0.05)


def test_the_step_timer_times_a_last_step_by_the_request_finishing():
    """One-token requests one at a time (no step follows a busy one): each step ends when its request
    finishes, and a step is counted once even if the next step also ends it."""
    clock = Clock(0.0)
    r = Rates(None, clock=clock)
    timer = StepTimer(r, clock=clock)
    for i, n in enumerate([1000, 4000, 2000, 8000]):
        timer.step({f"q{i}": n})
        clock.t += 0.01 + 20e-6 * n
        timer.finished(f"q{i}")
        clock.t += 3.0  # idle until the next request
    assert r.prefill_seconds(8000) == pytest.approx(0.01 + 20e-6 * 8000)
    timer.step({"a": 500, "b": 1})
    clock.t += 0.5
    timer.finished("b")
    timer.step({"a": 1})  # the same step again: already timed
    assert timer._sums[0] == pytest.approx(sum(0.95 ** k for k in range(5)))
