"""`ucm doctor` names the cause of misses that were planted on purpose (real vLLM objects and runs)."""

import os
import subprocess
import sys

import pytest
import torch

from vllm_harness import BLOCK, prompt_tokens, run_vllm, ucm_connector
from ucm.config import from_dict
from ucm.tools.debug import debug_blocks, debug_connector, debug_request
from ucm.tools.doctor import diagnose, report
from ucm.tools.model_export import ensure_model
from ucm.integration.vllm.ucm_connector import RequestMeta, UCMConnectorMetadata

pytestmark = pytest.mark.vllm
A = prompt_tokens(300, 1000)  # 9 full blocks of 32


def _cfg(root) -> dict:
    return {"host": {"capacity": "64MiB", "path": os.path.join(root, "host")},
            "ssd": {"path": os.path.join(root, "ssd"), "capacity": "256MiB"}}


def _save(root, tokens, salt=None, block_size=BLOCK, tp_size=1, rank=0):
    """Save a prompt's full blocks through real connectors, as a cold vLLM run would: the scheduler's
    lookup and allocation (the journal records them and the chain's seed), the ids the scheduler
    computed for the request, the worker of rank `rank` storing its shard."""
    sched = debug_connector(ensure_model(), "scheduler", _cfg(root), block_size=block_size, tp_size=tp_size)
    worker = debug_connector(ensure_model(), "worker", _cfg(root), block_size=block_size, tp_size=tp_size, rank=rank)
    ids = _save_with(sched, worker, tokens, "cold", salt)
    worker.shutdown()
    sched.shutdown()
    return ids


def _save_with(sched, worker, tokens, req_id, salt=None):
    """One request's save through these connectors (see _save); flushed to the SSD."""
    req = debug_request(req_id, tokens, cache_salt=salt)
    sched.get_num_new_matched_tokens(req, 0)
    ids = list(sched.scheduler.reqs[req_id].ids)  # exactly what the connector hashes (salt, extras)
    sched.update_state_after_alloc(req, debug_blocks(range(len(ids))), 0)
    for t in worker.kv_caches.values():
        t[:len(ids)].copy_(torch.randn_like(t[:len(ids)]))
    worker.bind_connector_metadata(UCMConnectorMetadata(requests=[
        RequestMeta(req_id, dump_block_ids=(ids, list(range(len(ids)))))]))
    worker.wait_for_save()
    worker.clear_connector_metadata()
    worker.store.flush()
    return ids


def _diag(root, tokens, **kw):
    d = diagnose(from_dict(_cfg(root), source="test"), tokens, **kw)
    return d, report(d)


def test_store_empty(tmp_path):
    d, text = _diag(tmp_path, A)
    assert any(r.startswith("store empty") for r in d.reasons), text


def test_all_stored_and_the_grid(tmp_path):
    _save(tmp_path, A)
    d, text = _diag(tmp_path, A)
    root, where = d.best()
    assert where == ["host"] * 9, text
    assert "H H H H H H H H H   (the tier a load uses" in text
    # flushed: every block is in both tiers, and the report shows each tier that holds it
    assert d.held[root] == [("host", "ssd")] * 9
    assert "H H H H H H H H H   held by the host tier" in text and "S S S S S S S S S   held by the ssd tier" in text
    assert d.reasons == [f"all 9 full blocks are stored: the next request with this prompt loads {9 * BLOCK} tokens "
                         "from ucm"], text


def test_prompt_shorter_than_a_block(tmp_path):
    _save(tmp_path, A)
    d, text = _diag(tmp_path, A[:20])
    assert any(r.startswith("prompt shorter than a block: 20 tokens < block_size 32") for r in d.reasons), text


def test_different_root_seed_names_the_field(tmp_path):
    _save(tmp_path, A)
    d, text = _diag(tmp_path, A, block_size=16, dtype="bfloat16")
    assert any("different root seed" in r and "block_size: store has 32, you run 16" in r for r in d.reasons), text
    d, text = _diag(tmp_path, A, dtype="float16")
    assert any("dtype: store has bfloat16/auto, you run float16" in r for r in d.reasons), text
    d, text = _diag(tmp_path, A, model=ensure_model(), dtype="bfloat16", block_size=32)
    assert not any("different root seed" in r for r in d.reasons), text


def test_cache_salt(tmp_path):
    _save(tmp_path, A, salt="tenant-a")
    d, text = _diag(tmp_path, A)
    assert any(r.startswith("cache_salt: 1 of the 1 recorded requests used a cache_salt") for r in d.reasons), text
    d, text = _diag(tmp_path, A, salt="tenant-a")
    assert d.best()[1] == ["host"] * 9, text


def test_prompt_diverges(tmp_path):
    _save(tmp_path, A)
    other = A[:100] + prompt_tokens(200, 5000)  # block 3 (tokens 96..127) differs
    d, text = _diag(tmp_path, other)
    assert any(r.startswith("prompt diverges: blocks 0..2 are stored, block 3 is not") for r in d.reasons), text


def test_vllms_own_prefix_cache_took_the_hit(tmp_path):
    """A real vLLM with its prefix cache on serves the repeat itself; the journal shows it."""
    r = run_vllm([[A], [A]], connector=ucm_connector(str(tmp_path), module_path=True), prefix_caching=True)
    assert r["phase_metrics"][1].get("vllm:prompt_tokens_by_source{source=local_cache_hit}") == 9 * BLOCK
    conn = ucm_connector(str(tmp_path))["extra"]
    d = diagnose(from_dict(conn, source="test"), A)
    assert any(x.startswith("vLLM's own prefix cache took the hit: the last lookup of this prompt found 9 blocks")
               for x in d.reasons), report(d)


def test_patches_disabled_is_named_and_cli_runs(tmp_path):
    _save(tmp_path, A)
    cfg = tmp_path / "ucm.yaml"
    cfg.write_text(f"host: {{capacity: 64MiB, path: {tmp_path}/host}}\nssd: {{path: {tmp_path}/ssd, capacity: 256MiB}}\n")
    p = subprocess.run([sys.executable, "-m", "ucm.tools.cli", "--config", str(cfg), "doctor", "--tokens",
                        ",".join(map(str, A[:100]))], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, UCM_DISABLE_PATCHES="1"))
    assert p.returncode == 0, p.stderr[-2000:]
    assert "=== UCM Doctor ===" in p.stdout and "host 3, ssd 0, remote 0, missing 0" in p.stdout, p.stdout
    assert "- patches disabled (UCM_DISABLE_PATCHES=1): on vLLM 0.32 this does not cause misses" in p.stdout


def test_salted_blocks_stored_by_the_connector_are_found_with_their_salt(tmp_path):
    """The ids the real connector stores for a salted request (identity.py), not a hash of the raw salt."""
    ids = _save(tmp_path, A, salt="tenant-b")
    assert ids != debug_connector(ensure_model(), "scheduler", _cfg(tmp_path)).request_hasher.generate_block_hashes(
        A, salt="tenant-b"), "the connector salts the chain with its request salt, not the raw cache_salt"
    d, text = _diag(tmp_path, A, salt="tenant-b")
    assert d.best()[1] == ["host"] * 9, text
    d, text = _diag(tmp_path, A, salt="tenant-c")
    assert d.best()[1] == ["none"] * 9, text


def test_tp_rank_one_shard_is_found_and_the_missing_rank_named(tmp_path):
    """A simulated rank 1 of a TP=3 engine stores its shard: doctor finds it under rank 1's ids and names
    the ranks that have not stored theirs (a block hits only when every rank has it)."""
    _save(tmp_path, A, tp_size=3, rank=1)
    d, text = _diag(tmp_path, A)
    root, where = d.best()
    assert d.ranks[root][1] == ["host"] * 9 and d.ranks[root][0] == ["none"] * 9, text
    assert where == ["none"] * 9, text
    assert any(r.startswith("TP shards incomplete: the store was written with tp_size 3") and "rank 1 9" in r
               and "rank 0 0" in r for r in d.reasons), text
    assert "rank 1: H H H H H H H H H" in text, text


def test_a_block_one_tp_rank_lacks_is_a_miss_for_the_scheduler(tmp_path):
    """TP=3 (SmolLM2's 9 heads) with simulated ranks: ranks 0 and 1 store A's 9 blocks, rank 2 only the
    first 5. The scheduler counts a block as a hit only when every rank has its shard: 5 blocks load and
    the other 4 are computed (never two ranks' KV beside a missing shard). Once rank 2 stores the rest,
    all 9 hit."""
    for rank in (0, 1):
        _save(tmp_path, A, tp_size=3, rank=rank)
    _save(tmp_path, A[:5 * BLOCK], tp_size=3, rank=2)
    sched = debug_connector(ensure_model(), "scheduler", _cfg(tmp_path), tp_size=3)
    try:
        external, _ = sched.get_num_new_matched_tokens(debug_request("warm", A), 0)
        assert external == 5 * BLOCK
        _save(tmp_path, A, tp_size=3, rank=2)
        external, _ = sched.get_num_new_matched_tokens(debug_request("warm-again", A), 0)
        assert external == 9 * BLOCK
    finally:
        sched.shutdown()


def _files(root) -> dict:
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            path = os.path.join(dirpath, f)
            out[path] = open(path, "rb").read()
    return out


def test_doctor_leaves_the_cache_as_it_found_it(tmp_path):
    """Run while no server is up, on a host tier its last user left behind (killed with its watcher):
    the host tier's pages and index, and the SSD tier, stay byte for byte what they were (doctor opens
    the tiers read-only: no users lock, no reclaim, nothing dropped at exit)."""
    from ucm.tiers.store import close_shared

    _save(tmp_path, A)
    snapshot = _files(tmp_path)
    assert any(p.endswith("pages.bin") for p in snapshot)
    close_shared()  # the last user leaves: the host tier (keep_after_exit: false) is dropped ...
    assert not any(p.endswith("pages.bin") for p in _files(tmp_path))
    for path, data in snapshot.items():  # ... and put back, as a process killed with its watcher leaves it
        os.makedirs(os.path.dirname(path), exist_ok=True)
        open(path, "wb").write(data)
    d, text = _diag(tmp_path, A)
    assert d.best()[1] == ["host"] * 9, text
    after = _files(tmp_path)
    assert sorted(after) == sorted(snapshot), f"files changed: {set(after) ^ set(snapshot)}"
    assert all(after[p] == snapshot[p] for p in snapshot), [p for p in snapshot if after[p] != snapshot[p]]


def test_stats_lists_tiers_and_processes_running_first_by_pid(tmp_path, capsys):
    """`ucm stats` (and --json): the SSD tier's blocks, and the journal's processes with their start
    times; this test's own process (which saved through real connectors) is the running one."""
    import json

    from ucm.tools.stats import collect, main as stats_main

    ids = _save(tmp_path, A)
    data = collect(from_dict(_cfg(tmp_path), source="test"))
    ssd = [t for t in data["tiers"] if t["tier"] == "ssd" and t.get("exists")]
    assert ssd and ssd[0]["blocks"] == len(ids) and ssd[0]["unflushed"] == 0
    procs = data["processes"]
    assert {p["role"] for p in procs} >= {"scheduler", "worker0"}
    assert all(p["alive"] and p["pid"] == os.getpid() and p["started"] <= p["time"] for p in procs)
    worker = next(p for p in procs if p["role"] == "worker0")
    assert worker["connector"]["saved_blocks"] == len(ids) and worker["store"]["flushed_blocks"] == len(ids)
    cfg = tmp_path / "ucm.yaml"
    cfg.write_text(json.dumps(_cfg(tmp_path)))  # JSON is YAML
    capsys.readouterr()
    assert stats_main(str(cfg), as_json=True) == 0
    assert json.loads(capsys.readouterr().out)["processes"][0]["pid"] == os.getpid()
    assert stats_main(str(cfg)) == 0
    text = capsys.readouterr().out
    assert f"worker0 pid {os.getpid()} [RUNNING, started " in text and f"saved {len(ids)}" in text, text


def test_stats_watch_refreshes_and_shows_each_process_changes(tmp_path, capsys):
    """`ucm stats --watch`: a header per refresh; a process seen at the refresh before shows what it
    loaded, saved and flushed since."""
    import json

    from ucm.tools.stats import collect, main as stats_main, show

    import time

    sched = debug_connector(ensure_model(), "scheduler", _cfg(tmp_path), block_size=BLOCK)
    worker = debug_connector(ensure_model(), "worker", _cfg(tmp_path), block_size=BLOCK)
    cfg = from_dict(_cfg(tmp_path), source="test")
    snapshots = []
    for req_id, tokens in (("a", A), ("b", prompt_tokens(300, 6000))):  # 9 blocks each
        _save_with(sched, worker, tokens, req_id)
        time.sleep(1.05)  # the journal takes counters at most once a second
        worker.get_kv_connector_stats()
        snapshots.append(collect(cfg))
    worker.shutdown()
    sched.shutdown()
    capsys.readouterr()
    show(snapshots[1], before=snapshots[0])
    text = capsys.readouterr().out
    assert "saved 18 " in text and "since the last refresh: +0 loaded, +9 saved, +9 flushed" in text, text
    path = tmp_path / "ucm.yaml"
    path.write_text(json.dumps(_cfg(tmp_path)))
    assert stats_main(str(path), watch=0.05, count=3) == 0
    text = capsys.readouterr().out
    assert text.count("ucm stats at ") == 3 and "since the last refresh: +0 loaded, +0 saved, +0 flushed" in text, text
