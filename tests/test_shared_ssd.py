"""One SSD tier used by several instances at once, as on a shared filesystem (NFS, 3FS, Lustre): each
instance has its own host tier; concurrent writers of the same block, eviction by one instance while
another reads, and reservations made on another machine."""

import os
import time

from conftest import run_children
from storekit import PAGE, config, load_check, shared_ssd_worker
from ucm.tiers import TieredStore
from ucm.tiers.index import FOREIGN_LEASE_S, HOST_TAG, REC_RES, SlotIndex, _pack


def test_instances_with_their_own_host_tiers_share_one_ssd_safely(tmp_path, procs):
    results = run_children(procs, shared_ssd_worker, [(str(tmp_path), tag, 30) for tag in range(4)])
    assert sum(r["wrong"] for r in results) == 0, f"wrong bytes were served: {results}"
    assert sum(r["read"] - r["failed"] for r in results) > 50, f"too few reads of other instances' blocks: {results}"
    with TieredStore(config(str(tmp_path), host_dir="host-check", ssd="2MiB"), PAGE) as s:
        idx = s.ssd.index
        assert len(set(idx.slot_ids.values())) == len(idx.slot_ids), "a block is published in two slots"
        assert all(idx.entries[b].slot == slot for slot, b in idx.slot_ids.items())
        survivors = list(idx.entries)
        assert survivors and load_check(s, survivors) == (0, 0)


def _index(tmp_path, slots=4) -> SlotIndex:
    d = tmp_path / "idx"
    d.mkdir(parents=True, exist_ok=True)
    return SlotIndex(str(d), slots)


def _reserve_all(idx: SlotIndex, owner: int, host: int, stamp: int) -> None:
    with idx.locked():
        for s in range(idx.num_slots):
            idx._append(_pack(REC_RES, s, owner, host=host, stamp=stamp))


def test_another_machines_reservation_is_kept_until_its_lease_ends(tmp_path):
    """A pid from another machine means nothing here: its reservation is not reclaimed because no local
    process has that pid, only once it is older than the lease."""
    idx = _index(tmp_path)
    dead_pid_owner = (2 ** 31 - 7) << 32  # no such process here
    _reserve_all(idx, dead_pid_owner, host=HOST_TAG ^ 1, stamp=int(time.time()))
    with idx.locked():
        assert idx.reserve(1, set()) == [], "a live foreign reservation was reclaimed"
    _reserve_all(idx, dead_pid_owner, host=HOST_TAG ^ 1, stamp=int(time.time()) - FOREIGN_LEASE_S - 5)
    with idx.locked():
        assert len(idx.reserve(4, set())) == 4, "an expired foreign reservation was not reclaimed"


def test_a_dead_local_writers_reservation_is_reclaimed_at_once(tmp_path):
    for host in (HOST_TAG, 0):  # 0: a record from before host tags existed
        idx = _index(tmp_path / str(host))
        _reserve_all(idx, (2 ** 31 - 7) << 32, host=host, stamp=int(time.time()))
        with idx.locked():
            assert len(idx.reserve(4, set())) == 4
        idx.close()


def test_reservations_survive_compaction_with_their_host(tmp_path):
    idx = _index(tmp_path)
    _reserve_all(idx, (2 ** 31 - 7) << 32, host=HOST_TAG ^ 1, stamp=int(time.time()))
    with idx.locked():
        idx._compact()
    again = SlotIndex(idx.dir, idx.num_slots)
    assert set(again.reserved_by.values()) == {(HOST_TAG ^ 1, idx.reserved_by[0][1])}
    with again.locked():
        assert again.reserve(1, set()) == []
    assert os.path.exists(again.log_path)


def test_free_slot_scans_stop_at_the_count_and_resume_where_they_stopped(tmp_path):
    """A reservation looks at only as many free slots as it needs, and the next one starts after them
    (a full scan per save held the engine's GIL); every slot is still found, wrapping around."""
    idx = _index(tmp_path, slots=10)
    with idx.locked():
        first = idx.reserve(3, set())
        second = idx.reserve(3, set())
    assert first == [0, 1, 2] and second == [3, 4, 5]
    assert idx.free_slots(2) == [6, 7]
    assert sorted(idx.free_slots()) == [6, 7, 8, 9], "without a count: every free slot"
    with idx.locked():
        rest = idx.reserve(10, set())
    assert sorted(rest) == [6, 7, 8, 9] and idx.free_slots(1) == []
