"""`vllm serve` the way docs/serving.md runs it (the CPU build's `python -m` entry point), over HTTP:
two servers sharing one store, then a restart that keeps the cache; ucm's series read from /metrics."""

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
