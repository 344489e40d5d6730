"""Store API contract, LRU and capacity, promotion, persistence across processes."""

import torch

from conftest import run_child
from storekit import PAGE, bid, config, dump_commit, load_check, open_and_report, page_bytes
from ucm.tiers import TieredStore


def test_contract_dump_wait_commit_load(tmp_path):
    with TieredStore(config(tmp_path), PAGE) as s:
        ids = [bid(i) for i in range(5)]
        assert s.lookup(ids) == [False] * 5
        src = torch.stack([page_bytes(b) for b in ids])
        t = s.dump(ids, 0, src)
        assert s.wait(t) == 0
        assert s.lookup(ids) == [False] * 5, "dumped but uncommitted blocks must not be visible"
        s.commit(ids, True)
        assert s.lookup(ids) == [True] * 5
        dst = torch.full_like(src, 0x5A)
        t = s.load(ids, 0, dst)
        assert s.wait(t) == 0 and t.errors == {}
        assert torch.equal(dst, src)


def test_failed_commit_is_never_visible(tmp_path):
    with TieredStore(config(tmp_path), PAGE) as s:
        ids = [bid(i) for i in range(4)]
        src = torch.stack([page_bytes(b) for b in ids])
        s.wait(s.dump(ids, 0, src))
        s.commit(ids, [True, False, True, False])
        s.flush()
        assert s.lookup(ids) == [True, False, True, False]
        t = s.load(ids, 0, torch.empty_like(src))
        assert s.wait(t) == 2 and sorted(t.errors) == [1, 3]
        assert t.failed_ids == [ids[1], ids[3]]


def test_lookup_prefix_counts_leading_hits(tmp_path):
    with TieredStore(config(tmp_path), PAGE) as s:
        ids = [bid(i) for i in range(6)]
        dump_commit(s, [ids[0], ids[1], ids[2], ids[4]])
        assert s.lookup_prefix(ids) == 3
        assert s.lookup_prefix(ids[3:]) == 0
        assert s.lookup_prefix([]) == 0


def test_layer_offsets_partial_pages(tmp_path):
    """Layer-wise dumps write a page in slices; loads read any slice back."""
    with TieredStore(config(tmp_path), PAGE) as s:
        ids = [bid(i) for i in range(3)]
        full = torch.stack([page_bytes(b) for b in ids])
        for off in range(0, PAGE, 16384):
            n = min(16384, PAGE - off)
            assert s.wait(s.dump(ids, off, full[:, off:off + n].contiguous())) == 0
        s.commit(ids)
        part = torch.empty(3, 1000, dtype=torch.uint8)
        assert s.wait(s.load(ids, 5000, part)) == 0
        assert torch.equal(part, full[:, 5000:6000])


def test_dtype_agnostic_rows(tmp_path):
    with TieredStore(config(tmp_path), 4096) as s:
        ids = [bid(i) for i in range(2)]
        src = torch.randn(2, 1024, dtype=torch.float32)
        s.wait(s.dump(ids, 0, src.to(torch.bfloat16)))
        s.commit(ids)
        dst = torch.empty(2, 1024, dtype=torch.bfloat16)
        s.wait(s.load(ids, 0, dst))
        assert torch.equal(dst, src.to(torch.bfloat16))


def test_host_lru_eviction_leaves_block_on_ssd_and_load_promotes(tmp_path):
    cfg = config(tmp_path, host="272KiB", ssd="8MiB")  # 4 host slots of 68 KiB
    with TieredStore(cfg, PAGE) as s:
        assert s.host.num_slots == 4
        ids = [bid(i) for i in range(6)]
        dump_commit(s, ids[:4])
        s.flush()
        assert load_check(s, [ids[0]]) == (0, 0)  # touch 0: block 1 is now least recently used
        dump_commit(s, [ids[4]])
        assert s.where(ids[:5]) == ["host", "ssd", "host", "host", "host"]
        dump_commit(s, [ids[5]])
        assert s.where(ids) == ["host", "ssd", "ssd", "host", "host", "host"]
        assert s.usage()["host"]["blocks"] <= 4
        assert load_check(s, [ids[1]]) == (0, 0)
        assert s.where([ids[1]]) == ["host"], "an SSD hit is promoted into the host tier"
        assert s.stats.ssd_hits == 1


def test_ssd_lru_capacity(tmp_path):
    cfg = config(tmp_path, host="1MiB", ssd="340KiB")  # 5 ssd slots
    with TieredStore(cfg, PAGE) as s:
        assert s.ssd.num_slots == 5
        ids = [bid(i) for i in range(8)]
        for b in ids:
            dump_commit(s, [b])
            s.flush()
        assert s.usage()["ssd"]["blocks"] == 5
        on_ssd = [b in s.ssd.index.entries for b in ids]
        assert on_ssd == [False] * 3 + [True] * 5, "oldest blocks leave the SSD tier first"


def test_host_only_configuration(tmp_path):
    with TieredStore(config(tmp_path, ssd=None), PAGE) as s:
        ids = [bid(i) for i in range(3)]
        dump_commit(s, ids)
        assert s.lookup(ids) == [True] * 3
        assert load_check(s, ids) == (0, 0)
        assert s.storage_path == s.host.dir


def test_persistence_new_process_sees_flushed_blocks(tmp_path, procs):
    ids = [bid(i) for i in range(10)]
    with TieredStore(config(tmp_path), PAGE) as s:
        dump_commit(s, ids)
        s.flush()
    r = run_child(procs, open_and_report, str(tmp_path), ids, "host2")  # fresh host tier: data must come from SSD
    assert r["found"] == [True] * 10
    assert r["where"] == ["ssd"] * 10
    assert r["failed"] == 0 and r["wrong"] == 0


def test_second_process_sees_new_commits_while_both_run(tmp_path, procs):
    with TieredStore(config(tmp_path), PAGE) as s:
        first = [bid(i) for i in range(3)]
        dump_commit(s, first)
        r = run_child(procs, open_and_report, str(tmp_path), first, "host")  # same host tier, live
        assert r["found"] == [True] * 3 and r["where"] == ["host"] * 3 and r["wrong"] == 0
        later = [bid(i) for i in range(3, 6)]
        dump_commit(s, later)
        r = run_child(procs, open_and_report, str(tmp_path), first + later, "host")
        assert r["found"] == [True] * 6 and r["wrong"] == 0 and r["failed"] == 0
