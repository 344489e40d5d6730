"""Helpers shared by store tests; importable by forkserver children (no test state here)."""

from __future__ import annotations

import os
import random
import struct
import time

import numpy as np
import torch

from ucm.config import from_dict
from ucm.tiers import TieredStore

PAGE = 64 * 1024 + 100  # deliberately not a multiple of 4 KiB
CRASH_PAGE = 16 * 1024 + 100


def config(root, host="1MiB", ssd="8MiB", host_dir="host", writer="thread", **extra):
    """A small store under `root`. `writer`: ssd.writer; these tests write from threads unless they test
    the helper process (tests/test_flush_process.py), which costs each store a Python start."""
    d = {"host": {"capacity": host, "path": os.path.join(root, host_dir)}}
    if ssd:
        d["ssd"] = {"path": os.path.join(root, "ssd"), "capacity": ssd, "slab_size": "1MiB", "writer": writer}
    d.update(extra)
    return from_dict(d, source="test.yaml")


def bid(n: int, tag: int = 0) -> bytes:
    return n.to_bytes(8, "little") + tag.to_bytes(8, "little")


def page_bytes(block_id: bytes, size: int = PAGE) -> torch.Tensor:
    """Deterministic content of a block (so any process can check it)."""
    rs = np.random.RandomState(int.from_bytes(block_id[:4], "little") ^ int.from_bytes(block_id[8:12], "little"))
    return torch.from_numpy(np.frombuffer(rs.bytes(size), dtype=np.uint8).copy())


def dump_commit(store: TieredStore, ids, size: int = PAGE) -> list:
    """Dump and commit; returns the ids actually stored (a full host tier may refuse some)."""
    src = torch.stack([page_bytes(b, size) for b in ids])
    t = store.dump(ids, 0, src)
    store.wait(t)
    store.commit(ids, [i not in t.errors for i in range(len(ids))])
    return [b for i, b in enumerate(ids) if i not in t.errors]


def load_check(store: TieredStore, ids, size: int = PAGE):
    """(number of loads reported failed, number of loads that returned wrong bytes)."""
    dst = torch.full((len(ids), size), 0xA5, dtype=torch.uint8)
    t = store.load(ids, 0, dst)
    store.wait(t)
    wrong = sum(1 for i, b in enumerate(ids) if i not in t.errors and not torch.equal(dst[i], page_bytes(b, size)))
    return len(t.errors), wrong


# ---- child processes ------------------------------------------------------------------------------
def crash_writer(root: str, ready_path: str, flushed_path: str, seed: int) -> None:
    """Dump, commit and flush forever; append ids whose flush completed to `flushed_path`."""
    torch.set_num_threads(1)
    store = TieredStore(config(root, host="1MiB", ssd="256MiB"), CRASH_PAGE)  # no SSD eviction
    rng = random.Random(seed)
    n = 0
    out = os.open(flushed_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    open(ready_path, "w").close()
    while True:
        ids = [bid(n + k, seed) for k in range(rng.randint(1, 6))]
        n += len(ids)
        dump_commit(store, ids, CRASH_PAGE)
        if rng.random() < 0.5:
            store.flush()
            store.ssd.refresh()
            done = [b for b in ids if b in store.ssd]  # a dump refused for lack of room is not "flushed"
            os.write(out, b"".join(b.hex().encode() + b"\n" for b in done))


def engine_killed_mid_flush(root: str, ready_path: str, n: int) -> None:
    """Commit n blocks through the SSD writer process, write its pid and the ids, and wait to be killed."""
    torch.set_num_threads(1)
    store = TieredStore(config(root, host="16MiB", ssd="16MiB", writer="process"), PAGE)
    assert store.flusher.wait_ready(60), "the SSD writer process did not start"
    ids = [bid(k, 42) for k in range(n)]
    stored = []
    for k in range(0, n, 8):
        stored += dump_commit(store, ids[k:k + 8])
    with open(ready_path + ".tmp", "w") as f:
        f.write(f"{store.flusher.pid}\n" + "".join(b.hex() + "\n" for b in stored))
    os.rename(ready_path + ".tmp", ready_path)
    while True:
        time.sleep(1)


def verify_after_crash(root: str, flushed_path: str, q) -> None:
    torch.set_num_threads(1)
    store = TieredStore(config(root, host="1MiB", ssd="256MiB"), CRASH_PAGE)
    with open(flushed_path) as f:
        flushed = [bytes.fromhex(line) for line in f.read().split()]
    missing = [b.hex() for b, ok in zip(flushed, store.lookup(flushed)) if not ok]
    present = list(dict.fromkeys(list(store.host.index.entries) + list(store.ssd.index.entries)))
    failed = wrong = 0
    for k in range(0, len(present), 32):
        f, w = load_check(store, present[k:k + 32], CRASH_PAGE)
        failed, wrong = failed + f, wrong + w
    q.put({"present": len(present), "failed": failed, "wrong": wrong, "missing": missing, "flushed": len(flushed)})
    store.close()


def open_and_report(root: str, ids, host_dir: str, q) -> None:
    torch.set_num_threads(1)
    store = TieredStore(config(root, host_dir=host_dir), PAGE)
    found, where = store.lookup(ids), store.where(ids)
    failed, wrong = load_check(store, [b for b, f in zip(ids, found) if f]) if any(found) else (0, 0)
    q.put({"found": found, "failed": failed, "wrong": wrong, "where": where})
    store.close()


def concurrent_worker(root: str, tag: int, rounds: int, q) -> None:
    """Dump own and shared blocks while reading everything visible; report torn reads."""
    torch.set_num_threads(1)
    store = TieredStore(config(root, host="4MiB", ssd="32MiB"), PAGE)
    committed, failed_loads, wrong = [], 0, 0
    for r in range(rounds):
        ids = [bid(r * 4 + k, tag) for k in range(3)] + [bid(r, 999)]  # last one shared by all writers
        committed += dump_commit(store, ids)
        visible = list(store.host.index.entries)[-16:]
        f, w = load_check(store, visible)
        failed_loads += f
        wrong += w
    store.flush()
    q.put({"committed": [b.hex() for b in committed], "failed": failed_loads, "wrong": wrong})
    store.close()


def disk_full_child(root: str, fsize_limit: int, q) -> None:
    import resource

    torch.set_num_threads(1)
    resource.setrlimit(resource.RLIMIT_FSIZE, (fsize_limit, fsize_limit))
    store = TieredStore(config(root, host="408KiB", ssd="16MiB"), PAGE)  # 6 host slots
    first = [bid(k, 7) for k in range(8)]
    for k in range(0, 8, 4):
        dump_commit(store, first[k:k + 4])
        store.flush()
    more = [bid(100 + k, 7) for k in range(40)]
    for k in range(0, 40, 4):
        dump_commit(store, more[k:k + 4])
        store.flush()
    found_first = store.lookup(first)
    failed, wrong = load_check(store, first)
    q.put({"flush_failures": store.stats.flush_failures, "errors": [e[2] for e in store.stats.recent_errors],
           "found_first": found_first, "failed": failed, "wrong": wrong,
           "on_ssd": sum(w == "ssd" or w == "host" for w in store.where(more))})
    store.close()


# ---- damaging stored pages ------------------------------------------------------------------------
def slab_of(store: TieredStore, block_id: bytes) -> tuple[str, int]:
    """(slab file, byte offset) of a block committed to the store's SSD tier."""
    slots = store.ssd.slots
    slot = store.ssd.index.entries[block_id].slot
    return slots.slab_path(slot // slots.slots_per_slab), (slot % slots.slots_per_slab) * slots.slot_size


def flip_bits(path: str, offset: int, mask: int = 0x01) -> None:
    """XOR one byte of a file with mask."""
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ mask]))


def perturb(path: str, offset: int, size: int, seed: int = 0) -> None:
    """Add 1 (mod 256) to 1% of the bytes [offset, offset + size) of a file, as a perturbed KV would be."""
    with open(path, "r+b") as f:
        f.seek(offset)
        data = bytearray(f.read(size))
        for k in random.Random(seed).sample(range(size), size // 100):
            data[k] = (data[k] + 1) % 256
        f.seek(offset)
        f.write(data)


def tier_dir(ssd_root: str) -> str:
    """The one page-size directory (p<page bytes>) of the SSD tier at ssd_root."""
    (sub,) = [d for d in os.listdir(ssd_root) if d.startswith("p")]
    return os.path.join(ssd_root, sub)


def stored_ids(ssd_root: str, prompt: list[int]) -> list[bytes]:
    """The store ids of a prompt's full blocks, under the one chain root recorded in the SSD tier's journal."""
    from ucm.tools.doctor import recorded_chains

    chains = recorded_chains(tier_dir(ssd_root), prompt)
    assert len(chains) == 1, f"one chain root expected in {ssd_root}, found {list(chains)}"
    return next(iter(chains.values()))[1]


def worker_counters(ssd_root: str) -> list[dict]:
    """The connector counters (`ucm stats`' source) of each worker process that wrote some to the SSD
    tier's journal."""
    from ucm.integration.vllm.journal import read_counters

    return [c["connector"] for c in read_counters(tier_dir(ssd_root)) if c["role"].startswith("worker")]


def forget_on_ssd(ssd_root: str, capacity: int, ids) -> None:
    """Drop blocks from the SSD tier at ssd_root (`capacity` bytes, as configured), as its eviction
    does: holes in a stored chain."""
    from ucm.tiers.slab import SlabTier, TierSpec

    page = int(os.path.basename(tier_dir(ssd_root))[1:])
    tier = SlabTier(TierSpec("ssd", ssd_root, capacity, "file"), page)
    try:
        tier.evict(list(ids))
    finally:
        tier.close()


def ssd_slot(ssd_root: str, capacity: int, block_id: bytes) -> int:
    """The slot holding a committed block in the SSD tier at ssd_root (see forget_on_ssd)."""
    from ucm.tiers.index import SlotIndex
    from ucm.tiers.slab import round_up

    d = tier_dir(ssd_root)
    index = SlotIndex(d, capacity // round_up(int(os.path.basename(d)[1:])), readonly=True)
    try:
        return index.entries[block_id].slot
    finally:
        index.close()


def slots_in_put_order(ssd_root):
    """Slots of the SSD tier's committed blocks, in the order they were published."""
    d = tier_dir(ssd_root)
    data = open(os.path.join(d, "index.log"), "rb").read()
    slots = [struct.unpack_from("<BBHI", data, k)[3] for k in range(0, len(data), 64) if data[k] == 2]
    return d, slots


def slot_place(tier_dir, slot):
    """(slab file, byte offset) of a slot of an SSD tier directory p<page> (default 1 GiB slabs)."""
    page = int(os.path.basename(tier_dir)[1:])
    slot_size = (page + 4095) // 4096 * 4096
    per_slab = max(1, (1 << 30) // slot_size)
    return os.path.join(tier_dir, f"slab_{slot // per_slab:05d}.bin"), (slot % per_slab) * slot_size


def shared_ssd_worker(root: str, tag: int, rounds: int, q) -> None:
    """One instance of several on a shared SSD directory, each with its own host tier: write own and
    shared blocks into a small SSD (constant eviction by the others) and read the others' blocks from it."""
    torch.set_num_threads(1)
    store = TieredStore(config(root, host="2MiB", ssd="2MiB", host_dir=f"host-{tag}"), PAGE)
    rng = random.Random(tag)
    read = failed_loads = wrong = 0
    for r in range(rounds):
        ids = [bid(r * 4 + k, tag) for k in range(3)] + [bid(r % 7, 999), bid(r % 5, 998)]
        dump_commit(store, ids)
        store.flush()
        store.ssd.refresh()
        theirs = [b for b in store.ssd.index.entries if b not in store.host]
        sample = rng.sample(theirs, min(6, len(theirs)))
        if sample:
            f, w = load_check(store, sample)
            read, failed_loads, wrong = read + len(sample), failed_loads + f, wrong + w
    q.put({"read": read, "failed": failed_loads, "wrong": wrong})
    store.close()
