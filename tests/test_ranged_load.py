"""RangedLoad: SSD pages read group by group into scattered memory, verified per page."""

import os
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from storekit import bid, config, dump_commit, flip_bits, page_bytes, perturb, slab_of
from ucm.tiers import TieredStore, aio
from ucm.tiers.ranged import DIRECT_ALIGN, PageRange, RangedLoad

LAYERS, SEG = 6, 8192  # a page of 6 "layers" of 8 KiB each
PAGE = LAYERS * SEG
GROUPS = [[PageRange(0, SEG)], [PageRange(SEG, SEG), PageRange(2 * SEG, SEG)],
          [PageRange(3 * SEG, SEG), PageRange(4 * SEG, SEG), PageRange(5 * SEG, SEG)]]


class KV:
    """Per-layer [blocks, SEG] tensors, 4 KiB aligned or deliberately off by 64 bytes."""

    def __init__(self, blocks: int, aligned: bool):
        self.raw, self.layers = [], []
        for _ in range(LAYERS):
            t = torch.zeros(blocks * SEG + 2 * DIRECT_ALIGN, dtype=torch.uint8)
            skew = (-t.data_ptr()) % DIRECT_ALIGN + (0 if aligned else 64)
            self.raw.append(t)
            self.layers.append(t[skew:skew + blocks * SEG].view(blocks, SEG))

    def dest(self, rows):
        return lambda i, r: self.layers[r.page_offset // SEG][rows[i]].data_ptr()

    def page(self, row: int) -> torch.Tensor:
        return torch.cat([layer[row] for layer in self.layers])


def _stored(tmp_path, n):
    ids = [bid(i, 7) for i in range(n)]
    with TieredStore(config(tmp_path, ssd="8MiB"), PAGE) as s:
        dump_commit(s, ids, PAGE)
        s.flush()
    return ids


@pytest.mark.parametrize("aligned", [True, False], ids=["aio-straight-into-memory", "threads-bounce-buffer"])
def test_groups_land_in_scattered_rows_and_verify(tmp_path, aligned):
    ids = _stored(tmp_path, 5)
    kv = KV(12, aligned)
    rows = [9, 2, 11, 0, 5]  # vLLM block ids: any order
    with TieredStore(config(tmp_path, ssd="8MiB", host_dir="host-fresh"), PAGE) as s, ThreadPoolExecutor(4) as pool:
        load = RangedLoad(s.ssd, ids, GROUPS, kv.dest(rows), PAGE, pool)
        assert (load._aio is not None) == (aligned and aio.available()), "aligned memory takes Linux AIO"
        for g in range(len(GROUPS)):
            load.wait_group(g)
            for i, row in enumerate(rows):  # every range of the group is in place once it is done
                for r in GROUPS[g]:
                    assert torch.equal(kv.layers[r.page_offset // SEG][row],
                                       page_bytes(ids[i], PAGE)[r.page_offset:r.page_offset + r.length])
        assert load.finish() == {}
    for i, row in enumerate(rows):
        assert torch.equal(kv.page(row), page_bytes(ids[i], PAGE))
    untouched = [r for r in range(12) if r not in rows]
    assert all(int(layer[untouched].abs().sum()) == 0 for layer in kv.layers)


def test_corrupt_and_truncated_pages_are_reported_and_evicted(tmp_path):
    ids = _stored(tmp_path, 6)
    with TieredStore(config(tmp_path, ssd="8MiB", host_dir="host-a"), PAGE) as s:
        flip_path, flip_off = slab_of(s, ids[1])
        pert_path, pert_off = slab_of(s, ids[3])
        last = max(ids, key=lambda b: s.ssd.index.entries[b].slot)
        cut_path, cut_off = slab_of(s, last)
    flip_bits(flip_path, flip_off + 5 * SEG + 77, 0x10)  # one bit in the last group of block 1
    perturb(pert_path, pert_off, PAGE, seed=1)  # 1% of block 3's bytes nudged by one
    os.truncate(cut_path, cut_off + SEG + 100)  # the last block loses its later groups
    kv = KV(6, aligned=True)
    with TieredStore(config(tmp_path, ssd="8MiB", host_dir="host-b"), PAGE) as s, ThreadPoolExecutor(4) as pool:
        load = RangedLoad(s.ssd, ids, GROUPS, kv.dest(list(range(6))), PAGE, pool)
        errors = load.finish()
        k_last = ids.index(last)
        assert set(errors) == {1, 3, k_last}
        assert "checksum" in errors[1] and "checksum" in errors[3] and "truncated" in errors[k_last]
        assert s.lookup(ids) == [i not in errors for i in range(6)], "bad blocks are dropped from the index"
    for i in range(6):
        if i not in errors:
            assert torch.equal(kv.page(i), page_bytes(ids[i], PAGE))


def test_missing_block_and_bad_ranges(tmp_path):
    ids = _stored(tmp_path, 2)
    kv = KV(3, aligned=True)
    with TieredStore(config(tmp_path, ssd="8MiB", host_dir="host-c"), PAGE) as s, ThreadPoolExecutor(2) as pool:
        load = RangedLoad(s.ssd, ids + [bid(99, 7)], GROUPS, kv.dest([0, 1, 2]), PAGE, pool)
        errors = load.finish()
        assert list(errors) == [2] and "not in the SSD tier" in errors[2]
        with pytest.raises(ValueError, match="gap or overlap at byte 8192"):
            RangedLoad(s.ssd, ids, [[PageRange(0, SEG)], [PageRange(2 * SEG, 4 * SEG)]], kv.dest([0, 1]), PAGE, pool)
        with pytest.raises(ValueError, match="cover 40960 B of a 49152 B page"):
            RangedLoad(s.ssd, ids, [[PageRange(0, 5 * SEG)]], kv.dest([0, 1]), PAGE, pool)
