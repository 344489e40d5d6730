"""Crash safety (SIGKILL), corruption, disk full, and two processes on one path."""

import os
import random
import signal
import time

import torch

from conftest import run_child, run_children
from storekit import (PAGE, bid, concurrent_worker, config, crash_writer, disk_full_child, dump_commit, flip_bits,
                      load_check, perturb, slab_of, verify_after_crash)
from ucm.tiers import TieredStore

CRASH_TRIALS = 50


def test_sigkill_at_random_moments_never_serves_bad_bytes(tmp_path, procs):
    rng = random.Random(1234)
    totals = {"present": 0, "flushed": 0}
    for trial in range(CRASH_TRIALS):
        root = tmp_path / f"t{trial % 5}"  # 5 stores, each crashed 10 times: restarts over old state too
        root.mkdir(exist_ok=True)
        ready, flushed = root / f"ready{trial}", root / "flushed.txt"
        p = procs.Process(target=crash_writer, args=(str(root), str(ready), str(flushed), trial))
        p.start()
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert p.is_alive() and time.monotonic() < deadline, "writer did not start"
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, 0.4))
        os.kill(p.pid, signal.SIGKILL)
        p.join()
        assert p.exitcode == -signal.SIGKILL
        r = run_child(procs, verify_after_crash, str(root), str(flushed))
        assert r["wrong"] == 0, f"trial {trial}: {r['wrong']} blocks served with wrong bytes"
        assert r["failed"] == 0, f"trial {trial}: {r['failed']} committed blocks failed to load"
        assert r["missing"] == [], f"trial {trial}: flushed blocks lost: {r['missing'][:3]}"
        totals["present"] += r["present"]
        totals["flushed"] += r["flushed"]
    assert totals["flushed"] > CRASH_TRIALS, "the writers must have flushed blocks before being killed"


def _store_on_disk_only(tmp_path, tag, ssd="8MiB"):
    """A store whose host tier is new and empty, so every load reads the SSD."""
    return TieredStore(config(tmp_path, host_dir=f"host-{tag}", ssd=ssd), PAGE)


def test_flipped_byte_is_detected_and_reported_per_block(tmp_path):
    ids = [bid(i) for i in range(6)]
    with TieredStore(config(tmp_path), PAGE) as s:
        dump_commit(s, ids)
        s.flush()
    with _store_on_disk_only(tmp_path, "a") as s:
        path, off = slab_of(s, ids[2])
    flip_bits(path, off + 12345)
    with _store_on_disk_only(tmp_path, "b") as s:
        dst = torch.zeros(6, PAGE, dtype=torch.uint8)
        t = s.load(ids, 0, dst)
        assert s.wait(t) == 1
        assert list(t.errors) == [2] and "checksum" in t.errors[2]
        assert s.lookup(ids) == [True, True, False, True, True, True], "a corrupt block is dropped"
        assert load_check(s, ids[:2] + ids[3:]) == (0, 0)


def test_perturbed_page_is_caught_by_checksum(tmp_path):
    """1% of a page's bytes changed (as a perturbed KV would be) -> load error, never data."""
    ids = [bid(i) for i in range(2)]
    with TieredStore(config(tmp_path), PAGE) as s:
        dump_commit(s, ids)
        s.flush()
        path, off = slab_of(s, ids[0])
    perturb(path, off, PAGE)
    with _store_on_disk_only(tmp_path, "c") as s:
        assert load_check(s, ids) == (1, 0)


def test_truncated_slab_is_detected(tmp_path):
    ids = [bid(i) for i in range(12)]
    with TieredStore(config(tmp_path), PAGE) as s:
        dump_commit(s, ids)
        s.flush()
        path, off = slab_of(s, ids[7])
    os.truncate(path, off + 100)
    with _store_on_disk_only(tmp_path, "d") as s:
        dst = torch.zeros(12, PAGE, dtype=torch.uint8)
        t = s.load(ids, 0, dst)
        s.wait(t)
        assert 7 in t.errors and "truncated" in t.errors[7]
        for i in range(12):
            if i not in t.errors:
                assert torch.equal(dst[i], __import__("storekit").page_bytes(ids[i]))


def test_disk_full_fails_flushes_cleanly_and_keeps_serving(tmp_path, procs):
    # RLIMIT_FSIZE caps every file at 700 KiB: the host tier (408 KiB) fits, the 1 MiB slab files fill up
    r = run_child(procs, disk_full_child, str(tmp_path), 700 * 1024)
    assert r["flush_failures"] > 0
    assert any("too large" in e.lower() or "space" in e.lower() for e in r["errors"]), r["errors"]
    assert r["found_first"] == [True] * 8
    assert r["failed"] == 0 and r["wrong"] == 0


def test_two_processes_dump_and_lookup_one_path(tmp_path, procs):
    results = run_children(procs, concurrent_worker, [(str(tmp_path), tag, 40) for tag in (1, 2)], timeout=180)
    for r in results:
        assert r["wrong"] == 0, "torn or wrong bytes were served"
    committed = sorted({bytes.fromhex(h) for r in results for h in r["committed"]})
    with _store_on_disk_only(tmp_path, "z", ssd="32MiB") as s:
        assert all(s.lookup(committed)), "a commit was lost"
        assert load_check(s, committed) == (0, 0)


def test_flush_runs_group_consecutive_slots_up_to_a_size():
    from ucm.tiers.flush import _runs

    ids = [bytes([i]) for i in range(7)]
    got = list(_runs(ids, [4, 5, 6, 9, 10, 11, 12], 3))
    assert got == [(ids[0:3], 4), (ids[3:6], 9), (ids[6:7], 12)]
    assert list(_runs([], [], 16)) == []
