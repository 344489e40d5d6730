"""bench/serve_load.py's load, short: concurrent multi-turn chat clients on the CPU build's server with
ucm (vLLM's KV cache and the host tier both small, so both evict), then a sample replayed on a server
without the connector."""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
from serve_load import run  # noqa: E402

pytestmark = pytest.mark.vllm


def test_a_short_chat_load_fails_nothing_stays_bounded_and_answers_as_without_ucm(tmp_path):
    r, _ = run(seconds=25, clients=3, turns=4, user_tokens=200, every=5, replay=10, root=str(tmp_path))
    assert r.failures == [], r.failures[:3]
    assert len(r.turns) >= 10, f"only {len(r.turns)} requests in {r.seconds:.0f} s"
    assert r.samples[-1].served_share > 0, "no prompt token was served by ucm: the load did not reach it"
    host_bytes = r.config["host_mib"] << 20
    assert max(s.shm for s in r.samples) <= host_bytes + (1 << 20), [s.shm for s in r.samples]
    first, last = r.samples[0].rss, max(s.rss for s in r.samples)
    assert last <= first * 1.25 + (200 << 20), f"server RSS grew from {first >> 20} to {last >> 20} MiB"
    assert r.replayed >= 8 and r.mismatches == [], f"{len(r.mismatches)} of {r.replayed} replayed turns differ"
