"""`vllm serve` the way docs/serving.md runs it (the CPU build's `python -m` entry point), over HTTP:
two servers sharing one store, then a restart that keeps the cache; ucm's series read from /metrics, and
checked against `ucm stats` for the same run."""

import os
import time

import pytest

from serving import Server
from vllm_harness import prompt_tokens

pytestmark = pytest.mark.vllm
P = prompt_tokens(600, 4000)  # 18 full blocks of 32 + 24 tokens
BLOCKS = len(P) // 32


def test_two_servers_share_a_store_and_a_restart_keeps_it(tmp_path):
    """A computes P and saves it; B, started beside A on the same store (host tier and SSD), hits it in
    the shared host tier; both stop (SIGTERM: the host tier goes); C, a restart, hits P on the SSD.
    Every answer is the same text (float32), and /metrics shows where each hit came from."""
    root = str(tmp_path)
    extra = {"host": {"capacity": "256MiB", "path": os.path.join(root, "host")},
             "ssd": {"path": os.path.join(root, "ssd"), "capacity": "1GiB"}}
    ext = "vllm:prompt_tokens_by_source_total"
    with Server(extra, dtype="float32") as a, Server(extra, dtype="float32") as b:
        a.wait_ready()
        b.wait_ready()
        cold = a.complete(P)
        assert a.metric("vllm:ucm_saved_blocks_total") == BLOCKS, a.tail()
        assert a.metric(ext, source="external_kv_transfer") == 0
        assert b.complete(P) == cold
        assert b.metric("vllm:ucm_hit_blocks_total", tier="host") == BLOCKS, b.tail()
        assert b.metric(ext, source="external_kv_transfer") == BLOCKS * 32
        assert a.complete(P) == cold  # A's own prefix cache
        assert a.metric("vllm:ucm_loaded_tokens_total") == 0
    host = os.path.join(root, "host")
    deadline = time.monotonic() + 30  # the last user's exit drops the host tier (its watcher finishes it)
    while os.path.isdir(host) and os.listdir(host) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not os.path.isdir(host) or not os.listdir(host), "the host tier outlived both servers"
    with Server(extra, dtype="float32") as c:
        c.wait_ready()
        assert c.complete(P) == cold
        assert c.metric("vllm:ucm_hit_blocks_total", tier="ssd") == BLOCKS, c.tail()
        assert c.metric("vllm:ucm_loaded_tokens_total") == BLOCKS * 32
        assert c.metric("vllm:ucm_load_errors_total") == 0
        time.sleep(1.5)  # the occupancy gauges refresh about once a second, with the next report
        c.complete(P[:40])  # a short request: a step, so a report
        prom = {k: c.metric(f"vllm:ucm_{k}") for k in ("loaded_tokens_total", "saved_blocks_total",
                                                      "load_errors_total", "loaded_bytes_total")}
        prom["ssd_hits"] = c.metric("vllm:ucm_hit_blocks_total", tier="ssd")
        prom["ssd_used"] = c.metric("vllm:ucm_tier_used_bytes", tier="ssd")
        prom["ssd_capacity"] = c.metric("vllm:ucm_tier_capacity_bytes", tier="ssd")
    # ucm stats (the journal) says the same about C as its /metrics did
    from ucm.config import from_dict
    from ucm.tools.stats import collect

    deadline = time.monotonic() + 60
    while True:  # C's engine core writes its last counters as it exits, after the API server
        data = collect(from_dict(extra, source="test"))
        workers = [r for r in data["processes"] if r["role"].startswith("worker") and "connector" in r]
        if not any(r["alive"] for r in workers) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert len(workers) == 3 and not any(r["alive"] for r in workers), workers
    c_worker = [r for r in workers if r["connector"]["ssd_hit_blocks"]]  # only C loaded from the SSD
    assert len(c_worker) == 1, workers
    conn = c_worker[0]["connector"]
    assert (conn["hit_tokens"], conn["saved_blocks"], conn["load_errors"], conn["load_bytes"], conn["ssd_hit_blocks"]) == \
        (prom["loaded_tokens_total"], prom["saved_blocks_total"], prom["load_errors_total"], prom["loaded_bytes_total"],
         prom["ssd_hits"]), (conn, prom)
    ssd = next(t for t in data["tiers"] if t["tier"] == "ssd")
    assert (ssd["bytes"], ssd["capacity_bytes"]) == (prom["ssd_used"], prom["ssd_capacity"]) and ssd["bytes"] > 0
