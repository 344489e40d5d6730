"""SSD writes in a helper process (`ssd.writer: process`, the default): what reaches the SSD, and what
happens when the helper or the engine dies."""

import os
import signal
import time

import pytest

from conftest import run_child
from storekit import PAGE, bid, config, dump_commit, engine_killed_mid_flush, load_check
from ucm.tiers import TieredStore


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is not alive
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"


def _on_disk_only(root, ids, ssd="8MiB"):
    """(found on the SSD, failed loads, wrong bytes) seen by a fresh store with an empty host tier."""
    with TieredStore(config(root, host_dir="fresh-host", ssd=ssd), PAGE) as s:
        where = s.where(ids)
        return where.count("ssd"), *load_check(s, ids)


def test_helper_process_writes_the_ssd_and_exits_with_the_store(tmp_path):
    ids = [bid(k, 1) for k in range(24)]
    with TieredStore(config(tmp_path, host="4MiB", writer="process"), PAGE) as s:
        assert s.flusher.pid is None, "the helper starts at the first block to write (or start_writer)"
        assert s.flusher.wait_ready(60)
        pid = s.flusher.pid
        assert pid is not None and pid != os.getpid()
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            assert b"ucm.tiers.flush_process" in f.read()
        assert dump_commit(s, ids) == ids
        s.flush(timeout=60)
        assert s.flusher.local is None, "every block went to the helper"
        assert s.stats.flushed_blocks == len(ids) and s.stats.flush_failures == 0
        s.host.refresh()
        assert not s.host.index.dirty, "the helper marks what it wrote clean in the host tier"
    assert not _alive(pid), "the helper outlived its store"
    assert _on_disk_only(tmp_path, ids) == (len(ids), 0, 0)


def test_blocks_committed_while_the_helper_starts_are_written_here(tmp_path):
    ids = [bid(k, 5) for k in range(24)]
    with TieredStore(config(tmp_path, host="4MiB", writer="process"), PAGE) as s:
        assert dump_commit(s, ids) == ids  # the helper is starting: it takes a Python start and torch
        assert s.flusher.local is not None, "blocks waited for the helper instead of being written"
        s.flush(timeout=60)
        assert s.stats.flushed_blocks == len(ids)
        assert s.flusher.wait_ready(60), "the helper never came up"
        more = [bid(100 + k, 5) for k in range(8)]
        os.kill(s.flusher.pid, signal.SIGSTOP)  # blocks that go to the helper now wait for it
        try:
            dump_commit(s, more)
            with pytest.raises(TimeoutError):
                s.flush(timeout=1)
        finally:
            os.kill(s.flusher.pid, signal.SIGCONT)
        s.flush(timeout=60)
        assert s.stats.flushed_blocks == len(ids) + len(more)
    assert _on_disk_only(tmp_path, ids + more) == (len(ids) + len(more), 0, 0)


def test_a_killed_helper_hands_its_unflushed_blocks_back(tmp_path):
    first, more = [bid(k, 2) for k in range(8)], [bid(100 + k, 2) for k in range(16)]
    with TieredStore(config(tmp_path, host="4MiB", writer="process"), PAGE) as s:
        assert s.flusher.wait_ready(60)
        dump_commit(s, first)
        s.flush(timeout=60)
        assert s.flusher.local is None
        pid = s.flusher.pid
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while s.flusher.pid is not None and time.monotonic() < deadline:  # the engine notices (pipe EOF)
            time.sleep(0.01)
        assert s.flusher.pid is None, "the engine did not notice its helper died"
        dump_commit(s, more)
        s.flush(timeout=60)
        assert s.stats.flushed_blocks == len(first) + len(more)
        assert any("SSD writer process exited" in why for _, _, why in s.stats.recent_errors)
    assert _on_disk_only(tmp_path, first + more) == (len(first) + len(more), 0, 0)


def test_blocks_queued_before_the_helper_dies_still_reach_the_ssd(tmp_path):
    ids = [bid(k, 3) for k in range(40)]
    with TieredStore(config(tmp_path, host="4MiB", writer="process"), PAGE) as s:
        assert s.flusher.wait_ready(60)
        dump_commit(s, ids[:8])
        s.flush(timeout=60)
        os.kill(s.flusher.pid, signal.SIGSTOP)  # it stops before it reads the next batch
        dump_commit(s, ids[8:])
        os.kill(s.flusher.pid, signal.SIGKILL)
        s.flush(timeout=60)
    assert _on_disk_only(tmp_path, ids) == (len(ids), 0, 0)


def test_write_failures_in_the_helper_are_counted_by_the_engine(tmp_path):
    ids = [bid(k, 4) for k in range(8)]
    with TieredStore(config(tmp_path, host="4MiB", writer="process"), PAGE) as s:
        assert s.flusher.wait_ready(60)
        os.makedirs(s.ssd.slots.slab_path(0))  # the first slab file cannot be opened: a directory is there
        assert dump_commit(s, ids) == ids
        s.flush(timeout=60)
        assert s.stats.flush_failures == len(ids) and s.stats.flushed_blocks == 0
        assert any(op == "flush" for _, op, _ in s.stats.recent_errors), s.stats.recent_errors
        assert load_check(s, ids) == (0, 0), "blocks that did not reach the SSD are still served from memory"


def test_the_helper_finishes_its_queue_when_the_engine_is_killed(tmp_path, procs):
    ready = str(tmp_path / "ready")
    p = procs.Process(target=engine_killed_mid_flush, args=(str(tmp_path), ready, 160))
    p.start()
    deadline = time.monotonic() + 120
    while not os.path.exists(ready):
        assert p.is_alive() and time.monotonic() < deadline, "the engine did not start"
        time.sleep(0.01)
    os.kill(p.pid, signal.SIGKILL)
    p.join()
    with open(ready) as f:
        pid, *hexes = f.read().split()
    deadline = time.monotonic() + 60
    while _alive(int(pid)):
        assert time.monotonic() < deadline, "the helper did not exit after its engine died"
        time.sleep(0.05)
    ids = [bytes.fromhex(h) for h in hexes]
    assert len(ids) == 160
    assert _on_disk_only(tmp_path, ids, ssd="16MiB") == (len(ids), 0, 0)
    host = tmp_path / "host" / f"p{PAGE}"
    assert not (host / "pages.bin").exists(), "the helper, last user of the host tier, left it behind"


@pytest.mark.parametrize("value", ["processes", ""])
def test_a_wrong_writer_names_the_key(tmp_path, value):
    from ucm.config import ConfigError, from_dict

    with pytest.raises(ConfigError, match="ssd.writer"):
        from_dict({"host": {"capacity": "1MiB", "path": str(tmp_path)},
                   "ssd": {"path": str(tmp_path / "s"), "capacity": "8MiB", "writer": value}}, source="x.yaml")


def test_a_disk_slower_than_the_saves_keeps_the_newest_blocks_in_host_memory(tmp_path):
    """The helper stopped (a disk that writes nothing for now): a host tier full of blocks not yet on the
    SSD takes newer saves in place of its oldest unflushed blocks (sparing the writer's next runs), every
    load is exact or a miss, and what the helper writes afterwards is exact; evictions are not failures."""
    with TieredStore(config(tmp_path, host="4MiB", writer="process"), PAGE) as s:
        assert s.flusher.wait_ready(60)
        n = s.host.num_slots
        spare = s._spare_unflushed
        assert 0 < spare < n // 2
        old = [bid(k, 6) for k in range(n)]
        new = [bid(1000 + k, 6) for k in range(n // 2)]
        os.kill(s.flusher.pid, signal.SIGSTOP)
        try:
            assert dump_commit(s, old) == old
            s.host.refresh()
            assert len(s.host.index.dirty) == n, "every page holds a block not yet on the SSD"
            assert dump_commit(s, new) == new, "the newest saves must find room"
            assert s.stats.unflushed_evicted == len(new) and s.stats.dump_failures == 0
            kept = [b for b in old if b in s.host]
            assert old[:spare] == kept[:spare], "the writer's next blocks are spared"
            assert len(kept) == n - len(new)
            assert load_check(s, new + kept) == (0, 0)
        finally:
            os.kill(s.flusher.pid, signal.SIGCONT)
        s.flush(timeout=60)
        assert s.stats.flush_failures == 0, s.stats.recent_errors
        assert s.stats.flushed_blocks == len(new) + len(kept)
    found, failed, wrong = _on_disk_only(tmp_path, old + new, ssd="8MiB")
    assert (found, wrong) == (len(new) + len(kept), 0)
    assert failed == len(old) - len(kept), "the evicted ones are misses, never wrong bytes"
