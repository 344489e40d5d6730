"""Several vLLM instances (separate processes, separate host tiers) sharing one cache: through a Redis
server, through a 3-master Redis cluster, and through one SSD directory; the server killed mid-run;
cache_salt isolation. The real vLLM CPU build and SmolLM2-135M, in float32, where a loaded block is
bit-identical to a recomputed one: every output is compared with a no-cache baseline (DESIGN.md's exact
test)."""

import functools
import os

import pytest

from redis_servers import RedisCluster, RedisServer
from vllm_harness import BLOCK, EXT, assert_identical, prompt_tokens, run_vllm

pytestmark = pytest.mark.vllm
DISK = "vllm:prompt_tokens_cached_by_source{source=disk}"
REMOTE = "vllm:prompt_tokens_cached_by_source{source=external_unspecified}"

N = 300  # 9 full blocks of 32 + 12 tokens
P = [prompt_tokens(N, 400 * k) for k in range(4)]
Q = [prompt_tokens(N, 1800 + 300 * k) for k in range(3)]  # new prompts, never stored
HIT = (N // BLOCK) * BLOCK  # tokens an instance loads for a stored prompt


def run(phases, connector=None, **kw):
    return run_vllm(phases, connector=connector, dtype="float32", **kw)


def _toks(p) -> tuple:
    return tuple(p["tokens"] if isinstance(p, dict) else p)


BATCHES = [[p] for p in P + Q] + [P[:3], [P[1]] + Q, P[:2], [P[0], P[3]]]  # every batch the tests run


@functools.lru_cache(maxsize=None)
def baseline() -> dict:
    """Every batch the tests run, without a cache (a batch's composition changes float32 rounding)."""
    out = run(BATCHES)["phases"]
    return {tuple(_toks(p) for p in batch): o for batch, o in zip(BATCHES, out)}


def expected(prompts):
    return baseline()[tuple(_toks(p) for p in prompts)]


def instance(root, tag: str, *, remote=None, ssd=None, host=True) -> dict:
    cfg = {"host": {"capacity": "256MiB", "path": os.path.join(root, f"host-{tag}")} if host else None,
           "ssd": {"path": ssd, "capacity": "1GiB"} if ssd else None,  # null: the default's tier off
           "transfer": {"load_planner": False}}  # exact hit counts (vllm_harness.ucm_connector says why)
    if remote:
        cfg["remote"] = {"timeout_ms": 500, "reconnect_max_ms": 500, **remote}
    return {"kv_connector": "UCMConnector", "extra": cfg}


def ext(result, phase) -> int:
    return result["phase_metrics"][phase].get(EXT, 0)


def test_two_instances_share_through_redis_and_survive_a_server_kill(tmp_path):
    server = RedisServer(str(tmp_path), appendonly=True)  # comes back with its data after kill -9
    root = str(tmp_path)
    try:
        a = run([P[:3]], instance(root, "a", remote={"url": server.url}))
        assert ext(a, 0) == 0
        assert_identical(a["phases"][0], expected(P[:3]))
        batch = [P[1]] + Q
        b = run([[P[0]], batch, [P[2]]], instance(root, "b", remote={"url": server.url}),
                hooks={1: {"during": [0.2, f"kill -9 {server.proc.pid}"]},
                       2: {"before": server.restart_command(settle_s=1.5)}})
        # the second instance, with its own empty host tier, loads the first one's blocks from Redis
        assert ext(b, 0) == HIT and b["phase_metrics"][0].get(REMOTE, 0) == HIT
        assert_identical(b["phases"][0], expected([P[0]]))
        # the server dies during this batch: every request completes, identical
        assert_identical(b["phases"][1], expected(batch))
        # it came back: hits resume in the same vLLM process
        assert ext(b, 2) == HIT
        assert_identical(b["phases"][2], expected([P[2]]))
        remote_lines = [line for line in b["log"].splitlines() if "[UCM.Remote]" in line]
        assert sum("unreachable" in line for line in remote_lines) == 1, remote_lines
        assert sum("is back after" in line for line in remote_lines) == 1, remote_lines
    finally:
        server.shutdown()


def test_two_instances_share_through_a_redis_cluster(tmp_path):
    cluster = RedisCluster(str(tmp_path))
    root = str(tmp_path)
    remote = {"url": cluster.urls, "cluster": True}
    try:
        # remote-only configurations: no host section (a staging area carries the pages), no SSD
        a = run([P[:2]], instance(root, "a", remote=remote, host=False))
        assert ext(a, 0) == 0
        keys = [int(n.cli("dbsize").strip()) for n in cluster.nodes]
        assert sum(1 for k in keys if k) >= 2, f"pages should spread over the masters: {keys}"
        b = run([P[:2]], instance(root, "b", remote=remote))
        assert ext(b, 0) == 2 * HIT
        assert_identical(b["phases"][0], expected(P[:2]))
    finally:
        cluster.kill()


def test_shared_ssd_directory_and_cache_salt_isolation(tmp_path):
    root, ssd = str(tmp_path), str(tmp_path / "shared-ssd")
    a_salted = {"tokens": P[3], "salt": "tenant-a"}
    a = run([[P[0], a_salted]], instance(root, "a", ssd=ssd))
    assert ext(a, 0) == 0
    b_salted = {"tokens": P[3], "salt": "tenant-b"}
    b = run([[P[0]], [b_salted], [a_salted], [P[3]], [b_salted]], instance(root, "b", ssd=ssd))
    assert ext(b, 0) == HIT and b["phase_metrics"][0].get(DISK, 0) == HIT  # from the shared SSD
    assert ext(b, 1) == 0, "another tenant's salt must never hit"
    assert ext(b, 2) == HIT, "the same salt hits"
    assert ext(b, 3) == 0, "an unsalted request must not hit salted blocks"
    assert ext(b, 4) == HIT, "tenant-b's own blocks (saved in phase 1) hit"
    for k, prompts in enumerate([[P[0]], [b_salted], [a_salted], [P[3]], [b_salted]]):
        assert_identical(b["phases"][k], expected(prompts))
